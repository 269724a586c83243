//! The shared node: what every handler and worker reaches through [`Fedlink`]. The log
//! writer (store, views, the ingest lock, [`Fedlink::append`] and its change notifications),
//! the keys, the outbound client, the metrics, and the handles of the services, each of
//! which owns its own retry and status state ([`crate::federation::membership::Joins`],
//! [`crate::outbox::Outbox`], [`crate::sync::SyncState`], the inbound limit). Built by
//! [`crate::app`], which nothing imports.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use ruma::{OwnedServerName, OwnedUserId};
use tokio::sync::RwLock;

use crate::{
    config::Config,
    core::{
        log_entry::{Entry, LogRecord},
        views::Views,
    },
    federation::client::FederationClient,
    keys::{RemoteKeys, SigningKey},
    metrics::Metrics,
    store::{Store, StoreError},
};

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Retry state of something fedlink keeps trying (a join, an invite delivery, an action
/// through a registration), for the workers and the admin API.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RetryStatus {
    /// Consecutive failures.
    pub failures: u32,
    /// Of those, refusals that may pass later (counted apart so network errors do not
    /// use up their retries).
    pub not_yet: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// When the next attempt is due (ms since the epoch).
    pub next_attempt_ms: u64,
}

impl RetryStatus {
    /// Record a failure worth retrying; returns when the next attempt is due.
    pub fn fail_transient(&mut self, reason: String) -> u64 {
        self.failures += 1;
        self.last_error = Some(reason);
        self.next_attempt_ms = now_ms() + crate::core::backoff::Backoff::DEFAULT.delay(self.failures).as_millis() as u64;
        self.next_attempt_ms
    }
}

/// The ingest lock, held. On release it forgets the state roots recorded for events it
/// admitted but did not write (rejected, or refused after their check), so they neither
/// pile up in memory nor describe events the log does not hold.
pub struct IngestGuard<'a> {
    store: &'a crate::store::Store,
    _lock: tokio::sync::MutexGuard<'a, ()>,
}

impl Drop for IngestGuard<'_> {
    fn drop(&mut self) {
        // Runs before the lock field is released.
        let n = self.store.forget_pending_roots();
        if n > 0 {
            tracing::debug!(roots = n, "forgot the state recorded for events admitted but not written");
        }
    }
}

/// Records folded into the views ahead of their write to the log: a federation
/// transaction's PDUs are admitted one after the other (each against the views the earlier
/// ones made) and written together, in one log transaction instead of one per PDU.
pub struct Batch<'a> {
    app: &'a Fedlink,
    views: tokio::sync::RwLockWriteGuard<'a, Views>,
    records: Vec<LogRecord>,
    done: bool,
}

impl Batch<'_> {
    /// The views, including the records added so far.
    pub fn views(&self) -> &Views {
        &self.views
    }

    /// Number, fold and keep `entry`; PDUs are staged in the store so later events of the
    /// batch find them (auth events, parents).
    pub fn push(&mut self, entry: Entry) {
        let seq = self.app.store.next_seq() + self.records.len() as u64;
        let rec = LogRecord { v: crate::core::log_entry::LOG_FORMAT, seq, at_ms: now_ms(), entry };
        if let Entry::Pdu(p) = &rec.entry {
            self.app.store.stage(p);
        }
        self.views.apply(&rec);
        self.records.push(rec);
    }

    /// Write the batch (with a federation transaction's answer) in one log transaction.
    /// Not yet durable: the caller flushes before acknowledging.
    pub fn commit(mut self, txn: Option<(&str, &str, &serde_json::Value)>) -> Result<Vec<LogRecord>, StoreError> {
        let records = std::mem::take(&mut self.records);
        if let Err(e) = self.app.store.append_records(&records, txn, now_ms()) {
            self.records = records;
            return Err(e); // Drop unstages and folds the views again
        }
        self.app.store.unstage();
        self.done = true;
        let kinds: Vec<&'static str> = records.iter().map(|r| r.entry.kind()).collect();
        let moves_bot = records.iter().any(|r| r.entry.moves_bot());
        self.app.appended(&self.views, &kinds, moves_bot);
        self.app.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(records)
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.done || self.records.is_empty() {
            self.app.store.unstage();
            return;
        }
        // The views hold records the log does not: fold them again from the log.
        self.app.store.unstage_dropped();
        tracing::warn!(records = self.records.len(), "a batch was not written; folding the views again from the log");
        match fold_views(&self.app.store, self.app.bot.clone(), false) {
            Ok(v) => *self.views = v,
            Err(e) => {
                // Views ahead of the log would skip the next records and could be
                // checkpointed so: stop, and let a restart fold them from the log.
                tracing::error!(error = %format!("{e:#}"), "cannot fold the views again from the log; stopping");
                std::process::abort();
            }
        }
    }
}

/// Everything a handler or worker needs.
pub struct Fedlink {
    /// The validated config.
    pub cfg: Config,
    /// Our server name.
    pub server_name: OwnedServerName,
    /// The bot's user id.
    pub bot: OwnedUserId,
    /// Our signing key.
    pub key: Arc<SigningKey>,
    /// Storage.
    pub store: Arc<Store>,
    /// Outbound client.
    pub client: Arc<FederationClient>,
    /// Remote key cache.
    pub keys: Arc<RemoteKeys>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The folded views.
    pub views: RwLock<Views>,
    /// Serialises check-against-state, append and fold: take it with
    /// [`Fedlink::lock_ingest`].
    ingest: tokio::sync::Mutex<()>,
    /// Bumped on every append: the reconcile worker runs when it changes.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// Tells every worker and lane to stop.
    pub stop: tokio::sync::watch::Sender<bool>,
    /// The join service (its lanes and retry state).
    pub joins: crate::federation::membership::Joins,
    /// The outbox service (its lanes).
    pub outbox: crate::outbox::Outbox,
    /// The sync service's delivery state (invite and action lanes, retries).
    pub sync: crate::sync::SyncState,
    /// The bot service's state (wrong link codes).
    pub bot_state: crate::bot::BotState,
    /// In-flight inbound requests per origin (the `rc_federation`-style limit).
    pub inbound: Arc<crate::federation::server::InboundLimit>,
    /// One checkpoint at a time: two interleaved could write an older `meta` over rooms of
    /// a newer one.
    pub checkpoint: tokio::sync::Mutex<()>,
    /// Admin bearer token.
    pub admin_token: String,
    /// Homeservers with an application-service registration (the reconciler's routes).
    pub routes: crate::core::reconcile::Routes,
    /// The registration route's HTTP clients, by homeserver.
    pub appservice_http: std::collections::HashMap<String, reqwest::Client>,
    /// The federation listener accepts connections (set by `app::run`; `GET /ready`).
    pub federation_listening: std::sync::atomic::AtomicBool,
}

impl Fedlink {
    /// Open storage and build the services; folds the log into the views.
    pub fn open(cfg: Config) -> anyhow::Result<Arc<Self>> {
        let key = Arc::new(SigningKey::load_or_create(&cfg.keys.signing_key)?);
        let admin_token = cfg.admin_token()?;
        let (store, compressed) = Store::open_configured(&cfg.storage.path, cfg.storage.cache_mb * 1024 * 1024, cfg.storage.compression)
            .with_context(|| format!("storage.path {}", cfg.storage.path.display()))?;
        let why = match cfg.storage.compression {
            None => "storage.compression unset: an existing database keeps its setting, a new one is compressed",
            Some(_) => "storage.compression set",
        };
        tracing::info!(path = %cfg.storage.path.display(), compressed, configured = ?cfg.storage.compression, "storage opened ({why})");
        let store = Arc::new(store);
        let metrics = Arc::new(Metrics::new());
        metrics.storage_compressed.set(i64::from(compressed));
        let client = Arc::new(FederationClient::new(&cfg, key.clone(), metrics.clone())?);
        let keys = Arc::new(RemoteKeys::new(
            store.clone(),
            client.clone(),
            metrics.clone(),
            &cfg.server_name,
            &key.key_id(),
            &key.public_key_base64(),
            cfg.federation.allowed_servers.clone(),
        ));
        let bot: OwnedUserId = cfg.bot_user_id().try_into().context("bot.localpart")?;
        let views = fold_views(&store, bot.clone(), false)?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let app = Arc::new(Self {
            stop,
            joins: crate::federation::membership::Joins::new(metrics.clone(), stop_rx.clone()),
            outbox: crate::outbox::Outbox::new(metrics.clone(), stop_rx.clone()),
            sync: crate::sync::SyncState::new(metrics.clone(), stop_rx.clone()),
            bot_state: crate::bot::BotState::default(),
            inbound: Arc::new(crate::federation::server::InboundLimit::new(cfg.federation.max_inflight_per_origin)),
            checkpoint: tokio::sync::Mutex::new(()),
            server_name: cfg.server_name.clone().try_into().context("server_name")?,
            bot,
            key,
            store,
            client,
            keys,
            metrics,
            views: RwLock::new(views),
            ingest: tokio::sync::Mutex::new(()),
            changes: tokio::sync::watch::Sender::new(0),
            federation_listening: std::sync::atomic::AtomicBool::new(false),
            appservice_http: crate::appservice::clients(&cfg)?,
            admin_token,
            routes: crate::core::reconcile::Routes {
                invite_siblings: match cfg.sync.invite_siblings {
                    crate::config::InviteSiblingsConfig::OnInvite => crate::core::reconcile::InviteSiblings::OnInvite,
                    crate::config::InviteSiblingsConfig::OnJoin => crate::core::reconcile::InviteSiblings::OnJoin,
                },
                ..cfg
                    .appservice
                    .iter()
                    .filter_map(|a| {
                        Some((
                            OwnedServerName::try_from(a.server_name.as_str()).ok()?,
                            crate::core::reconcile::Route { auto_join: a.auto_join, mirror_leave: a.mirror_leave },
                        ))
                    })
                    .collect()
            },
            cfg,
        });
        Ok(app)
    }

    /// Take the ingest lock: admission (checks against state, which record the state
    /// after each event) and the write of what it admitted happen under one hold.
    pub async fn lock_ingest(&self) -> IngestGuard<'_> {
        IngestGuard { store: &self.store, _lock: self.ingest.lock().await }
    }

    /// Append entries and fold them into the views. Call with the ingest lock held, and
    /// [`Store::flush`] before acknowledging them.
    pub async fn append(
        &self,
        entries: Vec<Entry>,
        txn: Option<(&str, &str, &serde_json::Value)>,
    ) -> Result<Vec<LogRecord>, StoreError> {
        self.append_and_send(entries, txn, &[]).await
    }

    /// [`Fedlink::append`], also queueing PDUs for destinations in the same batch.
    pub async fn append_and_send(
        &self,
        entries: Vec<Entry>,
        txn: Option<(&str, &str, &serde_json::Value)>,
        outbox: &[(String, String)],
    ) -> Result<Vec<LogRecord>, StoreError> {
        let kinds: Vec<&'static str> = entries.iter().map(Entry::kind).collect();
        let moves_bot = entries.iter().any(Entry::moves_bot);
        // The views lock is taken before the log's: records are folded in the order they
        // were numbered (the views skip a record older than one already folded).
        let mut views = self.views.write().await;
        let records = self.store.append(entries, txn, outbox, now_ms())?;
        for r in &records {
            views.apply(r);
        }
        self.appended(&views, &kinds, moves_bot);
        drop(views);
        // Wake the workers only once the views show what was appended.
        if !outbox.is_empty() {
            self.outbox.wake.notify_one();
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(records)
    }

    /// Metrics after records were appended and folded.
    fn appended(&self, views: &Views, kinds: &[&'static str], moves_bot: bool) {
        // Counting rooms costs O(rooms): only when the bot's rooms may have changed.
        if moves_bot {
            self.update_view_gauges(views);
        }
        for k in kinds {
            self.metrics.log_appends.with_label_values(&[k]).inc();
        }
        self.metrics.log_entries.set(self.store.last_seq() as i64);
    }

    /// Start a batch: records folded as they are added and written to the log in one
    /// transaction by [`Batch::commit`]. The batch holds the views' write lock throughout,
    /// so nothing reads views ahead of the log; if it is dropped or its write fails, the
    /// views are folded again from the log.
    pub async fn batch(&self) -> Batch<'_> {
        Batch { app: self, views: self.views.write().await, records: Vec::new(), done: false }
    }

    /// Set the room gauges from `views`.
    pub fn update_view_gauges(&self, views: &Views) {
        let joined = views.index.joined.len();
        let pending = views.index.joining.len();
        let failed = views.index.join_failed.len();
        self.metrics.rooms_join_failed.set(failed as i64);
        self.metrics.rooms_joined.set(joined as i64);
        self.metrics.rooms_pending_join.set(pending as i64);
    }

    /// Write a views checkpoint: the rooms changed since the last one, and the non-room
    /// part. The set is taken under the write lock, then the lock is downgraded while the
    /// changed rooms are serialised, and released before the write and flush; on failure
    /// the set is put back.
    pub async fn snapshot(&self) -> Result<(), StoreError> {
        let _one = self.checkpoint.lock().await;
        let mut views = self.views.write().await;
        let taken = std::mem::replace(&mut views.unsaved, crate::core::views::Touched::none());
        let views = views.downgrade();
        let rooms = if taken.all { views.rooms.len() } else { taken.rooms.len() };
        let batch = self.store.views_batch(&views, (!taken.all).then_some(&taken.rooms));
        drop(views);
        let written = match batch {
            Ok(b) => {
                let bytes = b.bytes;
                self.store.write_views(b).await.map(|()| bytes)
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(bytes) => {
                self.metrics.views_snapshots.inc();
                self.metrics.views_checkpoint_rooms.inc_by(rooms as u64);
                self.metrics.views_checkpoint_bytes.inc_by(bytes as u64);
                tracing::debug!(rooms, bytes, "views checkpoint written");
                Ok(())
            }
            Err(e) => {
                let mut views = self.views.write().await;
                if taken.all {
                    views.unsaved = crate::core::views::Touched::default();
                } else if !views.unsaved.all {
                    views.unsaved.rooms.extend(taken.rooms);
                }
                Err(e)
            }
        }
    }
}

/// Load the snapshot (unless `rebuild`) and fold every later record.
pub fn fold_views(store: &Store, bot: OwnedUserId, rebuild: bool) -> anyhow::Result<Views> {
    let mut views = match (rebuild, store.load_views()?) {
        (false, Some(v)) if v.bot_user_id == bot => v,
        _ => Views::new(bot),
    };
    let from = views.folded_seq;
    let mut n = 0u64;
    for rec in store.records_to_fold(from) {
        views.apply(&rec?);
        n += 1;
    }
    tracing::info!(from_seq = from, folded = n, rooms = views.rooms.len(), "views ready");
    Ok(views)
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::log_entry::{PduEntry, PersonSet};

    fn open(dir: &std::path::Path) -> Arc<Fedlink> {
        let text = "server_name = \"fedlink.test\"\n[listen]\nfederation = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n\
                    [tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n[keys]\nsigning_key = \"signing.key\"\n[storage]\npath = \"db\"\n\
                    [admin]\ntoken = \"batch-test-admin-token-0123456789\"\n";
        let cfg = Config::from_toml_str(text, std::iter::empty(), dir).unwrap();
        Fedlink::open(cfg).unwrap()
    }

    fn link(person: &str, accounts: &[&str]) -> Entry {
        Entry::PersonSet(PersonSet {
            person: person.into(),
            accounts: accounts.iter().map(|a| OwnedUserId::try_from(*a).unwrap()).collect(),
            source: crate::core::log_entry::LinkSource::Admin,
        })
    }

    fn pdu(event_id: &str) -> Entry {
        Entry::Pdu(PduEntry::test_message(event_id))
    }

    #[tokio::test]
    async fn a_batch_is_seen_while_open_written_whole_or_forgotten_whole() {
        let dir = tempfile::tempdir().unwrap();
        let app = open(dir.path());
        app.append(vec![link("carol", &["@carol:kiwi"])], None).await.unwrap();
        let before = app.views.read().await.clone();

        // Dropped without commit: the views and the store are as the log has them.
        {
            let mut batch = app.batch().await;
            batch.push(link("alice", &["@alice:kiwi", "@alice:litchi"]));
            batch.push(pdu("$staged"));
            app.store.put_state_root_of("$staged", 7); // as admission records it
            assert!(batch.views().directory.persons.contains_key("alice"), "later entries see earlier ones folded");
            assert!(app.store.has_event("$staged").unwrap(), "and the batch's events staged");
        }
        assert_eq!(*app.views.read().await, before, "a dropped batch leaves the views as they were");
        assert!(!app.store.has_event("$staged").unwrap());
        assert_eq!(app.store.state_root_of("$staged").unwrap(), None, "state recorded for a dropped event is forgotten");
        assert_eq!(app.store.last_seq(), 1);

        // Committed: one write, numbered after the log, equal to folding the log again.
        let mut batch = app.batch().await;
        batch.push(link("alice", &["@alice:kiwi", "@alice:litchi"]));
        batch.push(pdu("$written"));
        let records = batch.commit(None).unwrap();
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert!(app.store.has_event("$written").unwrap());
        let refolded = fold_views(&app.store, app.bot.clone(), true).unwrap();
        assert_eq!(*app.views.read().await, refolded);
        // Plain appends go on numbering after it.
        assert_eq!(app.append(vec![link("bob", &["@bob:kiwi"])], None).await.unwrap()[0].seq, 4);
    }
}
