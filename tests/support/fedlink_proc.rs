//! Starting fedlink for tests, on ephemeral loopback ports with a config written to a temp
//! dir: in-process ([`Fedlink`], fast, for fake-peer tests) or as the real binary
//! ([`FedlinkBin`], for end-to-end tests that kill it).

use std::{
    ops::Deref,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use fedlink::{app, config::Config};
use serde_json::Value;

use super::synapse::{free_port, self_signed_cert, wait_until};

/// Everything runs on loopback: let fedlink connect to it.
pub const LOOPBACK_ENV: [(&str, &str); 1] = [("FEDLINK_FEDERATION__ALLOW_PRIVATE_NETWORKS", "true")];

/// The admin token tests use.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Write a config for fedlink in `dir`, returning its path.
pub fn write_config(dir: &Path, fed_port: u16, metrics_port: u16, extra: &str) -> PathBuf {
    if !dir.join("tls.crt").exists() {
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

/// How tests reach a running fedlink: its name, URLs, and admin helpers.
pub struct Endpoints {
    pub name: String,
    /// `https://127.0.0.1:<port>`
    pub fed_url: String,
    /// `http://127.0.0.1:<port>`
    pub admin_url: String,
    pub fed_port: u16,
    http: reqwest::Client,
}

impl Endpoints {
    fn new(fed_port: u16, metrics_port: u16) -> Self {
        Endpoints {
            name: format!("localhost:{fed_port}"),
            fed_url: format!("https://127.0.0.1:{fed_port}"),
            admin_url: format!("http://127.0.0.1:{metrics_port}"),
            fed_port,
            http: reqwest::Client::builder().danger_accept_invalid_certs(true).timeout(Duration::from_secs(30)).build().unwrap(),
        }
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_until("fedlink key server", Duration::from_secs(30), || async {
            Ok(self.http.get(format!("{}/_matrix/key/v2/server", self.fed_url)).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()))
        })
        .await
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

    /// POST an admin API path (no body) with the token.
    pub async fn admin_post(&self, path: &str) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.admin_url)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.admin_url)).send().await.unwrap().text().await.unwrap()
    }

    /// Sum of the series whose line starts with `series` (0 if absent).
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
}

/// A running in-process fedlink.
pub struct Fedlink {
    ep: Endpoints,
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Deref for Fedlink {
    type Target = Endpoints;
    fn deref(&self) -> &Endpoints {
        &self.ep
    }
}

impl Fedlink {
    /// Start in `dir` (reusing its key and database if present) on `fed_port` (0 = pick).
    pub async fn start(dir: &Path, fed_port: u16, extra: &str) -> Fedlink {
        Self::start_with_env(dir, fed_port, extra, &LOOPBACK_ENV).await
    }

    /// Like [`Fedlink::start`], with these `FEDLINK_*` overrides instead of the loopback ones.
    pub async fn start_with_env(dir: &Path, fed_port: u16, extra: &str, env: &[(&str, &str)]) -> Fedlink {
        let fed = std::net::TcpListener::bind(("127.0.0.1", fed_port)).unwrap();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        fed.set_nonblocking(true).unwrap();
        metrics.set_nonblocking(true).unwrap();
        let fed_port = fed.local_addr().unwrap().port();
        let metrics_port = metrics.local_addr().unwrap().port();
        let cfg_path = write_config(dir, fed_port, metrics_port, extra);
        let cfg = Config::load(&cfg_path, env.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app::run(cfg, app::Listeners { federation: fed, metrics }, async move {
            let _ = rx.await;
        }));
        let f = Fedlink { ep: Endpoints::new(fed_port, metrics_port), dir: dir.to_owned(), stop: Some(tx), task: Some(task) };
        f.ep.wait_ready().await.unwrap();
        f
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

/// The real `fedlink` binary, run as a child process.
pub struct FedlinkBin {
    ep: Endpoints,
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    metrics_port: u16,
}

impl Deref for FedlinkBin {
    type Target = Endpoints;
    fn deref(&self) -> &Endpoints {
        &self.ep
    }
}

impl FedlinkBin {
    /// Write a config in `dir` and start `fedlink run` with it.
    pub async fn start(dir: &Path, extra: &str) -> anyhow::Result<FedlinkBin> {
        Self::start_on(dir, free_port(), free_port(), extra).await
    }

    /// Like [`FedlinkBin::start`], on given ports.
    pub async fn start_on(dir: &Path, fed_port: u16, metrics_port: u16, extra: &str) -> anyhow::Result<FedlinkBin> {
        let config = write_config(dir, fed_port, metrics_port, extra);
        let mut f = FedlinkBin { ep: Endpoints::new(fed_port, metrics_port), dir: dir.to_owned(), config, child: None, metrics_port };
        f.spawn().await?;
        Ok(f)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("fedlink.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_fedlink"))
            .args(["run", "-c"])
            .arg(&self.config)
            .env("FEDLINK_LOG", "info,fedlink=debug,sled=warn")
            .envs(LOOPBACK_ENV)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.ep.wait_ready().await.map_err(|e| e.context(self.log_tail()))
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again with the same config, key, ports and database.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let _ = self.metrics_port;
        self.spawn().await
    }

    /// The last lines of fedlink's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("fedlink.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(150)..].join("\n")
    }
}

impl Drop for FedlinkBin {
    fn drop(&mut self) {
        self.kill();
    }
}
