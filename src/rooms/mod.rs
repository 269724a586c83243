//! Checks on a received PDU, in the spec's order: format and size (in [`Pdu::parse`]),
//! signatures and content hash ([`verify_signatures`]), then the room's authorization rules
//! against its auth events and against the current state ([`check_auth`]).
//!
//! Signature checks are async (they may fetch keys) and hold no lock; auth checks are
//! synchronous and run under the ingest lock against what the store holds.

pub mod build;

use std::collections::BTreeMap;

use ruma::{
    canonical_json::{CanonicalJsonObject, CanonicalJsonValue},
    room_version_rules::RoomVersionRules,
    signatures::{PublicKeyMap, Verified},
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
    /// Keys could not be had.
    #[error("{0}")]
    Keys(String),
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
            Rejection::Keys(_) => "keys",
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
    let servers = ruma::signatures::required_server_signatures_to_verify_event(&object, &rules.signatures)
        .map_err(|e| Rejection::Format(e.to_string()))?;
    let ts = match object.get("origin_server_ts") {
        Some(CanonicalJsonValue::Integer(i)) => u64::try_from(i64::from(*i)).unwrap_or(0),
        _ => 0,
    };
    let at = if rules.enforce_key_validity { ts } else { 0 };
    let mut map = PublicKeyMap::new();
    for server in servers {
        let key_ids: Vec<String> = match object.get("signatures") {
            Some(CanonicalJsonValue::Object(s)) => match s.get(server.as_str()) {
                Some(CanonicalJsonValue::Object(k)) => k.keys().cloned().collect(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        if key_ids.is_empty() {
            return Err(Rejection::Signature(format!("no signature from {server}")));
        }
        let set = keys.keys(server.as_str(), &key_ids, at).await.map_err(|e| Rejection::Keys(e.to_string()))?;
        map.insert(server.to_string(), set);
    }
    verify_with_keys(&map, object, rules)
}

/// The signature and hash check proper, given the keys: pure and synchronous.
pub fn verify_with_keys(
    map: &PublicKeyMap,
    object: CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<CanonicalJsonObject, Rejection> {
    let mut object = object;
    match ruma::signatures::verify_event(map, &object, rules) {
        Ok(Verified::All) => {
            // `unsigned` is not covered by signatures: never keep or relay what a peer put there.
            object.remove("unsigned");
            Ok(object)
        }
        Ok(Verified::Signatures) => {
            tracing::info!("content hash mismatch; keeping the redacted event");
            ruma::canonical_json::redact(object, &rules.redaction, None).map_err(|e| Rejection::Format(e.to_string()))
        }
        Err(e) => Err(Rejection::Signature(e.to_string())),
    }
}

/// Load a stored event as a [`Pdu`].
pub fn load_pdu(store: &Store, event_id: &EventId, rules: &RoomVersionRules) -> Option<Pdu> {
    let entry = store.get_event(event_id.as_str()).ok()??;
    let obj = canonical_object(entry.pdu).ok()?;
    Pdu::parse(obj, rules).ok()
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
    let fetch = |id: &EventId| -> Option<Pdu> { extra.get(id).cloned().or_else(|| load_pdu(store, id, rules)) };
    for a in &pdu.auth_events {
        if !extra.contains_key(a) && !store.has_event(a.as_str()).unwrap_or(false) {
            return Err(Rejection::MissingAuth(a.clone()));
        }
    }
    ruma::state_res::check_state_independent_auth_rules(&rules.authorization, pdu, fetch)
        .map_err(Rejection::Auth)?;
    let auth_state: BTreeMap<(String, String), Pdu> = pdu
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
