//! Inbound X-Matrix authentication: the `Authorization` header and, when it parses, the
//! signature check over method, uri, destination and body.
//!
//! Input: UTF-8 text. Everything up to the first `\n` is the header value; the rest (if any)
//! is the request body.
#![no_main]

use fedlink::federation::auth::{body_value, parse_header, verify_request};
use fedlink_fuzz::{DESTINATION, METHOD, PUBLIC_KEY, URI};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (header, body) = match text.split_once('\n') {
        Some((h, b)) => (h, b.as_bytes()),
        None => (text, &b""[..]),
    };
    let Ok(auth) = parse_header(header) else { return };
    let content = match body_value(body) {
        Ok(c) => c,
        Err(_) => return, // the server answers 400 before checking the signature
    };
    let _ = verify_request(&auth, PUBLIC_KEY, DESTINATION, METHOD, URI, content.as_ref());
    // Also with the origin's claimed destination, as a peer that sent it elsewhere would.
    if let Some(dest) = auth.destination.as_deref() {
        let _ = verify_request(&auth, PUBLIC_KEY, dest, METHOD, URI, content.as_ref());
    }
});
