//! A bounded in-memory cache: two generations of at most `cap` entries each. A hit in the
//! old generation moves the entry to the new one; when the new generation is full, the old
//! one is dropped whole. Memory stays bounded (2 x `cap` entries) and hot entries survive,
//! at the cost of one hash lookup more than an LRU list, with no per-hit bookkeeping.

use std::{collections::HashMap, hash::Hash, sync::Mutex};

/// A bounded, thread-safe cache of cheaply clonable values (use `Arc` for big ones).
pub struct Cache<K, V> {
    cap: usize,
    inner: Mutex<Generations<K, V>>,
}

struct Generations<K, V> {
    new: HashMap<K, V>,
    old: HashMap<K, V>,
}

impl<K: Eq + Hash + Clone, V: Clone> Cache<K, V> {
    /// A cache holding at most `2 * cap` entries.
    pub fn new(cap: usize) -> Self {
        Cache { cap: cap.max(1), inner: Mutex::new(Generations { new: HashMap::new(), old: HashMap::new() }) }
    }

    /// The cached value of `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized + ToOwned<Owned = K>,
    {
        let mut g = self.inner.lock().expect("cache lock poisoned");
        if let Some(v) = g.new.get(key) {
            return Some(v.clone());
        }
        let v = g.old.remove(key)?;
        Self::put(&mut g, self.cap, key.to_owned(), v.clone());
        Some(v)
    }

    /// Cache `value` under `key`.
    pub fn insert(&self, key: K, value: V) {
        let mut g = self.inner.lock().expect("cache lock poisoned");
        Self::put(&mut g, self.cap, key, value);
    }

    fn put(g: &mut Generations<K, V>, cap: usize, key: K, value: V) {
        if g.new.len() >= cap && !g.new.contains_key(&key) {
            g.old = std::mem::take(&mut g.new);
        }
        g.new.insert(key, value);
    }

    /// Forget `key`.
    pub fn remove<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let mut g = self.inner.lock().expect("cache lock poisoned");
        g.new.remove(key);
        g.old.remove(key);
    }

    /// Entries held now (at most `2 * cap`).
    pub fn len(&self) -> usize {
        let g = self.inner.lock().expect("cache lock poisoned");
        g.new.len() + g.old.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::Cache;

    #[test]
    fn stays_bounded_and_keeps_what_is_used() {
        let c: Cache<u32, u32> = Cache::new(3);
        for i in 0..100 {
            c.insert(i, i * 2);
            // 0 is read after every insert: it never ages out.
            assert_eq!(c.get(&0), Some(0), "after inserting {i}");
            assert!(c.len() <= 6);
        }
        assert_eq!(c.get(&99), Some(198));
        assert_eq!(c.get(&50), None, "an entry nobody read ages out");
    }
}
