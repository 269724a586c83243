//! Building events in rooms fedlink holds: templates for others (`make_join`,
//! `make_leave`) and events fedlink signs itself (the bot's invites). Auth events are
//! selected from the current state by the room version's rules; `prev_events` are the
//! forward extremities (at most 20) and `depth` is one more than the deepest of them.

use ruma::{
    canonical_json::CanonicalJsonObject, events::TimelineEventType, room_version_rules::RoomVersionRules, OwnedEventId,
    UserId,
};
use serde_json::{json, Value};

use crate::{
    core::{
        pdu::{canonical_object, Pdu},
        views::RoomView,
    },
    store::Store,
};

/// Most `prev_events` in an event fedlink builds.
pub const MAX_PREV_EVENTS: usize = 20;

/// Why an event could not be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    /// The content or ids do not form a valid event.
    #[error("cannot build event: {0}")]
    Invalid(String),
}

/// The auth events for an event, selected from `room`'s current state.
pub fn select_auth_events(
    room: &RoomView,
    rules: &RoomVersionRules,
    kind: &TimelineEventType,
    sender: &UserId,
    state_key: Option<&str>,
    content: &Value,
) -> Result<Vec<OwnedEventId>, BuildError> {
    let raw = serde_json::value::to_raw_value(content).map_err(|e| BuildError::Invalid(e.to_string()))?;
    let types = ruma::state_res::auth_types_for_event(kind, sender, state_key, &raw, &rules.authorization)
        .map_err(BuildError::Invalid)?;
    let mut ids: Vec<OwnedEventId> =
        types.iter().filter_map(|(t, k)| room.state_event(&t.to_string(), k).cloned()).collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// An unsigned event on top of `room`'s forward extremities.
#[allow(clippy::too_many_arguments)]
pub fn template(
    store: &Store,
    room_id: &str,
    room: &RoomView,
    rules: &RoomVersionRules,
    sender: &UserId,
    kind: &str,
    state_key: Option<&str>,
    content: Value,
    now_ms: u64,
) -> Result<CanonicalJsonObject, BuildError> {
    let event_type = TimelineEventType::from(kind);
    let auth_events = select_auth_events(room, rules, &event_type, sender, state_key, &content)?;
    let mut prev: Vec<(u64, OwnedEventId)> = room
        .extremities
        .iter()
        .map(|e| (store.get_event(e.as_str()).ok().flatten().map(|p| p.depth).unwrap_or(room.max_depth), e.clone()))
        .collect();
    prev.sort_by(|a, b| b.cmp(a));
    prev.truncate(MAX_PREV_EVENTS);
    let depth = prev.iter().map(|(d, _)| *d).max().unwrap_or(room.max_depth) + 1;
    let mut v = json!({
        "room_id": room_id,
        "sender": sender,
        "type": kind,
        "content": content,
        "prev_events": prev.iter().map(|(_, e)| e).collect::<Vec<_>>(),
        "auth_events": auth_events,
        "depth": depth,
        "origin_server_ts": now_ms,
    });
    if let Some(sk) = state_key {
        v["state_key"] = json!(sk);
    }
    canonical_object(v).map_err(|e| BuildError::Invalid(e.to_string()))
}

/// Hash and sign `obj` as `origin` and parse it.
pub fn sign(
    origin: &str,
    key: &crate::keys::SigningKey,
    mut obj: CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<Pdu, BuildError> {
    ruma::signatures::hash_and_sign_event(origin, key, &mut obj, &rules.redaction)
        .map_err(|e| BuildError::Invalid(e.to_string()))?;
    Pdu::parse(obj, rules).map_err(|e| BuildError::Invalid(e.to_string()))
}

/// The stripped state sent with an invite (MSC4311: full PDUs, create event included).
pub fn invite_room_state(store: &Store, room: &RoomView, sender: &UserId) -> Vec<Value> {
    let keys: [(&str, &str); 8] = [
        ("m.room.create", ""),
        ("m.room.join_rules", ""),
        ("m.room.name", ""),
        ("m.room.canonical_alias", ""),
        ("m.room.avatar", ""),
        ("m.room.encryption", ""),
        ("m.room.topic", ""),
        ("m.room.member", sender.as_str()),
    ];
    keys.iter()
        .filter_map(|(t, k)| room.state_event(t, k))
        .filter_map(|id| store.get_event(id.as_str()).ok().flatten())
        .map(|e| e.pdu)
        .collect()
}
