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
    canonical_json::{CanonicalJsonObject, CanonicalJsonValue},
    signatures::{KeyPair, SigningKeyAlgorithm},
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

fn request_object(method: &str, uri: &str, origin: &str, destination: &str, content: Option<&CanonicalJsonValue>) -> CanonicalJsonObject {
    let mut o = CanonicalJsonObject::new();
    o.insert("method".into(), CanonicalJsonValue::String(method.to_owned()));
    o.insert("uri".into(), CanonicalJsonValue::String(uri.to_owned()));
    o.insert("origin".into(), CanonicalJsonValue::String(origin.to_owned()));
    o.insert("destination".into(), CanonicalJsonValue::String(destination.to_owned()));
    if let Some(c) = content {
        o.insert("content".into(), c.clone());
    }
    o
}

/// Parse a request body for signing or verification (`None` for an empty body).
pub fn body_value(body: &[u8]) -> Result<Option<CanonicalJsonValue>, AuthError> {
    if body.is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| AuthError::BadBody(e.to_string()))?;
    CanonicalJsonValue::try_from(v).map(Some).map_err(|e| AuthError::BadBody(e.to_string()))
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
    let o = request_object(method, uri, origin, destination, content);
    let bytes = ruma::signatures::to_canonical_json_string_for_signing(&o).expect("request object is canonical");
    let sig = key.sign(bytes.as_bytes());
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
    let o = request_object(method, uri, &auth.origin, destination, content);
    let bytes = ruma::signatures::to_canonical_json_string_for_signing(&o).map_err(|_| AuthError::BadSignature)?;
    let key = STANDARD_NO_PAD.decode(public_key.trim_end_matches('=')).map_err(|_| AuthError::BadSignature)?;
    let sig = STANDARD_NO_PAD.decode(auth.sig.trim_end_matches('=')).map_err(|_| AuthError::BadSignature)?;
    ruma::signatures::verify_canonical_json_bytes(&SigningKeyAlgorithm::Ed25519, &key, &sig, bytes.as_bytes())
        .map_err(|_| AuthError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

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
