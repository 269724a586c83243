//! A real Prometheus (Debian package `prometheus`, installed by `scripts/test.sh` when
//! missing) scraping fedlink, with fedlink's alert rules loaded; and the expressions of the
//! shipped dashboard and rules, to evaluate against it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{free_port, wait_until};

/// The repository's `dashboards/` directory.
pub fn dashboards() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// `prometheus`/`promtool` from `FEDLINK_PROMETHEUS_BIN_DIR` or the PATH.
pub fn bin(name: &str) -> PathBuf {
    match std::env::var_os("FEDLINK_PROMETHEUS_BIN_DIR") {
        Some(d) => Path::new(&d).join(name),
        None => PathBuf::from(name),
    }
}

/// A Prometheus server, killed on drop.
pub struct Prometheus {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Start Prometheus scraping `target` (host:port of fedlink's metrics listener) every
    /// second as job `fedlink`, with `dashboards/fedlink-alerts.yml` loaded.
    pub async fn start(target: &str) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        std::fs::copy(dashboards().join("fedlink-alerts.yml"), dir.path().join("fedlink-alerts.yml"))?;
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [fedlink-alerts.yml]\n\
             scrape_configs:\n  - job_name: fedlink\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config)?;
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(bin("prometheus"))
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus (apt-get install prometheus; scripts/test.sh does)")?;
        let p = Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir };
        wait_until("prometheus ready", Duration::from_secs(60), || async {
            Ok(reqwest::get(format!("{}/-/ready", p.url)).await.ok().filter(|r| r.status().is_success()).map(|_| ()))
        })
        .await?;
        Ok(p)
    }

    /// Evaluate `expr` now; its result vector, or the error Prometheus gave.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let v: Value = reqwest::Client::new().get(format!("{}/api/v1/query", self.url)).query(&[("query", expr)]).send().await?.json().await?;
        if v["status"] != "success" {
            bail!("{expr}: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The rule groups as Prometheus loaded them (health and last error of each rule).
    pub async fn rules(&self) -> Result<Vec<Value>> {
        let v: Value = reqwest::get(format!("{}/api/v1/rules", self.url)).await?.json().await?;
        Ok(v["data"]["groups"].as_array().cloned().unwrap_or_default())
    }

    /// The prometheus log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// Every PromQL expression of the dashboard, with its panel title, `$instance` widened to
/// every instance.
pub fn dashboard_exprs() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(dashboards().join("fedlink.json")).unwrap()).unwrap();
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_owned();
            p["targets"].as_array().cloned().unwrap_or_default().into_iter().filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.replace("$instance", ".*"))))
        })
        .collect()
}
