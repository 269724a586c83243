//! The outbox worker: delivers queued PDUs to each destination in federation transactions
//! (at most 50 PDUs each), in queue order, retrying with backoff when a server is down or
//! answers 5xx/429, and moving a batch to the dead letters when the server refuses it for
//! good (4xx). Queue entries are written in the same sled transaction as the log records
//! that caused them, so a restart resumes delivery; an entry is removed only after the
//! destination answered 200, so nothing is lost (a crash in between re-sends the same
//! transaction id, which the receiver deduplicates).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use reqwest::Method;
use serde::Serialize;
use serde_json::{json, Value};

use crate::{
    app::{now_ms, Fedlink},
    core::backoff::Backoff,
    federation::client::enc,
};

/// PDUs per transaction (the spec's limit).
pub const MAX_PDUS_PER_TXN: usize = 50;

/// Delivery state of one destination, for retries and the admin API.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DestinationStatus {
    /// Consecutive failures.
    pub failures: u32,
    /// When the next attempt is due (ms since the epoch).
    pub next_attempt_ms: u64,
    /// Last successful transaction (ms since the epoch).
    pub last_success_ms: Option<u64>,
    /// Last error.
    pub last_error: Option<String>,
    /// PDUs delivered since start.
    pub delivered: u64,
}

/// Delivers the outbox until `stop`.
pub async fn worker(app: Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let dests = match app.store.outbox_destinations() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                BTreeMap::new()
            }
        };
        app.metrics.outbox_pending.set(dests.values().sum::<usize>() as i64);
        let mut next_due: Option<u64> = None;
        let now = now_ms();
        for dest in dests.keys() {
            let due = app.destinations.lock().expect("lock").get(dest).map(|s| s.next_attempt_ms).unwrap_or(0);
            if due > now {
                crate::core::backoff::earliest(&mut next_due, due);
                continue;
            }
            if let Some(due) = deliver_batch(&app, dest).await {
                crate::core::backoff::earliest(&mut next_due, due);
            } else {
                // More may be queued: come back at once.
                next_due = Some(now);
            }
        }
        let wait = next_due.map(|d| Duration::from_millis(d.saturating_sub(now_ms()))).unwrap_or(Duration::from_secs(30));
        if wait.is_zero() && !dests.is_empty() {
            continue;
        }
        tokio::select! {
            _ = app.outbox_wake.notified() => {}
            _ = tokio::time::sleep(wait.min(Duration::from_secs(30))) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Send one transaction to `dest`. Returns when to retry after a transient failure.
async fn deliver_batch(app: &Fedlink, dest: &str) -> Option<u64> {
    let batch = match app.store.outbox_batch(dest, MAX_PDUS_PER_TXN) {
        Ok(b) if !b.is_empty() => b,
        Ok(_) => return None,
        Err(e) => {
            tracing::error!(%dest, error = %e, "cannot read the outbox");
            return Some(now_ms() + 1000);
        }
    };
    let keys: Vec<Vec<u8>> = batch.iter().map(|(k, _)| k.clone()).collect();
    let pdus: Vec<Value> = batch.iter().filter_map(|(_, id)| app.store.get_event(id).ok().flatten().map(|e| e.pdu)).collect();
    let first = u64::from_be_bytes(keys[0][keys[0].len() - 8..].try_into().expect("queue keys end in a u64"));
    let last = u64::from_be_bytes(keys[keys.len() - 1][keys[keys.len() - 1].len() - 8..].try_into().expect("queue keys end in a u64"));
    let txn_id = format!("fl{first}-{last}");
    let body = json!({ "origin": app.server_name, "origin_server_ts": now_ms(), "pdus": pdus, "edus": [] });
    let path = format!("/_matrix/federation/v1/send/{}", enc(&txn_id));
    let result = app.client.request(dest, Method::PUT, &path, Some(&body)).await;
    let mut statuses = app.destinations.lock().expect("lock");
    let status = statuses.entry(dest.to_owned()).or_default();
    match result {
        Ok(resp) => {
            if let Some(errors) = resp.get("pdus").and_then(Value::as_object) {
                for (id, r) in errors.iter().filter(|(_, r)| r.get("error").is_some()) {
                    tracing::warn!(%dest, event_id = %id, error = %r["error"], "destination rejected a PDU");
                    app.metrics.outbox_pdus.with_label_values(&["rejected_by_peer"]).inc();
                }
            }
            if let Err(e) = app.store.outbox_remove(&keys) {
                tracing::error!(%dest, error = %e, "cannot dequeue delivered PDUs");
            }
            app.metrics.outbox_transactions.with_label_values(&["ok"]).inc();
            app.metrics.outbox_pdus.with_label_values(&["delivered"]).inc_by(keys.len() as u64);
            status.failures = 0;
            status.next_attempt_ms = 0;
            status.last_success_ms = Some(now_ms());
            status.delivered += keys.len() as u64;
            tracing::info!(%dest, %txn_id, pdus = keys.len(), "transaction delivered");
            None
        }
        Err(e) if e.is_transient() => {
            status.failures += 1;
            status.last_error = Some(e.to_string());
            status.next_attempt_ms = now_ms() + Backoff::DEFAULT.delay(status.failures).as_millis() as u64;
            app.metrics.outbox_transactions.with_label_values(&["transient_error"]).inc();
            tracing::warn!(%dest, failures = status.failures, error = %e, "transaction failed; will retry");
            Some(status.next_attempt_ms)
        }
        Err(e) => {
            status.last_error = Some(e.to_string());
            app.metrics.outbox_transactions.with_label_values(&["dead"]).inc();
            app.metrics.outbox_pdus.with_label_values(&["dead"]).inc_by(keys.len() as u64);
            tracing::error!(%dest, error = %e, pdus = keys.len(), "destination refused the transaction; moved to dead letters");
            if let Err(e2) = app.store.outbox_kill(&keys, &e.to_string()) {
                tracing::error!(%dest, error = %e2, "cannot move PDUs to dead letters");
            }
            None
        }
    }
}

/// The admin API's view of destinations.
pub fn destinations_report(app: &Fedlink) -> Value {
    let queued = app.store.outbox_destinations().unwrap_or_default();
    let dead = app.store.dead_letter_counts().unwrap_or_default();
    let statuses = app.destinations.lock().expect("lock").clone();
    let mut names: Vec<&String> = queued.keys().chain(dead.keys()).chain(statuses.keys()).collect();
    names.sort();
    names.dedup();
    let list: Vec<Value> = names
        .into_iter()
        .map(|d| {
            let s = statuses.get(d).cloned().unwrap_or_default();
            json!({
                "destination": d,
                "queue_depth": queued.get(d).copied().unwrap_or(0),
                "dead_letters": dead.get(d).copied().unwrap_or(0),
                "failures": s.failures,
                "next_attempt_ms": s.next_attempt_ms,
                "last_success_ms": s.last_success_ms,
                "last_error": s.last_error,
                "delivered": s.delivered,
            })
        })
        .collect();
    json!({ "destinations": list })
}
