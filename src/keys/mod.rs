//! Signing keys: fedlink's own key ([`own`]) and the cache of other servers' keys
//! ([`remote`]). Nothing else in the crate touches key material.

pub mod own;
pub mod remote;

pub use own::SigningKey;
pub use remote::{KeyError, RemoteKeys};

/// Most decompressed public keys [`verifying_key`] keeps.
pub const MAX_VERIFYING_KEYS: usize = 4_096;

/// The ed25519 public key `bytes` decompressed, as a signature check needs it. Decompressing
/// costs about a tenth of a verify, and a federation uses few keys for many events, so each
/// key is decompressed once and kept (at most [`MAX_VERIFYING_KEYS`]; all are dropped when
/// that many are held). The result depends only on `bytes`: keeping it trusts nothing.
pub fn verifying_key(bytes: &[u8]) -> Result<ed25519_dalek::VerifyingKey, String> {
    use std::{collections::HashMap, sync::{Mutex, OnceLock}};
    static KEPT: OnceLock<Mutex<HashMap<[u8; 32], ed25519_dalek::VerifyingKey>>> = OnceLock::new();
    let bytes: &[u8; 32] = bytes.try_into().map_err(|_| format!("an ed25519 public key has 32 bytes, not {}", bytes.len()))?;
    let kept = KEPT.get_or_init(Default::default);
    if let Some(key) = kept.lock().unwrap_or_else(|p| p.into_inner()).get(bytes) {
        return Ok(*key);
    }
    let key = ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(|e| format!("invalid ed25519 public key: {e}"))?;
    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
    if kept.len() >= MAX_VERIFYING_KEYS {
        kept.clear();
    }
    kept.insert(*bytes, key);
    Ok(key)
}

/// Check an ed25519 `signature` of `message` by the public key `public` (raw bytes), with
/// the key decompressed once ([`verifying_key`]): the one signature check of events and
/// requests.
pub fn verify_ed25519(public: &[u8], signature: &[u8], message: &[u8]) -> Result<(), String> {
    let signature: &[u8; 64] = signature.try_into().map_err(|_| format!("an ed25519 signature has 64 bytes, not {}", signature.len()))?;
    let key = verifying_key(public)?;
    ed25519_dalek::Verifier::verify(&key, message, &ed25519_dalek::Signature::from_bytes(signature)).map_err(|e| e.to_string())
}
