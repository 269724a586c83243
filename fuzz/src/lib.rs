//! Shared fixtures and checks for the fedlink fuzz targets and the seed generator.
//!
//! Everything here is deterministic: one fixed ed25519 key for the peer `origin.example`, so
//! that the signed seeds written by `make_seeds` verify inside the targets and the fuzzer can
//! reach the "signature is valid" paths.

use std::sync::OnceLock;

use fedlink::{
    core::pdu::{canonical_object, rules_for, Pdu},
    keys::SigningKey,
};
use ruma::{room_version_rules::RoomVersionRules, serde::Base64, signatures::PublicKeyMap, RoomVersionId};

/// The peer (or homeserver) that sends the fuzzed input.
pub const ORIGIN: &str = "origin.example";
/// fedlink's own server name (the destination of X-Matrix requests).
pub const DESTINATION: &str = "fedlink.example";
/// The fixed signing key of [`ORIGIN`], in Synapse's key file format.
pub const KEY_FILE: &str = "ed25519 a_Abc1 4FrqnFvjgfBK2VO4qfHlLLt1YLog7X1nsUYbffRpPx8";
/// Its key id.
pub const KEY_ID: &str = "ed25519:a_Abc1";
/// Its public key (unpadded base64).
pub const PUBLIC_KEY: &str = "l2VHiCshtUtpwqjYpmTCMhEPUXXAtKKkKMlcqbJ7Lc0";
/// Method and request target the X-Matrix target verifies against.
pub const METHOD: &str = "PUT";
/// See [`METHOD`].
pub const URI: &str = "/_matrix/federation/v1/send/txn1";

/// The fixed key of [`ORIGIN`].
pub fn signing_key() -> SigningKey {
    SigningKey::parse(KEY_FILE, std::path::Path::new("fuzz-key")).expect("fixed key parses")
}

/// Keys the PDU checks trust: [`ORIGIN`]'s fixed key only.
pub fn public_key_map() -> &'static PublicKeyMap {
    static MAP: OnceLock<PublicKeyMap> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut map = PublicKeyMap::new();
        map.insert(
            ORIGIN.to_owned(),
            [(KEY_ID.to_owned(), Base64::parse(PUBLIC_KEY).expect("fixed public key is base64"))].into(),
        );
        map
    })
}

/// Rules of the room versions fedlink supports (10, 11, 12).
pub fn all_rules() -> &'static [(RoomVersionId, RoomVersionRules)] {
    static RULES: OnceLock<Vec<(RoomVersionId, RoomVersionRules)>> = OnceLock::new();
    RULES.get_or_init(|| {
        [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12]
            .into_iter()
            .map(|v| {
                let r = rules_for(&v).expect("supported room version");
                (v, r)
            })
            .collect()
    })
}

/// What `/send` ingest does with one PDU before the auth rules, for every supported room
/// version: canonical JSON, [`Pdu::parse`], the required signatures, the signature and hash
/// check with fixed keys, and the re-parse of what that check kept. Panics only on a broken
/// invariant (or a panic inside fedlink / ruma).
pub fn check_pdu_value(value: serde_json::Value) {
    let Ok(obj) = canonical_object(value) else { return };
    for (_version, rules) in all_rules() {
        let reference = ruma::signatures::reference_hash(&obj, rules);
        let Ok(pdu) = Pdu::parse(obj.clone(), rules) else { continue };
        // The event id is the reference hash.
        let reference = reference.expect("Pdu::parse succeeded, so the reference hash must compute");
        assert_eq!(pdu.event_id.as_str(), format!("${reference}"), "event id is not the reference hash");
        // Accessors used by ingest must not panic on anything parse accepted.
        let _ = pdu.membership();
        let _ = pdu.references();
        let _ = pdu.origin_server();
        let _ = pdu.to_value();
        let _ = ruma::signatures::required_server_signatures_to_verify_event(&pdu.json, &rules.signatures);
        let Ok(kept) = fedlink::rooms::verify_with_keys(public_key_map(), pdu.json.clone(), rules) else { continue };
        assert!(!kept.contains_key("unsigned"), "verified event kept `unsigned`");
        // Ingest parses what the signature check kept (possibly redacted) once more; it must
        // still be the same event.
        let again = Pdu::parse(kept, rules).expect("a verified (possibly redacted) PDU must parse again");
        assert_eq!(again.event_id, pdu.event_id, "redaction after a hash mismatch changed the event id");
        assert_eq!(again.room_id, pdu.room_id);
        assert_eq!(again.sender, pdu.sender);
    }
}
