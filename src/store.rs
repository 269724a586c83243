//! Durable storage in sled; the only module that imports sled, apart from
//! [`crate::known_ids`] (the in-memory filter of `event_index`'s ids, which scans that tree).
//!
//! Trees:
//! - `log`: big-endian `seq` -> [`LogRecord`] JSON. Append-only.
//! - `event_index`: event id -> `seq` of the PDU entry holding it (idempotency by event id),
//!   followed by the trie root of the state after the event when fedlink recorded one (8 or
//!   16 bytes). A root is recorded when the event is admitted, before it is written: it is
//!   held in memory until the write, which stores it with the index entry in the same
//!   transaction (one sled entry per event instead of two).
//! - `txns`: `origin \0 txn_id` -> the response JSON we answered (idempotent retransmits).
//! - `views`: the latest views checkpoint: `meta` (directory, presence, folded position) and
//!   `room \0 room_id` -> one room's view; a checkpoint writes only the rooms that changed.
//! - `server_keys`: `server \0 key_id` -> cached remote key.
//! - `state_nodes`: id -> a node of the persistent state trie ([`StateNode`]; see
//!   `rooms::state`): the state at every event, shared between events by path copying.
//!   A node is a tag byte and its body: encodings 2 and 3 (compact, see `StateNode::encode`)
//!   are written, 0 and 1 of earlier versions are read. Nodes are never rewritten, so a
//!   database upgraded in place holds both.
//! - `state_root_of`: event id -> the trie root of the state after it, as earlier versions
//!   kept it (read for their events; no longer written).
//! - `state_before_root`: event id -> the trie root of the state before an event fedlink
//!   authored or served (for `state_ids`).
//! - `state_groups`, `state_group_of`, `state_at`: the full-map format of earlier versions,
//!   read (and converted on first use) only for events stored before it.
//! - `latest_ephemeral`: `p \0 user` / `t \0 room \0 user` -> `seq` of the latest presence or
//!   typing record; appending a newer one removes the older from `log` in the same
//!   transaction, so chatter does not grow the log (folding keeps only the latest anyway).
//! - `parked`: `room_id \0 event_id` -> `{origin, pdu}`: PDUs received for a room whose join is under
//!   way, kept (durably, before the sender's 200) until the join lands; not yet log records.
//!
//! [`Store::append`] writes all records of one batch, their index entries and the
//! transaction's response in one sled transaction, so a crash never leaves half a batch;
//! callers [`Store::flush`] before they acknowledge anything, so a 200 means durable.

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use serde::{Deserialize, Serialize};
use sled::{transaction::TransactionError, Transactional};

use crate::core::{
    log_entry::{Entry, LogRecord, PduEntry, LOG_FORMAT},
    views::{Views, VIEWS_FORMAT},
};

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// The database was created with the other `storage.compression` setting.
    #[error("storage.compression: this database was created with compression = {created_with}; sled cannot change it for an existing database (set it back, or start a new database and replay)")]
    CompressionMismatch { created_with: bool },
    /// `storage.compression` is unset and the database's own record of it (sled's `conf`
    /// file) is missing or unreadable.
    #[error("storage.compression: the database has data but its conf file (which records whether it is compressed) is missing or unreadable; set storage.compression to what it was created with (sled writes a new conf with the setting it is opened with, and a wrong one is then refused or fails to read: keep a copy of the directory before trying)")]
    CompressionUnknown,
    /// A stored record did not decode.
    #[error("corrupt record in {tree}: {reason}")]
    Corrupt { tree: &'static str, reason: String },
}

/// One stored state entry: (event type, state key, event id).
pub type StateEntry = (String, String, String);

/// A node of the persistent state trie (see `rooms::state`). Nodes are immutable: a change
/// writes new nodes along one path and shares the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateNode {
    /// Entries, sorted.
    Leaf(Vec<StateEntry>),
    /// Children by hash nibble: `bitmap` bit `i` set means a child for nibble `i`, in order.
    Branch { bitmap: u16, children: Vec<u64> },
}

/// State event types a compact leaf writes as one byte (its index + 1); 0 is a literal.
/// Part of the stored format: append only, never reorder or edit (stored codes would read
/// as other types; `compact_node_bytes_are_fixed` pins the layout).
const COMMON_TYPES: [&str; 16] = [
    "m.room.member",
    "m.room.create",
    "m.room.power_levels",
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.guest_access",
    "m.room.pinned_events",
    "m.room.third_party_invite",
    "m.space.child",
    "m.space.parent",
];

/// Node encodings: 0 and 1 (a leaf's strings with 4-byte lengths, a branch's children as
/// 8 bytes each) as earlier versions wrote them, still read; 2 and 3 as written now.
const LEAF_V1: u8 = 0;
const BRANCH_V1: u8 = 1;
const LEAF: u8 = 2;
const BRANCH: u8 = 3;

/// A compact leaf's event id: the 32 bytes of an id that is `$` and their URL-safe
/// unpadded base64 (room versions 4 and later), else the id's text.
const ID_TEXT: u8 = 0;
const ID_HASH: u8 = 1;

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// The 32 bytes of an event id that is `$` and their URL-safe unpadded base64, when that is
/// exactly what the id is.
fn id_hash(id: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let b64 = id.strip_prefix('$').filter(|b| b.len() == 43)?;
    let bytes: [u8; 32] = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64).ok()?.try_into().ok()?;
    // Only the canonical text: a 43rd character with stray low bits decodes to the same bytes.
    (base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes) == b64).then_some(bytes)
}

/// Reads a node's bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(corrupt("state_nodes", "truncated node"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn byte(&mut self) -> Result<u8, StoreError> {
        Ok(self.bytes(1)?[0])
    }
    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            n |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(corrupt("state_nodes", "bad varint"))
    }
    fn string(&mut self, n: usize) -> Result<String, StoreError> {
        String::from_utf8(self.bytes(n)?.to_vec()).map_err(|_| corrupt("state_nodes", "leaf is not UTF-8"))
    }
    fn str(&mut self) -> Result<String, StoreError> {
        let n = usize::try_from(self.varint()?).map_err(|_| corrupt("state_nodes", "length too large"))?;
        self.string(n)
    }
    fn u32_str(&mut self) -> Result<String, StoreError> {
        let n = u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")) as usize;
        self.string(n)
    }
}

impl StateNode {
    /// The node's stored form (encodings 2 and 3: lengths and child ids as varints, common
    /// event types as one byte, event ids of room versions 4 and later as their 32 bytes).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            StateNode::Leaf(entries) => {
                out.push(LEAF);
                put_varint(&mut out, entries.len() as u64);
                for (t, k, e) in entries {
                    match COMMON_TYPES.iter().position(|c| c == t) {
                        Some(i) => out.push(i as u8 + 1),
                        None => {
                            out.push(0);
                            put_str(&mut out, t);
                        }
                    }
                    put_str(&mut out, k);
                    match id_hash(e) {
                        Some(hash) => {
                            out.push(ID_HASH);
                            out.extend_from_slice(&hash);
                        }
                        None => {
                            out.push(ID_TEXT);
                            put_str(&mut out, e);
                        }
                    }
                }
            }
            StateNode::Branch { bitmap, children } => {
                out.push(BRANCH);
                out.extend_from_slice(&bitmap.to_le_bytes());
                for c in children {
                    put_varint(&mut out, *c);
                }
            }
        }
        out
    }

    fn decode(b: &[u8]) -> Result<Self, StoreError> {
        use base64::Engine;
        let bad = |r: &str| corrupt("state_nodes", r);
        let Some((&tag, rest)) = b.split_first() else { return Err(bad("empty node")) };
        let mut r = Reader(rest);
        let node = match tag {
            LEAF_V1 => {
                let mut entries = Vec::new();
                while !r.0.is_empty() {
                    entries.push((r.u32_str()?, r.u32_str()?, r.u32_str()?));
                }
                StateNode::Leaf(entries)
            }
            LEAF => {
                let n = r.varint()?;
                // Each entry takes at least 4 bytes: no allocation beyond what is there.
                let mut entries = Vec::with_capacity(usize::try_from(n).unwrap_or(usize::MAX).min(r.0.len() / 4));
                for _ in 0..n {
                    let t = match r.byte()? {
                        0 => r.str()?,
                        code => COMMON_TYPES.get(usize::from(code) - 1).ok_or_else(|| bad("unknown event type code"))?.to_string(),
                    };
                    let k = r.str()?;
                    let e = match r.byte()? {
                        ID_HASH => format!("${}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r.bytes(32)?)),
                        ID_TEXT => r.str()?,
                        _ => return Err(bad("unknown event id form")),
                    };
                    entries.push((t, k, e));
                }
                StateNode::Leaf(entries)
            }
            BRANCH_V1 | BRANCH => {
                let bitmap = u16::from_le_bytes(r.bytes(2)?.try_into().expect("2 bytes"));
                let mut children = Vec::with_capacity(bitmap.count_ones() as usize);
                for _ in 0..bitmap.count_ones() {
                    children.push(if tag == BRANCH { r.varint()? } else { u64::from_le_bytes(r.bytes(8)?.try_into().expect("8 bytes")) });
                }
                StateNode::Branch { bitmap, children }
            }
            _ => return Err(bad("unknown node")),
        };
        if !r.0.is_empty() {
            return Err(bad("trailing bytes after the node"));
        }
        Ok(node)
    }
}

/// Decoded state trie nodes kept in memory (x2 generations).
const NODE_CACHE: usize = 32_768;
/// Parsed events kept in memory (x2 generations). A parsed event with its signed JSON
/// takes about 6 KiB (heaptrack); 2,048 of them hold the auth events of hundreds of
/// active rooms.
const PDU_CACHE: usize = 1_024;

/// A remote server's key as cached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredKey {
    /// Unpadded base64 public key.
    pub key: String,
    /// Valid until (ms since the epoch); for old keys, their `expired_ts`.
    pub valid_until_ts: u64,
    /// Whether this came from `old_verify_keys`.
    pub old: bool,
}

/// The store.
pub struct Store {
    db: sled::Db,
    /// Whether sled writes its pages compressed (fixed when the database was created).
    compressed: bool,
    log: sled::Tree,
    event_index: sled::Tree,
    txns: sled::Tree,
    views: sled::Tree,
    server_keys: sled::Tree,
    outbox: sled::Tree,
    dead_letters: sled::Tree,
    state_at: sled::Tree,
    state_group_of: sled::Tree,
    state_groups: sled::Tree,
    parked: sled::Tree,
    state_nodes: sled::Tree,
    latest_ephemeral: sled::Tree,
    state_root_of: sled::Tree,
    state_before_root: sled::Tree,
    node_cache: crate::cache::Cache<u64, std::sync::Arc<StateNode>>,
    pdu_cache: crate::cache::Cache<String, std::sync::Arc<crate::core::pdu::Pdu>>,
    /// PDUs in `parked` (kept in step with the tree).
    parked_len: std::sync::atomic::AtomicUsize,
    /// Serialises appends and holds the last assigned sequence number.
    next_seq: Mutex<u64>,
    /// PDU entries of a batch being admitted, not written yet (see [`Store::stage`]).
    staged: Mutex<std::collections::HashMap<String, PduEntry>>,
    /// State roots recorded for events admitted but not written yet (see
    /// [`Store::put_state_root_of`]).
    pending_roots: Mutex<std::collections::HashMap<String, u64>>,
    /// Whether `state_root_of` holds roots written by an earlier version.
    legacy_roots: bool,
    /// The ids `event_index` holds, as a filter: a fresh event's lookup reads nothing.
    known_ids: std::sync::Arc<crate::known_ids::KnownIds>,
    /// The thread that reads index pages ahead of writes (see [`Store::warm_index`]) and
    /// the queue it takes ids from.
    warmer: Option<Warmer>,
    /// Ids in the event index beyond which its pages are read ahead (see
    /// [`Store::index_outgrows_cache`]).
    warm_from_ids: u64,
}

/// The thread that reads `event_index` pages ahead of writes.
struct Warmer {
    queue: std::sync::mpsc::SyncSender<String>,
    /// Set when the store closes: the thread stops without reading what is still queued.
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// The log's values after a sequence number, read on a thread of their own in chunks
/// (see [`Store::records_to_fold`]).
struct ReadAhead {
    chunks: Option<std::sync::mpsc::Receiver<Vec<Result<sled::IVec, sled::Error>>>>,
    chunk: std::vec::IntoIter<Result<sled::IVec, sled::Error>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReadAhead {
    /// Records per chunk; up to four chunks wait in the queue, besides the one the
    /// thread fills and the one the caller takes from.
    const CHUNK: usize = 512;

    fn start(log: sled::Tree, after: u64) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Result<sled::IVec, sled::Error>>>(4);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new().name("fedlink-log-read".into()).spawn(move || {
            let mut chunk = Vec::with_capacity(Self::CHUNK);
            {
                for r in log.range((after + 1).to_be_bytes()..) {
                    if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let failed = r.is_err();
                    chunk.push(r.map(|(_, v)| v));
                    if failed {
                        break;
                    }
                    if chunk.len() == Self::CHUNK && tx.send(std::mem::replace(&mut chunk, Vec::with_capacity(Self::CHUNK))).is_err() {
                        return;
                    }
                }
            }
            // The database is let go before the last chunk, so the caller's end of the
            // records is never before the thread's end of the database.
            drop(log);
            let _ = tx.send(chunk);
        })?;
        Ok(Self { chunks: Some(rx), chunk: Vec::new().into_iter(), stop, thread: Some(thread) })
    }
}

impl Iterator for ReadAhead {
    type Item = Result<sled::IVec, sled::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(v) = self.chunk.next() {
                return Some(v);
            }
            self.chunk = self.chunks.as_ref()?.recv().ok()?.into_iter();
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // A thread blocked on a full queue sees it closed.
        self.chunks = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.known_ids.close();
        // Its thread holds the database open: stop it (closing its queue) and wait.
        if let Some(Warmer { queue, closed, thread }) = self.warmer.take() {
            closed.store(true, std::sync::atomic::Ordering::Relaxed);
            drop(queue);
            let _ = thread.join();
        }
    }
}

/// Bytes of sled's cache counted per id of the event index when judging whether the index's
/// pages stay in the cache (its entry, its share of the leaf page and of the log's and
/// other trees' pages): with the default 32 MiB, reading ahead starts at 131,072 ids.
const CACHE_BYTES_PER_INDEXED_ID: u64 = 256;

/// Ids queued for the warming thread at most; beyond, an id is not read ahead.
const WARM_QUEUE: usize = 1_024;

/// Start the thread that reads `event_index` pages ahead of writes: `None` if the machine
/// cannot start one (writes then read their pages themselves).
fn start_warmer(index: sled::Tree) -> Option<Warmer> {
    let (queue, ids) = std::sync::mpsc::sync_channel::<String>(WARM_QUEUE);
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = closed.clone();
    let spawned = std::thread::Builder::new().name("fedlink-warm-index".into()).spawn(move || {
        while let Ok(id) = ids.recv() {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let _ = index.get(id.as_bytes());
        }
    });
    match spawned {
        Ok(thread) => Some(Warmer { queue, closed, thread }),
        Err(e) => {
            tracing::warn!(error = %e, "could not start the thread that reads event index pages ahead of writes; writes read them themselves");
            None
        }
    }
}

fn txn_key(origin: &str, txn_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(origin.len() + txn_id.len() + 1);
    k.extend_from_slice(origin.as_bytes());
    k.push(0);
    k.extend_from_slice(txn_id.as_bytes());
    k
}

fn dest_of(key: &[u8]) -> Result<String, StoreError> {
    let end = key.iter().position(|b| *b == 0).ok_or_else(|| corrupt("outbox", "key without separator"))?;
    Ok(String::from_utf8_lossy(&key[..end]).into_owned())
}

/// For records of which only the latest matters (presence per user, typing per room and
/// user): the key under which the latest one's `seq` is kept in `latest_ephemeral`.
fn superseding_key(entry: &Entry) -> Option<Vec<u8>> {
    match entry {
        Entry::Presence(p) => Some([b"p\0".as_slice(), p.user_id.as_bytes()].concat()),
        Entry::Typing(t) => Some([b"t\0".as_slice(), t.room_id.as_bytes(), b"\0", t.user_id.as_bytes()].concat()),
        _ => None,
    }
}

/// A views checkpoint ready to be written.
pub struct ViewsBatch {
    batch: sled::Batch,
    /// Bytes it writes.
    pub bytes: usize,
}

/// Key prefix of a room's view in the `views` tree.
const VIEW_ROOM_PREFIX: &[u8] = b"room\0";

fn view_room_key(room_id: &str) -> Vec<u8> {
    [VIEW_ROOM_PREFIX, room_id.as_bytes()].concat()
}

/// An `event_index` value: the record's seq, and the state root after the event if one was
/// recorded.
fn index_entry(event_id: &str, v: &[u8]) -> Result<(u64, Option<u64>), StoreError> {
    let bad = || corrupt("event_index", format!("{event_id}: an entry of {} bytes", v.len()));
    let seq = u64::from_be_bytes(v.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(bad)?);
    match v.len() {
        8 => Ok((seq, None)),
        16 => Ok((seq, Some(root_from(&v[8..], "event_index")?))),
        _ => Err(bad()),
    }
}

fn root_from(v: &[u8], tree: &'static str) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| corrupt(tree, "a state root is not 8 bytes"))?))
}

/// sled's page cache unless configured (`storage.cache_mb`).
pub const DEFAULT_CACHE_BYTES: u64 = 32 * 1024 * 1024;

fn corrupt(tree: &'static str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt { tree, reason: reason.to_string() }
}

impl Store {
    /// Open (or create) the database at `path` as fedlink does with `storage.compression`
    /// unset: an existing database with its setting, a new one compressed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// [`Store::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_configured(path, cache_bytes, None).map(|(s, _)| s)
    }

    /// Open (or create) the database at `path` with `storage.compression` as configured:
    /// `Some(c)` as [`Store::open_with`]; `None` opens an existing database with the setting
    /// it was created with and creates a new one compressed. Returns the store and whether
    /// it is compressed.
    pub fn open_configured(path: &Path, cache_bytes: u64, compression: Option<bool>) -> Result<(Self, bool), StoreError> {
        match compression {
            Some(c) => Self::open_with(path, cache_bytes, c).map(|s| (s, c)),
            // sled's own check (a mismatch with its `conf`) still stands behind this.
            None => {
                let compress = Self::created_compressed(path)?.unwrap_or(true);
                Self::open_with(path, cache_bytes, compress).map(|s| (s, compress))
            }
        }
    }

    /// How the database at `path` was created: `Some(compressed)` from sled's `conf` file,
    /// `None` for a new database (no data file, or an empty one). A data file without a
    /// readable `conf` is refused: sled would take the `conf` it writes then for the truth,
    /// and a guess could read an uncompressed database as compressed.
    fn created_compressed(path: &Path) -> Result<Option<bool>, StoreError> {
        let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let has_data = match std::fs::metadata(path.join("db")) {
            Ok(m) => m.len() > 0,
            Err(e) if not_found(&e) => false,
            Err(e) => return Err(StoreError::Sled(sled::Error::Io(e))),
        };
        // Text lines, then a 4-byte CRC.
        let conf = match std::fs::read(path.join("conf")) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if not_found(&e) => String::new(),
            Err(e) => return Err(StoreError::Sled(sled::Error::Io(e))),
        };
        let setting = conf.lines().find_map(|l| match l.trim().strip_prefix("use_compression:").map(str::trim) {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => None,
        });
        match (setting, has_data) {
            (Some(c), _) => Ok(Some(c)),
            (None, false) => Ok(None),
            (None, true) => Err(StoreError::CompressionUnknown),
        }
    }

    /// Open (or create) the database at `path` with a page cache of `cache_bytes`; `compress`
    /// writes sled's pages zstd-compressed (`storage.compression`). A database keeps the
    /// choice it was created with: opening it with the other one fails with
    /// [`StoreError::CompressionMismatch`] and changes nothing.
    pub fn open_with(path: &Path, cache_bytes: u64, compress: bool) -> Result<Self, StoreError> {
        // sled counts a cached page at its size on disk, so a compressed database's cache
        // holds more in memory for the same budget: it gets three quarters of it (at the
        // issue's size RSS 253 MiB with 24 MiB against 283 MiB with 32, at the same ingest
        // rate within this machine's spread; one run each).
        let sled_cache = if compress { cache_bytes / 4 * 3 } else { cache_bytes };
        let config = sled::Config::new().path(path).mode(sled::Mode::HighThroughput).cache_capacity(sled_cache);
        let config = if compress { config.use_compression(true).compression_factor(1) } else { config };
        let db = config.open().map_err(|e| match e {
            sled::Error::Unsupported(m) if m.contains("use_compression") => StoreError::CompressionMismatch { created_with: !compress },
            e => StoreError::Sled(e),
        })?;
        let log = db.open_tree("log")?;
        let state_root_of = db.open_tree("state_root_of")?;
        let parked = db.open_tree("parked")?;
        let last = match log.last()? {
            Some((k, _)) => u64::from_be_bytes(k.as_ref().try_into().map_err(|_| corrupt("log", "key is not 8 bytes"))?),
            None => 0,
        };
        let event_index = db.open_tree("event_index")?;
        let (txns, views, server_keys, outbox, dead_letters) =
            (db.open_tree("txns")?, db.open_tree("views")?, db.open_tree("server_keys")?, db.open_tree("outbox")?, db.open_tree("dead_letters")?);
        let (state_at, state_group_of, state_groups, state_nodes, latest_ephemeral, state_before_root) = (
            db.open_tree("state_at")?,
            db.open_tree("state_group_of")?,
            db.open_tree("state_groups")?,
            db.open_tree("state_nodes")?,
            db.open_tree("latest_ephemeral")?,
            db.open_tree("state_before_root")?,
        );
        // Last: a background build started here stops when the store is dropped, and
        // there is a store to drop only once nothing above can fail.
        let known_ids = crate::known_ids::KnownIds::open(event_index.clone(), last);
        Ok(Self {
            compressed: compress,
            known_ids,
            warmer: start_warmer(event_index.clone()),
            warm_from_ids: cache_bytes / CACHE_BYTES_PER_INDEXED_ID,
            event_index,
            txns,
            views,
            server_keys,
            outbox,
            dead_letters,
            state_at,
            state_group_of,
            state_groups,
            state_nodes,
            latest_ephemeral,
            legacy_roots: !state_root_of.is_empty(),
            state_root_of,
            pending_roots: Mutex::new(Default::default()),
            state_before_root,
            node_cache: crate::cache::Cache::new(NODE_CACHE),
            pdu_cache: crate::cache::Cache::new(PDU_CACHE),
            parked_len: std::sync::atomic::AtomicUsize::new(parked.len()),
            parked,
            log,
            db,
            next_seq: Mutex::new(last),
            staged: Mutex::new(Default::default()),
        })
    }

    /// Whether sled writes this database's pages zstd-compressed (`storage.compression`).
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// Append `entries` (and, for a federation transaction, its response) atomically.
    /// Not yet durable: call [`Store::flush`] before acknowledging anything to a sender.
    /// `outbox` lists (destination, event id) pairs to queue for delivery in the same batch.
    pub fn append(
        &self,
        entries: Vec<Entry>,
        txn: Option<(&str, &str, &serde_json::Value)>,
        outbox: &[(String, String)],
        now_ms: u64,
    ) -> Result<Vec<LogRecord>, StoreError> {
        let mut next = self.next_seq.lock().expect("append lock poisoned");
        let records: Vec<LogRecord> = entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| LogRecord { v: LOG_FORMAT, seq: *next + 1 + i as u64, at_ms: now_ms, entry })
            .collect();
        self.write_records(&mut next, &records, txn, outbox, now_ms)?;
        Ok(records)
    }

    /// Append records already numbered by the caller (a batch folded ahead of its write:
    /// see `Fedlink::batch`). Their numbers must follow the log's last one, without gaps.
    pub fn append_records(&self, records: &[LogRecord], txn: Option<(&str, &str, &serde_json::Value)>, now_ms: u64) -> Result<(), StoreError> {
        let mut next = self.next_seq.lock().expect("append lock poisoned");
        if records.iter().enumerate().any(|(i, r)| r.seq != *next + 1 + i as u64) {
            return Err(corrupt("log", format!("records numbered from {:?} do not follow the log's last, {}", records.first().map(|r| r.seq), *next)));
        }
        self.write_records(&mut next, records, txn, &[], now_ms)
    }

    /// The next sequence number the log will give.
    pub fn next_seq(&self) -> u64 {
        *self.next_seq.lock().expect("append lock poisoned") + 1
    }

    fn write_records(
        &self,
        next: &mut u64,
        records: &[LogRecord],
        txn: Option<(&str, &str, &serde_json::Value)>,
        outbox: &[(String, String)],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let outbox_keys: Vec<(Vec<u8>, &str)> = outbox
            .iter()
            .map(|(dest, event_id)| Ok((txn_key(dest, "").into_iter().chain(self.db.generate_id()?.to_be_bytes()).collect(), event_id.as_str())))
            .collect::<Result<_, StoreError>>()?;
        let encoded: Vec<(u64, Vec<u8>)> = records
            .iter()
            .map(|r| Ok((r.seq, serde_json::to_vec(r).map_err(|e| corrupt("log", e))?)))
            .collect::<Result<_, StoreError>>()?;
        let txn_val = match txn {
            Some((o, t, v)) => Some((
                txn_key(o, t),
                serde_json::to_vec(&serde_json::json!({ "at_ms": now_ms, "response": v })).map_err(|e| corrupt("txns", e))?,
            )),
            None => None,
        };
        // Held until the write is done, so a root recorded meanwhile cannot be missed.
        let mut pending = self.pending_roots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Index entries: the record's seq, then the state root admission recorded, if any.
        let index_vals: Vec<Option<(&str, Vec<u8>)>> = records
            .iter()
            .map(|r| match &r.entry {
                Entry::Pdu(p) => {
                    let mut v = r.seq.to_be_bytes().to_vec();
                    if let Some(root) = pending.get(p.event_id.as_str()) {
                        v.extend_from_slice(&root.to_be_bytes());
                    }
                    Some((p.event_id.as_str(), v))
                }
                _ => None,
            })
            .collect();
        for (event_id, _) in index_vals.iter().flatten() {
            self.known_ids.adding(event_id.as_bytes());
        }
        (&self.log, &self.event_index, &self.txns, &self.outbox, &self.latest_ephemeral)
            .transaction(|(log, index, txns, out, latest)| {
                for (k, e) in &outbox_keys {
                    out.insert(k.as_slice(), e.as_bytes())?;
                }
                for (((seq, bytes), rec), idx) in encoded.iter().zip(records).zip(&index_vals) {
                    log.insert(&seq.to_be_bytes(), bytes.as_slice())?;
                    if let Some((event_id, v)) = idx {
                        // An event written before (an outlier now in the timeline) keeps
                        // the root it had unless admission recorded a new one.
                        if let Some(old) = index.insert(event_id.as_bytes(), v.as_slice())? {
                            if v.len() == 8 && old.len() == 16 {
                                index.insert(event_id.as_bytes(), [v.as_slice(), &old[8..]].concat())?;
                            }
                        }
                    }
                    // Typing and presence: only the latest record per user is kept.
                    if let Some(key) = superseding_key(&rec.entry) {
                        if let Some(old) = latest.insert(key, &seq.to_be_bytes())? {
                            log.remove(old.as_ref())?;
                        }
                    }
                }
                if let Some((k, v)) = &txn_val {
                    txns.insert(k.as_slice(), v.as_slice())?;
                }
                Ok(())
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => corrupt("log", "transaction aborted"),
            })?;
        *next += records.len() as u64;
        for (event_id, _) in index_vals.iter().flatten() {
            self.known_ids.added(event_id.as_bytes());
        }
        if !pending.is_empty() {
            for (event_id, _) in index_vals.iter().flatten() {
                pending.remove(*event_id);
            }
        }
        Ok(())
    }

    /// Make a PDU entry visible to [`Store::has_event`] and [`Store::get_event`] before it
    /// is written: the events of a batch being admitted are the auth events and parents of
    /// the batch's later events. [`Store::unstage`] forgets them (the batch was written,
    /// or dropped).
    pub fn stage(&self, entry: &PduEntry) {
        self.staged.lock().expect("staged lock poisoned").insert(entry.event_id.to_string(), entry.clone());
    }

    /// Forget every staged entry.
    pub fn unstage(&self) {
        self.staged.lock().expect("staged lock poisoned").clear();
    }

    /// Forget every staged entry of a batch that was not written, with the state roots its
    /// admission recorded for events the log does not hold (a later event must not find a
    /// state "after" an event that is not there).
    pub fn unstage_dropped(&self) {
        let staged = std::mem::take(&mut *self.staged.lock().expect("staged lock poisoned"));
        for id in staged.keys() {
            self.forget_unwritten(id);
        }
    }

    /// For an event the log does not hold (rejected after its admission recorded a state,
    /// or staged by a dropped batch): forget that state and its parsed copy.
    pub fn forget_unwritten(&self, event_id: &str) {
        self.pending_roots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(event_id);
        if !self.index_holds(event_id).unwrap_or(true) {
            let _ = self.state_before_root.remove(event_id.as_bytes());
            self.pdu_cache.remove(event_id);
        }
    }

    fn staged(&self, event_id: &str) -> Option<PduEntry> {
        let staged = self.staged.lock().expect("staged lock poisoned");
        if staged.is_empty() {
            return None;
        }
        staged.get(event_id).cloned()
    }

    /// The response stored for a transaction already processed.
    pub fn txn_response(&self, origin: &str, txn_id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        match self.txns.get(txn_key(origin, txn_id))? {
            Some(v) => {
                let mut rec: serde_json::Value = serde_json::from_slice(&v).map_err(|e| corrupt("txns", e))?;
                Ok(Some(rec.get_mut("response").map(serde_json::Value::take).unwrap_or_default()))
            }
            None => Ok(None),
        }
    }

    /// Forget transaction answers older than `before_ms` (senders retry a transaction for
    /// hours at most, not weeks). Returns how many were removed.
    pub fn prune_txns(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut n = 0;
        for r in self.txns.iter() {
            let (k, v) = r?;
            let at = serde_json::from_slice::<serde_json::Value>(&v).ok().and_then(|r| r.get("at_ms").and_then(|a| a.as_u64())).unwrap_or(0);
            if at < before_ms {
                self.txns.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether the event is in the log.
    pub fn has_event(&self, event_id: &str) -> Result<bool, StoreError> {
        if self.staged.lock().expect("staged lock poisoned").contains_key(event_id) {
            return Ok(true);
        }
        self.index_holds(event_id)
    }

    /// Whether the event is in the log as part of the timeline (accepted or soft-failed):
    /// an outlier (stored for an auth chain or a join's state) is not, and becomes a
    /// timeline event when it arrives as one.
    pub fn has_timeline_event(&self, event_id: &str) -> Result<bool, StoreError> {
        let staged = self.staged.lock().expect("staged lock poisoned").get(event_id).map(|e| e.status);
        if let Some(status) = staged {
            return Ok(status != crate::core::log_entry::PduStatus::Outlier);
        }
        self.has_written_timeline_event(event_id)
    }

    /// [`Store::has_timeline_event`] among written events only (not those of a batch being
    /// admitted, which may still be dropped): what a sender may be told is already stored.
    pub fn has_written_timeline_event(&self, event_id: &str) -> Result<bool, StoreError> {
        Ok(self.written_event(event_id)?.is_some_and(|e| e.status != crate::core::log_entry::PduStatus::Outlier))
    }

    /// The log entry of a stored event (or of one staged by a batch under way).
    pub fn get_event(&self, event_id: &str) -> Result<Option<PduEntry>, StoreError> {
        match self.staged(event_id) {
            Some(e) => Ok(Some(e)),
            None => self.written_event(event_id),
        }
    }

    /// `event_id`'s `event_index` entry, through the filter of known ids: a fresh id (the
    /// common case) is answered from memory.
    fn index_get(&self, event_id: &str) -> Result<Option<sled::IVec>, StoreError> {
        let answer = self.known_ids.lookup(event_id.as_bytes());
        if answer == crate::known_ids::Answer::Absent {
            return Ok(None);
        }
        let v = self.event_index.get(event_id.as_bytes())?;
        if answer == crate::known_ids::Answer::Maybe {
            self.known_ids.found(v.is_some());
        }
        Ok(v)
    }

    /// Whether the event index holds enough ids that its pages no longer stay in sled's
    /// cache: below, every page a write reads is in memory already and reading ahead is
    /// only work (with read-ahead on, joins into a room grown to 10,000 members, 14,000
    /// ids, were 6-21% slower in two runs against one without).
    /// Callers ask once per transaction before [`Store::warm_index`].
    pub fn index_outgrows_cache(&self) -> bool {
        self.known_ids.counts().ids > self.warm_from_ids
    }

    /// Have the `event_index` page `event_id` would be on read into sled's cache, on a
    /// thread of its own, answering nothing. Writing an event reads its index entry first
    /// (sled's transactions read every key they write), and ids are hashes: beyond the
    /// cache, that read loads a page from the files, under the ingest lock. Called for a
    /// transaction's PDUs before they are admitted (for a linear transaction once they are
    /// parsed, for others once their signatures are checked), so the pages are read while
    /// the transaction is checked and admitted. Best
    /// effort: when the thread's queue is full (or there is no thread), the id is not read
    /// ahead and its write reads the page. (A read here and sled's transactions share one
    /// lock in sled: a write may wait for a read under way.)
    pub fn warm_index(&self, event_id: &str) {
        if let Some(w) = &self.warmer {
            let _ = w.queue.try_send(event_id.to_owned());
        }
    }

    /// Whether `event_index` holds `event_id` (through the filter, as [`Store::index_get`]).
    fn index_holds(&self, event_id: &str) -> Result<bool, StoreError> {
        Ok(self.index_get(event_id)?.is_some())
    }

    /// Lookups the filter of known event ids answered, and its size.
    pub fn known_ids(&self) -> crate::known_ids::Counts {
        self.known_ids.counts()
    }

    /// The log entry of a written event.
    fn written_event(&self, event_id: &str) -> Result<Option<PduEntry>, StoreError> {
        let Some(v) = self.index_get(event_id)? else { return Ok(None) };
        let (seq, _) = index_entry(event_id, &v)?;
        match self.record(seq)? {
            Some(LogRecord { entry: Entry::Pdu(p), .. }) => Ok(Some(p)),
            _ => Err(corrupt("event_index", format!("{event_id} does not point at a PDU"))),
        }
    }

    /// One record.
    pub fn record(&self, seq: u64) -> Result<Option<LogRecord>, StoreError> {
        match self.log.get(seq.to_be_bytes())? {
            Some(b) => Ok(Some(LogRecord::decode(&b).map_err(|e| corrupt("log", e))?)),
            None => Ok(None),
        }
    }

    /// Records with `seq > after`, in order.
    pub fn records_after(&self, after: u64) -> impl Iterator<Item = Result<LogRecord, StoreError>> + '_ {
        self.log.range((after + 1).to_be_bytes()..).map(|r| {
            let (_, v) = r?;
            LogRecord::decode(&v).map_err(|e| corrupt("log", e))
        })
    }

    /// The records after sequence number `after`, in order, decoded for folding into views
    /// ([`LogRecord::decode_for_fold`]: a PDU keeps only its content). An error is the
    /// last item.
    ///
    /// The log is read (sled's page lookups and, in a compressed database, decompression)
    /// on a thread of its own, `fedlink-log-read`, up to a few chunks of records ahead of
    /// the caller, which decodes and folds: on the compressed log this took a
    /// replay's fold from 5.0-5.8 s to 3.3-3.5 s. Dropping the iterator stops the thread
    /// (it checks at every record) and waits for it, so it never holds the database open
    /// past the iterator.
    pub fn records_to_fold(&self, after: u64) -> impl Iterator<Item = Result<LogRecord, StoreError>> + '_ {
        let values: Box<dyn Iterator<Item = Result<sled::IVec, sled::Error>> + '_> = match ReadAhead::start(self.log.clone(), after) {
            Ok(r) => Box::new(r),
            Err(e) => {
                tracing::warn!(error = %e, "could not start the log reading thread; reading the log on the folding thread");
                Box::new(self.log.range((after + 1).to_be_bytes()..).map(|r| r.map(|(_, v)| v)))
            }
        };
        values.map(|v| LogRecord::decode_for_fold(&v?).map_err(|e| corrupt("log", e)))
    }

    /// The highest sequence number written.
    pub fn last_seq(&self) -> u64 {
        *self.next_seq.lock().expect("append lock poisoned")
    }

    /// Size of the database on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Write a views checkpoint: the non-room part, and the rooms in `rooms` (all of them
    /// when `None`, dropping rooms no longer in the views), in one atomic batch, then flush.
    /// Rooms not written keep their earlier checkpoint, which is still exact: they have not
    /// changed since (the caller tracks that in `Views::unsaved`, taken under the same lock
    /// the views were read under). Returns the bytes written.
    pub async fn save_views(&self, views: &Views, rooms: Option<&std::collections::BTreeSet<ruma::OwnedRoomId>>) -> Result<usize, StoreError> {
        let batch = self.views_batch(views, rooms)?;
        let bytes = batch.bytes;
        self.write_views(batch).await?;
        Ok(bytes)
    }

    /// The batch of a views checkpoint (see [`Store::save_views`]): built while the views
    /// are locked, written after the lock is released.
    pub fn views_batch(&self, views: &Views, rooms: Option<&std::collections::BTreeSet<ruma::OwnedRoomId>>) -> Result<ViewsBatch, StoreError> {
        let mut batch = sled::Batch::default();
        let mut bytes = 0;
        let mut put = |room_id: &ruma::OwnedRoomId, room: &crate::core::views::RoomView| -> Result<(), StoreError> {
            let b = serde_json::to_vec(room).map_err(|e| corrupt("views", e))?;
            bytes += b.len();
            batch.insert(view_room_key(room_id.as_str()), b);
            Ok(())
        };
        match rooms {
            None => {
                views.rooms.iter().try_for_each(|(id, r)| put(id, r))?;
                for k in self.views.scan_prefix(VIEW_ROOM_PREFIX).keys() {
                    let k = k?;
                    let id = String::from_utf8_lossy(&k[VIEW_ROOM_PREFIX.len()..]).into_owned();
                    if !ruma::OwnedRoomId::try_from(id).is_ok_and(|id| views.rooms.contains_key(&id)) {
                        batch.remove(k);
                    }
                }
            }
            Some(ids) => ids.iter().filter_map(|id| views.rooms.get(id).map(|r| (id, r))).try_for_each(|(id, r)| put(id, r))?,
        }
        let meta = serde_json::to_vec(&views.meta()).map_err(|e| corrupt("views", e))?;
        bytes += meta.len();
        batch.insert("meta", meta);
        batch.remove("snapshot");
        Ok(ViewsBatch { batch, bytes })
    }

    /// Write a views checkpoint batch atomically and flush.
    pub async fn write_views(&self, batch: ViewsBatch) -> Result<(), StoreError> {
        self.views.apply_batch(batch.batch)?;
        self.views.flush_async().await?;
        Ok(())
    }

    /// Load the views checkpoint, if one of the current format exists (a whole-views
    /// snapshot of earlier versions is read too).
    pub fn load_views(&self) -> Result<Option<Views>, StoreError> {
        let stale = || {
            tracing::warn!("views checkpoint has an old or unreadable format; rebuilding from the log");
            Ok(None)
        };
        if let Some(b) = self.views.get("meta")? {
            let Ok(meta) = serde_json::from_slice::<crate::core::views::ViewsMeta>(&b) else { return stale() };
            if meta.format != VIEWS_FORMAT {
                return stale();
            }
            let mut rooms = BTreeMap::new();
            for r in self.views.scan_prefix(VIEW_ROOM_PREFIX) {
                let (k, v) = r?;
                let id = String::from_utf8_lossy(&k[VIEW_ROOM_PREFIX.len()..]).into_owned();
                let (Ok(id), Ok(room)) = (ruma::OwnedRoomId::try_from(id), serde_json::from_slice(&v)) else { return stale() };
                rooms.insert(id, room);
            }
            return Ok(Some(Views::from_parts(meta, rooms)));
        }
        let Some(b) = self.views.get("snapshot")? else { return Ok(None) };
        match serde_json::from_slice::<Views>(&b) {
            Ok(v) if v.format == VIEWS_FORMAT => Ok(Some(v.reindexed())),
            Ok(_) | Err(_) => stale(),
        }
    }

    /// Drop the views snapshot (for `replay`).
    pub fn clear_views(&self) -> Result<(), StoreError> {
        self.views.clear()?;
        Ok(())
    }

    /// Cached keys of `server`.
    pub fn server_keys(&self, server: &str) -> Result<Vec<(String, StoredKey)>, StoreError> {
        let mut prefix = server.as_bytes().to_vec();
        prefix.push(0);
        self.server_keys
            .scan_prefix(&prefix)
            .map(|r| {
                let (k, v) = r?;
                let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                Ok((id, serde_json::from_slice(&v).map_err(|e| corrupt("server_keys", e))?))
            })
            .collect()
    }

    /// Cache one key of `server`.
    pub fn put_server_key(&self, server: &str, key_id: &str, key: &StoredKey) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(key).map_err(|e| corrupt("server_keys", e))?;
        self.server_keys.insert(txn_key(server, key_id), bytes)?;
        Ok(())
    }

    /// Destinations with queued PDUs, and how many each.
    pub fn outbox_destinations(&self) -> Result<BTreeMap<String, usize>, StoreError> {
        let mut out = BTreeMap::new();
        for r in self.outbox.iter() {
            let (k, _) = r?;
            let dest = dest_of(&k)?;
            *out.entry(dest).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// The first `max` queued PDUs for `dest`: (queue key, event id).
    pub fn outbox_batch(&self, dest: &str, max: usize) -> Result<Vec<(Vec<u8>, String)>, StoreError> {
        self.outbox
            .scan_prefix(txn_key(dest, ""))
            .take(max)
            .map(|r| {
                let (k, v) = r?;
                Ok((k.to_vec(), String::from_utf8_lossy(&v).into_owned()))
            })
            .collect()
    }

    /// Remove delivered queue entries.
    pub fn outbox_remove(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for k in keys {
            b.remove(k.as_slice());
        }
        self.outbox.apply_batch(b)?;
        Ok(())
    }

    /// Move queue entries to the dead letters, with the error that killed them.
    pub fn outbox_kill(&self, keys: &[Vec<u8>], error: &str) -> Result<(), StoreError> {
        (&self.outbox, &self.dead_letters)
            .transaction(|(out, dead)| {
                for k in keys {
                    if let Some(v) = out.remove(k.as_slice())? {
                        let rec = serde_json::json!({ "event_id": String::from_utf8_lossy(&v), "error": error });
                        dead.insert(k.as_slice(), rec.to_string().as_bytes())?;
                    }
                }
                Ok(())
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => corrupt("outbox", "transaction aborted"),
            })
    }

    /// Dead letters per destination.
    pub fn dead_letter_counts(&self) -> Result<BTreeMap<String, usize>, StoreError> {
        let mut out = BTreeMap::new();
        for r in self.dead_letters.iter() {
            let (k, _) = r?;
            *out.entry(dest_of(&k)?).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Put `dest`'s dead letters back in its queue; returns how many.
    pub fn retry_dead_letters(&self, dest: &str) -> Result<usize, StoreError> {
        let mut n = 0;
        for r in self.dead_letters.scan_prefix(txn_key(dest, "")) {
            let (k, v) = r?;
            let rec: serde_json::Value = serde_json::from_slice(&v).map_err(|e| corrupt("dead_letters", e))?;
            let event_id = rec["event_id"].as_str().unwrap_or_default().to_owned();
            self.outbox.insert(&k, event_id.as_bytes())?;
            self.dead_letters.remove(&k)?;
            n += 1;
        }
        Ok(n)
    }

    /// The state before `event_id` in the format of earlier versions, if recorded.
    pub fn legacy_state_before(&self, event_id: &str) -> Result<Option<Vec<String>>, StoreError> {
        match self.state_at.get(event_id.as_bytes())? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| corrupt("state_at", e))?)),
            None => Ok(None),
        }
    }

    /// The state group (an event id) holding the state after `event_id`, in the format of
    /// earlier versions.
    pub fn legacy_state_group_of(&self, event_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.state_group_of.get(event_id.as_bytes())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// A state group of earlier versions: (type, state key, event id) entries.
    pub fn legacy_state_group(&self, group: &str) -> Result<Option<Vec<StateEntry>>, StoreError> {
        match self.state_groups.get(group.as_bytes())? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| corrupt("state_groups", e))?)),
            None => Ok(None),
        }
    }

    /// Nodes in the state trie (for tests and the admin view).
    pub fn state_node_count(&self) -> usize {
        self.state_nodes.len()
    }

    /// Write a state group in the format of earlier versions (tests of the conversion).
    #[doc(hidden)]
    pub fn put_legacy_state_group(&self, event_id: &str, group: &str, entries: &[StateEntry]) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(entries).map_err(|e| corrupt("state_groups", e))?;
        self.state_groups.insert(group.as_bytes(), bytes)?;
        self.state_group_of.insert(event_id.as_bytes(), group.as_bytes())?;
        Ok(())
    }

    /// A state trie node.
    pub fn state_node(&self, id: u64) -> Result<std::sync::Arc<StateNode>, StoreError> {
        if let Some(n) = self.node_cache.get(&id) {
            return Ok(n);
        }
        let b = self.state_nodes.get(id.to_be_bytes())?.ok_or_else(|| corrupt("state_nodes", format!("node {id} is missing")))?;
        let n = std::sync::Arc::new(StateNode::decode(&b)?);
        self.node_cache.insert(id, n.clone());
        Ok(n)
    }

    /// Write a new state trie node; returns its id (never 0, which stands for the empty
    /// state). Not durable until [`Store::flush`]; an unflushed node is only ever reachable
    /// from records written after it.
    pub fn put_state_node(&self, node: StateNode) -> Result<u64, StoreError> {
        let id = self.db.generate_id()? + 1;
        self.state_nodes.insert(id.to_be_bytes(), node.encode())?;
        self.node_cache.insert(id, std::sync::Arc::new(node));
        Ok(id)
    }

    /// The trie root of the state after `event_id`.
    pub fn state_root_of(&self, event_id: &str) -> Result<Option<u64>, StoreError> {
        if let Some(root) = self.pending_roots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(event_id) {
            return Ok(Some(*root));
        }
        let Some(v) = self.index_get(event_id)? else { return Ok(None) };
        match index_entry(event_id, &v)? {
            (_, Some(root)) => Ok(Some(root)),
            // Earlier versions recorded roots apart, before the write: only those of events
            // the log holds count.
            (_, None) if self.legacy_roots => self.state_root_of.get(event_id.as_bytes())?.map(|v| root_from(&v, "state_root_of")).transpose(),
            (_, None) => Ok(None),
        }
    }

    /// Record the trie root of the state after `event_id`, an event being admitted: it is
    /// held in memory and written with the event's index entry when the event is written
    /// (again, for an outlier admitted to the timeline; a written event keeps the root it
    /// has until then). Call this under the ingest lock, which forgets on release the
    /// roots of events it did not write (see [`Store::forget_pending_roots`]).
    pub fn put_state_root_of(&self, event_id: &str, root: u64) {
        self.pending_roots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(event_id.to_owned(), root);
    }

    /// Record the trie root of the state after `event_id`, an event the log holds and that
    /// is not written again (a root converted from an earlier version's format). Returns
    /// false, recording nothing, when the log does not hold it.
    pub fn put_written_state_root(&self, event_id: &str, root: u64) -> Result<bool, StoreError> {
        let _pending = self.pending_roots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(v) = self.index_get(event_id)? else { return Ok(false) };
        let (seq, _) = index_entry(event_id, &v)?;
        self.event_index.insert(event_id.as_bytes(), [seq.to_be_bytes(), root.to_be_bytes()].concat())?;
        Ok(true)
    }

    /// Forget the state roots recorded for events that were not written (rejected after
    /// admission); returns how many. Called when the ingest lock is released: every event
    /// admitted under it has been written or dropped by then.
    pub fn forget_pending_roots(&self) -> usize {
        let mut pending = self.pending_roots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = pending.len();
        pending.clear();
        n
    }

    /// The trie root of the state before an event fedlink authored or served.
    pub fn state_before_root(&self, event_id: &str) -> Result<Option<u64>, StoreError> {
        self.state_before_root.get(event_id.as_bytes())?.map(|v| root_from(&v, "state_before_root")).transpose()
    }

    /// Record the trie root of the state before an event fedlink authored or served.
    pub fn put_state_before_root(&self, event_id: &str, root: u64) -> Result<(), StoreError> {
        self.state_before_root.insert(event_id.as_bytes(), &root.to_be_bytes())?;
        Ok(())
    }

    /// A parsed event from the in-memory cache.
    pub fn cached_pdu(&self, event_id: &str) -> Option<std::sync::Arc<crate::core::pdu::Pdu>> {
        self.pdu_cache.get(event_id)
    }

    /// Keep a parsed event in the in-memory cache.
    pub fn cache_pdu(&self, pdu: std::sync::Arc<crate::core::pdu::Pdu>) {
        self.pdu_cache.insert(pdu.event_id.to_string(), pdu);
    }

    /// Keep `pdu` from `origin` for `room_id` until the bot's join there lands. Not durable
    /// until [`Store::flush`].
    /// Returns whether it was new (one copy per event id).
    pub fn park(&self, room_id: &str, event_id: &str, origin: &str, pdu: &serde_json::Value) -> Result<bool, StoreError> {
        let key = txn_key(room_id, event_id);
        if self.parked.contains_key(&key)? {
            return Ok(false);
        }
        let bytes = serde_json::to_vec(&serde_json::json!({ "origin": origin, "pdu": pdu })).map_err(|e| corrupt("parked", e))?;
        if self.parked.insert(key, bytes)?.is_none() {
            self.parked_len.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(true)
    }

    /// PDUs parked for `room_id`, counting at most `limit`.
    pub fn parked_count(&self, room_id: &str, limit: usize) -> usize {
        self.parked.scan_prefix(txn_key(room_id, "")).keys().take(limit).count()
    }

    /// All parked PDUs.
    pub fn parked_total(&self) -> usize {
        self.parked_len.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Rooms with parked PDUs.
    pub fn parked_rooms(&self) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = Vec::new();
        for k in self.parked.iter().keys() {
            let room = dest_of(&k?)?;
            if out.last() != Some(&room) {
                out.push(room);
            }
        }
        Ok(out)
    }

    /// The PDUs parked for `room_id`, in arrival order: (key, origin, pdu).
    pub fn parked_for(&self, room_id: &str) -> Result<Vec<(Vec<u8>, String, serde_json::Value)>, StoreError> {
        self.parked
            .scan_prefix(txn_key(room_id, ""))
            .map(|r| {
                let (k, v) = r?;
                let mut rec: serde_json::Value = serde_json::from_slice(&v).map_err(|e| corrupt("parked", e))?;
                let origin = rec["origin"].as_str().unwrap_or_default().to_owned();
                Ok((k.to_vec(), origin, rec["pdu"].take()))
            })
            .collect()
    }

    /// Forget parked PDUs (applied, or their join was given up).
    pub fn unpark(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        for k in keys {
            if self.parked.remove(k.as_slice())?.is_some() {
                self.parked_len.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Flush everything to disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::log_entry::PresenceEntry;

    /// A node as versions before the compact encoding wrote it (encodings 0 and 1).
    fn encode_v1(node: &StateNode) -> Vec<u8> {
        let mut out = Vec::new();
        match node {
            StateNode::Leaf(entries) => {
                out.push(0);
                for (t, k, e) in entries {
                    for s in [t, k, e] {
                        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                        out.extend_from_slice(s.as_bytes());
                    }
                }
            }
            StateNode::Branch { bitmap, children } => {
                out.push(1);
                out.extend_from_slice(&bitmap.to_le_bytes());
                for c in children {
                    out.extend_from_slice(&c.to_le_bytes());
                }
            }
        }
        out
    }

    fn node_strategy() -> impl proptest::strategy::Strategy<Value = StateNode> {
        use proptest::prelude::*;
        let event_type = prop_oneof![proptest::sample::select(COMMON_TYPES.to_vec()).prop_map(str::to_owned), ".{0,20}", Just(String::new())];
        // Ids of every room version's form, and near misses of the hash form.
        let event_id = prop_oneof![
            proptest::array::uniform32(any::<u8>()).prop_map(|b| {
                use base64::Engine;
                format!("${}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
            }),
            "\\$[A-Za-z0-9+/_-]{43}",
            "\\$[A-Za-z0-9_-]{42,44}",
            ".{0,50}",
        ];
        let leaf = proptest::collection::vec((event_type, ".{0,30}", event_id), 0..6).prop_map(StateNode::Leaf);
        let branch = any::<u16>().prop_flat_map(|bitmap| {
            proptest::collection::vec(prop_oneof![0u64..300, any::<u64>()], bitmap.count_ones() as usize).prop_map(move |children| StateNode::Branch { bitmap, children })
        });
        prop_oneof![leaf, branch]
    }

    proptest::proptest! {
        /// Every node reads back as written, in the compact encoding and in the old one;
        /// every proper prefix of a compact node, and the node with a byte more, is an error.
        #[test]
        fn state_nodes_read_back_in_both_encodings(node in node_strategy()) {
            let bytes = node.encode();
            proptest::prop_assert_eq!(&StateNode::decode(&bytes).unwrap(), &node);
            proptest::prop_assert_eq!(&StateNode::decode(&encode_v1(&node)).unwrap(), &node);
            for n in 0..bytes.len() {
                proptest::prop_assert!(StateNode::decode(&bytes[..n]).is_err(), "prefix of {} bytes decoded", n);
            }
            let mut longer = bytes.clone();
            longer.push(0);
            proptest::prop_assert!(StateNode::decode(&longer).is_err());
        }

        /// Bytes behind any of the four tags, and valid nodes with one byte changed, are an
        /// error or a node, never a panic.
        #[test]
        fn any_bytes_decode_without_panicking(
            tag in 0u8..4,
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            node in node_strategy(),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let _ = StateNode::decode(&[&[tag][..], &tail].concat());
            for mut bytes in [node.encode(), encode_v1(&node)] {
                let i = at.index(bytes.len());
                bytes[i] = byte;
                let _ = StateNode::decode(&bytes);
            }
        }
    }

    /// The stored bytes of each encoding, written out: a change to the layout (the type
    /// table, the tags, the varints) fails here, not in databases.
    #[test]
    fn compact_node_bytes_are_fixed() {
        use base64::Engine;
        let hash_id = format!("${}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 32]));
        let leaf = StateNode::Leaf(vec![("m.room.member".into(), "@a:b".into(), hash_id), ("x.y".into(), String::new(), "$t:s".into())]);
        let mut leaf_bytes = vec![2, 2, 1, 4, b'@', b'a', b':', b'b', 1];
        leaf_bytes.extend([7u8; 32]);
        leaf_bytes.extend([0, 3, b'x', b'.', b'y', 0, 0, 4, b'$', b't', b':', b's']);
        assert_eq!(leaf.encode(), leaf_bytes);
        assert_eq!(StateNode::decode(&leaf_bytes).unwrap(), leaf);
        let branch = StateNode::Branch { bitmap: 0x8005, children: vec![1, 300, u64::MAX] };
        let branch_bytes = vec![3, 0x05, 0x80, 1, 0xac, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(branch.encode(), branch_bytes);
        assert_eq!(StateNode::decode(&branch_bytes).unwrap(), branch);
        // Encodings 0 and 1, as earlier versions wrote them.
        let old_leaf = [0, 3, 0, 0, 0, b'x', b'.', b'y', 0, 0, 0, 0, 4, 0, 0, 0, b'$', b't', b':', b's'];
        assert_eq!(StateNode::decode(&old_leaf).unwrap(), StateNode::Leaf(vec![("x.y".into(), String::new(), "$t:s".into())]));
        let old_branch = [1, 0x01, 0x00, 42, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(StateNode::decode(&old_branch).unwrap(), StateNode::Branch { bitmap: 1, children: vec![42] });
        // An old branch whose length does not match its bitmap is refused, as it was.
        assert!(StateNode::decode(&[1, 0x03, 0x00, 1, 0, 0, 0, 0, 0, 0, 0]).is_err(), "fewer children than bits");
        assert!(StateNode::decode(&[1, 0x01, 0x00, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]).is_err(), "more children than bits");
    }

    /// A membership leaf of four entries and a full branch take at least 30% less than in
    /// the old encoding (218 against 353 bytes and 51 against 131 when written).
    #[test]
    fn compact_nodes_are_smaller() {
        use base64::Engine;
        let id = |i: u8| format!("${}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([i; 32]));
        let leaf = StateNode::Leaf((0..4).map(|i| ("m.room.member".to_owned(), format!("@user{i}:kiwi.example"), id(i))).collect());
        let branch = StateNode::Branch { bitmap: u16::MAX, children: (0..16).map(|i| 40_000 + i).collect() };
        for node in [leaf, branch] {
            let (new, old) = (node.encode().len(), encode_v1(&node).len());
            assert!(new * 10 < old * 7, "{new} bytes against {old}: {node:?}");
        }
        // A varint that does not end, or overflows 64 bits, is refused.
        assert!(StateNode::decode(&[BRANCH, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]).is_err());
        assert!(StateNode::decode(&[BRANCH, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).is_ok());
        assert!(StateNode::decode(&[LEAF, 1, 17, 0, 0]).is_err(), "type code beyond the table");
    }

    fn presence(user: &str) -> Entry {
        Entry::Presence(PresenceEntry {
            origin: "kiwi".try_into().unwrap(),
            user_id: user.try_into().unwrap(),
            presence: "online".into(),
            last_active_ago: None,
        })
    }

    fn invited(room: &str) -> Entry {
        Entry::BotInvited(crate::core::log_entry::BotInvited {
            room_id: room.try_into().unwrap(),
            room_version: ruma::RoomVersionId::V11,
            event_id: format!("$inv{}", &room[1..3]).try_into().unwrap(),
            inviter: "@bob:kiwi".try_into().unwrap(),
            event: serde_json::json!({}),
            direct: None,
        })
    }

    /// The state root admission records before an event is written is stored with the
    /// event's index entry, in the write's transaction; a root recorded for an event never
    /// written is forgotten; a written event's root changes when it is written again (or
    /// through `put_written_state_root`); roots earlier versions kept in `state_root_of`
    /// are still read, for events the log holds.
    #[tokio::test]
    async fn state_roots_live_in_the_event_index() {
        let dir = tempfile::tempdir().unwrap();
        let msg = |id: &str| Entry::Pdu(PduEntry::test_message(id));
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_state_root_of("$a", 11);
            store.put_state_root_of("$rejected", 12);
            assert_eq!(store.state_root_of("$a").unwrap(), Some(11), "seen before the write");
            store.append(vec![msg("$a"), msg("$b")], None, &[], 1).unwrap();
            assert_eq!(store.forget_pending_roots(), 1, "only the unwritten event's root was left");
            assert_eq!(store.state_root_of("$rejected").unwrap(), None);
            assert_eq!(store.state_root_of("$b").unwrap(), None, "no root was recorded for it");
            assert!(store.put_written_state_root("$b", 13).unwrap(), "a written event's root goes to its entry");
            assert_eq!(store.state_root_of("$b").unwrap(), Some(13));
            assert!(!store.put_written_state_root("$unknown", 13).unwrap(), "not for an event the log lacks");
            assert_eq!(store.state_root_of("$unknown").unwrap(), None);
            // As an earlier version wrote it.
            store.state_root_of.insert("$old", &14u64.to_be_bytes()).unwrap();
            store.state_root_of.insert("$never-written", &15u64.to_be_bytes()).unwrap();
            store.append(vec![msg("$old")], None, &[], 1).unwrap();
            // An outlier written with a root, admitted to the timeline later: a new root
            // recorded at its admission wins, else it keeps the one it had.
            let outlier = |id: &str| {
                let mut e = PduEntry::test_message(id);
                e.status = crate::core::log_entry::PduStatus::Outlier;
                Entry::Pdu(e)
            };
            store.put_state_root_of("$gap", 16);
            store.put_state_root_of("$auth", 17);
            store.append(vec![outlier("$gap"), outlier("$auth")], None, &[], 1).unwrap();
            store.forget_pending_roots();
            // Admitted again but not written (rejected, or the batch dropped): the written
            // root stands.
            store.put_state_root_of("$gap", 19);
            assert_eq!(store.state_root_of("$gap").unwrap(), Some(19), "seen while admitting");
            store.forget_unwritten("$gap");
            assert_eq!(store.state_root_of("$gap").unwrap(), Some(16));
            store.put_state_root_of("$gap", 18);
            store.append(vec![msg("$gap"), msg("$auth")], None, &[], 1).unwrap();
            assert_eq!(store.state_root_of("$gap").unwrap(), Some(18));
            assert_eq!(store.state_root_of("$auth").unwrap(), Some(17));
            store.db.flush().unwrap();
        }
        let store = reopen_unset(dir.path()).await.unwrap();
        assert_eq!(store.state_root_of("$a").unwrap(), Some(11));
        assert_eq!(store.state_root_of("$b").unwrap(), Some(13));
        assert_eq!(store.state_root_of("$old").unwrap(), Some(14));
        assert_eq!(store.state_root_of("$never-written").unwrap(), None, "an old root of an event the log lacks does not count");
        assert_eq!(store.state_root_of("$gap").unwrap(), Some(18));
        assert!(store.has_timeline_event("$gap").unwrap() && store.has_timeline_event("$auth").unwrap());
        assert_eq!(store.get_event("$a").unwrap().map(|e| e.event_id.to_string()).as_deref(), Some("$a"), "the entry still finds the record");
        assert_eq!(store.state_root_of.len(), 2, "nothing new in the old tree");
    }

    /// Presence (per user) and typing (per room and user) keep only their latest record in
    /// the log; folding what is left gives the same views as folding everything.
    #[tokio::test]
    async fn superseded_presence_and_typing_records_leave_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let typing = |typing: bool| {
            Entry::Typing(crate::core::log_entry::TypingEntry {
                origin: "kiwi".try_into().unwrap(),
                room_id: "!r:kiwi".try_into().unwrap(),
                user_id: "@a:kiwi".try_into().unwrap(),
                typing,
            })
        };
        let offline = Entry::Presence(PresenceEntry { origin: "kiwi".try_into().unwrap(), user_id: "@a:kiwi".try_into().unwrap(), presence: "offline".into(), last_active_ago: None });
        let mut everything = Views::new("@fedlink:fl".try_into().unwrap());
        let mut written = Vec::new();
        for batch in [vec![presence("@a:kiwi"), typing(true)], vec![presence("@b:kiwi"), presence("@a:kiwi")], vec![offline, typing(false)], vec![invited("!r1:kiwi")]] {
            written.extend(store.append(batch, None, &[], 1).unwrap());
        }
        written.iter().for_each(|r| everything.apply(r));
        let kept: Vec<LogRecord> = store.records_after(0).collect::<Result<_, _>>().unwrap();
        let kinds: Vec<(u64, &str)> = kept.iter().map(|r| (r.seq, r.entry.kind())).collect();
        assert_eq!(kinds, vec![(3, "presence"), (5, "presence"), (6, "typing"), (7, "bot_invited")]);
        let mut replayed = Views::new("@fedlink:fl".try_into().unwrap());
        kept.iter().for_each(|r| replayed.apply(r));
        assert_eq!(replayed, everything);
        assert_eq!(replayed.presence[&ruma::OwnedUserId::try_from("@a:kiwi").unwrap()], "offline");
    }

    /// A checkpoint writes the rooms changed since the last one (and the non-room part); the
    /// rooms it leaves alone keep their earlier, still exact, checkpoint: loading gives the
    /// views back exactly, with nothing left to save.
    #[tokio::test]
    async fn a_checkpoint_writes_only_changed_rooms_and_loads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut views = Views::new("@fedlink:fl".try_into().unwrap());
        let rooms: Vec<String> = (0..50).map(|i| format!("!room{i:02}:kiwi")).collect();
        let records = store.append(rooms.iter().map(|r| invited(r)).collect(), None, &[], 1).unwrap();
        records.iter().for_each(|r| views.apply(r));
        assert!(views.unsaved.all, "fresh views have everything unsaved");
        let all = store.save_views(&views, None).await.unwrap();
        views.unsaved = crate::core::views::Touched::none();

        // One room changes (and presence, in the non-room part).
        let records = store.append(vec![invited("!room07:kiwi"), presence("@a:kiwi")], None, &[], 2).unwrap();
        records.iter().for_each(|r| views.apply(r));
        let changed = std::mem::replace(&mut views.unsaved, crate::core::views::Touched::none());
        assert_eq!(changed.rooms.iter().map(|r| r.as_str()).collect::<Vec<_>>(), vec!["!room07:kiwi"]);
        let some = store.save_views(&views, Some(&changed.rooms)).await.unwrap();
        assert!(some * 10 < all, "one room of 50 written: {some} bytes against {all}");

        let loaded = store.load_views().unwrap().expect("a checkpoint");
        assert_eq!(loaded, views);
        assert!(loaded.unsaved.is_empty(), "loaded views have nothing unsaved");
        assert_eq!(loaded.folded_seq, 52);
        assert_eq!(loaded.presence.len(), 1);
    }

    /// Create a database at `path`, with or without compression, holding one message
    /// event `event_id` (durable), and close it.
    async fn created_with_one_event(path: &Path, compress: bool, event_id: &str) {
        let s = Store::open_with(path, DEFAULT_CACHE_BYTES, compress).unwrap();
        s.append(vec![Entry::Pdu(PduEntry::test_message(event_id))], None, &[], 42).unwrap();
        s.flush().await.unwrap();
    }

    /// Reopen a database just dropped. sled's flusher thread may hold the last reference (and
    /// the file lock) for a moment after the drop: wait for it.
    async fn reopen(path: &Path, compress: bool) -> Result<Store, StoreError> {
        open_configured_when_unlocked(path, Some(compress)).await.map(|(s, _)| s)
    }

    /// Reopen a database just dropped as fedlink does with `storage.compression` unset.
    async fn reopen_unset(path: &Path) -> Result<Store, StoreError> {
        open_configured_when_unlocked(path, None).await.map(|(s, _)| s)
    }

    #[tokio::test]
    async fn a_compressed_database_keeps_its_setting_and_a_mismatch_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        created_with_one_event(dir.path(), true, "$z1").await;
        let e = reopen(dir.path(), false).await.err().expect("opening a compressed database uncompressed must fail");
        assert!(matches!(e, StoreError::CompressionMismatch { created_with: true }), "{e}");
        assert!(e.to_string().contains("storage.compression"), "{e}");
        let s = reopen(dir.path(), true).await.unwrap();
        assert_eq!(s.last_seq(), 1);
        assert_eq!(s.get_event("$z1").unwrap().unwrap().event_id, "$z1");
        drop(s);
        let plain = tempfile::tempdir().unwrap();
        drop(Store::open_with(plain.path(), DEFAULT_CACHE_BYTES, false).unwrap());
        let e = reopen(plain.path(), true).await.err().expect("opening a plain database compressed must fail");
        assert!(matches!(e, StoreError::CompressionMismatch { created_with: false }), "{e}");
    }

    /// The vendored sled's compression (vendor/sled/PATCH.md): page updates under 256
    /// bytes written as stored zstd frames, larger ones at level -1, whole pages at the
    /// configured level, all with reused contexts; recovery without decompressing. Each
    /// size gets a tree of its own, updated more times than sled's consolidation
    /// threshold (10), so that its page is read back as a compressed whole page plus
    /// updates of that size. The sizes span the stored frames and the edge to compressed
    /// ones (after sled's few bytes of key and header), the edges of zstd's content size
    /// field (1, 2 and 4 bytes), more than one 128 KiB block, and sled's blobs. Every
    /// value reads back the same:
    /// while cached, after a clean reopen, and after a reopen that must recover from the
    /// log (the files copied while the database was open, as a crash leaves them).
    #[test]
    fn compressed_sled_reads_back_values_of_every_frame_size() {
        let sizes: Vec<usize> = (0..=8)
            .chain(220..=270)
            .chain((65_700..=65_820).step_by(4))
            .chain([131_000, 131_072, 131_100, 300_000])
            .collect();
        let updates = 12;
        let value = |size: usize, round: usize| -> Vec<u8> {
            // Half repetitive (compressible), half varied, and different in each round.
            (0..size).map(|i| if i % 2 == 0 { b'a' } else { (i.wrapping_mul(31) ^ round.wrapping_mul(7)) as u8 }).collect()
        };
        let open = |path: &Path| when_unlocked(|| sled::Config::new().path(path).use_compression(true).compression_factor(1).open()).unwrap();
        let check = |db: &sled::Db| {
            for &size in &sizes {
                let t = db.open_tree(format!("t{size}")).unwrap();
                let got = t.get(b"k").unwrap().unwrap_or_else(|| panic!("value of {size} bytes missing"));
                assert!(got.as_ref() == value(size, updates - 1).as_slice(), "value of {size} bytes read back differently");
                assert_eq!(t.len(), 1);
            }
            assert!(db.open_tree("gone").unwrap().is_empty(), "a removed key came back");
        };
        let dir = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        {
            let db = open(dir.path());
            for &size in &sizes {
                let t = db.open_tree(format!("t{size}")).unwrap();
                for round in 0..updates {
                    t.insert(b"k", value(size, round)).unwrap();
                }
            }
            // Removals are page updates too.
            let gone = db.open_tree("gone").unwrap();
            for round in 0..updates {
                gone.insert(b"g", value(100, round)).unwrap();
                gone.remove(b"g").unwrap();
            }
            db.flush().unwrap();
            check(&db);
            copy_dir(dir.path(), crashed.path());
        }
        check(&open(dir.path()));
        check(&open(crashed.path()));
    }

    /// The stored frames the vendored sled writes for small page updates decode, to the
    /// same bytes, with upstream sled's streaming decoder (`zstd::stream::decode_all`) and
    /// with zstd's one-shot decoder, at every size they are written for.
    #[test]
    fn stored_zstd_frames_decode_with_upstreams_decoder() {
        for n in 0..256usize {
            let buf: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
            let frame = sled::fedlink_stored_zstd_frame(&buf);
            assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), buf, "streaming, {n} bytes");
            assert_eq!(zstd::block::Decompressor::new().decompress(&frame, n).unwrap(), buf, "one-shot, {n} bytes");
            assert_eq!(zstd::zstd_safe::get_frame_content_size(&frame), n as u64, "declared size, {n} bytes");
        }
    }

    /// The fold reads the log a few chunks ahead on a thread: every record comes, in
    /// order, across chunk boundaries and from any start; an iterator dropped early (its
    /// thread blocked on a full queue) returns at once and the store stays usable.
    #[test]
    fn records_to_fold_come_in_order_and_stop_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let n = ReadAhead::CHUNK * 7 + 3;
        let entries: Vec<Entry> = (0..n).map(|i| Entry::Pdu(PduEntry::test_message(&format!("$r{i}")))).collect();
        for batch in entries.chunks(100) {
            s.append(batch.to_vec(), None, &[], 42).unwrap();
        }
        for after in [0u64, 1, ReadAhead::CHUNK as u64, n as u64 - 1, n as u64] {
            let seqs: Vec<u64> = s.records_to_fold(after).map(|r| r.unwrap().seq).collect();
            assert_eq!(seqs, (after + 1..=n as u64).collect::<Vec<_>>(), "after {after}");
        }
        let started = std::time::Instant::now();
        for _ in 0..20 {
            let mut it = s.records_to_fold(0);
            assert_eq!(it.next().unwrap().unwrap().seq, 1);
            drop(it);
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "dropping the iterator waited for the whole log");
        s.append(vec![Entry::Pdu(PduEntry::test_message("$after"))], None, &[], 43).unwrap();
        assert_eq!(s.records_to_fold(n as u64).count(), 1);
    }

    #[tokio::test]
    async fn unset_compression_refuses_data_without_its_conf() {
        let dir = tempfile::tempdir().unwrap();
        created_with_one_event(dir.path(), false, "$p1").await;
        std::fs::remove_file(dir.path().join("conf")).unwrap();
        let e = Store::open_configured(dir.path(), DEFAULT_CACHE_BYTES, None).err().expect("no guess without conf");
        assert!(matches!(e, StoreError::CompressionUnknown), "{e}");
        assert!(e.to_string().contains("storage.compression"), "{e}");
        assert!(!dir.path().join("conf").exists(), "the refusal wrote nothing");
        // Told what it was created with, it opens, and sled records it again.
        let (s, _) = open_configured_when_unlocked(dir.path(), Some(false)).await.unwrap();
        assert_eq!(s.get_event("$p1").unwrap().unwrap().event_id, "$p1");
    }

    fn copy_dir(from: &Path, to: &Path) {
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_dir(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), &target).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn unset_compression_keeps_an_existing_databases_setting_and_compresses_new_ones() {
        // A database created before compression was the default keeps working, uncompressed.
        let plain = tempfile::tempdir().unwrap();
        created_with_one_event(plain.path(), false, "$p1").await;
        let (s, compressed) = open_configured_when_unlocked(plain.path(), None).await.unwrap();
        assert!(!compressed && !s.compressed());
        assert_eq!(s.get_event("$p1").unwrap().unwrap().event_id, "$p1");
        s.append(vec![Entry::Pdu(PduEntry::test_message("$p2"))], None, &[], 43).unwrap();
        s.flush().await.unwrap();
        drop(s);
        // Still plain: asking for compression now is refused.
        let e = open_configured_when_unlocked(plain.path(), Some(true)).await.err().expect("a plain database cannot be opened compressed");
        assert!(matches!(e, StoreError::CompressionMismatch { created_with: false }), "{e}");
        let (s, compressed) = open_configured_when_unlocked(plain.path(), None).await.unwrap();
        assert!(!compressed);
        assert_eq!(s.last_seq(), 2);
        drop(s);
        // A new database is compressed: opening it uncompressed is refused.
        let fresh = tempfile::tempdir().unwrap();
        let (s, compressed) = open_configured_when_unlocked(fresh.path(), None).await.unwrap();
        assert!(compressed && s.compressed());
        s.append(vec![Entry::Pdu(PduEntry::test_message("$c1"))], None, &[], 44).unwrap();
        s.flush().await.unwrap();
        drop(s);
        let e = open_configured_when_unlocked(fresh.path(), Some(false)).await.err().expect("a compressed database cannot be opened plain");
        assert!(matches!(e, StoreError::CompressionMismatch { created_with: true }), "{e}");
        let (s, compressed) = open_configured_when_unlocked(fresh.path(), None).await.unwrap();
        assert!(compressed);
        assert_eq!(s.get_event("$c1").unwrap().unwrap().event_id, "$c1");
    }

    /// [`Store::open_configured`], waiting for a just-dropped store's file lock (see `reopen`).
    async fn open_configured_when_unlocked(path: &Path, compression: Option<bool>) -> Result<(Store, bool), StoreError> {
        when_unlocked(|| Store::open_configured(path, DEFAULT_CACHE_BYTES, compression))
    }

    /// Retry `open` while sled's flusher thread still holds a dropped database's file lock
    /// (for a moment after the drop), for up to 10 s.
    fn when_unlocked<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> Result<T, E> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match open() {
                Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                r => return r,
            }
        }
    }

    #[tokio::test]
    async fn append_is_ordered_durable_and_indexed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let pdu = Entry::Pdu(PduEntry::test_message("$e1"));
            let resp = serde_json::json!({"pdus": {}});
            let recs = s.append(vec![presence("@a:kiwi"), pdu], Some(("kiwi", "t1", &resp)), &[("litchi".into(), "$e1".into())], 42).unwrap();
            assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
            s.append(vec![presence("@b:kiwi")], None, &[], 43).unwrap();
            s.flush().await.unwrap();
        }
        // Reopen: everything is there, sequence continues.
        let s = reopen_unset(dir.path()).await.unwrap();
        assert_eq!(s.last_seq(), 3);
        assert!(s.has_event("$e1").unwrap());
        assert_eq!(s.get_event("$e1").unwrap().unwrap().depth, 3);
        assert_eq!(s.txn_response("kiwi", "t1").unwrap(), Some(serde_json::json!({"pdus": {}})));
        assert_eq!(s.txn_response("kiwi", "t2").unwrap(), None);
        // Answers are kept until pruned by age.
        assert_eq!(s.prune_txns(42).unwrap(), 0);
        assert_eq!(s.prune_txns(43).unwrap(), 1);
        assert_eq!(s.txn_response("kiwi", "t1").unwrap(), None);
        let seqs: Vec<u64> = s.records_after(1).map(|r| r.unwrap().seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        let recs = s.append(vec![presence("@c:kiwi")], None, &[], 44).unwrap();
        // The outbox entry written with the batch survived, in order, and can die and revive.
        let batch = s.outbox_batch("litchi", 50).unwrap();
        assert_eq!(batch.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>(), vec!["$e1"]);
        assert!(s.outbox_batch("litch", 50).unwrap().is_empty(), "prefixes do not leak across names");
        s.outbox_kill(&[batch[0].0.clone()], "403").unwrap();
        assert_eq!(s.dead_letter_counts().unwrap()["litchi"], 1);
        assert!(s.outbox_destinations().unwrap().is_empty());
        assert_eq!(s.retry_dead_letters("litchi").unwrap(), 1);
        assert_eq!(s.outbox_destinations().unwrap()["litchi"], 1);
        assert_eq!(recs[0].seq, 4);
    }

    /// Reading index pages ahead (a thread of its own) changes no answer, and the database
    /// opens again right after the store is dropped (the drop waits for the thread, which
    /// holds the database open).
    #[test]
    fn reading_the_index_ahead_changes_nothing_and_stops_with_the_store() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.append(vec![Entry::Pdu(PduEntry::test_message("$w1"))], None, &[], 42).unwrap();
            for i in 0..20 * WARM_QUEUE {
                s.warm_index(&format!("$warm{i}"));
            }
            s.warm_index("$w1");
            assert!(s.has_event("$w1").unwrap());
            assert!(!s.has_event("$warm7").unwrap(), "an id read ahead is not an event");
        }
        let s = Store::open(dir.path()).expect("the database opens again after the store was dropped");
        assert_eq!(s.get_event("$w1").unwrap().unwrap().event_id, "$w1");
        assert_eq!(s.last_seq(), 1);
    }

    #[test]
    fn txn_keys_do_not_collide_across_origins() {
        assert_ne!(txn_key("a", "bc"), txn_key("ab", "c"));
    }
}
