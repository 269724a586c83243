//! fedlink as a resident server of the rooms its bot is in: other servers join and leave
//! through it (the bot's invitees' servers call `make_join`/`send_join` on the inviter's
//! server), and fetch events it holds to fill their gaps.
//!
//! - `GET  /_matrix/federation/v1/make_join/{roomId}/{userId}`
//! - `PUT  /_matrix/federation/v2/send_join/{roomId}/{eventId}`
//! - `GET  /_matrix/federation/v1/make_leave/{roomId}/{userId}`
//! - `PUT  /_matrix/federation/v2/send_leave/{roomId}/{eventId}`
//! - `GET  /_matrix/federation/v1/event/{eventId}`
//! - `GET  /_matrix/federation/v1/event_auth/{roomId}/{eventId}`
//! - `POST /_matrix/federation/v1/get_missing_events/{roomId}`
//! - `GET  /_matrix/federation/v1/backfill/{roomId}`
//! - `GET  /_matrix/federation/v1/state_ids/{roomId}`, `GET /_matrix/federation/v1/state/{roomId}`
//!
//! Every endpoint answers only servers that are in the room (a member with `join` or
//! `invite`), and only for rooms the bot is joined to.

use std::collections::{BTreeSet, VecDeque};

use axum::http::StatusCode;
use ruma::{OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use super::error::MatrixError;
use crate::{
    node::{now_ms, Fedlink},
    core::{
        log_entry::{Entry, PduEntry, PduStatus},
        pdu::{canonical_object, rules_for, Pdu},
        views::RoomView,
    },
    rooms::{build, verify_signatures},
};

/// Most events answered by `get_missing_events` and `backfill`.
pub const MAX_EVENTS: usize = 100;

fn room_id(raw: &str) -> Result<OwnedRoomId, MatrixError> {
    RoomId::parse(raw).map_err(|e| MatrixError::invalid_param(format!("bad room id: {e}")))
}

/// Whether `origin` has a member with `join` or `invite` in `room`.
fn server_in_room(room: &RoomView, origin: &str) -> bool {
    room.members.iter().any(|(u, m)| u.server_name().as_str() == origin && (m == "join" || m == "invite"))
}

/// The room, if the bot is in it and `origin` may see it.
fn visible_room<'a>(views: &'a crate::core::views::Views, room_id: &OwnedRoomId, origin: &str) -> Result<&'a RoomView, MatrixError> {
    let room = views
        .rooms
        .get(room_id)
        .filter(|r| r.bot_joined())
        .ok_or_else(|| MatrixError::not_found("fedlink is not in this room"))?;
    if !server_in_room(room, origin) {
        return Err(MatrixError::forbidden("your server is not in this room"));
    }
    Ok(room)
}

/// `make_join` / `make_leave`.
pub async fn make_membership(
    app: &Fedlink,
    origin: &str,
    room: &str,
    user: &str,
    membership: &'static str,
    versions: &[String],
) -> Result<Value, MatrixError> {
    let endpoint = if membership == "join" { "make_join" } else { "make_leave" };
    let result = make_inner(app, origin, room, user, membership, versions).await;
    app.metrics.served_membership.with_label_values(&[endpoint, if result.is_ok() { "ok" } else { "refused" }]).inc();
    result
}

async fn make_inner(app: &Fedlink, origin: &str, room: &str, user: &str, membership: &'static str, versions: &[String]) -> Result<Value, MatrixError> {
    let room_id = room_id(room)?;
    let user = UserId::parse(user).map_err(|e| MatrixError::invalid_param(format!("bad user id: {e}")))?;
    if user.server_name().as_str() != origin {
        return Err(MatrixError::forbidden("you may only make membership events for your own users"));
    }
    let views = app.views.read().await;
    let room = views.rooms.get(&room_id).filter(|r| r.bot_joined()).ok_or_else(|| MatrixError::not_found("fedlink is not in this room"))?;
    if membership == "join" {
        let offered: Vec<&str> = if versions.is_empty() { vec!["1"] } else { versions.iter().map(String::as_str).collect() };
        if !offered.contains(&room.version.as_str()) {
            return Err(MatrixError::new(StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION", "your server does not support this room's version")
                .with("room_version", json!(room.version.as_str())));
        }
    }
    let current = room.membership(&user);
    let allowed = match membership {
        "join" => current == Some("invite") || current == Some("join") || join_rule(app, room).as_deref() == Some("public"),
        _ => current == Some("invite") || current == Some("join") || current == Some("knock"),
    };
    if !allowed {
        return Err(MatrixError::forbidden(format!("{user} may not {membership} this room")));
    }
    let rules = rules_for(&room.version).ok_or_else(|| MatrixError::not_found("unsupported room version"))?;
    let template = build::template(&app.store, room_id.as_str(), room, &rules, &user, "m.room.member", Some(user.as_str()), json!({ "membership": membership }), now_ms())
        .map_err(|e| MatrixError::internal(e.to_string()))?;
    Ok(json!({ "room_version": room.version.as_str(), "event": template }))
}

fn join_rule(app: &Fedlink, room: &RoomView) -> Option<String> {
    let id = room.state_event("m.room.join_rules", "")?;
    let e = app.store.get_event(id.as_str()).ok()??;
    e.pdu.get("content")?.get("join_rule")?.as_str().map(String::from)
}

/// `send_join` / `send_leave` (v2).
pub async fn send_membership(
    app: &Fedlink,
    origin: &str,
    room: &str,
    event_id: &str,
    body: Value,
    membership: &'static str,
) -> Result<Value, MatrixError> {
    let endpoint = if membership == "join" { "send_join" } else { "send_leave" };
    let result = send_inner(app, origin, room, event_id, body, membership).await;
    app.metrics.served_membership.with_label_values(&[endpoint, if result.is_ok() { "ok" } else { "refused" }]).inc();
    if let Err(e) = &result {
        tracing::info!(%origin, %room, error = %e, "{endpoint} refused");
    }
    result
}

async fn send_inner(app: &Fedlink, origin: &str, room: &str, event_id: &str, body: Value, membership: &'static str) -> Result<Value, MatrixError> {
    let room_id = room_id(room)?;
    let version: RoomVersionId = app
        .views
        .read()
        .await
        .rooms
        .get(&room_id)
        .filter(|r| r.bot_joined())
        .map(|r| r.version.clone())
        .ok_or_else(|| MatrixError::not_found("fedlink is not in this room"))?;
    let rules = rules_for(&version).ok_or_else(|| MatrixError::not_found("unsupported room version"))?;
    let obj = canonical_object(body).map_err(|e| MatrixError::bad_json(e.to_string()))?;
    let pdu = Pdu::parse(obj, &rules).map_err(|e| MatrixError::bad_json(e.to_string()))?;
    if pdu.event_id.as_str() != event_id || pdu.room_id != room_id {
        return Err(MatrixError::invalid_param("the event does not match the path"));
    }
    if pdu.membership().as_deref() != Some(membership) || pdu.state_key.as_deref() != Some(pdu.sender.as_str()) {
        return Err(MatrixError::invalid_param(format!("not a {membership} event of its sender")));
    }
    if pdu.sender.server_name().as_str() != origin {
        return Err(MatrixError::forbidden("the sender is not a user of your server"));
    }
    let obj = verify_signatures(&app.keys, pdu.json.clone(), &rules).await.map_err(|e| MatrixError::forbidden(e.to_string()))?;
    let pdu = Pdu::parse(obj, &rules).map_err(|e| MatrixError::bad_json(e.to_string()))?;

    let _lock = app.lock_ingest().await;
    let (before, servers, dests, resolved) = {
        let views = app.views.read().await;
        let room = views.rooms.get(&room_id).ok_or_else(|| MatrixError::not_found("fedlink is not in this room"))?;
        let mut resolved = None;
        let mut before = None;
        if !app.store.has_event(pdu.event_id.as_str())? {
            match crate::rooms::admit(&app.store, room, &pdu, &rules) {
                Ok(a) if a.status == PduStatus::Accepted => (resolved, before) = (a.resolved, Some(a.before)),
                Ok(_) => return Err(MatrixError::forbidden(format!("the {membership} is not allowed by the room's current state"))),
                Err(e) => return Err(MatrixError::forbidden(e.to_string())),
            }
        }
        let mut servers = room.joined_servers();
        let dests: Vec<(String, String)> = servers
            .iter()
            .filter(|s| **s != app.server_name && s.as_str() != origin)
            .map(|s| (s.to_string(), pdu.event_id.to_string()))
            .collect();
        servers.insert(app.server_name.clone());
        (before, servers, dests, resolved)
    };
    if let Some(before) = before.filter(|_| !app.store.has_event(pdu.event_id.as_str()).unwrap_or(true)) {
        app.store.put_state_before_root(pdu.event_id.as_str(), before)?;
        let mut entry = PduEntry::new(&pdu, origin.try_into().map_err(|_| MatrixError::bad_json("bad origin"))?, PduStatus::Accepted);
        entry.resolved_state = resolved;
        let entry = Entry::Pdu(entry);
        app.append_and_send(vec![entry], None, &dests).await?;
        app.store.flush().await?;
        tracing::info!(%origin, %room_id, user = %pdu.sender, "{membership} served", membership = membership);
    }
    if membership == "leave" {
        return Ok(json!({}));
    }
    // The state before the join (a retried send_join gets the state it was answered with
    // the first time).
    let state_ids: Vec<OwnedEventId> = match crate::rooms::state::state_before_ids(&app.store, pdu.event_id.as_str())? {
        Some(s) => s.iter().filter_map(|i| i.as_str().try_into().ok()).collect(),
        None => app.views.read().await.rooms.get(&room_id).map(|r| r.state.ids().cloned().collect()).unwrap_or_default(),
    };
    let state: Vec<Value> = state_ids.iter().filter_map(|id| app.store.get_event(id.as_str()).ok().flatten()).map(|e| e.pdu).collect();
    let mut roots = state_ids.clone();
    roots.push(pdu.event_id.clone());
    let auth_chain = auth_chain(app, &roots, &version);
    Ok(json!({
        "origin": app.server_name,
        "state": state,
        "auth_chain": auth_chain,
        "event": pdu.to_value(),
        "members_omitted": false,
        "servers_in_room": servers,
    }))
}

/// The full auth chain of `roots` (not including the roots unless they are auth events).
fn auth_chain(app: &Fedlink, roots: &[OwnedEventId], version: &RoomVersionId) -> Vec<Value> {
    auth_chain_entries(app, roots, version).into_iter().map(|e| e.pdu).collect()
}

fn auth_chain_entries(app: &Fedlink, roots: &[OwnedEventId], version: &RoomVersionId) -> Vec<PduEntry> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for r in roots {
        if let Some(e) = app.store.get_event(r.as_str()).ok().flatten() {
            todo.extend(auth_ids(&e.pdu));
        }
    }
    // v12: the create event is implied by the room id, never listed.
    if *version == RoomVersionId::V12 {
        if let Some(r) = roots.first().and_then(|r| app.store.get_event(r.as_str()).ok().flatten()) {
            todo.push(format!("${}", r.room_id.as_str().trim_start_matches('!')));
        }
    }
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        if let Some(e) = app.store.get_event(&id).ok().flatten() {
            todo.extend(auth_ids(&e.pdu));
            out.push(e);
        }
    }
    out
}

fn auth_ids(pdu: &Value) -> Vec<String> {
    pdu.get("auth_events").and_then(Value::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default()
}

fn prev_ids(pdu: &Value) -> Vec<String> {
    pdu.get("prev_events").and_then(Value::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// `GET /event/{eventId}`
pub async fn event(app: &Fedlink, origin: &str, event_id: &str) -> Result<Value, MatrixError> {
    let e = app.store.get_event(event_id)?.ok_or_else(|| MatrixError::not_found("unknown event"))?;
    visible_room(&*app.views.read().await, &e.room_id, origin)?;
    Ok(json!({ "origin": app.server_name, "origin_server_ts": now_ms(), "pdus": [e.pdu] }))
}

/// `GET /event_auth/{roomId}/{eventId}`
pub async fn event_auth(app: &Fedlink, origin: &str, room: &str, event_id: &str) -> Result<Value, MatrixError> {
    let room_id = room_id(room)?;
    let version = visible_room(&*app.views.read().await, &room_id, origin)?.version.clone();
    let e = app.store.get_event(event_id)?.filter(|e| e.room_id == room_id).ok_or_else(|| MatrixError::not_found("unknown event"))?;
    Ok(json!({ "auth_chain": auth_chain(app, &[e.event_id], &version) }))
}

/// `POST /get_missing_events/{roomId}`
pub async fn get_missing_events(app: &Fedlink, origin: &str, room: &str, body: Value) -> Result<Value, MatrixError> {
    let room_id = room_id(room)?;
    visible_room(&*app.views.read().await, &room_id, origin)?;
    let ids = |k: &str| -> Vec<String> {
        body.get(k).and_then(Value::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).take(MAX_EVENTS).collect()).unwrap_or_default()
    };
    let earliest: BTreeSet<String> = ids("earliest_events").into_iter().collect();
    let latest = ids("latest_events");
    let limit = body.get("limit").and_then(Value::as_u64).unwrap_or(10).min(MAX_EVENTS as u64) as usize;
    let min_depth = body.get("min_depth").and_then(Value::as_u64).unwrap_or(0);
    let mut todo: VecDeque<String> = latest
        .iter()
        .filter_map(|id| app.store.get_event(id).ok().flatten())
        .filter(|e| e.room_id == room_id)
        .flat_map(|e| prev_ids(&e.pdu))
        .collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut out: Vec<PduEntry> = Vec::new();
    while let Some(id) = todo.pop_front() {
        if out.len() >= limit || earliest.contains(&id) || !seen.insert(id.clone()) {
            continue;
        }
        let Some(e) = app.store.get_event(&id)?.filter(|e| e.room_id == room_id) else { continue };
        if e.depth < min_depth {
            continue;
        }
        todo.extend(prev_ids(&e.pdu));
        out.push(e);
    }
    out.sort_by_key(|e| e.depth);
    Ok(json!({ "events": out.into_iter().map(|e| e.pdu).collect::<Vec<_>>() }))
}

/// `GET /backfill/{roomId}?v=...&limit=...`
pub async fn backfill(app: &Fedlink, origin: &str, room: &str, from: &[String], limit: usize) -> Result<Value, MatrixError> {
    let room_id = room_id(room)?;
    visible_room(&*app.views.read().await, &room_id, origin)?;
    let limit = limit.clamp(1, MAX_EVENTS);
    let mut todo: VecDeque<String> = from.iter().take(MAX_EVENTS).cloned().collect();
    let mut seen = BTreeSet::new();
    let mut out: Vec<PduEntry> = Vec::new();
    while let Some(id) = todo.pop_front() {
        if out.len() >= limit || !seen.insert(id.clone()) {
            continue;
        }
        let Some(e) = app.store.get_event(&id)?.filter(|e| e.room_id == room_id && e.status != PduStatus::Outlier) else { continue };
        todo.extend(prev_ids(&e.pdu));
        out.push(e);
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.depth));
    Ok(json!({ "origin": app.server_name, "origin_server_ts": now_ms(), "pdus": out.into_iter().map(|e| e.pdu).collect::<Vec<_>>() }))
}

/// `GET /state_ids/{roomId}?event_id=` (`full`: `GET /state/{roomId}`): the state before
/// an event fedlink authored or served, or the current state at the sole forward extremity.
pub async fn state(app: &Fedlink, origin: &str, room: &str, event_id: &str, full: bool) -> Result<Value, MatrixError> {
    let room_id = room_id(room)?;
    let (version, current, extremities) = {
        let views = app.views.read().await;
        let r = visible_room(&views, &room_id, origin)?;
        (r.version.clone(), r.state.ids().map(|e| e.to_string()).collect::<Vec<_>>(), r.extremities.clone())
    };
    let event = app.store.get_event(event_id)?.filter(|e| e.room_id == room_id).ok_or_else(|| MatrixError::not_found("unknown event"))?;
    let ids: Vec<String> = match crate::rooms::state::state_before_ids(&app.store, event_id)? {
        Some(s) => s,
        None if extremities.len() == 1 && extremities.iter().next().map(|e| e.as_str()) == Some(event_id) => {
            // State after the extremity = current state, which is the state before it
            // unless it is itself a state event.
            if event.state_key.is_some() {
                return Err(MatrixError::not_found("fedlink does not keep the state before this event"));
            }
            current
        }
        None => return Err(MatrixError::not_found("fedlink does not keep the state at this event")),
    };
    let roots: Vec<OwnedEventId> = ids.iter().filter_map(|i| i.as_str().try_into().ok()).collect();
    let chain = auth_chain_entries(app, &roots, &version);
    if full {
        let pdus: Vec<Value> = ids.iter().filter_map(|i| app.store.get_event(i).ok().flatten()).map(|e| e.pdu).collect();
        Ok(json!({ "pdus": pdus, "auth_chain": chain.into_iter().map(|e| e.pdu).collect::<Vec<_>>() }))
    } else {
        let chain_ids: Vec<String> = chain.iter().map(|e| e.event_id.to_string()).collect();
        Ok(json!({ "pdu_ids": ids, "auth_chain_ids": chain_ids }))
    }
}
