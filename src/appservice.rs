//! The application-service route: fedlink registered on a homeserver (one YAML file, no
//! plugin) may act as that homeserver's users. This module generates the registration,
//! serves the appservice API the homeserver pushes to, and performs actions as users with
//! `?user_id=` (spec: identity assertion).
//!
//! Served (on the metrics/admin listener, plain HTTP; authenticated by `hs_token`):
//! - `PUT /_matrix/app/v1/transactions/{txnId}`: receipts (`ephemeral`) and presence go
//!   into the log, durably, before the 200; retransmits are answered without re-applying.
//! - `GET /_matrix/app/v1/users/{userId}`, `GET /_matrix/app/v1/rooms/{alias}`: "not mine".

use std::time::Duration;

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    Json,
};
use reqwest::Method;
use ruma::{OwnedServerName, RoomId, UserId};
use serde_json::{json, Value};

use crate::{
    node::Fedlink,
    config::{AppserviceConfig, Config},
    core::log_entry::{Entry, PresenceEntry, ReceiptEntry, UserAction},
    federation::{client::enc, error::MatrixError},
};

/// The registration YAML for `server`'s homeserver.
pub fn registration_yaml(cfg: &Config, server: &str) -> Result<String, String> {
    let a = cfg
        .appservice
        .iter()
        .find(|a| a.server_name == server)
        .ok_or_else(|| format!("no [[appservice]] with server_name = \"{server}\" in the config"))?;
    let url = cfg.appservice_endpoint.url.clone().unwrap_or_else(|| format!("http://{}", cfg.listen.metrics));
    let q = |s: &str| serde_json::to_string(s).expect("strings serialize");
    Ok(format!(
        "# Application-service registration for fedlink on {server}.\n\
         # Add this file to the homeserver's `app_service_config_files` and restart it.\n\
         id: {id}\n\
         url: {url}\n\
         as_token: {as_token}\n\
         hs_token: {hs_token}\n\
         sender_localpart: {sender}\n\
         namespaces:\n\
         \x20 users:\n\
         \x20   - regex: {regex}\n\
         \x20     exclusive: false\n\
         \x20 rooms: []\n\
         \x20 aliases: []\n\
         rate_limited: false\n\
         receive_ephemeral: true\n",
        id = q(&format!("fedlink-{}", cfg.server_name)),
        url = q(&url),
        as_token = q(&a.as_token),
        hs_token = q(&a.hs_token),
        sender = q(&a.sender_localpart),
        regex = q(&a.regex()),
    ))
}

/// Why an action failed.
#[derive(Debug)]
pub enum ActionError {
    /// Network, 429 or 5xx: the homeserver is in trouble; back it off.
    Transient(String),
    /// The homeserver answered but cannot do it yet (it lacks the event): retry this action
    /// later without holding others.
    NotYet(String),
    /// Refused: retrying will not help.
    Refused(String),
}

/// The HTTP clients of the registration route, one per homeserver: TLS to its `client_url`
/// is verified against the system's and the built-in (Mozilla) roots plus the registration's `ca_file` (else
/// `federation.ca_file`), unless `federation.verify_tls = false`.
pub fn clients(cfg: &Config) -> anyhow::Result<std::collections::HashMap<String, reqwest::Client>> {
    let mut out = std::collections::HashMap::new();
    for (i, a) in cfg.appservice.iter().enumerate() {
        let (key, ca) = match (&a.ca_file, &cfg.federation.ca_file) {
            (Some(ca), _) => (format!("appservice[{i}].ca_file"), Some(ca)),
            (None, Some(ca)) => ("federation.ca_file".to_owned(), Some(ca)),
            (None, None) => (String::new(), None),
        };
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("fedlink/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(!cfg.federation.verify_tls);
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("{key} {}: {e}", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| anyhow::anyhow!("{key} {}: {e}", ca.display()))? {
                b = b.add_root_certificate(cert);
            }
        }
        if !cfg.federation.verify_tls && a.client_url.starts_with("https:") {
            tracing::warn!(server = %a.server_name, client_url = %a.client_url, "TLS certificates of this registration's client API are not checked (federation.verify_tls = false)");
        }
        out.insert(a.server_name.clone(), b.build().map_err(|e| anyhow::anyhow!("appservice[{i}]: {}", crate::federation::client::error_chain(&e)))?);
    }
    Ok(out)
}

/// The registration route's client for `reg`'s homeserver.
fn http<'a>(app: &'a Fedlink, reg: &AppserviceConfig) -> &'a reqwest::Client {
    app.appservice_http.get(&reg.server_name).expect("a client for every registration is built at start")
}

fn registration_for<'a>(app: &'a Fedlink, user: &UserId) -> Option<&'a AppserviceConfig> {
    app.cfg.appservice.iter().find(|a| a.server_name == user.server_name().as_str())
}

/// Perform `action` as its user through the user's homeserver.
pub async fn perform(app: &Fedlink, action: &UserAction) -> Result<(), ActionError> {
    // An invite is performed by the inviting sibling, on its own homeserver.
    let acting = match (&action.actor, action.kind.as_str()) {
        (Some(actor), "invite") => actor,
        _ => &action.user_id,
    };
    let reg = registration_for(app, acting).ok_or_else(|| ActionError::Refused("no registration for this homeserver".into()))?;
    let client = Client { reg, http: http(app, reg), user: acting.as_str() };
    let room = enc(action.room_id.as_str());
    let target = enc(action.user_id.as_str());
    let read_event = || action.event_id.as_ref().ok_or_else(|| ActionError::Refused("a read without an event".into()));
    let (method, path, body) = match action.kind.as_str() {
        "read" => {
            let event = read_event()?;
            // A read of the main timeline never lands on an event in a thread: that would
            // mark every earlier message of the room read.
            if let Some(root) = client.thread_of(&action.room_id, event).await? {
                return Err(ActionError::Refused(format!("{event} is in thread {root}, not the main timeline")));
            }
            // The receipt of the main timeline only (`/read_markers` would set an
            // unthreaded one, which also reads every thread up to here), then the read
            // marker ("new messages" line), which the homeserver never moves backwards.
            // Both are idempotent: a retry after a failure in between repeats both.
            client.send(Method::POST, &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{}", enc(event.as_str())), &json!({ "thread_id": "main" })).await?;
            (Method::POST, format!("/_matrix/client/v3/rooms/{room}/read_markers"), json!({ "m.fully_read": event }))
        }
        "thread_read" => {
            let event = read_event()?;
            let root = action.thread_id.as_ref().ok_or_else(|| ActionError::Refused("a thread read without a thread".into()))?;
            client.thread_of(&action.room_id, event).await?;
            (Method::POST, format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{}", enc(event.as_str())), json!({ "thread_id": root }))
        }
        "join" => (Method::POST, format!("/_matrix/client/v3/join/{room}"), json!({})),
        "leave" => (Method::POST, format!("/_matrix/client/v3/rooms/{room}/leave"), json!({})),
        // A direct-chat invite carries `is_direct`, which `/invite` cannot: the member
        // event is sent as state.
        "invite" if action.partner.is_some() => {
            (Method::PUT, format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{target}"), json!({ "membership": "invite", "is_direct": true }))
        }
        "invite" => (Method::POST, format!("/_matrix/client/v3/rooms/{room}/invite"), json!({ "user_id": action.user_id })),
        "direct" => {
            let partner = action.partner.as_ref().ok_or_else(|| ActionError::Refused("a direct chat without a partner".into()))?;
            let path = format!("/_matrix/client/v3/user/{target}/account_data/m.direct");
            let current = client.get_json(&path, true).await?.unwrap_or_else(|| json!({}));
            match merge_direct(&current, partner, &action.room_id) {
                Ok(None) => return Ok(()),
                Ok(Some(merged)) => (Method::PUT, path, merged),
                Err(e) => return Err(ActionError::Refused(e)),
            }
        }
        other => return Err(ActionError::Refused(format!("unknown action {other}"))),
    };
    client.send(method, &path, &body).await
}

/// `user`'s `m.direct` content with `room` listed under `partner`, or `None` when it is
/// already there. Everything else the client wrote is kept as it was. Pure.
pub fn merge_direct(current: &Value, partner: &UserId, room: &RoomId) -> Result<Option<Value>, String> {
    let mut map = match current {
        Value::Object(m) => m.clone(),
        _ => return Err("m.direct is not a JSON object; left as it is".into()),
    };
    let rooms = map.entry(partner.as_str()).or_insert_with(|| json!([]));
    let Value::Array(list) = rooms else { return Err(format!("m.direct lists {partner} with something other than an array; left as it is")) };
    if list.iter().any(|r| r.as_str() == Some(room.as_str())) {
        return Ok(None);
    }
    list.push(json!(room));
    Ok(Some(Value::Object(map)))
}

/// A homeserver's client API, as one of its users, through fedlink's registration.
struct Client<'a> {
    reg: &'a AppserviceConfig,
    http: &'a reqwest::Client,
    user: &'a str,
}

impl Client<'_> {
    fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{}{path}{sep}user_id={}", self.reg.client_url.trim_end_matches('/'), enc(self.user))
    }

    fn fail(&self, status: reqwest::StatusCode, body: &[u8]) -> ActionError {
        let text = format!("{} answered {status}: {}", self.reg.server_name, String::from_utf8_lossy(body));
        if status.as_u16() == 429 || status.is_server_error() {
            ActionError::Transient(text)
        } else {
            ActionError::Refused(text)
        }
    }

    /// `GET path`: its JSON, or `None` on 404 when `missing_ok`.
    async fn get_json(&self, path: &str, missing_ok: bool) -> Result<Option<Value>, ActionError> {
        let resp = self.http.get(self.url(path)).bearer_auth(&self.reg.as_token).send().await.map_err(|e| ActionError::Transient(crate::federation::client::error_chain(&e)))?;
        let status = resp.status();
        // What one user's data holds is that item's problem, not the homeserver's: an
        // oversized or unreadable answer refuses this action only.
        let body = crate::federation::client::read_capped(resp, 1024 * 1024).await.map_err(|e| {
            let text = format!("{} answered {path}: {e}", self.reg.server_name);
            if e.starts_with(crate::federation::client::TOO_LARGE) { ActionError::Refused(text) } else { ActionError::Transient(text) }
        })?;
        if status.as_u16() == 404 && missing_ok {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.fail(status, &body));
        }
        serde_json::from_slice(&body).map(Some).map_err(|e| ActionError::Refused(format!("{} answered {path} with bad JSON: {e}", self.reg.server_name)))
    }

    async fn send(&self, method: Method, path: &str, body: &Value) -> Result<(), ActionError> {
        let resp = self.http.request(method, self.url(path)).bearer_auth(&self.reg.as_token).json(body).send().await.map_err(|e| ActionError::Transient(crate::federation::client::error_chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = crate::federation::client::read_capped(resp, 4096).await.unwrap_or_default();
        Err(self.fail(status, &body))
    }

    /// `event` as the homeserver shows it to the user, waiting at most `timeout` (else the
    /// client's). Until the event has reached the homeserver, [`ActionError::NotYet`].
    async fn event(&self, room: &RoomId, event: &ruma::EventId, timeout: Option<Duration>) -> Result<Value, ActionError> {
        let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room.as_str()), enc(event.as_str()));
        let mut req = self.http.get(self.url(&path)).bearer_auth(&self.reg.as_token);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(|e| ActionError::Transient(crate::federation::client::error_chain(&e)))?;
        let status = resp.status();
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(ActionError::Transient(format!("{} answered {status}", self.reg.server_name)));
        }
        if !status.is_success() {
            return Err(ActionError::NotYet(format!("{} does not have {event} yet ({status})", self.reg.server_name)));
        }
        let body = crate::federation::client::read_capped(resp, 256 * 1024).await.map_err(|e| ActionError::Transient(e.to_string()))?;
        serde_json::from_slice(&body).map_err(|e| ActionError::Transient(format!("bad event JSON: {e}")))
    }

    /// The thread `event` belongs to, as the homeserver shows it to the user. A homeserver
    /// answers 200 to a receipt for an event it does not have yet, and drops it: until the
    /// event has reached it, this is [`ActionError::NotYet`].
    async fn thread_of(&self, room: &RoomId, event: &ruma::EventId) -> Result<Option<ruma::OwnedEventId>, ActionError> {
        Ok(crate::core::log_entry::thread_root(&self.event(room, event, None).await?))
    }
}

/// Set `user`'s presence through its homeserver's registration.
pub async fn set_presence(app: &Fedlink, user: &UserId, presence: &str) -> Result<(), ActionError> {
    let reg = registration_for(app, user).ok_or_else(|| ActionError::Refused("no registration for this homeserver".into()))?;
    let url = format!(
        "{}/_matrix/client/v3/presence/{}/status?user_id={}",
        reg.client_url.trim_end_matches('/'),
        enc(user.as_str()),
        enc(user.as_str())
    );
    let resp = http(app, reg).put(&url).bearer_auth(&reg.as_token).json(&json!({ "presence": presence })).send().await.map_err(|e| ActionError::Transient(crate::federation::client::error_chain(&e)))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(ActionError::Refused(format!("{} answered {}", reg.server_name, resp.status())))
    }
}

/// Most ephemeral items and most room events one registration push may carry (Synapse sends
/// at most 100 of each); a larger push is refused whole.
pub const MAX_PUSH_ITEMS: usize = 1000;

/// A public read receipt pushed by a homeserver, for one of its own users.
#[derive(Debug, Clone, PartialEq)]
pub struct PushedReceipt {
    /// The room.
    pub room_id: ruma::OwnedRoomId,
    /// The event read up to.
    pub event_id: ruma::OwnedEventId,
    /// Who read (a user of the pushing homeserver).
    pub user_id: ruma::OwnedUserId,
    /// The receipt's timestamp.
    pub ts: Option<u64>,
    /// Thread id, when the homeserver kept it.
    pub thread_id: Option<String>,
}

/// A registration push, parsed and cut down to what the pushing homeserver may speak for:
/// its own users' reads, presence, memberships and messages. Pure.
#[derive(Debug, Default)]
pub struct Push {
    /// Public read receipts (`m.read`; private ones stay private).
    pub receipts: Vec<PushedReceipt>,
    /// Presence of the homeserver's users: (user, presence, last_active_ago).
    pub presence: Vec<(ruma::OwnedUserId, String, Option<u64>)>,
    /// Membership changes of the homeserver's users and messages they sent, in push order.
    pub events: Vec<crate::core::log_entry::ClientEventEntry>,
    /// Items dropped because they spoke for another server's users.
    pub foreign: usize,
}

/// Parse a registration push from `server`'s homeserver. A homeserver speaks only for its
/// own users: a receipt, presence, membership (by its target) or message (by its sender) of
/// another server's user is dropped and counted in [`Push::foreign`]; malformed items are
/// skipped; a body that is not a JSON object, or carries more than [`MAX_PUSH_ITEMS`]
/// ephemeral items or events, is refused.
pub fn parse_push(server: &ruma::ServerName, body: &[u8]) -> Result<Push, MatrixError> {
    let body: Value = serde_json::from_slice(body).map_err(|e| MatrixError::bad_json(format!("body is not JSON: {e}")))?;
    let body = body.as_object().ok_or_else(|| MatrixError::bad_json("transaction must be a JSON object"))?;
    let list = |k: &str| -> Result<&[Value], MatrixError> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(a)) if a.len() <= MAX_PUSH_ITEMS => Ok(a.as_slice()),
            Some(Value::Array(a)) => Err(MatrixError::bad_json(format!("`{k}` has {} items; at most {MAX_PUSH_ITEMS} are allowed", a.len()))),
            Some(_) => Err(MatrixError::bad_json(format!("`{k}` must be an array"))),
        }
    };
    let ephemeral = if body.contains_key("ephemeral") { list("ephemeral")? } else { list("de.sorunome.msc2409.ephemeral")? };
    let events = list("events")?;
    let mut push = Push::default();
    let own = |u: &ruma::UserId, push: &mut Push| {
        let mine = u.server_name() == server;
        if !mine {
            push.foreign += 1;
        }
        mine
    };
    for edu in ephemeral {
        match edu.get("type").and_then(Value::as_str) {
            Some("m.receipt") => {
                let Some(room_id) = edu.get("room_id").and_then(Value::as_str).and_then(|r| RoomId::parse(r).ok()) else { continue };
                let Some(content) = edu.get("content").and_then(Value::as_object) else { continue };
                for (event, by_type) in content {
                    // Only public read receipts spread; m.read.private stays private.
                    let Some(users) = by_type.get("m.read").and_then(Value::as_object) else { continue };
                    let Ok(event_id) = ruma::EventId::parse(event) else { continue };
                    for (user, data) in users {
                        let Ok(user_id) = UserId::parse(user) else { continue };
                        if !own(&user_id, &mut push) {
                            continue;
                        }
                        push.receipts.push(PushedReceipt {
                            room_id: room_id.clone(),
                            event_id: event_id.clone(),
                            user_id,
                            ts: data.get("ts").and_then(Value::as_u64),
                            thread_id: data.get("thread_id").and_then(Value::as_str).map(String::from),
                        });
                    }
                }
            }
            Some("m.presence") => {
                let (Some(user), Some(presence)) = (
                    edu.get("sender").and_then(Value::as_str).and_then(|u| UserId::parse(u).ok()),
                    edu.get("content").and_then(|c| c.get("presence")).and_then(Value::as_str),
                ) else {
                    continue;
                };
                if !matches!(presence, "online" | "unavailable" | "offline") || !own(&user, &mut push) {
                    continue;
                }
                let ago = edu.get("content").and_then(|c| c.get("last_active_ago")).and_then(Value::as_u64);
                push.presence.push((user, presence.to_owned(), ago));
            }
            _ => {}
        }
    }
    for ev in events {
        let Some(c) = client_event(ev, server) else { continue };
        // A membership is spoken for by its target's server, a message by its sender's.
        let speaker = match &c.state_key {
            Some(sk) => match UserId::parse(sk.as_str()) {
                Ok(u) => u,
                Err(_) => continue,
            },
            None => c.sender.clone(),
        };
        if own(&speaker, &mut push) {
            push.events.push(c);
        }
    }
    Ok(push)
}

/// The record of a pushed room event fedlink follows: a membership change, or a send (any
/// non-state event: messages, encrypted messages, reactions...; sending counts as reading).
/// Other state events, or anything malformed, give `None`.
fn client_event(ev: &Value, server: &ruma::ServerName) -> Option<crate::core::log_entry::ClientEventEntry> {
    let event_type = ev.get("type").and_then(Value::as_str)?;
    let (state_key, membership) = match event_type {
        "m.room.member" => (
            Some(ev.get("state_key").and_then(Value::as_str)?.to_owned()),
            Some(ev.get("content").and_then(|c| c.get("membership")).and_then(Value::as_str)?.to_owned()),
        ),
        _ if ev.get("state_key").is_none() => (None, None),
        _ => return None,
    };
    let thread_root = if state_key.is_none() { crate::core::log_entry::thread_root(ev) } else { None };
    let is_direct = membership.as_deref() == Some("invite") && ev.get("content").and_then(|c| c.get("is_direct")).and_then(Value::as_bool) == Some(true);
    Some(crate::core::log_entry::ClientEventEntry {
        via: server.to_owned(),
        room_id: RoomId::parse(ev.get("room_id").and_then(Value::as_str)?).ok()?,
        event_id: ruma::EventId::parse(ev.get("event_id").and_then(Value::as_str)?).ok()?,
        sender: UserId::parse(ev.get("sender").and_then(Value::as_str)?).ok()?,
        event_type: event_type.to_owned(),
        state_key,
        membership,
        origin_server_ts: ev.get("origin_server_ts").and_then(Value::as_u64),
        is_direct,
        thread_root,
    })
}

/// What a receipt needs of an event fedlink does not hold: its `origin_server_ts` (the
/// fallback order) and its thread.
struct EventMeta {
    ts: Option<u64>,
    thread: Option<ruma::OwnedEventId>,
}

/// [`EventMeta`] of `event` as the homeserver shows it to `user`, waiting at most 5 s (a
/// push is answered only after this).
async fn fetch_event_meta(client: &Client<'_>, room: &RoomId, event: &ruma::EventId) -> Result<EventMeta, ActionError> {
    let ev = client.event(room, event, Some(Duration::from_secs(5))).await?;
    Ok(EventMeta { ts: ev.get("origin_server_ts").and_then(Value::as_u64), thread: crate::core::log_entry::thread_root(&ev) })
}

/// Which registration a request comes from (by its `hs_token`).
fn authenticate<'a>(app: &'a Fedlink, headers: &HeaderMap, query: &std::collections::BTreeMap<String, String>) -> Result<&'a AppserviceConfig, MatrixError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_owned)
        .or_else(|| query.get("access_token").cloned())
        .ok_or_else(|| MatrixError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "missing hs_token"))?;
    app.cfg
        .appservice
        .iter()
        .find(|a| crate::admin::same(a.hs_token.as_bytes(), token.as_bytes()))
        .ok_or_else(|| {
            app.metrics.appservice_transactions.with_label_values(&["unauthorized"]).inc();
            MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "unknown hs_token")
        })
}

/// `PUT /_matrix/app/v1/transactions/{txnId}`
pub async fn transaction(
    State(app): State<std::sync::Arc<Fedlink>>,
    Path(txn_id): Path<String>,
    Query(query): Query<std::collections::BTreeMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, MatrixError> {
    let reg = authenticate(&app, &headers, &query)?;
    // The homeserver is up: retry its backed-off actions now.
    app.sync.actions.contact(&reg.server_name);
    let origin = format!("appservice:{}", reg.server_name);
    let server: OwnedServerName = reg.server_name.as_str().try_into().map_err(|_| MatrixError::internal("bad server name in config"))?;
    let push = parse_push(&server, &body).inspect_err(|_| {
        app.metrics.appservice_transactions.with_label_values(&["rejected"]).inc();
    })?;
    if push.foreign > 0 {
        app.metrics.appservice_foreign_items.inc_by(push.foreign as u64);
        tracing::warn!(server = %reg.server_name, %txn_id, dropped = push.foreign, "registration push spoke for other servers' users; dropped those items");
    }
    // Where fedlink does not hold a read event, ask the homeserver for its timestamp (the
    // fallback order) and its thread (the push drops a receipt's `thread_id`), before
    // taking any lock; only for linked accounts' reads, at most 50 events per push.
    let mut fetched: std::collections::HashMap<ruma::OwnedEventId, EventMeta> = std::collections::HashMap::new();
    let wanted: Vec<&PushedReceipt> = {
        let views = app.views.read().await;
        push.receipts.iter().filter(|r| views.directory.by_account.contains_key(&r.user_id)).collect()
    };
    for r in wanted {
        if fetched.len() >= 50 || fetched.contains_key(&r.event_id) || app.store.has_event(r.event_id.as_str()).unwrap_or(true) {
            continue;
        }
        let client = Client { reg, http: http(&app, reg), user: r.user_id.as_str() };
        match fetch_event_meta(&client, &r.room_id, &r.event_id).await {
            Ok(meta) => {
                fetched.insert(r.event_id.clone(), meta);
            }
            Err(e) => tracing::warn!(server = %reg.server_name, room_id = %r.room_id, event_id = %r.event_id, error = ?e, "cannot fetch a read event from its homeserver; its thread and time are unknown"),
        }
    }
    let _lock = app.lock_ingest().await;
    if app.store.txn_response(&origin, &txn_id)?.is_some() {
        app.store.flush().await?;
        app.metrics.appservice_transactions.with_label_values(&["retransmit"]).inc();
        return Ok(Json(json!({})));
    }
    let mut entries = Vec::new();
    {
        let views = app.views.read().await;
        let linked = |u: &UserId| views.directory.by_account.contains_key(u);
        let (mut not_linked, mut receipts_not_linked) = (0u64, 0u64);
        for r in push.receipts {
            // Only linked accounts' reads matter (views keep reads to move siblings).
            if !linked(&r.user_id) {
                receipts_not_linked += 1;
                continue;
            }
            // Rooms the bot is in, and rooms known only through registrations.
            if !views.rooms.get(&r.room_id).is_some_and(|room| room.bot_joined() || room.bot == crate::core::views::BotMembership::Absent) {
                continue;
            }
            let stored = app.store.get_event(r.event_id.as_str()).ok().flatten().filter(|e| e.room_id == r.room_id);
            let depth = stored.as_ref().map(|e| e.depth);
            let (event_ts, thread) = match &stored {
                Some(e) => (Some(e.origin_server_ts), crate::core::log_entry::thread_root(&e.pdu)),
                None => fetched.get(&r.event_id).map(|m| (m.ts, m.thread.clone())).unwrap_or((None, None)),
            };
            // Synapse's pushes drop a receipt's thread id: a read of an event in a thread is
            // a read of that thread.
            let (thread_id, thread_inferred) = match (r.thread_id, thread) {
                (Some(t), _) => (Some(t), false),
                (None, Some(root)) => (Some(root.to_string()), true),
                (None, None) => (None, false),
            };
            app.metrics.receipts_in.with_label_values(&["appservice"]).inc();
            entries.push(Entry::Receipt(ReceiptEntry {
                origin: server.clone(),
                room_id: r.room_id,
                receipt_type: "m.read".into(),
                user_id: r.user_id,
                event_id: r.event_id,
                ts: r.ts,
                thread_id,
                thread_inferred,
                depth,
                event_ts,
                via_appservice: Some(true),
            }));
        }
        // Presence matters only for linked accounts (presence following).
        for (user_id, presence, last_active_ago) in push.presence {
            if views.directory.by_account.contains_key(&user_id) {
                entries.push(Entry::Presence(PresenceEntry { origin: server.clone(), user_id, presence, last_active_ago }));
            }
        }
        // Memberships and sends of rooms the bot is not in: the registration route's view.
        // In rooms the bot is in, its verified PDUs are the truth and folding ignores pushed
        // events, so they are not logged at all (the log does not carry a homeserver's
        // traffic twice).
        // Only linked accounts' sends are logged: a homeserver pushing all its traffic does
        // not grow the log with its messages. Rooms an account joined before fedlink's
        // registration was installed are caught up at link time (`catch_up_worker`).
        let (mut bot_in_room, mut unchanged, mut stale) = (0u64, 0u64, 0u64);
        let received_ms = crate::node::now_ms();
        // Memberships taken earlier in this push: a leave and a join again in one push
        // are both changes, judged against each other, not against the views.
        let mut taken: std::collections::BTreeMap<(ruma::OwnedRoomId, ruma::OwnedUserId), (String, Option<u64>)> = Default::default();
        for c in push.events {
            let room = views.rooms.get(&c.room_id);
            let target = c.membership.as_ref().and(c.state_key.as_deref()).and_then(|k| UserId::parse(k).ok());
            let ts = c.membership_ts(received_ms);
            // The membership fedlink holds (or has taken from this push), with its time.
            let known = target.as_ref().and_then(|u| match taken.get(&(c.room_id.clone(), u.clone())) {
                Some((m, t)) => Some((Some(m.as_str()), *t)),
                None => room.map(|r| (r.membership(u), r.member_ts.get(u).copied())),
            });
            if room.is_some_and(|r| r.bot_joined()) {
                bot_in_room += 1;
            } else if known.is_some_and(|(m, _)| m.is_some() && m == c.membership.as_deref()) {
                // A profile change (join to join) or a repeated invite: folding ignores it.
                unchanged += 1;
            } else if known.is_some_and(|(_, t)| crate::core::views::older_membership(t, ts)) {
                // Older than the membership held (history a homeserver pushes late, after
                // a catch-up saw newer): folding ignores it.
                stale += 1;
            } else if c.membership.is_none() && !linked(&c.sender) {
                // Sends of unlinked accounts. Memberships are all kept (they are few): an
                // account linked later must not be invited where it left, declined or was
                // banned, and an invite it already has must be followed.
                not_linked += 1;
            } else {
                if let (Some(u), Some(m)) = (target, c.membership.clone()) {
                    let t = ts.or_else(|| known.and_then(|(_, t)| t));
                    taken.insert((c.room_id.clone(), u), (m, t));
                }
                entries.push(Entry::ClientEvent(c));
            }
        }
        for (reason, n) in [("bot_in_room", bot_in_room), ("not_linked", not_linked), ("receipt_not_linked", receipts_not_linked), ("unchanged_membership", unchanged), ("stale_membership", stale)] {
            if n > 0 {
                app.metrics.appservice_events_dropped.with_label_values(&[reason]).inc_by(n);
            }
        }
    }
    let n = entries.len();
    app.append(entries, Some((&origin, &txn_id, &json!({})))).await?;
    app.store.flush().await?;
    app.metrics.appservice_transactions.with_label_values(&["ok"]).inc();
    tracing::debug!(server = %reg.server_name, %txn_id, entries = n, "appservice transaction");
    Ok(Json(json!({})))
}

/// `GET /_matrix/app/v1/users/{userId}` and `/rooms/{alias}`: fedlink creates nothing.
pub async fn not_mine(
    State(app): State<std::sync::Arc<Fedlink>>,
    Query(query): Query<std::collections::BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, MatrixError> {
    authenticate(&app, &headers, &query)?;
    Err(MatrixError::not_found("fedlink does not provide this"))
}

/// How long fedlink retries (with backoff, up to 10 minutes apart) the catch-up of an
/// account that keeps failing before it gives up waiting and logs it caught up
/// (`gave_up`): a homeserver down for an hour, not a restart, lets siblings be invited
/// without knowing where the account left.
pub const CATCH_UP_PATIENCE: Duration = Duration::from_secs(3600);

/// Why a catch-up failed.
#[derive(Debug)]
struct CatchUpError {
    message: String,
    /// The homeserver did not answer at all (its other accounts wait too).
    unreachable: bool,
    /// Not asked, because the homeserver did not answer for an earlier account.
    skipped: bool,
}

impl CatchUpError {
    fn unreachable(message: String) -> Self {
        CatchUpError { message, unreachable: true, skipped: false }
    }
}

/// An error about the answer (not the connection).
impl From<String> for CatchUpError {
    fn from(message: String) -> Self {
        CatchUpError { message, unreachable: false, skipped: false }
    }
}

impl From<&str> for CatchUpError {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

/// Most rooms taken from each of one account's lists (joined, invited, left) when it
/// catches up.
pub const MAX_CATCH_UP_ROOMS: usize = 10_000;

/// A linked account's memberships that fedlink did not see (from before fedlink's
/// registration was installed on its homeserver): for every linked account on a homeserver
/// with a registration, once per link (the `caught_up` record keeps it across restarts),
/// ask the homeserver for the rooms the account has joined, is invited to and has left, and
/// log the membership events fedlink lacks. Until then the account is invited nowhere as a
/// sibling (see `decide_invites_as`). Each homeserver is asked by its own task, so one that
/// hangs delays only its own accounts.
pub async fn catch_up_worker(app: std::sync::Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    enum Done {
        Account(ruma::OwnedUserId, Result<usize, CatchUpError>),
        Server(String),
    }
    let mut changes = app.changes.subscribe();
    // Per account: failures, the next try, and when the failures began.
    let mut retry: std::collections::BTreeMap<ruma::OwnedUserId, (u32, tokio::time::Instant, tokio::time::Instant)> = Default::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
    let mut busy: std::collections::BTreeMap<String, tokio::task::JoinHandle<()>> = Default::default();
    let mut look = true;
    loop {
        if look {
            let now = tokio::time::Instant::now();
            let due: Vec<ruma::OwnedUserId> = {
                let views = app.views.read().await;
                let dir = &views.directory;
                // An account unlinked and linked again catches up again (unlinking forgets
                // its `caught_up`).
                retry.retain(|a, _| dir.by_account.contains_key(a) && !dir.is_caught_up(a));
                dir.by_account
                    .keys()
                    .filter(|a| !busy.contains_key(a.server_name().as_str()) && registration_for(&app, a).is_some())
                    .filter(|a| !dir.is_caught_up(a) && retry.get(*a).is_none_or(|(_, at, _)| *at <= now))
                    .cloned()
                    .collect()
            };
            let mut by_server: std::collections::BTreeMap<String, Vec<ruma::OwnedUserId>> = Default::default();
            for a in due {
                by_server.entry(a.server_name().to_string()).or_default().push(a);
            }
            // One task per homeserver: one that hangs delays only its own accounts.
            for (server, accounts) in by_server {
                let (app, tx, name) = (app.clone(), tx.clone(), server.clone());
                busy.insert(
                    server,
                    tokio::spawn(async move {
                        // Reports the homeserver idle however the task ends; an account whose
                        // catch-up panicked is reported failed (so it backs off, not loops).
                        struct Idle(tokio::sync::mpsc::UnboundedSender<Done>, String, Option<ruma::OwnedUserId>);
                        impl Drop for Idle {
                            fn drop(&mut self) {
                                if let Some(account) = self.2.take() {
                                    let _ = self.0.send(Done::Account(account, Err("the catch-up panicked".into())));
                                }
                                let _ = self.0.send(Done::Server(std::mem::take(&mut self.1)));
                            }
                        }
                        let mut idle = Idle(tx.clone(), name, None);
                        let mut failed = false;
                        for account in accounts {
                            // After one failure the homeserver's other accounts wait for the retry.
                            idle.2 = Some(account.clone());
                            let result = if failed {
                                Err(CatchUpError { message: "the homeserver did not answer for an earlier account".to_owned(), unreachable: true, skipped: true })
                            } else {
                                catch_up(&app, &account).await
                            };
                            idle.2 = None;
                            // Only an unreachable homeserver holds its other accounts back;
                            // an answer about one account (an error status) does not.
                            failed |= result.as_ref().is_err_and(|e| e.unreachable);
                            let _ = tx.send(Done::Account(account, result));
                        }
                    }),
                );
            }
        }
        // The next retry of an account whose homeserver is idle (a busy one reports back
        // when done, which wakes this loop anyway). One already due fires at once and is
        // started by the next look.
        let next_retry = retry.iter().filter(|(a, _)| !busy.contains_key(a.server_name().as_str())).map(|(_, (_, at, _))| *at).min();
        let (event, grew) = tokio::select! {
            _ = stop.wait_for(|s| *s) => (None, false),
            r = changes.changed() => (r.is_ok().then_some(None), true),
            d = rx.recv() => (Some(d), false),
            _ = async { match next_retry { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => (Some(None), false),
        };
        let Some(event) = event else {
            busy.values().for_each(tokio::task::JoinHandle::abort);
            return;
        };
        if grew {
            // Links change through the log: look again when it grows, at most once a second.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        look = true;
        match event {
            Some(Done::Server(server)) => {
                busy.remove(&server);
            }
            Some(Done::Account(account, Ok(_))) => {
                app.metrics.catch_up.with_label_values(&["ok"]).inc();
                retry.remove(&account);
                look = false;
            }
            Some(Done::Account(account, Err(e))) if e.skipped => {
                // Not asked: it waits until the homeserver's failed account is tried again
                // (reported just before), without a failure of its own.
                let now = tokio::time::Instant::now();
                let server = account.server_name().to_owned();
                let at = retry
                    .iter()
                    .filter(|(a, (n, _, _))| a.server_name() == server && *n > 0)
                    .map(|(_, (_, at, _))| *at)
                    .max()
                    .unwrap_or(now + crate::core::backoff::Backoff::DEFAULT.delay(1));
                let (failures, since) = retry.get(&account).map_or((0, now), |(n, _, since)| (*n, *since));
                retry.insert(account, (failures, at, since));
                look = false;
            }
            Some(Done::Account(account, Err(e))) => {
                let now = tokio::time::Instant::now();
                let (failures, since) = retry.get(&account).map_or((1, now), |(n, _, since)| (n + 1, *since));
                if now.duration_since(since) >= CATCH_UP_PATIENCE {
                    // Waiting for ever would keep the account from every sibling invite:
                    // it is invited as before catch-ups existed, and may be invited where
                    // it left before the registration.
                    app.metrics.catch_up.with_label_values(&["gave_up"]).inc();
                    tracing::warn!(%account, error = %e.message, failures, "giving up catching a linked account up; its siblings' invites go ahead without it");
                    let _lock = app.lock_ingest().await;
                    let still = app.views.read().await.directory.by_account.contains_key(&account);
                    let gave_up = Entry::CaughtUp(crate::core::log_entry::CaughtUp { account: account.clone(), memberships: 0, gave_up: true });
                    if still {
                        if let Err(err) = app.append(vec![gave_up], None).await {
                            tracing::warn!(%account, error = %err, "cannot log the given-up catch-up");
                        }
                    }
                    retry.remove(&account);
                } else {
                    app.metrics.catch_up.with_label_values(&["failed"]).inc();
                    let delay = crate::core::backoff::Backoff::DEFAULT.delay(failures);
                    tracing::warn!(%account, error = %e.message, failures, retry_in_s = delay.as_secs(), "cannot catch a linked account up on its memberships");
                    retry.insert(account, (failures, now + delay, since));
                }
                look = false;
            }
            None => {}
        }
    }
}

/// The filter of the catch-up's `/sync`: of each room only the last membership event of its
/// timeline (for a room the account left, the timeline ends at its leave), no state, no
/// presence, no account data. Rooms the account left are included (`include_leave`).
const CATCH_UP_SYNC_FILTER: &str = r#"{"presence":{"types":[]},"account_data":{"types":[]},"room":{"include_leave":true,"timeline":{"limit":1,"types":["m.room.member"]},"state":{"types":[]},"ephemeral":{"types":[]},"account_data":{"types":[]}}}"#;

/// What an initial `/sync` of `account` shows of its memberships beyond its joins: its
/// pending invites, and the rooms it left or was banned from, with the leave event when the
/// timeline ends with it (else the caller asks for it).
///
/// An invite from another server shows only as stripped state, without an event id
/// (Synapse 1.163), and the invited account may not read the room's state: such an invite
/// is logged under a stand-in id, `$catch-up-invite-` and a hash of room and account
/// (folding uses the membership, not the id), and the catch-up's time. A rejected invite from another server is not
/// shown at all by an initial sync (Synapse keeps it out of band, with no timeline): that
/// account may be invited again there.
type SyncMemberships = (Vec<crate::core::log_entry::ClientEventEntry>, Vec<(ruma::OwnedRoomId, Option<crate::core::log_entry::ClientEventEntry>)>);

fn sync_memberships(sync: &Value, account: &UserId, server: &ruma::ServerName, now_ms: u64) -> Result<SyncMemberships, String> {
    let rooms = match sync.get("rooms") {
        None | Some(Value::Null) => return Ok(Default::default()),
        Some(Value::Object(r)) => r,
        Some(_) => return Err(format!("{server} answered sync with `rooms` that is not an object")),
    };
    let section = |name: &str| -> Result<Vec<(ruma::OwnedRoomId, &Value)>, String> {
        match rooms.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Object(m)) => Ok(m.iter().filter_map(|(id, v)| Some((RoomId::parse(id).ok()?, v))).take(MAX_CATCH_UP_ROOMS).collect()),
            Some(_) => Err(format!("{server} answered sync with `rooms.{name}` that is not an object")),
        }
    };
    // The account's own membership event among `events`, as a log entry of `room`.
    let own = |room: &ruma::OwnedRoomId, events: Option<&Value>, wanted: &[&str]| {
        let ev = events?.as_array()?.iter().rev().find(|e| {
            e.get("type").and_then(Value::as_str) == Some("m.room.member") && e.get("state_key").and_then(Value::as_str) == Some(account.as_str())
        })?;
        let mut ev = ev.clone();
        let o = ev.as_object_mut()?;
        o.insert("room_id".into(), json!(room));
        if !o.contains_key("event_id") {
            // Stripped state has no time either: the invite stands as of this catch-up, so
            // older events of the account's history pushed later are stale.
            o.entry("origin_server_ts").or_insert(json!(now_ms));
            use sha2::Digest;
            let hash = sha2::Sha256::digest(format!("{room}\n{account}").as_bytes());
            let hex: String = hash.iter().take(12).map(|b| format!("{b:02x}")).collect();
            let m = o.get("content").and_then(|c| c.get("membership")).and_then(Value::as_str).unwrap_or("member").to_owned();
            o.insert("event_id".into(), json!(format!("$catch-up-{m}-{hex}")));
        }
        let c = client_event(&ev, server)?;
        wanted.contains(&c.membership.as_deref()?).then_some(c)
    };
    let invites = section("invite")?
        .into_iter()
        .filter_map(|(room, v)| {
            let found = own(&room, v.get("invite_state").and_then(|s| s.get("events")), &["invite"]);
            if found.is_none() {
                tracing::debug!(%account, %room, "an invite whose stripped state lacks the account's invite: not caught up");
            }
            found
        })
        .collect();
    let left = section("leave")?
        .into_iter()
        .map(|(room, v)| {
            let found = own(&room, v.get("timeline").and_then(|t| t.get("events")), &["leave", "ban"]);
            (room, found)
        })
        .collect();
    Ok((invites, left))
}

/// Catch `account` up (see [`catch_up_worker`]): log the memberships fedlink lacks of the
/// rooms it has joined (`joined_rooms`), is invited to and has left (an initial `/sync`),
/// then `caught_up`. Returns how many memberships were logged.
async fn catch_up(app: &Fedlink, account: &ruma::OwnedUserId) -> Result<usize, CatchUpError> {
    use crate::core::log_entry::ClientEventEntry;
    let reg = registration_for(app, account).ok_or("no registration for this homeserver")?;
    let server: OwnedServerName = reg.server_name.as_str().try_into().map_err(|_| "bad server name in config")?;
    let base = reg.client_url.trim_end_matches('/');
    let as_user = format!("user_id={}", enc(account.as_str()));
    let get = |url: String, timeout: Duration, cap: usize| async move {
        let resp = http(app, reg)
            .get(&url)
            .bearer_auth(&reg.as_token)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| CatchUpError::unreachable(crate::federation::client::error_chain(&e)))?;
        let status = resp.status();
        let body = crate::federation::client::read_capped(resp, cap).await.map_err(CatchUpError::unreachable)?;
        if !status.is_success() {
            let message = format!("{} answered {status}: {}", reg.server_name, String::from_utf8_lossy(&body[..body.len().min(200)]));
            // Overloaded or failing (429, 5xx, a proxy's error page): the homeserver, not
            // this account or room; anything else is an answer about them.
            if status.as_u16() == 429 || status.is_server_error() {
                return Err(CatchUpError::unreachable(message));
            }
            return Err(CatchUpError::from(message));
        }
        serde_json::from_slice::<Value>(&body).map_err(|e| CatchUpError::from(format!("{} answered with bad JSON: {e}", reg.server_name)))
    };
    let short = Duration::from_secs(10);
    let joined = get(format!("{base}/_matrix/client/v3/joined_rooms?{as_user}"), short, 4 * 1024 * 1024).await?;
    let joined: Vec<ruma::OwnedRoomId> = joined
        .get("joined_rooms")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{} answered joined_rooms without `joined_rooms`", reg.server_name))?
        .iter()
        .filter_map(|r| RoomId::parse(r.as_str()?).ok())
        .take(MAX_CATCH_UP_ROOMS)
        .collect();
    // An initial sync walks every room of the account on the homeserver: it may take a while.
    // `set_presence=offline`: asking on the account's behalf must not show it online.
    let sync_url = format!("{base}/_matrix/client/v3/sync?{as_user}&timeout=0&set_presence=offline&filter={}", enc(CATCH_UP_SYNC_FILTER));
    // A stand-in invite stands as of the moment the sync was asked: a membership pushed
    // while the sync ran is newer.
    let asked_ms = crate::node::now_ms();
    let sync = get(sync_url, Duration::from_secs(60), 32 * 1024 * 1024).await?;
    let (invites, left) = sync_memberships(&sync, account, &server, asked_ms)?;
    if joined.len() >= MAX_CATCH_UP_ROOMS || invites.len() >= MAX_CATCH_UP_ROOMS || left.len() >= MAX_CATCH_UP_ROOMS {
        tracing::warn!(%account, max = MAX_CATCH_UP_ROOMS, "a list of the account's rooms was cut at the maximum; rooms past it are not caught up");
    }
    // Rooms where the bot, whose PDUs are the truth, is not joined, and fedlink knows another
    // membership of the account or none.
    let differs = |views: &crate::core::views::Views, room: &RoomId, m: &[&str]| {
        views.rooms.get(room).is_none_or(|v| !v.bot_joined() && v.membership(account).is_none_or(|k| !m.contains(&k)))
    };
    // What is logged: a membership fedlink does not know, or one newer than the known one
    // by the events' times (pushes are logged as they come, but a homeserver restarted with
    // a new registration may push events older than this catch-up after it).
    let now = crate::node::now_ms();
    let newer = |views: &crate::core::views::Views, c: &ClientEventEntry| {
        let m = c.membership.as_deref().unwrap_or_default();
        views.rooms.get(&c.room_id).is_none_or(|v| {
            !v.bot_joined()
                && match v.membership(account) {
                    None => true,
                    Some(k) => k != m && v.member_ts.get(account).zip(c.membership_ts(now)).is_some_and(|(known, ts)| ts > *known),
                }
        })
    };
    // The sync was asked after `joined_rooms`: where they disagree, the sync is newer.
    let in_sync: std::collections::BTreeSet<&ruma::OwnedRoomId> = invites.iter().map(|c| &c.room_id).chain(left.iter().map(|(r, _)| r)).collect();
    let (mut found, to_fetch): (Vec<ClientEventEntry>, Vec<(ruma::OwnedRoomId, &[&str])>) = {
        let views = app.views.read().await;
        let found = invites.iter().chain(left.iter().filter_map(|(_, c)| c.as_ref())).filter(|c| newer(&views, c)).cloned().collect();
        let fetch = joined
            .iter()
            .filter(|r| !in_sync.contains(r) && differs(&views, r, &["join"]))
            .map(|r| (r.clone(), &["join"][..]))
            .chain(left.iter().filter(|(r, c)| c.is_none() && differs(&views, r, &["leave", "ban"])).map(|(r, _)| (r.clone(), &["leave", "ban"][..])))
            .collect();
        (found, fetch)
    };
    // The account's member event in each room the sync did not show it for: the state of a
    // joined room, or of a left one at the leave.
    for (room, wanted) in &to_fetch {
        let url = format!("{base}/_matrix/client/v3/rooms/{}/state/m.room.member/{}?format=event&{as_user}", enc(room.as_str()), enc(account.as_str()));
        let mut ev = match get(url, short, 4 * 1024 * 1024).await {
            Ok(ev) => ev,
            // One room the homeserver will not show is skipped, not the whole catch-up.
            Err(e) if !e.unreachable => {
                tracing::debug!(%account, %room, error = %e.message, "the homeserver did not show the account's member event; skipped");
                continue;
            }
            Err(e) => return Err(e),
        };
        // Older homeservers leave the room id out of a state event.
        if ev.get("room_id").is_none() {
            if let Some(o) = ev.as_object_mut() {
                o.insert("room_id".into(), json!(room));
            }
        }
        match client_event(&ev, &server) {
            Some(c) if c.room_id == *room && c.state_key.as_deref() == Some(account.as_str()) && c.membership.as_deref().is_some_and(|m| wanted.contains(&m)) => {
                found.push(c);
            }
            _ => tracing::debug!(%account, %room, "the homeserver's member event is not the membership it listed; skipped"),
        }
    }
    // Memberships logged, by kind.
    let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
    let mut chunks = found.chunks(100).peekable();
    loop {
        let chunk = chunks.next();
        let last = chunks.peek().is_none();
        let _lock = app.lock_ingest().await;
        let mut entries: Vec<Entry> = {
            let views = app.views.read().await;
            // Checked again: a membership pushed meanwhile may be newer than what was read.
            chunk.unwrap_or_default().iter().filter(|c| newer(&views, c)).cloned().map(Entry::ClientEvent).collect()
        };
        for e in &entries {
            if let Entry::ClientEvent(c) = e {
                *kinds.entry(c.membership.clone().unwrap_or_default()).or_default() += 1;
            }
        }
        if last {
            entries.push(Entry::CaughtUp(crate::core::log_entry::CaughtUp { account: account.clone(), memberships: kinds.values().sum(), gave_up: false }));
        }
        if !entries.is_empty() {
            app.append(entries, None).await.map_err(|e| CatchUpError::from(e.to_string()))?;
            app.store.flush().await.map_err(|e| CatchUpError::from(e.to_string()))?;
        }
        if last {
            break;
        }
    }
    for (membership, n) in &kinds {
        app.metrics.catch_up_memberships.with_label_values(&[membership.as_str()]).inc_by(*n);
    }
    tracing::info!(%account, joined = kinds.get("join").copied().unwrap_or(0), invited = kinds.get("invite").copied().unwrap_or(0),
        left = kinds.get("leave").copied().unwrap_or(0) + kinds.get("ban").copied().unwrap_or(0), "a linked account caught up on its memberships");
    Ok(kinds.values().sum::<u64>() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Given an `m.direct` a client wrote, fedlink adds the room under the partner once and
    /// keeps every other entry as it was; content it cannot merge is left alone.
    #[test]
    fn m_direct_merge_keeps_what_the_client_wrote_and_adds_the_partner_once() {
        let bob: &UserId = "@bob:kiwi".try_into().unwrap();
        let room: &RoomId = "!dm:kiwi".try_into().unwrap();
        let current = json!({ "@carol:kiwi": ["!c:kiwi"], "@bob:kiwi": ["!old:kiwi"], "@x:y": "odd but not ours" });
        let merged = merge_direct(&current, bob, room).unwrap().expect("the room is added");
        assert_eq!(merged, json!({ "@carol:kiwi": ["!c:kiwi"], "@bob:kiwi": ["!old:kiwi", "!dm:kiwi"], "@x:y": "odd but not ours" }));
        assert_eq!(merge_direct(&merged, bob, room).unwrap(), None, "listed already: nothing to write");
        assert_eq!(merge_direct(&json!({}), bob, room).unwrap(), Some(json!({ "@bob:kiwi": ["!dm:kiwi"] })));
        assert!(merge_direct(&json!([]), bob, room).is_err());
        assert!(merge_direct(&json!({ "@bob:kiwi": "!dm:kiwi" }), bob, room).is_err());
    }

    /// A pushed direct-chat invite is recorded as one; other memberships never are.
    #[test]
    fn a_pushed_direct_invite_is_marked_direct() {
        let server: &ruma::ServerName = "kiwi".try_into().unwrap();
        let ev = |m: &str, direct: bool| json!({ "type": "m.room.member", "room_id": "!dm:kiwi", "event_id": format!("$e{m}"), "sender": "@bob:kiwi", "state_key": "@alice:kiwi", "content": { "membership": m, "is_direct": direct } });
        let body = json!({ "events": [ev("invite", true), ev("invite", false), ev("join", true)] });
        let push = parse_push(server, &serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(push.events.iter().map(|e| e.is_direct).collect::<Vec<_>>(), vec![true, false, false]);
    }
    use serde_json::json;

    /// A homeserver speaks for its own users only: another server's receipts, presence,
    /// memberships (by target) and messages (by sender) are dropped and counted.
    #[test]
    fn a_push_keeps_only_what_the_homeserver_may_say() {
        let kiwi = ruma::ServerName::parse("kiwi").unwrap();
        let body = json!({
            "events": [
                { "type": "m.room.member", "room_id": "!r:kiwi", "event_id": "$a", "sender": "@alice:mango", "state_key": "@alice:mango", "content": { "membership": "leave" } },
                { "type": "m.room.member", "room_id": "!r:kiwi", "event_id": "$b", "sender": "@bob:kiwi", "state_key": "@alice:litchi", "content": { "membership": "invite" } },
                { "type": "m.room.member", "room_id": "!r:kiwi", "event_id": "$c", "sender": "@bob:kiwi", "state_key": "@bob:kiwi", "content": { "membership": "join" } },
                { "type": "m.room.message", "room_id": "!r:kiwi", "event_id": "$d", "sender": "@alice:litchi", "content": {}, "origin_server_ts": 5 },
                { "type": "m.room.message", "room_id": "!r:kiwi", "event_id": "$e", "sender": "@bob:kiwi", "content": {}, "origin_server_ts": 6 },
            ],
            "ephemeral": [
                { "type": "m.receipt", "room_id": "!r:kiwi", "content": { "$e": { "m.read": { "@alice:litchi": {}, "@bob:kiwi": { "ts": 1 } }, "m.read.private": { "@bob:kiwi": {} } } } },
                { "type": "m.presence", "sender": "@alice:mango", "content": { "presence": "online" } },
                { "type": "m.presence", "sender": "@bob:kiwi", "content": { "presence": "online" } },
            ],
        });
        let push = parse_push(&kiwi, body.to_string().as_bytes()).unwrap();
        let ids: Vec<&str> = push.events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, vec!["$c", "$e"]);
        assert_eq!(push.receipts.len(), 1);
        assert_eq!(push.receipts[0].user_id.as_str(), "@bob:kiwi");
        assert_eq!(push.presence.len(), 1);
        assert_eq!(push.foreign, 5);
        assert!(parse_push(&kiwi, b"[]").is_err());
        assert!(parse_push(&kiwi, br#"{"events": {}}"#).is_err());
    }

    /// Any non-state event is a send (sending counts as reading): encrypted messages and
    /// reactions too; state events other than memberships are not followed.
    #[test]
    fn any_non_state_event_is_a_send() {
        let kiwi = ruma::ServerName::parse("kiwi").unwrap();
        let body = json!({ "events": [
            { "type": "m.room.encrypted", "room_id": "!r:kiwi", "event_id": "$enc", "sender": "@bob:kiwi", "content": { "algorithm": "m.megolm.v1.aes-sha2" }, "origin_server_ts": 7 },
            { "type": "m.reaction", "room_id": "!r:kiwi", "event_id": "$re", "sender": "@bob:kiwi", "content": {}, "origin_server_ts": 8 },
            { "type": "m.room.topic", "room_id": "!r:kiwi", "event_id": "$topic", "sender": "@bob:kiwi", "state_key": "", "content": { "topic": "t" } },
        ]});
        let push = parse_push(&kiwi, body.to_string().as_bytes()).unwrap();
        let sends: Vec<(&str, bool)> = push.events.iter().map(|e| (e.event_id.as_str(), e.state_key.is_none())).collect();
        assert_eq!(sends, vec![("$enc", true), ("$re", true)]);
    }
}
