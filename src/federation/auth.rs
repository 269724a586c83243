//! X-Matrix request authentication, both ways.
//!
//! Outbound: [`sign_request`] builds the `Authorization` header. Inbound: [`parse_header`]
//! reads it and [`verify_request`] checks the signature over the raw request target (path and
//! query exactly as received, still percent-encoded) with the origin's key. Checking the
//! destination and the allow-list is the caller's job (see `server.rs`), because it owns the
//! config.

use std::collections::BTreeMap;

use base64::{engine::general_purpose::STANDARD_NO_PAD, Engine};
use ruma::{
    canonical_json::CanonicalJsonValue,
    signatures::KeyPair,
};

use crate::keys::SigningKey;

/// The parsed `Authorization: X-Matrix ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XMatrix {
    /// The requesting server.
    pub origin: String,
    /// The intended recipient (optional in old servers).
    pub destination: Option<String>,
    /// Key id, e.g. `ed25519:a_AbCd`.
    pub key: String,
    /// Base64 signature.
    pub sig: String,
}

/// Why a request failed authentication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No or unparseable `Authorization` header.
    #[error("missing or malformed X-Matrix authorization: {0}")]
    Malformed(String),
    /// The signature does not verify.
    #[error("X-Matrix signature does not verify")]
    BadSignature,
    /// The body is not canonical JSON.
    #[error("request body is not valid canonical JSON: {0}")]
    BadBody(String),
}

/// Parse an `Authorization` header value.
pub fn parse_header(value: &str) -> Result<XMatrix, AuthError> {
    let rest = value
        .strip_prefix("X-Matrix ")
        .or_else(|| value.strip_prefix("X-Matrix\t"))
        .ok_or_else(|| AuthError::Malformed("scheme is not X-Matrix".into()))?;
    let mut params = BTreeMap::new();
    for part in split_params(rest) {
        let (k, v) = part.split_once('=').ok_or_else(|| AuthError::Malformed(format!("parameter `{part}`")))?;
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).map(|v| v.replace("\\\"", "\"").replace("\\\\", "\\")).unwrap_or_else(|| v.to_owned());
        params.insert(k.trim().to_ascii_lowercase(), v);
    }
    let mut take = |k: &str| params.remove(k);
    let origin = take("origin").ok_or_else(|| AuthError::Malformed("no origin".into()))?;
    let key = take("key").ok_or_else(|| AuthError::Malformed("no key".into()))?;
    let sig = take("sig").ok_or_else(|| AuthError::Malformed("no sig".into()))?;
    Ok(XMatrix { origin, destination: take("destination"), key, sig })
}

/// Split on commas outside double quotes.
fn split_params(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            '\\' if quoted && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => quoted = !quoted,
            ',' if !quoted => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        escaped = false;
    }
    out.push(s[start..].trim());
    out.into_iter().filter(|p| !p.is_empty()).collect()
}

/// The bytes a request's signature covers: the canonical JSON of
/// `{"content", "destination", "method", "origin", "uri"}` (keys in that, sorted, order;
/// no `content` without a body), written around the content's canonical form instead of
/// copying the body into an object first.
fn request_bytes(method: &str, uri: &str, origin: &str, destination: &str, content: Option<&CanonicalJsonValue>) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    out.push(b'{');
    if let Some(c) = content {
        out.extend_from_slice(b"\"content\":");
        serde_json::to_writer(&mut out, c)?;
        out.push(b',');
    }
    for (i, (k, v)) in [("destination", destination), ("method", method), ("origin", origin), ("uri", uri)].into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k)?;
        out.push(b':');
        serde_json::to_writer(&mut out, v)?;
    }
    out.push(b'}');
    Ok(out)
}

/// Parse a request body for signing or verification (`None` for an empty body).
pub fn body_value(body: &[u8]) -> Result<Option<CanonicalJsonValue>, AuthError> {
    if body.is_empty() {
        return Ok(None);
    }
    crate::core::pdu::canonical_from_slice(body).map(Some).map_err(|e| AuthError::BadBody(e.to_string()))
}

/// The `Authorization` header value for an outbound request.
pub fn sign_request(
    key: &SigningKey,
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    content: Option<&CanonicalJsonValue>,
) -> String {
    let bytes = request_bytes(method, uri, origin, destination, content).expect("canonical JSON serializes");
    let sig = key.sign(&bytes);
    format!(
        "X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"{}\",sig=\"{}\"",
        key.key_id(),
        sig.base64()
    )
}

/// Verify an inbound request's signature with `public_key` (unpadded base64) of the origin.
/// `destination` is what the signature must cover (our own server name).
pub fn verify_request(
    auth: &XMatrix,
    public_key: &str,
    destination: &str,
    method: &str,
    uri: &str,
    content: Option<&CanonicalJsonValue>,
) -> Result<(), AuthError> {
    let bytes = request_bytes(method, uri, &auth.origin, destination, content).map_err(|_| AuthError::BadSignature)?;
    let key = STANDARD_NO_PAD.decode(public_key.trim_end_matches('=')).map_err(|_| AuthError::BadSignature)?;
    let sig = STANDARD_NO_PAD.decode(auth.sig.trim_end_matches('=')).map_err(|_| AuthError::BadSignature)?;
    crate::keys::verify_ed25519(&key, &sig, &bytes).map_err(|_| AuthError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::canonical_json::CanonicalJsonObject;

    #[test]
    fn sign_then_verify_round_trip_and_tamper() {
        let key = SigningKey::generate();
        let body = body_value(br#"{"pdus":[],"edus":[]}"#).unwrap();
        let uri = "/_matrix/federation/v1/send/t%201?x=1";
        let header = sign_request(&key, "kiwi:8448", "fed.example", "PUT", uri, body.as_ref());
        let auth = parse_header(&header).unwrap();
        assert_eq!(auth.origin, "kiwi:8448");
        assert_eq!(auth.destination.as_deref(), Some("fed.example"));
        let pk = key.public_key_base64();
        assert_eq!(verify_request(&auth, &pk, "fed.example", "PUT", uri, body.as_ref()), Ok(()));
        // Any change breaks it: method, uri (decoded form), destination, body.
        assert!(verify_request(&auth, &pk, "fed.example", "POST", uri, body.as_ref()).is_err());
        assert!(verify_request(&auth, &pk, "fed.example", "PUT", "/_matrix/federation/v1/send/t 1?x=1", body.as_ref()).is_err());
        assert!(verify_request(&auth, &pk, "other", "PUT", uri, body.as_ref()).is_err());
        let other = body_value(br#"{"pdus":[1],"edus":[]}"#).unwrap();
        assert!(verify_request(&auth, &pk, "fed.example", "PUT", uri, other.as_ref()).is_err());
        assert!(verify_request(&auth, &SigningKey::generate().public_key_base64(), "fed.example", "PUT", uri, body.as_ref()).is_err());
    }

    /// The streamed bytes are what ruma's canonical serialization of the request object
    /// gives (what other servers sign and check).
    #[test]
    fn request_bytes_are_the_canonical_request_object() {
        let bodies = [
            None,
            body_value(br#"{"pdus":[{"b":1,"a":"\u00e9\n\"x\"","c":[null,true,-5]}],"edus":[],"origin":"k\u2028"}"#).unwrap(),
            body_value(b"[]").unwrap(),
        ];
        for body in bodies {
            let mut o = CanonicalJsonObject::new();
            for (k, v) in [("method", "PUT"), ("uri", "/_matrix/x?y=%20\u{e9}"), ("origin", "kiwi:8448"), ("destination", "fed.example")] {
                o.insert(k.into(), CanonicalJsonValue::String(v.into()));
            }
            if let Some(c) = &body {
                o.insert("content".into(), c.clone());
            }
            let expected = ruma::signatures::to_canonical_json_string_for_signing(&o).unwrap();
            let ours = request_bytes("PUT", "/_matrix/x?y=%20\u{e9}", "kiwi:8448", "fed.example", body.as_ref()).unwrap();
            assert_eq!(String::from_utf8(ours).unwrap(), expected);
        }
    }

    #[test]
    fn header_parsing() {
        let a = parse_header(r#"X-Matrix origin=kiwi,key="ed25519:1",sig="abc""#).unwrap();
        assert_eq!((a.origin.as_str(), a.destination, a.key.as_str()), ("kiwi", None, "ed25519:1"));
        let a = parse_header(r#"X-Matrix origin="a,b", destination="d",key="k",sig="s""#).unwrap();
        assert_eq!(a.origin, "a,b");
        for bad in ["Bearer x", "X-Matrix key=\"k\",sig=\"s\"", "X-Matrix origin=o,sig=s", "X-Matrix origin"] {
            assert!(parse_header(bad).is_err(), "{bad}");
        }
        assert!(body_value(b"{\"a\":1.5}").is_err(), "floats are not canonical JSON");
        assert!(body_value(b"not json").is_err());
    }
}
