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

use crate::{app::Fedlink, core::views::BotMembership, federation::error::MatrixError};

type AppState = Arc<Fedlink>;

/// The metrics + admin router.
pub fn router(app: Arc<Fedlink>) -> Router {
    let admin = Router::new()
        .route("/_fedlink/admin/v1/status", get(status))
        .route("/_fedlink/admin/v1/rooms", get(rooms))
        .route("/_fedlink/admin/v1/rooms/{room_id}", get(room))
        .layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new().route("/metrics", get(metrics)).merge(admin).with_state(app)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
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

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render())
}

fn bot_state(b: &BotMembership) -> &'static str {
    match b {
        BotMembership::Invited { .. } => "invited",
        BotMembership::Joined => "joined",
        BotMembership::Left { .. } => "left",
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
        "rooms": views.rooms.len(),
        "storage_bytes": app.store.size_on_disk(),
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
    let join = app.joins.lock().expect("joins lock").get(&id).cloned();
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
        "state_events": r.state.values().map(|m| m.len()).sum::<usize>(),
    })))
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
