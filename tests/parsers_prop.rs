//! Property-based checks of everything a peer or a homeserver can send, over the pure
//! parsers (the same functions the cargo-fuzz targets in `fuzz/` drive):
//! the X-Matrix header, `/send` bodies, PDUs (parse + signature/hash check), registration
//! pushes and key server answers. A short pass (256 cases per property) that keeps the whole
//! file well under ten seconds; `fuzz/README.md` describes the long fuzzing runs.

use std::path::Path;

use base64::{engine::general_purpose::STANDARD_NO_PAD, Engine};
use fedlink::{
    appservice::parse_push,
    core::pdu::{canonical_object, rules_for, Pdu},
    federation::{
        auth::{body_value, parse_header, sign_request, verify_request},
        send::{parse_transaction, MAX_EDUS, MAX_PDUS},
    },
    keys::{remote::parse_key_response, SigningKey},
    rooms::{verify_keeping, verify_with_keys},
};
use proptest::prelude::*;
use ruma::{
    canonical_json::CanonicalJsonObject,
    room_version_rules::RoomVersionRules,
    serde::Base64,
    signatures::{PublicKeyMap, Verified},
    RoomVersionId, ServerName, UserId,
};
use serde_json::{json, Map, Value};

const ORIGIN: &str = "origin.example";
const SERVERS: [&str; 4] = ["origin.example", "origin.example:8448", "evil.example", "127.0.0.1"];

fn config() -> ProptestConfig {
    ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
}

/// A key from a seed and a version.
fn key_from(seed: [u8; 32], version: &str) -> SigningKey {
    SigningKey::parse(&format!("ed25519 {version} {}", STANDARD_NO_PAD.encode(seed)), Path::new("prop-key")).unwrap()
}

/// The fixed key of [`ORIGIN`].
fn origin_key() -> SigningKey {
    key_from([7; 32], "a_prop")
}

fn key_map(key: &SigningKey) -> PublicKeyMap {
    PublicKeyMap::from([(
        ORIGIN.to_owned(),
        [(key.key_id(), Base64::parse(key.public_key_base64()).unwrap())].into(),
    )])
}

fn versions() -> Vec<(RoomVersionId, RoomVersionRules)> {
    [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12].into_iter().map(|v| (v.clone(), rules_for(&v).unwrap())).collect()
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

fn server() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(&SERVERS[..]).prop_map(String::from),
        1 => "[a-z0-9]{1,8}(\\.[a-z0-9]{1,8}){0,2}(:[0-9]{1,5})?",
        1 => Just("[::1]:8448".to_owned()),
    ]
}

fn user_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ("[a-z0-9._=/-]{1,8}", server()).prop_map(|(l, s)| format!("@{l}:{s}")),
        1 => ".{0,12}",
        1 => "@[^:]{0,6}(:.{0,6})?",
    ]
}

fn event_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\$[A-Za-z0-9_-]{43}",
        1 => "\\$[a-z]{1,8}:origin\\.example",
        1 => ".{0,10}",
    ]
}

fn room_id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => ("[a-zA-Z]{1,8}", server()).prop_map(|(l, s)| format!("!{l}:{s}")),
        1 => "![A-Za-z0-9_-]{43}",
        1 => ".{0,10}",
    ]
}

fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        user_id(),
        event_id(),
        room_id(),
        prop::sample::select(&[
            "m.room.create", "m.room.member", "m.room.message", "m.room.redaction", "m.room.power_levels",
            "m.receipt", "m.presence", "m.typing", "m.read", "m.read.private", "join", "invite", "leave",
            "online", "offline", "unavailable", "", "ed25519:a_prop", "sha256",
        ][..])
        .prop_map(String::from),
        ".{0,16}",
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-1000i64..1000).prop_map(|i| json!(i)),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|i| json!(i)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        interesting_string().prop_map(Value::String),
    ]
}

/// Arbitrary JSON (floats and out-of-range integers included: canonical JSON must refuse them).
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(interesting_string(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON that is valid canonical JSON (no floats, integers within +-(2^53 - 1)).
fn canonical_json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-(1i64 << 53) + 1..(1i64 << 53)).prop_map(|i| json!(i)),
        interesting_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(interesting_string(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn ids_array() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::collection::vec(event_id().prop_map(Value::String), 0..4).prop_map(Value::Array),
        1 => prop::collection::vec(event_id().prop_map(Value::String), 0..25).prop_map(Value::Array),
        1 => json_value(),
    ]
}

/// One PDU field: usually plausible for its name, sometimes anything.
fn pdu_field(name: &'static str) -> BoxedStrategy<Value> {
    let plausible: BoxedStrategy<Value> = match name {
        "type" => interesting_string().prop_map(Value::String).boxed(),
        "room_id" => room_id().prop_map(Value::String).boxed(),
        "sender" | "state_key" => user_id().prop_map(Value::String).boxed(),
        "redacts" => event_id().prop_map(Value::String).boxed(),
        "depth" | "origin_server_ts" => prop_oneof![(0i64..1_000_000).prop_map(|i| json!(i)), any::<i64>().prop_map(|i| json!(i))].boxed(),
        "prev_events" | "auth_events" => ids_array().boxed(),
        "content" => prop::collection::btree_map(interesting_string(), json_value(), 0..5)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
            .boxed(),
        "hashes" => prop_oneof![Just(json!({ "sha256": "AAAA" })), "[A-Za-z0-9+/]{43}".prop_map(|h| json!({ "sha256": h }))].boxed(),
        "signatures" => (server(), "[A-Za-z0-9+/]{0,86}")
            .prop_map(|(s, sig)| json!({ s: { "ed25519:a_prop": sig } }))
            .boxed(),
        _ => json_value().boxed(),
    };
    prop_oneof![4 => plausible, 1 => json_value()].boxed()
}

const PDU_FIELDS: [&str; 13] = [
    "type", "room_id", "sender", "state_key", "content", "depth", "origin_server_ts", "prev_events", "auth_events",
    "hashes", "signatures", "redacts", "unsigned",
];

/// A JSON object shaped like a PDU: each field present or not, mostly plausible.
fn pdu_like() -> impl Strategy<Value = Value> {
    let fields: Vec<BoxedStrategy<Option<Value>>> = PDU_FIELDS.iter().map(|f| prop::option::weighted(0.85, pdu_field(f)).boxed()).collect();
    (fields, prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..2)).prop_map(|(values, extra)| {
        let mut o: Map<String, Value> = extra.into_iter().collect();
        for (name, v) in PDU_FIELDS.iter().zip(values) {
            if let Some(v) = v {
                o.insert((*name).to_owned(), v);
            }
        }
        Value::Object(o)
    })
}

/// Run one value through ingest's PDU path for every supported room version; panics only if
/// fedlink or ruma does.
fn pdu_path(value: Value, map: &PublicKeyMap) {
    let Ok(obj) = canonical_object(value) else { return };
    for (_, rules) in versions() {
        let reference = ruma::signatures::reference_hash(&obj, &rules);
        // Verification also runs on what parse refuses: neither may panic, and fedlink's own
        // check (one serialization for hash and signatures, keys decompressed once) decides
        // as ruma's `verify_event` does.
        let ours = verify_keeping(map, obj.clone(), &rules);
        match (&ours, ruma::signatures::verify_event(map, &obj, &rules)) {
            (Ok((_, kept)), Ok(theirs)) => assert_eq!(*kept, theirs == Verified::All, "content hash verdict"),
            (Err(_), Err(_)) => {}
            (Err(e), Ok(Verified::Signatures)) => assert!(
                ruma::canonical_json::redact(obj.clone(), &rules.redaction, None).is_err(),
                "fedlink refused what ruma accepts (redacted): {e}"
            ),
            (ours, theirs) => panic!("fedlink: {ours:?}, ruma: {theirs:?}"),
        }
        if let Ok(pdu) = Pdu::parse(obj.clone(), &rules) {
            assert_eq!(pdu.event_id.as_str().strip_prefix('$'), reference.as_deref().ok(), "event id is the reference hash");
            let _ = (pdu.membership(), pdu.references(), pdu.to_value());
            if let Ok(kept) = verify_with_keys(map, pdu.json.clone(), &rules) {
                let again = Pdu::parse(kept, &rules).expect("a verified PDU parses again");
                assert_eq!(again.event_id, pdu.event_id);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// X-Matrix
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parse_header_never_panics(s in ".{0,200}") {
        let _ = parse_header(&s);
        let _ = parse_header(&format!("X-Matrix {s}"));
    }

    #[test]
    fn parse_header_never_panics_on_header_like_input(
        parts in prop::collection::vec((
            prop_oneof![
                prop::sample::select(&["origin", "destination", "key", "sig", "Origin", "KEY", "Sig"][..]).prop_map(String::from),
                "[a-zA-Z]{0,12}",
            ],
            "[ \t]{0,2}", "(\"([^\"\\\\]|\\\\.){0,12}\"?|[^,\"]{0,12})"), 0..6),
        sep in "(,|, | ,|,,)",
    ) {
        let params: Vec<String> = parts.iter().map(|(k, ws, v)| format!("{k}{ws}={ws}{v}")).collect();
        let header = format!("X-Matrix {}", params.join(&sep));
        if let Ok(a) = parse_header(&header) {
            // Whatever parsed must come from the header's text.
            prop_assert!(header.contains(&a.key) || a.key.contains('"') || a.key.contains('\\'));
        }
    }

    #[test]
    fn sign_request_round_trips_through_parse_header(
        origin in server(),
        destination in server(),
        method in prop::sample::select(&["GET", "PUT", "POST"][..]),
        uri in "/_matrix/federation/v1/[a-z_/%0-9A-F]{0,30}(\\?[a-z]=[a-z0-9%]{0,5})?",
        body in prop::option::of(json_value()),
        seed in any::<[u8; 32]>(),
        version in "a_[a-zA-Z0-9]{1,6}",
    ) {
        let key = key_from(seed, &version);
        let content = body.map(|b| body_value(&serde_json::to_vec(&b).unwrap()));
        // Floats and out-of-range integers are not canonical: such bodies are refused, not signed.
        let content = match content {
            Some(Err(_)) => return Ok(()),
            Some(Ok(c)) => c,
            None => None,
        };
        let header = sign_request(&key, &origin, &destination, method, &uri, content.as_ref());
        let auth = parse_header(&header).unwrap();
        prop_assert_eq!(&auth.origin, &origin);
        prop_assert_eq!(auth.destination.as_deref(), Some(destination.as_str()));
        prop_assert_eq!(&auth.key, &key.key_id());
        prop_assert_eq!(verify_request(&auth, &key.public_key_base64(), &destination, method, &uri, content.as_ref()), Ok(()));
        // And nothing else verifies.
        let other = key_from([seed[0] ^ 1; 32], &version);
        prop_assert!(verify_request(&auth, &other.public_key_base64(), &destination, method, &uri, content.as_ref()).is_err());
        let elsewhere = format!("x{destination}");
        prop_assert!(verify_request(&auth, &key.public_key_base64(), &elsewhere, method, &uri, content.as_ref()).is_err());
    }
}

// ---------------------------------------------------------------------------------------
// /send
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parse_transaction_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), v in json_value()) {
        let _ = parse_transaction(ORIGIN, &bytes);
        let _ = parse_transaction(ORIGIN, &serde_json::to_vec(&v).unwrap());
        let wrapped = json!({ "origin": ORIGIN, "pdus": [v.clone()], "edus": [v] });
        let _ = parse_transaction(ORIGIN, &serde_json::to_vec(&wrapped).unwrap());
    }

    #[test]
    fn parse_transaction_enforces_limits(
        n_pdus in prop_oneof![0usize..=MAX_PDUS, (MAX_PDUS + 1)..(3 * MAX_PDUS)],
        n_edus in prop_oneof![0usize..=MAX_EDUS, (MAX_EDUS + 1)..(3 * MAX_EDUS)],
        with_origin in any::<bool>(),
    ) {
        let mut body = json!({ "pdus": vec![json!({}); n_pdus], "edus": vec![json!({ "edu_type": "m.typing" }); n_edus] });
        if with_origin {
            body["origin"] = json!(ORIGIN);
        }
        let r = parse_transaction(ORIGIN, &serde_json::to_vec(&body).unwrap());
        if n_pdus > MAX_PDUS || n_edus > MAX_EDUS {
            prop_assert!(r.is_err(), "{n_pdus} PDUs / {n_edus} EDUs accepted");
        } else {
            let t = r.unwrap();
            prop_assert_eq!((t.pdus.len(), t.edus.len()), (n_pdus, n_edus));
        }
    }

    #[test]
    fn parse_transaction_refuses_a_foreign_origin(origin in server().prop_filter("foreign", |s| s != ORIGIN)) {
        let body = json!({ "origin": origin, "pdus": [], "edus": [] });
        prop_assert!(parse_transaction(ORIGIN, &serde_json::to_vec(&body).unwrap()).is_err());
    }
}

// ---------------------------------------------------------------------------------------
// PDUs
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn pdu_parse_and_verify_never_panic(v in pdu_like(), any_json in json_value()) {
        let map = key_map(&origin_key());
        pdu_path(v, &map);
        pdu_path(any_json, &map);
    }

    #[test]
    fn signed_pdus_verify_and_tampering_never_panics(
        kind in prop::sample::select(&["m.room.message", "m.room.member", "m.room.redaction", "m.room.power_levels"][..]),
        content in prop::collection::btree_map("[a-z_.]{1,10}", canonical_json_value(), 0..5),
        depth in 0i64..1_000_000,
        ts in 0i64..(1i64 << 53),
        tamper_key in prop::sample::select(&PDU_FIELDS[..]),
        tamper_value in json_value(),
    ) {
        let key = origin_key();
        let map = key_map(&key);
        let mut content: Map<String, Value> = content.into_iter().collect();
        if kind == "m.room.member" {
            content.insert("membership".into(), json!("join"));
        }
        let mut ev = json!({
            "type": kind, "room_id": "!room:origin.example", "sender": "@alice:origin.example",
            "content": content, "depth": depth, "origin_server_ts": ts,
            "prev_events": ["$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"], "auth_events": [],
        });
        if kind != "m.room.message" {
            ev["state_key"] = json!(if kind == "m.room.member" { "@alice:origin.example" } else { "" });
        }
        for (version, rules) in versions() {
            if version == RoomVersionId::V12 {
                // v12 room ids (other than in create events) are `!` + a reference hash.
                ev["room_id"] = json!("!AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
            }
            let mut obj = canonical_object(ev.clone()).unwrap();
            ruma::signatures::hash_and_sign_event(ORIGIN, &key, &mut obj, &rules.redaction).unwrap();
            let pdu = Pdu::parse(obj.clone(), &rules);
            prop_assert!(pdu.is_ok(), "{version}: {pdu:?}");
            let pdu = pdu.unwrap();
            prop_assert_eq!(ruma::signatures::verify_event(&map, &obj, &rules).unwrap(), Verified::All);
            let kept = verify_with_keys(&map, pdu.json.clone(), &rules).unwrap();
            prop_assert_eq!(Pdu::parse(kept, &rules).unwrap().event_id, pdu.event_id);
            let mut tampered = serde_json::to_value(&obj).unwrap();
            tampered[tamper_key] = tamper_value.clone();
            pdu_path(tampered, &map);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Parsing straight into canonical JSON decides as parsing a `Value` and converting it.
    #[test]
    fn canonical_parse_matches_value_conversion(v in json_value(), big in any::<u64>(), small in any::<i64>()) {
        let texts = [
            serde_json::to_string(&v).unwrap(),
            format!(r#"{{"n":{big},"m":-{big},"s":{small}}}"#),
            // The edges of canonical JSON's integers, and texts a serializer never writes.
            r#"{"max":9007199254740991,"min":-9007199254740991}"#.to_owned(),
            r#"{"over":9007199254740992}"#.to_owned(),
            r#"{"under":-9007199254740992}"#.to_owned(),
            r#"{"a":1,"a":2,"b":{"c":[1,2],"c":"x"}}"#.to_owned(),
            r#"{"z":-0,"e":1e2,"f":1.0}"#.to_owned(),
            r#"{"z":-0}"#.to_owned(),
            r#"[1,"\u00e9\ud83d\ude00",null,true,{}]"#.to_owned(),
        ];
        for text in texts {
            let direct = fedlink::core::pdu::canonical_from_slice(text.as_bytes());
            let via = serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()).and_then(|v| ruma::canonical_json::CanonicalJsonValue::try_from(v).map_err(|e| e.to_string()));
            match (direct, via) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "{text}: direct {a:?}, via Value {b:?}"),
            }
        }
        prop_assert!(fedlink::core::pdu::canonical_from_slice(b"{\"a\":1} x").is_err(), "trailing text is refused");
    }
}

/// Which signatures count: fedlink's check must pick them as ruma's `verify_event` does
/// (a signature by a key not given, or of another algorithm, is ignored; every given key's
/// signature must verify; at least one must), since it replaced that call on the hot path.
#[test]
fn signature_selection_matches_ruma() {
    let key = origin_key();
    let other = key_from([9; 32], "b_other");
    for (version, rules) in versions() {
        let mut ev = canonical_object(json!({
            "type": "m.room.message", "room_id": "!AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "sender": "@alice:origin.example",
            "content": { "body": "hi" }, "depth": 3, "origin_server_ts": 5,
            "prev_events": ["$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"], "auth_events": [],
        }))
        .unwrap();
        ruma::signatures::hash_and_sign_event(ORIGIN, &key, &mut ev, &rules.redaction).unwrap();
        let good_sig = serde_json::to_value(&ev).unwrap()["signatures"][ORIGIN][key.key_id()].clone();
        let with_sigs = |sigs: Value| {
            let mut v = serde_json::to_value(&ev).unwrap();
            v["signatures"] = sigs;
            canonical_object(v).unwrap()
        };
        let both = PublicKeyMap::from([(
            ORIGIN.to_owned(),
            [
                (key.key_id(), Base64::parse(key.public_key_base64()).unwrap()),
                (other.key_id(), Base64::parse(other.public_key_base64()).unwrap()),
                // A key under another algorithm's id: its signature is skipped as such.
                ("curve9:x".to_owned(), Base64::parse(other.public_key_base64()).unwrap()),
            ]
            .into(),
        )]);
        let cases: Vec<(&str, CanonicalJsonObject, PublicKeyMap, bool)> = vec![
            ("the signature alone", ev.clone(), key_map(&key), true),
            ("plus one by a key not given", with_sigs(json!({ ORIGIN: { key.key_id(): good_sig, "ed25519:zzz": "AAAA" } })), key_map(&key), true),
            ("plus one of another algorithm", with_sigs(json!({ ORIGIN: { key.key_id(): good_sig, "curve9:x": "AAAA" } })), both.clone(), true),
            ("plus a bad one by a given key", with_sigs(json!({ ORIGIN: { key.key_id(): good_sig, other.key_id(): good_sig } })), both.clone(), false),
            ("only by a key not given", ev.clone(), key_map(&other), false),
            ("by another server only", with_sigs(json!({ "evil.example": { key.key_id(): good_sig } })), key_map(&key), false),
            ("a signature that is not a string", with_sigs(json!({ ORIGIN: { key.key_id(): 5 } })), key_map(&key), false),
            ("a short signature", with_sigs(json!({ ORIGIN: { key.key_id(): "AAAA" } })), key_map(&key), false),
            ("no keys for the sender's server", ev.clone(), PublicKeyMap::new(), false),
        ];
        for (what, obj, map, ok) in cases {
            let ours = verify_keeping(&map, obj.clone(), &rules);
            let theirs = ruma::signatures::verify_event(&map, &obj, &rules);
            assert_eq!(ours.is_ok(), ok, "{version}, {what}: fedlink {ours:?}");
            assert_eq!(theirs.is_ok(), ok, "{version}, {what}: ruma {theirs:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Registration pushes
// ---------------------------------------------------------------------------------------

fn push_item() -> impl Strategy<Value = Value> {
    let receipt = (room_id(), event_id(), prop::collection::btree_map(user_id(), json_value(), 0..4), any::<bool>()).prop_map(
        |(room, ev, users, private)| {
            let users: Map<String, Value> = users.into_iter().map(|(u, d)| (u, if d.is_object() { d } else { json!({ "ts": 1 }) })).collect();
            let kind = if private { "m.read.private" } else { "m.read" };
            json!({ "type": "m.receipt", "room_id": room, "content": { ev: { kind: users } } })
        },
    );
    let presence = (user_id(), prop::sample::select(&["online", "offline", "unavailable", "busy"][..]), any::<Option<u32>>())
        .prop_map(|(u, p, ago)| json!({ "type": "m.presence", "sender": u, "content": { "presence": p, "last_active_ago": ago } }));
    prop_oneof![3 => receipt, 2 => presence, 1 => json_value()]
}

fn push_event() -> impl Strategy<Value = Value> {
    let ev = (
        prop::sample::select(&["m.room.member", "m.room.message", "m.room.topic"][..]),
        user_id(),
        prop::option::of(user_id()),
        room_id(),
        event_id(),
        prop::sample::select(&["join", "leave", "invite", "ban"][..]),
    )
        .prop_map(|(kind, sender, sk, room, id, membership)| {
            let mut e = json!({ "type": kind, "sender": sender, "room_id": room, "event_id": id,
                                "content": { "membership": membership, "body": "x" }, "origin_server_ts": 5 });
            if let Some(sk) = sk {
                e["state_key"] = json!(sk);
            }
            e
        });
    prop_oneof![5 => ev, 1 => json_value()]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parse_push_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), v in json_value(), s in server()) {
        let Ok(server) = <&ServerName>::try_from(s.as_str()) else { return Ok(()) };
        let _ = parse_push(server, &bytes);
        let _ = parse_push(server, &serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn parse_push_never_speaks_for_a_foreign_server(
        s in prop::sample::select(&SERVERS[..]),
        ephemeral in prop::collection::vec(push_item(), 0..8),
        events in prop::collection::vec(push_event(), 0..8),
        msc2409 in any::<bool>(),
    ) {
        let server = <&ServerName>::try_from(s).unwrap();
        let key = if msc2409 { "de.sorunome.msc2409.ephemeral" } else { "ephemeral" };
        let body = json!({ key: ephemeral, "events": events });
        let push = parse_push(server, &serde_json::to_vec(&body).unwrap()).unwrap();
        for r in &push.receipts {
            prop_assert_eq!(r.user_id.server_name(), server);
        }
        for (u, p, _) in &push.presence {
            prop_assert_eq!(u.server_name(), server);
            prop_assert!(["online", "offline", "unavailable"].contains(&p.as_str()));
        }
        for e in &push.events {
            let speaker = match (&*e.event_type, &e.state_key) {
                ("m.room.member", Some(sk)) => UserId::parse(sk.as_str()).unwrap(),
                // Any other non-state event is a send, spoken for by its sender.
                (t, None) if t != "m.room.member" => e.sender.clone(),
                other => return Err(TestCaseError::fail(format!("unexpected event kept: {other:?}"))),
            };
            prop_assert_eq!(speaker.server_name(), server);
        }
    }

    #[test]
    fn parse_push_keeps_own_presence(local in "[a-z]{1,8}", s in prop::sample::select(&SERVERS[..])) {
        let server = <&ServerName>::try_from(s).unwrap();
        let user = format!("@{local}:{s}");
        let body = json!({ "ephemeral": [{ "type": "m.presence", "sender": user, "content": { "presence": "online" } }] });
        let push = parse_push(server, &serde_json::to_vec(&body).unwrap()).unwrap();
        prop_assert_eq!(push.presence.len(), 1);
        prop_assert_eq!(push.foreign, 0);
    }
}

// ---------------------------------------------------------------------------------------
// Key server answers
// ---------------------------------------------------------------------------------------

fn key_doc(server: &str, keys: &[&SigningKey], valid_until: u64) -> Value {
    let verify_keys: Map<String, Value> = keys.iter().map(|k| (k.key_id(), json!({ "key": k.public_key_base64() }))).collect();
    json!({ "server_name": server, "valid_until_ts": valid_until, "verify_keys": verify_keys, "old_verify_keys": {} })
}

fn signed(doc: Value, entity: &str, by: &SigningKey) -> Value {
    let mut obj = canonical_object(doc).unwrap();
    ruma::signatures::sign_json(entity, by, &mut obj).unwrap();
    serde_json::to_value(obj).unwrap()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parse_key_response_never_panics(v in json_value(), vk in json_value(), sigs in json_value(), ts in json_value()) {
        let _ = parse_key_response(ORIGIN, v);
        let doc = json!({ "server_name": ORIGIN, "valid_until_ts": ts, "verify_keys": vk, "signatures": sigs });
        let _ = parse_key_response(ORIGIN, doc);
    }

    #[test]
    fn parse_key_response_requires_a_valid_self_signature(
        seed in any::<[u8; 32]>(),
        other_seed in any::<[u8; 32]>(),
        version in "a_[a-zA-Z0-9]{1,6}",
        valid_until in 0u64..(1 << 53),
    ) {
        prop_assume!(seed != other_seed);
        let key = key_from(seed, &version);
        let doc = key_doc(ORIGIN, &[&key], valid_until);

        // Positive control: self-signed by the listed key.
        let good = signed(doc.clone(), ORIGIN, &key);
        let keys = parse_key_response(ORIGIN, good.clone()).unwrap();
        prop_assert_eq!(keys.len(), 1);
        prop_assert_eq!(&keys[0].1.key, &key.public_key_base64());
        // ... but not for another server name.
        prop_assert!(parse_key_response("other.example", good.clone()).is_err());

        // verify_keys but no `signatures` at all.
        prop_assert!(parse_key_response(ORIGIN, doc.clone()).is_err());

        // Signed by a different key under the listed key id.
        let impostor_same_id = key_from(other_seed, &version);
        prop_assert!(parse_key_response(ORIGIN, signed(doc.clone(), ORIGIN, &impostor_same_id)).is_err());

        // Signed by a different key under another key id.
        let impostor = key_from(other_seed, &format!("{version}x"));
        prop_assert!(parse_key_response(ORIGIN, signed(doc.clone(), ORIGIN, &impostor)).is_err());

        // The listed key's signature, but under another server's name.
        prop_assert!(parse_key_response(ORIGIN, signed(doc.clone(), "evil.example", &key)).is_err());

        // A valid signature over different content (valid_until_ts changed after signing).
        let mut stale = good;
        stale["valid_until_ts"] = json!(valid_until + 1);
        prop_assert!(parse_key_response(ORIGIN, stale).is_err());

        // Listing two keys, signed only by one that is not listed.
        let two = key_doc(ORIGIN, &[&key, &key_from(seed, &format!("{version}y"))], valid_until);
        prop_assert!(parse_key_response(ORIGIN, signed(two, ORIGIN, &impostor)).is_err());
    }
}
