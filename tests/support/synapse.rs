//! A harness that runs real Synapse homeservers on loopback for end-to-end tests.
//!
//! Each [`Synapse`] gets its own temporary directory (config, SQLite database,
//! signing key, self-signed TLS certificate, media store and logs) and two
//! ephemeral ports:
//!
//! * the **federation** port, served over TLS, which is also the port in the
//!   server name (`localhost:<fedport>`), so other servers connect to it directly
//!   with no `.well-known` or SRV lookup;
//! * the **client** port, plain HTTP on `127.0.0.1`, used by [`ClientSession`].
//!
//! The configuration makes loopback federation work with self-signed
//! certificates: `federation_verify_certificates: false`, an empty
//! `ip_range_blacklist` (the default blocks `127.0.0.0/8`), and
//! `trusted_key_servers: []` so keys are fetched directly from each origin. Rate
//! limits are raised so tests never see a 429.
//!
//! The Python interpreter comes from [`synapse_python`]; `scripts/test.sh`
//! installs Synapse into `.venv` and exports `FEDLINK_SYNAPSE_PYTHON`.
//!
//! Several servers can run at once (parallel tests): nothing is shared between
//! instances. The child process is killed when the [`Synapse`] is dropped, and
//! also (via `PR_SET_PDEATHSIG`) if the test binary dies without unwinding. Set
//! `FEDLINK_KEEP_SYNAPSE_DIRS=1` to keep the temp dirs for a post-mortem.
//!
//! Synapse behaviours worth knowing when writing tests against it:
//! * `/sync` without `since` is normally cached for 2 minutes; the harness sets
//!   `caches.sync_response_cache_duration: 0` so polling `/sync` sees news.
//! * A read receipt for an event the server does not have yet is answered with
//!   200 and silently dropped: wait for the event to arrive before sending it.
//! * Outgoing receipts are batched per room
//!   (`federation_rr_transactions_per_room_per_second`, raised here).

use std::fmt::Write as _;
use std::fs;

pub use super::util::{enc, self_signed_cert, TlsFiles};
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use rand::distributions::Alphanumeric;
use rand::{Rng, RngCore};
use serde_json::{json, Value};

/// How long [`Synapse::start`] waits for a fresh homeserver to answer.
///
/// A lone Synapse with SQLite is up in a few seconds; several starting at once
/// on a two-core machine take much longer, hence the generous margin.
pub const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Password given to every user created by [`Synapse::register`].
pub const TEST_PASSWORD: &str = "fedlink-test-password";

/// `python -c` program equivalent to `python -m synapse.app.homeserver`, except
/// that it first asks Linux to SIGKILL the homeserver when the thread that
/// spawned it exits (`prctl(PR_SET_PDEATHSIG)`), so a test binary that is killed
/// or aborts leaves no Synapse behind. Consequence: start a [`Synapse`] from the
/// runtime that uses it (not from a short-lived helper thread).
const PYTHON_BOOT: &str = "\
import ctypes, runpy, signal
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception:
    pass
runpy.run_module('synapse.app.homeserver', run_name='__main__', alter_sys=True)
";

/// The Python interpreter of the virtualenv that has `matrix-synapse` installed.
///
/// Taken from `FEDLINK_SYNAPSE_PYTHON`, else `<crate root>/.venv/bin/python`.
/// Panics with instructions when neither exists.
pub fn synapse_python() -> PathBuf {
    let path = match std::env::var_os("FEDLINK_SYNAPSE_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
    };
    if !path.exists() {
        panic!(
            "Synapse python interpreter not found at {}: run scripts/test.sh \
             (it installs matrix-synapse into .venv and sets FEDLINK_SYNAPSE_PYTHON)",
            path.display()
        );
    }
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Synapse YAML that retries a failed destination after 1 s, at most 5 s apart (the
/// default starts at 10 minutes), so tests that stop a server see it caught up quickly.
pub const FAST_RETRY: &str = "federation:\n  destination_min_retry_interval: 1s\n  destination_retry_multiplier: 1.5\n  destination_max_retry_interval: 5s\n";

/// Two homeservers retrying fast (`FAST_RETRY`), kiwi and litchi, with bob and alice
/// registered on kiwi and alice on litchi: the cast of the two-server end-to-end tests.
pub struct KiwiLitchi {
    pub kiwi: Synapse,
    pub litchi: Synapse,
    pub bob: ClientSession,
    pub alice_k: ClientSession,
    pub alice_l: ClientSession,
}

/// Start [`KiwiLitchi`].
pub async fn kiwi_and_litchi() -> KiwiLitchi {
    let (kiwi, litchi) = tokio::join!(
        Synapse::start(SynapseOpts { extra_yaml: FAST_RETRY.into(), ..Default::default() }),
        Synapse::start(SynapseOpts { extra_yaml: FAST_RETRY.into(), ..Default::default() })
    );
    let (kiwi, litchi) = (kiwi.expect("kiwi starts"), litchi.expect("litchi starts"));
    let bob = kiwi.register("bob").await.unwrap();
    let alice_k = kiwi.register("alice").await.unwrap();
    let alice_l = litchi.register("alice").await.unwrap();
    KiwiLitchi { kiwi, litchi, bob, alice_k, alice_l }
}

/// fedlink config for loopback tests: TLS checks off, only `servers` allowed, and one
/// person `alice` linking `accounts`.
pub fn linked_alice_config(servers: &[&str], accounts: &[&str]) -> String {
    let list = |v: &[&str]| v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "[federation]\nverify_tls = false\nallowed_servers = [{}]\n[[directory.person]]\nid = \"alice\"\naccounts = [{}]\n",
        list(servers),
        list(accounts)
    )
}

/// Options for [`Synapse::start`].
#[derive(Debug, Clone, Default)]
pub struct SynapseOpts {
    /// YAML appended verbatim to the generated `homeserver.yaml`. A top-level key
    /// given here overrides the harness's own (the last occurrence wins), e.g.
    /// `default_room_version: "10"` or `app_service_config_files: [...]`.
    pub extra_yaml: String,
    /// Serve a certificate from this CA, and the client API on the TLS listener too (at
    /// `https_client_url`).
    pub private_ca: Option<std::sync::Arc<super::util::TestCa>>,
}

/// A running Synapse homeserver, killed on drop.
pub struct Synapse {
    /// `localhost:<fedport>`.
    pub server_name: String,
    /// `http://127.0.0.1:<clientport>` (no trailing slash).
    pub client_url: String,
    /// `https://127.0.0.1:<fedport>` (self-signed certificate).
    pub federation_url: String,
    pub fed_port: u16,
    pub client_port: u16,
    /// Certificate and key served on the federation port.
    pub tls: TlsFiles,
    /// Holds `homeserver.yaml`, `homeserver.log`, `homeserver.db`, `stdout.log`, `stderr.log`, ...
    pub dir: tempfile::TempDir,
    /// How long the last (re)start took until both listeners answered.
    pub startup_time: Duration,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Synapse {
    /// Writes a fresh configuration, starts the homeserver and waits until
    /// `GET {client_url}/health` is 200 and the federation listener serves its
    /// keys. Retries with new ports if Synapse could not bind them.
    pub async fn start(opts: SynapseOpts) -> Result<Synapse> {
        let mut last_err = None;
        for _attempt in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("fedlink-synapse-")
                .tempdir()
                .context("creating Synapse temp dir")?;
            let fed_port = free_port();
            let mut client_port = free_port();
            while client_port == fed_port {
                client_port = free_port();
            }
            let tls = match &opts.private_ca {
                Some(ca) => ca.issue(dir.path(), &["localhost", "127.0.0.1"]),
                None => self_signed_cert(dir.path(), &["localhost", "127.0.0.1"]),
            };
            let mut hs = Synapse {
                server_name: format!("localhost:{fed_port}"),
                client_url: format!("http://127.0.0.1:{client_port}"),
                federation_url: format!("https://127.0.0.1:{fed_port}"),
                fed_port,
                client_port,
                tls,
                dir,
                startup_time: Duration::ZERO,
                child: None,
                http: http_client(),
            };
            hs.write_config(&opts)?;
            match hs.launch().await {
                Ok(()) => return Ok(hs),
                Err(e) => {
                    let clash = hs.log_tail().contains("Address already in use")
                        || read_tail(&hs.dir.path().join("stderr.log"), 100)
                            .contains("Address already in use");
                    if !clash {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("Synapse did not start")))
    }

    /// Stops the homeserver and starts it again with the same directory, ports and
    /// configuration (e.g. after writing an application-service registration that
    /// `extra_yaml` already points at).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch().await
    }

    /// The homeserver's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the child process (if running) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The client API on the TLS listener (served there with `SynapseOpts::private_ca`).
    pub fn https_client_url(&self) -> String {
        format!("https://localhost:{}", self.fed_port)
    }

    /// Path of `homeserver.yaml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("homeserver.yaml")
    }

    /// Path of `homeserver.log`.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("homeserver.log")
    }

    /// The last ~100 lines of `homeserver.log`, for failure messages.
    pub fn log_tail(&self) -> String {
        read_tail(&self.log_path(), 100)
    }

    /// Registers `@localpart:<server_name>` through open registration
    /// (`m.login.dummy`) and returns a logged-in session.
    pub async fn register(&self, localpart: &str) -> Result<ClientSession> {
        let url = format!("{}/_matrix/client/v3/register", self.client_url);
        let mut body = json!({
            "username": localpart,
            "password": TEST_PASSWORD,
            "initial_device_display_name": "fedlink-test",
        });
        // First round: get a user-interactive-auth session (401), then complete
        // the dummy stage with it.
        let resp = self.http.post(&url).json(&body).send().await?;
        let status = resp.status();
        let first: Value = resp.json().await.unwrap_or(Value::Null);
        let done = if status.is_success() {
            first
        } else if status.as_u16() == 401 {
            let session = first["session"].as_str().unwrap_or_default().to_owned();
            body["auth"] = json!({ "type": "m.login.dummy", "session": session });
            let resp = self.http.post(&url).json(&body).send().await?;
            let status = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!(
                    "registering {localpart} on {}: {status} {v}",
                    self.server_name
                );
            }
            v
        } else {
            bail!(
                "registering {localpart} on {}: {status} {first}",
                self.server_name
            );
        };
        let user_id = done["user_id"]
            .as_str()
            .context("register: no user_id")?
            .to_owned();
        let access_token = done["access_token"]
            .as_str()
            .context("register: no access_token")?
            .to_owned();
        Ok(ClientSession::new(
            user_id,
            access_token,
            self.client_url.clone(),
        ))
    }

    /// Writes `homeserver.yaml`, `log.yaml` and the signing key into the temp dir.
    fn write_config(&self, opts: &SynapseOpts) -> Result<()> {
        let d = self.dir.path();
        let q = |p: &Path| yaml_str(&p.to_string_lossy());
        let key_id: String = random_alnum(4);
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        let seed_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(seed);
        fs::write(
            d.join("signing.key"),
            format!("ed25519 a_{key_id} {seed_b64}\n"),
        )?;

        let log_yaml = format!(
            r#"version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {log}
    encoding: utf8
loggers:
  synapse.storage.SQL:
    level: WARNING
  twisted:
    level: WARNING
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"#,
            log = q(&d.join("homeserver.log")),
        );
        fs::write(d.join("log.yaml"), log_yaml)?;

        let many = "{per_second: 10000, burst_count: 100000}";
        let mut y = String::new();
        write!(
            y,
            r#"# Written by fedlink's test harness (tests/support/synapse.rs).
server_name: {server_name}
public_baseurl: {public_baseurl}
pid_file: {pid}
listeners:
  # Federation (and key server) over TLS, on the port in the server name.
  - port: {fed_port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: true
    x_forwarded: false
    resources:
      - names: [{tls_resources}]
        compress: false
  # Client-server API over plain HTTP, for the tests.
  - port: {client_port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
tls_certificate_path: {cert}
tls_private_key_path: {key}
# Loopback federation with self-signed certificates:
federation_verify_certificates: false
ip_range_blacklist: []
trusted_key_servers: []
suppress_key_server_warning: true
database:
  name: sqlite3
  args:
    database: {db}
log_config: {log_config}
media_store_path: {media}
signing_key_path: {signing_key}
report_stats: false
enable_metrics: false
url_preview_enabled: false
enable_registration: true
enable_registration_without_verification: true
registration_shared_secret: {reg_secret}
macaroon_secret_key: {macaroon}
form_secret: {form}
presence:
  enabled: true
# Do not serve a cached /sync answer (default 2m): tests poll /sync.
caches:
  sync_response_cache_duration: 0
# Generous rate limits: tests must never see a 429.
rc_message: {many}
rc_registration: {many}
rc_registration_token_validity: {many}
rc_login:
  address: {many}
  account: {many}
  failed_attempts: {many}
rc_admin_redaction: {many}
rc_joins:
  local: {many}
  remote: {many}
rc_joins_per_room: {many}
rc_key_requests: {many}
rc_3pid_validation: {many}
rc_invites:
  per_room: {many}
  per_user: {many}
  per_issuer: {many}
rc_third_party_invite: {many}
rc_media_create: {many}
rc_presence:
  per_user: {many}
rc_delayed_event_mgmt: {many}
rc_room_creation: {many}
rc_reports: {many}
rc_user_directory: {many}
rc_profile: {many}
rc_federation:
  window_size: 1000
  sleep_limit: 100000
  sleep_delay: 1
  reject_limit: 100000
  concurrent: 1000
federation_rr_transactions_per_room_per_second: 10000
"#,
            server_name = yaml_str(&self.server_name),
            public_baseurl = yaml_str(&format!("{}/", self.client_url)),
            pid = q(&d.join("homeserver.pid")),
            fed_port = self.fed_port,
            tls_resources = if opts.private_ca.is_some() { "federation, keys, client" } else { "federation, keys" },
            client_port = self.client_port,
            cert = q(&self.tls.cert),
            key = q(&self.tls.key),
            db = q(&d.join("homeserver.db")),
            log_config = q(&d.join("log.yaml")),
            media = q(&d.join("media_store")),
            signing_key = q(&d.join("signing.key")),
            reg_secret = yaml_str(&random_alnum(32)),
            macaroon = yaml_str(&random_alnum(32)),
            form = yaml_str(&random_alnum(32)),
        )?;
        if !opts.extra_yaml.is_empty() {
            y.push_str("# extra_yaml from the test:\n");
            y.push_str(&opts.extra_yaml);
            if !opts.extra_yaml.ends_with('\n') {
                y.push('\n');
            }
        }
        fs::write(self.config_path(), y)?;
        Ok(())
    }

    /// Spawns the homeserver process and waits until both listeners answer.
    async fn launch(&mut self) -> Result<()> {
        let d = self.dir.path().to_path_buf();
        let python = synapse_python();
        let stdout = fs::File::create(d.join("stdout.log"))?;
        let stderr = fs::File::create(d.join("stderr.log"))?;
        let began = Instant::now();
        let child = Command::new(&python)
            .args(["-c", PYTHON_BOOT, "-c"])
            .arg(self.config_path())
            .current_dir(&d)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {} (synapse.app.homeserver)", python.display()))?;
        self.child = Some(child);

        let health = format!("{}/health", self.client_url);
        let keys = format!("{}/_matrix/key/v2/server", self.federation_url);
        let deadline = began + START_TIMEOUT;
        let (mut client_up, mut fed_up) = (false, false);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "Synapse {} exited during startup ({status})\n--- stderr.log ---\n{}\n--- homeserver.log ---\n{}",
                    self.server_name,
                    read_tail(&d.join("stderr.log"), 60),
                    self.log_tail()
                );
            }
            if !client_up {
                client_up =
                    matches!(self.http.get(&health).send().await, Ok(r) if r.status().is_success());
            }
            if client_up && !fed_up {
                fed_up =
                    matches!(self.http.get(&keys).send().await, Ok(r) if r.status().is_success());
            }
            if client_up && fed_up {
                self.startup_time = began.elapsed();
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                bail!(
                    "Synapse {} not ready after {:?} (client /health up: {client_up}, \
                     federation keys up: {fed_up})\n--- stderr.log ---\n{}\n--- homeserver.log ---\n{}",
                    self.server_name,
                    START_TIMEOUT,
                    read_tail(&d.join("stderr.log"), 60),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Synapse {
    /// Kills the homeserver. Set `FEDLINK_KEEP_SYNAPSE_DIRS=1` to keep its
    /// directory (config, database, logs) for a post-mortem.
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("FEDLINK_KEEP_SYNAPSE_DIRS").is_some_and(|v| v == "1") {
            self.dir.disable_cleanup(true);
            eprintln!(
                "kept Synapse {} directory: {}",
                self.server_name,
                self.dir.path().display()
            );
        }
    }
}

impl std::fmt::Debug for Synapse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synapse")
            .field("server_name", &self.server_name)
            .field("client_url", &self.client_url)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// A logged-in user on one homeserver's client-server API.
#[derive(Clone)]
pub struct ClientSession {
    pub user_id: String,
    pub access_token: String,
    /// The homeserver's client URL, e.g. `http://127.0.0.1:8008`.
    pub base: String,
    http: reqwest::Client,
    txn_prefix: String,
}

static TXN_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ClientSession {
    /// A session from an existing access token (e.g. an application service's
    /// `as_token`).
    pub fn new(user_id: String, access_token: String, base: String) -> ClientSession {
        ClientSession {
            user_id,
            access_token,
            base,
            http: http_client(),
            txn_prefix: random_alnum(8),
        }
    }

    /// Creates a room with `preset` (e.g. `"private_chat"`), inviting `invite`;
    /// `room_version: None` takes the server's default. Returns the room id.
    pub async fn create_room(
        &self,
        invite: &[&str],
        room_version: Option<&str>,
        preset: &str,
    ) -> Result<String> {
        let mut body = json!({ "preset": preset, "invite": invite });
        if let Some(v) = room_version {
            body["room_version"] = json!(v);
        }
        let v = self.post("/_matrix/client/v3/createRoom", &body).await?;
        Ok(v["room_id"]
            .as_str()
            .context("createRoom: no room_id")?
            .to_owned())
    }

    /// Invites `user_id` into `room_id`.
    pub async fn invite(&self, room_id: &str, user_id: &str) -> Result<()> {
        let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(room_id));
        self.post(&path, &json!({ "user_id": user_id }))
            .await
            .map(drop)
    }

    /// Joins a room by id or alias, through the `via` servers if given.
    pub async fn join(&self, room_id_or_alias: &str, via: &[&str]) -> Result<()> {
        let mut path = format!("/_matrix/client/v3/join/{}", enc(room_id_or_alias));
        for (i, server) in via.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            // `via` is the current name; `server_name` the deprecated one.
            write!(path, "{sep}via={0}&server_name={0}", enc(server)).unwrap();
        }
        self.post(&path, &json!({})).await.map(drop)
    }

    /// Leaves `room_id` (also rejects a pending invite).
    pub async fn leave(&self, room_id: &str) -> Result<()> {
        let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room_id));
        self.post(&path, &json!({})).await.map(drop)
    }

    /// Sends an `m.text` message; returns its event id.
    pub async fn send_text(&self, room_id: &str, body: &str) -> Result<String> {
        let txn = format!(
            "{}-{}",
            self.txn_prefix,
            TXN_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            enc(room_id),
            enc(&txn)
        );
        let v = self
            .put(&path, &json!({ "msgtype": "m.text", "body": body }))
            .await?;
        Ok(v["event_id"]
            .as_str()
            .context("send: no event_id")?
            .to_owned())
    }

    /// Sends an `m.read` receipt for `event_id`.
    pub async fn send_receipt(&self, room_id: &str, event_id: &str) -> Result<()> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            enc(room_id),
            enc(event_id)
        );
        self.post(&path, &json!({})).await.map(drop)
    }

    /// User ids of the room's joined members, as this user's server sees them.
    pub async fn joined_members(&self, room_id: &str) -> Result<Vec<String>> {
        let path = format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room_id));
        let v = self.get(&path).await?;
        let mut ids: Vec<String> = v["joined"]
            .as_object()
            .context("joined_members: no `joined` object")?
            .keys()
            .cloned()
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Authenticated `GET {base}{path}`; `path` starts with `/_matrix/...`.
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.request(reqwest::Method::GET, path, None).await
    }

    /// Authenticated `POST {base}{path}` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    /// Authenticated `PUT {base}{path}` with a JSON body.
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.request(reqwest::Method::PUT, path, Some(body)).await
    }

    /// Authenticated request; a non-2xx answer becomes an error naming the
    /// method, path, status and body.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.access_token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url} as {}", self.user_id))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{method} {path} as {}: {status}: {text}", self.user_id);
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("{method} {path}: response is not JSON: {text}"))
    }
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("user_id", &self.user_id)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Polls `f` every 150 ms until it yields `Some`, an error, or `timeout` passes
/// (then the error names `what` and the last poll's error, if any).
///
/// An `Err` from `f` does not stop the polling: it is remembered and reported
/// on timeout, since a condition is often an error until it becomes true (e.g. a
/// 403 before a join has federated).
pub async fn wait_until<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last_err = match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// HTTP client for the harness: short-ish timeouts, accepts the self-signed
/// certificates of the federation listeners.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("building reqwest client")
}


fn random_alnum(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string to JSON")
}

/// The last `n` lines of a (possibly missing) text file.
fn read_tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
