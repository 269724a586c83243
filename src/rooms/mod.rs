//! Checks on a received PDU, in the spec's order: format and size (in [`Pdu::parse`]),
//! signatures and content hash ([`verify_signatures`]), then the room's authorization rules
//! against its auth events and against the current state ([`check_auth`]).
//!
//! Signature checks are async (they may fetch keys) and hold no lock; auth checks are
//! synchronous and run under the ingest lock against what the store holds.

pub mod build;
pub mod state;

use std::{collections::BTreeMap, sync::Arc};

use ruma::{
    canonical_json::{CanonicalJsonObject, CanonicalJsonValue},
    room_version_rules::RoomVersionRules,
    signatures::PublicKeyMap,
    EventId, OwnedEventId,
};

use crate::{
    core::{
        log_entry::PduStatus,
        pdu::{canonical_object, Pdu},
        views::RoomView,
    },
    keys::RemoteKeys,
    store::Store,
};

/// Why a PDU was rejected. `reason()` is the metric label.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Rejection {
    /// Malformed, oversized, or not canonical JSON.
    #[error("{0}")]
    Format(String),
    /// The room is unknown to fedlink or its version unsupported.
    #[error("{0}")]
    Room(String),
    /// Keys could not be had (yet: the server may be reachable later).
    #[error("{0}")]
    Keys(String),
    /// Keys of a server fedlink may not contact, and no notary vouched for them.
    #[error("{0}")]
    KeysForbidden(String),
    /// A signature does not verify.
    #[error("signature check failed: {0}")]
    Signature(String),
    /// The authorization rules reject the event.
    #[error("not authorised: {0}")]
    Auth(String),
    /// An auth event is not known to fedlink.
    #[error("missing auth event {0}")]
    MissingAuth(OwnedEventId),
}

impl Rejection {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Format(_) => "format",
            Rejection::Room(_) => "room",
            Rejection::Keys(_) | Rejection::KeysForbidden(_) => "keys",
            Rejection::Signature(_) => "signature",
            Rejection::Auth(_) => "auth",
            Rejection::MissingAuth(_) => "missing_auth",
        }
    }
}

/// Verify the signatures the room version requires. Returns the event to keep: as is, or
/// redacted when the content hash does not match.
pub async fn verify_signatures(
    keys: &RemoteKeys,
    object: CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<CanonicalJsonObject, Rejection> {
    verify_signatures_via(keys, object, rules, None).await
}

/// [`verify_signatures`], asking `notary` (the server that handed over the event) for keys of
/// servers fedlink may not or cannot contact.
pub async fn verify_signatures_via(
    keys: &RemoteKeys,
    object: CanonicalJsonObject,
    rules: &RoomVersionRules,
    notary: Option<&str>,
) -> Result<CanonicalJsonObject, Rejection> {
    let map = keys_to_verify(keys, &object, rules, notary).await?;
    verify_with_keys(&map, object, rules)
}

/// The keys [`verify_with_keys`] needs for `object`: those of every server that must have
/// signed it, valid when it was sent (fetched through `notary` when not known).
pub async fn keys_to_verify(
    keys: &RemoteKeys,
    object: &CanonicalJsonObject,
    rules: &RoomVersionRules,
    notary: Option<&str>,
) -> Result<PublicKeyMap, Rejection> {
    let servers = ruma::signatures::required_server_signatures_to_verify_event(object, &rules.signatures)
        .map_err(|e| Rejection::Format(e.to_string()))?;
    let ts = match object.get("origin_server_ts") {
        Some(CanonicalJsonValue::Integer(i)) => u64::try_from(i64::from(*i)).unwrap_or(0),
        _ => 0,
    };
    let at = if rules.enforce_key_validity { ts } else { 0 };
    let mut map = PublicKeyMap::new();
    for server in servers {
        let key_ids = crate::keys::remote::signing_key_ids(object, server.as_str());
        if key_ids.is_empty() {
            return Err(Rejection::Signature(format!("no signature from {server}")));
        }
        let set = keys.keys_for_event(server.as_str(), &key_ids, at, notary).await.map_err(|e| match e {
            crate::keys::remote::KeyError::NotAllowed { .. } => Rejection::KeysForbidden(e.to_string()),
            _ => Rejection::Keys(e.to_string()),
        })?;
        map.insert(server.to_string(), set);
    }
    Ok(map)
}

/// The signature and hash check proper, given the keys: pure and synchronous.
pub fn verify_with_keys(
    map: &PublicKeyMap,
    object: CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<CanonicalJsonObject, Rejection> {
    verify_keeping(map, object, rules).map(|(object, _)| object)
}

/// [`verify_with_keys`], also telling whether the content was kept (`true`) or the event
/// redacted for a content hash mismatch (`false`).
pub fn verify_keeping(
    map: &PublicKeyMap,
    object: CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<(CanonicalJsonObject, bool), Rejection> {
    let signed = crate::core::pdu::signed_bytes(&object, rules).map_err(|e| Rejection::Format(e.to_string()))?;
    verify_signed(map, object, signed.as_bytes(), rules)
}

/// [`verify_keeping`] given the bytes the signatures cover, as [`Pdu::parse_signed`]
/// returned them with the event id. They must be `object`'s ([`crate::core::pdu::signed_bytes`]):
/// the signatures are checked over them, and `object` is what is returned as verified
/// (debug builds assert it).
///
/// The spec's check: at least one signature by a known ed25519 key of each server that
/// must sign (the sender's; the authorising server of a restricted join), none of those
/// present failing; signatures by keys not in `map` or of other algorithms are ignored.
/// Then the content hash: a mismatch keeps the event redacted. The public keys are
/// decompressed once per key ([`crate::keys::verifying_key`]), not per event.
pub fn verify_signed(
    map: &PublicKeyMap,
    object: CanonicalJsonObject,
    signed: &[u8],
    rules: &RoomVersionRules,
) -> Result<(CanonicalJsonObject, bool), Rejection> {
    use ruma::{serde::base64::Standard, serde::Base64, AnyKeyName, SigningKeyAlgorithm, SigningKeyId};
    debug_assert_eq!(
        crate::core::pdu::signed_bytes(&object, rules).ok().as_deref().map(str::as_bytes),
        Some(signed),
        "the signed bytes must be those of `object`"
    );
    let bad = |s: String| Rejection::Signature(s);
    let hash = match object.get("hashes") {
        Some(CanonicalJsonValue::Object(h)) => match h.get("sha256") {
            Some(CanonicalJsonValue::String(s)) => s,
            _ => return Err(bad("`hashes.sha256` must be a string".into())),
        },
        _ => return Err(bad("`hashes` must be an object".into())),
    };
    let Some(CanonicalJsonValue::Object(signatures)) = object.get("signatures") else {
        return Err(bad("`signatures` must be an object".into()));
    };
    let servers = ruma::signatures::required_server_signatures_to_verify_event(&object, &rules.signatures)
        .map_err(|e| bad(e.to_string()))?;
    for server in &servers {
        let keys = map.get(server.as_str()).ok_or_else(|| bad(format!("no public keys of {server}")))?;
        let set = match signatures.get(server.as_str()) {
            Some(CanonicalJsonValue::Object(set)) => set,
            Some(_) => return Err(bad(format!("`signatures.{server}` must be an object"))),
            None => return Err(bad(format!("no signatures by {server}"))),
        };
        let mut checked = false;
        for (key_id, signature) in set {
            let Some(public) = keys.get(key_id) else { continue };
            let Ok(parsed) = <&SigningKeyId<AnyKeyName>>::try_from(key_id.as_str()) else { continue };
            if parsed.algorithm() != SigningKeyAlgorithm::Ed25519 {
                continue;
            }
            let CanonicalJsonValue::String(signature) = signature else {
                return Err(bad(format!("`signatures.{server}.{key_id}` must be a string")));
            };
            let signature = Base64::<Standard>::parse(signature).map_err(|e| bad(format!("`signatures.{server}.{key_id}`: {e}")))?;
            crate::keys::verify_ed25519(public.as_bytes(), signature.as_bytes(), signed)
                .map_err(|e| bad(format!("signature {key_id} of {server}: {e}")))?;
            checked = true;
        }
        if !checked {
            return Err(bad(format!("no signature by a known ed25519 key of {server}")));
        }
    }
    let content = ruma::canonical_json::RedactingSerializer::new()
        .custom_redacted_root_fields(&["hashes", "signatures", "unsigned"])
        .serialize(&object)
        .map_err(|e| bad(e.to_string()))?;
    if content.len() > crate::core::pdu::MAX_PDU_BYTES - 1 {
        return Err(bad("the event is larger than a PDU may be".into()));
    }
    let computed: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(content.as_bytes()).into();
    let kept = Base64::<Standard>::parse(hash).is_ok_and(|h| h.as_bytes() == computed);
    let mut object = object;
    if kept {
        // `unsigned` is not covered by signatures: never keep or relay what a peer put there.
        object.remove("unsigned");
        Ok((object, true))
    } else {
        tracing::info!("content hash mismatch; keeping the redacted event");
        ruma::canonical_json::redact(object, &rules.redaction, None).map(|o| (o, false)).map_err(|e| Rejection::Format(e.to_string()))
    }
}

/// Load a stored event as a [`Pdu`], through the store's bounded cache of parsed events:
/// checking an event does not re-read and re-parse its auth events each time.
pub fn load_pdu(store: &Store, event_id: &EventId, rules: &RoomVersionRules) -> Option<Arc<Pdu>> {
    if let Some(p) = store.cached_pdu(event_id.as_str()) {
        return Some(p);
    }
    let entry = store.get_event(event_id.as_str()).ok()??;
    let obj = canonical_object(entry.pdu).ok()?;
    let pdu = Arc::new(Pdu::parse(obj, rules).ok()?);
    store.cache_pdu(pdu.clone());
    Some(pdu)
}

/// Run the state-dependent authorization rules against a given state (the state before the
/// event, as a trie root: only the entries the rules ask for are read): failure rejects the
/// event.
pub fn check_against_state(store: &Store, pdu: &Pdu, rules: &RoomVersionRules, state: state::Root) -> Result<(), Rejection> {
    // A state entry that cannot be read must not look like an absent one (a missing ban
    // would let the event in): any storage error fails the check as such.
    let failed: std::cell::RefCell<Option<crate::store::StoreError>> = Default::default();
    let checked = ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t, sk| {
        match state::get(store, state, &t.to_string(), sk) {
            Ok(id) => id.and_then(|id| load_pdu(store, &id, rules)),
            Err(e) => {
                failed.borrow_mut().get_or_insert(e);
                None
            }
        }
    });
    if let Some(e) = failed.into_inner() {
        return Err(Rejection::Format(format!("storage: reading the state before the event: {e}")));
    }
    checked.map_err(|e| Rejection::Auth(format!("{e} (against the state before the event)")))
}

/// The current state of a room view as a [`state::StateMap`].
pub fn view_state(room: &RoomView) -> state::StateMap {
    room.state.iter().map(|((t, k), e)| ((t.to_owned(), k.to_owned()), e.clone())).collect()
}

/// Run the authorization rules: against the event's auth events (failure rejects) and
/// against the room's current state (failure soft-fails). `extra` holds events not yet in
/// the store (the rest of a join's state, say).
pub fn check_auth(
    store: &Store,
    room: Option<&RoomView>,
    pdu: &Pdu,
    rules: &RoomVersionRules,
    extra: &BTreeMap<OwnedEventId, Pdu>,
) -> Result<PduStatus, Rejection> {
    let fetch = |id: &EventId| -> Option<Arc<Pdu>> { extra.get(id).map(|p| Arc::new(p.clone())).or_else(|| load_pdu(store, id, rules)) };
    for a in &pdu.auth_events {
        if !extra.contains_key(a) && !store.has_event(a.as_str()).unwrap_or(false) {
            return Err(Rejection::MissingAuth(a.clone()));
        }
    }
    ruma::state_res::check_state_independent_auth_rules(&rules.authorization, pdu, fetch)
        .map_err(Rejection::Auth)?;
    let auth_state: BTreeMap<(String, String), Arc<Pdu>> = pdu
        .auth_events
        .iter()
        .filter_map(|id| fetch(id))
        .chain(
            // In v12 the create event is implied by the room id.
            rules
                .authorization
                .room_create_event_id_as_room_id
                .then(|| EventId::parse(format!("${}", &pdu.room_id.as_str()[1..])).ok())
                .flatten()
                .and_then(|id| fetch(&id)),
        )
        .filter_map(|p| p.state_key.clone().map(|sk| ((p.kind.to_string(), sk), p)))
        .collect();
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t, sk| {
        auth_state.get(&(t.to_string(), sk.to_owned())).cloned()
    })
    .map_err(Rejection::Auth)?;
    let Some(room) = room else { return Ok(PduStatus::Accepted) };
    let current = ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t, sk| {
        room.state_event(&t.to_string(), sk).and_then(|id| fetch(id))
    });
    match current {
        Ok(()) => Ok(PduStatus::Accepted),
        Err(reason) => {
            tracing::info!(event_id = %pdu.event_id, %reason, "soft-failing event against current state");
            Ok(PduStatus::SoftFailed)
        }
    }
}

/// The outcome of admitting an event into a room's timeline.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Accepted or soft-failed.
    pub status: PduStatus,
    /// The room's new current state when it is not simply the old one plus this event.
    pub resolved: Option<crate::core::log_entry::ResolvedState>,
    /// The state before the event (a trie root), for serving `state_ids` at it.
    pub before: state::Root,
    /// Extremities the event supersedes (it closed a gap with state fetched at the gap).
    pub superseded: Vec<OwnedEventId>,
}

/// Every check for an event joining the timeline: auth events (reject), the state before
/// the event from its parents, resolved when they differ (reject), the current state (soft
/// fail). Records the state after the event and, when forks meet, resolves the room's new
/// current state.
///
/// In the common case (the event's parents are the room's one forward extremity) no state
/// map is read or compared: the state before is the extremity's root, which is the room's
/// current state, and the checks read only the entries the rules name. Forks and gaps take
/// the full path, whose cost grows with the room's state.
pub fn admit(store: &Store, room: &RoomView, pdu: &Pdu, rules: &RoomVersionRules) -> Result<Admitted, Rejection> {
    let resolution = |e: String| Rejection::Auth(format!("state resolution failed: {e}"));
    let status = check_auth(store, Some(room), pdu, rules, &BTreeMap::new())?;
    let current = std::cell::OnceCell::new();
    let current = || current.get_or_init(|| view_state(room)).clone();
    let (before, shared) =
        state::state_before(store, rules, pdu, &current).map_err(resolution)?;
    check_against_state(store, pdu, rules, before)?;
    let storage = |e: crate::store::StoreError| Rejection::Format(format!("storage: {e}"));
    let after = state::record_after(store, pdu, before).map_err(storage)?;
    if status != PduStatus::Accepted {
        return Ok(Admitted { status, resolved: None, before, superseded: Vec::new() });
    }
    let mut extremities: Vec<OwnedEventId> = room.extremities.iter().filter(|e| !pdu.prev_events.contains(e)).cloned().collect();
    // Linear history: the event follows the room's only extremity, whose state is the
    // room's current state (folding keeps the two equal), and it is the only extremity now.
    let linear = shared
        && extremities.is_empty()
        && room.extremities.len() == 1
        && room.extremities.iter().next().is_some_and(|e| state::root_of(store, e.as_str()).ok().flatten() == Some(before));
    if linear {
        return Ok(Admitted { status, resolved: None, before, superseded: Vec::new() });
    }
    // A parent fedlink never had in its timeline, whose state it fetched at the gap
    // (`/state_ids`): the event closes the gap. Its state is resolved with the room's, that
    // becomes the state after it, and the room's other extremities are superseded, so the
    // room is linear again from here (instead of resolving on every later event).
    // (Checked only off the linear path: a parent outside the timeline is never the room's
    // extremity, and this reads stored events.)
    let closes_gap = pdu.prev_events.iter().any(|p| {
        !store.has_timeline_event(p.as_str()).unwrap_or(false)
            && state::root_of(store, p.as_str()).ok().flatten().is_some()
    });
    if closes_gap && !extremities.is_empty() {
        let mut maps: Vec<state::StateMap> = vec![state::load(store, after).map_err(storage)?];
        for e in &extremities {
            maps.push(match state::root_of(store, e.as_str()).map_err(storage)? {
                Some(r) => state::load(store, r).map_err(storage)?,
                None => current(),
            });
        }
        let resolved = state::resolve_distinct(store, rules, maps, Some(pdu)).map_err(resolution)?;
        store.put_state_root_of(pdu.event_id.as_str(), state::from_map(store, &resolved).map_err(storage)?);
        // Only extremities from before the gap are superseded (older than the parents the
        // origin claimed); other servers' newer forks stay extremities.
        let gap_depth = pdu.prev_events.iter().filter_map(|p| store.get_event(p.as_str()).ok().flatten()).map(|e| e.depth).min().unwrap_or(0);
        extremities.retain(|e| store.get_event(e.as_str()).ok().flatten().is_some_and(|x| x.depth < gap_depth));
        extremities.sort();
        tracing::info!(event_id = %pdu.event_id, room_id = %pdu.room_id, superseded = extremities.len(), "a gap closed with state fetched at the gap; resolved with the room's state");
        return Ok(Admitted { status, resolved: Some(resolved_state(store, &resolved)), before, superseded: extremities });
    }
    let current = current();
    let mut incremental = current.clone();
    if let Some(k) = &pdu.state_key {
        incremental.insert((pdu.kind.to_string(), k.clone()), pdu.event_id.clone());
    }
    if extremities.is_empty() && state::load(store, before).map_err(storage)? == current {
        return Ok(Admitted { status, resolved: None, before, superseded: Vec::new() });
    }
    extremities.sort();
    let mut roots: Vec<Option<state::Root>> =
        extremities.iter().map(|e| state::root_of(store, e.as_str())).collect::<Result<_, _>>().map_err(storage)?;
    roots.push(Some(after));
    roots.sort();
    roots.dedup();
    let maps: Vec<state::StateMap> = roots
        .iter()
        .map(|r| r.map(|r| state::load(store, r)).unwrap_or_else(|| Ok(current.clone())))
        .collect::<Result<_, _>>()
        .map_err(storage)?;
    let resolved = state::resolve_distinct(store, rules, maps, Some(pdu)).map_err(resolution)?;
    if resolved == incremental {
        return Ok(Admitted { status, resolved: None, before, superseded: Vec::new() });
    }
    tracing::info!(event_id = %pdu.event_id, room_id = %pdu.room_id, extremities = extremities.len() + 1, "forks resolved with state resolution v2");
    Ok(Admitted { status, resolved: Some(resolved_state(store, &resolved)), before, superseded: Vec::new() })
}

/// A state map as log records carry it.
pub fn resolved_state(store: &Store, map: &state::StateMap) -> crate::core::log_entry::ResolvedState {
    let mut power_levels = None;
    let state = map
        .iter()
        .map(|((t, k), id)| {
            let entry = store.get_event(id.as_str()).ok().flatten();
            if t == "m.room.power_levels" && k.is_empty() {
                power_levels = entry.as_ref().and_then(|e| e.pdu.get("content").cloned());
            }
            crate::core::log_entry::StateRef {
                event_type: t.clone(),
                state_key: k.clone(),
                event_id: id.clone(),
                membership: entry.and_then(|e| e.membership),
            }
        })
        .collect();
    crate::core::log_entry::ResolvedState { state, power_levels }
}

/// Whether `m.room.server_acl` in `room`'s current state lets `server` take part.
pub fn server_allowed(store: &Store, room: &RoomView, server: &str) -> bool {
    let Some(id) = room.state_event("m.room.server_acl", "") else { return true };
    let Some(rules) = room.version.rules() else { return true };
    let Some(content) = load_pdu(store, id, &rules).and_then(|p| serde_json::from_str::<serde_json::Value>(p.content.get()).ok()) else {
        return true;
    };
    acl_allows(&content, server)
}

/// The server ACL rules: the host (port stripped) must not match `deny`, must match
/// `allow`, and may be an IP literal only with `allow_ip_literals` (default true).
pub fn acl_allows(content: &serde_json::Value, server: &str) -> bool {
    let (host, _) = crate::federation::discovery::split_host_port(server);
    let host = host.to_ascii_lowercase();
    let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok();
    if ip && content.get("allow_ip_literals").and_then(|v| v.as_bool()) == Some(false) {
        return false;
    }
    let globs = |k: &str| -> Vec<String> {
        content.get(k).and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|g| g.as_str().map(str::to_ascii_lowercase)).collect()).unwrap_or_default()
    };
    if globs("deny").iter().any(|g| glob_match(g, &host)) {
        return false;
    }
    globs("allow").iter().any(|g| glob_match(g, &host))
}

/// `*` matches any run of characters, `?` one character.
pub fn glob_match(glob: &str, s: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), s.chars().collect());
    let (mut gi, mut ti, mut star, mut mark) = (0usize, 0usize, None::<usize>, 0usize);
    while ti < t.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some(gi);
            mark = ti;
            gi += 1;
        } else if let Some(s) = star {
            gi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while gi < g.len() && g[gi] == '*' {
        gi += 1;
    }
    gi == g.len()
}

#[cfg(test)]
mod acl_tests {
    use super::acl_allows;
    use serde_json::json;

    #[test]
    fn server_acl_globs_ports_and_ip_literals() {
        let acl = json!({ "allow": ["*.example.org", "kiwi"], "deny": ["evil.example.org"], "allow_ip_literals": false });
        assert!(acl_allows(&acl, "a.example.org"));
        assert!(acl_allows(&acl, "kiwi:8448"), "the port is not part of the match");
        assert!(!acl_allows(&acl, "evil.example.org"));
        assert!(!acl_allows(&acl, "litchi"));
        assert!(!acl_allows(&acl, "1.2.3.4"));
        assert!(acl_allows(&json!({ "allow": ["*"] }), "1.2.3.4"));
        assert!(!acl_allows(&json!({}), "kiwi"), "no allow entry allows nobody");
        assert!(acl_allows(&json!({ "allow": ["k?wi"] }), "kiwi"));
    }
}
