//! The federation HTTP server: routes, X-Matrix authentication of every request that needs
//! it (signature over the raw request target, destination check, allow-list), body limits,
//! and JSON errors for everything else.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, Path, Query, State},
    http::Uri,
    http::{HeaderMap, Method, StatusCode},
    routing::{get, put},
    Json, Router,
};
use ruma::canonical_json::CanonicalJsonObject;
use serde_json::{json, Value};

use super::{auth, error::MatrixError};
use crate::node::{now_ms, Fedlink};

type AppState = Arc<Fedlink>;

/// The federation router.
pub fn router(app: Arc<Fedlink>) -> Router {
    let limit = app.cfg.federation.max_request_bytes;
    Router::new()
        .route("/_matrix/key/v2/server", get(key_server))
        .route("/_matrix/key/v2/server/{key_id}", get(key_server))
        .route("/_matrix/federation/v1/version", get(version))
        .route("/_matrix/federation/v1/send/{txn_id}", put(send))
        .route("/_matrix/federation/v2/invite/{room_id}/{event_id}", put(invite))
        .route("/_matrix/federation/v1/query/profile", get(profile))
        .route("/_matrix/federation/v1/make_join/{room_id}/{user_id}", get(make_join))
        .route("/_matrix/federation/v2/send_join/{room_id}/{event_id}", put(send_join))
        .route("/_matrix/federation/v1/make_leave/{room_id}/{user_id}", get(make_leave))
        .route("/_matrix/federation/v2/send_leave/{room_id}/{event_id}", put(send_leave))
        .route("/_matrix/federation/v1/event/{event_id}", get(event))
        .route("/_matrix/federation/v1/event_auth/{room_id}/{event_id}", get(event_auth))
        .route("/_matrix/federation/v1/get_missing_events/{room_id}", axum::routing::post(get_missing_events))
        .route("/_matrix/federation/v1/backfill/{room_id}", get(backfill))
        .route("/_matrix/federation/v1/state_ids/{room_id}", get(state_ids))
        .route("/_matrix/federation/v1/state/{room_id}", get(state_full))
        .fallback(unrecognized)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(app)
}

async fn unrecognized(State(app): State<AppState>, method: Method, uri: Uri) -> MatrixError {
    app.metrics.requests_rejected.with_label_values(&["unrecognized"]).inc();
    tracing::debug!(%method, uri = %uri, "unrecognized federation request");
    MatrixError::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "unrecognized request")
}

/// In-flight inbound requests per authenticated origin, bounded (Synapse's
/// `rc_federation.concurrent` is the model): one busy or hostile server cannot take all of
/// fedlink's request handling.
pub struct InboundLimit {
    max: usize,
    inflight: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Requests refused per origin since start (for the admin API).
    limited: std::sync::Mutex<BTreeMap<String, u64>>,
}

/// How long a rate-limited origin is asked to wait.
pub const RETRY_AFTER_MS: u64 = 500;

impl InboundLimit {
    /// At most `max` requests in flight per origin.
    pub fn new(max: usize) -> Self {
        Self { max, inflight: Default::default(), limited: Default::default() }
    }

    fn acquire(self: &Arc<Self>, origin: &str) -> Option<Inflight> {
        let mut m = self.inflight.lock().expect("inflight lock");
        let n = m.entry(origin.to_owned()).or_insert(0);
        if *n >= self.max {
            drop(m);
            *self.limited.lock().expect("limited lock").entry(origin.to_owned()).or_insert(0) += 1;
            return None;
        }
        *n += 1;
        Some(Inflight { limit: self.clone(), origin: origin.to_owned() })
    }

    /// Origins refused with 429 and how often, with what each has in flight now.
    pub fn report(&self) -> Value {
        let inflight = self.inflight.lock().expect("inflight lock").clone();
        let limited = self.limited.lock().expect("limited lock").clone();
        json!({ "max_inflight_per_origin": self.max, "rate_limited": limited, "inflight": inflight.into_iter().filter(|(_, n)| *n > 0).collect::<BTreeMap<_, _>>() })
    }
}

/// One request in flight; released on drop.
pub struct Inflight {
    limit: Arc<InboundLimit>,
    origin: String,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        let mut m = self.limit.inflight.lock().expect("inflight lock");
        if let Some(n) = m.get_mut(&self.origin) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.origin);
            }
        }
    }
}

/// A verified origin, holding its slot of the per-origin limit while the request runs.
pub struct Origin {
    name: String,
    _slot: Inflight,
}

impl std::ops::Deref for Origin {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

/// Authenticate a request; returns the verified origin, or 429 when it has too many
/// requests in flight. A backed-off destination that contacts fedlink is woken.
pub async fn authenticate(
    app: &Fedlink,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Origin, MatrixError> {
    let reject = |reason: &'static str, err: MatrixError| {
        app.metrics.requests_rejected.with_label_values(&[reason]).inc();
        tracing::info!(reason, error = %err.message, uri = %uri.path(), "refused federation request");
        err
    };
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| reject("missing_auth", MatrixError::unauthorized("missing X-Matrix authorization")))?;
    let x = auth::parse_header(header).map_err(|e| reject("malformed_auth", MatrixError::unauthorized(e.to_string())))?;
    if let Some(d) = &x.destination {
        if d != app.server_name.as_str() {
            return Err(reject("wrong_destination", MatrixError::unauthorized(format!("this server is {}, not {d}", app.server_name))));
        }
    }
    if ruma::ServerName::parse(&x.origin).is_err() {
        return Err(reject("malformed_auth", MatrixError::unauthorized("origin is not a server name")));
    }
    if !app.cfg.is_allowed(&x.origin) {
        return Err(reject("not_allowed", MatrixError::forbidden(format!("{} is not allowed to federate with this server", x.origin))));
    }
    let content = auth::body_value(body).map_err(|e| reject("bad_body", MatrixError::bad_json(e.to_string())))?;
    let keys = app
        .keys
        .keys(&x.origin, std::slice::from_ref(&x.key), now_ms())
        .await
        .map_err(|e| {
            tracing::debug!(origin = %x.origin, error = ?e, "no key for an inbound request");
            reject("unknown_key", MatrixError::unauthorized(e.to_string()))
        })?;
    let public = keys.get(&x.key).map(|k| k.encode()).unwrap_or_default();
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    auth::verify_request(&x, &public, app.server_name.as_str(), method.as_str(), target, content.as_ref())
        .map_err(|e| reject("bad_signature", MatrixError::unauthorized(e.to_string())))?;
    app.outbox.lanes.contact(&x.origin);
    app.sync.invites.contact(&x.origin);
    app.joins.contact(&x.origin);
    let Some(slot) = app.inbound.acquire(&x.origin) else {
        app.metrics.inbound_rate_limited.inc();
        tracing::info!(origin = %x.origin, uri = %uri.path(), "too many requests in flight from this origin; answered 429");
        return Err(MatrixError::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", "too many requests in flight from your server")
            .with("retry_after_ms", json!(RETRY_AFTER_MS)));
    };
    Ok(Origin { name: x.origin, _slot: slot })
}

fn body_or_413(app: &Fedlink, body: Result<Bytes, BytesRejection>) -> Result<Bytes, MatrixError> {
    body.map_err(|e| {
        app.metrics.requests_rejected.with_label_values(&["too_large"]).inc();
        MatrixError::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", e.body_text())
    })
}

fn parse_json(body: &[u8]) -> Result<Value, MatrixError> {
    serde_json::from_slice(body).map_err(|e| MatrixError::bad_json(format!("body is not JSON: {e}")))
}

/// `GET /_matrix/key/v2/server`: our key, self-signed.
async fn key_server(State(app): State<AppState>) -> Json<Value> {
    Json(key_document(&app))
}

/// The signed key document.
pub fn key_document(app: &Fedlink) -> Value {
    let valid_until = now_ms() + app.cfg.keys.validity_hours * 3600 * 1000;
    let doc = json!({
        "server_name": app.server_name.as_str(),
        "valid_until_ts": valid_until,
        "verify_keys": { app.key.key_id(): { "key": app.key.public_key_base64() } },
        "old_verify_keys": {},
    });
    let mut obj: CanonicalJsonObject = crate::core::pdu::canonical_object(doc).expect("key document is canonical");
    ruma::signatures::sign_json(app.server_name.as_str(), &*app.key, &mut obj).expect("key document signs");
    serde_json::to_value(obj).expect("serializes")
}

async fn version() -> Json<Value> {
    Json(json!({ "server": { "name": "fedlink", "version": env!("CARGO_PKG_VERSION") } }))
}

async fn send(
    State(app): State<AppState>,
    Path(txn_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, MatrixError> {
    let body = body_or_413(&app, body)?;
    let origin = authenticate(&app, &method, &uri, &headers, &body).await?;
    super::send::handle_send(&app, &origin, &txn_id, &body).await.map(Json)
}

async fn invite(
    State(app): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, MatrixError> {
    let body = body_or_413(&app, body)?;
    let origin = authenticate(&app, &method, &uri, &headers, &body).await?;
    let value = parse_json(&body)?;
    super::membership::handle_invite(&app, &origin, &room_id, &event_id, value).await.map(Json)
}

async fn profile(
    State(app): State<AppState>,
    Query(q): Query<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, MatrixError> {
    authenticate(&app, &method, &uri, &headers, &[]).await?;
    let user = q.get("user_id").ok_or_else(|| MatrixError::invalid_param("user_id is required"))?;
    if user != app.bot.as_str() {
        return Err(MatrixError::not_found("no such user"));
    }
    let name = app.cfg.bot.displayname.clone();
    Ok(Json(match q.get("field").map(String::as_str) {
        Some("displayname") => json!({ "displayname": name }),
        Some("avatar_url") => json!({}),
        None => json!({ "displayname": name }),
        Some(_) => return Err(MatrixError::invalid_param("unknown profile field")),
    }))
}

/// All values of query parameter `key` (repeated keys kept), percent-decoded.
fn query_all(uri: &Uri, key: &str) -> Vec<String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned())
        .collect()
}

/// An authenticated request: the origin and the raw body.
struct Authed {
    origin: Origin,
    body: Bytes,
}

async fn authed(app: &Fedlink, method: &Method, uri: &Uri, headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Authed, MatrixError> {
    let body = body_or_413(app, body)?;
    let origin = authenticate(app, method, uri, headers, &body).await?;
    Ok(Authed { origin, body })
}

async fn make_join(
    State(app): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, Ok(Bytes::new())).await?;
    let vers = query_all(&uri, "ver");
    super::resident::make_membership(&app, &a.origin, &room_id, &user_id, "join", &vers).await.map(Json)
}

async fn make_leave(
    State(app): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, Ok(Bytes::new())).await?;
    super::resident::make_membership(&app, &a.origin, &room_id, &user_id, "leave", &[]).await.map(Json)
}

async fn send_join(
    State(app): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, body).await?;
    let v = parse_json(&a.body)?;
    super::resident::send_membership(&app, &a.origin, &room_id, &event_id, v, "join").await.map(Json)
}

async fn send_leave(
    State(app): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, body).await?;
    let v = parse_json(&a.body)?;
    super::resident::send_membership(&app, &a.origin, &room_id, &event_id, v, "leave").await.map(Json)
}

async fn event(
    State(app): State<AppState>,
    Path(event_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, Ok(Bytes::new())).await?;
    super::resident::event(&app, &a.origin, &event_id).await.map(Json)
}

async fn event_auth(
    State(app): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, Ok(Bytes::new())).await?;
    super::resident::event_auth(&app, &a.origin, &room_id, &event_id).await.map(Json)
}

async fn get_missing_events(
    State(app): State<AppState>,
    Path(room_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, body).await?;
    let v = parse_json(&a.body)?;
    super::resident::get_missing_events(&app, &a.origin, &room_id, v).await.map(Json)
}

async fn backfill(
    State(app): State<AppState>,
    Path(room_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, Ok(Bytes::new())).await?;
    let from = query_all(&uri, "v");
    let limit = query_all(&uri, "limit").first().and_then(|l| l.parse().ok()).unwrap_or(10);
    super::resident::backfill(&app, &a.origin, &room_id, &from, limit).await.map(Json)
}

async fn state_ids(
    State(app): State<AppState>,
    Path(room_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, Ok(Bytes::new())).await?;
    let event_id = query_all(&uri, "event_id").pop().ok_or_else(|| MatrixError::invalid_param("event_id is required"))?;
    super::resident::state(&app, &a.origin, &room_id, &event_id, false).await.map(Json)
}

async fn state_full(
    State(app): State<AppState>,
    Path(room_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, MatrixError> {
    let a = authed(&app, &method, &uri, &headers, Ok(Bytes::new())).await?;
    let event_id = query_all(&uri, "event_id").pop().ok_or_else(|| MatrixError::invalid_param("event_id is required"))?;
    super::resident::state(&app, &a.origin, &room_id, &event_id, true).await.map(Json)
}
