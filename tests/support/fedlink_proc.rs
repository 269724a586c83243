//! Starting fedlink for tests: in-process (fast, for fake-peer tests) with a config written
//! to a temp dir, on ephemeral loopback ports.

use std::{path::{Path, PathBuf}, time::Duration};

use fedlink::{app, config::Config};
use serde_json::Value;

use super::synapse::self_signed_cert;

/// The admin token tests use.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A running in-process fedlink.
pub struct Fedlink {
    pub name: String,
    /// `https://127.0.0.1:<port>`
    pub fed_url: String,
    /// `http://127.0.0.1:<port>`
    pub admin_url: String,
    pub dir: PathBuf,
    pub fed_port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    http: reqwest::Client,
}

/// Write a config for fedlink in `dir` (federation port `fed_port`), returning its path.
pub fn write_config(dir: &Path, fed_port: u16, metrics_port: u16, extra: &str) -> PathBuf {
    let tls = dir.join("tls.crt");
    if !tls.exists() {
        self_signed_cert(dir, &["localhost", "127.0.0.1"]);
    }
    let text = format!(
        r#"server_name = "localhost:{fed_port}"
[listen]
federation = "127.0.0.1:{fed_port}"
metrics = "127.0.0.1:{metrics_port}"
[tls]
cert = "tls.crt"
key = "tls.key"
[keys]
signing_key = "signing.key"
[storage]
path = "db"
[admin]
token = "{ADMIN_TOKEN}"
{extra}
"#
    );
    let path = dir.join("fedlink.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Fedlink {
    /// Start in `dir` (reusing its key and database if present) on `fed_port` (0 = pick).
    pub async fn start(dir: &Path, fed_port: u16, extra: &str) -> Fedlink {
        let fed = std::net::TcpListener::bind(("127.0.0.1", fed_port)).unwrap();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        fed.set_nonblocking(true).unwrap();
        metrics.set_nonblocking(true).unwrap();
        let fed_port = fed.local_addr().unwrap().port();
        let metrics_port = metrics.local_addr().unwrap().port();
        let cfg_path = write_config(dir, fed_port, metrics_port, extra);
        let cfg = Config::load(&cfg_path, std::iter::empty()).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app::run(cfg, app::Listeners { federation: fed, metrics }, async move {
            let _ = rx.await;
        }));
        let http = reqwest::Client::builder().danger_accept_invalid_certs(true).timeout(Duration::from_secs(30)).build().unwrap();
        let f = Fedlink {
            name: format!("localhost:{fed_port}"),
            fed_url: format!("https://127.0.0.1:{fed_port}"),
            admin_url: format!("http://127.0.0.1:{metrics_port}"),
            dir: dir.to_owned(),
            fed_port,
            stop: Some(tx),
            task: Some(task),
            http,
        };
        // Ready when the key server answers.
        super::synapse::wait_until("fedlink key server", Duration::from_secs(20), || async {
            Ok(f.http.get(format!("{}/_matrix/key/v2/server", f.fed_url)).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()))
        })
        .await
        .unwrap();
        f
    }

    /// The bot's user id.
    pub fn bot(&self) -> String {
        format!("@fedlink:{}", self.name)
    }

    /// GET an admin API path with the token.
    pub async fn admin(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", self.admin_url)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.admin_url)).send().await.unwrap().text().await.unwrap()
    }

    /// A metric's value (sum over series matching `name{labels}` prefix), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(series) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Log length from the admin API.
    pub async fn log_len(&self) -> u64 {
        self.admin("/_fedlink/admin/v1/status").await.1["log_entries"].as_u64().unwrap()
    }

    /// Stop gracefully and wait.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Fedlink {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
