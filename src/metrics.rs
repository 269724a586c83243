//! Prometheus metrics, all named `fedlink_*`. Labels carry only small fixed sets (results,
//! reasons, EDU types), never user, room or event ids.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Every metric fedlink exports.
pub struct Metrics {
    registry: Registry,
    /// PDUs received over `/send`, by result (`accepted`, `soft_failed`, `duplicate`, `rejected`).
    pub pdus_received: IntCounterVec,
    /// PDUs rejected, by reason.
    pub pdus_rejected: IntCounterVec,
    /// Signature checks of received PDUs, by the thread that did them (`pool`: the checking
    /// threads; `caller`: the transaction's own thread).
    pub signature_checks: IntCounterVec,
    /// EDUs received, by type and result (`logged`, `ignored`, `rejected`).
    pub edus_received: IntCounterVec,
    /// Transactions, by result (`ok`, `retransmit`, `rejected`).
    pub transactions: IntCounterVec,
    /// Time to process a `/send` transaction.
    pub transaction_seconds: Histogram,
    /// Requests refused before reaching a handler, by reason.
    pub requests_rejected: IntCounterVec,
    /// Remote key fetches, by result.
    pub key_fetches: IntCounterVec,
    /// Invites to the bot, by result.
    pub invites: IntCounterVec,
    /// Join attempts, by result.
    pub joins: IntCounterVec,
    /// Outbound federation requests, by result (`ok`, `http_error`, `network_error`).
    pub outbound_requests: IntCounterVec,
    /// `get_missing_events` calls to fill gaps, by result.
    pub gap_fills: IntCounterVec,
    /// Events fetched and accepted for checking through gap filling.
    pub gap_events_fetched: IntCounter,
    /// PDUs waiting in the outbox.
    pub outbox_pending: IntGauge,
    /// Outbound transactions by result (`ok`, `transient_error`, `dead`).
    pub outbox_transactions: IntCounterVec,
    /// Outbound PDUs by result (`delivered`, `dead`, `rejected_by_peer`).
    pub outbox_pdus: IntCounterVec,
    /// Invites fedlink sent for linked accounts, by result.
    pub invites_sent: IntCounterVec,
    /// Reconciler decisions by kind.
    pub reconcile_actions: IntCounterVec,
    /// Joins and leaves served to other servers, by kind and result.
    pub served_membership: IntCounterVec,
    /// Actions through the application-service route, by kind and result.
    pub actions: IntCounterVec,
    /// Actions no route supports, by kind.
    pub unsupported_actions: IntCounterVec,
    /// Read receipts received, by source (`federation`, `appservice`).
    pub receipts_in: IntCounterVec,
    /// Time from a read arriving to the sibling's homeserver accepting the propagated read.
    pub read_propagation_seconds: Histogram,
    /// Application-service transactions received, by result.
    pub appservice_transactions: IntCounterVec,
    /// HTTP directory lookups by result.
    pub directory_lookups: IntCounterVec,
    /// Commands people sent the bot, by command and result (`ok`, `refused`, `not_understood`).
    pub bot_commands: IntCounterVec,
    /// Messages the bot sent, by kind (`reply`, `told`, `encrypted`, `tell`) and result
    /// (`ok`, `error`).
    pub bot_messages: IntCounterVec,
    /// Chats the bot left because they stopped being direct chats, by result (`ok`, `error`).
    pub bot_chats_left: IntCounterVec,
    /// Self-service link requests, by outcome (`requested`, `confirmed`, `refused`,
    /// `expired`, `replaced`).
    pub link_requests: IntCounterVec,
    /// Persons by how far they are in step (`core::step`).
    pub persons: prometheus::IntGaugeVec,
    /// (room, account) pairs of linked persons by state.
    pub account_rooms: prometheus::IntGaugeVec,
    /// PDUs in dead letters (refused by their destination), all destinations.
    pub dead_letters: IntGauge,
    /// How long the account longest out of step has been so, in seconds.
    pub out_of_step_oldest_seconds: prometheus::Gauge,
    /// Records in the event log.
    pub log_entries: IntGauge,
    /// Records appended, by kind.
    pub log_appends: IntCounterVec,
    /// sled size on disk.
    pub storage_bytes: IntGauge,
    pub storage_compressed: IntGauge,
    /// Rooms the bot is joined to.
    pub rooms_joined: IntGauge,
    /// Rooms with an invite pending a join.
    pub rooms_pending_join: IntGauge,
    /// Views snapshots written.
    pub views_snapshots: IntCounter,
    /// Rooms written by views checkpoints.
    pub views_checkpoint_rooms: IntCounter,
    /// Bytes written by views checkpoints.
    pub views_checkpoint_bytes: IntCounter,
    /// Items of registration pushes dropped because they spoke for another server's users.
    pub appservice_foreign_items: IntCounter,
    /// Pushed room events and receipts not logged, by reason (`bot_in_room`: its PDUs are
    /// the truth; `not_linked`, `receipt_not_linked`: of accounts nobody linked).
    pub appservice_events_dropped: IntCounterVec,
    /// PDUs kept for rooms whose join is under way, by what became of them
    /// (`parked`, `applied`, `dropped`, `refused`).
    pub parked_pdus: IntCounterVec,
    /// PDUs waiting for a join to land.
    pub parked_pending: IntGauge,
    /// Rooms whose join fedlink gave up (until a new invite or an admin request).
    pub rooms_join_failed: IntGauge,
    /// Destinations currently backing off, per queue (`outbox`, `invites`, `actions`).
    pub destinations_backing_off: prometheus::IntGaugeVec,
    /// Backed-off destinations woken early because the server contacted fedlink, per queue.
    pub destination_wakeups: IntCounterVec,
    /// Inbound federation requests refused with 429 because their origin had too many in flight.
    pub inbound_rate_limited: IntCounter,
    /// Invites for the bot refused by policy, by reason (`invites_from`, `max_rooms`).
    pub bot_invites_refused: IntCounterVec,
    /// Time of a reconcile pass, by pass (`incremental`: the touched rooms; `full`).
    pub reconcile_seconds: HistogramVec,
    /// Time of each phase of an inbound transaction (`prepare`: parse, signatures and
    /// fetches, no lock; `wait`: for the ingest lock; `apply`: auth checks and logging;
    /// `flush`: making it durable).
    pub ingest_phase_seconds: HistogramVec,
    /// Linked accounts caught up on their rooms through a registration, by result.
    pub catch_up: IntCounterVec,
    /// Memberships logged by catching linked accounts up.
    pub catch_up_memberships: IntCounterVec,
    /// Periodic returns of freed heap pages to the system (`memory.trim_secs`).
    pub memory_trims: IntCounter,
    /// Resident memory those returns took back from fedlink, in bytes.
    pub memory_trimmed_bytes: IntCounter,
    /// Time of one return of freed heap pages.
    pub memory_trim_seconds: Histogram,
    /// Event id lookups by how the filter of known ids answered them (set at each scrape
    /// from the store's counts: see [`Metrics::observe_known_ids`]).
    pub event_filter_lookups: IntCounterVec,
    /// Size of the filter of known event ids.
    pub event_filter_bytes: IntGauge,
    /// Ids the filter of known event ids holds.
    pub event_filter_ids: IntGauge,
    /// Layers of the filter of known event ids.
    pub event_filter_layers: IntGauge,
    /// Serialises [`Metrics::observe_known_ids`] (concurrent scrapes).
    known_ids_observed: std::sync::Mutex<()>,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric definition");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::IntGaugeVec {
    let g = prometheus::IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

impl Metrics {
    /// Create and register all metrics.
    pub fn new() -> Self {
        let r = Registry::new();
        gauge_vec(&r, "fedlink_build_info", "fedlink's version (always 1)", &["version"]).with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())).expect("process metrics registered once");
        let transaction_seconds = Histogram::with_opts(
            HistogramOpts::new("fedlink_transaction_duration_seconds", "Time to process an inbound /send transaction")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("static metric definition");
        r.register(Box::new(transaction_seconds.clone())).expect("metric registered once");
        let views_snapshots = IntCounter::new("fedlink_views_snapshots_total", "Views snapshots written").expect("static");
        r.register(Box::new(views_snapshots.clone())).expect("metric registered once");
        Self {
            pdus_received: counter_vec(&r, "fedlink_pdus_received_total", "PDUs received over /send by result", &["result"]),
            pdus_rejected: counter_vec(&r, "fedlink_pdus_rejected_total", "PDUs rejected by reason", &["reason"]),
            signature_checks: counter_vec(&r, "fedlink_signature_checks_total", "Signature checks of PDUs received over /send, by the thread that did them: pool (the checking threads, one fewer than the cores) or caller (the transaction's own thread, rather than wait)", &["by"]),
            edus_received: counter_vec(&r, "fedlink_edus_received_total", "EDUs received by type and result", &["edu_type", "result"]),
            transactions: counter_vec(&r, "fedlink_transactions_total", "Inbound transactions by result", &["result"]),
            transaction_seconds,
            requests_rejected: counter_vec(&r, "fedlink_requests_rejected_total", "Federation requests refused by reason", &["reason"]),
            key_fetches: counter_vec(&r, "fedlink_key_fetches_total", "Remote server key fetches by result", &["result"]),
            invites: counter_vec(&r, "fedlink_invites_received_total", "Invites for the bot by result", &["result"]),
            joins: counter_vec(&r, "fedlink_joins_total", "Bot join attempts by result", &["result"]),
            outbound_requests: counter_vec(&r, "fedlink_outbound_requests_total", "Outbound federation requests by result", &["result"]),
            gap_fills: counter_vec(&r, "fedlink_gap_fills_total", "get_missing_events calls to fill gaps, by result", &["result"]),
            gap_events_fetched: {
                let c = IntCounter::new("fedlink_gap_events_fetched_total", "Missing events fetched to fill gaps").expect("static");
                r.register(Box::new(c.clone())).expect("metric registered once");
                c
            },
            outbox_pending: gauge(&r, "fedlink_outbox_pending_pdus", "PDUs waiting in the outbox"),
            outbox_transactions: counter_vec(&r, "fedlink_outbox_transactions_total", "Outbound transactions by result", &["result"]),
            outbox_pdus: counter_vec(&r, "fedlink_outbox_pdus_total", "Outbound PDUs by result", &["result"]),
            invites_sent: counter_vec(&r, "fedlink_invites_sent_total", "Invites fedlink sent for linked accounts, by result", &["result"]),
            reconcile_actions: counter_vec(&r, "fedlink_reconcile_actions_total", "Reconciler decisions by kind", &["action"]),
            served_membership: counter_vec(&r, "fedlink_served_membership_total", "make/send join and leave served, by endpoint and result", &["endpoint", "result"]),
            actions: counter_vec(&r, "fedlink_appservice_actions_total", "Actions through the appservice route by kind and result", &["kind", "result"]),
            unsupported_actions: counter_vec(&r, "fedlink_unsupported_actions_total", "Actions no route supports, by kind", &["kind"]),
            receipts_in: counter_vec(&r, "fedlink_receipts_received_total", "Read receipts received by source", &["source"]),
            read_propagation_seconds: {
                let h = Histogram::with_opts(
                    HistogramOpts::new("fedlink_read_propagation_seconds", "From a read arriving to the sibling's homeserver accepting the propagated read")
                        .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
                )
                .expect("static metric definition");
                r.register(Box::new(h.clone())).expect("metric registered once");
                h
            },
            appservice_transactions: counter_vec(&r, "fedlink_appservice_transactions_total", "Appservice transactions received by result", &["result"]),
            directory_lookups: counter_vec(&r, "fedlink_directory_lookups_total", "HTTP directory lookups by result", &["result"]),
            bot_commands: counter_vec(&r, "fedlink_bot_commands_total", "Commands people sent the bot in its direct chats, by command and result", &["command", "result"]),
            bot_messages: counter_vec(&r, "fedlink_bot_messages_total", "Messages the bot sent in its direct chats, by kind and result", &["kind", "result"]),
            bot_chats_left: counter_vec(&r, "fedlink_bot_chats_left_total", "Chats the bot left because they stopped being direct chats (the owner left, someone else came in), by result", &["result"]),
            link_requests: counter_vec(&r, "fedlink_link_requests_total", "Self-service link requests by outcome", &["outcome"]),
            log_entries: gauge(&r, "fedlink_log_entries", "Records in the event log"),
            log_appends: counter_vec(&r, "fedlink_log_appends_total", "Log records appended by kind", &["kind"]),
            storage_bytes: gauge(&r, "fedlink_storage_bytes", "Size of the sled database on disk"),
            storage_compressed: gauge(&r, "fedlink_storage_compressed", "1 when sled's pages are written zstd-compressed (storage.compression, fixed when the database was created)"),
            rooms_joined: gauge(&r, "fedlink_rooms_joined", "Rooms the bot is joined to"),
            rooms_pending_join: gauge(&r, "fedlink_rooms_pending_join", "Rooms with an accepted invite whose join has not completed"),
            views_snapshots,
            views_checkpoint_rooms: counter(&r, "fedlink_views_checkpoint_rooms_total", "Rooms written by views checkpoints (only the rooms that changed)"),
            views_checkpoint_bytes: counter(&r, "fedlink_views_checkpoint_bytes_total", "Bytes written by views checkpoints"),
            appservice_events_dropped: counter_vec(&r, "fedlink_appservice_events_dropped_total", "Pushed room events not logged, by reason", &["reason"]),
            appservice_foreign_items: counter(&r, "fedlink_appservice_foreign_items_total", "Registration push items dropped because they spoke for another server's users"),
            parked_pdus: counter_vec(&r, "fedlink_parked_pdus_total", "PDUs kept for rooms whose join is under way, by outcome", &["result"]),
            parked_pending: gauge(&r, "fedlink_parked_pdus", "PDUs waiting for a join of the bot to land"),
            rooms_join_failed: gauge(&r, "fedlink_rooms_join_failed", "Rooms whose join fedlink gave up"),
            destinations_backing_off: {
                let g = prometheus::IntGaugeVec::new(Opts::new("fedlink_destinations_backing_off", "Destinations backing off after failures, per queue"), &["queue"]).expect("static metric definition");
                r.register(Box::new(g.clone())).expect("metric registered once");
                g
            },
            destination_wakeups: counter_vec(&r, "fedlink_destination_wakeups_total", "Backed-off destinations woken early because the server contacted fedlink", &["queue"]),
            inbound_rate_limited: counter(&r, "fedlink_inbound_rate_limited_total", "Inbound federation requests refused with 429 (too many in flight from one origin)"),
            bot_invites_refused: counter_vec(&r, "fedlink_bot_invites_refused_total", "Invites for the bot refused by policy, by reason", &["reason"]),
            reconcile_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new("fedlink_reconcile_duration_seconds", "Time of a reconcile pass (incremental: the rooms touched since the last pass)")
                        .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
                    &["pass"],
                )
                .expect("static metric definition");
                r.register(Box::new(h.clone())).expect("metric registered once");
                h
            },
            ingest_phase_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new("fedlink_ingest_phase_duration_seconds", "Time of each phase of an inbound /send transaction: prepare (parse and keys, with the signatures checked on other threads meanwhile; gap fills; no lock; a linear transaction of more than 8 PDUs and at most 256 KiB is not waited for: its checks go on during wait and apply), wait (for the ingest lock), apply (auth checks, fold and write, under the ingest lock), flush (until durable); parts of apply: views_wait, waiting for the views' write lock (held by readers: reconcile, checkpoints, the admin API); for linear transactions, checks_here (checking signatures on the admitting thread, under the lock) and checks_wait (waiting for another thread's check); refill (rare: a linear transaction whose named event failed its check: gap fills with the lock let go, and taking it again)")
                        .buckets(vec![0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0]),
                    &["phase"],
                )
                .expect("static metric definition");
                r.register(Box::new(h.clone())).expect("metric registered once");
                h
            },
            dead_letters: gauge(&r, "fedlink_dead_letters", "PDUs in dead letters (refused by their destination; POST .../destinations/{server}/retry requeues)"),
            persons: gauge_vec(&r, "fedlink_persons", "Linked persons by state: in_step, catching_up, unsupported, blocked, opted_out", &["state"]),
            account_rooms: gauge_vec(&r, "fedlink_account_rooms", "Rooms x accounts of linked persons by state", &["state"]),
            out_of_step_oldest_seconds: {
                let g = prometheus::Gauge::new("fedlink_out_of_step_oldest_seconds", "How long the account catching up longest in a room has been so (since fedlink started)").expect("static");
                r.register(Box::new(g.clone())).expect("metric registered once");
                g
            },
            catch_up: counter_vec(&r, "fedlink_catch_up_accounts_total", "Linked accounts caught up on their memberships (joined, invited, left) through a registration, by result", &["result"]),
            catch_up_memberships: counter_vec(&r, "fedlink_catch_up_memberships_total", "Memberships logged by catching linked accounts up, by membership (join, invite, leave, ban)", &["membership"]),
            event_filter_lookups: counter_vec(
                &r,
                "fedlink_event_filter_lookups_total",
                "Lookups of an event id in the event index, by the in-memory filter's answer: absent (no read), present and false_maybe (read: held, not held), unfiltered (read: no filter ready yet, at start)",
                &["answer"],
            ),
            event_filter_bytes: gauge(&r, "fedlink_event_filter_bytes", "Size of the in-memory filter of the event ids the event index holds"),
            known_ids_observed: std::sync::Mutex::new(()),
            event_filter_ids: gauge(&r, "fedlink_event_filter_ids", "Ids added to the in-memory event id filter in use (scanned or written; an id written while the filter was built, or written again, counts twice): when its newest layer holds more than it was sized for, a layer four times as large is added"),
            event_filter_layers: gauge(&r, "fedlink_event_filter_layers", "Layers of the in-memory event id filter: it grows by adding a layer four times as large as the last when that is full (each full layer answers about one fresh id in a thousand wrongly \"maybe\")"),
            memory_trims: counter(&r, "fedlink_memory_trims_total", "Trims run: times fedlink asked the allocator to give its free pages back to the system (memory.trim_secs)"),
            memory_trimmed_bytes: counter(&r, "fedlink_memory_trimmed_bytes_total", "Resident memory given back to the system by those trims, in bytes (approximate: the fall of RSS across each trim, which other threads move too)"),
            memory_trim_seconds: {
                let h = Histogram::with_opts(
                    HistogramOpts::new("fedlink_memory_trim_duration_seconds", "Time of one trim (each arena's lock is held while it is trimmed)")
                        .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5]),
                )
                .expect("static metric definition");
                r.register(Box::new(h.clone())).expect("metric registered once");
                h
            },
            registry: r,
        }
    }

    /// Bring the event id filter's metrics up to the store's counts.
    pub fn observe_known_ids(&self, counts: impl FnOnce() -> crate::known_ids::Counts) {
        let _one_at_a_time = self.known_ids_observed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = counts();
        for (answer, n) in [("absent", c.absent), ("present", c.present), ("false_maybe", c.false_maybe), ("unfiltered", c.unfiltered)] {
            let m = self.event_filter_lookups.with_label_values(&[answer]);
            m.inc_by(n.saturating_sub(m.get()));
        }
        self.event_filter_bytes.set(c.bytes as i64);
        self.event_filter_ids.set(c.ids as i64);
        self.event_filter_layers.set(c.layers as i64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
