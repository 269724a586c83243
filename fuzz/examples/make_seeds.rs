//! Writes real, validly signed seed inputs for every fuzz target into `corpus/<target>/`
//! (relative to the fuzz crate), using the fixed key of `origin.example` that the targets
//! trust. Run from anywhere:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example make_seeds
//! ```

use std::path::{Path, PathBuf};

use fedlink::federation::auth::{body_value, sign_request};
use fedlink_fuzz::{all_rules, signing_key, DESTINATION, METHOD, ORIGIN, URI};
use ruma::{canonical_json::CanonicalJsonObject, RoomVersionId};
use serde_json::{json, Value};

const TS: u64 = 1_700_000_000_000;

fn corpus_dir(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let path = corpus_dir(target).join(name);
    std::fs::write(&path, bytes).expect("write seed");
    println!("{}", path.display());
}

fn canonical(v: Value) -> CanonicalJsonObject {
    fedlink::core::pdu::canonical_object(v).expect("seed is canonical JSON")
}

/// Hash and sign `event` as `origin.example` for `version`; returns the signed JSON and its
/// event id.
fn sign_event(version: &RoomVersionId, event: Value) -> (Value, String) {
    let rules = &all_rules().iter().find(|(v, _)| v == version).expect("supported version").1;
    let mut obj = canonical(event);
    ruma::signatures::hash_and_sign_event(ORIGIN, &signing_key(), &mut obj, &rules.redaction).expect("signs");
    let pdu = fedlink::core::pdu::Pdu::parse(obj.clone(), rules).expect("seed PDU parses");
    let verified = fedlink::rooms::verify_with_keys(fedlink_fuzz::public_key_map(), obj.clone(), rules).expect("seed PDU verifies");
    assert_eq!(verified.get("content"), obj.get("content"), "seed content hash must match");
    (serde_json::to_value(&obj).unwrap(), pdu.event_id.to_string())
}

/// A small signed room history for `version`.
fn room_events(version: &RoomVersionId) -> Vec<(String, Value)> {
    let v = version.as_str();
    let alice = format!("@alice:{ORIGIN}");
    let bob = format!("@bob:{ORIGIN}");
    let v12 = *version == RoomVersionId::V12;
    let mut create = json!({
        "type": "m.room.create",
        "state_key": "",
        "sender": alice,
        "content": { "room_version": v },
        "auth_events": [],
        "prev_events": [],
        "depth": 1,
        "origin_server_ts": TS,
    });
    if v12 {
        // v12: no room_id on the create event; the room id is derived from its event id.
        create["content"]["additional_creators"] = json!([bob]);
    } else {
        create["room_id"] = json!(format!("!room{v}:{ORIGIN}"));
        create["content"]["creator"] = json!(alice);
    }
    let (create, create_id) = sign_event(version, create);
    let room_id = if v12 { format!("!{}", &create_id[1..]) } else { format!("!room{v}:{ORIGIN}") };
    // In v12 the create event is not listed in auth_events.
    let auth = |ids: &[&str]| -> Value {
        let mut all: Vec<String> = if v12 { vec![] } else { vec![create_id.clone()] };
        all.extend(ids.iter().map(|s| s.to_string()));
        json!(all)
    };
    let mut out = vec![(format!("v{v}-create"), create)];

    let (join, join_id) = sign_event(
        version,
        json!({
            "type": "m.room.member", "state_key": alice, "sender": alice, "room_id": room_id,
            "content": { "membership": "join", "displayname": "Alice" },
            "auth_events": auth(&[]), "prev_events": [create_id], "depth": 2, "origin_server_ts": TS + 1,
        }),
    );
    out.push((format!("v{v}-join"), join));

    let (pl, pl_id) = sign_event(
        version,
        json!({
            "type": "m.room.power_levels", "state_key": "", "sender": alice, "room_id": room_id,
            "content": { "users": { alice.clone(): 100 }, "users_default": 0, "events_default": 0, "state_default": 50,
                         "ban": 50, "kick": 50, "redact": 50, "invite": 0 },
            "auth_events": auth(&[&join_id]), "prev_events": [join_id], "depth": 3, "origin_server_ts": TS + 2,
        }),
    );
    out.push((format!("v{v}-power-levels"), pl));

    let (invite, invite_id) = sign_event(
        version,
        json!({
            "type": "m.room.member", "state_key": format!("@carol:{DESTINATION}"), "sender": alice, "room_id": room_id,
            "content": { "membership": "invite" },
            "auth_events": auth(&[&join_id, &pl_id]), "prev_events": [pl_id], "depth": 4, "origin_server_ts": TS + 3,
        }),
    );
    out.push((format!("v{v}-invite"), invite));

    let (msg, msg_id) = sign_event(
        version,
        json!({
            "type": "m.room.message", "sender": alice, "room_id": room_id,
            "content": { "msgtype": "m.text", "body": "hello \u{1F600} \"quoted\" \\ back" },
            "auth_events": auth(&[&join_id, &pl_id]), "prev_events": [invite_id], "depth": 5, "origin_server_ts": TS + 4,
            "unsigned": { "age": 12 },
        }),
    );
    out.push((format!("v{v}-message-unsigned"), msg.clone()));

    let mut redaction = json!({
        "type": "m.room.redaction", "sender": alice, "room_id": room_id,
        "content": { "reason": "spam" },
        "auth_events": auth(&[&join_id, &pl_id]), "prev_events": [msg_id], "depth": 6, "origin_server_ts": TS + 5,
    });
    if *version == RoomVersionId::V10 {
        redaction["redacts"] = json!(msg_id);
    } else {
        redaction["content"]["redacts"] = json!(msg_id);
    }
    let (redaction, _) = sign_event(version, redaction);
    out.push((format!("v{v}-redaction"), redaction));

    // Signed, then the content changed: the signature still holds over the redacted form,
    // the content hash does not (ingest keeps the redacted event).
    let mut tampered = msg;
    tampered["content"]["body"] = json!("tampered");
    out.push((format!("v{v}-message-tampered-content"), tampered));
    out
}

fn key_document(valid_until: u64, old: bool) -> Value {
    let key = signing_key();
    let mut doc = json!({
        "server_name": ORIGIN,
        "valid_until_ts": valid_until,
        "verify_keys": { key.key_id(): { "key": key.public_key_base64() } },
        "old_verify_keys": {},
    });
    if old {
        doc["old_verify_keys"] = json!({ "ed25519:old1": { "key": "l2VHiCshtUtpwqjYpmTCMhEPUXXAtKKkKMlcqbJ7Lc0", "expired_ts": TS } });
    }
    let mut obj = canonical(doc);
    ruma::signatures::sign_json(ORIGIN, &key, &mut obj).expect("signs");
    serde_json::to_value(obj).unwrap()
}

fn main() {
    let mut all_pdus = Vec::new();
    for (version, _) in all_rules() {
        for (name, ev) in room_events(version) {
            write("pdu", &format!("seed-{name}.json"), serde_json::to_string(&ev).unwrap().as_bytes());
            all_pdus.push((version.clone(), ev));
        }
    }

    // /send bodies: one per room version plus EDUs.
    let edus = json!([
        { "edu_type": "m.receipt", "content": { "!room10:origin.example": { "m.read": {
            format!("@alice:{ORIGIN}"): { "event_ids": ["$abc"], "data": { "ts": TS } } } } } },
        { "edu_type": "m.typing", "content": { "room_id": "!room10:origin.example", "user_id": format!("@alice:{ORIGIN}"), "typing": true } },
        { "edu_type": "m.presence", "content": { "push": [ { "user_id": format!("@alice:{ORIGIN}"), "presence": "online", "last_active_ago": 5 } ] } },
    ]);
    for (version, _) in all_rules() {
        let pdus: Vec<&Value> = all_pdus.iter().filter(|(v, _)| v == version).map(|(_, p)| p).collect();
        let body = json!({ "origin": ORIGIN, "origin_server_ts": TS, "pdus": pdus, "edus": edus });
        write("send_body", &format!("seed-v{}.json", version.as_str()), serde_json::to_string(&body).unwrap().as_bytes());
    }
    write("send_body", "seed-empty.json", br#"{"origin":"origin.example","origin_server_ts":1,"pdus":[]}"#);
    write("send_body", "seed-edus-null.json", br#"{"pdus":[],"edus":null}"#);

    // X-Matrix: header line, then the body it signs.
    let key = signing_key();
    let body = serde_json::to_string(&json!({ "origin": ORIGIN, "pdus": [], "edus": [] })).unwrap();
    let content = body_value(body.as_bytes()).unwrap();
    let header = sign_request(&key, ORIGIN, DESTINATION, METHOD, URI, content.as_ref());
    write("x_matrix_header", "seed-signed-with-body.txt", format!("{header}\n{body}").as_bytes());
    let header = sign_request(&key, ORIGIN, DESTINATION, METHOD, URI, None);
    write("x_matrix_header", "seed-signed-no-body.txt", header.as_bytes());
    write(
        "x_matrix_header",
        "seed-quoted.txt",
        br#"X-Matrix origin="a\"b\\c,d" , Destination=fedlink.example,KEY="ed25519:a_Abc1",sig=abc="#,
    );
    write("x_matrix_header", "seed-tab.txt", b"X-Matrix\torigin=origin.example,key=ed25519:1,sig=AAAA\n{}");

    // Registration pushes from origin.example's homeserver.
    let alice = format!("@alice:{ORIGIN}");
    let push = json!({
        "events": [
            { "type": "m.room.member", "state_key": alice, "sender": alice, "room_id": "!r:origin.example",
              "event_id": "$join1", "content": { "membership": "join" }, "origin_server_ts": TS },
            { "type": "m.room.member", "state_key": "@mallory:evil.example", "sender": alice, "room_id": "!r:origin.example",
              "event_id": "$join2", "content": { "membership": "leave" }, "origin_server_ts": TS },
            { "type": "m.room.message", "sender": alice, "room_id": "!r:origin.example", "event_id": "$msg1",
              "content": { "msgtype": "m.text", "body": "hi" }, "origin_server_ts": TS + 1 },
            { "type": "m.room.message", "sender": "@mallory:evil.example", "room_id": "!r:origin.example", "event_id": "$msg2",
              "content": { "msgtype": "m.text", "body": "hi" } },
        ],
        "ephemeral": [
            { "type": "m.receipt", "room_id": "!r:origin.example", "content": { "$msg1": {
                "m.read": { alice.clone(): { "ts": TS, "thread_id": "main" }, "@mallory:evil.example": { "ts": TS } },
                "m.read.private": { alice.clone(): { "ts": TS } } } } },
            { "type": "m.presence", "sender": alice, "content": { "presence": "online", "last_active_ago": 10 } },
            { "type": "m.presence", "sender": "@mallory:evil.example", "content": { "presence": "offline" } },
            { "type": "m.typing", "room_id": "!r:origin.example", "content": { "user_ids": [alice] } },
        ],
    });
    write("appservice_push", "seed-mixed.json", serde_json::to_string(&push).unwrap().as_bytes());
    let msc = json!({ "events": [], "de.sorunome.msc2409.ephemeral": push["ephemeral"].clone() });
    write("appservice_push", "seed-msc2409.json", serde_json::to_string(&msc).unwrap().as_bytes());

    // Key documents: valid self-signed ones, an unsigned one, one for another server.
    let doc = key_document(TS + 86_400_000, false);
    assert!(fedlink::keys::remote::parse_key_response(ORIGIN, doc.clone()).is_ok(), "seed key document must be accepted");
    write("key_response", "seed-valid.json", serde_json::to_string(&doc).unwrap().as_bytes());
    let doc_old = key_document(TS + 86_400_000, true);
    assert!(fedlink::keys::remote::parse_key_response(ORIGIN, doc_old.clone()).is_ok());
    write("key_response", "seed-valid-old-keys.json", serde_json::to_string(&doc_old).unwrap().as_bytes());
    let mut unsigned = doc.clone();
    unsigned.as_object_mut().unwrap().remove("signatures");
    write("key_response", "seed-unsigned.json", serde_json::to_string(&unsigned).unwrap().as_bytes());
    let mut other = doc;
    other["server_name"] = json!("other.example");
    write("key_response", "seed-other-server.json", serde_json::to_string(&other).unwrap().as_bytes());
}
