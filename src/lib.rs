//! fedlink: a federation-level linked-identity sync engine for private Matrix federations.
//!
//! fedlink runs under its own federation server name as a real peer of the homeservers.
//! Its bot sits in rooms; everything it accepts goes into an append-only event log in sled;
//! views are folded from that log.
//!
//! # Layout
//! - [`config`]: typed config (TOML + `FEDLINK_*` env), validation naming the bad key.
//! - [`core`]: pure logic, no I/O: log records, the PDU model, views, backoff.
//! - [`store`]: the only module that touches sled (with [`known_ids`], which scans one
//!   tree): log, event index, txn responses, views snapshot, remote key cache.
//! - [`keys`]: our signing key (Synapse file format) and the remote key cache.
//! - [`known_ids`]: an in-memory Bloom filter of the event ids the store's event index
//!   holds, so looking up a fresh event (most lookups) reads nothing.
//! - [`rooms`]: checks on received PDUs (signatures, hashes, authorization rules), event
//!   building, state groups and state resolution v2.
//! - [`federation`]: X-Matrix auth, discovery, the outbound address guard, outbound client,
//!   inbound server, `/send` ingest, the bot's invites and joins, and fedlink as a resident
//!   server (joins, leaves and gap filling served to others).
//! - [`directory`]: changes to linked identities (config, admin API, HTTP directory).
//! - [`bot`]: the bot's direct chats: commands (`status`, `link`/`confirm`, `pause`, ...),
//!   and telling a person once when fedlink cannot keep them in step.
//! - [`sync`]: runs the reconciler and carries out its decisions (invites, reads, joins,
//!   leaves, presence).
//! - [`appservice`]: the registration route (registration YAML, transaction endpoint,
//!   actions as users with `?user_id=`).
//! - [`memory`]: gives freed heap pages back to the system (`memory.trim_secs`).
//! - [`lanes`]: per-destination lanes (own task, one request in flight, own backoff, woken
//!   when the server contacts fedlink) for the outbox, invites, actions and joins.
//! - [`outbox`]: durable per-destination delivery of PDUs.
//! - [`admin`]: `/metrics`, the bearer-token admin API, and the appservice endpoint.
//! - [`metrics`]: every `fedlink_*` metric.
//! - [`node`]: the shared node every handler and worker reaches: the log writer (store,
//!   views, append, change notifications), keys, client, metrics, and the services' handles.
//! - [`snapshot`]: the snapshot worker (views snapshots, storage gauge, pruning).
//! - [`app`]: wiring only: builds the node, spawns the services, shuts down. Imported by none.
//!
//! # Data flow
//! `federation /send, invites, joins, appservice pushes, directory changes -> checks
//! (rooms) -> store (log) -> core::views -> core::reconcile -> sync / outbox -> peers and
//! homeservers`, with outcomes logged back.

pub mod admin;
pub mod app;
pub mod cache;
pub mod appservice;
pub mod bot;
pub mod config;
pub mod core;
pub mod directory;
pub mod federation;
pub mod keys;
pub mod known_ids;
pub mod lanes;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod sync;
pub mod rooms;
pub mod snapshot;
pub mod store;
