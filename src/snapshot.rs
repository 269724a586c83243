//! The snapshot worker: writes a views snapshot every few seconds when the log has grown,
//! keeps the storage gauge current, prunes old transaction answers hourly, and gives freed
//! heap pages back to the system every `memory.trim_secs`.

use std::{sync::Arc, time::Duration};

use crate::node::{now_ms, Fedlink};

/// How long transaction answers are kept for retransmits.
const TXN_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// Writes a views snapshot every few seconds when the log has grown.
pub async fn worker(app: Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut last = app.views.read().await.folded_seq;
    let mut last_prune = std::time::Instant::now();
    let trim_every = Duration::from_secs(app.cfg.memory.trim_secs);
    let mut last_trim = std::time::Instant::now();
    if trim_every.is_zero() || !crate::memory::SUPPORTED {
        tracing::info!(memory.trim_secs = trim_every.as_secs(), supported = crate::memory::SUPPORTED, "freed heap pages are not given back periodically");
    }
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
        if !trim_every.is_zero() && crate::memory::SUPPORTED && last_trim.elapsed() >= trim_every {
            last_trim = std::time::Instant::now();
            trim(&app).await;
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

/// Give the allocator's free pages back to the system, off the async threads.
async fn trim(app: &Fedlink) {
    let started = std::time::Instant::now();
    let Ok((before, after)) = tokio::task::spawn_blocking(|| {
        let before = crate::memory::rss_bytes();
        crate::memory::trim();
        (before, crate::memory::rss_bytes())
    })
    .await
    else {
        return;
    };
    let took = started.elapsed();
    app.metrics.memory_trims.inc();
    app.metrics.memory_trim_seconds.observe(took.as_secs_f64());
    let freed = before.zip(after).map(|(b, a)| b.saturating_sub(a)).unwrap_or(0);
    app.metrics.memory_trimmed_bytes.inc_by(freed);
    tracing::debug!(rss_before = ?before, rss_after = ?after, freed, took_ms = took.as_secs_f64() * 1e3, "gave freed heap pages back to the system");
}
