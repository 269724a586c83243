//! Room state at events, and state resolution v2 for forks.
//!
//! Every accepted event has the state after it, kept as the root of a **persistent hash
//! trie** in the store ([`crate::store::StateNode`]): entries `(type, state key) -> event`
//! are placed by a 64-bit hash of the key, 16 ways per level, in leaves of at most
//! [`LEAF`] entries. A state event writes the nodes along one path (a leaf and a few
//! branches, about a kilobyte whatever the room's size) and shares every other node with
//! its parent's state; a message shares its parent's root outright. So:
//! - storage per state event does not grow with the room (no full map per event);
//! - a lookup (what auth checks need) reads one path, through the store's node cache;
//! - two states are compared by root id, and resolution only runs where parents' roots
//!   differ.
//!
//! State before an event is its parents' state, resolved with `ruma::state_res::resolve`
//! when their roots differ; the room's current state is the resolution of its forward
//! extremities' states. The results go into the log (see `PduEntry::resolved_state`), so
//! views stay a pure fold. Databases written by earlier versions kept a full map per state
//! group; those are converted into a trie on first use.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use ruma::{
    events::StateEventType, room_version_rules::RoomVersionRules, state_res::utils::event_id_set::EventIdSet, EventId, OwnedEventId,
};

use crate::{
    core::pdu::Pdu,
    rooms::load_pdu,
    store::{StateEntry, StateNode, Store, StoreError},
};

/// (type, state key) -> event.
pub type StateMap = BTreeMap<(String, String), OwnedEventId>;

/// The root of a state trie; [`EMPTY`] is the empty state.
pub type Root = u64;

/// The empty state.
pub const EMPTY: Root = 0;

/// Most entries in a leaf before it splits.
pub const LEAF: usize = 4;

/// Levels of 4 hash bits: below the last, colliding keys share a leaf.
const LEVELS: u32 = 16;

/// Most events visited when computing auth chains or the conflicted subgraph.
const WALK_LIMIT: usize = 20_000;

/// Stable 64-bit FNV-1a hash of a state key.
fn key_hash(t: &str, k: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in t.bytes().chain(std::iter::once(0)).chain(k.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A branch below the last level: the stored trie is corrupt (or has a cycle).
fn too_deep(id: Root) -> StoreError {
    StoreError::Corrupt { tree: "state_nodes", reason: format!("branch {id} lies below the last level") }
}

fn nibble(hash: u64, level: u32) -> u32 {
    ((hash >> (60 - 4 * level)) & 0xf) as u32
}

/// The event at `(t, k)` in the state `root`.
pub fn get(store: &Store, root: Root, t: &str, k: &str) -> Result<Option<OwnedEventId>, StoreError> {
    let hash = key_hash(t, k);
    let mut id = root;
    let mut level = 0;
    while id != EMPTY {
        let node = store.state_node(id)?;
        match &*node {
            StateNode::Leaf(entries) => {
                return Ok(entries.iter().find(|(et, ek, _)| et == t && ek == k).and_then(|(_, _, e)| EventId::parse(e.as_str()).ok()));
            }
            StateNode::Branch { .. } if level >= LEVELS => return Err(too_deep(id)),
            StateNode::Branch { bitmap, children } => {
                let n = nibble(hash, level);
                if bitmap & (1 << n) == 0 {
                    return Ok(None);
                }
                id = children[(bitmap & ((1u16 << n) - 1)).count_ones() as usize];
                level += 1;
            }
        }
    }
    Ok(None)
}

/// Set `(t, k)` to `event` (or remove it) in `root`; returns the new root. Writes only the
/// nodes on the key's path; returns `root` itself when nothing changes.
pub fn set(store: &Store, root: Root, t: &str, k: &str, event: Option<&str>) -> Result<Root, StoreError> {
    set_at(store, root, 0, key_hash(t, k), t, k, event)
}

fn set_at(store: &Store, id: Root, level: u32, hash: u64, t: &str, k: &str, event: Option<&str>) -> Result<Root, StoreError> {
    let node = if id == EMPTY { Arc::new(StateNode::Leaf(Vec::new())) } else { store.state_node(id)? };
    match &*node {
        StateNode::Leaf(entries) => {
            let pos = entries.iter().position(|(et, ek, _)| et == t && ek == k);
            if pos.map(|p| entries[p].2.as_str()) == event {
                return Ok(id);
            }
            let mut entries = entries.clone();
            if let Some(p) = pos {
                entries.remove(p);
            }
            if let Some(e) = event {
                entries.push((t.to_owned(), k.to_owned(), e.to_owned()));
                entries.sort();
            }
            build(store, level, entries.into_iter().map(|e| (key_hash(&e.0, &e.1), e)).collect())
        }
        StateNode::Branch { .. } if level >= LEVELS => Err(too_deep(id)),
        StateNode::Branch { bitmap, children } => {
            let n = nibble(hash, level);
            let idx = (bitmap & ((1u16 << n) - 1)).count_ones() as usize;
            let present = bitmap & (1 << n) != 0;
            let child = if present { children[idx] } else { EMPTY };
            let new_child = set_at(store, child, level + 1, hash, t, k, event)?;
            if new_child == child {
                return Ok(id);
            }
            let (mut bitmap, mut children) = (*bitmap, children.clone());
            match (present, new_child == EMPTY) {
                (true, true) => {
                    children.remove(idx);
                    bitmap &= !(1 << n);
                }
                (true, false) => children[idx] = new_child,
                (false, false) => {
                    children.insert(idx, new_child);
                    bitmap |= 1 << n;
                }
                (false, true) => return Ok(id),
            }
            if children.is_empty() {
                return Ok(EMPTY);
            }
            store.put_state_node(StateNode::Branch { bitmap, children })
        }
    }
}

/// Write a subtree holding `entries` (with their hashes) at `level`.
fn build(store: &Store, level: u32, mut entries: Vec<(u64, StateEntry)>) -> Result<Root, StoreError> {
    if entries.is_empty() {
        return Ok(EMPTY);
    }
    if entries.len() <= LEAF || level >= LEVELS {
        let mut leaf: Vec<StateEntry> = entries.into_iter().map(|(_, e)| e).collect();
        leaf.sort();
        return store.put_state_node(StateNode::Leaf(leaf));
    }
    entries.sort_by_key(|(h, _)| nibble(*h, level));
    let mut bitmap = 0u16;
    let mut children = Vec::new();
    let mut rest = entries.as_slice();
    while let Some((h, _)) = rest.first() {
        let n = nibble(*h, level);
        let end = rest.iter().position(|(h, _)| nibble(*h, level) != n).unwrap_or(rest.len());
        children.push(build(store, level + 1, rest[..end].to_vec())?);
        bitmap |= 1 << n;
        rest = &rest[end..];
    }
    store.put_state_node(StateNode::Branch { bitmap, children })
}

/// Write a whole state as a trie.
pub fn from_map(store: &Store, map: &StateMap) -> Result<Root, StoreError> {
    build(store, 0, map.iter().map(|((t, k), e)| (key_hash(t, k), (t.clone(), k.clone(), e.to_string()))).collect())
}

/// Read a whole state (cost grows with the state: for forks, gaps and serving state only).
pub fn load(store: &Store, root: Root) -> Result<StateMap, StoreError> {
    let mut out = StateMap::new();
    let mut todo = vec![(root, 0u32)];
    while let Some((id, level)) = todo.pop() {
        if id == EMPTY {
            continue;
        }
        match &*store.state_node(id)? {
            StateNode::Branch { .. } if level >= LEVELS => return Err(too_deep(id)),
            StateNode::Leaf(entries) => {
                for (t, k, e) in entries {
                    if let Ok(e) = EventId::parse(e.as_str()) {
                        out.insert((t.clone(), k.clone()), e);
                    }
                }
            }
            StateNode::Branch { children, .. } => todo.extend(children.iter().map(|c| (*c, level + 1))),
        }
    }
    Ok(out)
}

/// The trie root of the state after `event_id`, if fedlink recorded it (converting a full
/// map written by an earlier version on first use).
pub fn root_of(store: &Store, event_id: &str) -> Result<Option<Root>, StoreError> {
    if let Some(r) = store.state_root_of(event_id)? {
        return Ok(Some(r));
    }
    let Some(group) = store.legacy_state_group_of(event_id)? else { return Ok(None) };
    let Some(raw) = store.legacy_state_group(&group)? else { return Ok(None) };
    let map: StateMap = raw.into_iter().filter_map(|(t, k, e)| Some(((t, k), EventId::parse(e).ok()?))).collect();
    let root = from_map(store, &map)?;
    // Only for an event the log holds (earlier versions recorded state before the write).
    Ok(store.put_written_state_root(event_id, root)?.then_some(root))
}

/// The state after `event_id`, if fedlink recorded it.
pub fn state_after(store: &Store, event_id: &str) -> Option<StateMap> {
    let root = root_of(store, event_id).ok()??;
    load(store, root).ok()
}

/// The state ids before an event fedlink authored or served (for `state_ids`).
pub fn state_before_ids(store: &Store, event_id: &str) -> Result<Option<Vec<String>>, StoreError> {
    match store.state_before_root(event_id)? {
        Some(root) => Ok(Some(load(store, root)?.into_values().map(|e| e.to_string()).collect())),
        None => store.legacy_state_before(event_id),
    }
}

/// Record the state after `pdu`, given the root of the state before it: the same root for
/// a message, one path written for a state event.
pub fn record_after(store: &Store, pdu: &Pdu, before: Root) -> Result<Root, StoreError> {
    let after = match &pdu.state_key {
        Some(k) => set(store, before, &pdu.kind.to_string(), k, Some(pdu.event_id.as_str()))?,
        None => before,
    };
    store.put_state_root_of(pdu.event_id.as_str(), after);
    Ok(after)
}

/// The state before `pdu`: its parents' state when they share one root (no state is read),
/// else their states resolved. `fallback` gives the state to use for parents fedlink holds
/// no state for (the room's current state). Returns the root and whether all parents were
/// known and shared it.
pub fn state_before(
    store: &Store,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    fallback: &dyn Fn() -> StateMap,
) -> Result<(Root, bool), String> {
    let mut roots: Vec<Root> = Vec::new();
    let mut unknown = false;
    for p in &pdu.prev_events {
        match root_of(store, p.as_str()).map_err(|e| e.to_string())? {
            Some(r) => roots.push(r),
            None => unknown = true,
        }
    }
    roots.sort_unstable();
    roots.dedup();
    if !unknown && roots.len() == 1 {
        return Ok((roots[0], true));
    }
    let mut maps: Vec<StateMap> = roots.iter().map(|r| load(store, *r)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    if unknown || maps.is_empty() {
        maps.push(fallback());
    }
    let map = resolve_distinct(store, rules, maps, None)?;
    Ok((from_map(store, &map).map_err(|e| e.to_string())?, false))
}

/// One state from several of one room: duplicates dropped, and resolved with state
/// resolution v2 only when more than one differs. `pending` is an event being admitted,
/// not yet in the store.
pub fn resolve_distinct(store: &Store, rules: &RoomVersionRules, mut maps: Vec<StateMap>, pending: Option<&Pdu>) -> Result<StateMap, String> {
    maps.sort();
    maps.dedup();
    match maps.len() {
        1 => Ok(maps.pop().expect("one map")),
        _ => resolve(store, rules, &maps, pending),
    }
}

/// Resolve several states of one room with state resolution v2.
/// `pending` is an event being admitted, not yet in the store.
pub fn resolve(store: &Store, rules: &RoomVersionRules, maps: &[StateMap], pending: Option<&Pdu>) -> Result<StateMap, String> {
    let ruma::room_version_rules::StateResolutionVersion::V2(v2) = &rules.state_res else {
        return Err("state resolution v1 is not supported".into());
    };
    let cache: std::cell::RefCell<HashMap<OwnedEventId, Option<Arc<Pdu>>>> = Default::default();
    let pending = pending.map(|p| Arc::new(p.clone()));
    let fetch = |id: &EventId| -> Option<Arc<Pdu>> {
        if let Some(p) = pending.as_ref().filter(|p| *p.event_id == *id) {
            return Some(p.clone());
        }
        if let Some(p) = cache.borrow().get(id) {
            return p.clone();
        }
        let p = load_pdu(store, id, rules);
        cache.borrow_mut().insert(id.to_owned(), p.clone());
        p
    };
    let state_maps: Vec<ruma::state_res::StateMap<OwnedEventId>> = maps
        .iter()
        .map(|m| m.iter().map(|((t, k), e)| ((StateEventType::from(t.as_str()), k.clone()), e.clone())).collect())
        .collect();
    let auth_chains: Vec<EventIdSet<OwnedEventId>> =
        maps.iter().map(|m| auth_chain(&fetch, m.values().cloned().collect())).collect();
    let resolved = ruma::state_res::resolve(
        &rules.authorization,
        v2,
        state_maps.iter(),
        auth_chains,
        &fetch,
        |conflicted| Some(conflicted_subgraph(&fetch, conflicted.values().flatten().cloned().collect())),
    )
    .map_err(|e| e.to_string())?;
    Ok(resolved.into_iter().map(|((t, k), e)| ((t.to_string(), k), e)).collect())
}

fn auth_chain(fetch: &impl Fn(&EventId) -> Option<Arc<Pdu>>, roots: Vec<OwnedEventId>) -> EventIdSet<OwnedEventId> {
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut todo: Vec<OwnedEventId> = roots.iter().filter_map(|r| fetch(r)).flat_map(|p| p.auth_events.clone()).collect();
    while let Some(id) = todo.pop() {
        if seen.len() >= WALK_LIMIT || !seen.insert(id.clone()) {
            continue;
        }
        if let Some(p) = fetch(&id) {
            todo.extend(p.auth_events.iter().cloned());
        }
    }
    seen.into_iter().collect()
}

/// Events that are both ancestors and descendants of conflicted events (room v12).
fn conflicted_subgraph(fetch: &impl Fn(&EventId) -> Option<Arc<Pdu>>, conflicted: HashSet<OwnedEventId>) -> EventIdSet<OwnedEventId> {
    // Ancestors of the conflicted events, with their parents.
    let mut parents: HashMap<OwnedEventId, Vec<OwnedEventId>> = HashMap::new();
    let mut todo: Vec<OwnedEventId> = conflicted.iter().cloned().collect();
    while let Some(id) = todo.pop() {
        if parents.len() >= WALK_LIMIT || parents.contains_key(&id) {
            continue;
        }
        let ps: Vec<OwnedEventId> = fetch(&id).map(|p| p.prev_events.iter().chain(p.auth_events.iter()).cloned().collect()).unwrap_or_default();
        todo.extend(ps.iter().cloned());
        parents.insert(id, ps);
    }
    // Which of them reach a conflicted event (themselves included)?
    let mut reaches: HashMap<OwnedEventId, bool> = HashMap::new();
    fn reach(id: &OwnedEventId, parents: &HashMap<OwnedEventId, Vec<OwnedEventId>>, conflicted: &HashSet<OwnedEventId>, memo: &mut HashMap<OwnedEventId, bool>, depth: usize) -> bool {
        if let Some(r) = memo.get(id) {
            return *r;
        }
        memo.insert(id.clone(), false); // cycle guard
        let r = conflicted.contains(id)
            || (depth < 10_000 && parents.get(id).is_some_and(|ps| ps.iter().any(|p| reach(p, parents, conflicted, memo, depth + 1))));
        memo.insert(id.clone(), r);
        r
    }
    let ids: Vec<OwnedEventId> = parents.keys().cloned().collect();
    ids.into_iter().filter(|id| reach(id, &parents, &conflicted, &mut reaches, 0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u16) -> (String, String) {
        match i % 3 {
            0 => ("m.room.member".to_owned(), format!("@u{i}:kiwi")),
            1 => ("m.room.power_levels".to_owned(), if i.is_multiple_of(2) { String::new() } else { format!("k{i}") }),
            _ => (format!("org.example.t{}", i % 7), format!("{i}")),
        }
    }

    fn event(i: u32) -> OwnedEventId {
        EventId::parse(format!("$ev{i}")).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The trie, changed one key at a time, always equals a plain map changed the same way;
        /// every earlier root still reads as its own state (nothing is changed in place); and
        /// a whole map written at once reads back equal.
        #[test]
        fn trie_equals_a_plain_map(ops in proptest::collection::vec((0u16..400, proptest::option::weighted(0.85, 0u32..1000)), 1..600)) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let mut reference = StateMap::new();
            let mut root = EMPTY;
            let mut history: Vec<(Root, StateMap)> = Vec::new();
            for (i, (k, e)) in ops.iter().enumerate() {
                let (t, sk) = key(*k);
                let ev = e.map(event);
                let before = root;
                root = set(&store, root, &t, &sk, ev.as_ref().map(|e| e.as_str())).unwrap();
                let unchanged = reference.get(&(t.clone(), sk.clone())) == ev.as_ref();
                match &ev {
                    Some(e) => { reference.insert((t.clone(), sk.clone()), e.clone()); }
                    None => { reference.remove(&(t.clone(), sk.clone())); }
                }
                if unchanged {
                    prop_assert_eq!(root, before, "an unchanged entry writes nothing");
                }
                prop_assert_eq!(get(&store, root, &t, &sk).unwrap(), ev);
                if i % 50 == 0 {
                    history.push((root, reference.clone()));
                }
            }
            prop_assert_eq!(&load(&store, root).unwrap(), &reference);
            for k in 0..400 {
                let (t, sk) = key(k);
                prop_assert_eq!(get(&store, root, &t, &sk).unwrap(), reference.get(&(t, sk)).cloned());
            }
            for (r, m) in &history {
                prop_assert_eq!(&load(&store, *r).unwrap(), m);
            }
            let whole = from_map(&store, &reference).unwrap();
            prop_assert_eq!(&load(&store, whole).unwrap(), &reference);
        }
    }

    #[test]
    fn a_state_event_in_a_big_state_writes_one_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let map: StateMap = (0..10_000u16).map(|i| (("m.room.member".to_owned(), format!("@u{i}:kiwi")), event(u32::from(i)))).collect();
        let root = from_map(&store, &map).unwrap();
        let nodes_before = store.state_node_count();
        let after = set(&store, root, "m.room.member", "@new:kiwi", Some("$new")).unwrap();
        let written = store.state_node_count() - nodes_before;
        assert!(written <= 6, "one leaf and the branches above it, not the state: {written} nodes");
        assert_eq!(get(&store, after, "m.room.member", "@new:kiwi").unwrap().unwrap().as_str(), "$new");
        assert_eq!(get(&store, root, "m.room.member", "@new:kiwi").unwrap(), None, "the old state is unchanged");
        assert_eq!(load(&store, after).unwrap().len(), 10_001);
    }

    #[test]
    fn full_maps_of_earlier_versions_are_converted_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entries = vec![("m.room.create".to_owned(), String::new(), "$c".to_owned()), ("m.room.member".to_owned(), "@a:kiwi".to_owned(), "$m".to_owned())];
        store.put_legacy_state_group("$m", "$m", &entries).unwrap();
        assert_eq!(root_of(&store, "$m").unwrap(), None, "not for an event the log lacks");
        let msg = crate::core::log_entry::PduEntry::test_message("$m");
        store.append(vec![crate::core::log_entry::Entry::Pdu(msg)], None, &[], 1).unwrap();
        let root = root_of(&store, "$m").unwrap().expect("converted");
        assert_eq!(store.state_root_of("$m").unwrap(), Some(root));
        let m = load(&store, root).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[&("m.room.member".to_owned(), "@a:kiwi".to_owned())].as_str(), "$m");
    }
}
