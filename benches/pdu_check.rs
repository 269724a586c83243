//! Per-PDU check cost next to a bare ed25519 verify of the same signed bytes, so the
//! overhead above the signature check shows as a ratio; plus view folding (replay) per
//! log record.
//!
//! `cargo bench --bench pdu_check`

use std::collections::BTreeMap;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use fedlink::{
    core::{
        log_entry::{Entry, LogRecord, PduEntry, PduStatus},
        pdu::{canonical_object, Pdu},
        views::Views,
    },
    keys::SigningKey,
    rooms::verify_signed,
};
use ruma::{canonical_json::RedactingSerializer, serde::Base64, RoomVersionId};
use serde_json::json;

fn signed_message(key: &SigningKey) -> serde_json::Value {
    let rules = RoomVersionId::V12.rules().unwrap();
    let ev = json!({
        "room_id": "!3mP8OX3LrCq3m4YqsvZ3aH9vCr3Ca0kVGc1LBLtmR4Q",
        "sender": "@alice:kiwi.example",
        "type": "m.room.message",
        "content": { "msgtype": "m.text", "body": "The quick brown fox jumps over the lazy dog. ".repeat(4) },
        "prev_events": ["$Q8WBdLwj6A2V0c5m1VzY0q9gJk0sB7d0gRkZ6nqPUNo"],
        "auth_events": ["$Xb1FZ3fJ8k2c9wEwVYtQn3a5qz0n0pQpDqkqYw9sNcE", "$Kk3mD1l9hN3vOaH0r8fQy6bW1u2s4t5v6w7x8y9z0Ab"],
        "depth": 42,
        "origin_server_ts": 1_763_900_000_000u64,
    });
    let mut obj = canonical_object(ev).unwrap();
    ruma::signatures::hash_and_sign_event("kiwi.example", key, &mut obj, &rules.redaction).unwrap();
    serde_json::to_value(obj).unwrap()
}

fn bench_pdu_check(c: &mut Criterion) {
    let key = SigningKey::generate();
    let rules = RoomVersionId::V12.rules().unwrap();
    let event = signed_message(&key);
    let text = serde_json::to_string(&event).unwrap();
    let map = BTreeMap::from([(
        "kiwi.example".to_owned(),
        BTreeMap::from([(key.key_id(), Base64::new(key.public_key().to_vec()))]),
    )]);

    // The exact bytes the signature covers, and the signature itself.
    let obj = canonical_object(event.clone()).unwrap();
    let signed_bytes = RedactingSerializer::new()
        .rules(&rules.redaction)
        .custom_redacted_root_fields(&["signatures", "unsigned"])
        .serialize(&obj)
        .unwrap();
    let sig_b64 = event["signatures"]["kiwi.example"][key.key_id()].as_str().unwrap();
    let sig_bytes: [u8; 64] = Base64::<ruma::serde::base64::Standard>::parse(sig_b64).unwrap().as_bytes().try_into().unwrap();
    let sig = Signature::from_bytes(&sig_bytes);
    let vk = VerifyingKey::from_bytes(&key.public_key()).unwrap();
    vk.verify(signed_bytes.as_bytes(), &sig).expect("the bare verify checks the real signature");

    let mut g = c.benchmark_group("pdu_check");
    g.bench_function("bare_ed25519_verify", |b| {
        b.iter(|| vk.verify(black_box(signed_bytes.as_bytes()), black_box(&sig)).unwrap())
    });
    g.bench_function("full_check_parse_hash_redact_verify", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_str(black_box(&text)).unwrap();
            let obj = canonical_object(v).unwrap();
            let (pdu, signed) = Pdu::parse_signed(obj, &rules).unwrap();
            let obj = verify_signed(&map, pdu.json, signed.as_bytes(), &rules).unwrap();
            black_box(obj);
        })
    });
    g.finish();
}

fn bench_replay(c: &mut Criterion) {
    let room: ruma::OwnedRoomId = "!r:kiwi.example".try_into().unwrap();
    let records: Vec<LogRecord> = (1..=1000u64)
        .map(|i| LogRecord {
            v: 1,
            seq: i + 1,
            at_ms: 0,
            entry: Entry::Pdu(PduEntry {
                room_id: room.clone(),
                event_id: format!("$e{i}").try_into().unwrap(),
                via: "kiwi.example".try_into().unwrap(),
                status: PduStatus::Accepted,
                event_type: "m.room.message".into(),
                state_key: None,
                sender: "@alice:kiwi.example".try_into().unwrap(),
                membership: None,
                prev_events: vec![format!("$e{}", i - 1).try_into().unwrap()],
                depth: i,
                origin_server_ts: 0,
                pdu: json!({}),
                resolved_state: None,
                superseded: Vec::new(),
            }),
        })
        .collect();
    let joined = LogRecord {
        v: 1,
        seq: 1,
        at_ms: 0,
        entry: Entry::BotJoined(fedlink::core::log_entry::BotJoined {
            room_id: room.clone(),
            room_version: RoomVersionId::V12,
            join_event_id: "$j".try_into().unwrap(),
            via: "kiwi.example".try_into().unwrap(),
            state: vec![],
            power_levels: None,
        }),
    };
    // Decoding stored records for folding: signed PDUs as the log holds them.
    let stored: Vec<Vec<u8>> = records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if let Entry::Pdu(p) = &mut r.entry {
                p.pdu = json!({
                    "auth_events": ["$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "$bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "$ccccccccccccccccccccccccccccccccccccccccccc"],
                    "content": { "body": "a message of a realistic length, with a few words in it", "msgtype": "m.text" },
                    "depth": p.depth, "hashes": { "sha256": "K8Ul0gYb0x4x3RTr6fdOl8uV1d8YkX7tTnKbq4xO2w4" },
                    "origin_server_ts": 1_700_000_000_000u64, "prev_events": ["$ddddddddddddddddddddddddddddddddddddddddddd"],
                    "room_id": "!r:kiwi.example", "sender": "@alice:kiwi.example",
                    "signatures": { "kiwi.example": { "ed25519:a_abcd": "dGhpcyBpcyBhIHNpZ25hdHVyZSBvZiA2NCBieXRlcyBvciBzbyBpbiBiYXNlNjQgZW5jb2RpbmcgeXV1dXA" } },
                    "type": "m.room.message",
                });
            }
            serde_json::to_vec(&r).unwrap()
        })
        .collect();
    for (name, split) in [("replay_decode_1000_pdu_records", true), ("replay_decode_1000_pdu_records_general", false)] {
        c.bench_function(name, |b| {
            b.iter(|| {
                for bytes in &stored {
                    black_box(LogRecord::decode_for_fold_with(bytes, split).unwrap());
                }
            })
        });
    }
    c.bench_function("replay_fold_1000_pdu_records", |b| {
        b.iter(|| {
            let mut v = Views::new("@fedlink:fl.example".try_into().unwrap());
            v.apply(&joined);
            for r in &records {
                v.apply(r);
            }
            black_box(v.folded_seq)
        })
    });
}

criterion_group!(benches, bench_pdu_check, bench_replay);
criterion_main!(benches);
