//! In-process integration tests: fedlink against a fake peer that owns keys and signs
//! events. They cover the key server, X-Matrix checks, invite + join for room versions
//! 10/11/12, every rejection path of `/send`, retransmission, restart, and replay.

mod support;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use fedlink::{app::fold_views, keys::SigningKey, store::Store};
use ruma::RoomVersionId;
use serde_json::{json, Value};
use support::{enc, fake_peer::FakePeer, fedlink_proc::Fedlink, wait_until};

const LOOPBACK: &str = "[federation]\nverify_tls = false\n";

async fn wait_joined(f: &Fedlink, room: &str) -> Value {
    wait_until("bot joined", Duration::from_secs(20), || async {
        let (s, v) = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(room))).await;
        if s == 200 && v["bot_membership"] == "joined" {
            return Ok(Some(v));
        }
        Err(anyhow::anyhow!("room as the admin API shows it: {v}"))
    })
    .await
    .unwrap()
}

/// Open fedlink's database after it stopped, once sled's flusher thread (which may hold the
/// last reference for a moment after the stop) has released the file lock.
async fn open_store(path: &std::path::Path) -> Store {
    wait_until("the database lock released", Duration::from_secs(10), || async {
        match Store::open(path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.to_string().contains("could not acquire lock") => Ok(None),
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    })
    .await
    .unwrap()
}

/// A fedlink whose bot has joined a room hosted by the peer.
async fn joined(version: RoomVersionId) -> (tempfile::TempDir, Fedlink, FakePeer, String) {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    let room = peer.create_room("alice", version);
    let (s, _) = peer.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await;
    assert_eq!(s, StatusCode::OK);
    wait_joined(&f, &room).await;
    (dir, f, peer, room)
}

#[tokio::test]
async fn key_server_serves_a_self_signed_key_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let doc: Value = http.get(format!("{}/_matrix/key/v2/server", f.fed_url)).send().await.unwrap().json().await.unwrap();
    let keys = fedlink::keys::remote::parse_key_response(&f.name, doc.clone()).expect("self-signed key document");
    let key = SigningKey::load_or_create(&dir.path().join("signing.key")).unwrap();
    assert_eq!(keys[0].0, key.key_id());
    assert_eq!(keys[0].1.key, key.public_key_base64());
    let week_ms = 6 * 24 * 3600 * 1000;
    assert!(doc["valid_until_ts"].as_u64().unwrap() > support::fake_peer::now_ms() + week_ms);
    // The same document does not pass as another server's.
    assert!(fedlink::keys::remote::parse_key_response("localhost:1", doc).is_err());
    let v: Value = http.get(format!("{}/_matrix/federation/v1/version", f.fed_url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["server"]["name"], "fedlink");
}

#[tokio::test]
async fn requests_without_valid_x_matrix_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    let body = json!({ "origin": peer.name, "origin_server_ts": 1, "pdus": [], "edus": [] });
    let path = "/_matrix/federation/v1/send/t1";
    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();

    let r = http.put(format!("{}{path}", f.fed_url)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_UNAUTHORIZED");

    // Signed with a key that is not the origin's.
    let mallory = SigningKey::generate();
    let (s, v) = peer.request_as(&mallory, &peer.name, &f.name, &f.fed_url, Method::PUT, path, Some(&body)).await;
    assert_eq!((s.as_u16(), v["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{v}");

    // Addressed to another server.
    let (s, _) = peer.request("other.example", &f.fed_url, Method::PUT, path, Some(&body)).await;
    assert_eq!(s, 401);

    // Signature over a different body.
    let authz = fedlink::federation::auth::sign_request(&peer.key, &peer.name, &f.name, "PUT", path, None);
    let r = http.put(format!("{}{path}", f.fed_url)).header("Authorization", authz).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // Valid: accepted.
    let (s, _) = peer.request(&f.name, &f.fed_url, Method::PUT, path, Some(&body)).await;
    assert_eq!(s, 200);
    assert!(f.metric("fedlink_requests_rejected_total{reason=\"unknown_key\"}").await >= 1.0);
    assert!(f.metric("fedlink_requests_rejected_total{reason=\"bad_signature\"}").await >= 1.0);
    assert!(f.metric("fedlink_requests_rejected_total{reason=\"wrong_destination\"}").await >= 1.0);
    assert!(f.metric("fedlink_requests_rejected_total{reason=\"missing_auth\"}").await >= 1.0);
    f.stop().await;

    // Allow-list: a server not on it gets 403, even with a valid signature.
    let dir2 = tempfile::tempdir().unwrap();
    let f = Fedlink::start(dir2.path(), 0, "[federation]\nverify_tls = false\nallowed_servers = [\"kiwi.example\"]\n").await;
    let (s, v) = peer.request(&f.name, &f.fed_url, Method::PUT, path, Some(&body)).await;
    assert_eq!((s.as_u16(), v["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    assert_eq!(f.log_len().await, 0);
}

async fn invite_and_join(version: RoomVersionId) {
    let (_dir, f, peer, room) = joined(version.clone()).await;
    let v = wait_joined(&f, &room).await;
    assert_eq!(v["room_version"], version.as_str());
    let members: Vec<&str> = v["joined_members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert_eq!(members.len(), 2);
    assert!(members.contains(&peer.user("alice").as_str()) && members.contains(&f.bot().as_str()));
    // The join fedlink sent is signed by fedlink and was made through the inviter's server.
    {
        let st = peer.state.lock().unwrap();
        let join = &st.joins[0];
        assert_eq!(join["state_key"], f.bot());
        assert!(join["signatures"][&f.name].is_object());
        assert!(st.requests.iter().any(|(m, p)| m == "GET" && p.contains("/make_join/")));
        // The countersigned invite carries fedlink's signature.
        let invite = st.rooms[&room].events.values().find(|e| e["content"]["membership"] == "invite").unwrap();
        assert!(invite["signatures"][&f.name].is_object() && invite["signatures"][&peer.name].is_object());
    }
    let (_, rooms) = f.admin("/_fedlink/admin/v1/rooms").await;
    assert_eq!(rooms["rooms"][0]["joined_members"], 2);
    assert!(rooms["rooms"][0]["events"].as_u64().unwrap() >= 5);
}

#[tokio::test]
async fn invite_and_join_room_v10() {
    invite_and_join(RoomVersionId::V10).await;
}
#[tokio::test]
async fn invite_and_join_room_v11() {
    invite_and_join(RoomVersionId::V11).await;
}
#[tokio::test]
async fn invite_and_join_room_v12() {
    invite_and_join(RoomVersionId::V12).await;
}

#[tokio::test]
async fn bad_invites_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    let room = peer.create_room("alice", RoomVersionId::V11);
    // An invite for someone other than the bot.
    let (s, v) = peer.invite(&room, "alice", &format!("@someone:{}", f.name), &f.name, &f.fed_url).await;
    assert_eq!((s.as_u16(), v["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{v}");
    // An unsupported room version.
    let body = json!({ "room_version": "1", "event": {}, "invite_room_state": [] });
    let (s, v) = peer.request(&f.name, &f.fed_url, Method::PUT, "/_matrix/federation/v2/invite/!r:x/$e", Some(&body)).await;
    assert_eq!((s.as_u16(), v["errcode"].as_str(), v["room_version"].as_str()), (400, Some("M_INCOMPATIBLE_ROOM_VERSION"), Some("1")));
    assert_eq!(f.log_len().await, 0);
}

#[tokio::test]
async fn send_rejects_bad_pdus_and_edus_without_logging_them() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V12).await;
    let before = f.log_len().await;
    let msg = |body: &str| peer.build_detached(&room, &peer.user("alice"), "m.room.message", None, json!({ "msgtype": "m.text", "body": body }));

    // Too many PDUs / EDUs: the whole transaction is refused.
    let (_, one) = msg("x");
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "big1", vec![serde_json::to_value(&one).unwrap(); 51], vec![]).await;
    assert_eq!((s.as_u16(), v["errcode"].as_str()), (400, Some("M_BAD_JSON")));
    let (s, _) = peer.send_txn(&f.name, &f.fed_url, "big2", vec![], vec![json!({"edu_type": "m.typing", "content": {}}); 101]).await;
    assert_eq!(s, 400);

    // Signed under the sender server's key id, but with another key.
    let (_, mut forged) = msg("forged");
    forged.remove("signatures");
    forged.remove("hashes");
    let other_seed = SigningKey::generate().to_file_string();
    let seed = other_seed.split(' ').nth(2).unwrap();
    let mallory = SigningKey::parse(&format!("ed25519 {} {seed}", peer.key.version()), std::path::Path::new("-")).unwrap();
    let rules = RoomVersionId::V12.rules().unwrap();
    ruma::signatures::hash_and_sign_event(&peer.name, &mallory, &mut forged, &rules.redaction).unwrap();
    let forged_id = format!("${}", ruma::signatures::reference_hash(&forged, &rules).unwrap());

    // Sent by a user who is not in the room.
    let (unauth_id, unauth) = peer.build_detached(&room, &peer.user("mallory"), "m.room.message", None, json!({ "body": "hi" }));

    // Larger than 64 KiB (ruma refuses to sign it, so the size is checked before anything).
    let (_, mut huge) = msg("small");
    huge.insert("content".into(), ruma::canonical_json::to_canonical_value(json!({ "body": "x".repeat(70_000) })).unwrap());

    // For a room fedlink is not in.
    let other = peer.create_room("alice", RoomVersionId::V12);
    let (_, elsewhere) = peer.build_detached(&other, &peer.user("alice"), "m.room.message", None, json!({ "body": "?" }));

    // A receipt the peer may not send: for a user of another server.
    let receipt = json!({ "edu_type": "m.receipt", "content": { room.clone(): { "m.read": {
        "@alice:elsewhere.example": { "event_ids": [forged_id.clone()], "data": { "ts": 1 } } } } } });
    let typing_forged = json!({ "edu_type": "m.typing", "content": { "room_id": room, "user_id": "@bob:elsewhere.example", "typing": true } });

    let pdus: Vec<Value> = [forged, unauth, huge, elsewhere].iter().map(|p| serde_json::to_value(p).unwrap()).collect();
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "bad", pdus, vec![receipt, typing_forged]).await;
    assert_eq!(s, 200, "{v}");
    let err = |id: &str| v["pdus"][id]["error"].as_str().unwrap_or_default().to_owned();
    assert!(err(&forged_id).contains("signature"), "{v}");
    assert!(err(&unauth_id).contains("not authorised"), "{v}");
    assert_eq!(f.log_len().await, before, "nothing rejected reaches the log");
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["receipts"], json!({}));
    assert!(f.metric("fedlink_pdus_rejected_total{reason=\"signature\"}").await >= 1.0);
    assert!(f.metric("fedlink_pdus_rejected_total{reason=\"auth\"}").await >= 1.0);
    assert!(f.metric("fedlink_edus_received_total{edu_type=\"m.receipt\",result=\"rejected\"}").await >= 1.0);

    // A body over the limit is refused before parsing.
    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let r = http.put(format!("{}/_matrix/federation/v1/send/huge", f.fed_url)).body(vec![b' '; 9 * 1024 * 1024]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    // Malformed JSON body with a valid signature is impossible; an unsigned one is 401.
    assert_eq!(f.log_len().await, before);
}

#[tokio::test]
async fn messages_and_receipts_are_logged_once_even_when_retransmitted() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V11).await;
    let before = f.log_len().await;
    let (id, ev) = peer.push(&room, "alice", "m.room.message", None, json!({ "msgtype": "m.text", "body": "hello" }));
    let receipt = json!({ "edu_type": "m.receipt", "content": { room.clone(): { "m.read": {
        peer.user("alice"): { "event_ids": [id.clone()], "data": { "ts": 1234 } } } } } });
    let (s, first) = peer.send_txn(&f.name, &f.fed_url, "t-1", vec![ev.clone()], vec![receipt.clone()]).await;
    assert_eq!(s, 200);
    assert_eq!(first["pdus"][&id], json!({}));
    let after = f.log_len().await;
    assert_eq!(after, before + 2, "one PDU and one receipt");

    // Same transaction again: same answer, nothing new.
    let (s, again) = peer.send_txn(&f.name, &f.fed_url, "t-1", vec![ev.clone()], vec![receipt]).await;
    assert_eq!((s, &again), (StatusCode::OK, &first));
    // Same PDU in a new transaction: accepted, not logged twice.
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "t-2", vec![ev], vec![]).await;
    assert_eq!((s, &v["pdus"][&id]), (StatusCode::OK, &json!({})));
    assert_eq!(f.log_len().await, after);

    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["receipts"][peer.user("alice")]["event_id"], id);
    assert_eq!(r["forward_extremities"], json!([id]));
    assert!(f.metric("fedlink_transactions_total{result=\"retransmit\"}").await >= 1.0);
    assert!(f.metric("fedlink_pdus_received_total{result=\"duplicate\"}").await >= 1.0);
}

#[tokio::test]
async fn tampered_content_is_kept_redacted() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V12).await;
    let (id, mut ev) = peer.push(&room, "alice", "m.room.message", None, json!({ "body": "original" }));
    ev["content"]["body"] = json!("tampered");
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "tamper", vec![ev], vec![]).await;
    assert_eq!((s, &v["pdus"][&id]), (StatusCode::OK, &json!({})));
    f.stop().await;
    let store = open_store(&_dir.path().join("db")).await;
    let e = store.get_event(&id).unwrap().expect("stored");
    assert_eq!(e.pdu["content"], json!({}), "the content fails its hash, so only the redacted form is kept");
}

#[tokio::test]
async fn restart_resumes_a_pending_join_and_keeps_rooms_and_views() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    let room1 = peer.create_room("alice", RoomVersionId::V12);
    peer.invite(&room1, "alice", &f.bot(), &f.name, &f.fed_url).await;
    wait_joined(&f, &room1).await;
    let (id, ev) = peer.push(&room1, "alice", "m.room.message", None, json!({ "body": "before restart" }));
    assert_eq!(peer.send_txn(&f.name, &f.fed_url, "r1", vec![ev], vec![]).await.0, 200);

    // A second invite whose join cannot complete yet: the peer is failing make_join.
    peer.state.lock().unwrap().fail_make_join = Some(503);
    let room2 = peer.create_room("alice", RoomVersionId::V10);
    let (s, _) = peer.invite(&room2, "alice", &f.bot(), &f.name, &f.fed_url).await;
    assert_eq!(s, 200);
    wait_until("a failed join attempt", Duration::from_secs(20), || async {
        Ok((f.metric("fedlink_joins_total{result=\"transient_error\"}").await >= 1.0).then_some(()))
    })
    .await
    .unwrap();
    let (_, r2) = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room2))).await;
    assert_eq!(r2["bot_membership"], "invited");
    assert!(r2["join_attempts"]["last_error"].as_str().unwrap().contains("503"), "{r2}");
    let log_before = f.log_len().await;
    let port = f.fed_port;
    f.stop().await;

    peer.state.lock().unwrap().fail_make_join = None;
    let f = Fedlink::start(dir.path(), port, LOOPBACK).await;
    assert_eq!(f.log_len().await, log_before);
    let r1 = wait_joined(&f, &room1).await;
    assert_eq!(r1["forward_extremities"], json!([id]));
    wait_joined(&f, &room2).await;
    assert_eq!(peer.state.lock().unwrap().joins.len(), 2, "one join per room, none repeated");
    f.stop().await;

    // Replay from the log alone equals the views the running service kept.
    let store = open_store(&dir.path().join("db")).await;
    let kept = store.load_views().unwrap().expect("snapshot written at shutdown");
    let rebuilt = fold_views(&store, kept.bot_user_id.clone(), true).unwrap();
    assert_eq!(rebuilt, kept);
}

#[tokio::test]
async fn admin_api_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    let http = reqwest::Client::new();
    let r = http.get(format!("{}/_fedlink/admin/v1/rooms", f.admin_url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(format!("{}/_fedlink/admin/v1/rooms", f.admin_url)).bearer_auth("wrong-token-000000000").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(f.admin("/_fedlink/admin/v1/rooms").await, (200, json!({ "rooms": [] })));
    let (s, _) = f.admin("/_fedlink/admin/v1/rooms/!nope:x").await;
    assert_eq!(s, 404);
    let m = f.metrics().await;
    assert!(m.contains("fedlink_log_entries"));
    // Build and process metrics.
    assert!(m.contains(&format!("fedlink_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{m}");
    for series in ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_start_time_seconds"] {
        assert!(m.contains(series), "{series} missing");
    }
    // Health and readiness need no token and say nothing else.
    let r = http.get(format!("{}/health", f.admin_url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "status": "ok" }));
    let ready = wait_until("ready", Duration::from_secs(10), || async {
        let r = http.get(format!("{}/ready", f.admin_url)).send().await?;
        Ok((r.status() == 200).then_some(r))
    })
    .await
    .unwrap();
    assert_eq!(ready.json::<Value>().await.unwrap(), json!({ "ready": true }));
}

#[tokio::test]
async fn a_gap_before_a_received_event_is_filled_from_the_origin() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V12).await;
    let (m1, _) = peer.push(&room, "alice", "m.room.message", None, json!({ "body": "one" }));
    let (m2, _) = peer.push(&room, "alice", "m.room.message", None, json!({ "body": "two" }));
    let (m3, ev3) = peer.push(&room, "alice", "m.room.message", None, json!({ "body": "three" }));
    // Only the latest event arrives (as Synapse does when catching up a destination).
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "gap", vec![ev3], vec![]).await;
    assert_eq!(s, 200);
    assert_eq!(v["pdus"].as_object().unwrap().keys().collect::<Vec<_>>(), vec![&m3], "only the sent PDU is answered for");
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["forward_extremities"], json!([m3]), "the fetched events are not extremities");
    assert!(peer.state.lock().unwrap().requests.iter().any(|(m, p)| m == "POST" && p.contains("/get_missing_events/")));
    f.stop().await;
    let store = open_store(&_dir.path().join("db")).await;
    for id in [&m1, &m2, &m3] {
        assert!(store.has_event(id).unwrap(), "{id} is in the log");
    }
}

/// A gap longer than `get_missing_events` fills (5 rounds of 20), with a member's join in
/// it: fedlink fetches the state at the gap (`/state_ids`, then `/event` for what it
/// lacks), so the member is joined in its view, their later message is accepted, and the
/// room is linear again (one extremity).
#[tokio::test]
async fn a_gap_longer_than_get_missing_events_fills_is_closed_with_the_state_at_the_gap() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V11).await;
    peer.state.lock().unwrap().rooms.get_mut(&room).unwrap().state_at = Some(Default::default());
    let carol = peer.user("carol");
    peer.push(&room, "alice", "m.room.member", Some(&carol), json!({ "membership": "invite" }));
    let (join_id, _) = peer.push(&room, "carol", "m.room.member", Some(&carol), json!({ "membership": "join" }));
    for i in 0..150 {
        peer.push(&room, "alice", "m.room.message", None, json!({ "body": format!("while fedlink looked away {i}") }));
    }
    let (last, ev) = peer.push(&room, "carol", "m.room.message", None, json!({ "body": "hello from carol" }));
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "long-gap", vec![ev], vec![]).await;
    assert_eq!(s, 200);
    assert_eq!(v["pdus"][&last], json!({}), "carol's message is accepted: {v}");
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["members"][&carol], "join", "{}", r["members"]);
    assert_eq!(r["state"]["m.room.member"][&carol], json!(join_id));
    assert_eq!(r["forward_extremities"], json!([last]), "the gap is closed: one extremity");
    let reqs = peer.state.lock().unwrap().requests.clone();
    assert!(reqs.iter().any(|(m, p)| m == "GET" && p.contains("/state_ids/")), "{reqs:?}");
    assert!(reqs.iter().any(|(m, p)| m == "GET" && p.contains(&format!("/event/{}", enc(&join_id)))), "carol's join was fetched");
    // The room goes on linearly: the next messages are accepted (no resolution per event).
    let next: Vec<Value> = (0..3).map(|i| peer.push(&room, "carol", "m.room.message", None, json!({ "body": format!("after {i}") })).1).collect();
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "after-gap", next, vec![]).await;
    assert_eq!(s, 200);
    assert!(v["pdus"].as_object().unwrap().values().all(|r| r == &json!({})), "{v}");
    f.stop().await;
}

/// A resident whose `/state_ids` slips in an event of another room (here the other room's
/// power levels) does not get its state used: nothing of it is stored, the events after the
/// gap are checked against the room's own state (carol, who joined in the gap, is not a
/// member there, so her message is refused), and the refusal is counted.
#[tokio::test]
async fn state_at_a_gap_with_an_event_of_another_room_is_not_used() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V11).await;
    let other = peer.create_room("alice", RoomVersionId::V11);
    let (s, v) = peer.invite(&other, "alice", &f.bot(), &f.name, &f.fed_url).await;
    assert_eq!(s, 200, "{v}");
    wait_joined(&f, &other).await;
    let foreign = peer.state.lock().unwrap().rooms[&other].state[&("m.room.power_levels".to_owned(), String::new())].clone();
    peer.state.lock().unwrap().state_ids_extra = vec![foreign];
    peer.state.lock().unwrap().rooms.get_mut(&room).unwrap().state_at = Some(Default::default());
    let carol = peer.user("carol");
    peer.push(&room, "alice", "m.room.member", Some(&carol), json!({ "membership": "invite" }));
    peer.push(&room, "carol", "m.room.member", Some(&carol), json!({ "membership": "join" }));
    for i in 0..150 {
        peer.push(&room, "alice", "m.room.message", None, json!({ "body": format!("m{i}") }));
    }
    let (last, ev) = peer.push(&room, "carol", "m.room.message", None, json!({ "body": "hi" }));
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "lying-gap", vec![ev], vec![]).await;
    assert_eq!(s, 200);
    assert!(v["pdus"][&last]["error"].is_string(), "carol's message is checked against the room's own state: {v}");
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_ne!(r["members"][&carol], "join");
    assert!(f.metric("fedlink_gap_fills_total{result=\"state_refused\"}").await >= 1.0);
    f.stop().await;
}

/// An event fedlink stored as an outlier (the auth chain of a join, say) becomes a timeline
/// event when it later arrives over `/send`, instead of being answered as already known.
#[tokio::test]
async fn an_outlier_that_arrives_over_send_joins_the_timeline() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V11).await;
    peer.state.lock().unwrap().rooms.get_mut(&room).unwrap().state_at = Some(Default::default());
    let carol = peer.user("carol");
    let (inv_id, inv) = peer.push(&room, "alice", "m.room.member", Some(&carol), json!({ "membership": "invite" }));
    peer.push(&room, "carol", "m.room.member", Some(&carol), json!({ "membership": "join" }));
    for i in 0..150 {
        peer.push(&room, "alice", "m.room.message", None, json!({ "body": format!("m{i}") }));
    }
    let (_, ev) = peer.push(&room, "carol", "m.room.message", None, json!({ "body": "hi" }));
    assert_eq!(peer.send_txn(&f.name, &f.fed_url, "gap", vec![ev], vec![]).await.0, 200);
    let before = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1["events"].as_u64().unwrap();
    // The invite was fetched for the state at the gap: an outlier. Now it arrives for real.
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "late", vec![inv], vec![]).await;
    assert_eq!(s, 200);
    assert_eq!(v["pdus"][&inv_id], json!({}), "{v}");
    let after = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1["events"].as_u64().unwrap();
    assert_eq!(after, before + 1, "the late event was applied, not answered as known");
    f.stop().await;
    let store = open_store(&_dir.path().join("db")).await;
    assert!(store.has_timeline_event(&inv_id).unwrap());
}

#[tokio::test]
async fn fedlink_serves_make_join_and_send_join_and_forwards_the_join() {
    let (_dir, f, kiwi, room) = joined(RoomVersionId::V11).await;
    let litchi = FakePeer::start().await;
    // Not invited: refused.
    let (s, v) = litchi.join_via(&room, "carol", &RoomVersionId::V11, &f.name, &f.fed_url).await;
    assert_eq!((s.as_u16(), v["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{v}");
    // Invited by alice on kiwi (the event reaches fedlink over /send).
    let (_, inv) = kiwi.push(&room, "alice", "m.room.member", Some(&litchi.user("carol")), json!({ "membership": "invite" }));
    assert_eq!(kiwi.send_txn(&f.name, &f.fed_url, "inv", vec![inv], vec![]).await.0, 200);
    let (s, v) = litchi.join_via(&room, "carol", &RoomVersionId::V11, &f.name, &f.fed_url).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["members_omitted"], false);
    let state_types: Vec<&str> = v["state"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(state_types.contains(&"m.room.create") && state_types.contains(&"m.room.power_levels"), "{state_types:?}");
    assert!(!v["auth_chain"].as_array().unwrap().is_empty());
    let join_id = {
        let rules = RoomVersionId::V11.rules().unwrap();
        format!("${}", ruma::signatures::reference_hash(&fedlink::core::pdu::canonical_object(v["event"].clone()).unwrap(), &rules).unwrap())
    };
    // The join is in fedlink's view and forwarded to kiwi.
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["members"][litchi.user("carol")], "join");
    wait_until("the join forwarded to kiwi", Duration::from_secs(20), || async {
        Ok(kiwi.received_pdu_ids(&RoomVersionId::V11).contains(&join_id).then_some(()))
    })
    .await
    .unwrap();
    // A server that is not in the room cannot read events.
    let mango = FakePeer::start().await;
    let (s, _) = mango.request(&f.name, &f.fed_url, Method::GET, &format!("/_matrix/federation/v1/event/{}", enc(&join_id)), None).await;
    assert_eq!(s, 403);
    let (s, v) = litchi.request(&f.name, &f.fed_url, Method::GET, &format!("/_matrix/federation/v1/event/{}", enc(&join_id)), None).await;
    assert_eq!((s.as_u16(), v["pdus"].as_array().map(|a| a.len())), (200, Some(1)));
    // The gap-filling endpoints answer for the events fedlink holds.
    let get = |path: String| {
        let litchi = &litchi;
        let (name, url) = (f.name.clone(), f.fed_url.clone());
        async move { litchi.request(&name, &url, Method::GET, &path, None).await }
    };
    let (s, v) = get(format!("/_matrix/federation/v1/event_auth/{}/{}", enc(&room), enc(&join_id))).await;
    assert_eq!(s, 200);
    let chain_types: Vec<&str> = v["auth_chain"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(chain_types.contains(&"m.room.create") && chain_types.contains(&"m.room.power_levels"), "{chain_types:?}");
    let (s, v) = get(format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room), enc(&join_id))).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["pdu_ids"].as_array().unwrap().len() >= 5, "{v}");
    assert!(!v["pdu_ids"].as_array().unwrap().iter().any(|e| e == join_id.as_str()), "state before the join");
    let (s, v) = get(format!("/_matrix/federation/v1/backfill/{}?v={}&limit=3", enc(&room), enc(&join_id))).await;
    assert_eq!((s.as_u16(), v["pdus"].as_array().map(|a| a.len())), (200, Some(3)), "{v}");
    let body = json!({ "limit": 5, "min_depth": 0, "earliest_events": [], "latest_events": [join_id] });
    let (s, v) = litchi.request(&f.name, &f.fed_url, Method::POST, &format!("/_matrix/federation/v1/get_missing_events/{}", enc(&room)), Some(&body)).await;
    assert_eq!(s, 200);
    let missing = v["events"].as_array().unwrap();
    assert!(!missing.is_empty() && missing.len() <= 5, "{v}");
    let depths: Vec<u64> = missing.iter().map(|e| e["depth"].as_u64().unwrap()).collect();
    assert!(depths.windows(2).all(|w| w[0] <= w[1]), "oldest first: {depths:?}");
    // Another room's event is not served through this room.
    let (s, _) = get(format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc("!other:x"), enc(&join_id))).await;
    assert_eq!(s, 404);
    // Wrong room version offered: incompatible.
    let path = format!("/_matrix/federation/v1/make_join/{}/{}?ver=1", enc(&room), enc(&mango.user("x")));
    let (s, v) = mango.request(&f.name, &f.fed_url, Method::GET, &path, None).await;
    assert_eq!((s.as_u16(), v["errcode"].as_str()), (400, Some("M_INCOMPATIBLE_ROOM_VERSION")));
}

/// A linked account on a second server: the bot invites it, the invite survives a
/// failing target, a failing resident and a restart in the middle, and arrives exactly once.
#[tokio::test]
async fn linked_invite_is_retried_survives_restart_and_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let kiwi = FakePeer::start().await;
    let litchi = FakePeer::start().await;
    litchi.state.lock().unwrap().fail_invite = Some(503);
    kiwi.state.lock().unwrap().fail_send = Some(502);
    let extra = format!(
        "{LOOPBACK}[[directory.person]]\nid = \"alice\"\naccounts = [\"{}\", \"{}\"]\n",
        kiwi.user("alice"),
        litchi.user("alice")
    );
    let f = Fedlink::start(dir.path(), 0, &extra).await;
    let room = kiwi.create_room("alice", RoomVersionId::V12);
    kiwi.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await;
    wait_joined(&f, &room).await;
    wait_until("a failed invite delivery", Duration::from_secs(20), || async {
        Ok((f.metric("fedlink_invites_sent_total{result=\"transient_error\"}").await >= 1.0).then_some(()))
    })
    .await
    .unwrap();
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    let pending = r["pending_invites"][litchi.user("alice")].as_str().expect("invite pending").to_owned();
    let port = f.fed_port;
    f.stop().await;

    // Back up: litchi accepts invites; kiwi still fails transactions.
    litchi.state.lock().unwrap().fail_invite = None;
    let f = Fedlink::start(dir.path(), port, &extra).await;
    wait_until("the invite delivered", Duration::from_secs(20), || async {
        let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
        Ok((r["members"][litchi.user("alice")] == "invite").then_some(()))
    })
    .await
    .unwrap();
    let rules = RoomVersionId::V12.rules().unwrap();
    let invites: Vec<String> = litchi
        .state
        .lock()
        .unwrap()
        .invites
        .iter()
        .map(|e| format!("${}", ruma::signatures::reference_hash(&fedlink::core::pdu::canonical_object(e.clone()).unwrap(), &rules).unwrap()))
        .collect();
    assert_eq!(invites, vec![pending.clone()], "litchi got the invite built before the restart, once");
    // The invite waits for kiwi in the outbox, visibly.
    wait_until("outbox retrying kiwi", Duration::from_secs(20), || async {
        let d = f.admin("/_fedlink/admin/v1/destinations").await.1;
        let k = d["destinations"].as_array().unwrap().iter().find(|x| x["destination"] == kiwi.name.as_str()).cloned();
        Ok(k.filter(|k| k["queue_depth"] == 1 && k["failures"].as_u64() >= Some(1)).map(|_| ()))
    })
    .await
    .unwrap();
    kiwi.state.lock().unwrap().fail_send = None;
    wait_until("the invite reaches kiwi", Duration::from_secs(30), || async {
        Ok(kiwi.received_pdu_ids(&RoomVersionId::V12).contains(&pending).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(kiwi.received_pdu_ids(&RoomVersionId::V12).iter().filter(|i| **i == pending).count(), 1, "delivered once");
    let p = f.admin("/_fedlink/admin/v1/persons/alice").await.1;
    assert_eq!(p["accounts"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn admin_directory_api_refuses_conflicts_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    let http = reqwest::Client::new();
    let put = |id: &str, body: Value| {
        let req = http.put(format!("{}/_fedlink/admin/v1/persons/{id}", f.admin_url)).bearer_auth(support::fedlink_proc::ADMIN_TOKEN).json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(put("alice", json!({ "accounts": ["@alice:kiwi", "@alice:litchi"] })).await.0, 200);
    let before = f.log_len().await;
    let (s, v) = put("other", json!({ "accounts": ["@alice:kiwi", "@x:kiwi"] })).await;
    assert_eq!((s, v["errcode"].as_str()), (409, Some("M_CONFLICT")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("alice"));
    let (s, _) = put("bad", json!({ "accounts": ["not-a-user", "@x:kiwi"] })).await;
    assert_eq!(s, 400);
    let (s, _) = put("bad", json!({ "nope": 1 })).await;
    assert_eq!(s, 400);
    assert_eq!(f.log_len().await, before, "refused changes leave no trace");
    assert_eq!(f.admin("/_fedlink/admin/v1/persons").await.1["persons"][0]["id"], "alice");
    let r = http.delete(format!("{}/_fedlink/admin/v1/persons/alice", f.admin_url)).bearer_auth(support::fedlink_proc::ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(f.admin("/_fedlink/admin/v1/persons/alice").await.0, 404);
    assert_eq!(put("other", json!({ "accounts": ["@alice:kiwi", "@x:kiwi"] })).await.0, 200, "free again after unlinking");
}

#[tokio::test]
async fn peers_cannot_point_fedlink_at_internal_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fedlink::start_with_env(dir.path(), 0, LOOPBACK, &[]).await;
    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    for origin in ["127.0.0.1:1", "localhost:1", "[::1]:1", "10.0.0.1:8448"] {
        let r = http
            .put(format!("{}/_matrix/federation/v1/send/x", f.fed_url))
            .header("Authorization", format!("X-Matrix origin=\"{origin}\",key=\"ed25519:x\",sig=\"AAAA\""))
            .json(&json!({ "pdus": [] }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{origin}");
        let text = r.text().await.unwrap();
        for leak in ["refused", "tcp", "connect", "error trying"] {
            assert!(!text.to_lowercase().contains(leak), "{origin}: the answer reveals network details: {text}");
        }
    }
    assert!(f.metric("fedlink_outbound_requests_total{result=\"blocked\"}").await >= 2.0, "IP literals are refused before connecting");
    assert!(f.metric("fedlink_outbound_requests_total{result=\"ok\"}").await == 0.0);
}

#[tokio::test]
async fn missing_auth_events_are_fetched_from_the_origin() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V11).await;
    let bot_join = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1["forward_extremities"][0].as_str().unwrap().to_owned();
    // carol is invited and joins on the peer; fedlink never hears of it.
    let carol = peer.user("carol");
    let (inv, _) = peer.push(&room, "alice", "m.room.member", Some(&carol), json!({ "membership": "invite" }));
    let (join, _) = peer.push(&room, "carol", "m.room.member", Some(&carol), json!({ "membership": "join" }));
    // carol's message, on top of what fedlink knows, authorised by her unseen join.
    let msg = {
        let mut st = peer.state.lock().unwrap();
        let r = st.rooms.get_mut(&room).unwrap();
        let mut t = r.template(&carol, "m.room.message", None, json!({ "body": "hello from carol" }));
        t.insert("prev_events".into(), ruma::canonical_json::to_canonical_value(json!([bot_join])).unwrap());
        let (id, ev) = support::fake_peer::FakeRoom::sign(&r.version, &peer.name, &peer.key, t);
        r.add(&id, ev.clone());
        (id, ev)
    };
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "auth", vec![msg.1], vec![]).await;
    assert_eq!(s, StatusCode::OK);
    // Authorised by its (fetched) auth events, but carol is not in the state before the
    // message (her join is not among its ancestors): rejected, as the spec says.
    assert!(v["pdus"][&msg.0]["error"].as_str().unwrap().contains("state before the event"), "{v}");
    assert!(peer.state.lock().unwrap().requests.iter().any(|(_, p)| p.contains("/event_auth/")));
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["forward_extremities"], json!([bot_join]), "the message does not change the view");
    f.stop().await;
    let store = open_store(&_dir.path().join("db")).await;
    use fedlink::core::log_entry::PduStatus;
    for id in [&inv, &join] {
        assert_eq!(store.get_event(id).unwrap().expect("fetched").status, PduStatus::Outlier);
    }
    assert!(store.get_event(&msg.0).unwrap().is_none(), "rejected events are not logged");
}

/// Two concurrent topic changes fork the room; whichever order they arrive in, fedlink's
/// current state is the same (state resolution v2), and a merge event sees that state.
#[tokio::test]
async fn forks_resolve_to_the_same_state_whatever_the_arrival_order() {
    for version in [RoomVersionId::V11, RoomVersionId::V12] {
        let peer = FakePeer::start().await;
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let f1 = Fedlink::start(d1.path(), 0, LOOPBACK).await;
        let f2 = Fedlink::start(d2.path(), 0, LOOPBACK).await;
        let room = peer.create_room("alice", version.clone());
        for f in [&f1, &f2] {
            peer.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await;
            wait_joined(f, &room).await;
        }
        // f1 learns of f2's join, so both hold the same DAG.
        let f2_join = {
            let st = peer.state.lock().unwrap();
            let r = &st.rooms[&room];
            r.events[r.extremities.iter().next().unwrap()].clone()
        };
        assert_eq!(peer.send_txn(&f1.name, &f1.fed_url, "0", vec![f2_join], vec![]).await.0, 200);
        let alice = peer.user("alice");
        let (a_id, a) = peer.build_detached(&room, &alice, "m.room.topic", Some(""), json!({ "topic": "A" }));
        let (b_id, b) = peer.build_detached(&room, &alice, "m.room.topic", Some(""), json!({ "topic": "B" }));
        let (a, b) = (serde_json::to_value(&a).unwrap(), serde_json::to_value(&b).unwrap());
        assert_eq!(peer.send_txn(&f1.name, &f1.fed_url, "1", vec![a.clone()], vec![]).await.0, 200);
        assert_eq!(peer.send_txn(&f1.name, &f1.fed_url, "2", vec![b.clone()], vec![]).await.0, 200);
        assert_eq!(peer.send_txn(&f2.name, &f2.fed_url, "1", vec![b], vec![]).await.0, 200);
        assert_eq!(peer.send_txn(&f2.name, &f2.fed_url, "2", vec![a], vec![]).await.0, 200);
        let room_path = format!("/_fedlink/admin/v1/rooms/{}", enc(&room));
        let (v1, v2) = (f1.admin(&room_path).await.1, f2.admin(&room_path).await.1);
        let topic1 = v1["state"]["m.room.topic"][""].as_str().unwrap().to_owned();
        assert_eq!(topic1, v2["state"]["m.room.topic"][""].as_str().unwrap(), "{version}: same resolved state\n{v1}\n{v2}\nA={a_id} B={b_id}");
        assert!(topic1 == a_id || topic1 == b_id);
        assert_eq!(v1["forward_extremities"].as_array().unwrap().len(), 2);
        assert_eq!(v1["state"], v2["state"], "{version}");
    }
}

/// A tiny HTTP directory in the earlier Synapse module's format: `GET /links/<mxid>`.
/// Linked pairs the test directory answers with (`None`: it fails).
type Links = std::sync::Arc<std::sync::Mutex<Option<Vec<(String, String)>>>>;

async fn directory_server(links: Links) -> String {
    use axum::{extract::Path as P, routing::get, Json, Router};
    let app = Router::new().route(
        "/links/{mxid}",
        get(move |P(mxid): P<String>| {
            let links = links.clone();
            async move {
                match &*links.lock().unwrap() {
                    None => Err(StatusCode::INTERNAL_SERVER_ERROR),
                    Some(pairs) => Ok(Json(
                        pairs
                            .iter()
                            .filter_map(|(a, b)| if *a == mxid { Some(b.clone()) } else if *b == mxid { Some(a.clone()) } else { None })
                            .collect::<Vec<_>>(),
                    )),
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/links/", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    url
}

#[tokio::test]
async fn http_directory_links_accounts_and_its_failures_unlink_nobody() {
    let kiwi = FakePeer::start().await;
    let litchi = FakePeer::start().await;
    let links = std::sync::Arc::new(std::sync::Mutex::new(Some(vec![(kiwi.user("alice"), litchi.user("alice"))])));
    let url = directory_server(links.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let f = Fedlink::start(dir.path(), 0, &format!("{LOOPBACK}[directory]\nurl = \"{url}\"\nttl_secs = 1\n")).await;
    let room = kiwi.create_room("alice", RoomVersionId::V12);
    kiwi.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await;
    wait_joined(&f, &room).await;
    // The directory links alice@kiwi (seen in the room) to alice@litchi, who gets invited.
    wait_until("alice@litchi invited through the directory link", Duration::from_secs(30), || async {
        Ok((!litchi.state.lock().unwrap().invites.is_empty()).then_some(()))
    })
    .await
    .unwrap();
    let persons = f.admin("/_fedlink/admin/v1/persons").await.1;
    assert_eq!(persons["persons"][0]["source"], "http", "{persons}");
    // The directory fails: lookups are counted as errors and nobody is unlinked.
    *links.lock().unwrap() = None;
    wait_until("a failed directory lookup", Duration::from_secs(30), || async {
        Ok((f.metric("fedlink_directory_lookups_total{result=\"error\"}").await >= 1.0).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(f.admin("/_fedlink/admin/v1/persons").await.1, persons);
}

#[tokio::test]
async fn missing_power_is_visible_and_not_retried_in_a_loop() {
    let kiwi = FakePeer::start().await;
    let litchi = FakePeer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{LOOPBACK}[[directory.person]]\nid = \"alice\"\naccounts = [\"{}\", \"{}\"]\n", kiwi.user("alice"), litchi.user("alice"));
    let f = Fedlink::start(dir.path(), 0, &extra).await;
    let room = kiwi.create_room("alice", RoomVersionId::V11);
    // Inviting needs power 50 in this room; the bot has 0.
    let users = json!({ kiwi.user("alice"): 100 });
    kiwi.push(&room, "alice", "m.room.power_levels", Some(""), json!({ "users": users, "invite": 50, "state_default": 50, "ban": 50, "kick": 50, "redact": 50 }));
    kiwi.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await;
    let r = wait_joined(&f, &room).await;
    let _ = r;
    let path = format!("/_fedlink/admin/v1/rooms/{}", enc(&room));
    let failure = wait_until("missing power recorded", Duration::from_secs(20), || async {
        let r = f.admin(&path).await.1;
        Ok(r["failed_invites"].get(litchi.user("alice")).cloned().filter(|v| !v.is_null()))
    })
    .await
    .unwrap();
    assert!(failure["reason"].as_str().unwrap().contains("needs 50"), "{failure}");
    assert_eq!(f.metric("fedlink_invites_sent_total{result=\"missing_power\"}").await, 1.0);
    // More traffic in the room does not bring the attempt back.
    let (_, m) = kiwi.push(&room, "alice", "m.room.message", None, json!({ "body": "hi" }));
    assert_eq!(kiwi.send_txn(&f.name, &f.fed_url, "m", vec![m], vec![]).await.0, 200);
    assert_eq!(f.metric("fedlink_invites_sent_total{result=\"missing_power\"}").await, 1.0);
    assert!(litchi.state.lock().unwrap().invites.is_empty());
    // Power granted: the invite goes out.
    let users = json!({ kiwi.user("alice"): 100, f.bot(): 50 });
    let (_, pl) = kiwi.push(&room, "alice", "m.room.power_levels", Some(""), json!({ "users": users, "invite": 50, "state_default": 50, "ban": 50, "kick": 50, "redact": 50 }));
    assert_eq!(kiwi.send_txn(&f.name, &f.fed_url, "pl", vec![pl], vec![]).await.0, 200);
    wait_until("the invite after the power change", Duration::from_secs(20), || async {
        Ok((!litchi.state.lock().unwrap().invites.is_empty()).then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_room_server_acl_is_enforced_on_inbound_events() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V11).await;
    let (_, acl) = peer.push(&room, "alice", "m.room.server_acl", Some(""), json!({ "allow": ["other.example"], "deny": [], "allow_ip_literals": false }));
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "acl", vec![acl], vec![]).await;
    assert_eq!(s, 200, "{v}");
    let before = f.log_len().await;
    let (id, msg) = peer.push(&room, "alice", "m.room.message", None, json!({ "body": "after the ACL" }));
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "after", vec![msg], vec![]).await;
    assert_eq!(s, 200);
    assert!(v["pdus"][&id]["error"].as_str().unwrap().contains("ACL"), "{v}");
    assert_eq!(f.log_len().await, before);
}

/// The bot's join is signed and logged before `send_join`: when the resident fails and
/// fedlink restarts in the middle, the same join is sent again, and the room gets one join.
#[tokio::test]
async fn a_join_interrupted_by_failures_and_a_restart_is_sent_again_not_remade() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    peer.state.lock().unwrap().fail_send_join = Some(503);
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    let room = peer.create_room("alice", RoomVersionId::V12);
    peer.invite(&room, "alice", &f.bot(), &f.name, &f.fed_url).await;
    wait_until("a failed send_join", Duration::from_secs(20), || async {
        Ok((!peer.state.lock().unwrap().joins.is_empty()).then_some(()))
    })
    .await
    .unwrap();
    let port = f.fed_port;
    f.stop().await;
    peer.state.lock().unwrap().fail_send_join = None;
    let f = Fedlink::start(dir.path(), port, LOOPBACK).await;
    wait_joined(&f, &room).await;
    let rules = RoomVersionId::V12.rules().unwrap();
    let st = peer.state.lock().unwrap();
    let ids: std::collections::BTreeSet<String> = st
        .joins
        .iter()
        .map(|e| format!("${}", ruma::signatures::reference_hash(&fedlink::core::pdu::canonical_object(e.clone()).unwrap(), &rules).unwrap()))
        .collect();
    assert!(st.joins.len() >= 2, "sent at least twice");
    assert_eq!(ids.len(), 1, "always the same join event: {ids:?}");
    let make_joins = st.requests.iter().filter(|(m, p)| m == "GET" && p.contains("/make_join/")).count();
    assert_eq!(make_joins, 1, "the template was asked for once");
}

/// A transaction large enough for its signatures to be checked on several threads while its
/// events are admitted: each result belongs to its own event (a tampered message is kept
/// redacted; a forged fork in the middle, which no other event names, and a forged last
/// event are refused, with nothing fetched), and every other event is stored as sent.
#[tokio::test]
async fn signatures_checked_in_parallel_answer_for_the_right_events() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V12).await;
    let message = |i: usize| peer.push(&room, "alice", "m.room.message", None, json!({ "body": format!("message {i}") }));
    let mut pdus: Vec<(String, Value)> = (0..12).map(message).collect();
    // A fork off the 12th message, as deep as the 13th, which does not name it.
    let (fork, obj) = peer.build_detached(&room, &peer.user("alice"), "m.room.message", None, json!({ "body": "a fork" }));
    pdus.push((fork, serde_json::to_value(&obj).unwrap()));
    pdus.extend((12..24).map(message));
    let forge = |ev: &mut Value| {
        for v in ev["signatures"].as_object_mut().unwrap().values_mut().next().unwrap().as_object_mut().unwrap().values_mut() {
            *v = json!("AAAA".repeat(21) + "AA");
        }
    };
    forge(&mut pdus[12].1);
    forge(&mut pdus[24].1);
    pdus[14].1["content"]["body"] = json!("tampered");
    let refused = [12, 24];
    let before = peer.state.lock().unwrap().requests.len();
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "parallel", pdus.iter().map(|(_, e)| e.clone()).collect(), vec![]).await;
    assert_eq!(s, StatusCode::OK);
    for (i, (id, _)) in pdus.iter().enumerate() {
        if refused.contains(&i) {
            assert!(v["pdus"][id]["error"].as_str().is_some_and(|e| e.contains("ignature")), "the forged event {i} is refused: {v}");
        } else {
            assert_eq!(v["pdus"][id], json!({}), "event {i}: {v}");
        }
    }
    // Nothing names the forged events: nothing was fetched (a fetch would have happened
    // before the answer), and the lock was held throughout (no refill).
    let fetches: Vec<(String, String)> = peer.state.lock().unwrap().requests[before..].iter().filter(|(_, p)| p.contains("/get_missing_events/") || p.contains("/event") || p.contains("/state_ids/")).cloned().collect();
    assert!(fetches.is_empty(), "nothing fetched: {fetches:?}");
    // On one core there is no thread to share the checks with: admitted after them.
    let overlapped = if std::thread::available_parallelism().map_or(1, |c| c.get()) > 1 { 1.0 } else { 0.0 };
    assert_eq!(f.metric("fedlink_ingest_phase_duration_seconds_count{phase=\"checks_here\"}").await, overlapped, "admitted as checked");
    // Every check counted once, by whoever did it (how the work splits depends on the
    // scheduler; `fedlink-load` reports it under load).
    let (pool, caller) = (f.metric("fedlink_signature_checks_total{by=\"pool\"}").await, f.metric("fedlink_signature_checks_total{by=\"caller\"}").await);
    assert_eq!(pool + caller, pdus.len() as f64, "pool {pool}, caller {caller}");
    assert_eq!(f.metric("fedlink_ingest_phase_duration_seconds_count{phase=\"refill\"}").await, 0.0);
    f.stop().await;
    let store = open_store(&_dir.path().join("db")).await;
    for (i, (id, _)) in pdus.iter().enumerate() {
        let stored = store.get_event(id).unwrap();
        if refused.contains(&i) {
            assert!(stored.is_none(), "the forged event {i} is not stored");
            continue;
        }
        let e = stored.unwrap_or_else(|| panic!("event {i} stored"));
        let expected = match i {
            14 => json!({}),
            0..=11 => json!({ "body": format!("message {i}") }),
            _ => json!({ "body": format!("message {}", i - 1) }),
        };
        assert_eq!(e.pdu["content"], expected, "event {i}");
    }
}

/// Two copies of one event in a transaction, the second with a bad signature (the signatures
/// are not part of the event's id): the event is stored and answered as such (the copies
/// make the transaction wait for all its checks before admitting), and nothing is fetched.
#[tokio::test]
async fn a_forged_copy_of_an_event_in_the_same_transaction_does_not_undo_its_answer() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V12).await;
    let mut pdus: Vec<(String, Value)> =
        (0..12).map(|i| peer.push(&room, "alice", "m.room.message", None, json!({ "body": format!("message {i}") }))).collect();
    let mut copy = pdus[4].clone();
    for v in copy.1["signatures"].as_object_mut().unwrap().values_mut().next().unwrap().as_object_mut().unwrap().values_mut() {
        *v = json!("AAAA".repeat(21) + "AA");
    }
    pdus.insert(5, copy);
    let before = peer.state.lock().unwrap().requests.len();
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "copies", pdus.iter().map(|(_, e)| e.clone()).collect(), vec![]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["pdus"].as_object().unwrap().len(), 12, "one answer per event: {v}");
    for (id, _) in &pdus {
        assert_eq!(v["pdus"][id], json!({}), "{id}: {v}");
    }
    let fetches: Vec<(String, String)> = peer.state.lock().unwrap().requests[before..].iter().filter(|(_, p)| p.contains("/get_missing_events/") || p.contains("/event")).cloned().collect();
    assert!(fetches.is_empty(), "nothing fetched: {fetches:?}");
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["forward_extremities"], json!([pdus[12].0]), "{r}");
}

/// In a transaction with nothing to fetch, events are admitted as their checks end. When an
/// event that a later one names as its parent fails its check, the later one has a gap after
/// all. What was admitted before it is written, and the gap is filled from the origin (which
/// serves the event properly signed) with the ingest lock let go: another transaction is
/// answered meanwhile. The forged copy is refused; every event is stored.
#[tokio::test]
async fn a_forged_parent_in_a_linear_transaction_is_fetched_for_its_child_without_the_lock() {
    let (_dir, f, peer, room) = joined(RoomVersionId::V12).await;
    let peer = std::sync::Arc::new(peer);
    let mut pdus: Vec<(String, Value)> =
        (0..30).map(|i| peer.push(&room, "alice", "m.room.message", None, json!({ "body": format!("message {i}") }))).collect();
    // The 26th is the 27th's parent; its copy in the transaction carries a bad signature.
    let forged = pdus[25].0.clone();
    let sigs = pdus[25].1["signatures"].as_object_mut().unwrap().values_mut().next().unwrap().as_object_mut().unwrap();
    for v in sigs.values_mut() {
        *v = json!("AAAA".repeat(21) + "AA");
    }
    let held = Duration::from_secs(8);
    peer.state.lock().unwrap().delay_missing_events = Some(held);
    let first = {
        let (peer, name, url) = (peer.clone(), f.name.clone(), f.fed_url.clone());
        let pdus: Vec<Value> = pdus.iter().map(|(_, e)| e.clone()).collect();
        tokio::spawn(async move { peer.send_txn(&name, &url, "forged-parent", pdus, vec![]).await })
    };
    wait_until("the gap fill request", Duration::from_secs(20), || async {
        Ok(peer.state.lock().unwrap().requests.iter().any(|(m, p)| m == "POST" && p.contains("/get_missing_events/")).then_some(()))
    })
    .await
    .unwrap();
    // The fill is held: a transaction that needs the ingest lock is still answered.
    let typing = json!({ "edu_type": "m.typing", "content": { "room_id": room, "user_id": peer.user("alice"), "typing": true } });
    let (s, _) = tokio::time::timeout(held / 2, peer.send_txn(&f.name, &f.fed_url, "meanwhile", vec![], vec![typing]))
        .await
        .expect("answered while the gap fill is held: the ingest lock was let go");
    assert_eq!(s, StatusCode::OK);
    assert!(!first.is_finished(), "the first transaction is still waiting on the fill");
    let (s, v) = first.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    for (i, (id, _)) in pdus.iter().enumerate() {
        if i == 25 {
            assert!(v["pdus"][id]["error"].as_str().is_some_and(|e| e.contains("ignature")), "the forged copy is refused: {v}");
        } else {
            assert_eq!(v["pdus"][id], json!({}), "event {i}: {v}");
        }
    }
    // One fill, from the events written before the forged one (had they not been, it would
    // have taken two rounds of 20 from the room's earlier tip).
    let bodies = peer.state.lock().unwrap().missing_events_bodies.clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(bodies[0]["earliest_events"], json!([pdus[24].0]), "{bodies:?}");
    assert_eq!(bodies[0]["latest_events"], json!([pdus[26].0]), "{bodies:?}");
    assert_eq!(f.metric("fedlink_ingest_phase_duration_seconds_count{phase=\"refill\"}").await, 1.0);
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["forward_extremities"], json!([pdus[29].0]), "{r}");
    f.stop().await;
    let store = open_store(&_dir.path().join("db")).await;
    for (i, (id, _)) in pdus.iter().enumerate() {
        let e = store.get_event(id).unwrap().unwrap_or_else(|| panic!("event {i} stored"));
        assert_eq!(e.pdu["content"], json!({ "body": format!("message {i}") }), "event {i}");
    }
    let fetched = store.get_event(&forged).unwrap().unwrap();
    assert_ne!(fetched.pdu["signatures"], pdus[25].1["signatures"], "the properly signed copy is stored, not the forged one");
}

/// Issue #9 over federation, with the bot in the room: a direct-chat invite makes the bot's
/// invite to the sibling a direct-chat invite, and a receipt EDU without a thread id on a
/// reply in a thread is a read of that thread, not of the main timeline.
#[tokio::test]
async fn direct_invites_stay_direct_and_receipts_on_thread_replies_read_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let kiwi = FakePeer::start().await;
    let litchi = FakePeer::start().await;
    let extra = format!("{LOOPBACK}[[directory.person]]\nid = \"alice\"\naccounts = [\"{}\", \"{}\"]\n", kiwi.user("alice"), litchi.user("alice"));
    let f = Fedlink::start(dir.path(), 0, &extra).await;
    let room = kiwi.create_room("bob", RoomVersionId::V12);
    kiwi.invite(&room, "bob", &f.bot(), &f.name, &f.fed_url).await;
    wait_joined(&f, &room).await;
    // bob invites alice@kiwi to a direct chat.
    let (_, invite) = kiwi.push(&room, "bob", "m.room.member", Some(&kiwi.user("alice")), json!({ "membership": "invite", "is_direct": true }));
    let (s, _) = kiwi.send_txn(&f.name, &f.fed_url, "dm-1", vec![invite], vec![]).await;
    assert_eq!(s, 200);
    wait_until("the bot's invite reaches litchi", Duration::from_secs(20), || async {
        Ok(litchi.state.lock().unwrap().invites.first().cloned())
    })
    .await
    .map(|inv| {
        assert_eq!(inv["content"], json!({ "membership": "invite", "is_direct": true }), "{inv}");
        assert_eq!(inv["state_key"], litchi.user("alice").as_str());
    })
    .unwrap();

    // alice@kiwi joins; bob writes a root and a reply in its thread; alice@kiwi's server
    // sends a receipt on the reply without a thread id.
    let (_, join) = kiwi.push(&room, "alice", "m.room.member", Some(&kiwi.user("alice")), json!({ "membership": "join" }));
    let (root, root_ev) = kiwi.push(&room, "bob", "m.room.message", None, json!({ "msgtype": "m.text", "body": "root" }));
    let (reply, reply_ev) = kiwi.push(&room, "bob", "m.room.message", None, json!({ "msgtype": "m.text", "body": "reply", "m.relates_to": { "rel_type": "m.thread", "event_id": root } }));
    let receipt = |event: &str| json!({ "edu_type": "m.receipt", "content": { room.clone(): { "m.read": { kiwi.user("alice"): { "event_ids": [event], "data": { "ts": 1 } } } } } });
    let (s, _) = kiwi.send_txn(&f.name, &f.fed_url, "dm-2", vec![join, root_ev, reply_ev], vec![receipt(&reply)]).await;
    assert_eq!(s, 200);
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["threads"][&root]["receipts"][kiwi.user("alice")]["event_id"], reply.as_str(), "{r}");
    assert!(r["receipts"].get(kiwi.user("alice")).is_none(), "a thread read is not a main-timeline read: {r}");
    assert_eq!(r["direct_invites"][kiwi.user("alice")][0], kiwi.user("bob").as_str(), "{r}");
    // A receipt on the root is a main-timeline read.
    let (s, _) = kiwi.send_txn(&f.name, &f.fed_url, "dm-3", vec![], vec![receipt(&root)]).await;
    assert_eq!(s, 200);
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(r["receipts"][kiwi.user("alice")]["event_id"], root.as_str(), "{r}");
}
