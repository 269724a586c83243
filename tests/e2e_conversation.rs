//! End-to-end, issue #9: two real Synapse homeservers, both with fedlink's registration;
//! alice@kiwi and alice@litchi are linked. The bot is in none of these rooms: fedlink acts
//! through the registrations only.
//! - bob@kiwi opens a direct chat with alice@kiwi; once she joins, alice@litchi's invite is a
//!   direct-chat invite, and after she is in the room her `m.direct` lists it under bob,
//!   next to what her client had written there;
//! - bob writes a root message, another main-timeline message, then a reply in the root's
//!   thread; alice reads the root (main timeline) and the thread reply (in its thread) on
//!   litchi, whose pushes drop the receipts' thread ids;
//! - on kiwi, alice's threaded receipt reaches the reply and her unread count for the thread
//!   is zero, while the main-timeline message stays unread; her read marker
//!   (`m.fully_read`) is the root, the main-timeline event she read.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{
    appservice::{appservice_toml, install_registration},
    enc,
    fedlink_proc::FedlinkBin,
    free_port, kiwi_and_litchi, wait_until, ClientSession, KiwiLitchi,
};

const T: Duration = Duration::from_secs(90);

/// `/sync` with per-thread unread counts.
async fn sync_threads(c: &ClientSession) -> Value {
    let filter = enc(&json!({ "room": { "timeline": { "unread_thread_notifications": true, "limit": 1 } } }).to_string());
    c.get(&format!("/_matrix/client/v3/sync?timeout=0&filter={filter}")).await.unwrap()
}

/// `user`'s m.read receipt on `event` as `c`'s server shows it: its data (with `thread_id`).
async fn receipt_data(c: &ClientSession, room: &str, event: &str, user: &str) -> Option<Value> {
    let s = sync_threads(c).await;
    let events = s["rooms"]["join"][room]["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
    events.iter().filter(|e| e["type"] == "m.receipt").find_map(|e| e["content"][event]["m.read"].get(user).cloned())
}

async fn event_on(c: &ClientSession, room: &str, event: &str) {
    wait_until(&format!("{event} on {}", c.user_id), T, || async {
        Ok(c.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(event))).await.ok().map(|_| ()))
    })
    .await
    .unwrap();
}

async fn send(c: &ClientSession, room: &str, content: Value) -> String {
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{}", enc(room), support::appservice::token());
    c.put(&path, &content).await.unwrap()["event_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_chats_threads_and_the_read_marker_follow_the_person() {
    let KiwiLitchi { mut kiwi, mut litchi, bob, alice_k, alice_l } = kiwi_and_litchi().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[federation]\nverify_tls = false\n[[directory.person]]\nid = \"alice\"\naccounts = [\"{}\", \"{}\"]\n{}{}",
        alice_k.user_id,
        alice_l.user_id,
        appservice_toml(&kiwi),
        appservice_toml(&litchi)
    );
    let f = FedlinkBin::start_on(dir.path(), free_port(), free_port(), &extra).await.unwrap();
    install_registration(&mut kiwi, &f).await;
    install_registration(&mut litchi, &f).await;
    let fail = |what: &str, e: anyhow::Error| -> ! { panic!("{what}: {e:?}\n{}", f.log_tail()) };

    // What alice's client on litchi had written in m.direct stays.
    let direct_path = format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&alice_l.user_id));
    alice_l.put(&direct_path, &json!({ "@carol:litchi": ["!earlier:litchi"] })).await.unwrap();

    // bob opens a direct chat with alice@kiwi; she joins.
    let created = bob
        .post("/_matrix/client/v3/createRoom", &json!({ "preset": "trusted_private_chat", "invite": [alice_k.user_id], "is_direct": true }))
        .await
        .unwrap();
    let room = created["room_id"].as_str().unwrap().to_owned();
    wait_until("alice@kiwi invited", T, || async { Ok(support::appservice::sync(&alice_k).await["rooms"]["invite"].get(&room).map(|_| ())) })
        .await
        .unwrap();
    alice_k.join(&room, &[]).await.unwrap();

    // alice@litchi is invited (as her sibling, through kiwi's registration) and joined
    // (through litchi's).
    wait_until("alice@litchi joined", T, || async { Ok(bob.joined_members(&room).await?.contains(&alice_l.user_id).then_some(())) })
        .await
        .unwrap_or_else(|e| fail("alice@litchi joined", e));
    // Her invite was a direct-chat invite.
    let history = bob.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room))).await.unwrap();
    let invite = history["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == alice_l.user_id.as_str() && e["content"]["membership"] == "invite")
        .cloned()
        .unwrap_or_else(|| panic!("no invite of alice@litchi in {history}"));
    assert_eq!(invite["content"]["is_direct"], true, "{invite}");
    // Her m.direct lists the room under bob, next to what was there.
    wait_until("alice@litchi's m.direct lists the room under bob", T, || async {
        let d = alice_l.get(&direct_path).await?;
        Ok((d[&bob.user_id] == json!([room])).then_some(d))
    })
    .await
    .map(|d| assert_eq!(d["@carol:litchi"], json!(["!earlier:litchi"]), "{d}"))
    .unwrap_or_else(|e| fail("m.direct", e));

    // bob: a root, a main-timeline message, a reply in the root's thread.
    let root = send(&bob, &room, json!({ "msgtype": "m.text", "body": "root" })).await;
    let main = send(&bob, &room, json!({ "msgtype": "m.text", "body": "main timeline, not read" })).await;
    let reply = send(
        &bob,
        &room,
        json!({ "msgtype": "m.text", "body": "in the thread",
                "m.relates_to": { "rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": { "event_id": root } } }),
    )
    .await;
    // Before anything is read, the thread is unread for alice@kiwi.
    wait_until("the thread reply unread on kiwi", T, || async {
        let s = sync_threads(&alice_k).await;
        Ok((s["rooms"]["join"][&room]["unread_thread_notifications"][&root]["notification_count"].as_u64() == Some(1)).then_some(()))
    })
    .await
    .unwrap();

    // alice reads on litchi: the root in the main timeline, the reply in its thread.
    for e in [&root, &main, &reply] {
        event_on(&alice_l, &room, e).await;
    }
    let receipt = |e: &str| format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(e));
    alice_l.post(&receipt(&root), &json!({ "thread_id": "main" })).await.unwrap();
    alice_l.post(&receipt(&reply), &json!({ "thread_id": root })).await.unwrap();

    // On kiwi: the threaded receipt reaches the reply, the thread has nothing unread...
    wait_until("alice@kiwi's threaded receipt at the reply", T, || async {
        Ok(receipt_data(&alice_k, &room, &reply, &alice_k.user_id).await.filter(|d| d["thread_id"] == root.as_str()).map(|_| ()))
    })
    .await
    .unwrap_or_else(|e| fail("threaded receipt", e));
    wait_until("no unread thread messages for alice@kiwi", T, || async {
        let s = sync_threads(&alice_k).await;
        let n = s["rooms"]["join"][&room]["unread_thread_notifications"][&root]["notification_count"].as_u64().unwrap_or(0);
        Ok((n == 0).then_some(()))
    })
    .await
    .unwrap();
    // ...the read marker is at the root, the main-timeline event she read...
    wait_until("alice@kiwi's m.fully_read at the root", T, || async {
        let path = format!("/_matrix/client/v3/user/{}/rooms/{}/account_data/m.fully_read", enc(&alice_k.user_id), enc(&room));
        Ok(alice_k.get(&path).await.ok().filter(|v| v["event_id"] == root.as_str()).map(|_| ()))
    })
    .await
    .unwrap_or_else(|e| fail("m.fully_read", e));
    // ...and the main-timeline message bob sent before the reply is still unread: her
    // main-timeline receipt is at the root, not at the reply.
    let s = sync_threads(&alice_k).await;
    assert_eq!(s["rooms"]["join"][&room]["unread_notifications"]["notification_count"].as_u64(), Some(1), "{}", s["rooms"]["join"][&room]);
    assert!(f.metric("fedlink_appservice_actions_total{kind=\"thread_read\",result=\"ok\"}").await >= 1.0);
    assert!(f.metric("fedlink_appservice_actions_total{kind=\"fully_read\",result=\"ok\"}").await >= 1.0);
    assert!(f.metric("fedlink_appservice_actions_total{kind=\"direct\",result=\"ok\"}").await >= 1.0);

    // The operator sees alice in step.
    wait_until("alice counted in step", T, || async {
        Ok((f.metric("fedlink_persons{state=\"in_step\"}").await == 1.0 && f.metric("fedlink_persons{state=\"catching_up\"}").await == 0.0).then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail("in-step gauges", e));
    // The admin view shows the person's thread reads and the direct chat.
    let p = f.admin("/_fedlink/admin/v1/persons/alice").await.1;
    let r = p["rooms"].as_array().unwrap().iter().find(|r| r["room_id"] == room.as_str()).cloned().unwrap_or_else(|| panic!("{p}"));
    assert_eq!(r["direct_with"], bob.user_id.as_str(), "{r}");
    assert_eq!(r["accounts"][&alice_k.user_id]["thread_receipts"][&root]["event_id"], reply.as_str(), "{r}");
    assert_eq!(r["accounts"][&alice_l.user_id]["direct_listed"], bob.user_id.as_str(), "{r}");

    // A real Prometheus scraping this fedlink: the exposition lints clean, every dashboard
    // and rule expression evaluates, and the "are people in step?" panels have data.
    let text = f.metrics().await;
    let mut lint = std::process::Command::new(support::prometheus::bin("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(), "promtool check metrics: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let prom = support::prometheus::Prometheus::start(f.admin_url.trim_start_matches("http://")).await.unwrap();
    wait_until("Prometheus has scraped alice in step", T, || async {
        let v = prom.query("sum(fedlink_persons{state=\"in_step\"})").await?;
        Ok(v.first().filter(|x| x["value"][1] == "1").map(|_| ()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", prom.log()));
    // Rates need two scrapes in their window.
    wait_until("two scrapes", T, || async { Ok((!prom.query("rate(fedlink_log_entries[1m])").await?.is_empty()).then_some(())) }).await.unwrap();
    let mut empty = Vec::new();
    for (title, expr) in support::prometheus::dashboard_exprs() {
        let v = prom.query(&expr).await.unwrap_or_else(|e| panic!("panel {title:?}: {e:?}"));
        if v.is_empty() {
            empty.push(title);
        }
    }
    for mission in ["Persons in step", "Catching up", "Blocked", "Unsupported", "Opted out", "Oldest out of step", "Accounts x rooms by state", "Read propagation p50 / p99", "Actions through registrations / s by kind and result", "Uptime and version"] {
        assert!(!empty.iter().any(|t| t == mission), "mission panel {mission:?} has no data; empty panels: {empty:?}");
    }
    wait_until("every alert rule evaluated without error", T, || async {
        let groups = prom.rules().await?;
        let rules: Vec<Value> = groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect();
        if let Some(bad) = rules.iter().find(|r| r["health"] == "err") {
            anyhow::bail!("rule failed: {bad}");
        }
        Ok((rules.len() == 10 && rules.iter().all(|r| r["health"] == "ok")).then_some(()))
    })
    .await
    .unwrap();
    // Nothing is firing for an in-step federation (FedlinkDown needs `up` 0 for 5 minutes).
    let firing = prom.query("ALERTS{alertstate=\"firing\"}").await.unwrap();
    assert!(firing.is_empty(), "{firing:?}");
}
