//! `PUT /_matrix/federation/v1/send/{txnId}` bodies from an authenticated peer: the
//! transaction parser, then every PDU through the same checks as the `pdu` target.
#![no_main]

use fedlink::federation::send::{parse_transaction, MAX_EDUS, MAX_PDUS};
use fedlink_fuzz::{check_pdu_value, ORIGIN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(txn) = parse_transaction(ORIGIN, data) else { return };
    assert!(txn.pdus.len() <= MAX_PDUS, "{} PDUs accepted", txn.pdus.len());
    assert!(txn.edus.len() <= MAX_EDUS, "{} EDUs accepted", txn.edus.len());
    // A transaction naming another origin must have been refused.
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Some(origin) = o.get("origin") {
            assert_eq!(origin.as_str(), Some(ORIGIN), "foreign transaction origin accepted");
        }
    }
    for pdu in txn.pdus {
        check_pdu_value(pdu);
    }
});
