//! `PUT /_matrix/federation/v1/send/{txnId}` bodies, the transaction parser alone: the shape
//! checks and limits every body goes through before any PDU is looked at. (`send_body` goes
//! on through every PDU's checks, which the `pdu` target covers at full speed.)
#![no_main]

use fedlink::federation::send::{parse_transaction, MAX_EDUS, MAX_PDUS};
use fedlink_fuzz::ORIGIN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = parse_transaction(ORIGIN, data);
    let Ok(serde_json::Value::Object(o)) = serde_json::from_slice::<serde_json::Value>(data) else {
        assert!(parsed.is_err(), "a body that is not a JSON object was accepted");
        return;
    };
    let Ok(txn) = parsed else { return };
    assert!(txn.pdus.len() <= MAX_PDUS, "{} PDUs accepted", txn.pdus.len());
    assert!(txn.edus.len() <= MAX_EDUS, "{} EDUs accepted", txn.edus.len());
    if let Some(origin) = o.get("origin") {
        assert_eq!(origin.as_str(), Some(ORIGIN), "foreign transaction origin accepted");
    }
});
