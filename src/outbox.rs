//! The outbox worker: delivers queued PDUs to each destination in federation transactions
//! (at most 50 PDUs each), in queue order, each destination in its own lane
//! ([`crate::lanes`]: one transaction in flight, its own backoff), retrying when a server is down or
//! answers 5xx/429, and moving a batch to the dead letters when the server refuses it for
//! good (4xx). Queue entries are written in the same sled transaction as the log records
//! that caused them, so a restart resumes delivery; an entry is removed only after the
//! destination answered 200, so nothing is lost (a crash in between re-sends the same
//! transaction id, which the receiver deduplicates).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::{
    node::{now_ms, Fedlink},
    core::backoff::Backoff,
    federation::client::enc,
    lanes::{Lanes, Step},
};

/// PDUs per transaction (the spec's limit).
pub const MAX_PDUS_PER_TXN: usize = 50;

/// The outbox service's own state: one lane per destination, and its wake-up.
pub struct Outbox {
    /// Per-destination lanes: one transaction in flight per destination, own backoff.
    pub lanes: Arc<Lanes>,
    /// Wakes the worker when something is queued.
    pub wake: Notify,
}

impl Outbox {
    /// The outbox for `metrics`, stopping with `stop`.
    pub fn new(metrics: Arc<crate::metrics::Metrics>, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { lanes: Lanes::new("outbox", Backoff::DEFAULT, metrics, stop), wake: Notify::new() }
    }
}

/// Hands every destination with queued PDUs to its lane until `stop`.
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
        for dest in dests.keys() {
            app.outbox.lanes.kick_for(dest, &app, |a, d| async move { deliver_batch(&a, &d).await });
        }
        tokio::select! {
            _ = app.outbox.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Send one transaction to `dest`.
async fn deliver_batch(app: &Fedlink, dest: &str) -> Step {
    let batch = match app.store.outbox_batch(dest, MAX_PDUS_PER_TXN) {
        Ok(b) if !b.is_empty() => b,
        Ok(_) => return Step::Done { delivered: 0, more: false },
        Err(e) => return Step::Failed(format!("cannot read the outbox: {e}")),
    };
    let keys: Vec<Vec<u8>> = batch.iter().map(|(k, _)| k.clone()).collect();
    let pdus: Vec<Value> = batch.iter().filter_map(|(_, id)| app.store.get_event(id).ok().flatten().map(|e| e.pdu)).collect();
    let first = u64::from_be_bytes(keys[0][keys[0].len() - 8..].try_into().expect("queue keys end in a u64"));
    let last = u64::from_be_bytes(keys[keys.len() - 1][keys[keys.len() - 1].len() - 8..].try_into().expect("queue keys end in a u64"));
    let txn_id = format!("fl{first}-{last}");
    let body = json!({ "origin": app.server_name, "origin_server_ts": now_ms(), "pdus": pdus, "edus": [] });
    let path = format!("/_matrix/federation/v1/send/{}", enc(&txn_id));
    match app.client.request(dest, Method::PUT, &path, Some(&body)).await {
        Ok(resp) => {
            if let Some(errors) = resp.get("pdus").and_then(Value::as_object) {
                for (id, r) in errors.iter().filter(|(_, r)| r.get("error").is_some()) {
                    tracing::warn!(%dest, event_id = %id, error = %r["error"], "destination rejected a PDU");
                    app.metrics.outbox_pdus.with_label_values(&["rejected_by_peer"]).inc();
                }
            }
            if let Err(e) = app.store.outbox_remove(&keys) {
                tracing::error!(%dest, error = %e, "cannot dequeue delivered PDUs");
                return Step::Failed(format!("cannot dequeue delivered PDUs: {e}"));
            }
            app.metrics.outbox_transactions.with_label_values(&["ok"]).inc();
            app.metrics.outbox_pdus.with_label_values(&["delivered"]).inc_by(keys.len() as u64);
            tracing::info!(%dest, %txn_id, pdus = keys.len(), "transaction delivered");
            Step::Done { delivered: keys.len() as u64, more: keys.len() == MAX_PDUS_PER_TXN }
        }
        Err(e) if e.is_transient() => {
            app.metrics.outbox_transactions.with_label_values(&["transient_error"]).inc();
            Step::Failed(e.to_string())
        }
        Err(e) => {
            app.metrics.outbox_transactions.with_label_values(&["dead"]).inc();
            app.metrics.outbox_pdus.with_label_values(&["dead"]).inc_by(keys.len() as u64);
            tracing::error!(%dest, error = %e, pdus = keys.len(), "destination refused the transaction; moved to dead letters");
            if let Err(e2) = app.store.outbox_kill(&keys, &e.to_string()) {
                tracing::error!(%dest, error = %e2, "cannot move PDUs to dead letters");
            }
            // The destination answered: the lane goes on with what is queued after.
            Step::Done { delivered: 0, more: true }
        }
    }
}

/// The admin API's view of destinations.
pub fn destinations_report(app: &Fedlink) -> Value {
    let queued = app.store.outbox_destinations().unwrap_or_default();
    let dead = app.store.dead_letter_counts().unwrap_or_default();
    let statuses = app.outbox.lanes.report();
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
