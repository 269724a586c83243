//! `fedlink-load`: a load generator for fedlink.
//!
//! It is a federation peer of its own (signing key, TLS, key server, `make_join`/`send_join`),
//! starts the `fedlink` binary next to it as a child process on loopback with a fresh
//! database, and drives it over real HTTPS with signed transactions:
//!
//! 1. `--rooms` rooms the bot is invited to and joins (fedlink's size in rooms);
//! 2. messages into a 3-member room (the baseline);
//! 3. one room grown to `--members` members by joins over `/send`, timed per tenth, with
//!    fedlink's disk growth per membership event;
//! 4. messages into that big room.
//!
//! It prints PDUs/s, transaction latency p50/p99, fedlink's RSS and disk use. Transactions
//! carry `--batch` PDUs (50 like Synapse), one in flight, and every PDU must be accepted.
//! Events are built and signed before the clock starts, so the figures are fedlink's.
//!
//! `cargo run --release --bin fedlink-load -- --members 10000 --messages 5000 --rooms 1000`
//!
//! `--synapse` drives a real Synapse (the pinned one `scripts/ensure-synapse.sh` installs in
//! `.venv`, SQLite) with the same phases 2-4 instead, for a side-by-side figure.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use clap::Parser;
use ruma::RoomVersionId;
use serde_json::{json, Value};

#[allow(dead_code)]
#[path = "../../tests/support/util.rs"]
mod util;
// The test harness's Synapse (the pinned one in `.venv`), for `--synapse`.
#[allow(dead_code)]
#[path = "../../tests/support/synapse.rs"]
mod synapse;
#[allow(dead_code)]
#[path = "../../tests/support/fake_peer.rs"]
mod fake_peer;

use fake_peer::FakePeer;

const ADMIN_TOKEN: &str = "fedlink-load-admin-token-0123456789";

#[derive(Parser, Debug)]
#[command(about = "Drive fedlink with signed federation traffic and report throughput, latency, memory and disk")]
struct Args {
    /// Members the big room grows to (joins over /send).
    #[arg(long, default_value_t = 2000)]
    members: usize,
    /// Messages sent into the small room and into the big room.
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// PDUs per transaction.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Extra rooms the bot joins before the measurements.
    #[arg(long, default_value_t = 0)]
    rooms: usize,
    /// The fedlink binary (default: `fedlink` next to this binary).
    #[arg(long)]
    fedlink: Option<PathBuf>,
    /// Keep fedlink's directory (config, database, log) and print where it is.
    #[arg(long)]
    keep: bool,
    /// Also send messages into this many 3-member rooms at once, one transaction in flight
    /// per room (all from the one peer, within fedlink's per-origin limit of 64), and report
    /// the total rate.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Start fedlink with `storage.compression = true` (without this or `--no-compression`
    /// the setting is left out: fedlink's default, compressed since the eighth session).
    #[arg(long, conflicts_with = "no_compression")]
    compression: bool,
    /// Start fedlink with `storage.compression = false`.
    #[arg(long)]
    no_compression: bool,
    /// Finally kill fedlink (SIGKILL) and time its restart until it serves again.
    #[arg(long)]
    restart: bool,
    /// Linked persons, each with two accounts of the peer joined to `--rooms-per-person` of
    /// the `--rooms` rooms (both accounts in each, so they are in step) and linked through
    /// the admin API before the measurements.
    #[arg(long, default_value_t = 0)]
    persons: usize,
    /// Rooms each linked person's accounts are in.
    #[arg(long, default_value_t = 10)]
    rooms_per_person: usize,
    /// Drive a real Synapse instead of fedlink (phases 2-4: a local user joins the peer's
    /// rooms, then the same transactions are sent to it), for a side-by-side figure.
    #[arg(long)]
    synapse: bool,
}

/// Where transactions go: a server name and its federation base URL.
struct Dest {
    name: String,
    url: String,
}

struct Target {
    bin: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
    name: String,
    fed_url: String,
    admin_url: String,
    http: reqwest::Client,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a start that failed because fedlink exited is reported.
const EXITED: &str = "fedlink exited before serving";

impl Target {
    /// Start fedlink on fresh ports and wait until it serves. Ports are picked free and
    /// released for fedlink to bind, so another process may take one meanwhile: a start
    /// that fails on an address in use is tried again (three times in all).
    async fn start(bin: &Path, compression: Option<bool>) -> Result<Target> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(bin, compression).await {
                Err(e) if tries < 3 && e.to_string().starts_with(EXITED) && e.to_string().contains("Address already in use") => {
                    eprintln!("fedlink did not start ({e}); trying other ports")
                }
                r => return r,
            }
        }
    }

    async fn start_once(bin: &Path, compression: Option<bool>) -> Result<Target> {
        let dir = tempfile::tempdir()?;
        // Both listeners are held until both ports are known, so the two differ.
        let (fed, metrics) = (std::net::TcpListener::bind("127.0.0.1:0")?, std::net::TcpListener::bind("127.0.0.1:0")?);
        let (fed_port, metrics_port) = (fed.local_addr()?.port(), metrics.local_addr()?.port());
        drop((fed, metrics));
        util::self_signed_cert(dir.path(), &["localhost", "127.0.0.1"]);
        let config = format!(
            "server_name = \"localhost:{fed_port}\"\n[listen]\nfederation = \"127.0.0.1:{fed_port}\"\nmetrics = \"127.0.0.1:{metrics_port}\"\n\
             [tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n[keys]\nsigning_key = \"signing.key\"\n[storage]\npath = \"db\"\n{compression}\
             [admin]\ntoken = \"{ADMIN_TOKEN}\"\n[federation]\nverify_tls = false\nmax_inflight_per_origin = 64\n[bot]\nmax_rooms = 100000\n",
            // Only when asked, so that builds without the setting can be driven too.
            compression = match compression {
                Some(c) => format!("compression = {c}\n"),
                None => String::new(),
            },
        );
        std::fs::write(dir.path().join("fedlink.toml"), config)?;
        let child = spawn(bin, dir.path())?;
        let http = reqwest::Client::builder().danger_accept_invalid_certs(true).timeout(Duration::from_secs(120)).build()?;
        let mut t = Target {
            bin: bin.to_owned(),
            child,
            dir,
            name: format!("localhost:{fed_port}"),
            fed_url: format!("https://127.0.0.1:{fed_port}"),
            admin_url: format!("http://127.0.0.1:{metrics_port}"),
            http,
        };
        t.wait_serving().await?;
        Ok(t)
    }

    async fn wait_serving(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let served = self.http.get(format!("{}/_matrix/key/v2/server", self.fed_url)).send().await.is_ok_and(|r| r.status().is_success());
            // Checked after the probe too: another process may hold the port and answer.
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{EXITED} ({status}); the end of its log:\n{}", self.log_tail());
            }
            if served {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("fedlink did not serve within 120 s; the end of its log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The last 20 lines of fedlink's log.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("fedlink.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGKILL, start again on the same database; returns the time until it serves.
    async fn restart(&mut self) -> Result<Duration> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let started = Instant::now();
        self.child = spawn(&self.bin, self.dir.path())?;
        self.wait_serving().await?;
        Ok(started.elapsed())
    }

    /// A gauge or counter from /metrics (0 if absent).
    async fn metric(&self, name: &str) -> Result<f64> {
        let text = self.http.get(format!("{}/metrics", self.admin_url)).send().await?.text().await?;
        Ok(text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum())
    }

    /// A histogram's mean in milliseconds (0 when empty) and its count; `labels` is the
    /// `{...}` selector or empty.
    async fn mean_ms(&self, histogram: &str, labels: &str) -> Result<(f64, f64)> {
        let sum = self.metric(&format!("{histogram}_sum{labels}")).await?;
        let count = self.metric(&format!("{histogram}_count{labels}")).await?;
        Ok((if count > 0.0 { sum / count * 1000.0 } else { 0.0 }, count))
    }

    fn bot(&self) -> String {
        format!("@fedlink:{}", self.name)
    }

    async fn admin(&self, path: &str) -> Result<Value> {
        Ok(self.http.get(format!("{}{path}", self.admin_url)).bearer_auth(ADMIN_TOKEN).send().await?.json().await?)
    }

    /// (RSS, peak RSS) in bytes.
    fn rss(&self) -> (u64, u64) {
        proc_rss(self.child.id())
    }

    async fn wait_joined(&self, room: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = self.admin(&format!("/_fedlink/admin/v1/rooms/{}", util::enc(room))).await?;
            if v["bot_membership"] == "joined" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the bot did not join {room}: {v}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn spawn(bin: &Path, dir: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("fedlink.log"))?;
    Command::new(bin)
        .args(["run", "-c"])
        .arg(dir.join("fedlink.toml"))
        .env("FEDLINK_FEDERATION__ALLOW_PRIVATE_NETWORKS", "true")
        .env("FEDLINK_LOG", std::env::var("FEDLINK_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// Latencies of a run of transactions.
#[derive(Default)]
struct Run {
    pdus: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU time the server used during the run.
    cpu: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.pdus as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
    }
    fn line(&self, what: &str) -> String {
        format!(
            "{what}: {} PDUs in {:.2} s = {:.0} PDUs/s; transaction p50 {:.1} ms, p99 {:.1} ms; server CPU {:.0} us per PDU ({:.2} cores)",
            self.pdus,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.pct(0.5).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            self.cpu.as_secs_f64() * 1e6 / self.pdus.max(1) as f64,
            self.cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)
        )
    }
}

/// Whether the answer to transaction `txn` accepted every PDU.
fn accepted(txn: &str, status: reqwest::StatusCode, body: &Value) -> Result<()> {
    if !status.is_success() {
        bail!("transaction {txn}: {status} {body}");
    }
    if let Some((id, err)) = body["pdus"].as_object().and_then(|m| m.iter().find(|(_, r)| r.get("error").is_some())) {
        bail!("transaction {txn}: {id} refused: {err}");
    }
    Ok(())
}

/// Persons `p<i>` with accounts `@p<i>a` and `@p<i>b` of the peer: both join
/// `per_person` of `rooms` (person i takes the rooms after the previous person's), then
/// each person is linked through the admin API.
async fn link_persons(peer: &FakePeer, t: &Target, rooms: &[String], persons: usize, per_person: usize, batch: usize) -> Result<()> {
    let start = Instant::now();
    let mut by_room: Vec<Vec<(String, Value)>> = vec![Vec::new(); rooms.len()];
    for i in 0..persons {
        for j in 0..per_person {
            let r = (i * per_person + j) % rooms.len();
            for side in ["a", "b"] {
                by_room[r].push(join(peer, &rooms[r], &format!("p{i}{side}")));
            }
        }
    }
    let pdus: Vec<(String, Value)> = by_room.into_iter().flatten().collect();
    let joined = pdus.len();
    timed(peer, t, pdus, batch, "person-join").await?;
    for i in 0..persons {
        let accounts = json!([peer.user(&format!("p{i}a")), peer.user(&format!("p{i}b"))]);
        let r = t.http.put(format!("{}/_fedlink/admin/v1/persons/p{i}", t.admin_url)).bearer_auth(ADMIN_TOKEN).json(&json!({ "accounts": accounts })).send().await?;
        if !r.status().is_success() {
            bail!("linking p{i}: {} {}", r.status(), r.text().await?);
        }
    }
    // The in-step pass runs at most every 15 s: wait until it has classified everyone.
    let deadline = Instant::now() + Duration::from_secs(120);
    while t.metric("fedlink_persons{").await? < persons as f64 {
        if Instant::now() > deadline {
            bail!("fedlink_persons did not reach {persons}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (rss, _) = t.rss();
    println!(
        "persons: {persons} linked, {joined} account joins in {} rooms, in {:.1} s; RSS {:.0} MiB",
        rooms.len().min(persons * per_person),
        start.elapsed().as_secs_f64(),
        mib(rss)
    );
    Ok(())
}

/// What the measured phases need of the server under load (fedlink or Synapse).
trait Server {
    fn dest(&self) -> Dest;
    /// Have the server's user (fedlink's bot, or a Synapse user) join the peer's `room`.
    async fn enter(&self, peer: &FakePeer, room: &str) -> Result<()>;
    /// Bytes of its database files.
    fn disk(&self) -> u64;
    /// CPU time (user and system) the server process has used so far.
    fn cpu(&self) -> Duration;
    /// Wait until `event_id`, sent in `room`, is processed.
    async fn settle(&self, room: &str, event_id: &str) -> Result<()>;
}

/// Phases 2-4: messages into a 3-member room; one room grown to `--members` by tenths, with
/// the disk per membership event; messages into that room. Returns the two message runs and
/// the big room.
async fn phases(peer: &FakePeer, t: &impl Server, args: &Args) -> Result<(Run, Run, String)> {
    let small = public_room(peer);
    t.enter(peer, &small).await?;
    timed(peer, t, joins(peer, &small, 0, 1), args.batch, "small-join").await?;
    let small_run = timed(peer, t, messages(peer, &small, args.messages), args.batch, "small-msg").await?;
    println!("{}", small_run.line("messages, 3-member room"));

    // The big room, grown by tenths.
    let big = public_room(peer);
    t.enter(peer, &big).await?;
    let tenth = (args.members / 10).max(1);
    let disk_before = t.disk();
    let mut tenths = Vec::new();
    let mut done = 0;
    while done < args.members {
        let to = (done + tenth).min(args.members);
        let run = timed(peer, t, joins(peer, &big, done, to), args.batch, &format!("grow-{done}")).await?;
        println!("  joins {done}..{to}: {:.0} PDUs/s, p99 {:.1} ms", run.rate(), run.pct(0.99).as_secs_f64() * 1e3);
        tenths.push(run);
        done = to;
    }
    let disk_after = t.disk();
    let (first, last) = (tenths.first().expect("a tenth"), tenths.last().expect("a tenth"));
    let per_join_first = first.elapsed.as_secs_f64() / first.pdus as f64;
    let per_join_last = last.elapsed.as_secs_f64() / last.pdus as f64;
    println!(
        "growth to {} members: first tenth {:.0} joins/s, last tenth {:.0} joins/s: last/first cost {:.2}x; disk {:.1} MiB -> {:.1} MiB = {:.2} KiB per membership event",
        args.members,
        1.0 / per_join_first,
        1.0 / per_join_last,
        per_join_last / per_join_first,
        mib(disk_before),
        mib(disk_after),
        (disk_after.saturating_sub(disk_before)) as f64 / 1024.0 / args.members as f64
    );

    let big_run = timed(peer, t, messages(peer, &big, args.messages), args.batch, "big-msg").await?;
    println!("{}", big_run.line(&format!("messages, {}-member room", args.members + 2)));
    println!("big room / small room message cost: {:.2}x", small_run.rate() / big_run.rate());
    Ok((small_run, big_run, big))
}

/// A transaction built and signed ahead: its id, the request, and its last PDU (event id, event).
struct Built {
    txn: String,
    /// How many PDUs it carries.
    pdus: usize,
    req: fake_peer::BuiltRequest,
    last: Option<(String, Value)>,
}

/// `pdus` as signed transactions of `batch` PDUs each, ids `{txn_prefix}-{i}`.
fn build(peer: &FakePeer, dest: &Dest, pdus: Vec<(String, Value)>, batch: usize, txn_prefix: &str) -> Vec<Built> {
    pdus.chunks(batch)
        .enumerate()
        .map(|(i, chunk)| {
            let txn = format!("{txn_prefix}-{i}");
            let req = peer.build_txn(&dest.name, &txn, chunk.iter().map(|(_, e)| e.clone()).collect(), Vec::new());
            Built { txn, pdus: chunk.len(), req, last: chunk.last().cloned() }
        })
        .collect()
}

/// Transactions of `batch` PDUs, one in flight, every PDU accepted: each is timed until the
/// server has processed its last PDU ([`Server::settle`]) before the next is sent. The
/// PDUs are built and the transactions serialized and signed before the clock starts, so
/// the figures are the server's, not the generator's (a sending homeserver prepares its
/// next transaction while the current one is in flight).
async fn timed(peer: &FakePeer, t: &impl Server, pdus: Vec<(String, Value)>, batch: usize, txn_prefix: &str) -> Result<Run> {
    let txns = build(peer, &t.dest(), pdus, batch, txn_prefix);
    let cpu = t.cpu();
    let start = Instant::now();
    let mut run = send_built(peer, t, &txns).await?;
    run.elapsed = start.elapsed();
    run.cpu = t.cpu().saturating_sub(cpu);
    Ok(run)
}

/// Send `txns` one after the other, each timed until the server settled it: the `Run`'s
/// PDUs and latencies (its `elapsed` and `cpu` are the caller's to fill in).
async fn send_built(peer: &FakePeer, t: &impl Server, txns: &[Built]) -> Result<Run> {
    let dest = t.dest();
    let mut run = Run::default();
    for Built { txn, req, last, .. } in txns {
        let t0 = Instant::now();
        let (status, body) = peer.send_built(&dest.url, req).await;
        accepted(txn, status, &body)?;
        if let Some((last, event)) = last {
            t.settle(event["room_id"].as_str().unwrap_or_default(), last).await?;
        }
        run.latencies.push(t0.elapsed());
    }
    run.pdus = txns.iter().map(|b| b.pdus).sum();
    Ok(run)
}

impl Server for Target {
    fn dest(&self) -> Dest {
        Dest { name: self.name.clone(), url: self.fed_url.clone() }
    }
    async fn enter(&self, peer: &FakePeer, room: &str) -> Result<()> {
        let (status, body) = peer.invite(room, "creator", &self.bot(), &self.name, &self.fed_url).await;
        if !status.is_success() {
            bail!("invite refused: {status} {body}");
        }
        self.wait_joined(room).await
    }
    fn disk(&self) -> u64 {
        dir_bytes(&self.dir.path().join("db"), &|_| true)
    }
    fn cpu(&self) -> Duration {
        proc_cpu(self.child.id())
    }
    /// fedlink answers a transaction once its PDUs are checked, applied and durable.
    async fn settle(&self, _: &str, _: &str) -> Result<()> {
        Ok(())
    }
}

/// A real Synapse with one local user, `load`.
struct SynapseTarget {
    hs: synapse::Synapse,
    user: synapse::ClientSession,
}

impl Server for SynapseTarget {
    fn dest(&self) -> Dest {
        Dest { name: self.hs.server_name.clone(), url: self.hs.federation_url.clone() }
    }
    async fn enter(&self, peer: &FakePeer, room: &str) -> Result<()> {
        self.user.join(room, &[&peer.name]).await
    }
    fn disk(&self) -> u64 {
        dir_bytes(self.hs.dir.path(), &|name| name.starts_with("homeserver.db"))
    }
    fn cpu(&self) -> Duration {
        self.hs.pid().map(proc_cpu).unwrap_or_default()
    }
    /// Synapse answers a transaction once its PDUs are staged, and processes them after
    /// (`federation_inbound_events_staging`): wait until its user can read the last one.
    /// Waiting per transaction keeps its queue under 100 events: above that Synapse drops
    /// the queue but its newest events and fetches the gap's state instead of processing
    /// each event (`prune_staged_events_in_room`). Polled every 20 ms; the polls are part
    /// of the measured cost.
    async fn settle(&self, room: &str, event_id: &str) -> Result<()> {
        let path = format!("/_matrix/client/v3/rooms/{}/event/{}", util::enc(room), util::enc(event_id));
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.user.get(&path).await.is_err() {
            if Instant::now() > deadline {
                bail!("Synapse did not make {event_id} readable within 5 minutes (rejected? see {})", self.hs.log_path().display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// The same phases against a real Synapse (`--synapse`).
async fn against_synapse(peer: &FakePeer, args: &Args) -> Result<()> {
    if !synapse::synapse_python().exists() {
        bail!("no Synapse virtualenv: run `source scripts/ensure-synapse.sh` first");
    }
    // Federation rate limits lifted (Synapse delays an origin's requests beyond 10 a second
    // by default), so the figure is its processing, as for fedlink.
    let extra = "rc_federation:\n  window_size: 1000\n  sleep_limit: 1000000\n  sleep_delay: 1\n  reject_limit: 1000000\n  concurrent: 64\n";
    let hs = synapse::Synapse::start(synapse::SynapseOpts { extra_yaml: extra.into(), ..Default::default() }).await?;
    let user = hs.register("load").await?;
    let t = SynapseTarget { hs, user };
    let pid = t.hs.pid().context("Synapse is not running")?;
    println!("Synapse {} (pid {pid}, SQLite) <- peer {}", t.hs.server_name, peer.name);
    let (_, _, big) = phases(peer, &t, args).await?;
    // Above 100 queued events in a room Synapse drops the queue but its newest events: the
    // figures would then not be per event.
    if std::fs::read_to_string(t.hs.log_path())?.contains("from federation queue") {
        bail!("Synapse pruned its federation queue (see {}); the figures are not per event", t.hs.log_path().display());
    }
    // Every PDU was answered without an error; the members must be there too.
    let members = t.user.joined_members(&big).await?.len();
    if members != args.members + 2 {
        bail!("Synapse lists {members} joined members in the big room, not {}", args.members + 2);
    }
    let (rss, hwm) = proc_rss(pid);
    println!("Synapse RSS {:.0} MiB (peak {:.0} MiB); database {:.1} MiB", mib(rss), mib(hwm), mib(t.disk()));
    Ok(())
}

/// A room hosted by the peer with public joins.
fn public_room(peer: &FakePeer) -> String {
    let room = peer.create_room("creator", RoomVersionId::V11);
    peer.push(&room, "creator", "m.room.join_rules", Some(""), json!({ "join_rule": "public" }));
    room
}

/// Joins of `m<from>`..`m<to>`: (event id, event).
fn joins(peer: &FakePeer, room: &str, from: usize, to: usize) -> Vec<(String, Value)> {
    (from..to).map(|i| join(peer, room, &format!("m{i}"))).collect()
}

/// The join of the peer's user `local`: (event id, event).
fn join(peer: &FakePeer, room: &str, local: &str) -> (String, Value) {
    let user = peer.user(local);
    peer.push(room, local, "m.room.member", Some(&user), json!({ "membership": "join" }))
}

/// `n` messages: (event id, event).
fn messages(peer: &FakePeer, room: &str, n: usize) -> Vec<(String, Value)> {
    (0..n).map(|i| peer.push(room, "creator", "m.room.message", None, json!({ "msgtype": "m.text", "body": format!("load message {i}") }))).collect()
}

/// (RSS, peak RSS) of process `pid` in bytes, from /proc.
fn proc_rss(pid: u32) -> (u64, u64) {
    fedlink::memory::rss_of(&pid.to_string()).unwrap_or((0, 0))
}

/// CPU time (user and system) process `pid` has used, from `/proc/PID/stat` (zero if
/// unreadable).
fn proc_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // Fields after the command name (which may hold spaces) start at its closing ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return Duration::ZERO };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields of the line: 12th and 13th after ')'.
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// Clock ticks per second of `/proc`'s times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 { n as u64 } else { 100 }
}

/// Bytes of the files under `dir` (recursively) whose names pass `keep`.
fn dir_bytes(dir: &Path, keep: &dyn Fn(&str) -> bool) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path(), keep),
            Ok(m) if keep(&e.file_name().to_string_lossy()) => m.len(),
            _ => 0,
        })
        .sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.parallel > 64 {
        bail!("--parallel is at most 64 (fedlink's federation.max_inflight_per_origin in the generated config)");
    }
    let bin = match &args.fedlink {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("fedlink"),
    };
    let peer = FakePeer::start().await;
    if args.synapse {
        if args.rooms > 0 || args.persons > 0 || args.parallel > 1 || args.compression || args.no_compression || args.restart || args.keep || args.fedlink.is_some() {
            bail!("--synapse runs the message and growth phases only: --rooms, --persons, --parallel, --compression, --no-compression, --restart, --keep and --fedlink are fedlink's");
        }
        return against_synapse(&peer, &args).await;
    }
    let compression = match (args.compression, args.no_compression) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let t = Target::start(&bin, compression).await?;
    println!("fedlink {} (pid {}) <- peer {}", t.name, t.child.id(), peer.name);

    if args.rooms > 0 {
        // Invites go out 16 at a time; fedlink joins through the peer at its own pace.
        let start = Instant::now();
        let rooms: Vec<String> = (0..args.rooms).map(|_| public_room(&peer)).collect();
        let bot = t.bot();
        let refused = std::sync::atomic::AtomicUsize::new(0);
        futures::stream::iter(rooms.iter())
            .for_each_concurrent(16, |room| {
                let (bot, refused) = (&bot, &refused);
                let (peer, t) = (&peer, &t);
                async move {
                    if !peer.invite(room, "creator", bot, &t.name, &t.fed_url).await.0.is_success() {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
            .await;
        if refused.into_inner() > 0 {
            bail!("fedlink refused some invites");
        }
        let deadline = Instant::now() + Duration::from_secs(3600);
        while t.metric("fedlink_rooms_joined").await? < args.rooms as f64 {
            if Instant::now() > deadline {
                bail!("the bot did not join all rooms");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (rss, _) = t.rss();
        println!("rooms: the bot joined {} rooms in {:.1} s; RSS {:.0} MiB", args.rooms, start.elapsed().as_secs_f64(), mib(rss));
        if args.persons > 0 {
            link_persons(&peer, &t, &rooms, args.persons, args.rooms_per_person, args.batch).await?;
        }
    } else if args.persons > 0 {
        bail!("--persons needs --rooms");
    }

    let (small_run, _, _) = phases(&peer, &t, &args).await?;

    if args.parallel > 1 {
        let mut rooms = Vec::new();
        for _ in 0..args.parallel {
            let room = public_room(&peer);
            t.enter(&peer, &room).await?;
            timed(&peer, &t, joins(&peer, &room, 0, 1), args.batch, &format!("par-join-{}", rooms.len())).await?;
            rooms.push(room);
        }
        let per = args.messages / args.parallel;
        // Every room's transactions are built before the clock starts.
        let loads: Vec<Vec<Built>> = rooms.iter().enumerate().map(|(i, r)| build(&peer, &t.dest(), messages(&peer, r, per), args.batch, &format!("par-msg-{i}"))).collect();
        let (start, cpu) = (Instant::now(), t.cpu());
        let runs = futures::future::join_all(loads.iter().map(|txns| send_built(&peer, &t, txns))).await;
        let elapsed = start.elapsed();
        let mut all = Run { pdus: 0, elapsed, latencies: Vec::new(), cpu: t.cpu().saturating_sub(cpu) };
        for r in runs {
            let r = r?;
            all.pdus += r.pdus;
            all.latencies.extend(r.latencies);
        }
        println!("{}", all.line(&format!("messages, {} 3-member rooms, {} transactions in flight", args.parallel, args.parallel)));
        println!("parallel / one in flight: {:.2}x", all.rate() / small_run.rate());
    }
    let (rss, hwm) = t.rss();
    let records = t.admin("/_fedlink/admin/v1/status").await?["log_entries"].as_u64().unwrap_or(0);
    let (trims, trimmed) = (t.metric("fedlink_memory_trims_total").await?, t.metric("fedlink_memory_trimmed_bytes_total").await?);
    println!(
        "fedlink RSS {:.0} MiB (peak {:.0} MiB; {trims} trims gave back {:.1} MiB); disk {:.1} MiB; {records} log records",
        mib(rss),
        mib(hwm),
        mib(trimmed as u64),
        mib(t.disk())
    );
    let mut phases = Vec::new();
    phases.push(format!("whole /send {:.2} ms", t.mean_ms("fedlink_transaction_duration_seconds", "").await?.0));
    for phase in ["prepare", "wait", "apply", "views_wait", "checks_here", "checks_wait", "flush"] {
        let (mean, _) = t.mean_ms("fedlink_ingest_phase_duration_seconds", &format!("{{phase=\"{phase}\"}}")).await?;
        phases.push(format!("{phase} {mean:.2} ms"));
    }
    println!("mean time per transaction by phase: {}", phases.join(", "));
    let (pool, caller) = (t.metric("fedlink_signature_checks_total{by=\"pool\"}").await?, t.metric("fedlink_signature_checks_total{by=\"caller\"}").await?);
    if pool + caller > 0.0 {
        println!("signature checks: {pool:.0} on the checking threads, {caller:.0} on the transactions' own");
    }
    let mut passes = Vec::new();
    for pass in ["incremental", "full"] {
        let (mean, count) = t.mean_ms("fedlink_reconcile_duration_seconds", &format!("{{pass=\"{pass}\"}}")).await?;
        passes.push(format!("{pass} {mean:.3} ms over {} passes", count as u64));
    }
    let within = t.metric("fedlink_reconcile_duration_seconds_bucket{pass=\"incremental\",le=\"0.001\"}").await?;
    let all = t.metric("fedlink_reconcile_duration_seconds_count{pass=\"incremental\"}").await?;
    println!("mean reconcile pass: {}; incremental passes within 1 ms: {:.1}%", passes.join(", "), if all > 0.0 { within / all * 100.0 } else { 0.0 });
    if args.persons > 0 {
        let mut states = Vec::new();
        for state in ["in_step", "catching_up", "unsupported", "blocked", "opted_out"] {
            states.push(format!("{state} {:.0}", t.metric(&format!("fedlink_persons{{state=\"{state}\"}}")).await?));
        }
        println!("fedlink_persons: {}", states.join(", "));
    }
    let mut t = t;
    if args.restart {
        // Let a views checkpoint happen first, as in a running deployment.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let took = t.restart().await?;
        let (rss, _) = t.rss();
        println!("restart after SIGKILL: serving again in {:.2} s; RSS {:.0} MiB", took.as_secs_f64(), mib(rss));
    }
    if args.keep {
        let _ = t.child.kill();
        let _ = t.child.wait();
        let dir = t.dir.path().to_owned();
        std::mem::forget(t);
        println!("kept {}", dir.display());
    }
    Ok(())
}
