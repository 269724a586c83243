//! End-to-end isolation, real Synapse homeservers plus fedlink on loopback: one slow or
//! impossible piece of work must not hold up unrelated work.
//!
//! * A room with a member of a server fedlink may not contact (litchi, outside
//!   `federation.allowed_servers`): fedlink either joins it (litchi's keys through kiwi as a
//!   notary) or gives it up visibly, and meanwhile messages in another room of the same
//!   homeserver keep reaching fedlink within 2 s each.
//! * A hanging homeserver (mango, SIGSTOPped: it accepts TCP connections and never answers)
//!   delays only the invites to its own users: alice@litchi is invited within 5 s of the
//!   bot's join, and alice@mango once mango is resumed.
//!
//! The two tests take a file-wide lock and run one after the other: each measures
//! latencies, and five Synapses at once on a two-core machine would measure the machine.

mod support;

use std::{
    cell::{Cell, RefCell},
    future::Future,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{enc, fedlink_proc::FedlinkBin, linked_alice_config, wait_until, ClientSession, Synapse, SynapseOpts, FAST_RETRY};

const T: Duration = Duration::from_secs(60);


/// Serializes the tests of this file (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn room_view(f: &FedlinkBin, room: &str) -> Value {
    f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(room))).await.1
}

/// Polls `f` every `every` until it yields `Some` or `timeout` passes (then `None`).
async fn poll<F, Fut, V>(every: Duration, timeout: Duration, mut f: F) -> Option<V>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<V>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// How long until `event_id` is among the forward extremities of fedlink's view of `room`
/// (polled every 50 ms, from `since`); `None` if not within `timeout`.
async fn time_to_fedlink(f: &FedlinkBin, room: &str, event_id: &str, since: Instant, timeout: Duration) -> Option<Duration> {
    poll(Duration::from_millis(50), timeout, || async {
        let v = room_view(f, room).await;
        let ext = v["forward_extremities"].as_array().cloned().unwrap_or_default();
        ext.iter().any(|e| e == event_id).then(|| since.elapsed())
    })
    .await
}

async fn invited_rooms(c: &ClientSession) -> anyhow::Result<Vec<String>> {
    let v = c.get("/_matrix/client/v3/sync?timeout=0").await?;
    Ok(v["rooms"]["invite"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default())
}

async fn wait_member(c: &ClientSession, room: &str, user: &str, f: &FedlinkBin) {
    wait_until(&format!("{user} joined {room} as {} sees it", c.user_id), T, || async {
        Ok(c.joined_members(room).await?.iter().any(|m| m == user).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:?}\nfedlink log:\n{}", f.log_tail()));
}

/// A one-line summary of the bot's state in a room view.
fn bot_summary(v: &Value) -> String {
    format!("bot_membership={} bot={} join_attempts={}", v["bot_membership"], v["bot"], v["join_attempts"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_with_a_member_of_a_server_fedlink_does_not_allow_never_holds_up_its_homeserver() {
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let mark = |what: &str| eprintln!("[(a) {:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    let (kiwi, litchi) = tokio::join!(
        Synapse::start(SynapseOpts { extra_yaml: FAST_RETRY.into(), ..Default::default() }),
        Synapse::start(SynapseOpts { extra_yaml: FAST_RETRY.into(), ..Default::default() })
    );
    let (kiwi, litchi) = (kiwi.expect("kiwi starts"), litchi.expect("litchi starts"));
    let bob = kiwi.register("bob").await.unwrap();
    let carol = litchi.register("carol").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // litchi is NOT allowed: fedlink never contacts it.
    let extra = format!("[federation]\nverify_tls = false\nallowed_servers = [\"{}\"]\n", kiwi.server_name);
    let f = FedlinkBin::start(dir.path(), &extra).await.expect("fedlink starts");
    mark("started");

    // Room B: only kiwi members; the bot joins it and a first message arrives (warm-up:
    // keys fetched, kiwi's federation sender to fedlink going).
    let room_b = bob.create_room(&[&f.bot()], None, "private_chat").await.unwrap();
    wait_member(&bob, &room_b, &f.bot(), &f).await;
    let warm = bob.send_text(&room_b, "warm-up").await.unwrap();
    let t = Instant::now();
    let warm_latency = time_to_fedlink(&f, &room_b, &warm, t, T).await;
    assert!(warm_latency.is_some(), "the warm-up message in room B never reached fedlink\nfedlink log:\n{}", f.log_tail());
    mark(&format!("bot joined room B {room_b}; warm-up message reached fedlink in {:?}", warm_latency.unwrap()));

    // Room A: carol@litchi is a member.
    let room_a = bob.create_room(&[&carol.user_id], None, "private_chat").await.unwrap();
    wait_until(&format!("carol@litchi joins room A {room_a} through kiwi"), T, || async {
        carol.join(&room_a, &[&kiwi.server_name]).await.map(Some)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:?}\nlitchi log:\n{}", litchi.log_tail()));
    wait_member(&bob, &room_a, &carol.user_id, &f).await;
    mark(&format!("carol@litchi joined room A {room_a}"));

    // Invite the bot into A, then at once talk in B, message by message: at least five
    // messages, and on until A's join has settled (joined or given up), so that the whole
    // join (the first-attempt delay, make_join, send_join, litchi's keys through kiwi)
    // overlaps messages in B.
    bob.invite(&room_a, &f.bot()).await.unwrap();
    let invited_at = Instant::now();
    mark("bot invited into room A");
    let mut latencies = Vec::new();
    let mut during = 0;
    for i in 0..200 {
        let before = room_view(&f, &room_a).await["bot_membership"].clone();
        let settled = before == "joined" || before == "join_failed";
        if i >= 5 && (settled || invited_at.elapsed() > T) {
            break;
        }
        let sent_at = Instant::now();
        let ev = bob.send_text(&room_b, &format!("room B message {i} during room A's join")).await.unwrap();
        let latency = time_to_fedlink(&f, &room_b, &ev, sent_at, Duration::from_secs(30)).await;
        let after = room_view(&f, &room_a).await["bot_membership"].clone();
        if !settled {
            during += 1;
        }
        eprintln!(
            "(a) room B message {i}: sent {:.2}s after the invite into A (A's bot_membership before: {before}, after: {after}); reached fedlink after {}",
            (sent_at - invited_at).as_secs_f64(),
            latency.map(|d| format!("{d:?}")).unwrap_or_else(|| "NEVER (30 s)".into())
        );
        latencies.push((i, latency));
    }
    eprintln!("(a) {during} room B messages were sent before room A's join settled");
    assert!(during >= 1, "no room B message overlapped room A's join");

    // Room A ends joined, or given up visibly.
    let last_seen = RefCell::new(String::new());
    let outcome = poll(Duration::from_millis(100), T, || async {
        let v = room_view(&f, &room_a).await;
        let s = bot_summary(&v);
        if s != *last_seen.borrow() {
            eprintln!("(a) [{:>6.2}s after invite] room A: {s}", invited_at.elapsed().as_secs_f64());
            *last_seen.borrow_mut() = s;
        }
        match v["bot_membership"].as_str() {
            Some(m @ ("joined" | "join_failed")) => Some((m.to_owned(), v)),
            _ => None,
        }
    })
    .await;
    let Some((outcome, a_view)) = outcome else {
        panic!(
            "room A neither joined nor given up within {T:?}: {}\nfedlink log:\n{}",
            bot_summary(&room_view(&f, &room_a).await),
            f.log_tail()
        );
    };
    match outcome.as_str() {
        "joined" => eprintln!("(a) OUTCOME: fedlink JOINED room A after {:?} (joined_via {})", invited_at.elapsed(), a_view["joined_via"]),
        _ => eprintln!("(a) OUTCOME: fedlink GAVE UP room A after {:?}; reason: {}", invited_at.elapsed(), a_view["bot"]["reason"]),
    }

    // After A settled, B still flows.
    let n = latencies.len();
    for i in n..n + 2 {
        let sent_at = Instant::now();
        let ev = bob.send_text(&room_b, &format!("room B message {i} after room A settled")).await.unwrap();
        let latency = time_to_fedlink(&f, &room_b, &ev, sent_at, Duration::from_secs(30)).await;
        eprintln!("(a) room B message {i} (after A settled): reached fedlink after {latency:?}");
        latencies.push((i, latency));
    }

    // A message in room A reaches fedlink if it joined.
    let in_a = bob.send_text(&room_a, "hello room A").await.unwrap();
    if outcome == "joined" {
        let t = Instant::now();
        let l = time_to_fedlink(&f, &room_a, &in_a, t, T).await;
        eprintln!("(a) room A message reached fedlink after {l:?}");
        assert!(l.is_some(), "room A is joined but bob's message {in_a} never reached fedlink's view\nroom A view: {}\nfedlink log:\n{}", room_view(&f, &room_a).await, f.log_tail());
    }

    let metrics = f.metrics().await;
    let series = |name: &str| metrics.lines().filter(|l| !l.starts_with('#') && l.starts_with(name)).map(str::to_owned).collect::<Vec<_>>();
    eprintln!(
        "(a) metrics: {:?} {:?} {:?} {:?}",
        series("fedlink_parked_pdus"),
        series("fedlink_rooms_join_failed"),
        series("fedlink_joins_total"),
        series("fedlink_key_fetches_total")
    );
    let log = std::fs::read_to_string(f.dir.join("fedlink.log")).unwrap_or_default();
    for l in log.lines().filter(|l| l.contains("notary") || l.contains(litchi.server_name.as_str()) && (l.contains("WARN") || l.contains("ERROR"))) {
        eprintln!("(a) fedlink log: {l}");
    }
    for name in ["fedlink_parked_pdus", "fedlink_rooms_join_failed"] {
        assert!(
            metrics.lines().any(|l| !l.starts_with('#') && (l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))),
            "{name} is not in /metrics:\n{metrics}"
        );
    }
    if outcome == "join_failed" {
        assert!(f.metric("fedlink_rooms_join_failed").await >= 1.0, "room A was given up but fedlink_rooms_join_failed is 0");
    }

    let slow: Vec<_> = latencies.iter().filter(|(_, l)| l.is_none_or(|d| d >= Duration::from_secs(2))).collect();
    assert!(slow.is_empty(), "room B messages held up (>= 2 s or never): {slow:?}; all: {latencies:?}\nfedlink log:\n{}", f.log_tail());
    mark("done");
}

/// A SIGSTOPped process, resumed (SIGCONT) when dropped, so the test can stop it even after a
/// panic.
struct Stopped {
    pid: u32,
    resumed: bool,
}

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        signal(pid, "-STOP");
        Stopped { pid, resumed: false }
    }

    fn resume(&mut self) {
        if !self.resumed {
            signal(self.pid, "-CONT");
            self.resumed = true;
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.resume();
    }
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().expect("running kill");
    assert!(status.success(), "kill {sig} {pid}: {status}");
}

/// The process whose command line names `config` (the Synapse started with it).
fn pid_of(config: &std::path::Path) -> u32 {
    let needle = config.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()) {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "exactly one process runs {needle}: {found:?}");
    found[0]
}

/// Whatever `/destinations` and the backing-off gauge say about `dest`.
async fn destination_evidence(f: &FedlinkBin, dest: &str) -> (Value, Vec<String>, bool) {
    let (_, d) = f.admin("/_fedlink/admin/v1/destinations").await;
    // Every object anywhere in the answer that names `dest` (whatever the layout: the
    // outbox's `destinations`, or per-queue `lanes`).
    fn collect<'a>(v: &'a Value, dest: &str, out: &mut Vec<&'a Value>) {
        match v {
            Value::Object(m) => {
                if m.values().any(|x| x == dest) || m.contains_key(dest) {
                    out.push(v);
                }
                m.values().for_each(|x| collect(x, dest, out));
            }
            Value::Array(a) => a.iter().for_each(|x| collect(x, dest, out)),
            _ => {}
        }
    }
    let mut hits = Vec::new();
    collect(&d, dest, &mut hits);
    let failing = |v: &Value| v["failures"].as_u64().is_some_and(|n| n > 0) || v["last_error"].is_string();
    let failed_in_admin = hits.iter().any(|h| failing(h) || h.get(dest).is_some_and(failing));
    let gauge: Vec<String> = f.metrics().await.lines().filter(|l| l.starts_with("fedlink_destinations_backing_off")).map(str::to_owned).collect();
    (d, gauge, failed_in_admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_homeserver_delays_only_its_own_invites() {
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let mark = |what: &str| eprintln!("[(b) {:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    let (kiwi, litchi, mango) = tokio::join!(
        Synapse::start(SynapseOpts { extra_yaml: FAST_RETRY.into(), ..Default::default() }),
        Synapse::start(SynapseOpts { extra_yaml: FAST_RETRY.into(), ..Default::default() }),
        Synapse::start(SynapseOpts { extra_yaml: FAST_RETRY.into(), ..Default::default() })
    );
    let (kiwi, litchi, mango) = (kiwi.expect("kiwi starts"), litchi.expect("litchi starts"), mango.expect("mango starts"));
    let bob = kiwi.register("bob").await.unwrap();
    let alice_k = kiwi.register("alice").await.unwrap();
    let alice_l = litchi.register("alice").await.unwrap();
    // Her mango account sorts first among her accounts, so a fedlink that went through
    // invites one after another in order would hit the hanging server first.
    let alice_m = mango.register("a0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = linked_alice_config(
        &[&kiwi.server_name, &litchi.server_name, &mango.server_name],
        &[&alice_k.user_id, &alice_l.user_id, &alice_m.user_id],
    );
    let f = FedlinkBin::start(dir.path(), &extra).await.expect("fedlink starts");
    mark("started");

    // mango hangs: the kernel still accepts connections, nobody answers.
    let mut hang = Stopped::stop(pid_of(&mango.config_path()));
    mark(&format!("mango ({}) stopped, pid {}", mango.server_name, hang.pid));

    let room = bob.create_room(&[&alice_k.user_id, &f.bot()], None, "private_chat").await.unwrap();
    let created = Instant::now();
    mark(&format!("room {room} created"));

    // Watch, every 100 ms: fedlink's own view of the bot, bob's view of the bot, and
    // alice@litchi's invites.
    let (joined_fedlink, joined_bob, invited_l) = (Cell::new(None::<Duration>), Cell::new(None::<Duration>), Cell::new(None::<Duration>));
    let done = poll(Duration::from_millis(100), T, || async {
        let (v, members, invites) = tokio::join!(room_view(&f, &room), bob.joined_members(&room), invited_rooms(&alice_l));
        let at = created.elapsed();
        if joined_fedlink.get().is_none() && v["bot_membership"] == "joined" {
            joined_fedlink.set(Some(at));
        }
        if joined_bob.get().is_none() && members.is_ok_and(|m| m.contains(&f.bot())) {
            joined_bob.set(Some(at));
        }
        if invited_l.get().is_none() && invites.is_ok_and(|r| r.contains(&room)) {
            invited_l.set(Some(at));
        }
        (joined_fedlink.get().is_some() && joined_bob.get().is_some() && invited_l.get().is_some()).then_some(())
    })
    .await;
    let (joined_fedlink, joined_bob, invited_l) = (joined_fedlink.get(), joined_bob.get(), invited_l.get());
    eprintln!(
        "(b) from createRoom: bot joined in fedlink's view {joined_fedlink:?}, as bob sees it {joined_bob:?}; alice@litchi invited {invited_l:?}"
    );
    assert!(done.is_some(), "bot join / alice@litchi's invite not seen within {T:?}\nroom view: {}\nfedlink log:\n{}", room_view(&f, &room).await, f.log_tail());
    let (jf, jb, il) = (joined_fedlink.unwrap(), joined_bob.unwrap(), invited_l.unwrap());
    let joined = jf.min(jb);
    let invite_after_join = il.saturating_sub(joined);
    eprintln!("(b) TIMING: bot joined {joined:?} after createRoom; alice@litchi's invite {invite_after_join:?} after the bot joined");
    assert!(
        invite_after_join < Duration::from_secs(5),
        "alice@litchi's invite took {invite_after_join:?} after the bot joined (mango hangs)\nroom view: {}\nfedlink log:\n{}",
        room_view(&f, &room).await,
        f.log_tail()
    );
    let v = room_view(&f, &room).await;
    eprintln!("(b) pending invites while mango hangs: {}", v["pending_invites"]);
    assert!(v["pending_invites"].get(&alice_m.user_id).is_some(), "alice@mango's invite is pending while mango hangs: {v}");

    // While mango hangs, its lane fails and backs off (fedlink's request timeout is 30 s).
    let last = RefCell::new(String::new());
    let evidence = poll(Duration::from_millis(500), Duration::from_secs(75), || async {
        let (d, gauge, failed) = destination_evidence(&f, &mango.server_name).await;
        let invites_backing_off = gauge.iter().any(|l| l.contains("queue=\"invites\"") && !l.ends_with(" 0"));
        let now = format!("destinations: {d}\nbacking off: {gauge:?}");
        if now != *last.borrow() {
            eprintln!("(b) [{:>6.2}s after createRoom, mango stopped] {now}", created.elapsed().as_secs_f64());
            *last.borrow_mut() = now;
        }
        (failed || invites_backing_off).then_some((failed, invites_backing_off))
    })
    .await;
    let (mango_lane_in_admin, gauge_says) = evidence.unwrap_or_else(|| {
        panic!("no sign of mango's lane failing while it hung (75 s)\n{}\nfedlink log:\n{}", last.borrow(), f.log_tail())
    });
    eprintln!("(b) mango's lane failed while hung: in /destinations: {mango_lane_in_admin}; fedlink_destinations_backing_off{{queue=\"invites\"}} > 0: {gauge_says}");

    // Resume mango: fedlink must retry and deliver.
    hang.resume();
    let resumed = Instant::now();
    mark("mango resumed");
    let got = poll(Duration::from_millis(200), Duration::from_secs(90), || async {
        invited_rooms(&alice_m).await.ok().filter(|r| r.contains(&room)).map(|_| resumed.elapsed())
    })
    .await;
    eprintln!("(b) TIMING: alice@mango invited {got:?} after mango resumed");
    let (d, gauge, _) = destination_evidence(&f, &mango.server_name).await;
    eprintln!("(b) after delivery: destinations: {d}\nbacking off: {gauge:?}");
    assert!(
        got.is_some(),
        "alice@mango not invited within 90 s of mango resuming\nroom view: {}\nfedlink log:\n{}\nmango log:\n{}",
        room_view(&f, &room).await,
        f.log_tail(),
        mango.log_tail()
    );
    mark("done");
}
