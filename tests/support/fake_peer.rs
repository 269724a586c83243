//! A fake federation peer for in-process tests: it owns a signing key, serves its key over
//! TLS, builds and signs room events (versions 10, 11, 12), answers `make_join` /
//! `send_join` v2 for rooms it hosts, and sends X-Matrix-signed requests to fedlink.
//!
//! It builds real, correctly signed events with ruma, so fedlink's checks run for real; it
//! only stands in for a homeserver in the fast tests, never in an end-to-end claim.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex},
};

use axum::{
    body::Bytes,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    routing::{get, put},
    Json, Router,
};
use fedlink::{
    core::pdu::canonical_object,
    federation::auth,
    keys::SigningKey,
};
use ruma::{canonical_json::CanonicalJsonObject, RoomVersionId};
use serde_json::{json, Value};

use super::synapse::{enc, self_signed_cert};

/// (type, state_key) -> event id.
pub type StateIds = BTreeMap<(String, String), String>;

/// A room the fake peer hosts (or tracks).
#[derive(Debug, Clone)]
pub struct FakeRoom {
    pub version: RoomVersionId,
    pub room_id: String,
    /// event id -> signed event
    pub events: BTreeMap<String, Value>,
    /// (type, state_key) -> event id
    pub state: StateIds,
    pub extremities: BTreeSet<String>,
    pub depth: u64,
    /// When set, the state before each event added from then on (for `/state_ids`).
    pub state_at: Option<BTreeMap<String, StateIds>>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

impl FakeRoom {
    /// Sign `obj` as `origin` and return (event id, event).
    pub fn sign(version: &RoomVersionId, origin: &str, key: &SigningKey, mut obj: CanonicalJsonObject) -> (String, Value) {
        let rules = version.rules().unwrap();
        ruma::signatures::hash_and_sign_event(origin, key, &mut obj, &rules.redaction).unwrap();
        let id = format!("${}", ruma::signatures::reference_hash(&obj, &rules).unwrap());
        (id, serde_json::to_value(obj).unwrap())
    }

    /// Event ids selected as auth events for a new event, from current state.
    pub fn auth_events_for(&self, kind: &str, sender: &str, state_key: Option<&str>, content: &Value) -> Vec<String> {
        let mut want: Vec<(String, String)> = vec![
            ("m.room.power_levels".into(), "".into()),
            ("m.room.member".into(), sender.into()),
        ];
        if self.version != RoomVersionId::V12 {
            want.push(("m.room.create".into(), "".into()));
        }
        if kind == "m.room.member" {
            let target = state_key.unwrap_or_default().to_owned();
            want.push(("m.room.member".into(), target));
            let m = content.get("membership").and_then(Value::as_str).unwrap_or("");
            if m == "join" || m == "invite" || m == "knock" {
                want.push(("m.room.join_rules".into(), "".into()));
            }
        }
        let mut ids: Vec<String> = want.iter().filter_map(|k| self.state.get(k).cloned()).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// An unsigned event on top of the current extremities.
    pub fn template(&self, sender: &str, kind: &str, state_key: Option<&str>, content: Value) -> CanonicalJsonObject {
        let auth_events = self.auth_events_for(kind, sender, state_key, &content);
        let mut v = json!({
            "room_id": self.room_id,
            "sender": sender,
            "type": kind,
            "content": content,
            "prev_events": self.extremities.iter().collect::<Vec<_>>(),
            "auth_events": auth_events,
            "depth": self.depth + 1,
            "origin_server_ts": now_ms(),
        });
        if let Some(sk) = state_key {
            v["state_key"] = json!(sk);
        }
        canonical_object(v).unwrap()
    }

    /// Record a signed event as part of the room.
    pub fn add(&mut self, id: &str, event: Value) {
        if let Some(m) = &mut self.state_at {
            m.insert(id.to_owned(), self.state.clone());
        }
        for p in event["prev_events"].as_array().unwrap() {
            self.extremities.remove(p.as_str().unwrap());
        }
        self.extremities.insert(id.to_owned());
        self.depth = self.depth.max(event["depth"].as_u64().unwrap());
        if let Some(sk) = event.get("state_key").and_then(Value::as_str) {
            self.state.insert((event["type"].as_str().unwrap().to_owned(), sk.to_owned()), id.to_owned());
        }
        self.events.insert(id.to_owned(), event);
    }

    /// The state before `id` (an event of this room), recomputed from the events of lower
    /// depth: the rooms the peer builds are one chain, each event one deeper.
    pub fn state_before(&self, id: &str) -> Option<StateIds> {
        let depth = self.events.get(id)?["depth"].as_u64()?;
        let mut earlier: Vec<(u64, &String, &Value)> = self
            .events
            .iter()
            .filter(|(_, e)| e.get("state_key").is_some())
            .filter_map(|(i, e)| Some((e["depth"].as_u64()?, i, e)))
            .filter(|(d, _, _)| *d < depth)
            .collect();
        earlier.sort_by_key(|(d, _, _)| *d);
        let mut state = StateIds::new();
        for (_, i, e) in earlier {
            state.insert((e["type"].as_str()?.to_owned(), e["state_key"].as_str()?.to_owned()), i.clone());
        }
        Some(state)
    }

    /// Build, sign and add an event; returns (id, event).
    pub fn push(&mut self, origin: &str, key: &SigningKey, sender: &str, kind: &str, state_key: Option<&str>, content: Value) -> (String, Value) {
        let obj = self.template(sender, kind, state_key, content);
        let (id, ev) = Self::sign(&self.version, origin, key, obj);
        self.add(&id, ev.clone());
        (id, ev)
    }

    /// A new room created by `creator` (a user of `origin`): create, join, power levels
    /// (creator 100, invite 0), join rules `invite`.
    pub fn create(origin: &str, key: &SigningKey, creator: &str, version: RoomVersionId) -> FakeRoom {
        let mut content = json!({ "room_version": version.as_str() });
        if version == RoomVersionId::V10 {
            content["creator"] = json!(creator);
        }
        let mut create = json!({
            "sender": creator, "type": "m.room.create", "state_key": "", "content": content,
            "prev_events": [], "auth_events": [], "depth": 1, "origin_server_ts": now_ms(),
        });
        let room_id = if version == RoomVersionId::V12 {
            None
        } else {
            let r = format!("!fake{}:{origin}", rand::random::<u32>());
            create["room_id"] = json!(r);
            Some(r)
        };
        let (id, ev) = Self::sign(&version, origin, key, canonical_object(create).unwrap());
        let room_id = room_id.unwrap_or_else(|| format!("!{}", &id[1..]));
        let mut room = FakeRoom { version: version.clone(), room_id, events: BTreeMap::new(), state: BTreeMap::new(), extremities: BTreeSet::new(), depth: 0, state_at: None };
        room.add(&id, ev);
        room.push(origin, key, creator, "m.room.member", Some(creator), json!({ "membership": "join" }));
        let mut users = json!({});
        if version != RoomVersionId::V12 {
            users[creator] = json!(100);
        }
        room.push(origin, key, creator, "m.room.power_levels", Some(""), json!({
            "users": users, "users_default": 0, "events_default": 0, "state_default": 50,
            "ban": 50, "kick": 50, "redact": 50, "invite": 0,
        }));
        room.push(origin, key, creator, "m.room.join_rules", Some(""), json!({ "join_rule": "invite" }));
        room
    }

    /// All auth events, transitively, of `ids`.
    pub fn auth_chain(&self, ids: &[String]) -> Vec<Value> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<String> = ids.to_vec();
        while let Some(id) = todo.pop() {
            let Some(ev) = self.events.get(&id) else { continue };
            for a in ev["auth_events"].as_array().unwrap() {
                let a = a.as_str().unwrap().to_owned();
                if seen.insert(a.clone()) {
                    todo.push(a);
                }
            }
        }
        // v12: the create event is implied.
        if self.version == RoomVersionId::V12 {
            seen.insert(format!("${}", &self.room_id[1..]));
        }
        seen.iter().filter_map(|id| self.events.get(id).cloned()).collect()
    }
}

/// What the fake peer has seen and hosts.
#[derive(Default)]
pub struct PeerState {
    pub rooms: BTreeMap<String, FakeRoom>,
    /// (method, path) of every request it received.
    pub requests: Vec<(String, String)>,
    /// Join events received through send_join.
    pub joins: Vec<Value>,
    /// Answer make_join with this status instead (to test failures).
    pub fail_make_join: Option<u16>,
    /// Answer send_join with this status instead (after recording the attempt).
    pub fail_send_join: Option<u16>,
    /// Answer /send with this status instead.
    pub fail_send: Option<u16>,
    /// Answer /v2/invite with this status instead.
    pub fail_invite: Option<u16>,
    /// Transactions received and answered 200: (txn id, PDUs).
    pub transactions: Vec<(String, Vec<Value>)>,
    /// Invites received (and countersigned).
    pub invites: Vec<Value>,
    /// Serve `POST /_matrix/key/v2/query` as a notary with these key documents (each
    /// already signed by its server; the peer adds its own signature).
    pub notary_docs: Option<Vec<Value>>,
    /// Tamper with the invite it countersigns: `"content"` changes it, `"unsigned"` returns
    /// it without the peer's signature.
    pub tamper_invite: Option<&'static str>,
    /// Add these event ids to every `/state_ids` answer (a lying resident).
    pub state_ids_extra: Vec<String>,
    /// Hold `get_missing_events` answers this long.
    pub delay_missing_events: Option<std::time::Duration>,
    /// Bodies of the `get_missing_events` requests received.
    pub missing_events_bodies: Vec<Value>,
    /// Public keys of servers that sent requests (fetched from their key servers and cached).
    pub peer_keys: BTreeMap<String, BTreeMap<String, String>>,
}

/// The fake peer.
pub struct FakePeer {
    pub name: String,
    pub url: String,
    pub key: Arc<SigningKey>,
    pub state: Arc<Mutex<PeerState>>,
    handle: axum_server::Handle,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

#[derive(Clone)]
struct Ctx {
    name: String,
    key: Arc<SigningKey>,
    state: Arc<Mutex<PeerState>>,
}

impl FakePeer {
    /// Start on an ephemeral loopback port; its server name is `localhost:<port>`.
    pub async fn start() -> FakePeer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let tls = self_signed_cert(dir.path(), &["localhost", "127.0.0.1"]);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let name = format!("localhost:{port}");
        let key = Arc::new(SigningKey::generate());
        let state = Arc::new(Mutex::new(PeerState::default()));
        let ctx = Ctx { name: name.clone(), key: key.clone(), state: state.clone() };
        let router = Router::new()
            .route("/_matrix/key/v2/server", get(key_doc))
            .route("/_matrix/federation/v1/make_join/{room}/{user}", get(make_join))
            .route("/_matrix/federation/v2/send_join/{room}/{event}", put(send_join))
            .route("/_matrix/federation/v1/get_missing_events/{room}", axum::routing::post(get_missing_events))
            .route("/_matrix/federation/v1/send/{txn}", put(receive_txn))
            .route("/_matrix/federation/v1/event_auth/{room}/{event}", get(event_auth))
            .route("/_matrix/federation/v1/event/{event}", get(get_event))
            .route("/_matrix/federation/v1/state_ids/{room}", get(state_ids))
            .route("/_matrix/federation/v1/state/{room}", get(full_state))
            .route("/_matrix/federation/v2/invite/{room}/{event}", put(receive_invite))
            .route("/_matrix/key/v2/query", axum::routing::post(key_query))
            .fallback(other)
            .with_state(ctx);
        let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key).await.unwrap();
        let handle = axum_server::Handle::new();
        let server = axum_server::from_tcp_rustls(listener, config).handle(handle.clone()).serve(router.into_make_service());
        tokio::spawn(server);
        let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
        FakePeer { url: format!("https://127.0.0.1:{port}"), name, key, state, handle, http, _dir: dir }
    }

    /// `@<local>:<peer>`
    pub fn user(&self, local: &str) -> String {
        format!("@{local}:{}", self.name)
    }

    /// Create a hosted room; returns its id.
    pub fn create_room(&self, creator_local: &str, version: RoomVersionId) -> String {
        let room = FakeRoom::create(&self.name, &self.key, &self.user(creator_local), version);
        let id = room.room_id.clone();
        self.state.lock().unwrap().rooms.insert(id.clone(), room);
        id
    }

    /// Build, sign and add an event to a hosted room.
    pub fn push(&self, room_id: &str, sender_local: &str, kind: &str, state_key: Option<&str>, content: Value) -> (String, Value) {
        let sender = self.user(sender_local);
        let mut st = self.state.lock().unwrap();
        let room = st.rooms.get_mut(room_id).expect("hosted room");
        room.push(&self.name, &self.key, &sender, kind, state_key, content)
    }

    /// A signed event that is NOT added to the room (for crafted traffic).
    pub fn build_detached(&self, room_id: &str, sender: &str, kind: &str, state_key: Option<&str>, content: Value) -> (String, CanonicalJsonObject) {
        let st = self.state.lock().unwrap();
        let room = &st.rooms[room_id];
        let obj = room.template(sender, kind, state_key, content);
        let (id, v) = FakeRoom::sign(&room.version, &self.name, &self.key, obj);
        (id, canonical_object(v).unwrap())
    }

    /// Send a signed federation request to fedlink at `base` (`https://127.0.0.1:port`).
    pub async fn request(&self, dest: &str, base: &str, method: Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
        self.request_as(&self.key, &self.name, dest, base, method, path, body).await
    }

    /// Like [`request`], but signing as `origin` with `key` (for forged requests).
    #[allow(clippy::too_many_arguments)]
    pub async fn request_as(&self, key: &SigningKey, origin: &str, dest: &str, base: &str, method: Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
        let content = body.map(|b| ruma::canonical_json::CanonicalJsonValue::try_from(b.clone()).unwrap());
        let authz = auth::sign_request(key, origin, dest, method.as_str(), path, content.as_ref());
        let mut req = self.http.request(method, format!("{base}{path}")).header("Authorization", authz);
        if let Some(b) = body {
            req = req.json(b);
        }
        answer(req.send().await.expect("request to fedlink")).await
    }

    /// Invite `user` (fedlink's bot) to a hosted room via `PUT /v2/invite` on fedlink;
    /// returns the status and answer. On success the countersigned invite joins the room.
    pub async fn invite(&self, room_id: &str, inviter_local: &str, user: &str, dest: &str, base: &str) -> (StatusCode, Value) {
        self.invite_with(room_id, inviter_local, user, json!({ "membership": "invite" }), dest, base).await
    }

    /// [`FakePeer::invite`] with the invite's `content` (e.g. `is_direct`).
    pub async fn invite_with(&self, room_id: &str, inviter_local: &str, user: &str, content: Value, dest: &str, base: &str) -> (StatusCode, Value) {
        let (id, ev, version) = {
            let st = self.state.lock().unwrap();
            let room = &st.rooms[room_id];
            let obj = room.template(&self.user(inviter_local), "m.room.member", Some(user), content);
            let (id, ev) = FakeRoom::sign(&room.version, &self.name, &self.key, obj);
            (id, ev, room.version.clone())
        };
        // Like a homeserver, the peer has the invite in its room before it answers joins.
        self.state.lock().unwrap().rooms.get_mut(room_id).unwrap().add(&id, ev.clone());
        let body = json!({ "room_version": version.as_str(), "event": ev, "invite_room_state": [] });
        let path = format!("/_matrix/federation/v2/invite/{}/{}", enc(room_id), enc(&id));
        let (status, resp) = self.request(dest, base, Method::PUT, &path, Some(&body)).await;
        let mut st = self.state.lock().unwrap();
        let room = st.rooms.get_mut(room_id).unwrap();
        if status.is_success() {
            room.events.insert(id, resp["event"].clone());
        } else {
            // Refused: forget it again.
            room.events.remove(&id);
            room.state.remove(&("m.room.member".to_owned(), user.to_owned()));
            let prev: Vec<String> = ev["prev_events"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect();
            room.extremities.remove(&id);
            room.extremities.extend(prev);
        }
        drop(st);
        (status, resp)
    }

    /// Send a transaction to fedlink.
    pub async fn send_txn(&self, dest: &str, base: &str, txn_id: &str, pdus: Vec<Value>, edus: Vec<Value>) -> (StatusCode, Value) {
        self.send_built(base, &self.build_txn(dest, txn_id, pdus, edus)).await
    }

    /// A `/send` transaction built and signed now, to be sent later with
    /// [`FakePeer::send_built`] (the load generator builds its transactions before timing them).
    pub fn build_txn(&self, dest: &str, txn_id: &str, pdus: Vec<Value>, edus: Vec<Value>) -> BuiltRequest {
        let body = json!({ "origin": self.name, "origin_server_ts": now_ms(), "pdus": pdus, "edus": edus });
        let path = format!("/_matrix/federation/v1/send/{}", enc(txn_id));
        let content = ruma::canonical_json::CanonicalJsonValue::try_from(body.clone()).unwrap();
        let authz = auth::sign_request(&self.key, &self.name, dest, "PUT", &path, Some(&content));
        BuiltRequest { path, authz, body: serde_json::to_vec(&body).unwrap().into() }
    }

    /// Send a request built by [`FakePeer::build_txn`].
    pub async fn send_built(&self, base: &str, req: &BuiltRequest) -> (StatusCode, Value) {
        let req = self.http.put(format!("{base}{}", req.path)).header("Authorization", req.authz.as_str()).header("Content-Type", "application/json").body(req.body.clone());
        answer(req.send().await.expect("request to the server")).await
    }

    /// Join `user_local` to a room fedlink is resident in, through fedlink
    /// (make_join then send_join v2). Returns the send_join answer.
    pub async fn join_via(&self, room_id: &str, user_local: &str, version: &RoomVersionId, dest: &str, base: &str) -> (StatusCode, Value) {
        let user = self.user(user_local);
        let path = format!("/_matrix/federation/v1/make_join/{}/{}?ver=10&ver=11&ver=12", enc(room_id), enc(&user));
        let (s, v) = self.request(dest, base, Method::GET, &path, None).await;
        if s != StatusCode::OK {
            return (s, v);
        }
        let mut template = canonical_object(v["event"].clone()).unwrap();
        template.insert("origin_server_ts".into(), ruma::canonical_json::CanonicalJsonValue::Integer(ruma::Int::new(now_ms() as i64).unwrap()));
        let (id, ev) = FakeRoom::sign(version, &self.name, &self.key, template);
        let path = format!("/_matrix/federation/v2/send_join/{}/{}", enc(room_id), enc(&id));
        self.request(dest, base, Method::PUT, &path, Some(&ev)).await
    }

    /// Event ids of PDUs received in successful transactions, with repeats.
    pub fn received_pdu_ids(&self, room_version: &RoomVersionId) -> Vec<String> {
        let rules = room_version.rules().unwrap();
        let st = self.state.lock().unwrap();
        st.transactions
            .iter()
            .flat_map(|(_, pdus)| pdus.iter())
            .map(|p| format!("${}", ruma::signatures::reference_hash(&canonical_object(p.clone()).unwrap(), &rules).unwrap()))
            .collect()
    }

    /// Stop serving.
    pub fn stop(&self) {
        self.handle.shutdown();
    }
}

/// A response's status and body (JSON, else the text as a JSON string).
async fn answer(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A signed request, ready to send.
pub struct BuiltRequest {
    path: String,
    authz: String,
    /// Shared, so sending it copies nothing.
    body: bytes::Bytes,
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

async fn key_doc(State(ctx): State<Ctx>) -> Json<Value> {
    let doc = json!({
        "server_name": ctx.name,
        "valid_until_ts": now_ms() + 86_400_000,
        "verify_keys": { ctx.key.key_id(): { "key": ctx.key.public_key_base64() } },
        "old_verify_keys": {},
    });
    let mut obj = canonical_object(doc).unwrap();
    ruma::signatures::sign_json(&ctx.name, &*ctx.key, &mut obj).unwrap();
    Json(serde_json::to_value(obj).unwrap())
}

async fn other(State(ctx): State<Ctx>, method: Method, uri: Uri) -> (StatusCode, Json<Value>) {
    ctx.state.lock().unwrap().requests.push((method.to_string(), uri.path().to_owned()));
    (StatusCode::NOT_FOUND, Json(json!({ "errcode": "M_UNRECOGNIZED", "error": "fake peer" })))
}

type Refusal = (StatusCode, Json<Value>);

fn refuse(status: StatusCode, errcode: &str, error: impl ToString) -> Refusal {
    (status, Json(json!({ "errcode": errcode, "error": error.to_string() })))
}

/// The keys of `server`, fetched from its key server (fedlink's name is `localhost:<port>`,
/// reachable as is) and cached.
async fn server_keys(ctx: &Ctx, server: &str) -> Result<BTreeMap<String, String>, Refusal> {
    if let Some(k) = ctx.state.lock().unwrap().peer_keys.get(server) {
        return Ok(k.clone());
    }
    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let doc: Value = http
        .get(format!("https://{server}/_matrix/key/v2/server"))
        .send()
        .await
        .map_err(|e| refuse(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", format!("cannot fetch keys of {server}: {e}")))?
        .json()
        .await
        .map_err(|e| refuse(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", e))?;
    let keys: BTreeMap<String, String> = doc["verify_keys"]
        .as_object()
        .map(|m| m.iter().filter_map(|(id, k)| Some((id.clone(), k["key"].as_str()?.to_owned()))).collect())
        .unwrap_or_default();
    ctx.state.lock().unwrap().peer_keys.insert(server.to_owned(), keys.clone());
    Ok(keys)
}

/// Verify a request's X-Matrix signature against the origin's published key, like a real
/// homeserver: a signing regression in fedlink fails the fake-peer tests at once.
async fn require_auth(ctx: &Ctx, method: &Method, uri: &Uri, headers: &HeaderMap, body: Option<&Value>) -> Result<auth::XMatrix, Refusal> {
    let h = headers.get("authorization").and_then(|h| h.to_str().ok()).unwrap_or("");
    let x = auth::parse_header(h).map_err(|e| refuse(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", e))?;
    if x.destination.as_deref().is_some_and(|d| d != ctx.name) {
        return Err(refuse(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "wrong destination"));
    }
    let keys = server_keys(ctx, &x.origin).await?;
    let public = keys.get(&x.key).ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "unknown key"))?;
    let content = body.map(|b| ruma::canonical_json::CanonicalJsonValue::try_from(b.clone()).unwrap());
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    auth::verify_request(&x, public, &ctx.name, method.as_str(), target, content.as_ref())
        .map_err(|e| refuse(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", format!("bad X-Matrix signature: {e}")))?;
    Ok(x)
}

/// Verify `event`'s signature by `server` (and its content hash).
async fn require_event_signed(ctx: &Ctx, server: &str, version: &RoomVersionId, event: &Value) -> Result<(), Refusal> {
    let keys = server_keys(ctx, server).await?;
    let set: ruma::signatures::PublicKeySet = keys.iter().map(|(id, k)| (id.clone(), ruma::serde::Base64::parse(k.clone()).unwrap())).collect();
    let map = BTreeMap::from([(server.to_owned(), set)]);
    let obj = canonical_object(event.clone()).map_err(|e| refuse(StatusCode::BAD_REQUEST, "M_BAD_JSON", e))?;
    match ruma::signatures::verify_event(&map, &obj, &version.rules().unwrap()) {
        Ok(ruma::signatures::Verified::All) => Ok(()),
        other => Err(refuse(StatusCode::FORBIDDEN, "M_FORBIDDEN", format!("event not signed by {server}: {other:?}"))),
    }
}

async fn make_join(
    State(ctx): State<Ctx>,
    UrlPath((room, user)): UrlPath<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> (StatusCode, Json<Value>) {
    let x = match require_auth(&ctx, &Method::GET, &uri, &headers, None).await {
        Ok(x) => x,
        Err(e) => return e,
    };
    let mut st = ctx.state.lock().unwrap();
    st.requests.push(("GET".into(), uri.path().to_owned()));
    if let Some(code) = st.fail_make_join {
        return (StatusCode::from_u16(code).unwrap(), Json(json!({ "errcode": "M_UNKNOWN", "error": "configured to fail" })));
    }
    let Some(room) = st.rooms.get(&room) else {
        return (StatusCode::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND", "error": "no room" })));
    };
    let vers: Vec<&str> = uri.query().unwrap_or("").split('&').filter_map(|kv| kv.strip_prefix("ver=")).collect();
    if !vers.contains(&room.version.as_str()) {
        return (StatusCode::BAD_REQUEST, Json(json!({ "errcode": "M_INCOMPATIBLE_ROOM_VERSION", "error": "ver", "room_version": room.version.as_str() })));
    }
    assert!(user.ends_with(&format!(":{}", x.origin)), "make_join for a user of the requesting server");
    let t = room.template(&user, "m.room.member", Some(&user), json!({ "membership": "join" }));
    (StatusCode::OK, Json(json!({ "room_version": room.version.as_str(), "event": t })))
}

async fn send_join(
    State(ctx): State<Ctx>,
    UrlPath((room_id, event_id)): UrlPath<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let event: Value = serde_json::from_slice(&body).unwrap();
    let x = match require_auth(&ctx, &Method::PUT, &uri, &headers, Some(&event)).await {
        Ok(x) => x,
        Err(e) => return e,
    };
    let version = ctx.state.lock().unwrap().rooms.get(&room_id).map(|r| r.version.clone());
    if let Some(v) = version {
        if let Err(e) = require_event_signed(&ctx, &x.origin, &v, &event).await {
            return e;
        }
    }
    let mut st = ctx.state.lock().unwrap();
    st.requests.push(("PUT".into(), uri.path().to_owned()));
    st.joins.push(event.clone());
    if let Some(code) = st.fail_send_join {
        return (StatusCode::from_u16(code).unwrap(), Json(json!({ "errcode": "M_UNKNOWN", "error": "configured to fail" })));
    }
    let Some(room) = st.rooms.get_mut(&room_id) else {
        return (StatusCode::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND", "error": "no room" })));
    };
    let state_ids: Vec<String> = room.state.values().cloned().collect();
    let state: Vec<Value> = state_ids.iter().map(|id| room.events[id].clone()).collect();
    let auth_chain = room.auth_chain(&state_ids);
    room.add(&event_id, event.clone());
    let _ = Path::new("");
    (StatusCode::OK, Json(json!({
        "origin": ctx.name,
        "state": state,
        "auth_chain": auth_chain,
        "event": event,
        "members_omitted": false,
        "servers_in_room": [ctx.name],
    })))
}

async fn get_missing_events(
    State(ctx): State<Ctx>,
    UrlPath(room_id): UrlPath<String>,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if let Err(e) = require_auth(&ctx, &Method::POST, &uri, &headers, Some(&body)).await {
        return e;
    }
    let delay = {
        let mut st = ctx.state.lock().unwrap();
        st.requests.push(("POST".into(), uri.path().to_owned()));
        st.missing_events_bodies.push(body.clone());
        st.delay_missing_events
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let st = ctx.state.lock().unwrap();
    let Some(room) = st.rooms.get(&room_id) else {
        return (StatusCode::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND", "error": "no room" })));
    };
    let earliest: BTreeSet<String> = body["earliest_events"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_owned()).collect();
    let limit = body["limit"].as_u64().unwrap_or(10) as usize;
    // Walk back from latest_events' prev_events until earliest_events.
    let mut todo: Vec<String> = body["latest_events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| room.events.get(e.as_str().unwrap()))
        .flat_map(|e| e["prev_events"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()))
        .collect();
    let mut found: BTreeMap<String, Value> = BTreeMap::new();
    while let Some(id) = todo.pop() {
        if earliest.contains(&id) || found.contains_key(&id) || found.len() >= limit {
            continue;
        }
        let Some(ev) = room.events.get(&id) else { continue };
        todo.extend(ev["prev_events"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()));
        found.insert(id, ev.clone());
    }
    let mut events: Vec<Value> = found.into_values().collect();
    events.sort_by_key(|e| e["depth"].as_u64());
    (StatusCode::OK, Json(json!({ "events": events })))
}

async fn receive_txn(
    State(ctx): State<Ctx>,
    UrlPath(txn): UrlPath<String>,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let x = match require_auth(&ctx, &Method::PUT, &uri, &headers, Some(&body)).await {
        Ok(x) => x,
        Err(e) => return e,
    };
    // Events the sending server authored must carry its valid signature.
    for pdu in body["pdus"].as_array().cloned().unwrap_or_default() {
        let sender_server = pdu["sender"].as_str().and_then(|s| s.split_once(':')).map(|(_, s)| s.to_owned()).unwrap_or_default();
        let version = ctx.state.lock().unwrap().rooms.get(pdu["room_id"].as_str().unwrap_or("")).map(|r| r.version.clone());
        if let (true, Some(v)) = (sender_server == x.origin, version) {
            if let Err(e) = require_event_signed(&ctx, &x.origin, &v, &pdu).await {
                return e;
            }
        }
    }
    let mut st = ctx.state.lock().unwrap();
    st.requests.push(("PUT".into(), format!("/send/{txn}")));
    if let Some(code) = st.fail_send {
        return (StatusCode::from_u16(code).unwrap(), Json(json!({ "errcode": "M_UNKNOWN", "error": "configured to fail" })));
    }
    let pdus = body["pdus"].as_array().cloned().unwrap_or_default();
    st.transactions.push((txn, pdus));
    (StatusCode::OK, Json(json!({ "pdus": {} })))
}

async fn receive_invite(
    State(ctx): State<Ctx>,
    UrlPath((_room, _event)): UrlPath<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let x = match require_auth(&ctx, &Method::PUT, &uri, &headers, Some(&body)).await {
        Ok(x) => x,
        Err(e) => return e,
    };
    let version = RoomVersionId::try_from(body["room_version"].as_str().unwrap_or("12")).unwrap();
    if let Err(e) = require_event_signed(&ctx, &x.origin, &version, &body["event"]).await {
        return e;
    }
    let mut st = ctx.state.lock().unwrap();
    st.requests.push(("PUT".into(), "/v2/invite".into()));
    if let Some(code) = st.fail_invite {
        return (StatusCode::from_u16(code).unwrap(), Json(json!({ "errcode": "M_UNKNOWN", "error": "configured to fail" })));
    }
    let version = RoomVersionId::try_from(body["room_version"].as_str().unwrap()).unwrap();
    let mut obj = canonical_object(body["event"].clone()).unwrap();
    match st.tamper_invite {
        Some("unsigned") => {}
        Some(_) => {
            ruma::signatures::sign_event(&ctx.name, &*ctx.key, &mut obj, &version.rules().unwrap().redaction).unwrap();
            // Change what the content says after signing (a displayname: the event id stays).
            if let Some(ruma::canonical_json::CanonicalJsonValue::Object(c)) = obj.get_mut("content") {
                c.insert("displayname".into(), ruma::canonical_json::CanonicalJsonValue::String("mallory".into()));
            }
        }
        None => ruma::signatures::sign_event(&ctx.name, &*ctx.key, &mut obj, &version.rules().unwrap().redaction).unwrap(),
    }
    let signed = serde_json::to_value(obj).unwrap();
    st.invites.push(signed.clone());
    (StatusCode::OK, Json(json!({ "event": signed })))
}

async fn event_auth(State(ctx): State<Ctx>, UrlPath((room_id, event_id)): UrlPath<(String, String)>, uri: Uri, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    if let Err(e) = require_auth(&ctx, &Method::GET, &uri, &headers, None).await {
        return e;
    }
    let mut st = ctx.state.lock().unwrap();
    st.requests.push(("GET".into(), format!("/event_auth/{event_id}")));
    let Some(room) = st.rooms.get(&room_id) else {
        return (StatusCode::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND", "error": "no room" })));
    };
    (StatusCode::OK, Json(json!({ "auth_chain": room.auth_chain(&[event_id]) })))
}

/// `POST /_matrix/key/v2/query`: answer as a notary when configured to.
async fn key_query(State(ctx): State<Ctx>, uri: Uri, headers: HeaderMap, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    if let Err(e) = require_auth(&ctx, &Method::POST, &uri, &headers, Some(&body)).await {
        return e;
    }
    let mut st = ctx.state.lock().unwrap();
    st.requests.push(("POST".into(), "/key/v2/query".into()));
    let Some(docs) = st.notary_docs.clone() else {
        return refuse(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "not a notary");
    };
    let wanted: Vec<String> = body["server_keys"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let out: Vec<Value> = docs
        .into_iter()
        .filter(|d| wanted.iter().any(|w| d["server_name"] == w.as_str()))
        .map(|d| {
            let mut obj = canonical_object(d).unwrap();
            ruma::signatures::sign_json(&ctx.name, &*ctx.key, &mut obj).unwrap();
            serde_json::to_value(obj).unwrap()
        })
        .collect();
    (StatusCode::OK, Json(json!({ "server_keys": out })))
}

/// A key document for `server` with `key`, self-signed (what its key server would answer).
pub fn key_document(server: &str, key: &SigningKey) -> Value {
    let doc = json!({
        "server_name": server,
        "valid_until_ts": now_ms() + 86_400_000,
        "verify_keys": { key.key_id(): { "key": key.public_key_base64() } },
        "old_verify_keys": {},
    });
    let mut obj = canonical_object(doc).unwrap();
    ruma::signatures::sign_json(server, key, &mut obj).unwrap();
    serde_json::to_value(obj).unwrap()
}

/// `GET /event/{eventId}`: any event of a hosted room.
async fn get_event(State(ctx): State<Ctx>, UrlPath(event_id): UrlPath<String>, uri: Uri, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    if let Err(e) = require_auth(&ctx, &Method::GET, &uri, &headers, None).await {
        return e;
    }
    let mut st = ctx.state.lock().unwrap();
    st.requests.push(("GET".into(), uri.path().to_owned()));
    match st.rooms.values().find_map(|r| r.events.get(&event_id).cloned()) {
        Some(ev) => (StatusCode::OK, Json(json!({ "origin": ctx.name, "origin_server_ts": now_ms(), "pdus": [ev] }))),
        None => (StatusCode::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND", "error": "no such event" }))),
    }
}

/// `/state`: the events of `/state_ids` that are in the room (`state_ids_extra` ids of other
/// rooms are left out).
async fn full_state(State(ctx): State<Ctx>, UrlPath(room_id): UrlPath<String>, uri: Uri, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    let (status, Json(ids)) = state_ids(State(ctx.clone()), UrlPath(room_id.clone()), uri, headers).await;
    if status != StatusCode::OK {
        return (status, Json(ids));
    }
    let st = ctx.state.lock().unwrap();
    let Some(room) = st.rooms.get(&room_id) else {
        return (StatusCode::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND", "error": "no room" })));
    };
    let events = |key: &str| -> Vec<Value> { ids[key].as_array().into_iter().flatten().filter_map(|i| room.events.get(i.as_str()?).cloned()).collect() };
    (StatusCode::OK, Json(json!({ "pdus": events("pdu_ids"), "auth_chain": events("auth_chain_ids") })))
}

/// `GET /state_ids/{roomId}?event_id=`: the state before an event: the recorded one in
/// rooms recording it (`state_at`), else recomputed ([`FakeRoom::state_before`]).
async fn state_ids(State(ctx): State<Ctx>, UrlPath(room_id): UrlPath<String>, uri: Uri, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    if let Err(e) = require_auth(&ctx, &Method::GET, &uri, &headers, None).await {
        return e;
    }
    let mut st = ctx.state.lock().unwrap();
    st.requests.push(("GET".into(), uri.path().to_owned()));
    let event_id = uri.query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("event_id=")).map(|e| percent_encoding::percent_decode_str(e).decode_utf8_lossy().into_owned());
    let recorded = |r: &FakeRoom| Some(r.state_at.as_ref()?.get(event_id.as_deref()?)?.clone());
    // Without a recorded state, any event of the room has one (a real server serves that).
    let Some(state) = st.rooms.get(&room_id).and_then(|r| if r.state_at.is_some() { recorded(r) } else { r.state_before(event_id.as_deref()?) }) else {
        return (StatusCode::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND", "error": "no state recorded at that event" })));
    };
    let mut ids: Vec<String> = state.values().cloned().collect();
    ids.extend(st.state_ids_extra.iter().cloned());
    let chain: Vec<String> = st.rooms[&room_id].auth_chain(&ids).iter().filter_map(|e| {
        let rules = st.rooms[&room_id].version.rules().unwrap();
        Some(format!("${}", ruma::signatures::reference_hash(&canonical_object(e.clone()).ok()?, &rules).ok()?))
    }).collect();
    (StatusCode::OK, Json(json!({ "pdu_ids": ids, "auth_chain_ids": chain })))
}
