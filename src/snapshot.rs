//! The snapshot worker: writes a views snapshot every few seconds when the log has grown,
//! keeps the storage gauge current, and prunes old transaction answers hourly.

use std::{sync::Arc, time::Duration};

use crate::node::{now_ms, Fedlink};

/// How long transaction answers are kept for retransmits.
const TXN_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// Writes a views snapshot every few seconds when the log has grown.
pub async fn worker(app: Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut last = app.views.read().await.folded_seq;
    let mut last_prune = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        app.metrics.storage_bytes.set(app.store.size_on_disk() as i64);
        if last_prune.elapsed() > Duration::from_secs(3600) {
            last_prune = std::time::Instant::now();
            match app.store.prune_txns(now_ms().saturating_sub(TXN_RETENTION_MS)) {
                Ok(n) if n > 0 => tracing::info!(removed = n, "pruned old transaction answers"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot prune transaction answers"),
            }
        }
        let now = app.views.read().await.folded_seq;
        if now != last {
            match app.snapshot().await {
                Ok(()) => last = now,
                Err(e) => tracing::warn!(error = %e, "views snapshot failed"),
            }
        }
    }
}
