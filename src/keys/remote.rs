//! Other servers' signing keys: fetched directly from each server's key endpoint
//! (`GET /_matrix/key/v2/server`; no notary), checked (server name, self-signature), cached in
//! memory and sled, and refetched when a needed key is unknown or expired. Fetches per server
//! are rate-limited so a hostile peer cannot make fedlink hammer a key server.

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
    let map = BTreeMap::from([(server.to_owned(), set)]);
    ruma::signatures::verify_json(&map, &object).map_err(|e| format!("self-signature: {e}"))?;
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

/// The remote key cache.
pub struct RemoteKeys {
    store: Arc<Store>,
    client: Arc<FederationClient>,
    metrics: Arc<Metrics>,
    /// Our own name and key, answered without a fetch.
    own: (String, String, String),
    mem: Mutex<HashMap<String, BTreeMap<String, StoredKey>>>,
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
    /// At least one key is returned, or an error.
    pub async fn keys(&self, server: &str, key_ids: &[String], at_ts: u64) -> Result<PublicKeySet, KeyError> {
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
        if !self.allowed.is_empty() && !self.allowed.iter().any(|s| s == server) {
            return Err(KeyError::NotAllowed { server: server.to_owned() });
        }
        let set = Self::usable(&self.known(server), key_ids, at_ts);
        if !set.is_empty() {
            return Ok(set);
        }
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
        let recently = self.last_fetch.lock().expect("lock").get(server).is_some_and(|t| t.elapsed() < REFETCH_INTERVAL);
        if !recently {
            self.fetch(server).await?;
        }
        let set = Self::usable(&self.known(server), key_ids, at_ts);
        if set.is_empty() {
            Err(KeyError::Unknown { server: server.into(), key_ids: key_ids.to_vec() })
        } else {
            Ok(set)
        }
    }

    async fn fetch(&self, server: &str) -> Result<(), KeyError> {
        let _permit = self.fetches.acquire().await.map_err(|_| KeyError::Fetch { server: server.into(), reason: "shutting down".into() })?;
        {
            let mut last = self.last_fetch.lock().expect("lock");
            if last.len() > 10_000 {
                last.retain(|_, t| t.elapsed() < REFETCH_INTERVAL);
            }
            last.insert(server.to_owned(), Instant::now());
        }
        let fail = |reason: String| {
            self.metrics.key_fetches.with_label_values(&["error"]).inc();
            tracing::warn!(%server, %reason, "key fetch failed");
            KeyError::Fetch { server: server.to_owned(), reason }
        };
        let body = self.client.get_unsigned(server, "/_matrix/key/v2/server").await.map_err(|e| fail(e.to_string()))?;
        let mut keys = parse_key_response(server, body).map_err(fail)?;
        let cap = crate::app::now_ms() + MAX_KEY_VALIDITY_MS;
        for (_, k) in keys.iter_mut() {
            k.valid_until_ts = k.valid_until_ts.min(cap);
        }
        let mut mem = self.mem.lock().expect("key cache lock");
        let entry = mem.entry(server.to_owned()).or_default();
        for (id, k) in keys {
            if let Err(e) = self.store.put_server_key(server, &id, &k) {
                tracing::warn!(%server, error = %e, "cannot persist key");
            }
            entry.insert(id, k);
        }
        self.metrics.key_fetches.with_label_values(&["ok"]).inc();
        tracing::info!(%server, keys = entry.len(), "fetched server keys");
        Ok(())
    }
}
