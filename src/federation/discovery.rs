//! Server discovery: which URL reaches a server name. Order, per the spec:
//! the static `destinations` override; an IP literal or an explicit port (connect directly);
//! `/.well-known/matrix/server` delegation; SRV `_matrix-fed._tcp` (then the deprecated
//! `_matrix._tcp`); finally port 8448. Results are cached (1 h for answers, 5 min after a
//! failed well-known lookup).
//!
//! Limitation: after SRV resolution the request goes to the SRV target's host name, so TLS is
//! checked against that name rather than the server name.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Where to send requests for a server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Base URL without trailing slash, e.g. `https://kiwi.example:8448`.
    pub base_url: String,
    /// The `Host` header to send.
    pub host: String,
}

/// Split `name` into host and optional port (handles `[v6]:port`).
pub fn split_host_port(name: &str) -> (&str, Option<u16>) {
    if let Some(rest) = name.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let host = &name[..end + 2];
            let port = rest[end + 1..].strip_prefix(':').and_then(|p| p.parse().ok());
            return (host, port);
        }
    }
    match name.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (name, None),
        },
        _ => (name, None),
    }
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok()
}

/// The steps that need no network: the override map, IP literals and explicit ports.
pub fn resolve_static(overrides: &BTreeMap<String, String>, name: &str) -> Option<Destination> {
    if let Some(url) = overrides.get(name) {
        return Some(Destination { base_url: url.trim_end_matches('/').to_owned(), host: name.to_owned() });
    }
    let (host, port) = split_host_port(name);
    if let Some(port) = port {
        return Some(Destination { base_url: format!("https://{host}:{port}"), host: name.to_owned() });
    }
    if is_ip_literal(host) {
        return Some(Destination { base_url: format!("https://{host}:8448"), host: format!("{host}:8448") });
    }
    None
}

/// Resolves and caches destinations.
pub struct Discovery {
    overrides: BTreeMap<String, String>,
    cache: Mutex<HashMap<String, (Destination, Instant)>>,
    resolver: Option<hickory_resolver::TokioResolver>,
}

impl Discovery {
    /// A resolver with `overrides` (server name -> base URL).
    pub fn new(overrides: BTreeMap<String, String>) -> Self {
        let resolver = hickory_resolver::TokioResolver::builder_tokio().ok().map(|b| b.build());
        Self { overrides, cache: Mutex::new(HashMap::new()), resolver }
    }

    /// Whether `name` has an entry in the operator's static map.
    pub fn is_static(&self, name: &str) -> bool {
        self.overrides.contains_key(name)
    }

    /// Where `name` is reached.
    pub async fn resolve(&self, http: &reqwest::Client, name: &str) -> Destination {
        if let Some(d) = resolve_static(&self.overrides, name) {
            return d;
        }
        if let Some((d, until)) = self.cache.lock().expect("cache lock").get(name) {
            if *until > Instant::now() {
                return d.clone();
            }
        }
        let (dest, ttl) = self.discover(http, name).await;
        tracing::debug!(server = name, base_url = %dest.base_url, "resolved destination");
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() > 10_000 {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
        }
        cache.insert(name.to_owned(), (dest.clone(), Instant::now() + ttl));
        dest
    }

    async fn discover(&self, http: &reqwest::Client, name: &str) -> (Destination, Duration) {
        let hour = Duration::from_secs(3600);
        // Well-known delegation.
        let url = format!("https://{name}/.well-known/matrix/server");
        let delegated = match http.get(&url).timeout(Duration::from_secs(10)).send().await {
            Ok(r) if r.status().is_success() => super::client::read_capped(r, 64 * 1024)
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("m.server").and_then(|s| s.as_str()).map(str::to_owned))
                .filter(|d| ruma::ServerName::parse(d).is_ok()),
            _ => None,
        };
        let ttl = if delegated.is_some() { hour } else { Duration::from_secs(300) };
        let target = delegated.unwrap_or_else(|| name.to_owned());
        let (host, port) = split_host_port(&target);
        if let Some(port) = port {
            return (Destination { base_url: format!("https://{host}:{port}"), host: target.clone() }, ttl);
        }
        if is_ip_literal(host) {
            return (Destination { base_url: format!("https://{host}:8448"), host: format!("{host}:8448") }, ttl);
        }
        if let Some(resolver) = &self.resolver {
            for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
                if let Ok(srv) = resolver.srv_lookup(format!("{service}.{host}.")).await {
                    if let Some(rec) = srv.iter().min_by_key(|r| (r.priority(), u16::MAX - r.weight())) {
                        let t = rec.target().to_utf8();
                        let t = t.trim_end_matches('.');
                        return (Destination { base_url: format!("https://{t}:{}", rec.port()), host: host.to_owned() }, ttl);
                    }
                }
            }
        }
        (Destination { base_url: format!("https://{host}:8448"), host: host.to_owned() }, ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_resolution() {
        let mut o = BTreeMap::new();
        o.insert("kiwi".to_owned(), "https://10.0.0.1:8443/".to_owned());
        assert_eq!(resolve_static(&o, "kiwi").unwrap().base_url, "https://10.0.0.1:8443");
        let d = resolve_static(&o, "localhost:8481").unwrap();
        assert_eq!((d.base_url.as_str(), d.host.as_str()), ("https://localhost:8481", "localhost:8481"));
        assert_eq!(resolve_static(&o, "127.0.0.1").unwrap().base_url, "https://127.0.0.1:8448");
        assert_eq!(resolve_static(&o, "[::1]:99").unwrap().base_url, "https://[::1]:99");
        assert_eq!(resolve_static(&o, "[::1]").unwrap().base_url, "https://[::1]:8448");
        assert!(resolve_static(&o, "example.org").is_none());
    }
}
