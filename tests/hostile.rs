//! In-process tests with hostile or failing peers and registration pushes (issue 7): one per
//! hole. Each asserts that the log and views stay unchanged (or bounded), that nothing
//! reaches another homeserver, and that a failing server holds up nobody else. The fake
//! peer verifies fedlink's request and event signatures like a homeserver would.

mod support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::http::Method;
use fedlink::keys::SigningKey;
use ruma::RoomVersionId;
use serde_json::{json, Value};
use support::{enc, fake_peer::{key_document, FakePeer}, fedlink_proc::Fedlink, wait_until};

const LOOPBACK: &str = "[federation]\nverify_tls = false\n";
const T: Duration = Duration::from_secs(30);

async fn room_view(f: &Fedlink, room: &str) -> Value {
    f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(room))).await.1
}

async fn wait_bot(f: &Fedlink, room: &str, state: &str) -> Value {
    wait_until(&format!("bot {state} in {room}"), T, || async {
        let v = room_view(f, room).await;
        if v["bot_membership"] == state {
            return Ok(Some(v));
        }
        Err(anyhow::anyhow!("room as the admin API shows it: {v}"))
    })
    .await
    .unwrap()
}

/// Given a room whose state holds a member of a server fedlink may not contact and no
/// notary vouches for its keys, when the bot is invited, then the join is given up for good
/// (visible in the admin API and metrics), and meanwhile a transaction for another room of
/// the same homeserver is answered at once. Once the resident serves the keys as a notary,
/// an admin retry joins the room.
#[tokio::test]
async fn a_join_that_cannot_succeed_is_given_up_visibly_and_never_holds_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let extra = format!("[federation]\nverify_tls = false\nallowed_servers = [\"{}\"]\n", peer.name);
    let f = Fedlink::start(dir.path(), 0, &extra).await;

    let ok_room = peer.create_room("alice", RoomVersionId::V12);
    assert_eq!(peer.invite(&ok_room, "alice", &f.bot(), &f.name, &f.fed_url).await.0, 200);
    wait_bot(&f, &ok_room, "joined").await;

    // A room with a member of mango, whose key server fedlink may not ask.
    let mango = SigningKey::generate();
    let bad_room = peer.create_room("alice", RoomVersionId::V12);
    {
        let mut st = peer.state.lock().unwrap();
        let room = st.rooms.get_mut(&bad_room).unwrap();
        room.push(&peer.name, &peer.key, &peer.user("alice"), "m.room.member", Some("@m:mango"), json!({ "membership": "invite" }));
        room.push("mango", &mango, "@m:mango", "m.room.member", Some("@m:mango"), json!({ "membership": "join" }));
    }
    assert_eq!(peer.invite(&bad_room, "alice", &f.bot(), &f.name, &f.fed_url).await.0, 200);

    // While that join is tried and given up, the peer's transactions are answered at once:
    // the first carries an event of the room being joined too (before, it waited 20 s).
    for i in 0..5 {
        let (id, ev) = peer.push(&ok_room, "alice", "m.room.message", None, json!({ "body": format!("m{i}") }));
        let mut pdus = vec![ev];
        if i == 0 {
            pdus.push(peer.push(&bad_room, "alice", "m.room.message", None, json!({ "body": "while joining" })).1);
        }
        let t = Instant::now();
        let (s, v) = peer.send_txn(&f.name, &f.fed_url, &format!("ok{i}"), pdus, vec![]).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["pdus"][&id], json!({}), "{v}");
        eprintln!("transaction {i} for the other room answered in {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(1), "a transaction took {:?}", t.elapsed());
    }

    let v = wait_bot(&f, &bad_room, "join_failed").await;
    assert!(v["bot"]["reason"].as_str().unwrap().contains("mango"), "{v}");
    assert_eq!(f.metric("fedlink_rooms_join_failed").await, 1.0);
    assert!(f.metric("fedlink_joins_total{result=\"permanent_error\"}").await >= 1.0);
    let joins_sent = peer.state.lock().unwrap().joins.len();
    // The given-up room's events are refused at once, not parked or waited on.
    let (id, ev) = peer.push(&bad_room, "alice", "m.room.message", None, json!({ "body": "x" }));
    let t = Instant::now();
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "bad1", vec![ev], vec![]).await;
    assert_eq!(s, 200);
    assert!(v["pdus"][&id]["error"].is_string(), "{v}");
    assert!(t.elapsed() < Duration::from_secs(1));
    // Nothing retries it by itself: a transient failure would have been retried within 2 s.
    let make_joins = || peer.state.lock().unwrap().requests.iter().filter(|(_, p)| p.contains("make_join") && p.contains(&enc(&bad_room))).count();
    let tried = make_joins();
    assert!(tried >= 1, "the join was tried through the peer");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(make_joins(), tried, "a given-up join is not retried by itself");
    assert_eq!(room_view(&f, &bad_room).await["bot_membership"], "join_failed");

    // The resident becomes a notary for mango's keys; an admin retries the join.
    peer.state.lock().unwrap().notary_docs = Some(vec![key_document("mango", &mango)]);
    let (s, v) = f.admin_post(&format!("/_fedlink/admin/v1/rooms/{}/join", enc(&bad_room))).await;
    assert_eq!(s, 200, "{v}");
    let v = wait_bot(&f, &bad_room, "joined").await;
    assert_eq!(v["members"]["@m:mango"], "join");
    assert!(f.metric("fedlink_key_fetches_total{result=\"notary_ok\"}").await >= 1.0);
    // A retry of a room that is not given up is refused.
    let (s, _) = f.admin_post(&format!("/_fedlink/admin/v1/rooms/{}/join", enc(&ok_room))).await;
    assert_eq!(s, 409);
    assert!(peer.state.lock().unwrap().joins.len() > joins_sent);
    f.stop().await;
}

/// Given a join that is under way (the resident fails make_join for now), when the resident
/// already sends that room's events, then /send answers at once, the events are kept across
/// a restart, and they are applied once the join lands.
#[tokio::test]
async fn events_of_a_room_being_joined_are_held_durably_and_applied_after_the_join() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    peer.state.lock().unwrap().fail_make_join = Some(503);
    let room = peer.create_room("alice", RoomVersionId::V12);
    assert_eq!(peer.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await.0, 200);
    let (id, ev) = peer.push(&room, "alice", "m.room.message", None, json!({ "body": "early" }));
    let t = Instant::now();
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "early1", vec![ev], vec![]).await;
    assert_eq!(s, 200);
    assert_eq!(v["pdus"][&id], json!({}));
    eprintln!("a transaction for the room being joined answered in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
    assert_eq!(f.metric("fedlink_parked_pdus ").await, 1.0);
    assert_eq!(room_view(&f, &room).await["bot_membership"], "invited");
    let log_before = f.log_len().await;
    let port = f.fed_port;
    f.stop().await;

    peer.state.lock().unwrap().fail_make_join = None;
    let f = Fedlink::start(dir.path(), port, LOOPBACK).await;
    wait_bot(&f, &room, "joined").await;
    wait_until("the held event applied", T, || async {
        let v = room_view(&f, &room).await;
        Ok(v["forward_extremities"].as_array().unwrap().contains(&json!(id)).then_some(()))
    })
    .await
    .unwrap();
    assert!(f.log_len().await > log_before);
    assert_eq!(f.metric("fedlink_parked_pdus ").await, 0.0);
    assert_eq!(f.metric("fedlink_parked_pdus_total{result=\"applied\"}").await, 1.0);
    f.stop().await;
}

/// A fake client-server API of a homeserver: records every request and says yes.
async fn fake_client_api() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: axum::http::Uri| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(format!("{method} {}", uri.path()));
            axum::Json(json!({ "origin_server_ts": 1 }))
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, seen)
}

async fn push(f: &Fedlink, hs_token: &str, txn: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .put(format!("{}/_matrix/app/v1/transactions/{txn}", f.admin_url))
        .bearer_auth(hs_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn member(room: &str, id: &str, sender: &str, target: &str, m: &str) -> Value {
    json!({ "type": "m.room.member", "room_id": room, "event_id": id, "sender": sender, "state_key": target,
            "content": { "membership": m }, "origin_server_ts": 1 })
}

/// Given alice on mango and on litchi, linked, and registrations on kiwi, mango and litchi,
/// when kiwi pushes "@alice:mango joined, then left by herself", then nothing is logged and
/// no leave reaches litchi; when mango itself pushes the same, litchi's alice leaves.
#[tokio::test]
async fn a_registration_push_speaks_only_for_its_own_users() {
    let dir = tempfile::tempdir().unwrap();
    let (litchi_url, litchi_calls) = fake_client_api().await;
    let (other_url, _) = fake_client_api().await;
    let extra = format!(
        "{LOOPBACK}[[directory.person]]\nid = \"alice\"\naccounts = [\"@alice:mango\", \"@alice:litchi\"]\n\
         [[appservice]]\nserver_name = \"kiwi\"\nclient_url = \"{other_url}\"\nas_token = \"kiwi-as-token-0123456789\"\nhs_token = \"kiwi-hs-token-0123456789\"\n\
         [[appservice]]\nserver_name = \"mango\"\nclient_url = \"{other_url}\"\nas_token = \"mango-as-token-0123456789\"\nhs_token = \"mango-hs-token-0123456789\"\n\
         [[appservice]]\nserver_name = \"litchi\"\nclient_url = \"{litchi_url}\"\nas_token = \"litchi-as-token-0123456789\"\nhs_token = \"litchi-hs-token-0123456789\"\n"
    );
    let f = Fedlink::start(dir.path(), 0, &extra).await;
    let room = "!r:kiwi";
    // litchi says its alice joined the room.
    let (s, _) = push(&f, "litchi-hs-token-0123456789", "l1", json!({ "events": [member(room, "$l1", "@alice:litchi", "@alice:litchi", "join")] })).await;
    assert_eq!(s, 200);
    let before = f.log_len().await;

    // kiwi speaks for mango's alice (and for litchi's, and sends a receipt and presence for her).
    let hostile = json!({
        "events": [
            member(room, "$k1", "@alice:mango", "@alice:mango", "join"),
            member(room, "$k2", "@alice:mango", "@alice:mango", "leave"),
            member(room, "$k3", "@bob:kiwi", "@alice:litchi", "invite"),
            { "type": "m.room.message", "room_id": room, "event_id": "$k4", "sender": "@alice:litchi", "content": {}, "origin_server_ts": 5 },
        ],
        "ephemeral": [
            { "type": "m.receipt", "room_id": room, "content": { "$k4": { "m.read": { "@alice:litchi": { "ts": 1 } } } } },
            { "type": "m.presence", "sender": "@alice:mango", "content": { "presence": "online" } },
        ],
    });
    let (s, _) = push(&f, "kiwi-hs-token-0123456789", "k1", hostile).await;
    assert_eq!(s, 200);
    assert_eq!(f.log_len().await, before, "nothing kiwi said about other servers' users is logged");
    assert_eq!(f.metric("fedlink_appservice_foreign_items_total").await, 6.0);
    let p = f.admin("/_fedlink/admin/v1/persons/alice").await.1;
    assert!(!p.to_string().contains("$k"), "{p}");

    // The same from mango itself is honoured: litchi's alice follows her out.
    let own = json!({ "events": [
        member(room, "$m1", "@alice:mango", "@alice:mango", "join"),
        member(room, "$m2", "@alice:mango", "@alice:mango", "leave"),
    ] });
    assert_eq!(push(&f, "mango-hs-token-0123456789", "m1", own).await.0, 200);
    assert_eq!(f.metric("fedlink_log_appends_total{kind=\"client_event\"}").await, 3.0, "litchi's one and mango's two");
    wait_until("litchi's alice leaves", T, || async {
        Ok(litchi_calls.lock().unwrap().iter().any(|c| c.ends_with("/leave")).then_some(()))
    })
    .await
    .unwrap();
    let leaves = litchi_calls.lock().unwrap().iter().filter(|c| c.ends_with("/leave")).count();
    assert_eq!(leaves, 1);

    // Malformed and oversized pushes are refused whole and change nothing.
    let n = f.log_len().await;
    let (s, v) = push(&f, "mango-hs-token-0123456789", "m2", json!({ "events": "nope" })).await;
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_BAD_JSON")));
    let many: Vec<Value> = (0..1001).map(|i| member(room, &format!("$x{i}"), "@alice:mango", "@alice:mango", "join")).collect();
    let (s, _) = push(&f, "mango-hs-token-0123456789", "m3", json!({ "events": many })).await;
    assert_eq!(s, 400);
    assert_eq!(f.log_len().await, n);
    f.stop().await;
}

/// Presence and typing EDUs are capped and kept only for linked accounts.
#[tokio::test]
async fn presence_and_typing_are_capped_and_kept_only_for_linked_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let extra = format!("{LOOPBACK}[[directory.person]]\nid = \"alice\"\naccounts = [\"{}\", \"@alice:litchi\"]\n", peer.user("alice"));
    let f = Fedlink::start(dir.path(), 0, &extra).await;
    let room = peer.create_room("alice", RoomVersionId::V12);
    assert_eq!(peer.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await.0, 200);
    wait_bot(&f, &room, "joined").await;
    // Counted by kind: the sibling's invite may be logged meanwhile.
    let logged = |kind: &'static str| {
        let f = &f;
        async move { f.metric(&format!("fedlink_log_appends_total{{kind=\"{kind}\"}}")).await }
    };
    let push: Vec<Value> = (0..101).map(|i| json!({ "user_id": peer.user(&format!("u{i}")), "presence": "online" })).collect();
    let edus = vec![
        json!({ "edu_type": "m.presence", "content": { "push": push } }),
        json!({ "edu_type": "m.presence", "content": { "push": [{ "user_id": peer.user("stranger"), "presence": "online" }] } }),
        json!({ "edu_type": "m.typing", "content": { "room_id": room, "user_id": peer.user("stranger"), "typing": true } }),
    ];
    let (s, _) = peer.send_txn(&f.name, &f.fed_url, "p1", vec![], edus).await;
    assert_eq!(s, 200);
    assert_eq!((logged("presence").await, logged("typing").await), (0.0, 0.0), "nothing logged for 101 updates or unlinked users");
    assert_eq!(f.metric("fedlink_edus_received_total{edu_type=\"m.presence\",result=\"rejected\"}").await, 1.0);
    let edus = vec![
        json!({ "edu_type": "m.presence", "content": { "push": [{ "user_id": peer.user("alice"), "presence": "online" }] } }),
        json!({ "edu_type": "m.typing", "content": { "room_id": room, "user_id": peer.user("alice"), "typing": true } }),
    ];
    assert_eq!(peer.send_txn(&f.name, &f.fed_url, "p2", vec![], edus).await.0, 200);
    assert_eq!((logged("presence").await, logged("typing").await), (1.0, 1.0), "a linked account's presence and typing are kept");
    f.stop().await;
}

/// `bot.invites_from` and `bot.max_rooms` bound who can put the bot in rooms, and how many.
#[tokio::test]
async fn only_allowed_inviters_and_at_most_max_rooms() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let extra = format!("{LOOPBACK}[bot]\ninvites_from = [\"@admin-*:{}\"]\nmax_rooms = 1\n", peer.name);
    let f = Fedlink::start(dir.path(), 0, &extra).await;
    let r1 = peer.create_room("alice", RoomVersionId::V12);
    let before = f.log_len().await;
    let (s, v) = peer.invite(&r1, "alice", &f.bot(), &f.name, &f.fed_url).await;
    assert_eq!((s.as_u16(), v["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("bot.invites_from"));
    assert_eq!(f.log_len().await, before);
    let r1 = peer.create_room("admin-1", RoomVersionId::V12);
    assert_eq!(peer.invite(&r1, "admin-1", &f.bot(), &f.name, &f.fed_url).await.0, 200);
    wait_bot(&f, &r1, "joined").await;
    let r2 = peer.create_room("admin-1", RoomVersionId::V12);
    let before = f.log_len().await;
    let (s, v) = peer.invite(&r2, "admin-1", &f.bot(), &f.name, &f.fed_url).await;
    assert_eq!(s.as_u16(), 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("bot.max_rooms"));
    assert_eq!(f.log_len().await, before);
    assert_eq!(f.metric("fedlink_bot_invites_refused_total").await, 2.0);
    f.stop().await;
}

/// One origin with a request in flight (here: fedlink is filling a gap from it, which the
/// peer answers slowly) gets 429 with `retry_after_ms` for more than the configured limit;
/// the slot is free again once the request ends.
#[tokio::test]
async fn an_origin_gets_429_beyond_its_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Arc::new(FakePeer::start().await);
    let extra = "[federation]\nverify_tls = false\nmax_inflight_per_origin = 1\n";
    let f = Fedlink::start(dir.path(), 0, extra).await;
    let room = peer.create_room("alice", RoomVersionId::V12);
    assert_eq!(peer.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await.0, 200);
    wait_bot(&f, &room, "joined").await;
    peer.push(&room, "alice", "m.room.message", None, json!({ "body": "missed" }));
    let (_, ev) = peer.push(&room, "alice", "m.room.message", None, json!({ "body": "after a gap" }));
    peer.state.lock().unwrap().delay_missing_events = Some(Duration::from_secs(3));
    let (p, name, url) = (peer.clone(), f.name.clone(), f.fed_url.clone());
    let slow = tokio::spawn(async move { p.send_txn(&name, &url, "gap1", vec![ev], vec![]).await });
    wait_until("fedlink asks for the missing events", T, || async {
        Ok(peer.state.lock().unwrap().requests.iter().any(|(_, p)| p.contains("get_missing_events")).then_some(()))
    })
    .await
    .unwrap();
    let path = format!("/_matrix/federation/v1/state_ids/{}?event_id=%24nope", enc(&room));
    let (s, v) = peer.request(&f.name, &f.fed_url, Method::GET, &path, None).await;
    assert_eq!((s.as_u16(), v["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{v}");
    assert!(v["retry_after_ms"].as_u64().is_some());
    assert!(f.metric("fedlink_inbound_rate_limited_total").await >= 1.0);
    let report = f.admin("/_fedlink/admin/v1/inbound").await.1;
    assert!(report["rate_limited"][&peer.name].as_u64() >= Some(1), "{report}");
    assert_eq!(slow.await.unwrap().0, 200);
    let (s, _) = peer.request(&f.name, &f.fed_url, Method::GET, &path, None).await;
    assert_ne!(s.as_u16(), 429, "the slot is free again");
    f.stop().await;
}

/// A target server that changes the invite it countersigns, or does not sign it, gets
/// nothing stored or relayed: the invite is recorded as failed.
#[tokio::test]
async fn a_tampered_or_unsigned_returned_invite_is_neither_stored_nor_relayed() {
    for tamper in ["content", "unsigned"] {
        let dir = tempfile::tempdir().unwrap();
        let kiwi = FakePeer::start().await;
        let litchi = FakePeer::start().await;
        litchi.state.lock().unwrap().tamper_invite = Some(tamper);
        let extra = format!("{LOOPBACK}[[directory.person]]\nid = \"alice\"\naccounts = [\"{}\", \"{}\"]\n", kiwi.user("alice"), litchi.user("alice"));
        let f = Fedlink::start(dir.path(), 0, &extra).await;
        let room = kiwi.create_room("alice", RoomVersionId::V12);
        kiwi.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await;
        wait_bot(&f, &room, "joined").await;
        let v = wait_until("the invite recorded as failed", T, || async {
            let v = room_view(&f, &room).await;
            Ok(v["failed_invites"].get(litchi.user("alice")).cloned())
        })
        .await
        .unwrap();
        let expected = if tamper == "content" { "does not match its hash" } else { "not signed by" };
        assert!(v["reason"].as_str().unwrap().contains(expected), "{tamper}: {v}");
        let r = room_view(&f, &room).await;
        assert!(r["members"].get(litchi.user("alice")).is_none(), "{tamper}: not stored: {r}");
        // Nothing relayed to the room's other server: kiwi received no transaction with it.
        assert!(kiwi.state.lock().unwrap().transactions.iter().all(|(_, pdus)| pdus.iter().all(|p| p["state_key"] != litchi.user("alice").as_str())));
        f.stop().await;
    }
}

/// Given a person with accounts on a healthy server and on one that hangs (accepts
/// connections, never answers), the healthy one's invite is delivered at once. The hanging
/// account sorts first, so invites sent one after another in order would wait on it.
#[tokio::test]
async fn a_hanging_destination_delays_only_its_own_invites() {
    let dir = tempfile::tempdir().unwrap();
    let kiwi = FakePeer::start().await;
    let litchi = FakePeer::start().await;
    // Accepts TCP connections (the kernel's backlog) and never answers.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_name = format!("localhost:{}", hang.local_addr().unwrap().port());
    let extra = format!(
        "{LOOPBACK}[[directory.person]]\nid = \"alice\"\naccounts = [\"{}\", \"@a0:{hang_name}\", \"{}\"]\n",
        kiwi.user("alice"),
        litchi.user("alice")
    );
    let f = Fedlink::start(dir.path(), 0, &extra).await;
    let room = kiwi.create_room("alice", RoomVersionId::V12);
    kiwi.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await;
    wait_bot(&f, &room, "joined").await;
    let t = Instant::now();
    wait_until("litchi's alice invited", Duration::from_secs(5), || async {
        Ok((!litchi.state.lock().unwrap().invites.is_empty()).then_some(()))
    })
    .await
    .unwrap();
    eprintln!("litchi invited {:?} after the bot joined", t.elapsed());
    let lanes = f.admin("/_fedlink/admin/v1/destinations").await.1;
    assert_eq!(lanes["lanes"]["invites"][&hang_name]["running"], true, "{lanes}");
    drop(hang);
    f.stop().await;
}

/// A static `federation.destinations` entry may point at a private address while private
/// networks stay closed to everyone else: the bot joins through the mapped peer, and a peer
/// that is not mapped is still refused before any connection.
#[tokio::test]
async fn a_static_destination_may_be_private_without_opening_private_networks() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let extra = format!("[federation]\nverify_tls = false\n[federation.destinations]\n\"{}\" = \"{}\"\n", peer.name, peer.url);
    let f = Fedlink::start_with_env(dir.path(), 0, &extra, &[]).await;
    let room = peer.create_room("alice", RoomVersionId::V12);
    assert_eq!(peer.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await.0, 200);
    wait_bot(&f, &room, "joined").await;
    let other = FakePeer::start().await;
    let room2 = other.create_room("alice", RoomVersionId::V12);
    let (s, _) = other.invite(&room2, "alice", &f.bot(), &f.name, &f.fed_url).await;
    assert_eq!(s.as_u16(), 401, "the unmapped peer's keys cannot be fetched from a private address");
    // The guarded resolver refused `localhost` for the unmapped peer.
    assert!(f.metric("fedlink_outbound_requests_total{result=\"network_error\"}").await >= 1.0);
    f.stop().await;
}

/// A fake client-server API that knows each user's memberships, (room, membership):
/// `joined_rooms` lists the joins; an initial `/sync` lists invites (the invite event last in
/// `invite_state`, as Synapse sends it; a membership `stripped_invite` is an invite shown as
/// stripped state only) and left rooms (the leave or ban ending the timeline; a membership
/// `untimelined_ban` is a ban whose timeline is empty); the member state endpoint answers
/// each room's membership. Records every request.
async fn fake_joined_rooms_api(memberships: Vec<(&'static str, Vec<(&'static str, &'static str)>)>) -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let all: Arc<BTreeMap<String, Vec<(String, String)>>> =
        Arc::new(memberships.into_iter().map(|(u, rooms)| (u.to_owned(), rooms.into_iter().map(|(r, m)| (r.to_owned(), m.to_owned())).collect())).collect());
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, axum::extract::Query(query): axum::extract::Query<BTreeMap<String, String>>| {
        let (s, all) = (s.clone(), all.clone());
        async move {
            let user = query.get("user_id").cloned().unwrap_or_default();
            s.lock().unwrap().push(format!("{} as {user}", uri.path()));
            let path = uri.path().to_owned();
            let mine = all.get(&user).cloned().unwrap_or_default();
            let member = |room: &str, m: &str| {
                let m = match m { "untimelined_ban" => "ban", "stripped_invite" => "invite", m => m };
                json!({ "type": "m.room.member", "event_id": format!("${m}-{}", room.trim_start_matches('!').replace(':', "-")),
                        "sender": user, "state_key": user, "content": { "membership": m }, "origin_server_ts": 7 })
            };
            if path.ends_with("/joined_rooms") {
                return axum::Json(json!({ "joined_rooms": mine.iter().filter(|(_, m)| m == "join").map(|(r, _)| r).collect::<Vec<_>>() }));
            }
            if path.ends_with("/sync") {
                assert!(query.get("filter").is_some_and(|f| f.contains("include_leave")), "the catch-up asks for left rooms");
                let (mut invite, mut leave) = (serde_json::Map::new(), serde_json::Map::new());
                for (room, m) in &mine {
                    let name = json!({ "type": "m.room.name", "state_key": "", "sender": "@bob:litchi", "content": { "name": "a room" } });
                    match m.as_str() {
                        "invite" => { invite.insert(room.clone(), json!({ "invite_state": { "events": [name, member(room, m)] } })); }
                        "stripped_invite" => { invite.insert(room.clone(), json!({ "invite_state": { "events": [name, { "type": "m.room.member", "state_key": user, "sender": "@bob:litchi", "content": { "membership": "invite" } }] } })); }
                        "leave" | "ban" => { leave.insert(room.clone(), json!({ "timeline": { "events": [member(room, m)] } })); }
                        "untimelined_ban" => { leave.insert(room.clone(), json!({ "timeline": { "events": [] } })); }
                        _ => {}
                    }
                }
                return axum::Json(json!({ "next_batch": "s1", "rooms": { "join": {}, "invite": invite, "leave": leave } }));
            }
            let parts: Vec<String> = path.split('/').map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned()).collect();
            // /_matrix/client/v3/rooms/{room}/state/m.room.member/{user}
            let room = parts.get(5).cloned().unwrap_or_default();
            let m = mine.iter().find(|(r, _)| *r == room).map_or("leave".to_owned(), |(_, m)| m.clone());
            let mut ev = member(&room, &m);
            ev["room_id"] = json!(room);
            axum::Json(ev)
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, seen)
}

/// Link `accounts` as person `id` through the admin API.
async fn link(f: &Fedlink, id: &str, accounts: Value) {
    let r = reqwest::Client::new()
        .put(format!("{}/_fedlink/admin/v1/persons/{id}", f.admin_url))
        .bearer_auth(support::fedlink_proc::ADMIN_TOKEN)
        .json(&json!({ "accounts": accounts }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Given registrations on litchi and on kiwi (whose client API accepts connections and never
/// answers), when litchi pushes traffic of accounts nobody linked, then only memberships are
/// logged; when alice is linked later, her litchi account catches up on the rooms it had joined
/// (asked once, without waiting on kiwi), and linking someone else does not ask again.
#[tokio::test]
async fn sends_of_unlinked_accounts_are_not_logged_and_a_later_link_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let alice = vec![("!a:litchi", "join"), ("!b:litchi", "join"), ("!i:litchi", "invite"), ("!s:litchi", "stripped_invite"), ("!l:litchi", "leave"), ("!x:litchi", "untimelined_ban")];
    let (litchi_url, calls) = fake_joined_rooms_api(vec![("@alice:litchi", alice), ("@bob:litchi", vec![])]).await;
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_url = format!("http://{}", hanging.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = hanging.accept().await {
            held.push(c);
        }
    });
    let extra = format!(
        "{LOOPBACK}[[appservice]]\nserver_name = \"litchi\"\nclient_url = \"{litchi_url}\"\nas_token = \"litchi-as-token-0123456789\"\nhs_token = \"litchi-hs-token-0123456789\"\n\
         [[appservice]]\nserver_name = \"kiwi\"\nclient_url = \"{hanging_url}\"\nas_token = \"kiwi-as-token-0123456789\"\nhs_token = \"kiwi-hs-token-0123456789\"\n"
    );
    let f = Fedlink::start(dir.path(), 0, &extra).await;
    let before = f.log_len().await;
    let traffic = json!({ "events": [
        member("!c:litchi", "$c1", "@alice:litchi", "@alice:litchi", "join"),
        { "type": "m.room.message", "room_id": "!c:litchi", "event_id": "$c2", "sender": "@carol:litchi", "content": {}, "origin_server_ts": 5 },
    ], "ephemeral": [
        { "type": "m.receipt", "room_id": "!c:litchi", "content": { "$c2": { "m.read": { "@carol:litchi": { "ts": 1 } } } } },
    ] });
    assert_eq!(push(&f, "litchi-hs-token-0123456789", "t1", traffic).await.0, 200);
    assert_eq!(f.log_len().await, before + 1, "of unlinked accounts, only the membership is logged");
    assert_eq!(f.metric("fedlink_appservice_events_dropped_total{reason=\"not_linked\"}").await, 1.0);
    assert_eq!(f.metric("fedlink_appservice_events_dropped_total{reason=\"receipt_not_linked\"}").await, 1.0);
    // A profile change (join to join) changes no membership: not logged either.
    let profile = json!({ "events": [member("!c:litchi", "$c3", "@alice:litchi", "@alice:litchi", "join")] });
    assert_eq!(push(&f, "litchi-hs-token-0123456789", "t2", profile).await.0, 200);
    assert_eq!(f.log_len().await, before + 1);
    assert_eq!(f.metric("fedlink_appservice_events_dropped_total{reason=\"unchanged_membership\"}").await, 1.0);
    // History pushed late (Synapse pushes its history to its first registration): an invite
    // older than the join fedlink holds is not logged; a later leave is.
    let mut old_invite = member("!c:litchi", "$c0", "@bob:litchi", "@alice:litchi", "invite");
    old_invite["origin_server_ts"] = json!(0);
    let mut leave = member("!c:litchi", "$c4", "@alice:litchi", "@alice:litchi", "leave");
    leave["origin_server_ts"] = json!(2);
    assert_eq!(push(&f, "litchi-hs-token-0123456789", "t3", json!({ "events": [old_invite] })).await.0, 200);
    assert_eq!(f.log_len().await, before + 1);
    assert_eq!(f.metric("fedlink_appservice_events_dropped_total{reason=\"stale_membership\"}").await, 1.0);
    let mut rejoin = member("!c:litchi", "$c5", "@alice:litchi", "@alice:litchi", "join");
    rejoin["origin_server_ts"] = json!(3);
    assert_eq!(push(&f, "litchi-hs-token-0123456789", "t4", json!({ "events": [leave, rejoin] })).await.0, 200);
    assert_eq!(f.log_len().await, before + 3, "newer memberships are logged");

    let linked_at = std::time::Instant::now();
    link(&f, "alice", json!(["@alice:kiwi", "@alice:litchi"])).await;
    let rooms = wait_until("alice@litchi caught up on !a and !b, next to !c pushed before", T, || async {
        let p = f.admin("/_fedlink/admin/v1/persons/alice").await.1;
        let rooms: Vec<(String, String)> = p["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| Some((r["room_id"].as_str()?.to_owned(), r["accounts"]["@alice:litchi"]["membership"].as_str()?.to_owned())))
            .collect();
        Ok((rooms.len() >= 7).then_some(rooms))
    })
    .await
    .unwrap();
    assert!(linked_at.elapsed() < Duration::from_secs(8), "litchi's catch-up did not wait on kiwi's 10 s timeout: {:?}", linked_at.elapsed());
    let rooms: Vec<(&str, &str)> = rooms.iter().map(|(r, m)| (r.as_str(), m.as_str())).collect();
    assert_eq!(
        rooms,
        vec![("!a:litchi", "join"), ("!b:litchi", "join"), ("!c:litchi", "join"), ("!i:litchi", "invite"), ("!l:litchi", "leave"), ("!s:litchi", "invite"), ("!x:litchi", "ban")],
        "joins, the invites (with their event or as stripped state), the leave from the timeline, the ban asked for"
    );
    for (m, n) in [("join", 2.0), ("invite", 2.0), ("leave", 1.0), ("ban", 1.0)] {
        assert_eq!(f.metric(&format!("fedlink_catch_up_memberships_total{{membership=\"{m}\"}}")).await, n, "{m}");
    }
    let asked: Vec<String> = calls.lock().unwrap().iter().filter(|c| c.ends_with("as @alice:litchi") && c.contains("/state/")).cloned().collect();
    assert_eq!(asked.len(), 3, "the member event is asked for only where the lists did not carry it (!a, !b, !x): {asked:?}");

    // Linking bob makes the worker look again: bob is asked for, alice is not asked twice.
    link(&f, "bob", json!(["@bob:litchi", "@bob:mango"])).await;
    wait_until("bob asked for", T, || async {
        Ok(calls.lock().unwrap().iter().any(|c| c.ends_with("as @bob:litchi")).then_some(()))
    })
    .await
    .unwrap();
    let asked_for_alice = calls.lock().unwrap().iter().filter(|c| c.contains("/joined_rooms as @alice:litchi")).count();
    assert_eq!(asked_for_alice, 1);
    f.stop().await;

    // The catch-up is logged: after a restart, only a newly linked account is asked for.
    let f = Fedlink::start(dir.path(), 0, &extra).await;
    link(&f, "carol", json!(["@carol:litchi", "@carol:mango"])).await;
    wait_until("carol asked for", T, || async { Ok(calls.lock().unwrap().iter().any(|c| c.ends_with("as @carol:litchi")).then_some(())) }).await.unwrap();
    let asked = |who: &str| calls.lock().unwrap().iter().filter(|c| c.contains(&format!("/joined_rooms as {who}"))).count();
    assert_eq!((asked("@alice:litchi"), asked("@bob:litchi")), (1, 1), "caught up before the restart: not asked again");
    f.stop().await;
}
