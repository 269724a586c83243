//! The event ids `event_index` holds, as a Bloom filter in memory.
//!
//! Every PDU that arrives is first looked up by its id (is it known already?), and almost
//! every one is fresh: the answer is "no", which sled can only give by reading the leaf page
//! the id would be on. Ids are hashes, so those pages are spread over the whole index, and
//! beyond sled's cache each such lookup reads and decodes a page from the files: a cost that
//! grew with the log. The filter answers "certainly not there" from memory; only a "maybe"
//! (an id that is there, or about one in a thousand that is not) reads the index.
//!
//! The filter never forgets an id (`event_index` never removes one), and an id is added to
//! every filter (the one in use and one being built) before the write that puts it in the
//! index, and again after it, so "not there" is always true of the index. It is built by
//! scanning the index: at open (in the background for a big log; until then every lookup
//! reads the index), and again, four times as large, when more ids than it was sized for
//! have been added (the old one answers meanwhile). A build that fails is not tried again
//! for a minute.

use std::{
    hash::BuildHasher,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

/// Bits per id the filter is sized for: with [`HASHES`] probes, about one false "maybe" in a
/// thousand lookups while it holds at most its capacity.
const BITS_PER_ID: u64 = 16;
/// Probes per id.
const HASHES: u64 = 6;
/// The smallest filter, in ids (256 KiB).
const MIN_CAPACITY: u64 = 1 << 17;
/// The largest filter built at open, in ids (8 MiB): it is sized from the log's length,
/// which counts every record ever written (EDUs, superseded typing and presence), not only
/// PDUs; past this it grows as ids are added.
const MAX_OPEN_CAPACITY: u64 = 1 << 22;
/// After a failed build, how long before a larger filter is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
/// Up to this many records in the log, the filter is built before the store is opened
/// (a few milliseconds); above, in the background.
const BUILD_INLINE_UP_TO: u64 = 50_000;

struct Bloom {
    words: Box<[AtomicU64]>,
    /// Bits - 1 (a power of two).
    mask: u64,
    /// Ids added (each counted once per add, repeats included): when above `capacity`,
    /// a larger filter is built.
    added: AtomicU64,
    capacity: u64,
    hasher: std::collections::hash_map::RandomState,
}

impl Bloom {
    fn with_capacity(ids: u64, min: u64) -> Self {
        let capacity = ids.max(min).next_power_of_two();
        let bits = capacity * BITS_PER_ID;
        Self {
            words: (0..bits / 64).map(|_| AtomicU64::new(0)).collect(),
            mask: bits - 1,
            added: AtomicU64::new(0),
            capacity,
            hasher: Default::default(),
        }
    }

    /// The bit positions of `id` (double hashing over two independent 64-bit hashes).
    fn positions(&self, id: &[u8]) -> impl Iterator<Item = u64> + '_ {
        let h1 = self.hasher.hash_one((id, 0u8));
        let h2 = self.hasher.hash_one((id, 1u8)) | 1;
        (0..HASHES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & self.mask)
    }

    /// Set `id`'s bits.
    fn add(&self, id: &[u8]) {
        for bit in self.positions(id) {
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Release);
        }
    }

    /// Set `id`'s bits and count it.
    fn insert(&self, id: &[u8]) {
        self.add(id);
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    fn may_hold(&self, id: &[u8]) -> bool {
        self.positions(id).all(|bit| self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0)
    }

    fn bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }
}

/// The filter's answer to a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Certainly not in the index.
    Absent,
    /// Maybe in the index: read it (and count the result with [`KnownIds::found`]).
    Maybe,
    /// No filter ready yet: read the index.
    Unfiltered,
}

/// Lookups the filter answered, for `fedlink_event_filter_lookups_total`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// "Certainly not in the index": no read.
    pub absent: u64,
    /// "Maybe": the index was read and held the id.
    pub present: u64,
    /// "Maybe": the index was read and did not hold the id.
    pub false_maybe: u64,
    /// No filter ready yet (being built at start): the index was read.
    pub unfiltered: u64,
    /// Size of the filter in use, in bytes (0 while none is ready).
    pub bytes: u64,
    /// Ids the filter in use was built with or had added since.
    pub ids: u64,
}

/// The filter over `event_index` (see the module documentation).
pub struct KnownIds {
    index: sled::Tree,
    /// The smallest filter, in ids ([`MIN_CAPACITY`] but in tests).
    min_capacity: u64,
    /// The size the filter was built with at open (for a first build tried again).
    open_capacity: u64,
    /// Whether a build is under way (at most one).
    building: AtomicBool,
    /// The thread of the last background build, joined when the store closes.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The filter lookups use; `None` until the first build is done.
    current: RwLock<Option<Arc<Bloom>>>,
    /// A larger filter being built: writes add to it too.
    next: Mutex<Option<Arc<Bloom>>>,
    /// Set when the store closes: a build under way stops.
    closed: Arc<AtomicBool>,
    /// When a build last failed: growth waits [`RETRY_AFTER`] after it.
    failed_at: Mutex<Option<std::time::Instant>>,
    absent: AtomicU64,
    present: AtomicU64,
    false_maybe: AtomicU64,
    unfiltered: AtomicU64,
}

impl KnownIds {
    /// A filter over `index`, a log of `records` records: built now for a small log, in the
    /// background for a big one.
    pub fn open(index: sled::Tree, records: u64) -> Arc<Self> {
        Self::open_with(index, records, BUILD_INLINE_UP_TO, MIN_CAPACITY)
    }

    fn open_with(index: sled::Tree, records: u64, inline_up_to: u64, min_capacity: u64) -> Arc<Self> {
        // Sized for twice the records: a PDU record holds one id, and the log grows.
        let open_capacity = records.saturating_mul(2).min(MAX_OPEN_CAPACITY);
        let this = Arc::new(Self {
            index,
            min_capacity,
            open_capacity,
            current: RwLock::new(None),
            next: Mutex::new(None),
            building: AtomicBool::new(false),
            thread: Mutex::new(None),
            closed: Arc::new(AtomicBool::new(false)),
            failed_at: Mutex::new(None),
            absent: AtomicU64::new(0),
            present: AtomicU64::new(0),
            false_maybe: AtomicU64::new(0),
            unfiltered: AtomicU64::new(0),
        });
        this.start_build(open_capacity, records <= inline_up_to);
        this
    }

    /// Stop a build under way and wait for its thread (the store is closing: the thread
    /// holds the database open).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(t) = thread {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Build a filter for `capacity` ids, here or on a thread of its own; at most one
    /// build at a time.
    fn start_build(self: &Arc<Self>, capacity: u64, inline: bool) {
        if self.building.swap(true, Ordering::AcqRel) {
            return;
        }
        if inline {
            self.build(capacity);
            return;
        }
        let this = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("fedlink-known-ids".into()).spawn(move || {
            if let Some(this) = this.upgrade() {
                this.build(capacity);
            }
        });
        match spawned {
            Ok(t) => *self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(t),
            Err(e) => {
                // Lookups keep using the filter they have, or read the index.
                tracing::warn!(error = %e, "could not start the event id filter's build; lookups keep the filter they have or read the index");
                self.failed();
            }
        }
    }

    /// Allocate a filter, put it where writes add to it, fill it by scanning the index,
    /// then use it. Ids written from the moment it was put there are added by
    /// [`KnownIds::adding`] and [`KnownIds::added`]; the scan, which starts after, adds
    /// those written before. A build that does not finish (closed, failed, panicked)
    /// counts as failed.
    fn build(&self, capacity: u64) {
        struct Unfinished<'a>(&'a KnownIds, bool);
        impl Drop for Unfinished<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.failed();
                }
            }
        }
        let mut done = Unfinished(self, false);
        let started = std::time::Instant::now();
        // Allocated here, not under the write path's locks (a large one takes a while).
        let bloom = Arc::new(Bloom::with_capacity(capacity, self.min_capacity));
        *self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(bloom.clone());
        let mut scanned = 0u64;
        for key in self.index.iter().keys() {
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            match key {
                Ok(k) => bloom.insert(&k),
                Err(e) => {
                    // Without every id, "absent" could be wrong: keep the old answers.
                    tracing::warn!(error = %e, "reading event_index for the event id filter failed; lookups keep the filter they have or read the index");
                    return;
                }
            }
            scanned += 1;
        }
        {
            let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next.take();
        }
        done.1 = true;
        self.building.store(false, Ordering::Release);
        tracing::info!(ids = scanned, capacity = bloom.capacity, bytes = bloom.bytes(), ms = started.elapsed().as_millis() as u64, "event id filter built");
    }

    /// A build failed: drop the filter it was filling, and wait [`RETRY_AFTER`] before
    /// the next.
    fn failed(&self) {
        self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        *self.failed_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
        self.building.store(false, Ordering::Release);
    }

    /// Note that `id` is about to be written to the index: call before the write, so a
    /// lookup never finds it absent once it is there, in the filter in use or in one whose
    /// build finishes before [`KnownIds::added`] runs.
    pub fn adding(&self, id: &[u8]) {
        let next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(b) = &*self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
            b.add(id);
        }
        if let Some(n) = &*next {
            n.add(id);
        }
    }

    /// Note that `id` was written to the index: call after the write, so a filter being
    /// built, whose scan may have passed the id's place before it was there, holds it.
    /// Starts a larger filter when the one in use holds more ids than it was sized for
    /// (or a first one, when the first build failed).
    pub fn added(self: &Arc<Self>, id: &[u8]) {
        let grow = {
            let next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let grow = match &*self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
                Some(b) => {
                    b.insert(id);
                    let added = b.added.load(Ordering::Relaxed);
                    (added > b.capacity).then(|| (b.capacity * 4).max(added.saturating_mul(2)))
                }
                None => Some(self.open_capacity),
            };
            if let Some(n) = &*next {
                n.insert(id);
            }
            grow
        };
        let Some(capacity) = grow else { return };
        if self.building.load(Ordering::Acquire) || self.closed.load(Ordering::Relaxed) {
            return;
        }
        if self.failed_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return;
        }
        tracing::info!(capacity, "building a larger event id filter (or a first one, after a failed build)");
        self.start_build(capacity, false);
    }

    /// What the filter says of `id`; [`Answer::Absent`] is certain.
    pub fn lookup(&self, id: &[u8]) -> Answer {
        match &*self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(b) if !b.may_hold(id) => {
                self.absent.fetch_add(1, Ordering::Relaxed);
                Answer::Absent
            }
            Some(_) => Answer::Maybe,
            None => {
                self.unfiltered.fetch_add(1, Ordering::Relaxed);
                Answer::Unfiltered
            }
        }
    }

    /// Count what a read after [`Answer::Maybe`] found.
    pub fn found(&self, held: bool) {
        if held {
            self.present.fetch_add(1, Ordering::Relaxed);
        } else {
            self.false_maybe.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lookups so far and the filter's size.
    pub fn counts(&self) -> Counts {
        let (bytes, ids) = match &*self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(b) => (b.bytes(), b.added.load(Ordering::Relaxed)),
            None => (0, 0),
        };
        Counts {
            absent: self.absent.load(Ordering::Relaxed),
            present: self.present.load(Ordering::Relaxed),
            false_maybe: self.false_maybe.load(Ordering::Relaxed),
            unfiltered: self.unfiltered.load(Ordering::Relaxed),
            bytes,
            ids,
        }
    }

    /// Whether a filter is in use (the first build is done).
    pub fn ready(&self) -> bool {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("event_index").unwrap();
        (dir, tree)
    }

    fn id(i: u64) -> Vec<u8> {
        format!("$event{i}").into_bytes()
    }

    /// What a store write does: note, write, note again.
    fn write(ids: &Arc<KnownIds>, tree: &sled::Tree, i: u64) {
        ids.adding(&id(i));
        tree.insert(id(i), &i.to_be_bytes()).unwrap();
        ids.added(&id(i));
    }

    fn holds(ids: &KnownIds, id: &[u8]) -> bool {
        ids.lookup(id) != Answer::Absent
    }

    fn wait_ready(ids: &KnownIds, building: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !ids.ready() || building() {
            assert!(std::time::Instant::now() < deadline, "the filter was not built within 30 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn held_ids_are_never_absent_and_fresh_ones_mostly_are() {
        let (_dir, tree) = index();
        for i in 0..5_000 {
            tree.insert(id(i), &i.to_be_bytes()).unwrap();
        }
        let ids = KnownIds::open(tree.clone(), 5_000);
        assert!(ids.ready(), "a small log's filter is built at open");
        assert_eq!(ids.counts().unfiltered, 0);
        for i in 5_000..6_000 {
            write(&ids, &tree, i);
        }
        assert!((0..6_000).all(|i| holds(&ids, &id(i))), "an id the index holds is never answered absent");
        let maybe = (10_000..110_000).filter(|i| holds(&ids, &id(*i))).count();
        assert!(maybe < 200, "{maybe} of 100,000 fresh ids were answered maybe (expected about 0.1% or less)");
        assert_eq!(ids.counts().absent, 100_000 - maybe as u64);
    }

    #[test]
    fn ids_written_while_the_filter_is_built_in_the_background_are_held() {
        let (_dir, tree) = index();
        let mut batch = sled::Batch::default();
        for i in 0..100_000u64 {
            batch.insert(id(i), &i.to_be_bytes());
        }
        tree.apply_batch(batch).unwrap();
        // Built in the background (inline only up to 0 records), with writes under way.
        let ids = KnownIds::open_with(tree.clone(), 100_000, 0, 1 << 10);
        let mut i = 100_000;
        while !ids.ready() {
            write(&ids, &tree, i);
            i += 1;
        }
        assert!(i > 100_000, "no write overlapped the build: the test proved nothing");
        for _ in 0..1_000 {
            write(&ids, &tree, i);
            i += 1;
        }
        let missed: Vec<u64> = (0..i).filter(|j| !holds(&ids, &id(*j))).collect();
        assert!(missed.is_empty(), "ids written before or during the build answered absent: {missed:?}");
    }

    /// A write whose commit lands after a build's scan passed the id's place, and whose
    /// [`KnownIds::added`] has not run when the build swaps its filter in: the id must be
    /// there already (from [`KnownIds::adding`]).
    #[test]
    fn an_id_committed_behind_a_build_scan_is_held_after_the_swap() {
        let (_dir, tree) = index();
        let ids = KnownIds::open_with(tree.clone(), 0, u64::MAX, 1 << 10);
        // A build under way whose scan has passed (it saw nothing).
        *ids.next.lock().unwrap() = Some(Arc::new(Bloom::with_capacity(1 << 12, 1 << 10)));
        ids.adding(&id(7));
        tree.insert(id(7), &7u64.to_be_bytes()).unwrap();
        // The build finishes before the write's `added`.
        let built = ids.next.lock().unwrap().take();
        *ids.current.write().unwrap() = built;
        assert_eq!(ids.lookup(&id(7)), Answer::Maybe, "an id in the index answered absent");
        ids.added(&id(7));
        assert_eq!(ids.lookup(&id(7)), Answer::Maybe);
    }

    /// A first build that fails leaves lookups reading the index; the next write after
    /// the retry delay starts another.
    #[test]
    fn a_failed_first_build_is_tried_again() {
        let (_dir, tree) = index();
        let ids = KnownIds::open_with(tree.clone(), 0, 0, 1 << 10);
        wait_ready(&ids, || ids.building.load(Ordering::Acquire));
        // As a failed build leaves it: no filter, a failure just now.
        *ids.current.write().unwrap() = None;
        ids.failed();
        write(&ids, &tree, 1);
        assert!(!ids.building.load(Ordering::Acquire) && !ids.ready(), "no new build within the retry delay");
        assert_eq!(ids.lookup(&id(1)), Answer::Unfiltered);
        *ids.failed_at.lock().unwrap() = Some(std::time::Instant::now() - RETRY_AFTER);
        write(&ids, &tree, 2);
        wait_ready(&ids, || ids.building.load(Ordering::Acquire));
        assert!((1..=2).all(|i| holds(&ids, &id(i))));
        assert_eq!(ids.lookup(&id(99)), Answer::Absent);
    }

    #[test]
    fn a_full_filter_is_rebuilt_larger_and_keeps_every_id() {
        let (_dir, tree) = index();
        let ids = KnownIds::open_with(tree.clone(), 0, 0, 1 << 10);
        wait_ready(&ids, || false);
        let first = ids.counts().bytes;
        // Past its capacity of 1,024 ids: a filter four times as large is built meanwhile.
        for i in 0..5_000 {
            write(&ids, &tree, i);
        }
        wait_ready(&ids, || ids.building.load(Ordering::Acquire));
        let grown = ids.counts().bytes;
        assert!(grown >= 4 * first, "the filter grew from {first} to {grown} bytes");
        assert!((0..5_000).all(|i| holds(&ids, &id(i))), "every written id is held after the rebuild");
        let maybe = (10_000..20_000).filter(|i| holds(&ids, &id(*i))).count();
        assert!(maybe < 500, "{maybe} of 10,000 fresh ids answered maybe after growing");
    }
}
