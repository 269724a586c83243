//! A single PDU as a peer sends it (in `/send`, `/send_join` and `/invite` answers, backfill):
//! canonical JSON, `Pdu::parse` for room versions 10, 11 and 12, the reference hash, and the
//! signature/hash check with a fixed key map (see `fedlink_fuzz::check_pdu_value`).
#![no_main]

use fedlink_fuzz::check_pdu_value;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    check_pdu_value(value);
});
