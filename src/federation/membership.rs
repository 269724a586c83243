//! The bot's own membership: accepting invites (`PUT /_matrix/federation/v2/invite`) and
//! joining through the inviter's server (`make_join` then `send_join` v2).
//! <https://spec.matrix.org/v1.16/server-server-api/#joining-rooms>
//!
//! An accepted invite is logged before it is answered; the join worker then joins every
//! room whose invite is pending, with backoff on transient failures. Because pending invites
//! live in the views, a restart resumes them. The state and auth chain a resident server
//! returns are signature-checked and auth-checked before anything is logged, then stored in
//! one batch: outlier events, the `bot_joined` record, and the join event.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use reqwest::Method;
use ruma::{
    canonical_json::CanonicalJsonValue, events::TimelineEventType, room_version_rules::RoomVersionRules,
    OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomVersionId,
};
use serde_json::{json, Value};

use super::{client::enc, error::MatrixError};
use crate::{
    node::{now_ms, Fedlink, RetryStatus},
    core::{
        log_entry::{BotInvited, BotJoinFailed, BotJoinSigned, BotJoined, Entry, PduEntry, PduStatus, StateRef},
        pdu::{canonical_object, is_supported, rules_for, Pdu, SUPPORTED_ROOM_VERSIONS},
        views::BotMembership,
    },
    rooms::{check_auth, verify_signatures},
};

/// Most direct chats with the bot one account may open through `bot.direct_chats`.
pub const MAX_CHATS_PER_ACCOUNT: usize = 5;

/// Handle `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}` from `origin`.
pub async fn handle_invite(
    app: &Fedlink,
    origin: &str,
    room_id: &str,
    event_id: &str,
    body: Value,
) -> Result<Value, MatrixError> {
    let result = invite_inner(app, origin, room_id, event_id, body).await;
    let label = if result.is_ok() { "accepted" } else { "rejected" };
    app.metrics.invites.with_label_values(&[label]).inc();
    if let Err(e) = &result {
        tracing::info!(%origin, %room_id, error = %e, "refused an invite for the bot");
    }
    result
}

async fn invite_inner(app: &Fedlink, origin: &str, room_id: &str, event_id: &str, body: Value) -> Result<Value, MatrixError> {
    let version_str = body.get("room_version").and_then(Value::as_str).ok_or_else(|| MatrixError::bad_json("missing room_version"))?;
    let version = RoomVersionId::try_from(version_str).map_err(|_| MatrixError::bad_json("bad room_version"))?;
    if !is_supported(&version) {
        return Err(MatrixError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_INCOMPATIBLE_ROOM_VERSION",
            format!("fedlink supports room versions 10, 11 and 12, not {version}"),
        )
        .with("room_version", json!(version.as_str())));
    }
    let rules = rules_for(&version).expect("supported version has rules");
    let event = body.get("event").cloned().ok_or_else(|| MatrixError::bad_json("missing event"))?;
    let obj = canonical_object(event).map_err(|e| MatrixError::bad_json(e.to_string()))?;
    let pdu = Pdu::parse(obj, &rules).map_err(|e| MatrixError::bad_json(e.to_string()))?;
    if pdu.event_id.as_str() != event_id {
        return Err(MatrixError::invalid_param("event id in the path does not match the event"));
    }
    if pdu.room_id.as_str() != room_id {
        return Err(MatrixError::invalid_param("room id in the path does not match the event"));
    }
    if pdu.kind != TimelineEventType::RoomMember || pdu.membership().as_deref() != Some("invite") {
        return Err(MatrixError::invalid_param("not an invite event"));
    }
    if pdu.state_key.as_deref() != Some(app.bot.as_str()) {
        return Err(MatrixError::forbidden(format!("fedlink only accepts invites for {}", app.bot)));
    }
    if pdu.sender.server_name().as_str() != origin {
        return Err(MatrixError::forbidden("the inviter is not a user of the requesting server"));
    }
    // Anyone may open a direct chat with the bot (`bot.direct_chats`): nobody is synced
    // into it, so it gives the inviter a conversation and nothing else.
    let direct = pdu.json.get("content").and_then(|c| match c {
        ruma::canonical_json::CanonicalJsonValue::Object(o) => o.get("is_direct"),
        _ => None,
    }) == Some(&ruma::canonical_json::CanonicalJsonValue::Bool(true));
    let allowed = app.cfg.bot.may_invite(&pdu.sender);
    // A room fedlink knows as a normal room (the bot was in it, or registrations showed
    // others in it) never becomes a chat: a direct invite there is an ordinary invite. (A
    // fresh direct chat a registration pushed first shows only the inviter and the bot.)
    let known_room = app.views.read().await.rooms.get(&pdu.room_id).is_some_and(|r| {
        r.bot_chat.is_none() && (r.bot != BotMembership::Absent || r.others_than(&pdu.sender, &app.bot))
    });
    let direct = match (direct && !known_room, allowed) {
        (false, _) => None,
        (true, true) => Some(crate::core::log_entry::DirectInvite::Allowed),
        (true, false) if app.cfg.bot.direct_chats => Some(crate::core::log_entry::DirectInvite::ChatOnly),
        (true, false) => None,
    };
    if !allowed && direct.is_none() {
        app.metrics.bot_invites_refused.with_label_values(&["invites_from"]).inc();
        return Err(MatrixError::forbidden(format!("{} may not invite the bot (bot.invites_from)", pdu.sender)));
    }
    let mut obj = verify_signatures(&app.keys, pdu.json.clone(), &rules)
        .await
        .map_err(|e| MatrixError::forbidden(e.to_string()))?;
    let mut as_sent = pdu.json.clone();
    as_sent.remove("unsigned");
    if obj != as_sent {
        return Err(MatrixError::forbidden("the invite's content does not match its hash"));
    }
    ruma::signatures::sign_event(app.server_name.as_str(), &*app.key, &mut obj, &rules.redaction)
        .map_err(|e| MatrixError::bad_json(e.to_string()))?;
    let signed = serde_json::to_value(&obj).expect("canonical JSON serializes");

    let _lock = app.lock_ingest().await;
    // An invite while joined or joining changes nothing (a repeated invite neither grows the
    // log nor resets the join's backoff). Counted under the ingest lock, so concurrent
    // invites cannot pass `bot.max_rooms` together.
    let in_room = |r: &crate::core::views::RoomView| matches!(r.bot, BotMembership::Joined | BotMembership::Invited { .. });
    let (already, rooms) = {
        let views = app.views.read().await;
        (views.rooms.get(&pdu.room_id).is_some_and(in_room), views.index.joined.len() + views.index.joining.len())
    };
    // Chats accepted only as chats are bounded per account.
    if !already && direct == Some(crate::core::log_entry::DirectInvite::ChatOnly) {
        let views = app.views.read().await;
        // Chats the bot is in, joining or gave up (a crowded one), other than this room.
        let chats = views.index.chats.get(&pdu.sender).map_or(0, |c| {
            c.iter()
                .filter(|r| **r != pdu.room_id && views.rooms.get(*r).is_some_and(|v| matches!(v.bot, BotMembership::Joined | BotMembership::Invited { .. } | BotMembership::JoinFailed { .. })))
                .count()
        });
        if chats >= MAX_CHATS_PER_ACCOUNT {
            app.metrics.bot_invites_refused.with_label_values(&["max_chats"]).inc();
            return Err(MatrixError::forbidden(format!("{} already has {chats} direct chats with the bot, the most it keeps", pdu.sender)));
        }
    }
    if !already && rooms >= app.cfg.bot.max_rooms {
        app.metrics.bot_invites_refused.with_label_values(&["max_rooms"]).inc();
        return Err(MatrixError::forbidden(format!("the bot is in {rooms} rooms, its limit (bot.max_rooms)")));
    }
    if !already {
        let entry = Entry::BotInvited(BotInvited {
            room_id: pdu.room_id.clone(),
            room_version: version,
            event_id: pdu.event_id.clone(),
            inviter: pdu.sender.clone(),
            event: signed.clone(),
            direct,
        });
        app.append(vec![entry], None).await?;
        app.store.flush().await?;
        app.joins.schedule(&pdu.room_id, FIRST_JOIN_DELAY_MS);
    }
    tracing::info!(%origin, room_id = %pdu.room_id, inviter = %pdu.sender, direct = ?direct, "accepted an invite for the bot");
    Ok(json!({ "event": signed }))
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Retrying later may work (network, 5xx, 429).
    #[error("{0}")]
    Transient(String),
    /// The resident refused the join template (it may not have stored our invite yet when
    /// we asked): retried a few times, then given up.
    #[error("{0}")]
    NotYet(String),
    /// Retrying will not help until something changes (a new invite).
    #[error("{0}")]
    Permanent(String),
}

/// How many `NotYet` failures are retried before giving up.
pub const MAX_NOT_YET_ATTEMPTS: u32 = 5;

/// Delay before the first join attempt after an invite, so the inviting server has
/// stored its invite before we ask it for a join template.
pub const FIRST_JOIN_DELAY_MS: u64 = 500;

impl From<super::client::ClientError> for JoinError {
    fn from(e: super::client::ClientError) -> Self {
        if e.is_transient() {
            JoinError::Transient(e.to_string())
        } else {
            JoinError::Permanent(e.to_string())
        }
    }
}

/// The join service's own state: one lane per resident server (a hanging resident delays
/// only the joins through it), and each room's retry state.
pub struct Joins {
    /// Per-resident lanes.
    pub lanes: Arc<crate::lanes::Lanes>,
    /// Retry state per room.
    retries: std::sync::Mutex<std::collections::HashMap<OwnedRoomId, RetryStatus>>,
    /// Wakes the join worker.
    pub wake: tokio::sync::Notify,
    /// Rooms whose held events are being applied or dropped now.
    draining: std::sync::Mutex<std::collections::HashSet<OwnedRoomId>>,
    /// The resident each failing join goes through (to retry it when that server is up).
    residents: std::sync::Mutex<std::collections::HashMap<OwnedRoomId, String>>,
}

impl Joins {
    /// The join service for `metrics`, stopping with `stop`.
    pub fn new(metrics: Arc<crate::metrics::Metrics>, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            lanes: crate::lanes::Lanes::new("joins", crate::core::backoff::Backoff::DEFAULT, metrics, stop),
            retries: Default::default(),
            wake: tokio::sync::Notify::new(),
            draining: Default::default(),
            residents: Default::default(),
        }
    }

    /// A room's retry state, for the admin API.
    pub fn status(&self, room_id: &OwnedRoomId) -> Option<RetryStatus> {
        self.retries.lock().expect("joins lock").get(room_id).cloned()
    }

    /// Start (or restart) joining `room_id` after `delay_ms`, forgetting earlier failures.
    pub fn schedule(&self, room_id: &OwnedRoomId, delay_ms: u64) {
        self.retries.lock().expect("joins lock").insert(room_id.clone(), RetryStatus { next_attempt_ms: now_ms() + delay_ms, ..Default::default() });
        self.wake.notify_one();
    }

    /// Apply (or drop) the events held for `room_id` in a task of its own, at most one per
    /// room at a time: never in a resident's lane or the worker's loop, so a slow origin of
    /// held events delays nobody else.
    pub fn settle(app: &Arc<Fedlink>, room_id: &OwnedRoomId) {
        if !app.joins.draining.lock().expect("joins lock").insert(room_id.clone()) {
            return;
        }
        let (a, room) = (app.clone(), room_id.clone());
        tokio::spawn(async move {
            if let Err(e) = super::send::drain_parked(&a, &room).await {
                tracing::warn!(room_id = %room, error = %e, "cannot settle the events held for the join yet");
            }
            a.joins.draining.lock().expect("joins lock").remove(&room);
        });
    }

    /// `server` contacted fedlink: joins through it that are backing off are retried now
    /// (the cost is the number of failing joins, not of rooms).
    pub fn contact(&self, server: &str) {
        let rooms: Vec<OwnedRoomId> = self.residents.lock().expect("joins lock").iter().filter(|(_, r)| *r == server).map(|(id, _)| id.clone()).collect();
        if rooms.is_empty() {
            return;
        }
        let now = now_ms();
        let mut woke = false;
        let mut retries = self.retries.lock().expect("joins lock");
        for id in rooms {
            if let Some(s) = retries.get_mut(&id).filter(|s| s.next_attempt_ms > now && s.failures > 0) {
                s.next_attempt_ms = now;
                woke = true;
            }
        }
        drop(retries);
        if woke {
            tracing::info!(%server, "the resident contacted us; retrying the joins through it now");
            self.wake.notify_one();
        }
    }

    fn due(&self, room_id: &OwnedRoomId) -> u64 {
        self.retries.lock().expect("joins lock").get(room_id).map(|s| s.next_attempt_ms).unwrap_or(0)
    }
}

/// Joins every room with a pending invite, each resident in its own lane; retries with
/// backoff; gives up for good on permanent failures; resumes after restarts. Also applies
/// (or drops) events held for rooms whose join has settled.
pub async fn join_worker(app: Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        settle_parked(&app).await;
        let pending = joining(&app).await;
        let now = now_ms();
        let mut next_due: Option<u64> = None;
        for (room_id, inviter) in pending {
            let due = app.joins.due(&room_id);
            if due > now {
                crate::core::backoff::earliest(&mut next_due, due);
                continue;
            }
            app.joins.lanes.kick_for(inviter.server_name().as_str(), &app, |a, resident| async move { join_through(&a, &resident).await });
        }
        let wait = next_due.map(|d| Duration::from_millis(d.saturating_sub(now_ms()))).unwrap_or(Duration::from_secs(60));
        tokio::select! {
            _ = app.joins.wake.notified() => {}
            _ = tokio::time::sleep(wait.min(Duration::from_secs(60))) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Rooms whose join is under way, with whose server to join through.
async fn joining(app: &Fedlink) -> Vec<(OwnedRoomId, OwnedUserId)> {
    app.views.read().await.index.joining.iter().map(|(id, inviter)| (id.clone(), inviter.clone())).collect()
}

/// Apply the events held for rooms the bot has joined; drop those of rooms it gave up.
async fn settle_parked(app: &Arc<Fedlink>) {
    let rooms = app.store.parked_rooms().unwrap_or_default();
    let views = app.views.read().await;
    for room in rooms {
        let Ok(room_id) = OwnedRoomId::try_from(room.as_str()) else { continue };
        if !views.rooms.get(&room_id).is_some_and(|r| matches!(r.bot, BotMembership::Invited { .. })) {
            Joins::settle(app, &room_id);
        }
    }
}

/// One step of a resident's lane: every due join through `resident`.
async fn join_through(app: &Arc<Fedlink>, resident: &str) -> crate::lanes::Step {
    let now = now_ms();
    let due: Vec<(OwnedRoomId, OwnedUserId)> =
        joining(app).await.into_iter().filter(|(id, inviter)| inviter.server_name().as_str() == resident && app.joins.due(id) <= now).collect();
    let mut joined = 0;
    for (room_id, inviter) in due {
        let result = join_room(app, &room_id, &inviter).await;
        match result {
            Ok(()) => {
                app.joins.retries.lock().expect("joins lock").remove(&room_id);
                app.joins.residents.lock().expect("joins lock").remove(&room_id);
                app.metrics.joins.with_label_values(&["ok"]).inc();
                joined += 1;
                Joins::settle(app, &room_id);
            }
            Err(e) => {
                app.joins.residents.lock().expect("joins lock").insert(room_id.clone(), resident.to_owned());
                let give_up = {
                    let mut joins = app.joins.retries.lock().expect("joins lock");
                    let status = joins.entry(room_id.clone()).or_default();
                    status.fail_transient(e.to_string());
                    if matches!(e, JoinError::NotYet(_)) {
                        status.not_yet += 1;
                    }
                    // Transient failures back off (up to 10 min) without end; the rest give up.
                    let (label, give_up) = match &e {
                        JoinError::Transient(_) => ("transient_error", false),
                        JoinError::NotYet(_) if status.not_yet < MAX_NOT_YET_ATTEMPTS => ("not_yet", false),
                        _ => ("permanent_error", true),
                    };
                    app.metrics.joins.with_label_values(&[label]).inc();
                    tracing::warn!(%room_id, %resident, failures = status.failures, error = %e, give_up, "join failed");
                    give_up
                };
                if give_up {
                    give_up_join(app, &room_id, e.to_string()).await;
                }
            }
        }
    }
    crate::lanes::Step::Done { delivered: joined, more: false }
}

/// Log that fedlink gave up joining `room_id` (until a new invite or an admin request), and
/// drop the events held for it.
async fn give_up_join(app: &Arc<Fedlink>, room_id: &OwnedRoomId, reason: String) {
    let logged = {
        let _lock = app.lock_ingest().await;
        let entry = Entry::BotJoinFailed(BotJoinFailed { room_id: room_id.clone(), reason: reason.clone() });
        match app.append(vec![entry], None).await {
            Ok(_) => app.store.flush().await.is_ok(),
            Err(_) => false,
        }
    };
    if !logged {
        // Keep the backoff the failure set: storage trouble must not become a hot loop.
        tracing::error!(%room_id, %reason, "cannot log that the join was given up; will try again later");
        return;
    }
    app.joins.retries.lock().expect("joins lock").remove(room_id);
    app.joins.residents.lock().expect("joins lock").remove(room_id);
    tracing::error!(%room_id, %reason, "gave up joining the room; a new invite or POST /_fedlink/admin/v1/rooms/{{roomId}}/join retries");
    Joins::settle(app, room_id);
}

/// Join `room_id` through `inviter`'s server.
pub async fn join_room(app: &Fedlink, room_id: &OwnedRoomId, inviter: &OwnedUserId) -> Result<(), JoinError> {
    let resident: OwnedServerName = inviter.server_name().to_owned();
    // A join signed by an earlier attempt is sent again as is.
    let stored = app.views.read().await.rooms.get(room_id).and_then(|r| r.signed_join.clone());
    let (join, version, rules) = match stored.and_then(|(v, e)| {
        let rules = rules_for(&v)?;
        let pdu = Pdu::parse(canonical_object(e).ok()?, &rules).ok()?;
        Some((pdu, v, rules))
    }) {
        Some(found) => {
            tracing::info!(%room_id, event_id = %found.0.event_id, "sending the join signed by an earlier attempt");
            found
        }
        None => make_and_sign_join(app, room_id, &resident).await?,
    };
    send_join(app, room_id, &resident, join, &version, &rules).await
}

/// `make_join` through `resident`, then sign the join and log it before it is sent.
async fn make_and_sign_join(app: &Fedlink, room_id: &OwnedRoomId, resident: &OwnedServerName) -> Result<(Pdu, RoomVersionId, RoomVersionRules), JoinError> {
    let vers: String = SUPPORTED_ROOM_VERSIONS.iter().map(|v| format!("ver={v}")).collect::<Vec<_>>().join("&");
    let path = format!("/_matrix/federation/v1/make_join/{}/{}?{vers}", enc(room_id.as_str()), enc(app.bot.as_str()));
    let resp = app.client.request(resident.as_str(), Method::GET, &path, None).await.map_err(|e| match &e {
        super::client::ClientError::Http { status: 403 | 404, .. } => JoinError::NotYet(e.to_string()),
        _ => JoinError::from(e),
    })?;
    let version = resp
        .get("room_version")
        .and_then(Value::as_str)
        .and_then(|v| RoomVersionId::try_from(v).ok())
        .unwrap_or(RoomVersionId::V1);
    let rules = rules_for(&version).ok_or_else(|| JoinError::Permanent(format!("unsupported room version {version}")))?;
    let template = resp.get("event").cloned().ok_or_else(|| JoinError::Permanent("make_join answer has no event".into()))?;
    let mut obj = canonical_object(template).map_err(|e| JoinError::Permanent(format!("make_join template: {e}")))?;
    for k in ["event_id", "signatures", "hashes", "unsigned"] {
        obj.remove(k);
    }
    let str_field = |o: &ruma::canonical_json::CanonicalJsonObject, k: &str| match o.get(k) {
        Some(CanonicalJsonValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let membership = match obj.get("content") {
        Some(CanonicalJsonValue::Object(c)) => match c.get("membership") {
            Some(CanonicalJsonValue::String(m)) => Some(m.clone()),
            _ => None,
        },
        _ => None,
    };
    if str_field(&obj, "type").as_deref() != Some("m.room.member")
        || str_field(&obj, "state_key").as_deref() != Some(app.bot.as_str())
        || str_field(&obj, "sender").as_deref() != Some(app.bot.as_str())
        || str_field(&obj, "room_id").as_deref() != Some(room_id.as_str())
        || membership.as_deref() != Some("join")
    {
        return Err(JoinError::Permanent("make_join template is not a join of the bot to this room".into()));
    }
    // Sign only what a join needs: the resident must not choose our profile.
    let mut content = ruma::canonical_json::CanonicalJsonObject::new();
    content.insert("membership".into(), CanonicalJsonValue::String("join".into()));
    if let Some(CanonicalJsonValue::Object(c)) = obj.get("content") {
        if let Some(v @ CanonicalJsonValue::String(_)) = c.get("join_authorised_via_users_server") {
            content.insert("join_authorised_via_users_server".into(), v.clone());
        }
    }
    obj.insert("content".into(), CanonicalJsonValue::Object(content));
    obj.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(ruma::Int::new(now_ms() as i64).unwrap_or_default()));
    if obj.contains_key("origin") {
        obj.insert("origin".into(), CanonicalJsonValue::String(app.server_name.to_string()));
    }
    ruma::signatures::hash_and_sign_event(app.server_name.as_str(), &*app.key, &mut obj, &rules.redaction)
        .map_err(|e| JoinError::Permanent(format!("signing the join: {e}")))?;
    let join = Pdu::parse(obj, &rules).map_err(|e| JoinError::Permanent(format!("our join event: {e}")))?;
    let _lock = app.lock_ingest().await;
    let entry = Entry::BotJoinSigned(BotJoinSigned { room_id: room_id.clone(), room_version: version.clone(), event: Some(join.to_value()) });
    app.append(vec![entry], None).await.map_err(|e| JoinError::Transient(e.to_string()))?;
    app.store.flush().await.map_err(|e| JoinError::Transient(e.to_string()))?;
    Ok((join, version, rules))
}

/// `send_join` v2 with our signed join; check and record the room's state.
async fn send_join(
    app: &Fedlink,
    room_id: &OwnedRoomId,
    resident: &OwnedServerName,
    join: Pdu,
    version: &RoomVersionId,
    rules: &RoomVersionRules,
) -> Result<(), JoinError> {
    let (version, rules) = (version.clone(), rules.clone());
    let resident = resident.clone();
    let path = format!(
        "/_matrix/federation/v2/send_join/{}/{}?omit_members=false",
        enc(room_id.as_str()),
        enc(join.event_id.as_str())
    );
    let resp = app.client.request(resident.as_str(), Method::PUT, &path, Some(&join.to_value())).await.map_err(|e| match &e {
        super::client::ClientError::Http { status: 403, .. } => JoinError::NotYet(e.to_string()),
        _ => JoinError::from(e),
    })?;
    if resp.get("members_omitted").and_then(Value::as_bool) == Some(true) {
        return Err(JoinError::Permanent("resident server omitted members despite omit_members=false".into()));
    }
    let list = |k: &str| -> Result<Vec<Value>, JoinError> {
        match resp.get(k) {
            Some(Value::Array(a)) => Ok(a.clone()),
            _ => Err(JoinError::Permanent(format!("send_join answer has no `{k}` list"))),
        }
    };
    let state = list("state")?;
    let auth_chain = list("auth_chain")?;
    // The resident may have countersigned our join (restricted rooms): prefer its copy if
    // it is the same event and its signatures verify.
    let join = match resp.get("event").cloned().map(canonical_object) {
        Some(Ok(o)) => match Pdu::parse(o, &rules) {
            Ok(p) if p.event_id == join.event_id && p.json.get("signatures").and_then(|s| match s {
                CanonicalJsonValue::Object(s) => s.get(app.server_name.as_str()),
                _ => None,
            }).is_some() => match verify_signatures(&app.keys, p.json.clone(), &rules).await {
                Ok(o) => Pdu::parse(o, &rules).unwrap_or(join),
                Err(_) => join,
            },
            _ => join,
        },
        _ => join,
    };

    let mut events: BTreeMap<OwnedEventId, Pdu> = BTreeMap::new();
    let mut state_ids: BTreeSet<OwnedEventId> = BTreeSet::new();
    for (raw, is_state) in state.into_iter().map(|v| (v, true)).chain(auth_chain.into_iter().map(|v| (v, false))) {
        let obj = canonical_object(raw).map_err(|e| JoinError::Permanent(format!("state event: {e}")))?;
        let pdu = Pdu::parse(obj, &rules).map_err(|e| JoinError::Permanent(format!("state event: {e}")))?;
        if pdu.room_id != *room_id {
            return Err(JoinError::Permanent(format!("state event {} is from another room", pdu.event_id)));
        }
        if is_state {
            if pdu.state_key.is_none() {
                return Err(JoinError::Permanent(format!("{} in `state` is not a state event", pdu.event_id)));
            }
            state_ids.insert(pdu.event_id.clone());
        }
        if events.contains_key(&pdu.event_id) || app.store.has_event(pdu.event_id.as_str()).unwrap_or(false) {
            continue;
        }
        let obj = crate::rooms::verify_signatures_via(&app.keys, pdu.json, &rules, Some(resident.as_str())).await.map_err(|e| match e {
            crate::rooms::Rejection::Keys(m) => JoinError::Transient(m),
            other => JoinError::Permanent(format!("state event: {other}")),
        })?;
        let pdu = Pdu::parse(obj, &rules).map_err(|e| JoinError::Permanent(e.to_string()))?;
        events.insert(pdu.event_id.clone(), pdu);
    }
    let ordered = auth_order(&events);
    if ordered.len() != events.len() {
        return Err(JoinError::Permanent("the returned auth chain has a cycle".into()));
    }
    let mut checked: BTreeMap<OwnedEventId, Pdu> = BTreeMap::new();
    for id in ordered {
        let pdu = events.remove(&id).expect("ordered ids come from the map");
        check_auth(&app.store, None, &pdu, &rules, &checked)
            .map_err(|e| JoinError::Permanent(format!("state event {id} fails auth: {e}")))?;
        checked.insert(id, pdu);
    }
    check_join_against_state(app, &join, &rules, &checked, &state_ids)?;

    let state_refs: Vec<StateRef> = state_ids
        .iter()
        .filter_map(|id| {
            let p = checked.get(id).cloned().map(std::sync::Arc::new).or_else(|| crate::rooms::load_pdu(&app.store, id, &rules))?;
            Some(StateRef {
                event_type: p.kind.to_string(),
                state_key: p.state_key.clone().unwrap_or_default(),
                event_id: p.event_id.clone(),
                membership: p.membership(),
            })
        })
        .collect();
    let n_state = state_refs.len();
    let state_before_join = state_refs.clone();
    let power_levels = state_refs
        .iter()
        .find(|s| s.event_type == "m.room.power_levels" && s.state_key.is_empty())
        .and_then(|s| checked.get(&s.event_id).cloned().map(std::sync::Arc::new).or_else(|| crate::rooms::load_pdu(&app.store, &s.event_id, &rules)))
        .and_then(|p| serde_json::from_str::<Value>(p.content.get()).ok());
    // A chat accepted only as a chat (the inviter may not invite the bot to rooms) that
    // turns out to have others in it is given up before anything of the room is logged:
    // nobody allowed the bot into it, and its state could be large.
    let crowded = {
        let views = app.views.read().await;
        views.rooms.get(room_id).and_then(|r| r.bot_chat.as_ref()).filter(|c| c.chat_only).is_some_and(|c| {
            state_refs.iter().any(|s| {
                s.event_type == "m.room.member"
                    && s.state_key != app.bot.as_str()
                    && s.state_key != c.owner.as_str()
                    && matches!(s.membership.as_deref(), Some("join") | Some("invite"))
            })
        })
    };
    if crowded {
        return Err(JoinError::Permanent("a direct chat with the bot from someone bot.invites_from does not allow, but others are in the room".into()));
    }
    let _lock = app.lock_ingest().await;
    let mut entries: Vec<Entry> = checked
        .values()
        .filter(|p| !app.store.has_event(p.event_id.as_str()).unwrap_or(false))
        .map(|p| Entry::Pdu(PduEntry::new(p, resident.clone(), PduStatus::Outlier)))
        .collect();
    let n_new = entries.len();
    entries.push(Entry::BotJoined(BotJoined {
        room_id: room_id.clone(),
        room_version: version.clone(),
        join_event_id: join.event_id.clone(),
        via: resident.clone(),
        state: state_refs,
        power_levels,
    }));
    if !app.store.has_event(join.event_id.as_str()).unwrap_or(false) {
        let before: crate::rooms::state::StateMap =
            state_before_join.iter().map(|s| ((s.event_type.clone(), s.state_key.clone()), s.event_id.clone())).collect();
        let transient = |e: crate::store::StoreError| JoinError::Transient(e.to_string());
        let before = crate::rooms::state::from_map(&app.store, &before).map_err(transient)?;
        crate::rooms::state::record_after(&app.store, &join, before).map_err(transient)?;
        entries.push(Entry::Pdu(PduEntry::new(&join, resident.clone(), PduStatus::Accepted)));
    }
    app.append(entries, None).await.map_err(|e| JoinError::Transient(e.to_string()))?;
    app.store.flush().await.map_err(|e| JoinError::Transient(e.to_string()))?;
    tracing::info!(%room_id, %version, via = %resident, state = n_state, new_events = n_new, "bot joined room");
    Ok(())
}

/// Check our own join against the returned state (and its auth events).
fn check_join_against_state(
    app: &Fedlink,
    join: &Pdu,
    rules: &RoomVersionRules,
    checked: &BTreeMap<OwnedEventId, Pdu>,
    state_ids: &BTreeSet<OwnedEventId>,
) -> Result<(), JoinError> {
    // send_join has already taken effect: joining again would only add joins to the room's
    // history, so a disagreement here is permanent and loud.
    check_auth(&app.store, None, join, rules, checked).map_err(|e| JoinError::Permanent(format!("our join fails auth: {e}")))?;
    let state: BTreeMap<(String, String), &Pdu> = state_ids
        .iter()
        .filter_map(|id| checked.get(id))
        .filter_map(|p| p.state_key.clone().map(|sk| ((p.kind.to_string(), sk), p)))
        .collect();
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, join, |t, sk| {
        state.get(&(t.to_string(), sk.to_owned())).map(|p| (*p).clone())
    })
    .map_err(|e| JoinError::Permanent(format!("our join is not allowed by the room state: {e}")))
}

/// Order events so each comes after its auth events (Kahn's algorithm, ties by depth then id).
pub fn auth_order(events: &BTreeMap<OwnedEventId, Pdu>) -> Vec<OwnedEventId> {
    let mut pending: BTreeMap<&OwnedEventId, usize> = events
        .iter()
        .map(|(id, p)| (id, p.auth_events.iter().filter(|a| events.contains_key(*a)).count()))
        .collect();
    let mut out = Vec::with_capacity(events.len());
    let mut ready: BTreeSet<(u64, &OwnedEventId)> =
        pending.iter().filter(|(_, n)| **n == 0).map(|(id, _)| (events[*id].depth, *id)).collect();
    let mut dependents: BTreeMap<&OwnedEventId, Vec<&OwnedEventId>> = BTreeMap::new();
    for (id, p) in events {
        for a in &p.auth_events {
            if let Some((k, _)) = events.get_key_value(a) {
                dependents.entry(k).or_default().push(id);
            }
        }
    }
    while let Some(first) = ready.iter().next().cloned() {
        ready.remove(&first);
        let id = first.1;
        out.push(id.clone());
        for d in dependents.get(id).into_iter().flatten() {
            let n = pending.get_mut(d).expect("dependent is in the map");
            *n -= 1;
            if *n == 0 {
                ready.insert((events[*d].depth, *d));
            }
        }
    }
    // Cycles cannot pass auth; leave them out so their dependents fail loudly.
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Given joins backing off through two residents, when one resident contacts fedlink,
    /// then only the joins through it are due at once.
    #[test]
    fn a_resident_that_contacts_us_gets_its_joins_retried_now() {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let joins = Joins::new(Arc::new(crate::metrics::Metrics::new()), rx);
        let far = now_ms() + 3_600_000;
        for (room, resident) in [("!a:kiwi", "kiwi"), ("!b:litchi", "litchi")] {
            let id = OwnedRoomId::try_from(room).unwrap();
            joins.retries.lock().unwrap().insert(id.clone(), RetryStatus { failures: 3, next_attempt_ms: far, ..Default::default() });
            joins.residents.lock().unwrap().insert(id, resident.to_owned());
        }
        joins.contact("kiwi");
        assert!(joins.due(&OwnedRoomId::try_from("!a:kiwi").unwrap()) <= now_ms());
        assert_eq!(joins.due(&OwnedRoomId::try_from("!b:litchi").unwrap()), far);
    }
}
