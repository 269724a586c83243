//! The outbound federation client: resolves destinations, signs every request with X-Matrix,
//! and classifies failures as transient (network, 429, 5xx) or permanent.

use std::{sync::Arc, time::Duration};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::Method;

use super::{auth, discovery::Discovery};
use crate::{config::Config, keys::SigningKey, metrics::Metrics};

/// Characters escaped in a path segment: everything but unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// Percent-encode one path segment (room ids, event ids, user ids).
pub fn enc(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// An outbound request failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Could not connect, TLS failed, or timed out.
    #[error("network error talking to {dest}: {reason}")]
    Network { dest: String, reason: String },
    /// The peer answered with an error status.
    #[error("{dest} answered {status}: {body}")]
    Http { dest: String, status: u16, body: String },
    /// The peer's answer did not parse.
    #[error("bad response from {dest}: {reason}")]
    BadResponse { dest: String, reason: String },
    /// The peer's answer is larger than fedlink accepts (asking again will not shrink it).
    #[error("response from {dest} is larger than {cap} bytes")]
    TooLarge { dest: String, cap: usize },
}

impl ClientError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Network { .. } => true,
            ClientError::Http { status, .. } => *status == 429 || *status >= 500,
            ClientError::BadResponse { .. } | ClientError::TooLarge { .. } => false,
        }
    }
}

/// Signs and sends federation requests.
pub struct FederationClient {
    http: reqwest::Client,
    /// For destinations the operator mapped in `federation.destinations`: may reach private
    /// addresses even when `allow_private_networks` is off (the operator chose them; a peer
    /// cannot add entries).
    http_static: reqwest::Client,
    allow_private: bool,
    max_response: usize,
    discovery: Discovery,
    key: Arc<SigningKey>,
    origin: String,
    metrics: Arc<Metrics>,
}

impl FederationClient {
    /// A client for `cfg`, signing as `cfg.server_name` with `key`.
    pub fn new(cfg: &Config, key: Arc<SigningKey>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let certs = match &cfg.federation.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("federation.ca_file {}: {e}", ca.display()))?;
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| anyhow::anyhow!("federation.ca_file {}: {e}", ca.display()))?
            }
            None => Vec::new(),
        };
        let builder = || {
            let mut b = reqwest::Client::builder()
                .timeout(Duration::from_secs(cfg.federation.request_timeout_secs))
                .connect_timeout(Duration::from_secs(10))
                .user_agent(concat!("fedlink/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none())
                .danger_accept_invalid_certs(!cfg.federation.verify_tls);
            for cert in &certs {
                b = b.add_root_certificate(cert.clone());
            }
            b
        };
        let http_static = builder().build()?;
        let mut b = builder();
        if !cfg.federation.allow_private_networks {
            b = b.dns_resolver(Arc::new(super::netguard::GuardedResolver));
        }
        Ok(Self {
            http_static,
            http: b.build()?,
            allow_private: cfg.federation.allow_private_networks,
            max_response: cfg.federation.max_response_bytes,
            discovery: Discovery::new(cfg.federation.destinations.clone()),
            key,
            origin: cfg.server_name.clone(),
            metrics,
        })
    }

    /// An unauthenticated GET (key server queries), with a small response cap.
    pub async fn get_unsigned(&self, dest: &str, path: &str) -> Result<serde_json::Value, ClientError> {
        let d = self.resolve(dest).await?;
        let req = self.http_for(dest).get(format!("{}{path}", d.base_url)).header("Host", &d.host);
        self.finish(dest, req, 256 * 1024).await
    }

    /// The client for `dest`: the unguarded one only for the operator's static entries.
    fn http_for(&self, dest: &str) -> &reqwest::Client {
        if self.discovery.is_static(dest) {
            &self.http_static
        } else {
            &self.http
        }
    }

    async fn resolve(&self, dest: &str) -> Result<super::discovery::Destination, ClientError> {
        let d = self.discovery.resolve(&self.http, dest).await;
        if self.discovery.is_static(dest) {
            return Ok(d);
        }
        let host = d.base_url.trim_start_matches("https://").trim_start_matches("http://");
        let (host, _) = super::discovery::split_host_port(host.split('/').next().unwrap_or(host));
        if !self.allow_private && super::netguard::literal_blocked(host) {
            self.metrics.outbound_requests.with_label_values(&["blocked"]).inc();
            return Err(ClientError::Network { dest: dest.to_owned(), reason: "address not allowed (federation.allow_private_networks)".into() });
        }
        Ok(d)
    }

    /// A signed request; `path` is the percent-encoded path and query.
    pub async fn request(
        &self,
        dest: &str,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let d = self.resolve(dest).await?;
        let content = match body {
            Some(b) => Some(ruma::canonical_json::CanonicalJsonValue::try_from(b.clone()).map_err(|e| {
                ClientError::BadResponse { dest: dest.to_owned(), reason: format!("request body is not canonical: {e}") }
            })?),
            None => None,
        };
        let authz = auth::sign_request(&self.key, &self.origin, dest, method.as_str(), path, content.as_ref());
        let mut req = self
            .http_for(dest)
            .request(method.clone(), format!("{}{path}", d.base_url))
            .header("Host", &d.host)
            .header("Authorization", authz);
        if let Some(b) = body {
            req = req.json(b);
        }
        tracing::debug!(%dest, %method, path, "federation request");
        self.finish(dest, req, self.max_response).await
    }

    async fn finish(&self, dest: &str, req: reqwest::RequestBuilder, cap: usize) -> Result<serde_json::Value, ClientError> {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.outbound_requests.with_label_values(&["network_error"]).inc();
                return Err(ClientError::Network { dest: dest.to_owned(), reason: error_chain(&e) });
            }
        };
        let status = resp.status();
        let bytes = read_capped(resp, cap).await.map_err(|reason| {
            if reason.starts_with(TOO_LARGE) {
                ClientError::TooLarge { dest: dest.to_owned(), cap }
            } else {
                ClientError::Network { dest: dest.to_owned(), reason }
            }
        })?;
        if !status.is_success() {
            self.metrics.outbound_requests.with_label_values(&["http_error"]).inc();
            let body = String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned();
            return Err(ClientError::Http { dest: dest.to_owned(), status: status.as_u16(), body });
        }
        self.metrics.outbound_requests.with_label_values(&["ok"]).inc();
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse { dest: dest.to_owned(), reason: e.to_string() })
    }
}

/// How [`read_capped`] starts its error for an answer over the cap.
pub const TOO_LARGE: &str = "response larger than";

/// Read a response body, refusing more than `cap` bytes.
pub async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|l| l as usize > cap) {
        return Err(format!("{TOO_LARGE} {cap} bytes"));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if buf.len() + chunk.len() > cap {
            return Err(format!("{TOO_LARGE} {cap} bytes"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
