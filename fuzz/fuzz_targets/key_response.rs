//! `GET /_matrix/key/v2/server` answers (and the notary's per-server documents): the
//! document must name the server and carry a valid self-signature by a key it lists.
#![no_main]

use fedlink::keys::remote::parse_key_response;
use fedlink_fuzz::ORIGIN;
use libfuzzer_sys::fuzz_target;
use ruma::{
    canonical_json::CanonicalJsonValue,
    serde::{base64::Standard, Base64},
    signatures::SigningKeyAlgorithm,
};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(keys) = parse_key_response(ORIGIN, value.clone()) else { return };
    // Independent oracle: accepted means the document names ORIGIN and one of its
    // `signatures.ORIGIN` entries verifies with a current key the answer returns.
    assert_eq!(value.get("server_name").and_then(|v| v.as_str()), Some(ORIGIN));
    let Ok(CanonicalJsonValue::Object(mut obj)) = CanonicalJsonValue::try_from(value.clone()) else {
        panic!("accepted a document that is not canonical JSON");
    };
    let sigs = value
        .get("signatures")
        .and_then(|s| s.get(ORIGIN))
        .and_then(|s| s.as_object())
        .expect("accepted a document without a signature by its server")
        .clone();
    obj.remove("signatures");
    obj.remove("unsigned");
    let signed = ruma::signatures::to_canonical_json_string_for_signing(&obj).expect("canonical");
    let ok = keys.iter().filter(|(_, k)| !k.old).any(|(id, k)| {
        // Decoded the way ruma decodes keys and signatures (padding and trailing bits tolerated).
        let (Some(sig), Ok(pk)) = (sigs.get(id).and_then(|s| s.as_str()), Base64::<Standard>::parse(&k.key)) else {
            return false;
        };
        let Ok(sig) = Base64::<Standard>::parse(sig) else { return false };
        ruma::signatures::verify_canonical_json_bytes(&SigningKeyAlgorithm::Ed25519, pk.as_bytes(), sig.as_bytes(), signed.as_bytes())
            .is_ok()
    });
    assert!(ok, "accepted a key document with no valid self-signature: {value}");
});
