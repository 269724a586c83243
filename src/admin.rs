//! The operator's HTTP side (plain HTTP, keep it private): `/metrics` for Prometheus and the
//! admin API under `/_fedlink/admin/v1/`, which needs `Authorization: Bearer <admin token>`.

use std::sync::Arc;

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};

use crate::{node::Fedlink, core::views::BotMembership, federation::error::MatrixError};

type AppState = Arc<Fedlink>;

/// The metrics + admin router.
pub fn router(app: Arc<Fedlink>) -> Router {
    let admin = Router::new()
        .route("/_fedlink/admin/v1/status", get(status))
        .route("/_fedlink/admin/v1/rooms", get(rooms))
        .route("/_fedlink/admin/v1/rooms/{room_id}", get(room))
        .route("/_fedlink/admin/v1/persons", get(persons))
        .route("/_fedlink/admin/v1/persons/{id}", get(person).put(put_person).delete(delete_person))
        .route("/_fedlink/admin/v1/persons/{id}/opt_out", axum::routing::put(put_opt_out))
        .route("/_fedlink/admin/v1/persons/{id}/settings", axum::routing::put(put_settings))
        .route("/_fedlink/admin/v1/destinations", get(destinations))
        .route("/_fedlink/admin/v1/inbound", get(inbound))
        .route("/_fedlink/admin/v1/rooms/{room_id}/join", axum::routing::post(retry_join))
        .route("/_fedlink/admin/v1/destinations/{dest}/retry", axum::routing::post(retry_destination))
        .layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/_fedlink/admin/v1/openapi.json", get(openapi))
        .route("/ready", get(ready))
        .route("/_matrix/app/v1/transactions/{txn_id}", axum::routing::put(crate::appservice::transaction))
        .route("/_matrix/app/v1/users/{user_id}", get(crate::appservice::not_mine))
        .route("/_matrix/app/v1/rooms/{alias}", get(crate::appservice::not_mine))
        .merge(admin)
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024))
        .with_state(app)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    match given {
        None => MatrixError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "admin token required").into_response(),
        Some(t) if !same(t.as_bytes(), app.admin_token.as_bytes()) => {
            tracing::warn!("admin API request with a wrong token");
            MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "wrong admin token").into_response()
        }
        Some(_) => next.run(req).await,
    }
}

/// The admin API described as OpenAPI 3 (`src/openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");

/// `GET /_fedlink/admin/v1/openapi.json`: no token (it describes, it reveals nothing).
async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// `GET /health`: the process serves. No token; reveals nothing else.
async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /ready`: storage open, views folded and keys loaded (done before any listener
/// serves), the federation listener up, and not shutting down. No token; 503 with what is
/// missing otherwise.
async fn ready(State(app): State<AppState>) -> Response {
    let stopping = *app.stop.borrow();
    let listening = app.federation_listening.load(std::sync::atomic::Ordering::SeqCst);
    if listening && !stopping {
        return Json(json!({ "ready": true })).into_response();
    }
    let waiting: Vec<&str> = [(!listening, "federation_listener"), (stopping, "shutting_down")].into_iter().filter(|(c, _)| *c).map(|(_, w)| w).collect();
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "waiting_for": waiting }))).into_response()
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    app.metrics.observe_known_ids(|| app.store.known_ids());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render())
}

fn bot_state(b: &BotMembership) -> &'static str {
    match b {
        BotMembership::Invited { .. } => "invited",
        BotMembership::Joined => "joined",
        BotMembership::Left { .. } => "left",
        BotMembership::JoinFailed { .. } => "join_failed",
        BotMembership::Absent => "absent",
    }
}

async fn status(State(app): State<AppState>) -> Json<Value> {
    let views = app.views.read().await;
    Json(json!({
        "server_name": app.server_name,
        "bot_user_id": app.bot,
        "key_id": app.key.key_id(),
        "log_entries": app.store.last_seq(),
        "views_folded_seq": views.folded_seq,
        // Rooms changed since the last views checkpoint (what a restart folds again).
        "views_unsaved_rooms": if views.unsaved.all { views.rooms.len() } else { views.unsaved.rooms.len() },
        "rooms": views.rooms.len(),
        "rooms_joined": views.index.joined.len(),
        "rooms_joining": views.index.joining.len(),
        "rooms_join_failed": views.index.join_failed.len(),
        "storage_bytes": app.store.size_on_disk(),
        "storage_compressed": app.store.compressed(),
        // Whether people are in step (as of the last in-step pass, every 15 s).
        "persons": crate::core::step::Step::ALL.iter().map(|s| (s.label(), app.metrics.persons.with_label_values(&[s.label()]).get())).collect::<std::collections::BTreeMap<_, _>>(),
        "out_of_step_oldest_seconds": app.metrics.out_of_step_oldest_seconds.get(),
        "bot_chats": views.index.chat_owner.len(),
        "link_requests_open": views.directory.link_requests.len(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn rooms(State(app): State<AppState>) -> Json<Value> {
    let views = app.views.read().await;
    let rooms: Vec<Value> = views
        .rooms
        .iter()
        .map(|(id, r)| {
            json!({
                "room_id": id,
                "room_version": r.version,
                "bot_membership": bot_state(&r.bot),
                "joined_members": r.joined_members().count(),
                "events": r.event_count,
            })
        })
        .collect();
    Json(json!({ "rooms": rooms }))
}

async fn room(State(app): State<AppState>, Path(room_id): Path<String>) -> Result<Json<Value>, MatrixError> {
    let id = ruma::RoomId::parse(&room_id).map_err(|e| MatrixError::invalid_param(format!("bad room id: {e}")))?;
    let views = app.views.read().await;
    let r = views.rooms.get(&id).ok_or_else(|| MatrixError::not_found("fedlink does not know this room"))?;
    let join = app.joins.status(&id);
    Ok(Json(json!({
        "room_id": id,
        "room_version": r.version,
        "bot_membership": bot_state(&r.bot),
        "bot": r.bot,
        "join_attempts": join,
        "joined_via": r.joined_via,
        "events": r.event_count,
        "members": r.members,
        "joined_members": r.joined_members().collect::<Vec<_>>(),
        "receipts": r.receipts,
        "forward_extremities": r.extremities,
        "state_events": r.state.len(),
        "state": r.state,
        "pending_invites": r.pending_invites.iter().map(|(u, p)| (u.to_string(), p.event_id.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
        "failed_invites": r.failed_invites,
        "pending_actions": r.pending_actions,
        "blocked_actions": r.blocked_actions,
        "unsupported": r.unsupported,
        "threads": r.threads,
        "direct_invites": r.direct_invites,
        "direct_marked": r.direct_marked,
        "direct_failed": r.direct_failed,
    })))
}

fn change_error(e: crate::directory::ChangeError) -> MatrixError {
    use crate::{core::views::directory::DirectoryError, directory::ChangeError};
    match e {
        ChangeError::Directory(DirectoryError::Conflict { .. }) => MatrixError::new(StatusCode::CONFLICT, "M_CONFLICT", e.to_string()),
        ChangeError::Directory(_) | ChangeError::BadAccount(_) => MatrixError::invalid_param(e.to_string()),
        ChangeError::NoSuchPerson(_) => MatrixError::not_found(e.to_string()),
        ChangeError::Store(s) => s.into(),
    }
}

async fn persons(State(app): State<AppState>) -> Json<Value> {
    let views = app.views.read().await;
    Json(json!({ "persons": views.directory.persons.iter().map(|(id, p)| json!({
        "id": id, "accounts": p.accounts, "source": p.source, "opted_out": p.opted_out, "opted_out_rooms": p.opted_out_rooms,
    })).collect::<Vec<_>>() }))
}

async fn person(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, MatrixError> {
    let views = app.views.read().await;
    let p = views.directory.persons.get(&id).ok_or_else(|| MatrixError::not_found(format!("no person `{id}`")))?;
    let rooms: Vec<Value> = views
        .rooms
        .iter()
        .filter(|(_, r)| p.accounts.iter().any(|a| r.members.contains_key(a) || r.pending_invites.contains_key(a) || r.failed_invites.contains_key(a)))
        .map(|(room_id, r)| {
            // The same classification as `fedlink_persons` (core::step), for this room.
            let steps = crate::core::step::room_steps(&views, &app.routes, room_id, &p.accounts);
            let accounts: serde_json::Map<String, Value> = p
                .accounts
                .iter()
                .map(|a| {
                    (a.to_string(), json!({
                        "state": steps.get(a).map(|s| s.label()),
                        "membership": r.membership(a),
                        "invite_pending": r.pending_invites.get(a).map(|i| &i.event_id),
                        "invite_failed": r.failed_invites.get(a),
                        "read_receipt": r.receipts.get(a),
                        "thread_receipts": r.threads.iter().filter_map(|(root, t)| Some((root.to_string(), t.receipts.get(a)?))).collect::<std::collections::BTreeMap<_, _>>(),
                        "direct_listed": r.direct_marked.get(a),
                    }))
                })
                .collect();
            let direct_with = r.direct_partner(&p.accounts, &views.bot_user_id);
            let in_step = steps.values().all(|s| *s == crate::core::step::Step::InStep);
            json!({ "room_id": room_id, "in_step": in_step, "direct_with": direct_with, "accounts": accounts })
        })
        .collect();
    Ok(Json(json!({
        "id": id, "accounts": p.accounts, "source": p.source, "opted_out": p.opted_out,
        "opted_out_rooms": p.opted_out_rooms, "auto_join": p.auto_join, "rooms": rooms,
    })))
}

#[derive(serde::Deserialize)]
struct PersonBody {
    accounts: Vec<String>,
}

async fn put_person(State(app): State<AppState>, Path(id): Path<String>, body: Result<Json<PersonBody>, axum::extract::rejection::JsonRejection>) -> Result<Json<Value>, MatrixError> {
    let Json(body) = body.map_err(|e| MatrixError::bad_json(e.body_text()))?;
    let accounts = crate::directory::parse_accounts(&body.accounts).map_err(change_error)?;
    let changed = crate::directory::set_person(&app, &id, accounts, crate::core::log_entry::LinkSource::Admin).await.map_err(change_error)?;
    Ok(Json(json!({ "id": id, "changed": changed })))
}

async fn delete_person(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, MatrixError> {
    crate::directory::remove_person(&app, &id, crate::core::log_entry::LinkSource::Admin).await.map_err(change_error)?;
    Ok(Json(json!({})))
}

#[derive(serde::Deserialize)]
struct OptOutBody {
    opted_out: bool,
    #[serde(default)]
    room_id: Option<String>,
}

async fn put_opt_out(State(app): State<AppState>, Path(id): Path<String>, body: Result<Json<OptOutBody>, axum::extract::rejection::JsonRejection>) -> Result<Json<Value>, MatrixError> {
    let Json(body) = body.map_err(|e| MatrixError::bad_json(e.body_text()))?;
    let room = match body.room_id {
        Some(r) => Some(ruma::RoomId::parse(&r).map_err(|e| MatrixError::invalid_param(format!("bad room_id: {e}")))?),
        None => None,
    };
    crate::directory::opt_out(&app, &id, room, body.opted_out).await.map_err(change_error)?;
    Ok(Json(json!({})))
}

#[derive(serde::Deserialize)]
struct SettingsBody {
    auto_join: bool,
}

async fn put_settings(State(app): State<AppState>, Path(id): Path<String>, body: Result<Json<SettingsBody>, axum::extract::rejection::JsonRejection>) -> Result<Json<Value>, MatrixError> {
    let Json(body) = body.map_err(|e| MatrixError::bad_json(e.body_text()))?;
    crate::directory::set_settings(&app, &id, body.auto_join).await.map_err(change_error)?;
    Ok(Json(json!({})))
}

/// `POST /_fedlink/admin/v1/rooms/{roomId}/join`: try a given-up join again.
async fn retry_join(State(app): State<AppState>, Path(room_id): Path<String>) -> Result<Json<Value>, MatrixError> {
    let id = ruma::RoomId::parse(&room_id).map_err(|e| MatrixError::invalid_param(format!("bad room id: {e}")))?;
    let _lock = app.lock_ingest().await;
    let bot = app.views.read().await.rooms.get(&id).map(|r| r.bot.clone()).ok_or_else(|| MatrixError::not_found("fedlink does not know this room"))?;
    if !matches!(bot, BotMembership::JoinFailed { .. }) {
        return Err(MatrixError::new(axum::http::StatusCode::CONFLICT, "M_CONFLICT", format!("the bot's membership is `{}`; only a given-up join can be retried", bot_state(&bot))));
    }
    app.append(vec![crate::core::log_entry::Entry::BotJoinRetry(crate::core::log_entry::BotJoinRetry { room_id: id.clone() })], None).await?;
    app.store.flush().await?;
    app.keys.allow_refetch_now();
    app.joins.schedule(&id, 0);
    tracing::info!(room_id = %id, "an admin asked to retry a given-up join");
    Ok(Json(json!({ "bot_membership": "invited" })))
}

/// Every destination fedlink sends to: the outbox queues (`destinations`), and each queue's
/// per-destination lanes (`lanes.outbox`, `lanes.invites`, `lanes.actions`, `lanes.joins`:
/// failures, backoff, last error, whether busy), plus actions waiting for a homeserver.
async fn destinations(State(app): State<AppState>) -> Json<Value> {
    let mut v = crate::outbox::destinations_report(&app);
    v["lanes"] = json!({
        "outbox": app.outbox.lanes.report(),
        "invites": app.sync.invites.report(),
        "actions": app.sync.actions.report(),
        "joins": app.joins.lanes.report(),
    });
    v["actions_not_yet"] = json!(app.sync.not_yet_report());
    Json(v)
}

/// `GET /_fedlink/admin/v1/inbound`: per-origin requests in flight and 429s given.
async fn inbound(State(app): State<AppState>) -> Json<Value> {
    Json(app.inbound.report())
}

async fn retry_destination(State(app): State<AppState>, Path(dest): Path<String>) -> Result<Json<Value>, MatrixError> {
    let n = app.store.retry_dead_letters(&dest)?;
    app.outbox.lanes.contact(&dest);
    app.outbox.wake.notify_one();
    Ok(Json(json!({ "requeued": n })))
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_compare() {
        assert!(super::same(b"abc", b"abc"));
        assert!(!super::same(b"abc", b"abd"));
        assert!(!super::same(b"abc", b"ab"));
    }
}
