//! Other servers' signing keys: fetched directly from each server's key endpoint
//! (`GET /_matrix/key/v2/server`), checked (server name, self-signature), cached in memory and
//! sled, and refetched when a needed key is unknown or expired. Fetches per server are
//! rate-limited so a hostile peer cannot make fedlink hammer a key server.
//!
//! Keys of a server fedlink may not or cannot contact (outside `federation.allowed_servers`,
//! or unreachable) can come from a notary: the server that handed fedlink the event (the
//! room's resident), through `POST /_matrix/key/v2/query`. A notary's answer must carry the
//! owner's self-signature and the notary's own signature. Keys had that way only verify
//! events; they never authenticate requests (the allow-list is checked before any key).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::{canonical_json::CanonicalJsonObject, serde::Base64, signatures::PublicKeySet};
use serde::Deserialize;

use crate::{
    federation::client::FederationClient,
    metrics::Metrics,
    store::{Store, StoredKey},
};

/// The shortest pause between two key fetches for the same server.
const REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// Most key fetches in flight at once.
const MAX_CONCURRENT_FETCHES: usize = 8;

/// How far ahead a remote key is trusted, whatever `valid_until_ts` it claims (the spec's
/// cap for room versions 5+).
const MAX_KEY_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;

/// Why keys could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    /// The server could not be reached or answered badly. The reason is logged, never
    /// sent to peers (it could reveal internal network details).
    #[error("cannot fetch the signing keys of {server}")]
    Fetch { server: String, reason: String },
    /// The server is not in `federation.allowed_servers`.
    #[error("{server} is not an allowed server")]
    NotAllowed { server: String },
    /// None of the wanted keys is known and valid.
    #[error("no valid key {key_ids:?} for {server}")]
    Unknown { server: String, key_ids: Vec<String> },
}

#[derive(Deserialize)]
struct KeyResponse {
    server_name: String,
    #[serde(default)]
    verify_keys: BTreeMap<String, VerifyKey>,
    #[serde(default)]
    old_verify_keys: BTreeMap<String, OldVerifyKey>,
    valid_until_ts: u64,
}
#[derive(Deserialize)]
struct VerifyKey {
    key: String,
}
#[derive(Deserialize)]
struct OldVerifyKey {
    key: String,
    expired_ts: u64,
}

/// Validate a key server response for `server`; returns the keys it vouches for.
pub fn parse_key_response(server: &str, body: serde_json::Value) -> Result<Vec<(String, StoredKey)>, String> {
    let object: CanonicalJsonObject = match ruma::canonical_json::CanonicalJsonValue::try_from(body.clone()) {
        Ok(ruma::canonical_json::CanonicalJsonValue::Object(o)) => o,
        _ => return Err("response is not a canonical JSON object".into()),
    };
    let resp: KeyResponse = serde_json::from_value(body).map_err(|e| e.to_string())?;
    if resp.server_name != server {
        return Err(format!("response is for `{}`", resp.server_name));
    }
    if resp.verify_keys.is_empty() {
        return Err("no verify_keys".into());
    }
    // The response must be signed by the keys it lists.
    let set: PublicKeySet = resp
        .verify_keys
        .iter()
        .filter_map(|(id, k)| Base64::parse(k.key.clone()).ok().map(|b| (id.clone(), b)))
        .collect();
    verify_signed_by(&object, server, set).map_err(|e| format!("self-signature: {e}"))?;
    let mut out: Vec<(String, StoredKey)> = resp
        .verify_keys
        .into_iter()
        .map(|(id, k)| (id, StoredKey { key: k.key, valid_until_ts: resp.valid_until_ts, old: false }))
        .collect();
    out.extend(
        resp.old_verify_keys
            .into_iter()
            .map(|(id, k)| (id, StoredKey { key: k.key, valid_until_ts: k.expired_ts, old: true })),
    );
    Ok(out)
}

/// Verify that `object` carries a valid signature by `entity` with one of `keys`. Unlike
/// `ruma::signatures::verify_json` alone, a missing signature fails: only `entity`'s
/// signatures with known key ids are checked, and there must be at least one.
pub fn verify_signed_by(object: &CanonicalJsonObject, entity: &str, keys: PublicKeySet) -> Result<(), String> {
    use ruma::canonical_json::CanonicalJsonValue as V;
    let sigs = match object.get("signatures") {
        Some(V::Object(all)) => match all.get(entity) {
            Some(V::Object(sigs)) => sigs.clone(),
            _ => return Err(format!("no signature by {entity}")),
        },
        _ => return Err("no signatures".into()),
    };
    let known: CanonicalJsonObject = sigs.into_iter().filter(|(id, _)| keys.contains_key(id)).collect();
    if known.is_empty() {
        return Err(format!("no signature by a known key of {entity}"));
    }
    let mut only = object.clone();
    only.insert("signatures".into(), V::Object(CanonicalJsonObject::from([(entity.to_owned(), V::Object(known))])));
    let map = BTreeMap::from([(entity.to_owned(), keys)]);
    ruma::signatures::verify_json(&map, &only).map_err(|e| e.to_string())
}

/// Key ids `entity` signed `object` with (its entry in `signatures`).
pub fn signing_key_ids(object: &CanonicalJsonObject, entity: &str) -> Vec<String> {
    use ruma::canonical_json::CanonicalJsonValue as V;
    match object.get("signatures") {
        Some(V::Object(s)) => match s.get(entity) {
            Some(V::Object(k)) => k.keys().cloned().collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// Why a notary gave no keys.
enum NotaryError {
    /// It did not answer (network, 429, 5xx): try again later.
    Unreachable(String),
    /// It answered without valid keys.
    Refused(String),
}

/// The remote key cache.
pub struct RemoteKeys {
    store: Arc<Store>,
    client: Arc<FederationClient>,
    metrics: Arc<Metrics>,
    /// Our own name and key, answered without a fetch.
    own: (String, String, String),
    mem: Mutex<HashMap<String, BTreeMap<String, StoredKey>>>,
    /// Keys notaries vouched for: (server, notary) -> keys. In memory only; never used for
    /// requests.
    notary_mem: Mutex<HashMap<(String, String), BTreeMap<String, StoredKey>>>,
    /// Bounds notary queries in flight (apart from direct fetches).
    notary_fetches: tokio::sync::Semaphore,
    last_fetch: Mutex<HashMap<String, Instant>>,
    /// One fetch per server at a time (others wait for its result), servers independent.
    per_server: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bounds fetches in flight.
    fetches: tokio::sync::Semaphore,
    /// `federation.allowed_servers` (empty: any).
    allowed: Vec<String>,
}

impl RemoteKeys {
    /// A cache backed by `store`, fetching with `client`.
    pub fn new(
        store: Arc<Store>,
        client: Arc<FederationClient>,
        metrics: Arc<Metrics>,
        own_name: &str,
        own_key_id: &str,
        own_public: &str,
        allowed: Vec<String>,
    ) -> Self {
        Self {
            store,
            client,
            metrics,
            own: (own_name.to_owned(), own_key_id.to_owned(), own_public.to_owned()),
            mem: Mutex::new(HashMap::new()),
            notary_mem: Mutex::new(HashMap::new()),
            notary_fetches: tokio::sync::Semaphore::new(MAX_CONCURRENT_FETCHES),
            last_fetch: Mutex::new(HashMap::new()),
            per_server: Mutex::new(HashMap::new()),
            fetches: tokio::sync::Semaphore::new(MAX_CONCURRENT_FETCHES),
            allowed,
        }
    }

    fn known(&self, server: &str) -> BTreeMap<String, StoredKey> {
        if let Some(k) = self.mem.lock().expect("key cache lock").get(server) {
            return k.clone();
        }
        let loaded: BTreeMap<String, StoredKey> = self.store.server_keys(server).unwrap_or_default().into_iter().collect();
        if !loaded.is_empty() {
            self.mem.lock().expect("key cache lock").insert(server.to_owned(), loaded.clone());
        }
        loaded
    }

    fn usable(known: &BTreeMap<String, StoredKey>, key_ids: &[String], at_ts: u64) -> PublicKeySet {
        key_ids
            .iter()
            .filter_map(|id| {
                let k = known.get(id)?;
                (k.valid_until_ts >= at_ts)
                    .then(|| Base64::parse(k.key.clone()).ok())
                    .flatten()
                    .map(|b| (id.clone(), b))
            })
            .collect()
    }

    /// Public keys of `server` among `key_ids` valid at `at_ts` (ms); fetches when needed.
    /// At least one key is returned, or an error. Never consults a notary: for requests.
    pub async fn keys(&self, server: &str, key_ids: &[String], at_ts: u64) -> Result<PublicKeySet, KeyError> {
        self.keys_for_event(server, key_ids, at_ts, None).await
    }

    /// Like [`RemoteKeys::keys`], for verifying events: when `server` may not be contacted
    /// (outside `allowed_servers`) or cannot be (its key server does not answer), ask
    /// `notary` (the server that handed over the event). Keys a notary vouched for are kept
    /// apart, per (server, notary), and only ever verify events that notary hands over:
    /// they never authenticate requests, and never stand in for keys a reachable server
    /// published itself.
    pub async fn keys_for_event(&self, server: &str, key_ids: &[String], at_ts: u64, notary: Option<&str>) -> Result<PublicKeySet, KeyError> {
        if server == self.own.0 {
            let set: PublicKeySet = key_ids
                .iter()
                .filter(|id| **id == self.own.1)
                .filter_map(|id| Base64::parse(self.own.2.clone()).ok().map(|b| (id.clone(), b)))
                .collect();
            return if set.is_empty() {
                Err(KeyError::Unknown { server: server.into(), key_ids: key_ids.to_vec() })
            } else {
                Ok(set)
            };
        }
        let allowed = self.allowed.is_empty() || self.allowed.iter().any(|s| s == server);
        let notary = notary.filter(|n| *n != server && *n != self.own.0);
        if !allowed && notary.is_none() {
            return Err(KeyError::NotAllowed { server: server.to_owned() });
        }
        let set = Self::usable(&self.known(server), key_ids, at_ts);
        if !set.is_empty() {
            return Ok(set);
        }
        if let Some(n) = notary {
            let set = Self::usable(&self.vouched(server, n), key_ids, at_ts);
            if !set.is_empty() {
                return Ok(set);
            }
        }
        if allowed {
            let lock = {
                let mut m = self.per_server.lock().expect("lock");
                if m.len() > 10_000 {
                    m.retain(|_, l| Arc::strong_count(l) > 1);
                }
                m.entry(server.to_owned()).or_default().clone()
            };
            let _guard = lock.lock().await;
            // Another task may have fetched while we waited.
            let set = Self::usable(&self.known(server), key_ids, at_ts);
            if !set.is_empty() {
                return Ok(set);
            }
            let reachable = if self.due(server) { self.fetch(server).await.is_ok() } else { !self.known(server).is_empty() };
            let set = Self::usable(&self.known(server), key_ids, at_ts);
            if !set.is_empty() {
                return Ok(set);
            }
            if reachable || notary.is_none() {
                // The server answers for itself: no notary speaks over it.
                return Err(KeyError::Unknown { server: server.into(), key_ids: key_ids.to_vec() });
            }
        }
        let notary = notary.expect("checked above");
        if !self.due(&format!("{server}\0{notary}")) {
            return Err(KeyError::Fetch { server: server.into(), reason: format!("asked {notary} for these keys moments ago") });
        }
        match self.fetch_via_notary(server, notary).await {
            Ok(()) => {}
            Err(NotaryError::Unreachable(reason)) => return Err(KeyError::Fetch { server: server.into(), reason }),
            Err(NotaryError::Refused(reason)) => tracing::info!(%server, %notary, %reason, "the notary did not vouch for keys"),
        }
        let set = Self::usable(&self.vouched(server, notary), key_ids, at_ts);
        if !set.is_empty() {
            return Ok(set);
        }
        Err(if allowed {
            KeyError::Unknown { server: server.into(), key_ids: key_ids.to_vec() }
        } else {
            KeyError::NotAllowed { server: server.to_owned() }
        })
    }

    /// Keys of `server` that `notary` vouched for.
    fn vouched(&self, server: &str, notary: &str) -> BTreeMap<String, StoredKey> {
        self.notary_mem.lock().expect("key cache lock").get(&(server.to_owned(), notary.to_owned())).cloned().unwrap_or_default()
    }

    /// Forget when keys were last fetched, so the next need fetches at once (an operator
    /// asked to retry).
    pub fn allow_refetch_now(&self) {
        self.last_fetch.lock().expect("lock").clear();
    }

    /// Whether a fetch under `key` is allowed now (at most one per [`REFETCH_INTERVAL`]);
    /// records the attempt.
    fn due(&self, key: &str) -> bool {
        let mut last = self.last_fetch.lock().expect("lock");
        if last.get(key).is_some_and(|t| t.elapsed() < REFETCH_INTERVAL) {
            return false;
        }
        if last.len() > 10_000 {
            last.retain(|_, t| t.elapsed() < REFETCH_INTERVAL);
        }
        last.insert(key.to_owned(), Instant::now());
        true
    }

    /// Ask `notary` for `server`'s keys (`POST /_matrix/key/v2/query`). Each returned key
    /// document must be `server`'s own, self-signed, and signed by the notary with a key
    /// fedlink already holds (no fetch happens here, so no lock is held across another
    /// server's fetch). Notary queries have their own budget of requests in flight.
    async fn fetch_via_notary(&self, server: &str, notary: &str) -> Result<(), NotaryError> {
        let _permit = self.notary_fetches.acquire().await.map_err(|_| NotaryError::Unreachable("shutting down".into()))?;
        let refused = |reason: String| {
            self.metrics.key_fetches.with_label_values(&["notary_error"]).inc();
            tracing::warn!(%server, %notary, %reason, "key query through a notary failed");
            NotaryError::Refused(reason)
        };
        let body = serde_json::json!({ "server_keys": { server: {} } });
        let resp = match self.client.request(notary, reqwest::Method::POST, "/_matrix/key/v2/query", Some(&body)).await {
            Ok(r) => r,
            Err(e) if e.is_transient() => {
                self.metrics.key_fetches.with_label_values(&["notary_error"]).inc();
                tracing::warn!(%server, %notary, error = %e, "notary unreachable");
                return Err(NotaryError::Unreachable(e.to_string()));
            }
            Err(e) => return Err(refused(e.to_string())),
        };
        let docs = resp.get("server_keys").and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
        let mut got: Vec<(String, StoredKey)> = Vec::new();
        for doc in docs.into_iter().take(10) {
            if doc.get("server_name").and_then(serde_json::Value::as_str) != Some(server) {
                continue;
            }
            let object: CanonicalJsonObject = match ruma::canonical_json::CanonicalJsonValue::try_from(doc.clone()) {
                Ok(ruma::canonical_json::CanonicalJsonValue::Object(o)) => o,
                _ => continue,
            };
            let notary_ids = signing_key_ids(&object, notary);
            let notary_keys = Self::usable(&self.known(notary), &notary_ids, 0);
            verify_signed_by(&object, notary, notary_keys).map_err(|e| refused(format!("notary signature: {e}")))?;
            got.extend(parse_key_response(server, doc).map_err(refused)?);
        }
        if got.is_empty() {
            return Err(refused("the notary returned no keys".into()));
        }
        let cap = crate::node::now_ms() + MAX_KEY_VALIDITY_MS;
        let mut mem = self.notary_mem.lock().expect("key cache lock");
        if mem.len() > 10_000 {
            mem.clear();
        }
        let entry = mem.entry((server.to_owned(), notary.to_owned())).or_default();
        for (id, mut k) in got {
            k.valid_until_ts = k.valid_until_ts.min(cap);
            entry.insert(id, k);
        }
        self.metrics.key_fetches.with_label_values(&["notary_ok"]).inc();
        tracing::info!(%server, %notary, "fetched server keys through a notary");
        Ok(())
    }

    /// Cache `keys` of `server` (validity capped), in memory and in sled.
    fn remember(&self, server: &str, keys: Vec<(String, StoredKey)>) {
        let cap = crate::node::now_ms() + MAX_KEY_VALIDITY_MS;
        let mut mem = self.mem.lock().expect("key cache lock");
        let entry = mem.entry(server.to_owned()).or_default();
        for (id, mut k) in keys {
            k.valid_until_ts = k.valid_until_ts.min(cap);
            if let Err(e) = self.store.put_server_key(server, &id, &k) {
                tracing::warn!(%server, error = %e, "cannot persist key");
            }
            entry.insert(id, k);
        }
    }

    async fn fetch(&self, server: &str) -> Result<(), KeyError> {
        let _permit = self.fetches.acquire().await.map_err(|_| KeyError::Fetch { server: server.into(), reason: "shutting down".into() })?;
        let fail = |reason: String| {
            self.metrics.key_fetches.with_label_values(&["error"]).inc();
            tracing::warn!(%server, %reason, "key fetch failed");
            KeyError::Fetch { server: server.to_owned(), reason }
        };
        let body = self.client.get_unsigned(server, "/_matrix/key/v2/server").await.map_err(|e| fail(e.to_string()))?;
        let keys = parse_key_response(server, body).map_err(fail)?;
        let n = keys.len();
        self.remember(server, keys);
        self.metrics.key_fetches.with_label_values(&["ok"]).inc();
        tracing::info!(%server, keys = n, "fetched server keys");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    fn doc(server: &str, key: &SigningKey) -> serde_json::Value {
        serde_json::json!({
            "server_name": server,
            "valid_until_ts": 4_000_000_000_000u64,
            "verify_keys": { key.key_id(): { "key": key.public_key_base64() } },
            "old_verify_keys": {},
        })
    }

    /// A key document must carry a valid self-signature by a key it lists: a missing or
    /// empty `signatures`, or one by another key, is refused.
    #[test]
    fn key_documents_need_a_valid_self_signature() {
        let key = SigningKey::generate();
        let other = SigningKey::generate();
        let unsigned = doc("kiwi", &key);
        assert!(parse_key_response("kiwi", unsigned.clone()).unwrap_err().contains("self-signature"));
        let mut empty = unsigned.clone();
        empty["signatures"] = serde_json::json!({});
        assert!(parse_key_response("kiwi", empty).is_err());
        let mut obj = crate::core::pdu::canonical_object(unsigned.clone()).unwrap();
        ruma::signatures::sign_json("kiwi", &other, &mut obj).unwrap();
        assert!(parse_key_response("kiwi", serde_json::to_value(&obj).unwrap()).is_err(), "signed by a key it does not list");
        let mut obj = crate::core::pdu::canonical_object(unsigned).unwrap();
        ruma::signatures::sign_json("kiwi", &key, &mut obj).unwrap();
        let good = serde_json::to_value(&obj).unwrap();
        assert_eq!(parse_key_response("kiwi", good.clone()).unwrap().len(), 1);
        assert!(parse_key_response("mango", good).is_err(), "for another server");
    }
}
