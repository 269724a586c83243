//! The sync worker: runs the reconciler over the views and carries out its decisions.
//!
//! An `Invite` decision becomes an invite event the bot builds and signs, logged as
//! `invite_pending` *before* it is sent, so a restart re-sends the same event (no duplicate
//! invites). Delivery is `PUT /_matrix/federation/v2/invite` to the target's server; the
//! countersigned event is then logged as the bot's own PDU and queued for every other
//! server in the room. A lack of power is logged once as `invite_failed` (visible in
//! metrics and the admin API) and comes back only when the power levels change.
//!
//! Delivery goes through per-destination lanes ([`crate::lanes`]): invites by the target's
//! server, registration actions (and presence) by the homeserver acting. A dead or hanging
//! homeserver backs off its own lane only. An action the homeserver cannot do *yet* (a read
//! of an event it does not hold) is retried on its own schedule without holding its lane.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use reqwest::Method;
use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::{json, Value};

use crate::{
    node::{now_ms, Fedlink},
    core::{
        log_entry::{Entry, InviteFailed, InvitePending, PduEntry, PduStatus, ReceiptEntry, UserAction},
        pdu::{canonical_object, rules_for, Pdu},
        reconcile::Action,
    },
    federation::client::enc,
    lanes::{Lanes, Step},
    rooms::{build, check_auth},
};

/// An action's identity: (room, user, kind).
type ActionKey = (OwnedRoomId, OwnedUserId, String);

/// The sync service's own delivery state.
pub struct SyncState {
    /// Invite lanes, by the target's server.
    pub invites: Arc<Lanes>,
    /// Registration action lanes, by the acting homeserver.
    pub actions: Arc<Lanes>,
    /// Per-action retry state for actions the homeserver cannot do yet.
    not_yet: Mutex<HashMap<ActionKey, crate::node::RetryStatus>>,
    /// Membership actions done, waiting for the membership to come back.
    sent: Mutex<HashSet<ActionKey>>,
    /// When fedlink last set a user online (presence following), to avoid repeating itself.
    presence_sent: Mutex<HashMap<OwnedUserId, Instant>>,
    /// When the read that caused a pending read action arrived (for the latency histogram).
    read_started: Mutex<HashMap<ActionKey, Instant>>,
}

impl SyncState {
    /// The sync service's state for `metrics`, stopping with `stop`.
    pub fn new(metrics: Arc<crate::metrics::Metrics>, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            invites: Lanes::new("invites", crate::core::backoff::Backoff::DEFAULT, metrics.clone(), stop.clone()),
            actions: Lanes::new("actions", crate::core::backoff::Backoff::DEFAULT, metrics, stop),
            not_yet: Default::default(),
            sent: Default::default(),
            presence_sent: Default::default(),
            read_started: Default::default(),
        }
    }

    /// Retry state of actions the homeserver could not do yet, for the admin API.
    pub fn not_yet_report(&self) -> Vec<serde_json::Value> {
        self.not_yet
            .lock()
            .expect("lock")
            .iter()
            .map(|((room, user, kind), s)| json!({ "room_id": room, "user_id": user, "kind": kind, "status": s }))
            .collect()
    }
}

/// Runs reconcile and hands due deliveries to their lanes until `stop`.
pub async fn worker(app: Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut changes = app.changes.subscribe();
    let mut last_full = Instant::now();
    loop {
        changes.borrow_and_update();
        let full = last_full.elapsed() >= FULL_PASS;
        if full {
            last_full = Instant::now();
        }
        if let Err(e) = reconcile_once(&app, full).await {
            tracing::error!(error = %e, "reconcile failed");
        }
        let next_due = schedule(&app).await;
        let wait = next_due.map(|d| Duration::from_millis(d.saturating_sub(now_ms()))).unwrap_or(Duration::from_secs(30)).min(FULL_PASS.saturating_sub(last_full.elapsed()));
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(wait.min(Duration::from_secs(30))) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Kick the lanes of every destination with due work; returns when the next per-action
/// retry is due.
async fn schedule(app: &Arc<Fedlink>) -> Option<u64> {
    let (invite_dests, actions): (HashSet<String>, Vec<UserAction>) = {
        let views = app.views.read().await;
        (
            pending_rooms(&views).flat_map(|r| r.pending_invites.keys().map(|t| t.server_name().to_string())).collect(),
            pending_rooms(&views).flat_map(room_actions).cloned().collect(),
        )
    };
    for dest in invite_dests {
        app.sync.invites.kick_for(&dest, app, |a, d| async move { deliver_invites(&a, &d).await });
    }
    // Forget the state of actions that are settled (their membership or read arrived).
    let live: HashSet<ActionKey> = actions.iter().map(action_key).collect();
    app.sync.not_yet.lock().expect("lock").retain(|k, _| live.contains(k));
    app.sync.sent.lock().expect("lock").retain(|k| live.contains(k));
    let mut next_due: Option<u64> = None;
    let mut action_dests: HashSet<String> = presence_servers(app);
    let now = now_ms();
    for a in &actions {
        match action_due(app, a) {
            Some(due) if due > now => crate::core::backoff::earliest(&mut next_due, due),
            Some(_) => {
                action_dests.insert(acting(a).server_name().to_string());
            }
            None => {}
        }
    }
    for dest in action_dests {
        app.sync.actions.kick_for(&dest, app, |a, d| async move { deliver_actions(&a, &d).await });
    }
    next_due
}

/// Rooms with pending invites or actions (from the views' index: no scan of every room).
fn pending_rooms(views: &crate::core::views::Views) -> impl Iterator<Item = &crate::core::views::RoomView> {
    views.index.pending.iter().filter_map(|id| views.rooms.get(id))
}

fn action_key(a: &UserAction) -> ActionKey {
    let kind = match &a.thread_id {
        Some(root) => format!("{} {root}", a.kind),
        None => a.kind.clone(),
    };
    (a.room_id.clone(), a.user_id.clone(), kind)
}

/// Every pending action of a room: its users' and its threads' reads.
fn room_actions(r: &crate::core::views::RoomView) -> impl Iterator<Item = &UserAction> {
    r.pending_actions.values().chain(r.threads.values().flat_map(|t| t.pending.values()))
}

/// Whether `a` is still pending, unchanged (opt-out, unlink or the membership or read may
/// have settled it).
fn still_pending(views: &crate::core::views::Views, a: &UserAction) -> bool {
    let Some(room) = views.rooms.get(&a.room_id) else { return false };
    let current = match a.thread_read_root() {
        Some(root) => room.threads.get(root).and_then(|t| t.pending.get(&a.user_id)),
        None => room.pending_actions.get(&a.user_id),
    };
    current == Some(a)
}

/// The account whose homeserver performs `a` (an invite is done by the inviting sibling).
fn acting(a: &UserAction) -> &OwnedUserId {
    match (&a.actor, a.kind.as_str()) {
        (Some(actor), "invite") => actor,
        _ => &a.user_id,
    }
}

/// When `a` may be tried (ms since the epoch), or `None` when it was done and waits for its
/// membership to come back.
fn action_due(app: &Fedlink, a: &UserAction) -> Option<u64> {
    let key = action_key(a);
    if app.sync.sent.lock().expect("lock").contains(&key) {
        return None;
    }
    Some(app.sync.not_yet.lock().expect("lock").get(&key).map(|s| s.next_attempt_ms).unwrap_or(0))
}

/// A full pass over every room at least this often, as a safety net under the incremental
/// passes.
const FULL_PASS: Duration = Duration::from_secs(600);

/// Decide and log what to do: for the rooms touched since the last pass (all of them when
/// `full`).
pub async fn reconcile_once(app: &Fedlink, full: bool) -> Result<(), crate::store::StoreError> {
    let started = Instant::now();
    let touched = {
        let mut views = app.views.write().await;
        let taken = std::mem::replace(&mut views.touched, crate::core::views::Touched::none());
        if full { crate::core::views::Touched::default() } else { taken }
    };
    if touched.is_empty() {
        return Ok(());
    }
    // Decided under the read lock: ingest goes on; what it touches meanwhile is decided on
    // the next pass.
    let (actions, rooms) = {
        let views = app.views.read().await;
        let rooms = if touched.all { views.rooms.len() } else { touched.rooms.len() };
        (crate::core::reconcile::decide_touched(&views, &app.routes, &touched), rooms)
    };
    app.metrics.reconcile_seconds.with_label_values(&[if full { "full" } else { "incremental" }]).observe(started.elapsed().as_secs_f64());
    let result = act(app, actions).await;
    if result.is_err() {
        // Decide for these rooms again on the next pass: nothing taken is lost.
        let mut views = app.views.write().await;
        if touched.all {
            views.touched = crate::core::views::Touched::default();
        } else if !views.touched.all {
            views.touched.rooms.extend(touched.rooms);
        }
    }
    tracing::debug!(rooms, full, "reconciled");
    result
}

/// Log the decisions of a pass.
async fn act(app: &Fedlink, actions: Vec<Action>) -> Result<(), crate::store::StoreError> {
    // A sibling waiting for its catch-up is decided again once `caught_up` is logged.
    let actions: Vec<Action> = actions
        .into_iter()
        .filter(|a| match a {
            Action::AwaitCatchUp { room_id, target } => {
                app.metrics.reconcile_actions.with_label_values(&["await_catch_up"]).inc();
                tracing::debug!(%room_id, %target, "a sibling is invited once it has caught up on its memberships");
                false
            }
            _ => true,
        })
        .collect();
    if actions.is_empty() {
        return Ok(());
    }
    let _lock = app.lock_ingest().await;
    for action in actions {
        let entry = match action {
            Action::Invite { room_id, target, person, partner } => {
                app.metrics.reconcile_actions.with_label_values(&["invite"]).inc();
                match build_invite(app, &room_id, &target, partner.is_some()).await {
                    Ok(pdu) => {
                        let direct_with = partner.as_ref().map(|p| p.as_str()).unwrap_or("");
                        tracing::info!(%room_id, %target, %person, event_id = %pdu.event_id, direct_with, "inviting a linked account");
                        Entry::InvitePending(InvitePending { room_id, target, event_id: pdu.event_id.clone(), event: pdu.to_value() })
                    }
                    Err((reason, power_levels_event)) => {
                        app.metrics.invites_sent.with_label_values(&["cannot_build"]).inc();
                        tracing::warn!(%room_id, %target, %reason, "cannot build an invite");
                        Entry::InviteFailed(InviteFailed { room_id, target, reason, power_levels_event })
                    }
                }
            }
            Action::SetRead { room_id, target, event_id, position, thread } => {
                let kind = if thread.is_some() { "thread_read" } else { "read" };
                app.metrics.reconcile_actions.with_label_values(&[kind]).inc();
                let action = UserAction { event_id: Some(event_id), event_ts: position.1, depth: position.0, thread_id: thread, ..UserAction::new(room_id, target, kind) };
                tracing::debug!(room_id = %action.room_id, target = %action.user_id, kind, "moving a linked account's read");
                app.sync.read_started.lock().expect("lock").insert(action_key(&action), Instant::now());
                Entry::ActionPending(action)
            }
            Action::MarkDirect { room_id, target, partner } => {
                app.metrics.reconcile_actions.with_label_values(&["direct"]).inc();
                tracing::info!(%room_id, %target, %partner, "listing a direct chat in a linked account's m.direct");
                Entry::ActionPending(UserAction { partner: Some(partner), ..UserAction::new(room_id, target, "direct") })
            }
            Action::Join { room_id, target } => {
                app.metrics.reconcile_actions.with_label_values(&["join"]).inc();
                tracing::info!(%room_id, %target, "joining an invited linked account");
                Entry::ActionPending(UserAction::new(room_id, target, "join"))
            }
            Action::Leave { room_id, target } => {
                app.metrics.reconcile_actions.with_label_values(&["leave"]).inc();
                tracing::info!(%room_id, %target, "a linked account left; its sibling leaves too");
                Entry::ActionPending(UserAction::new(room_id, target, "leave"))
            }
            Action::AwaitCatchUp { .. } => continue,
            Action::InviteAs { room_id, actor, target, partner } => {
                app.metrics.reconcile_actions.with_label_values(&["invite_as"]).inc();
                let direct_with = partner.as_ref().map(|p| p.as_str()).unwrap_or("");
                tracing::info!(%room_id, %actor, %target, direct_with, "inviting a linked account as its joined sibling");
                Entry::ActionPending(UserAction { actor: Some(actor), partner, ..UserAction::new(room_id, target, "invite") })
            }
            Action::Unsupported { room_id, target, kind } => {
                app.metrics.unsupported_actions.with_label_values(&[kind]).inc();
                let reason = format!("{} has no application-service registration for fedlink; over federation fedlink may not {kind} for its users", target.server_name());
                tracing::warn!(%room_id, %target, kind, "unsupported action recorded");
                Entry::ActionUnsupported(UserAction { reason: Some(reason), ..UserAction::new(room_id, target, kind) })
            }
            Action::MissingPower { room_id, target, power_levels_event, needed, have } => {
                app.metrics.reconcile_actions.with_label_values(&["missing_power"]).inc();
                app.metrics.invites_sent.with_label_values(&["missing_power"]).inc();
                let reason = format!("the bot has power {have} in this room; inviting needs {needed}");
                tracing::warn!(%room_id, %target, %reason, "cannot invite a linked account");
                Entry::InviteFailed(InviteFailed { room_id, target, reason, power_levels_event })
            }
        };
        app.append(vec![entry], None).await?;
    }
    app.store.flush().await?;
    Ok(())
}

/// Build and sign the bot's invite for `target`, checked against the room's auth rules.
/// On failure, the reason and the power levels event it depends on.
async fn build_invite(app: &Fedlink, room_id: &OwnedRoomId, target: &OwnedUserId, direct: bool) -> Result<Pdu, (String, Option<ruma::OwnedEventId>)> {
    let views = app.views.read().await;
    let room = views.rooms.get(room_id).ok_or(("room unknown".to_owned(), None))?;
    let power_event = room.power.as_ref().and_then(|p| p.event_id.clone());
    let rules = rules_for(&room.version).ok_or(("unsupported room version".to_owned(), None))?;
    let content = if direct { json!({ "membership": "invite", "is_direct": true }) } else { json!({ "membership": "invite" }) };
    let obj = build::template(&app.store, room_id.as_str(), room, &rules, &app.bot, "m.room.member", Some(target.as_str()), content, now_ms())
        .map_err(|e| (e.to_string(), None))?;
    let pdu = build::sign(app.server_name.as_str(), &app.key, obj, &rules).map_err(|e| (e.to_string(), None))?;
    match check_auth(&app.store, Some(room), &pdu, &rules, &Default::default()) {
        Ok(PduStatus::Accepted) => Ok(pdu),
        Ok(_) => Err(("the room's current state does not allow this invite".into(), power_event)),
        Err(e) => Err((e.to_string(), power_event)),
    }
}

/// One step of `dest`'s invite lane: send every pending invite for its users. A transient
/// failure backs the lane off; a refusal is logged and the lane goes on.
async fn deliver_invites(app: &Fedlink, dest: &str) -> Step {
    let pending: Vec<(OwnedRoomId, OwnedUserId, Value, ruma::RoomVersionId)> = {
        let views = app.views.read().await;
        views
            .rooms
            .iter()
            .flat_map(|(id, r)| {
                r.pending_invites
                    .iter()
                    .filter(|(t, _)| t.server_name().as_str() == dest)
                    .map(move |(t, p)| (id.clone(), t.clone(), p.event.clone(), r.version.clone()))
            })
            .collect()
    };
    let mut delivered = 0;
    for (room_id, target, event, version) in pending {
        // Opt-out, unlink or a membership may have settled it since.
        if !app.views.read().await.rooms.get(&room_id).is_some_and(|r| r.pending_invites.contains_key(&target)) {
            continue;
        }
        match send_invite(app, &room_id, &target, event, &version).await {
            Ok(()) => {
                delivered += 1;
                app.metrics.invites_sent.with_label_values(&["ok"]).inc();
            }
            Err(InviteError::Transient(reason)) => {
                app.metrics.invites_sent.with_label_values(&["transient_error"]).inc();
                tracing::warn!(%room_id, %target, %reason, "invite delivery failed; will retry");
                return Step::Failed(reason);
            }
            Err(InviteError::Refused(reason)) => {
                app.metrics.invites_sent.with_label_values(&["refused"]).inc();
                tracing::warn!(%room_id, %target, %reason, "the target's server refused the invite");
                let _lock = app.lock_ingest().await;
                let entry = Entry::InviteFailed(InviteFailed { room_id, target, reason, power_levels_event: None });
                if app.append(vec![entry], None).await.is_ok() {
                    let _ = app.store.flush().await;
                }
            }
        }
    }
    Step::Done { delivered, more: false }
}

/// Check the invite a target's server returned before it is stored or relayed: our own
/// signature and content hash intact, the target server's signature valid, and nothing
/// but signatures added.
async fn verify_returned_invite(app: &Fedlink, ours: &Value, returned: Pdu, target: &OwnedUserId, rules: &ruma::room_version_rules::RoomVersionRules) -> Result<Pdu, InviteError> {
    let refused = |m: String| InviteError::Refused(m);
    let mut as_returned = returned.json.clone();
    as_returned.remove("unsigned");
    let verified = crate::rooms::verify_signatures(&app.keys, returned.json.clone(), rules).await.map_err(|e| match e {
        crate::rooms::Rejection::Keys(m) => InviteError::Transient(format!("keys to check the returned invite: {m}")),
        e => refused(format!("the returned invite does not verify: {e}")),
    })?;
    if verified != as_returned {
        return Err(refused("the returned invite's content does not match its hash".into()));
    }
    let strip = |mut o: ruma::canonical_json::CanonicalJsonObject| {
        o.remove("signatures");
        o.remove("unsigned");
        o
    };
    let ours = canonical_object(ours.clone()).map_err(|e| refused(e.to_string()))?;
    if strip(ours) != strip(verified.clone()) {
        return Err(refused("the target's server changed the invite".into()));
    }
    let server = target.server_name().as_str();
    let key_ids = crate::keys::remote::signing_key_ids(&verified, server);
    if key_ids.is_empty() {
        return Err(refused(format!("the returned invite is not signed by {server}")));
    }
    let keys = app.keys.keys(server, &key_ids, 0).await.map_err(|e| InviteError::Transient(format!("keys of {server}: {e}")))?;
    let redacted = ruma::canonical_json::redact(verified.clone(), &rules.redaction, None).map_err(|e| refused(e.to_string()))?;
    crate::keys::remote::verify_signed_by(&redacted, server, keys).map_err(|e| refused(format!("{server}'s signature on the invite: {e}")))?;
    Pdu::parse(verified, rules).map_err(|e| refused(e.to_string()))
}

enum InviteError {
    Transient(String),
    Refused(String),
}

async fn send_invite(app: &Fedlink, room_id: &OwnedRoomId, target: &OwnedUserId, event: Value, version: &ruma::RoomVersionId) -> Result<(), InviteError> {
    let rules = rules_for(version).ok_or_else(|| InviteError::Refused("unsupported room version".into()))?;
    let event_id = match canonical_object(event.clone()).ok().and_then(|o| Pdu::parse(o, &rules).ok()) {
        Some(p) => p.event_id,
        None => return Err(InviteError::Refused("stored invite no longer parses".into())),
    };
    let stripped = {
        let views = app.views.read().await;
        match views.rooms.get(room_id) {
            Some(room) => build::invite_room_state(&app.store, room, &app.bot),
            None => Vec::new(),
        }
    };
    let body = json!({ "room_version": version.as_str(), "event": event, "invite_room_state": stripped });
    let path = format!("/_matrix/federation/v2/invite/{}/{}", enc(room_id.as_str()), enc(event_id.as_str()));
    let resp = app.client.request(target.server_name().as_str(), Method::PUT, &path, Some(&body)).await.map_err(|e| {
        if e.is_transient() {
            InviteError::Transient(e.to_string())
        } else {
            InviteError::Refused(e.to_string())
        }
    })?;
    let signed = resp.get("event").cloned().ok_or_else(|| InviteError::Refused("invite answer has no event".into()))?;
    let pdu = canonical_object(signed)
        .ok()
        .and_then(|o| Pdu::parse(o, &rules).ok())
        .filter(|p| p.event_id == event_id)
        .ok_or_else(|| InviteError::Refused("the target's server returned a different event".into()))?;
    let pdu = verify_returned_invite(app, &event, pdu, target, &rules).await?;
    let _lock = app.lock_ingest().await;
    if app.store.has_event(event_id.as_str()).unwrap_or(false) {
        return Ok(());
    }
    let (dests, state_before, resolved): (Vec<(String, String)>, crate::rooms::state::Root, _) = {
        let views = app.views.read().await;
        let room = views.rooms.get(room_id);
        let (resolved, before) = match room.map(|r| crate::rooms::admit(&app.store, r, &pdu, &rules)) {
            Some(Ok(a)) => (a.resolved, a.before),
            Some(Err(e)) => return Err(InviteError::Refused(format!("the room no longer allows this invite: {e}"))),
            None => return Err(InviteError::Refused("fedlink left the room".into())),
        };
        let dests = room
            .map(|r| r.joined_servers())
            .unwrap_or_default()
            .into_iter()
            .filter(|s| *s != app.server_name)
            .map(|s| (s.to_string(), event_id.to_string()))
            .collect();
        (dests, before, resolved)
    };
    app.store.put_state_before_root(event_id.as_str(), state_before).map_err(|e| InviteError::Transient(e.to_string()))?;
    let mut entry = PduEntry::new(&pdu, app.server_name.clone(), PduStatus::Accepted);
    entry.resolved_state = resolved;
    let entry = Entry::Pdu(entry);
    app.append_and_send(vec![entry], None, &dests).await.map_err(|e| InviteError::Transient(e.to_string()))?;
    app.store.flush().await.map_err(|e| InviteError::Transient(e.to_string()))?;
    tracing::info!(%room_id, %target, %event_id, destinations = dests.len(), "invite delivered");
    Ok(())
}

/// One step of `dest`'s action lane: carry out its due actions through the registration,
/// then presence following. A read marker the homeserver accepted is logged as that user's
/// receipt (the homeserver's own echo later changes nothing).
async fn deliver_actions(app: &Fedlink, dest: &str) -> Step {
    let pending: Vec<UserAction> = {
        let views = app.views.read().await;
        pending_rooms(&views).flat_map(room_actions).filter(|a| acting(a).server_name().as_str() == dest).cloned().collect()
    };
    let mut delivered = 0;
    for action in pending {
        let key = action_key(&action);
        if action_due(app, &action).is_none_or(|d| d > now_ms()) {
            continue;
        }
        // Opt-out, unlink or the membership may have settled it since.
        if !still_pending(&*app.views.read().await, &action) {
            continue;
        }
        match crate::appservice::perform(app, &action).await {
            Ok(()) => {
                delivered += 1;
                app.metrics.actions.with_label_values(&[action.kind.as_str(), "ok"]).inc();
                app.sync.not_yet.lock().expect("lock").remove(&key);
                if action.kind == "read" {
                    // The read marker moved in the same call.
                    app.metrics.actions.with_label_values(&["fully_read", "ok"]).inc();
                }
                if action.kind == "direct" {
                    let _lock = app.lock_ingest().await;
                    if app.append(vec![Entry::ActionDone(action.clone())], None).await.is_ok() {
                        let _ = app.store.flush().await;
                    }
                } else if action.kind == "read" || action.kind == "thread_read" {
                    if let Some(t) = app.sync.read_started.lock().expect("lock").remove(&key) {
                        app.metrics.read_propagation_seconds.observe(t.elapsed().as_secs_f64());
                    }
                    let event_id = action.event_id.clone().expect("read actions carry an event");
                    let depth = app.store.get_event(event_id.as_str()).ok().flatten().map(|e| e.depth).or(action.depth);
                    let entry = Entry::Receipt(ReceiptEntry {
                        origin: action.user_id.server_name().to_owned(),
                        room_id: action.room_id.clone(),
                        receipt_type: "m.read".into(),
                        user_id: action.user_id.clone(),
                        event_id,
                        ts: Some(now_ms()),
                        thread_id: action.thread_id.as_ref().map(|t| t.to_string()),
                        thread_inferred: false,
                        depth,
                        event_ts: action.event_ts,
                        via_appservice: Some(true),
                    });
                    let _lock = app.lock_ingest().await;
                    if app.append(vec![entry], None).await.is_ok() {
                        let _ = app.store.flush().await;
                    }
                } else {
                    // The membership event arrives over federation or a push and settles it.
                    app.sync.sent.lock().expect("lock").insert(key);
                }
                tracing::info!(room_id = %action.room_id, user = %action.user_id, kind = %action.kind, thread = ?action.thread_id, "action done through the appservice route");
            }
            Err(crate::appservice::ActionError::NotYet(reason)) => {
                let mut retries = app.sync.not_yet.lock().expect("lock");
                let s = retries.entry(key).or_default();
                s.fail_transient(reason.clone());
                app.metrics.actions.with_label_values(&[action.kind.as_str(), "not_yet"]).inc();
                tracing::info!(room_id = %action.room_id, user = %action.user_id, kind = %action.kind, failures = s.failures, %reason, "the homeserver cannot do this yet; will retry");
            }
            Err(crate::appservice::ActionError::Transient(reason)) => {
                app.metrics.actions.with_label_values(&[action.kind.as_str(), "transient_error"]).inc();
                return Step::Failed(reason);
            }
            Err(crate::appservice::ActionError::Refused(reason)) => {
                app.metrics.actions.with_label_values(&[action.kind.as_str(), "refused"]).inc();
                app.sync.not_yet.lock().expect("lock").remove(&key);
                tracing::warn!(room_id = %action.room_id, user = %action.user_id, kind = %action.kind, %reason, "action refused by the homeserver");
                let mut failed = action.clone();
                failed.reason = Some(reason);
                let _lock = app.lock_ingest().await;
                if app.append(vec![Entry::ActionFailed(failed)], None).await.is_ok() {
                    let _ = app.store.flush().await;
                }
            }
        }
    }
    if let Err(reason) = follow_presence(app, dest).await {
        return Step::Failed(reason);
    }
    Step::Done { delivered, more: false }
}

/// Homeservers whose registration enables presence following.
fn presence_servers(app: &Fedlink) -> HashSet<String> {
    app.cfg.appservice.iter().filter(|a| a.presence).map(|a| a.server_name.clone()).collect()
}

/// Show `dest`'s accounts online because a sibling is (when its registration has
/// `presence = true`).
async fn follow_presence(app: &Fedlink, dest: &str) -> Result<(), String> {
    if !presence_servers(app).contains(dest) {
        return Ok(());
    }
    let enabled: std::collections::BTreeSet<ruma::OwnedServerName> = dest.try_into().into_iter().collect();
    let targets = crate::core::reconcile::decide_presence(&*app.views.read().await, &enabled);
    for user in targets {
        {
            let mut sent = app.sync.presence_sent.lock().expect("lock");
            if sent.get(&user).is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
                continue;
            }
            sent.insert(user.clone(), Instant::now());
        }
        let result = crate::appservice::set_presence(app, &user, "online").await;
        let label = if result.is_ok() { "ok" } else { "error" };
        app.metrics.actions.with_label_values(&["presence", label]).inc();
        match result {
            Ok(()) => {}
            Err(crate::appservice::ActionError::Transient(reason)) => return Err(reason),
            Err(e) => tracing::warn!(%user, error = ?e, "cannot set presence"),
        }
    }
    Ok(())
}

/// How often the in-step gauges are computed (for the rooms touched since the last time).
const STEP_EVERY: Duration = Duration::from_secs(15);

/// Keeps `fedlink_persons`, `fedlink_account_rooms` and `fedlink_out_of_step_oldest_seconds`
/// up to date until `stop`.
pub async fn step_worker(app: Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    // Since when each (room, account) has been catching up (in memory: a restart starts the
    // clock again). Blocked and unsupported accounts wait for someone else; they have their
    // own gauges and alerts.
    let mut since: HashMap<(OwnedRoomId, OwnedUserId), Instant> = HashMap::new();
    let mut catching_up: HashSet<(OwnedRoomId, OwnedUserId)> = HashSet::new();
    let mut last_change: Option<u64> = None;
    let mut last_pass = Instant::now();
    let mut last_full = Instant::now();
    let mut cache = crate::core::step::StepCache::default();
    loop {
        // A pass only when the log changed (or every 5 minutes): an idle fedlink costs
        // nothing, a busy one one pass per STEP_EVERY over the rooms it touched.
        let change = *app.changes.borrow();
        if last_change != Some(change) || last_pass.elapsed() >= Duration::from_secs(300) {
            last_change = Some(change);
            last_pass = Instant::now();
            // Only the rooms touched since the last pass are classified again (all of them
            // every 5 minutes, as a safety net).
            let full = last_full.elapsed() >= Duration::from_secs(300);
            let touched = {
                let mut views = app.views.write().await;
                std::mem::replace(&mut views.step_touched, crate::core::views::Touched::none())
            };
            let touched = if full {
                last_full = Instant::now();
                crate::core::views::Touched::default()
            } else {
                touched
            };
            let persons = {
                let views = app.views.read().await;
                cache.update(&views, &app.routes, &touched);
                cache.persons(&views)
            };
            let out_of_step = cache.out_of_step();
            catching_up = out_of_step.iter().filter(|(_, s)| **s == crate::core::step::Step::CatchingUp).map(|(k, _)| k.clone()).collect();
            for s in crate::core::step::Step::ALL {
                app.metrics.persons.with_label_values(&[s.label()]).set(persons.get(&s).copied().unwrap_or(0) as i64);
                app.metrics.account_rooms.with_label_values(&[s.label()]).set(cache.account_rooms().get(&s).copied().unwrap_or(0) as i64);
            }
            tracing::debug!(out_of_step = out_of_step.len(), rooms = if touched.all { usize::MAX } else { touched.rooms.len() }, "in-step gauges updated");
            // People with a chat with the bot hear about what fedlink cannot do for them.
            crate::bot::tell_problems(&app, out_of_step).await;
        }
        let now = Instant::now();
        since.retain(|k, _| catching_up.contains(k));
        for k in &catching_up {
            since.entry(k.clone()).or_insert(now);
        }
        let oldest = since.values().map(|t| now.duration_since(*t).as_secs_f64()).fold(0.0, f64::max);
        app.metrics.out_of_step_oldest_seconds.set(oldest);
        if let Ok(dead) = app.store.dead_letter_counts() {
            app.metrics.dead_letters.set(dead.values().sum::<usize>() as i64);
        }
        tokio::select! {
            _ = tokio::time::sleep(STEP_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
