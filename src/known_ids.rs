//! The event ids `event_index` holds, as a Bloom filter in memory.
//!
//! Every PDU that arrives is first looked up by its id (is it known already?), and almost
//! every one is fresh: the answer is "no", which sled can only give by reading the leaf page
//! the id would be on. Ids are hashes, so those pages are spread over the whole index, and
//! beyond sled's cache each such lookup reads and decodes a page from the files: a cost that
//! grew with the log. The filter answers "certainly not there" from memory; only a "maybe"
//! (an id that is there, or a few in a thousand that are not: see [`Filter`]) reads the
//! index.
//!
//! The filter never forgets an id (`event_index` never removes one), and an id is added to
//! every filter (the one in use and one being built) before the write that puts it in the
//! index, and again after it (with no filter in use, it is held as in flight meanwhile),
//! so "not there" is always true of the index. It is built once, by scanning the index at
//! open (in the background for a big log; until then every lookup reads the index); it then
//! grows by layers, each four times as large as the last, when more ids than its newest
//! layer was sized for have been added (see [`Filter`]): growing never reads the index
//! again (a rebuild scan took 6-9% of fedlink's CPU in the profiles that caught one, at
//! 300,000-1,100,000 records). A build that fails is not tried again for a minute.

use std::{
    hash::BuildHasher,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

/// Bits per id a layer is sized for: with [`HASHES`] probes, about one false "maybe" in a
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
/// The largest layer, in ids (2 GiB of bits): past it, full layers are followed by layers
/// of this size.
const MAX_LAYER_CAPACITY: u64 = 1 << 30;
/// After a failed first build, how long before it is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
/// Up to this many records in the log, the filter is built before the store is opened
/// (a few milliseconds); above, in the background.
const BUILD_INLINE_UP_TO: u64 = 50_000;

/// One layer of the filter: a Bloom filter sized for `capacity` ids.
struct Bloom {
    words: Box<[AtomicU64]>,
    /// Bits - 1 (a power of two).
    mask: u64,
    /// Ids inserted (counted by `Filter::insert`, repeats included; `Filter::add` sets bits
    /// only): when above `capacity`, the filter adds a layer.
    added: AtomicU64,
    capacity: u64,
}

/// An id's two hashes: its bit positions in every layer derive from them.
type Hashes = (u64, u64);

impl Bloom {
    fn with_capacity(ids: u64, min: u64) -> Self {
        let capacity = ids.max(min).clamp(1, MAX_LAYER_CAPACITY).next_power_of_two();
        let bits = capacity * BITS_PER_ID;
        // Zeroed pages, not written: a large layer is added on the write path.
        let words = crate::memory::zeroed_atomics(usize::try_from(bits / 64).expect("a layer fits in memory"));
        Self { words, mask: bits - 1, added: AtomicU64::new(0), capacity }
    }

    /// The bit positions of an id (double hashing).
    fn positions(&self, (h1, h2): Hashes) -> impl Iterator<Item = u64> + '_ {
        (0..HASHES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & self.mask)
    }

    /// Set an id's bits.
    fn add(&self, h: Hashes) {
        for bit in self.positions(h) {
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Release);
        }
    }

    fn may_hold(&self, h: Hashes) -> bool {
        self.positions(h).all(|bit| self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0)
    }

    fn bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }
}

/// A filter that grows without reading the index again: ids go into its newest layer, and
/// when that holds more ids than it was sized for, a layer four times as large is added
/// (the old ones keep answering; layers are never removed, so a bit once set stays in the
/// filter). An id may be held if any layer may hold it; wrong "maybe"s add up over the
/// layers, about one per thousand lookups of fresh ids for each full layer (sizes grow
/// fourfold, so a filter started at 131,072 ids has 4 layers at 2.8 million ids: about
/// 0.3%).
struct Filter {
    hasher: std::collections::hash_map::RandomState,
    layers: RwLock<Vec<Arc<Bloom>>>,
}

impl Filter {
    fn new(capacity: u64, min: u64) -> Self {
        Self { hasher: Default::default(), layers: RwLock::new(vec![Arc::new(Bloom::with_capacity(capacity, min))]) }
    }

    fn hashes(&self, id: &[u8]) -> Hashes {
        (self.hasher.hash_one((id, 0u8)), self.hasher.hash_one((id, 1u8)) | 1)
    }

    fn newest(&self) -> Arc<Bloom> {
        self.layers.read().unwrap_or_else(std::sync::PoisonError::into_inner).last().expect("a filter has a layer").clone()
    }

    /// Set `id`'s bits (in the newest layer).
    fn add(&self, id: &[u8]) {
        self.newest().add(self.hashes(id));
    }

    /// Set `id`'s bits and count it; add a layer when the newest is full.
    fn insert(&self, id: &[u8]) {
        let newest = self.newest();
        newest.add(self.hashes(id));
        if newest.added.fetch_add(1, Ordering::Relaxed) + 1 > newest.capacity {
            self.grow(&newest);
        }
    }

    /// Add a layer four times as large as `full` (at most [`MAX_LAYER_CAPACITY`]), unless
    /// another was added meanwhile. Allocated zeroed (no page is written here) and before
    /// the lock: lookups do not wait on it.
    fn grow(&self, full: &Arc<Bloom>) {
        let capacity = full.capacity.saturating_mul(4);
        let layer = Arc::new(Bloom::with_capacity(capacity, capacity));
        let mut layers = self.layers.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if layers.last().is_some_and(|l| Arc::ptr_eq(l, full)) {
            tracing::info!(layers = layers.len() + 1, capacity = layer.capacity, bytes = layer.bytes(), "event id filter full: added a layer");
            layers.push(layer);
        }
    }

    fn may_hold(&self, id: &[u8]) -> bool {
        let h = self.hashes(id);
        self.layers.read().unwrap_or_else(std::sync::PoisonError::into_inner).iter().any(|l| l.may_hold(h))
    }

    /// Bytes and ids counted over all layers, and how many layers.
    fn size(&self) -> (u64, u64, u64) {
        let layers = self.layers.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        (layers.iter().map(|l| l.bytes()).sum(), layers.iter().map(|l| l.added.load(Ordering::Relaxed)).sum(), layers.len() as u64)
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
    /// Layers of the filter in use.
    pub layers: u64,
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
    current: RwLock<Option<Arc<Filter>>>,
    /// The filter the first build is filling: writes add to it too.
    next: Mutex<Option<Arc<Filter>>>,
    /// Ids between [`KnownIds::adding`] and [`KnownIds::added`] while no filter is in use
    /// (how many times each): a build that starts after their `adding` and whose scan
    /// passes their place before they are written adds them before it is swapped in.
    in_flight: Mutex<std::collections::HashMap<Vec<u8>, u32>>,
    /// Set when the store closes: a build under way stops.
    closed: Arc<AtomicBool>,
    /// When a build last failed: the next waits [`RETRY_AFTER`] after it.
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
            in_flight: Mutex::new(Default::default()),
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
                // Lookups read the index meanwhile.
                tracing::warn!(error = %e, "could not start the event id filter's build; lookups read the index meanwhile");
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
        let filter = Arc::new(Filter::new(capacity, self.min_capacity));
        *self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(filter.clone());
        let mut scanned = 0u64;
        for key in self.index.iter().keys() {
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            match key {
                Ok(k) => filter.insert(&k),
                Err(e) => {
                    // Without every id, "absent" could be wrong: no filter is used.
                    tracing::warn!(error = %e, "reading event_index for the event id filter failed; lookups read the index meanwhile");
                    return;
                }
            }
            scanned += 1;
        }
        {
            let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Ids whose write began before this build put its filter where writes add to
            // it, and whose place the scan may have passed before they were written.
            for id in self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).keys() {
                filter.insert(id);
            }
            *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next.take();
        }
        done.1 = true;
        self.building.store(false, Ordering::Release);
        let (bytes, _, layers) = filter.size();
        tracing::info!(ids = scanned, layers, bytes, ms = started.elapsed().as_millis() as u64, "event id filter built");
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
    /// build finishes before [`KnownIds::added`] runs (with no filter in use, the id is
    /// held as in flight until then, for a build that starts meanwhile).
    pub fn adding(&self, id: &[u8]) {
        let next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(f) => f.add(id),
            None => *self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(id.to_vec()).or_default() += 1,
        }
        if let Some(n) = &*next {
            n.add(id);
        }
    }

    /// Note that `id` was written to the index: call after the write, so a filter being
    /// built, whose scan may have passed the id's place before it was there, holds it.
    /// Counting it may add a layer to the filter (see [`Filter`]); with no filter (the
    /// first build failed), starts another build.
    pub fn added(self: &Arc<Self>, id: &[u8]) {
        let first_build = {
            let next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let none = match &*self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
                Some(f) => {
                    f.insert(id);
                    false
                }
                None => true,
            };
            if let Some(n) = &*next {
                n.insert(id);
            }
            none
        };
        {
            // In a filter now, or written before any build to come starts its scan. (An id
            // whose write failed stays: at worst a wrong "maybe".)
            let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = in_flight.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    in_flight.remove(id);
                }
            }
        }
        if !first_build || self.building.load(Ordering::Acquire) || self.closed.load(Ordering::Relaxed) {
            return;
        }
        if self.failed_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return;
        }
        tracing::info!(capacity = self.open_capacity, "building the event id filter again after a failed build");
        self.start_build(self.open_capacity, false);
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
        let (bytes, ids, layers) = match &*self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(f) => f.size(),
            None => (0, 0, 0),
        };
        Counts {
            absent: self.absent.load(Ordering::Relaxed),
            present: self.present.load(Ordering::Relaxed),
            false_maybe: self.false_maybe.load(Ordering::Relaxed),
            unfiltered: self.unfiltered.load(Ordering::Relaxed),
            bytes,
            ids,
            layers,
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

    /// An index holding ids `0..n`, written in one batch (no filter sees them).
    fn index_holding(n: u64) -> (tempfile::TempDir, sled::Tree) {
        let (dir, tree) = index();
        let mut batch = sled::Batch::default();
        for i in 0..n {
            batch.insert(id(i), &i.to_be_bytes());
        }
        tree.apply_batch(batch).unwrap();
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
        let (_dir, tree) = index_holding(100_000);
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
        *ids.next.lock().unwrap() = Some(Arc::new(Filter::new(1 << 12, 1 << 10)));
        ids.adding(&id(7));
        tree.insert(id(7), &7u64.to_be_bytes()).unwrap();
        // The build finishes before the write's `added`.
        let built = ids.next.lock().unwrap().take();
        *ids.current.write().unwrap() = built;
        assert_eq!(ids.lookup(&id(7)), Answer::Maybe, "an id in the index answered absent");
        ids.added(&id(7));
        assert_eq!(ids.lookup(&id(7)), Answer::Maybe);
    }

    /// A write that began while no filter was in use, before a build put its filter where
    /// writes add to it, and committed after the build's scan passed its place: the build
    /// adds it before its filter is used, so it is not answered absent before its `added`.
    #[test]
    fn an_id_written_across_the_start_of_a_build_is_held_after_the_swap() {
        let (_dir, tree) = index();
        let ids = KnownIds::open_with(tree.clone(), 0, u64::MAX, 1 << 10);
        // As after a failed first build: no filter, none being built.
        *ids.current.write().unwrap() = None;
        ids.adding(&id(7));
        // A build starts and finishes (its scan sees nothing) before the write lands.
        ids.building.store(true, Ordering::Release);
        ids.build(1 << 10);
        assert!(ids.ready());
        tree.insert(id(7), &7u64.to_be_bytes()).unwrap();
        assert_eq!(ids.lookup(&id(7)), Answer::Maybe, "an id in the index answered absent");
        ids.added(&id(7));
        assert_eq!(ids.lookup(&id(7)), Answer::Maybe);
        assert!(ids.in_flight.lock().unwrap().is_empty(), "an id stays in flight after its write");
        assert_eq!(ids.lookup(&id(8)), Answer::Absent);
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

    /// Fresh ids (never written) the filter answers "maybe" for, of 100,000.
    fn false_maybes(ids: &KnownIds) -> usize {
        (1_000_000..1_100_000).filter(|i| holds(ids, &id(*i))).count()
    }

    #[test]
    fn a_full_filter_grows_by_layers_without_reading_the_index_again() {
        let (_dir, tree) = index();
        let ids = KnownIds::open_with(tree.clone(), 0, 0, 1 << 10);
        wait_ready(&ids, || ids.building.load(Ordering::Acquire));
        let first = ids.counts();
        assert_eq!((first.layers, first.bytes), (1, 1024 * BITS_PER_ID / 8));
        // Past its capacity of 1,024 ids, three times over: layers of 4,096, 16,384 and
        // 65,536 ids are added as it fills, and no build (no scan of the index) starts.
        for i in 0..25_000 {
            write(&ids, &tree, i);
            assert!(!ids.building.load(Ordering::Acquire), "a full filter started a build (a scan of the index)");
        }
        let grown = ids.counts();
        assert_eq!(grown.layers, 4, "{grown:?}");
        assert_eq!(grown.bytes, (1024 + 4096 + 16384 + 65536) * BITS_PER_ID / 8);
        assert_eq!(grown.ids, 25_000);
        assert!((0..25_000).all(|i| holds(&ids, &id(i))), "a written id answered absent after the filter grew");
        // Each full layer says "maybe" wrongly about once per thousand fresh ids.
        let maybe = false_maybes(&ids);
        assert!(maybe < 600, "{maybe} of 100,000 fresh ids answered maybe with four layers");
    }

    /// A log whose length understates its ids (the first build is sized from it): the
    /// build's scan adds layers as it goes.
    #[test]
    fn the_first_build_grows_by_layers_while_it_scans() {
        let (_dir, tree) = index_holding(50_000);
        let ids = KnownIds::open_with(tree.clone(), 1_000, u64::MAX, 1 << 10);
        assert!(ids.ready());
        let c = ids.counts();
        assert!(c.layers >= 3, "{c:?}");
        assert_eq!(c.ids, 50_000);
        assert!((0..50_000).all(|i| holds(&ids, &id(i))));
        let maybe = false_maybes(&ids);
        assert!(maybe < 600, "{maybe} of 100,000 fresh ids answered maybe");
    }
}
