//! Room state at events, and state resolution v2 for forks.
//!
//! Every accepted event gets a *state group*: the state after it. A message inherits its
//! parent's group; a state event, or an event merging parents with different states, gets
//! a group of its own, stored as a full map. State before an event is its parents' state,
//! resolved with `ruma::state_res::resolve` when they differ; the room's current state is
//! the resolution of its forward extremities' states. The results go into the log (see
//! `PduEntry::resolved_state`), so views stay a pure fold.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ruma::{
    events::StateEventType, room_version_rules::RoomVersionRules, state_res::utils::event_id_set::EventIdSet, EventId, OwnedEventId,
};

use crate::{core::pdu::Pdu, rooms::load_pdu, store::Store};

/// (type, state key) -> event.
pub type StateMap = BTreeMap<(String, String), OwnedEventId>;

/// Most events visited when computing auth chains or the conflicted subgraph.
const WALK_LIMIT: usize = 20_000;

/// The state after `event_id`, if fedlink recorded it.
pub fn state_after(store: &Store, event_id: &str) -> Option<StateMap> {
    let group = store.state_group_of(event_id).ok()??;
    let raw = store.state_group(&group).ok()??;
    Some(decode(raw))
}

fn decode(raw: Vec<(String, String, String)>) -> StateMap {
    raw.into_iter().filter_map(|(t, k, e)| Some(((t, k), EventId::parse(e).ok()?))).collect()
}

fn encode(map: &StateMap) -> Vec<(String, String, String)> {
    map.iter().map(|((t, k), e)| (t.clone(), k.clone(), e.to_string())).collect()
}

/// Record the state after `pdu`, given the state before it. Messages share their parent's
/// group when it exists.
pub fn record_after(store: &Store, pdu: &Pdu, before: &StateMap, parent_group: Option<&str>) -> Result<StateMap, crate::store::StoreError> {
    let mut after = before.clone();
    match (&pdu.state_key, parent_group) {
        (None, Some(group)) => {
            store.put_state_group_of(pdu.event_id.as_str(), group)?;
            return Ok(after);
        }
        (Some(k), _) => {
            after.insert((pdu.kind.to_string(), k.clone()), pdu.event_id.clone());
        }
        (None, None) => {}
    }
    store.put_state_group(pdu.event_id.as_str(), &encode(&after))?;
    store.put_state_group_of(pdu.event_id.as_str(), pdu.event_id.as_str())?;
    Ok(after)
}

/// The state before `pdu`: its parents' states (resolved when they differ). `fallback` is
/// used for parents fedlink holds no state for. Returns the state and, when all known
/// parents share one group, that group (so a message can reuse it).
pub fn state_before(
    store: &Store,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    fallback: &StateMap,
) -> Result<(StateMap, Option<String>), String> {
    let mut groups: BTreeSet<String> = BTreeSet::new();
    let mut unknown = false;
    for p in &pdu.prev_events {
        match store.state_group_of(p.as_str()).ok().flatten() {
            Some(g) => {
                groups.insert(g);
            }
            None => unknown = true,
        }
    }
    let mut maps: Vec<StateMap> = groups
        .iter()
        .filter_map(|g| store.state_group(g).ok().flatten().map(decode))
        .collect();
    if unknown || maps.is_empty() {
        maps.push(fallback.clone());
    }
    maps.sort();
    maps.dedup();
    if maps.len() == 1 {
        let single = (groups.len() == 1 && !unknown).then(|| groups.into_iter().next()).flatten();
        return Ok((maps.pop().expect("one map"), single));
    }
    resolve(store, rules, &maps, None).map(|m| (m, None))
}

/// Resolve several states of one room with state resolution v2.
/// `pending` is an event being admitted, not yet in the store.
pub fn resolve(store: &Store, rules: &RoomVersionRules, maps: &[StateMap], pending: Option<&Pdu>) -> Result<StateMap, String> {
    let ruma::room_version_rules::StateResolutionVersion::V2(v2) = &rules.state_res else {
        return Err("state resolution v1 is not supported".into());
    };
    let cache: std::cell::RefCell<HashMap<OwnedEventId, Option<Pdu>>> = Default::default();
    let fetch = |id: &EventId| -> Option<Pdu> {
        if let Some(p) = pending.filter(|p| *p.event_id == *id) {
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

fn auth_chain(fetch: &impl Fn(&EventId) -> Option<Pdu>, roots: Vec<OwnedEventId>) -> EventIdSet<OwnedEventId> {
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut todo: Vec<OwnedEventId> = roots.iter().filter_map(|r| fetch(r)).flat_map(|p| p.auth_events).collect();
    while let Some(id) = todo.pop() {
        if seen.len() >= WALK_LIMIT || !seen.insert(id.clone()) {
            continue;
        }
        if let Some(p) = fetch(&id) {
            todo.extend(p.auth_events);
        }
    }
    seen.into_iter().collect()
}

/// Events that are both ancestors and descendants of conflicted events (room v12).
fn conflicted_subgraph(fetch: &impl Fn(&EventId) -> Option<Pdu>, conflicted: HashSet<OwnedEventId>) -> EventIdSet<OwnedEventId> {
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
