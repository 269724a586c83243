//! `PUT /_matrix/federation/v1/send/{txnId}`: transaction ingest.
//! <https://spec.matrix.org/v1.16/server-server-api/#put_matrixfederationv1sendtxnid>
//!
//! Limits first (50 PDUs, 100 EDUs, 64 KiB per PDU), then a retransmitted transaction is
//! answered from the stored response. Each PDU is parsed without a lock and its signatures
//! are checked on the process's checking threads meanwhile; then, under the ingest lock, each
//! is auth-checked and appended. A linear transaction (nothing to fetch) is admitted as its
//! checks end, so checking and admitting share the cores. EDUs fedlink cares about are
//! validated (a server speaks only for its own users) and appended with the transaction's
//! response in one batch. The store is flushed before the 200 goes out.

use std::collections::BTreeMap;

use ruma::{OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, UserId};
use serde_json::{json, Value};

use super::error::MatrixError;
use crate::{
    node::Fedlink,
    core::{
        log_entry::{Entry, PduEntry, PduStatus, PresenceEntry, ReceiptEntry, TypingEntry},
        pdu::{canonical_object, rules_for, Pdu},
        views::BotMembership,
    },
    rooms::{check_auth, Rejection},
};

/// Most PDUs in one transaction.
pub const MAX_PDUS: usize = 50;
/// Most EDUs in one transaction.
pub const MAX_EDUS: usize = 100;

/// Handle one transaction from an authenticated `origin`.
pub async fn handle_send(app: &Fedlink, origin: &str, txn_id: &str, body: &[u8]) -> Result<Value, MatrixError> {
    let started = std::time::Instant::now();
    let result = handle_inner(app, origin, txn_id, body).await;
    app.metrics.transaction_seconds.observe(started.elapsed().as_secs_f64());
    let label = match &result {
        Ok((_, true)) => "retransmit",
        Ok((_, false)) => "ok",
        Err(_) => "rejected",
    };
    app.metrics.transactions.with_label_values(&[label]).inc();
    result.map(|(v, _)| v)
}

/// A transaction's body, shape-checked and within the spec's limits.
#[derive(Debug, Default)]
pub struct Transaction {
    /// The PDUs, unparsed (each is checked on its own).
    pub pdus: Vec<Value>,
    /// The EDUs, unparsed.
    pub edus: Vec<Value>,
}

/// Parse a `/send` body from an authenticated `origin`: a JSON object whose `origin` (if
/// given) is the sender, with at most [`MAX_PDUS`] PDUs and [`MAX_EDUS`] EDUs. Pure: the
/// fuzz targets and property tests call it directly.
pub fn parse_transaction(origin: &str, body: &[u8]) -> Result<Transaction, MatrixError> {
    let body: Value = serde_json::from_slice(body).map_err(|e| MatrixError::bad_json(format!("body is not JSON: {e}")))?;
    let Value::Object(mut body) = body else { return Err(MatrixError::bad_json("transaction must be a JSON object")) };
    if let Some(o) = body.get("origin") {
        if o.as_str() != Some(origin) {
            return Err(MatrixError::forbidden("transaction origin does not match the authenticated origin"));
        }
    }
    let pdus = match body.remove("pdus") {
        Some(Value::Array(a)) => a,
        None => Vec::new(),
        Some(_) => return Err(MatrixError::bad_json("`pdus` must be an array")),
    };
    let edus = match body.remove("edus") {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(MatrixError::bad_json("`edus` must be an array")),
    };
    if pdus.len() > MAX_PDUS || edus.len() > MAX_EDUS {
        return Err(MatrixError::bad_json(format!(
            "transaction has {} PDUs and {} EDUs; at most {MAX_PDUS} and {MAX_EDUS} are allowed",
            pdus.len(),
            edus.len()
        )));
    }
    Ok(Transaction { pdus, edus })
}

/// Most updates in one `m.presence` EDU.
pub const MAX_PRESENCE_PUSH: usize = 100;

/// Most PDUs parked for one room while the bot's join there is under way.
pub const MAX_PARKED_PER_ROOM: usize = 200;
/// Most PDUs parked in all (at most 64 KiB each).
pub const MAX_PARKED: usize = 5_000;

async fn handle_inner(app: &Fedlink, origin: &str, txn_id: &str, body: &[u8]) -> Result<(Value, bool), MatrixError> {
    let Transaction { pdus, edus } = parse_transaction(origin, body)?;
    if let Some(resp) = app.store.txn_response(origin, txn_id)? {
        // The first delivery may still be flushing: make sure what we acknowledge is durable.
        app.store.flush().await?;
        tracing::debug!(%origin, %txn_id, "retransmitted transaction answered from the log");
        return Ok((resp, true));
    }
    // Residents send a room's events as soon as they answered our send_join, while fedlink
    // may still be checking the state: those are parked (durably, before the 200) and
    // applied once the join lands, so the sender never waits on a join.
    let mut results: BTreeMap<String, Value> = BTreeMap::new();
    let mut to_park: Vec<(OwnedRoomId, String, Value)> = Vec::new();
    let mut now: Vec<Value> = Vec::new();
    {
        let views = app.views.read().await;
        for raw in pdus {
            let room = raw.get("room_id").and_then(Value::as_str).and_then(|r| RoomId::parse(r).ok());
            let joining = room.as_ref().and_then(|r| views.rooms.get(r)).and_then(|v| match &v.bot {
                BotMembership::Invited { inviter, .. } => Some((inviter.server_name().to_owned(), v.version.clone())),
                _ => None,
            });
            match (room, joining) {
                (Some(room), Some((resident, version))) => {
                    // Only the resident fedlink joins through, and only well-formed events
                    // within the PDU size limit, are held.
                    let parsed = rules_for(&version).and_then(|rules| Pdu::parse(canonical_object(raw.clone()).ok()?, &rules).ok());
                    match parsed {
                        Some(p) if resident.as_str() == origin => to_park.push((room, p.event_id.to_string(), raw)),
                        Some(p) => {
                            app.metrics.parked_pdus.with_label_values(&["refused"]).inc();
                            results.insert(p.event_id.to_string(), json!({ "error": "fedlink is joining this room through another server" }));
                        }
                        None => {
                            app.metrics.pdus_rejected.with_label_values(&["format"]).inc();
                            tracing::info!(%origin, %room, "dropping an unparseable PDU for a room being joined");
                        }
                    }
                }
                _ => now.push(raw),
            }
        }
    }

    let phase = |name: &str, since: std::time::Instant| app.metrics.ingest_phase_seconds.with_label_values(&[name]).observe(since.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let prepared = prepare(app, origin, now, body.len() <= MAX_OVERLAPPED_BODY).await;
    phase("prepare", t);
    let via: OwnedServerName = origin.try_into().map_err(|_| MatrixError::bad_json("bad origin"))?;
    let t = std::time::Instant::now();
    let mut lock = Some(app.lock_ingest().await);
    phase("wait", t);
    let t = std::time::Instant::now();
    if let Some(resp) = app.store.txn_response(origin, txn_id)? {
        return Ok((resp, true));
    }
    let parked_rooms: std::collections::BTreeSet<OwnedRoomId> = to_park.iter().map(|(r, _, _)| r.clone()).collect();
    park(app, origin, to_park, &mut results).await?;
    let (mut batch, relocked) = admit_prepared(app, &via, &mut lock, prepared, &mut results).await?;
    if relocked {
        // A retransmission may have been answered while the lock was let go.
        if let Some(resp) = app.store.txn_response(origin, txn_id)? {
            batch.commit(None)?;
            app.store.flush().await?;
            return Ok((resp, true));
        }
    }
    for edu in edus {
        let edu_type = edu.get("edu_type").and_then(Value::as_str).unwrap_or("").to_owned();
        let label = edu_metric_label(&edu_type);
        match parse_edu(app, batch.views(), &via, &edu) {
            Ok(entries) if !entries.is_empty() => {
                entries.into_iter().for_each(|e| batch.push(e));
                app.metrics.edus_received.with_label_values(&[label, "logged"]).inc();
            }
            Ok(_) => {
                app.metrics.edus_received.with_label_values(&[label, "ignored"]).inc();
            }
            Err(reason) => {
                tracing::info!(%origin, edu_type = %edu_type, %reason, "rejecting EDU");
                app.metrics.edus_received.with_label_values(&[label, "rejected"]).inc();
            }
        }
    }
    let response = json!({ "pdus": results });
    batch.commit(Some((origin, txn_id, &response)))?;
    phase("apply", t);
    let t = std::time::Instant::now();
    app.store.flush().await?;
    phase("flush", t);
    // A join may have landed between sorting and parking: have the join worker apply
    // what was just parked rather than wait for its next round.
    if !parked_rooms.is_empty() {
        let views = app.views.read().await;
        if parked_rooms.iter().any(|r| views.rooms.get(r).is_some_and(|v| !matches!(v.bot, BotMembership::Invited { .. }))) {
            app.joins.wake.notify_one();
        }
    }
    Ok((response, false))
}

/// Park PDUs of rooms whose join is under way (bounded per room and in all; one copy per
/// event). Call with the ingest lock held; the caller flushes before answering.
async fn park(app: &Fedlink, origin: &str, pdus: Vec<(OwnedRoomId, String, Value)>, results: &mut BTreeMap<String, Value>) -> Result<(), MatrixError> {
    for (room, id, raw) in pdus {
        let full = app.store.parked_total() >= MAX_PARKED || app.store.parked_count(room.as_str(), MAX_PARKED_PER_ROOM) >= MAX_PARKED_PER_ROOM;
        if full {
            app.metrics.parked_pdus.with_label_values(&["refused"]).inc();
            tracing::warn!(%origin, %room, "too many events held for a room whose join is under way; refusing one");
            results.insert(id, json!({ "error": "fedlink is joining this room and holds too many of its events already" }));
            continue;
        }
        if app.store.park(room.as_str(), &id, origin, &raw)? {
            app.metrics.parked_pdus.with_label_values(&["parked"]).inc();
            tracing::debug!(%origin, %room, event_id = %id, "parked a PDU until the bot's join lands");
        }
        results.insert(id, json!({}));
    }
    app.metrics.parked_pending.set(app.store.parked_total() as i64);
    Ok(())
}

/// Apply the PDUs parked for `room_id` now that the bot joined it (or drop them when the
/// join was given up or the bot left). Safe to repeat: applied events are deduplicated by
/// event id, and they are unparked only once logged.
pub async fn drain_parked(app: &Fedlink, room_id: &OwnedRoomId) -> Result<usize, crate::store::StoreError> {
    let parked = app.store.parked_for(room_id.as_str())?;
    if parked.is_empty() {
        return Ok(0);
    }
    let joined = app.views.read().await.rooms.get(room_id).map(|r| r.bot.clone());
    let keys: Vec<Vec<u8>> = parked.iter().map(|(k, _, _)| k.clone()).collect();
    let n = parked.len();
    if !matches!(joined, Some(BotMembership::Joined)) {
        if matches!(joined, Some(BotMembership::Invited { .. })) {
            return Ok(0); // still joining
        }
        app.store.unpark(&keys)?;
        app.metrics.parked_pdus.with_label_values(&["dropped"]).inc_by(n as u64);
        app.metrics.parked_pending.set(app.store.parked_total() as i64);
        tracing::info!(%room_id, dropped = n, "dropped events held for a join that did not happen");
        return Ok(0);
    }
    // Keep each origin's events together, in arrival order.
    let mut by_origin: Vec<(String, Vec<Value>)> = Vec::new();
    for (_, origin, pdu) in parked {
        match by_origin.last_mut() {
            Some((o, list)) if *o == origin && list.len() < MAX_PDUS => list.push(pdu),
            _ => by_origin.push((origin, vec![pdu])),
        }
    }
    for (origin, pdus) in by_origin {
        let Ok(via) = OwnedServerName::try_from(origin.as_str()) else { continue };
        let prepared = prepare(app, &origin, pdus, false).await;
        let mut lock = Some(app.lock_ingest().await);
        let mut ignored = BTreeMap::new();
        match admit_prepared(app, &via, &mut lock, prepared, &mut ignored).await {
            Ok((batch, _)) => {
                batch.commit(None)?;
            }
            Err(e) => {
                tracing::warn!(%room_id, error = %e.message, "cannot apply held events yet");
                return Err(crate::store::StoreError::Corrupt { tree: "parked", reason: e.message });
            }
        }
    }
    app.store.flush().await?;
    app.store.unpark(&keys)?;
    app.metrics.parked_pdus.with_label_values(&["applied"]).inc_by(n as u64);
    app.metrics.parked_pending.set(app.store.parked_total() as i64);
    tracing::info!(%room_id, events = n, "applied the events held while the bot was joining");
    Ok(n)
}

/// PDUs parsed and signature-checked, gaps and missing auth events fetched: everything done
/// before the ingest lock. A linear transaction (see [`Linear`]) has nothing to fetch: its
/// checks run on while it is admitted, each event as soon as its check ends (`checking`).
pub struct Prepared {
    results: BTreeMap<String, Value>,
    sent: std::collections::BTreeSet<OwnedEventId>,
    verified: Vec<(Pdu, OwnedRoomId)>,
    auth_only: Vec<(Pdu, OwnedRoomId)>,
    gaps: Vec<GapState>,
    checking: Option<Checking>,
}

/// A linear transaction's signature checks, under way.
struct Checking {
    checks: Checks,
    /// Each job's room and event id, in the order of the jobs.
    jobs: Vec<(OwnedRoomId, OwnedEventId)>,
    /// Ids of the transaction's events that others of it name as parents or auth events.
    named: std::collections::HashSet<OwnedEventId>,
}

/// What is left of a linear transaction after an event another of its events names failed
/// its check: the rest, checked, to go through the gap fills without the ingest lock.
pub struct Leftover {
    verified: Vec<(Pdu, OwnedRoomId)>,
}

/// The state at a gap `get_missing_events` could not fill: the missing parent, the ids of
/// the state before it (from `/state_ids`), and the events fedlink lacked (from `/event`),
/// all signature-checked.
pub struct GapState {
    room_id: OwnedRoomId,
    prev: Pdu,
    state_ids: Vec<OwnedEventId>,
    events: Vec<Pdu>,
}

/// Most gaps fetched by state per transaction.
pub const MAX_GAP_STATES: usize = 3;
/// Most events fetched one by one for the state at a gap.
pub const MAX_GAP_STATE_EVENTS: usize = 2_000;

/// Largest transaction body whose signature checks may run on while it is admitted: the
/// checks the admitting thread does itself happen under the ingest lock, so their cost
/// under it is bounded (a 50-PDU transaction of ordinary events is about 50 KiB).
pub const MAX_OVERLAPPED_BODY: usize = 256 * 1024;

/// The lock-free part of ingesting `pdus` from `origin`: each PDU's signatures are queued
/// for the checking threads as soon as it is parsed. With `overlap`, a linear transaction of
/// more than a few checked PDUs is admitted as its checks end (on a machine of more than one
/// core).
pub async fn prepare(app: &Fedlink, origin: &str, pdus: Vec<Value>, overlap: bool) -> Prepared {
    let mut results: BTreeMap<String, Value> = BTreeMap::new();
    let mut checks = Checks::start();
    let mut jobs: Vec<(OwnedRoomId, OwnedEventId)> = Vec::with_capacity(pdus.len());
    // Its store lookups are only worth it when the transaction can be overlapped at all
    // (the gap fills look the same events up otherwise).
    let mut linear = Linear::new(overlap && Checks::overlapped(pdus.len()));
    let rooms = rooms_of(app, &pdus).await;
    for raw in pdus {
        match precheck_keys_in(app, origin, raw, &rooms).await {
            Ok(Pre::Fresh(job, room)) => {
                linear.add(&job.pdu, |id| app.store.has_event(id).unwrap_or(false));
                jobs.push((room, job.pdu.event_id.clone()));
                checks.add(*job);
            }
            Ok(Pre::Known(id)) => {
                results.insert(id, json!({}));
            }
            Err((Some(id), rej)) => {
                reject(app, &id, &rej, &mut results);
            }
            Err((None, rej)) => {
                app.metrics.pdus_received.with_label_values(&["rejected"]).inc();
                app.metrics.pdus_rejected.with_label_values(&[rej.reason()]).inc();
                tracing::info!(%origin, reason = %rej, "dropping unparseable PDU");
            }
        }
    }
    checks.close();
    // Each event's write will read the index page its id is on: once the index outgrows
    // sled's cache, have those read now, on a thread of their own, while the transaction
    // is checked and admitted, rather than under the ingest lock at the write.
    let warm = app.store.index_outgrows_cache();
    if let Some(named) = linear.named().filter(|_| Checks::overlapped(jobs.len())) {
        // Nothing to fetch: admit each event as soon as its signatures are checked, on one
        // core while the others check the rest.
        if warm {
            jobs.iter().for_each(|(_, id)| app.store.warm_index(id.as_str()));
        }
        let sent = jobs.iter().map(|(_, id)| id.clone()).collect();
        let checking = Checking { checks, jobs, named };
        return Prepared { results, sent, verified: Vec::new(), auth_only: Vec::new(), gaps: Vec::new(), checking: Some(checking) };
    }
    // CPU-bound for a few milliseconds: the checking threads and this one share the work
    // (not handed to tokio's blocking pool).
    let checked = checks.all();
    checks.count(app);
    if warm {
        for pdu in checked.iter().flatten() {
            app.store.warm_index(pdu.event_id.as_str());
        }
    }
    let mut verified: Vec<(Pdu, OwnedRoomId)> = Vec::new();
    for (outcome, (room, id)) in checked.into_iter().zip(jobs) {
        match own_result(outcome, &id) {
            Ok(pdu) => verified.push((pdu, room)),
            Err(rej) => reject(app, id.as_str(), &rej, &mut results),
        }
    }
    after_checks(app, origin, results, verified).await
}

/// Whether a transaction's events, in their order, can be admitted as they are checked
/// with nothing fetched: their depths do not decrease, no event comes twice, and every
/// parent and auth event each names is stored or comes before it in the transaction.
struct Linear {
    /// Still linear (and wanted) so far.
    ok: bool,
    depth: u64,
    before: std::collections::HashSet<OwnedEventId>,
    /// Ids of the transaction's events that others of it name (if one of those fails its
    /// check, the rest go through the gap fills after all).
    named: std::collections::HashSet<OwnedEventId>,
}

impl Linear {
    fn new(wanted: bool) -> Linear {
        Linear { ok: wanted, depth: 0, before: Default::default(), named: Default::default() }
    }

    /// The transaction's next event; `stored` says whether an event is in the store.
    fn add(&mut self, pdu: &Pdu, stored: impl Fn(&str) -> bool) {
        if !self.ok {
            return;
        }
        self.ok = pdu.depth >= self.depth
            && pdu.prev_events.iter().chain(&pdu.auth_events).all(|id| {
                if self.before.contains(id) {
                    self.named.insert(id.clone());
                    true
                } else {
                    stored(id.as_str())
                }
            })
            // Copies of one event (the signatures are not part of its id): the old path
            // answers for the event as admitted, whichever copy fails its check.
            && self.before.insert(pdu.event_id.clone());
        self.depth = pdu.depth;
    }

    /// The ids others name, if the transaction is linear.
    fn named(self) -> Option<std::collections::HashSet<OwnedEventId>> {
        self.ok.then_some(self.named)
    }
}

/// The part of [`prepare`] after the signature checks: fill gaps, fetch the state at those
/// left and missing auth events, and order the events by depth.
async fn after_checks(app: &Fedlink, origin: &str, results: BTreeMap<String, Value>, mut verified: Vec<(Pdu, OwnedRoomId)>) -> Prepared {
    let sent: std::collections::BTreeSet<OwnedEventId> = verified.iter().map(|(p, _)| p.event_id.clone()).collect();
    for _ in 0..GAP_FILL_ROUNDS {
        let fetched = fill_gaps(app, origin, &verified).await;
        if fetched.is_empty() {
            break;
        }
        verified.extend(fetched);
    }
    verified.sort_by_key(|(p, _)| p.depth);
    let gaps = fetch_state_at_gaps(app, origin, &verified).await;
    let auth_only = fetch_missing_auth(app, origin, &verified).await;
    Prepared { results, sent, verified, auth_only, gaps, checking: None }
}

/// Admit `prepared` into a batch under the ingest lock `lock` (taken by the caller). If a
/// linear transaction leaves events to fetch for, what was admitted is written, the lock is
/// let go while they are fetched, and taken again to admit the rest: then the second value
/// is true, and the caller checks again whether the transaction was answered meanwhile. The
/// caller adds what else the transaction carries, commits the batch and flushes.
pub async fn admit_prepared<'a>(
    app: &'a Fedlink,
    via: &OwnedServerName,
    lock: &mut Option<crate::node::IngestGuard<'a>>,
    prepared: Prepared,
    results: &mut BTreeMap<String, Value>,
) -> Result<(crate::node::Batch<'a>, bool), MatrixError> {
    let (batch, leftover) = apply_prepared(app, via, prepared, results).await?;
    let Some(Leftover { verified }) = leftover else { return Ok((batch, false)) };
    batch.commit(None)?;
    *lock = None;
    let t = std::time::Instant::now();
    tracing::info!(origin = %via, events = verified.len(), "an event others of the transaction name failed its check: filling gaps for the rest without the ingest lock");
    let prepared = after_checks(app, via.as_str(), BTreeMap::new(), verified).await;
    *lock = Some(app.lock_ingest().await);
    app.metrics.ingest_phase_seconds.with_label_values(&["refill"]).observe(t.elapsed().as_secs_f64());
    // The rest went through the gap fills: it has no checks under way, so no leftover.
    let (batch, _) = apply_prepared(app, via, prepared, results).await?;
    Ok((batch, true))
}

/// Auth-check prepared PDUs and fold them into a batch; answers go into `results`. Call
/// with the ingest lock held (through [`admit_prepared`]); the second value is what a
/// linear transaction leaves to fetch for, when an event others of it name failed its check.
async fn apply_prepared<'a>(
    app: &'a Fedlink,
    via: &OwnedServerName,
    prepared: Prepared,
    results: &mut BTreeMap<String, Value>,
) -> Result<(crate::node::Batch<'a>, Option<Leftover>), MatrixError> {
    let Prepared { results: early, sent, verified, auth_only, gaps, checking } = prepared;
    results.extend(early);
    for gap in gaps {
        apply_gap_state(app, via, gap).await?;
    }
    // Auth events fedlink lacked, fetched from the origin: stored as outliers first, each
    // checked against its own auth events.
    for (pdu, room_id) in auth_only {
        let id = pdu.event_id.to_string();
        if app.store.has_event(&id)? {
            continue;
        }
        let Some(rules) = app.views.read().await.rooms.get(&room_id).and_then(|r| rules_for(&r.version)) else { continue };
        match check_auth(&app.store, None, &pdu, &rules, &BTreeMap::new()) {
            Ok(_) => {
                app.append(vec![Entry::Pdu(PduEntry::new(&pdu, via.clone(), PduStatus::Outlier))], None).await?;
            }
            Err(rej) => {
                app.metrics.pdus_rejected.with_label_values(&[rej.reason()]).inc();
                tracing::info!(event_id = %id, reason = %rej, "rejecting a fetched auth event");
            }
        }
    }
    // Each event is checked against the views and store as the earlier ones of the batch
    // left them (folded and staged), and all are written in one log transaction.
    let t = std::time::Instant::now();
    let mut batch = app.batch().await;
    app.metrics.ingest_phase_seconds.with_label_values(&["views_wait"]).observe(t.elapsed().as_secs_f64());
    for (pdu, room_id) in verified {
        // Events fetched to fill a gap are logged like any other but not answered for.
        let mut answers = Results { map: results, answer: sent.contains(&pdu.event_id) };
        admit_one(app, &mut batch, via, pdu, &room_id, &mut answers)?;
    }
    let Some(Checking { mut checks, jobs, named }) = checking else { return Ok((batch, None)) };
    checks.urgent();
    let mut answers = Results { map: results, answer: true };
    let mut jobs = jobs.into_iter();
    while let Some((room_id, id)) = jobs.next() {
        let Some(outcome) = checks.next() else { break };
        match own_result(outcome, &id) {
            Ok(pdu) => admit_one(app, &mut batch, via, pdu, &room_id, &mut answers)?,
            Err(rej) => {
                answers.reject(app, id.as_str(), &rej);
                if named.contains(&id) {
                    // Others of the transaction name it: they now have a gap, which is
                    // filled without the ingest lock.
                    let mut rest = Vec::with_capacity(checks.remaining());
                    for ((room_id, id), outcome) in jobs.by_ref().zip(std::iter::from_fn(|| checks.next())) {
                        match own_result(outcome, &id) {
                            Ok(pdu) => rest.push((pdu, room_id)),
                            Err(rej) => answers.reject(app, id.as_str(), &rej),
                        }
                    }
                    observe_checks_wait(app, &checks);
                    return Ok((batch, Some(Leftover { verified: rest })));
                }
            }
        }
    }
    observe_checks_wait(app, &checks);
    Ok((batch, None))
}

fn observe_checks_wait(app: &Fedlink, checks: &Checks) {
    checks.count(app);
    app.metrics.ingest_phase_seconds.with_label_values(&["checks_wait"]).observe(checks.waited.as_secs_f64());
    app.metrics.ingest_phase_seconds.with_label_values(&["checks_here"]).observe(checks.here.as_secs_f64());
}

/// Auth-check one verified PDU against the batch's views and store and, if admitted, add it
/// to the batch.
fn admit_one(app: &Fedlink, batch: &mut crate::node::Batch<'_>, via: &OwnedServerName, pdu: Pdu, room_id: &OwnedRoomId, answers: &mut Results<'_>) -> Result<(), MatrixError> {
    let id = pdu.event_id.to_string();
    let origin = via.as_str();
    if app.store.has_timeline_event(&id)? {
        app.metrics.pdus_received.with_label_values(&["duplicate"]).inc();
        answers.ok(id);
        return Ok(());
    }
    let views = batch.views();
    let Some(room) = views.rooms.get(room_id).filter(|r| r.bot_joined()) else {
        answers.reject(app, &id, &Rejection::Room("fedlink is not in this room".into()));
        return Ok(());
    };
    let Some(rules) = rules_for(&room.version) else {
        answers.reject(app, &id, &Rejection::Room("unsupported room version".into()));
        return Ok(());
    };
    if !crate::rooms::server_allowed(&app.store, room, origin) {
        answers.reject(app, &id, &Rejection::Room("the room's server ACL denies the sending server".into()));
        return Ok(());
    }
    match crate::rooms::admit(&app.store, room, &pdu, &rules) {
        Ok(crate::rooms::Admitted { status, resolved, superseded, .. }) => {
            let mut entry = PduEntry::new(&pdu, via.clone(), status);
            entry.resolved_state = resolved;
            entry.superseded = superseded;
            batch.push(Entry::Pdu(entry));
            let label = if status == PduStatus::Accepted { "accepted" } else { "soft_failed" };
            app.metrics.pdus_received.with_label_values(&[label]).inc();
            tracing::debug!(%origin, event_id = %id, room_id = %room_id, status = label, "PDU logged");
            answers.ok(id);
        }
        Err(rej) => {
            // Admission may have recorded a state after the event before rejecting it.
            app.store.forget_unwritten(&id);
            answers.reject(app, &id, &rej);
        }
    }
    Ok(())
}

/// The per-PDU answers, skipping events fedlink fetched itself.
struct Results<'a> {
    map: &'a mut BTreeMap<String, Value>,
    answer: bool,
}

impl Results<'_> {
    fn ok(&mut self, id: String) {
        if self.answer {
            self.map.insert(id, json!({}));
        }
    }
    fn reject(&mut self, app: &Fedlink, id: &str, rej: &Rejection) {
        if self.answer {
            reject(app, id, rej, self.map);
        } else {
            app.metrics.pdus_rejected.with_label_values(&[rej.reason()]).inc();
            tracing::info!(event_id = %id, reason = %rej, "rejecting a fetched missing event");
        }
    }
}

/// Most events fetched per room and round to fill a gap.
pub const GAP_FILL_LIMIT: u64 = 20;
/// Most `get_missing_events` rounds per transaction.
pub const GAP_FILL_ROUNDS: usize = 5;
/// Most `event_auth` fetches per transaction.
pub const MAX_AUTH_FETCHES: usize = 10;
/// Most events taken from one `event_auth` answer.
pub const MAX_AUTH_CHAIN: usize = 200;

/// For events whose auth events fedlink does not hold, fetch their auth chain from the
/// origin (`GET /event_auth`), verified, in auth order (bounded).
async fn fetch_missing_auth(app: &Fedlink, origin: &str, events: &[(Pdu, OwnedRoomId)]) -> Vec<(Pdu, OwnedRoomId)> {
    let here: std::collections::BTreeSet<&OwnedEventId> = events.iter().map(|(p, _)| &p.event_id).collect();
    let needy: Vec<&(Pdu, OwnedRoomId)> = events
        .iter()
        .filter(|(p, _)| p.auth_events.iter().any(|a| !here.contains(a) && !app.store.has_event(a.as_str()).unwrap_or(true)))
        .take(MAX_AUTH_FETCHES)
        .collect();
    let mut found: BTreeMap<OwnedEventId, (Pdu, OwnedRoomId)> = BTreeMap::new();
    for (pdu, room_id) in needy {
        let path = format!(
            "/_matrix/federation/v1/event_auth/{}/{}",
            super::client::enc(room_id.as_str()),
            super::client::enc(pdu.event_id.as_str())
        );
        let chain = match app.client.request(origin, reqwest::Method::GET, &path, None).await {
            Ok(v) => v.get("auth_chain").and_then(Value::as_array).cloned().unwrap_or_default(),
            Err(e) => {
                tracing::warn!(%origin, event_id = %pdu.event_id, error = %e, "cannot fetch missing auth events");
                continue;
            }
        };
        for raw in chain.into_iter().take(MAX_AUTH_CHAIN) {
            if let Ok(Pre::Fresh(p, r)) = precheck(app, origin, raw).await {
                if r == *room_id && !here.contains(&p.event_id) {
                    found.insert(p.event_id.clone(), (*p, r));
                }
            }
        }
    }
    let by_id: BTreeMap<OwnedEventId, Pdu> = found.iter().map(|(k, (p, _))| (k.clone(), p.clone())).collect();
    super::membership::auth_order(&by_id).into_iter().filter_map(|id| found.remove(&id)).collect()
}

/// For received PDUs whose parents are still unknown after `get_missing_events` (a gap
/// longer than it fills), fetch the state at each missing parent as Synapse does: the
/// parent (`/event`), the ids of the state before it (`/state_ids`), and the events of
/// that state and its auth chain fedlink lacks (`/event`, at most
/// [`MAX_GAP_STATE_EVENTS`]). All are signature-checked here; auth checks and storage
/// happen under the ingest lock ([`apply_gap_state`]).
async fn fetch_state_at_gaps(app: &Fedlink, origin: &str, verified: &[(Pdu, OwnedRoomId)]) -> Vec<GapState> {
    let here: std::collections::BTreeSet<&OwnedEventId> = verified.iter().map(|(p, _)| &p.event_id).collect();
    let mut missing: BTreeMap<OwnedEventId, OwnedRoomId> = BTreeMap::new();
    for (p, room) in verified {
        for prev in &p.prev_events {
            if !here.contains(prev) && !app.store.has_event(prev.as_str()).unwrap_or(true) && missing.len() < MAX_GAP_STATES {
                missing.insert(prev.clone(), room.clone());
            }
        }
    }
    // Only a server the room's ACL lets take part may make fedlink fetch on its word.
    {
        let views = app.views.read().await;
        missing.retain(|_, room_id| views.rooms.get(room_id).is_some_and(|r| crate::rooms::server_allowed(&app.store, r, origin)));
    }
    let mut out = Vec::new();
    for (prev_id, room_id) in missing {
        match fetch_gap(app, origin, &room_id, &prev_id).await {
            Ok(gap) => {
                app.metrics.gap_fills.with_label_values(&["state"]).inc();
                tracing::info!(%origin, %room_id, prev = %prev_id, state = gap.state_ids.len(), fetched = gap.events.len(), "fetched the state at a gap get_missing_events could not fill");
                out.push(gap);
            }
            Err(reason) => {
                app.metrics.gap_fills.with_label_values(&["state_error"]).inc();
                tracing::warn!(%origin, %room_id, prev = %prev_id, %reason, "cannot fetch the state at a gap; accepting the events against the room's state");
            }
        }
    }
    out
}

async fn fetch_event(app: &Fedlink, origin: &str, event_id: &OwnedEventId) -> Result<Pre, String> {
    let path = format!("/_matrix/federation/v1/event/{}", super::client::enc(event_id.as_str()));
    let v = app.client.request(origin, reqwest::Method::GET, &path, None).await.map_err(|e| format!("/event {event_id}: {e}"))?;
    let raw = v.get("pdus").and_then(Value::as_array).and_then(|a| a.first()).cloned().ok_or_else(|| format!("/event {event_id}: no PDU"))?;
    let pre = precheck(app, origin, raw).await.map_err(|(_, r)| format!("/event {event_id}: {r}"))?;
    match &pre {
        Pre::Fresh(p, _) if p.event_id != *event_id => Err(format!("/event {event_id} answered another event {}", p.event_id)),
        Pre::Known(id) if id != event_id.as_str() => Err(format!("/event {event_id} answered another event {id}")),
        _ => Ok(pre),
    }
}

async fn fetch_gap(app: &Fedlink, origin: &str, room_id: &OwnedRoomId, prev_id: &OwnedEventId) -> Result<GapState, String> {
    let prev = match fetch_event(app, origin, prev_id).await? {
        Pre::Fresh(p, r) if r == *room_id => *p,
        Pre::Fresh(..) => return Err("the missing parent is in another room".into()),
        Pre::Known(_) => return Err("the missing parent arrived meanwhile".into()),
    };
    let path = format!(
        "/_matrix/federation/v1/state_ids/{}?event_id={}",
        super::client::enc(room_id.as_str()),
        super::client::enc(prev_id.as_str())
    );
    let v = app.client.request(origin, reqwest::Method::GET, &path, None).await.map_err(|e| format!("/state_ids: {e}"))?;
    let ids = |k: &str| -> Vec<OwnedEventId> {
        v.get(k).and_then(Value::as_array).map(|a| a.iter().filter_map(|i| i.as_str().and_then(|s| OwnedEventId::try_from(s).ok())).collect()).unwrap_or_default()
    };
    let state_ids = ids("pdu_ids");
    let mut need: Vec<OwnedEventId> = state_ids.iter().chain(ids("auth_chain_ids").iter()).chain(prev.auth_events.iter()).cloned().collect();
    need.sort();
    need.dedup();
    need.retain(|id| !app.store.has_event(id.as_str()).unwrap_or(true));
    if need.len() > MAX_GAP_STATE_EVENTS {
        return Err(format!("{} events of the state are missing; at most {MAX_GAP_STATE_EVENTS} are fetched one by one", need.len()));
    }
    let mut events = Vec::new();
    for id in need {
        match fetch_event(app, origin, &id).await {
            Ok(Pre::Fresh(p, r)) if r == *room_id => events.push(*p),
            Ok(_) => {}
            Err(e) => tracing::info!(%origin, %room_id, event_id = %id, reason = %e, "a state event at a gap could not be fetched"),
        }
    }
    Ok(GapState { room_id: room_id.clone(), prev, state_ids, events })
}

/// Store what was fetched for a gap (as outliers, each checked against its own auth
/// events) and record the state after the missing parent, so the events after the gap are
/// checked against the state the origin had there (resolved with the room's in `admit`).
/// The state is used only whole: every listed event must be known, in this room, and pass
/// its auth checks; the room's create event must be in it; and the parent must pass the
/// authorization rules against it. Otherwise nothing is stored and the events after the gap
/// are checked against the room's current state, as before. Never fails the transaction.
async fn apply_gap_state(app: &Fedlink, via: &OwnedServerName, gap: GapState) -> Result<(), MatrixError> {
    let GapState { room_id, prev, state_ids, events } = gap;
    let prev_id = prev.event_id.clone();
    if let Err(reason) = gap_state(app, via, &room_id, prev, &state_ids, events).await {
        app.metrics.gap_fills.with_label_values(&["state_refused"]).inc();
        tracing::warn!(%room_id, prev = %prev_id, via = %via, %reason, "not using the state fetched at a gap");
    }
    Ok(())
}

async fn gap_state(app: &Fedlink, via: &OwnedServerName, room_id: &OwnedRoomId, prev: Pdu, state_ids: &[OwnedEventId], events: Vec<Pdu>) -> Result<(), String> {
    let rules = app.views.read().await.rooms.get(room_id).and_then(|r| rules_for(&r.version)).ok_or("the room is gone")?;
    let mut all: BTreeMap<OwnedEventId, Pdu> = events.into_iter().map(|p| (p.event_id.clone(), p)).collect();
    all.insert(prev.event_id.clone(), prev.clone());
    let mut checked: BTreeMap<OwnedEventId, Pdu> = BTreeMap::new();
    for id in super::membership::auth_order(&all) {
        let pdu = all.remove(&id).expect("ordered ids come from the map");
        if app.store.has_event(id.as_str()).unwrap_or(true) {
            continue;
        }
        check_auth(&app.store, None, &pdu, &rules, &checked).map_err(|rej| format!("{id} fails its auth checks: {rej}"))?;
        checked.insert(id, pdu);
    }
    let prev = checked.get(&prev.event_id).cloned().ok_or("the missing parent fails its auth checks")?;
    // The state before the parent, whole and of this room only.
    let mut before = crate::rooms::state::StateMap::new();
    for id in state_ids {
        let p = checked.get(id).cloned().map(std::sync::Arc::new).or_else(|| crate::rooms::load_pdu(&app.store, id, &rules)).ok_or_else(|| format!("state event {id} is unknown"))?;
        if p.room_id != *room_id {
            return Err(format!("state event {id} belongs to another room"));
        }
        let Some(k) = &p.state_key else { return Err(format!("{id} is not a state event")) };
        if before.insert((p.kind.to_string(), k.clone()), p.event_id.clone()).is_some() {
            return Err(format!("two state events for ({}, {k})", p.kind));
        }
    }
    if !before.contains_key(&("m.room.create".to_owned(), String::new())) && !rules.authorization.room_create_event_id_as_room_id {
        return Err("the state has no create event".into());
    }
    let storage = |e: crate::store::StoreError| e.to_string();
    // Checked against the state before it with the events not yet logged at hand.
    let extra: BTreeMap<OwnedEventId, Pdu> = checked.clone();
    {
        let fetch = |id: &ruma::EventId| -> Option<std::sync::Arc<Pdu>> {
            extra.get(id).cloned().map(std::sync::Arc::new).or_else(|| crate::rooms::load_pdu(&app.store, id, &rules))
        };
        ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, &prev, |t, sk| {
            before.get(&(t.to_string(), sk.to_owned())).and_then(|id| fetch(id))
        })
        .map_err(|e| format!("the missing parent is not allowed by the state before it: {e}"))?;
    }
    let mut after = before;
    if let Some(k) = &prev.state_key {
        after.insert((prev.kind.to_string(), k.clone()), prev.event_id.clone());
    }
    // The root first: if logging the events fails, the parent is not stored and the gap is
    // fetched again next time.
    let root = crate::rooms::state::from_map(&app.store, &after).map_err(storage)?;
    app.store.put_state_root_of(prev.event_id.as_str(), root);
    let entries: Vec<Entry> = checked.values().map(|p| Entry::Pdu(PduEntry::new(p, via.clone(), PduStatus::Outlier))).collect();
    let n = entries.len();
    app.append(entries, None).await.map_err(|e| e.to_string())?;
    tracing::info!(%room_id, prev = %prev.event_id, stored = n, "closing a gap with the state at it");
    Ok(())
}

/// For rooms where a received PDU's `prev_events` are unknown, ask the origin for the
/// missing events (`get_missing_events`, bounded) and verify them like received PDUs.
/// Failures are logged; the received events are still processed.
async fn fill_gaps(app: &Fedlink, origin: &str, verified: &[(Pdu, OwnedRoomId)]) -> Vec<(Pdu, OwnedRoomId)> {
    let known_here: std::collections::BTreeSet<&OwnedEventId> = verified.iter().map(|(p, _)| &p.event_id).collect();
    let mut latest: BTreeMap<&OwnedRoomId, Vec<String>> = BTreeMap::new();
    for (p, room) in verified {
        let gap = p.prev_events.iter().any(|e| !known_here.contains(e) && !app.store.has_event(e.as_str()).unwrap_or(true));
        if gap {
            latest.entry(room).or_default().push(p.event_id.to_string());
        }
    }
    let mut out = Vec::new();
    for (room_id, latest_events) in latest {
        let earliest: Vec<String> = match app.views.read().await.rooms.get(room_id) {
            Some(r) => r.extremities.iter().map(|e| e.to_string()).collect(),
            None => continue,
        };
        let body = json!({ "limit": GAP_FILL_LIMIT, "min_depth": 0, "earliest_events": earliest, "latest_events": latest_events });
        let path = format!("/_matrix/federation/v1/get_missing_events/{}", super::client::enc(room_id.as_str()));
        let events = match app.client.request(origin, reqwest::Method::POST, &path, Some(&body)).await {
            Ok(v) => v.get("events").and_then(Value::as_array).cloned().unwrap_or_default(),
            Err(e) => {
                app.metrics.gap_fills.with_label_values(&["error"]).inc();
                tracing::warn!(%origin, %room_id, error = %e, "get_missing_events failed; accepting the events with a gap");
                continue;
            }
        };
        app.metrics.gap_fills.with_label_values(&["ok"]).inc();
        let n = events.len();
        for raw in events.into_iter().take(GAP_FILL_LIMIT as usize) {
            match precheck(app, origin, raw).await {
                Ok(Pre::Fresh(pdu, room)) if &room == room_id => out.push((*pdu, room)),
                Ok(_) => {}
                Err((id, rej)) => tracing::info!(%origin, event_id = ?id, reason = %rej, "fetched missing event rejected"),
            }
        }
        app.metrics.gap_events_fetched.inc_by(out.len() as u64);
        tracing::info!(%origin, %room_id, returned = n, kept = out.len(), "filled a gap with get_missing_events");
    }
    out
}

fn reject(app: &Fedlink, id: &str, rej: &Rejection, results: &mut BTreeMap<String, Value>) {
    app.metrics.pdus_received.with_label_values(&["rejected"]).inc();
    app.metrics.pdus_rejected.with_label_values(&[rej.reason()]).inc();
    tracing::info!(event_id = %id, reason = %rej, "rejecting PDU");
    results.insert(id.to_owned(), json!({ "error": rej.to_string() }));
}

type PreError = (Option<String>, Rejection);

/// The outcome of the lock-free checks.
enum Pre<T = Pdu> {
    /// Already in the log: answered as success without more work.
    Known(String),
    /// Parsed and signature-checked (or, as [`Unverified`], with the keys to check it);
    /// auth checks come next.
    Fresh(Box<T>, OwnedRoomId),
}

/// Parse a PDU against its room's rules and verify its signatures.
async fn precheck(app: &Fedlink, origin: &str, raw: Value) -> Result<Pre, PreError> {
    match precheck_keys(app, origin, raw).await? {
        Pre::Known(id) => Ok(Pre::Known(id)),
        Pre::Fresh(job, room) => {
            let id = job.pdu.event_id.to_string();
            Ok(Pre::Fresh(Box::new(job.verify().map_err(|r| (Some(id), r))?), room))
        }
    }
}

/// Parse a PDU against its room's rules and get the keys to verify it with.
async fn precheck_keys(app: &Fedlink, origin: &str, raw: Value) -> Result<Pre<Unverified>, PreError> {
    let rooms = rooms_of(app, std::slice::from_ref(&raw)).await;
    precheck_keys_in(app, origin, raw, &rooms).await
}

/// What the lock-free checks need of the rooms of `pdus` (version, whether the bot is
/// joined), read under one views lock: a batch being applied holds that lock, and checking a
/// transaction must not wait for it once per PDU.
type RoomsOf = std::collections::HashMap<OwnedRoomId, (ruma::RoomVersionId, bool)>;

async fn rooms_of(app: &Fedlink, pdus: &[Value]) -> RoomsOf {
    let ids: std::collections::BTreeSet<OwnedRoomId> = pdus.iter().filter_map(|raw| RoomId::parse(raw.get("room_id")?.as_str()?).ok()).collect();
    let views = app.views.read().await;
    ids.into_iter().filter_map(|id| views.rooms.get(&id).map(|r| (r.version.clone(), r.bot_joined())).map(|v| (id, v))).collect()
}

async fn precheck_keys_in(app: &Fedlink, origin: &str, raw: Value, rooms: &RoomsOf) -> Result<Pre<Unverified>, PreError> {
    let room_id = raw
        .get("room_id")
        .and_then(Value::as_str)
        .and_then(|r| RoomId::parse(r).ok())
        .ok_or((None, Rejection::Format("PDU has no valid room_id".into())))?;
    let room = rooms.get(&room_id).cloned();
    let Some((version, joined)) = room else {
        return Err((None, Rejection::Room(format!("unknown room {room_id}"))));
    };
    let rules = rules_for(&version).ok_or((None, Rejection::Room("unsupported room version".into())))?;
    if !joined {
        // Refused before any key fetch: a peer cannot make fedlink verify events of rooms
        // it is not in.
        let id = Pdu::parse(canonical_object(raw).map_err(|e| (None, Rejection::Format(e.to_string())))?, &rules).ok().map(|p| p.event_id.to_string());
        return Err((id, Rejection::Room("fedlink is not in this room".into())));
    }
    let obj = canonical_object(raw).map_err(|e| (None, Rejection::Format(e.to_string())))?;
    let (pdu, signed) = Pdu::parse_signed(obj, &rules).map_err(|e| (None, Rejection::Format(e.to_string())))?;
    let id = pdu.event_id.to_string();
    if pdu.room_id != room_id {
        return Err((Some(id), Rejection::Format("room_id mismatch".into())));
    }
    // Only a written event is answered as known without more work: one staged by a batch
    // under way may still be dropped (the check under the ingest lock catches it then).
    if app.store.has_written_timeline_event(&id).unwrap_or(false) {
        app.metrics.pdus_received.with_label_values(&["duplicate"]).inc();
        return Ok(Pre::Known(id));
    }
    let keys = crate::rooms::keys_to_verify(&app.keys, &pdu.json, &rules, Some(origin)).await.map_err(|r| (Some(id.clone()), r))?;
    Ok(Pre::Fresh(Box::new(Unverified { pdu, signed, keys, rules }), room_id))
}

/// A parsed PDU with the keys its signatures are checked against.
struct Unverified {
    pdu: Pdu,
    /// The bytes its signatures cover, kept from parsing (they gave its event id).
    signed: String,
    keys: ruma::signatures::PublicKeyMap,
    rules: ruma::room_version_rules::RoomVersionRules,
}

impl Unverified {
    /// Check signatures and content hash (pure CPU work).
    fn verify(self) -> Result<Pdu, Rejection> {
        let Unverified { mut pdu, signed, keys, rules } = self;
        let json = std::mem::take(&mut pdu.json);
        let (checked, content_kept) = crate::rooms::verify_signed(&keys, json, signed.as_bytes(), &rules)?;
        if content_kept {
            // Only `unsigned` was dropped: nothing parsed from the event changed.
            pdu.json = checked;
            Ok(pdu)
        } else {
            Pdu::parse(checked, &rules).map_err(|e| Rejection::Format(e.to_string()))
        }
    }
}

/// A transaction is admitted as its checks end only with more checked PDUs than this (with
/// fewer, the admitting thread would do most checks itself, under the ingest lock).
const VERIFY_CHUNK: usize = 8;

/// Signature checks of a transaction's PDUs (the bulk of its CPU work), queued as each PDU
/// is parsed and run by the process's checking threads ([`VerifyPool`]) while the caller
/// parses the rest; the caller then takes the results in order. A caller waiting for a
/// result checks a queued PDU itself rather than idle, so every core is busy: parsing,
/// checking, or admitting what was checked, and no transaction waits for another's checks.
struct Checks {
    shared: std::sync::Arc<ChecksShared>,
    rx: std::sync::mpsc::Receiver<(usize, Result<Pdu, Rejection>)>,
    /// Results that came in ahead of the one taken next.
    ready: Vec<Option<Result<Pdu, Rejection>>>,
    next: usize,
    /// Time spent blocked waiting for a checking thread's result.
    waited: std::time::Duration,
    /// Time spent checking jobs on the caller's thread, and how many.
    here: std::time::Duration,
    here_count: usize,
}

/// One transaction's queue of checks, shared with the checking threads.
struct ChecksShared {
    queue: std::sync::Mutex<ChecksQueue>,
    tx: std::sync::mpsc::Sender<(usize, Result<Pdu, Rejection>)>,
}

#[derive(Default)]
struct ChecksQueue {
    jobs: Vec<Option<Unverified>>,
    /// Jobs `0..claimed` are taken (by a checking thread or the caller), each once, in order.
    claimed: usize,
    /// No more jobs will be added.
    closed: bool,
    /// The caller is gone: no job is claimed any more.
    gone: bool,
}

impl ChecksShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, ChecksQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next unclaimed job, if any.
    fn claim(&self) -> Option<(usize, Unverified)> {
        let mut q = self.lock();
        if q.gone || q.claimed >= q.jobs.len() {
            return None;
        }
        let i = q.claimed;
        q.claimed += 1;
        q.jobs[i].take().map(|job| (i, job))
    }

    /// Whether no job will be left to claim (so the pool can forget it).
    fn finished(&self) -> bool {
        let q = self.lock();
        q.gone || (q.closed && q.claimed >= q.jobs.len())
    }
}

/// A check's result as its own event's: fail closed if it were ever another's.
fn own_result(outcome: Result<Pdu, Rejection>, id: &OwnedEventId) -> Result<Pdu, Rejection> {
    match outcome {
        Ok(pdu) if pdu.event_id != *id => Err(Rejection::Format("internal: a verification result for another event".into())),
        other => other,
    }
}

/// Check one job; a panic in the check rejects the event instead of losing its result.
fn verify_caught(job: Unverified) -> Result<Pdu, Rejection> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.verify()))
        .unwrap_or_else(|_| Err(Rejection::Format("internal: the signature check failed".into())))
}

/// The process's signature-checking threads (`fedlink-verify`, one fewer than the machine
/// has cores, started on first use): they take queued jobs of all transactions under way,
/// oldest transaction first. Their number does not grow with the transactions in flight.
struct VerifyPool {
    active: std::sync::Mutex<std::collections::VecDeque<std::sync::Arc<ChecksShared>>>,
    work: std::sync::Condvar,
    /// Threads started.
    started: std::sync::atomic::AtomicUsize,
}

impl VerifyPool {
    fn get() -> &'static VerifyPool {
        static POOL: std::sync::OnceLock<VerifyPool> = std::sync::OnceLock::new();
        static STARTED: std::sync::Once = std::sync::Once::new();
        let pool: &'static VerifyPool = POOL.get_or_init(|| VerifyPool { active: Default::default(), work: std::sync::Condvar::new(), started: Default::default() });
        STARTED.call_once(|| {
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            for _ in 1..cores {
                // A thread that cannot be started leaves its share to the callers.
                if std::thread::Builder::new().name("fedlink-verify".into()).spawn(move || pool.run()).is_ok() {
                    pool.started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        pool
    }

    fn threads(&self) -> usize {
        self.started.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<std::sync::Arc<ChecksShared>>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        loop {
            let (shared, i, job) = {
                let mut active = self.lock();
                loop {
                    active.retain(|s| !s.finished());
                    if let Some(found) = active.iter().find_map(|s| s.claim().map(|(i, job)| (s.clone(), i, job))) {
                        break found;
                    }
                    active = self.work.wait(active).unwrap_or_else(|e| e.into_inner());
                }
            };
            // The caller may be gone: its result is then dropped.
            let _ = shared.tx.send((i, verify_caught(job)));
        }
    }
}

impl Checks {
    /// Whether `n` checked PDUs are enough for a transaction to be admitted as its checks
    /// end: there is a checking thread to share them with, and more than a few.
    fn overlapped(n: usize) -> bool {
        VerifyPool::get().threads() > 0 && n > VERIFY_CHUNK
    }

    /// An empty queue of checks.
    fn start() -> Checks {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = std::sync::Arc::new(ChecksShared { queue: Default::default(), tx });
        Checks { shared, rx, ready: Vec::new(), next: 0, waited: std::time::Duration::ZERO, here: std::time::Duration::ZERO, here_count: 0 }
    }

    /// Queue a job for checking (the first makes the queue known to the checking threads).
    fn add(&mut self, job: Unverified) {
        self.shared.lock().jobs.push(Some(job));
        self.ready.push(None);
        let pool = VerifyPool::get();
        if pool.threads() == 0 {
            return;
        }
        // Under the pool's lock, so a thread that found no work is either waiting (and
        // woken) or has not looked yet (and finds this job).
        let mut active = pool.lock();
        if self.ready.len() == 1 {
            active.push_back(self.shared.clone());
        }
        pool.work.notify_one();
    }

    /// No more jobs.
    fn close(&mut self) {
        self.shared.lock().closed = true;
    }

    /// How many results are still to be taken.
    fn remaining(&self) -> usize {
        self.ready.len() - self.next
    }

    /// The next job's result, in the order of the jobs; `None` once all were taken.
    fn next(&mut self) -> Option<Result<Pdu, Rejection>> {
        let i = self.next;
        if i >= self.ready.len() {
            return None;
        }
        loop {
            while let Ok((j, r)) = self.rx.try_recv() {
                self.ready[j] = Some(r);
            }
            if let Some(r) = self.ready[i].take() {
                self.next += 1;
                return Some(r);
            }
            if let Some((j, job)) = self.shared.claim() {
                let t = std::time::Instant::now();
                self.ready[j] = Some(verify_caught(job));
                self.here += t.elapsed();
                self.here_count += 1;
                continue;
            }
            // Job `i` is being checked on a checking thread, which always sends its result
            // (this holds a sender, so `recv` cannot fail).
            let t = std::time::Instant::now();
            let (j, r) = self.rx.recv().expect("the checks hold a sender");
            self.ready[j] = Some(r);
            self.waited += t.elapsed();
        }
    }

    /// All the results, in the order of the jobs.
    fn all(&mut self) -> Vec<Result<Pdu, Rejection>> {
        self.close();
        std::iter::from_fn(|| self.next()).collect()
    }

    /// Have the checking threads take this transaction's jobs before others' (it holds the
    /// ingest lock, so everyone waits for it).
    fn urgent(&self) {
        let pool = VerifyPool::get();
        if pool.threads() == 0 {
            return;
        }
        let mut active = pool.lock();
        if let Some(at) = active.iter().position(|s| std::sync::Arc::ptr_eq(s, &self.shared)) {
            if let Some(me) = active.remove(at) {
                active.push_front(me);
            }
        }
        pool.work.notify_all();
    }

    /// Count the checks by who did them.
    fn count(&self, app: &Fedlink) {
        let pooled = self.ready.len().saturating_sub(self.here_count);
        app.metrics.signature_checks.with_label_values(&["pool"]).inc_by(pooled as u64);
        app.metrics.signature_checks.with_label_values(&["caller"]).inc_by(self.here_count as u64);
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        // Checking threads claim nothing more of it, and forget it at their next look.
        let mut q = self.shared.lock();
        q.gone = true;
        q.jobs.clear();
    }
}

fn edu_metric_label(edu_type: &str) -> &'static str {
    match edu_type {
        "m.receipt" => "m.receipt",
        "m.typing" => "m.typing",
        "m.presence" => "m.presence",
        _ => "other",
    }
}

fn own_user(origin: &OwnedServerName, user: &str) -> Result<OwnedUserId, String> {
    let u = UserId::parse(user).map_err(|e| format!("bad user id `{user}`: {e}"))?;
    if u.server_name() != origin {
        return Err(format!("{origin} may not speak for {u}"));
    }
    Ok(u)
}

/// Validate one EDU into log entries. Types fedlink does not act on give no entries.
fn parse_edu(app: &Fedlink, views: &crate::core::views::Views, origin: &OwnedServerName, edu: &Value) -> Result<Vec<Entry>, String> {
    let edu_type = edu.get("edu_type").and_then(Value::as_str).ok_or("EDU has no edu_type")?;
    let content = edu.get("content").and_then(Value::as_object).ok_or("EDU content must be an object")?;
    let mut out = Vec::new();
    match edu_type {
        "m.receipt" => {
            for (room, by_type) in content {
                let room_id = RoomId::parse(room).map_err(|e| format!("bad room id: {e}"))?;
                if !views.rooms.get(&room_id).is_some_and(|r| {
                    r.bot_joined() && r.joined_members().any(|u| u.server_name() == origin) && crate::rooms::server_allowed(&app.store, r, origin.as_str())
                }) {
                    continue;
                }
                let by_type = by_type.as_object().ok_or("receipt types must be an object")?;
                for (receipt_type, by_user) in by_type {
                    if receipt_type != "m.read" {
                        continue;
                    }
                    for (user, r) in by_user.as_object().ok_or("receipt users must be an object")? {
                        let user_id = own_user(origin, user)?;
                        let event_id: OwnedEventId = r
                            .get("event_ids")
                            .and_then(Value::as_array)
                            .and_then(|a| a.last())
                            .and_then(Value::as_str)
                            .and_then(|e| e.try_into().ok())
                            .ok_or("receipt needs event_ids")?;
                        let data = r.get("data");
                        app.metrics.receipts_in.with_label_values(&["federation"]).inc();
                        let stored = app.store.get_event(event_id.as_str()).ok().flatten().filter(|e| e.room_id == room_id);
                        let (depth, event_ts) = (stored.as_ref().map(|e| e.depth), stored.as_ref().map(|e| e.origin_server_ts));
                        // A receipt without a thread id on an event in a thread reads that thread.
                        let sent_thread = data.and_then(|d| d.get("thread_id")).and_then(Value::as_str).map(String::from);
                        let inferred = match &sent_thread {
                            None => stored.as_ref().and_then(|e| crate::core::log_entry::thread_root(&e.pdu)),
                            Some(_) => None,
                        };
                        out.push(Entry::Receipt(ReceiptEntry {
                            origin: origin.clone(),
                            room_id: room_id.clone(),
                            receipt_type: receipt_type.clone(),
                            user_id,
                            event_id,
                            ts: data.and_then(|d| d.get("ts")).and_then(Value::as_u64),
                            thread_inferred: inferred.is_some(),
                            thread_id: sent_thread.or(inferred.map(|r| r.to_string())),
                            depth,
                            event_ts,
                            via_appservice: None,
                        }));
                    }
                }
            }
        }
        "m.typing" => {
            let room_id = content
                .get("room_id")
                .and_then(Value::as_str)
                .and_then(|r| RoomId::parse(r).ok())
                .ok_or("typing needs room_id")?;
            let user = content.get("user_id").and_then(Value::as_str).ok_or("typing needs user_id")?;
            let user_id = own_user(origin, user)?;
            let typing = content.get("typing").and_then(Value::as_bool).ok_or("typing needs typing")?;
            // Kept only for linked accounts, in rooms the bot shares with the sender.
            if views.directory.by_account.contains_key(&user_id)
                && views.rooms.get(&room_id).is_some_and(|r| r.bot_joined() && r.joined_members().any(|u| u.server_name() == origin))
            {
                out.push(Entry::Typing(TypingEntry { origin: origin.clone(), room_id, user_id, typing }));
            }
        }
        "m.presence" => {
            let push = content.get("push").and_then(Value::as_array).ok_or("presence needs push")?;
            if push.len() > MAX_PRESENCE_PUSH {
                return Err(format!("presence carries {} updates; at most {MAX_PRESENCE_PUSH} are allowed", push.len()));
            }
            for p in push {
                let user = p.get("user_id").and_then(Value::as_str).ok_or("presence needs user_id")?;
                let user_id = own_user(origin, user)?;
                let presence = p.get("presence").and_then(Value::as_str).ok_or("presence needs presence")?;
                if !matches!(presence, "online" | "unavailable" | "offline") {
                    return Err(format!("unknown presence `{presence}`"));
                }
                // Presence matters only for linked accounts (presence following).
                if !views.directory.by_account.contains_key(&user_id) {
                    continue;
                }
                out.push(Entry::Presence(PresenceEntry {
                    origin: origin.clone(),
                    user_id,
                    presence: presence.to_owned(),
                    last_active_ago: p.get("last_active_ago").and_then(Value::as_u64),
                }));
            }
        }
        _ => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Linear;
    use crate::core::pdu::Pdu;

    /// A parsed message event with these parents and auth events (ids are made up: nothing
    /// here checks hashes).
    fn pdu(id: &str, depth: u64, prev: &[&str], auth: &[&str]) -> Pdu {
        let mut p = Pdu::parse(
            crate::core::pdu::canonical_object(serde_json::json!({
                "room_id": "!r:x", "sender": "@a:x", "type": "m.room.message", "content": {},
                "prev_events": prev, "auth_events": auth, "depth": depth, "origin_server_ts": 1,
                "hashes": { "sha256": "x" }, "signatures": {},
            }))
            .unwrap(),
            &ruma::RoomVersionId::V12.rules().unwrap(),
        )
        .unwrap();
        p.event_id = ruma::OwnedEventId::try_from(id).unwrap();
        p
    }

    fn linear(pdus: &[Pdu], stored: &[&str]) -> Option<Vec<String>> {
        let mut l = Linear::new(true);
        for p in pdus {
            l.add(p, |id| stored.contains(&id));
        }
        l.named().map(|n| {
            let mut v: Vec<String> = n.into_iter().map(|e| e.to_string()).collect();
            v.sort();
            v
        })
    }

    /// Each rule the old path's gap fills and auth fetches stand for: a transaction is linear
    /// only if nothing would be fetched and the order by depth is its own.
    #[test]
    fn a_transaction_is_linear_only_when_nothing_would_be_fetched_or_reordered() {
        let stored = ["$s", "$auth"];
        let (a, b, c) = (pdu("$a", 5, &["$s"], &["$auth"]), pdu("$b", 6, &["$a"], &["$auth", "$a"]), pdu("$c", 7, &["$b"], &["$auth"]));
        assert_eq!(linear(&[a.clone(), b.clone(), c.clone()], &stored), Some(vec!["$a".into(), "$b".into()]), "a chain off stored events; the ones others name");
        let (x, y) = (pdu("$x", 6, &["$s"], &["$auth"]), pdu("$y", 5, &["$s"], &["$auth"]));
        assert_eq!(linear(&[y.clone(), x.clone()], &stored), Some(vec![]), "two forks off stored events");
        assert_eq!(linear(&[x, y], &stored), None, "depth goes down: the old path reorders");
        assert_eq!(linear(&[b.clone(), a.clone(), c.clone()], &stored), None, "a parent later in the transaction");
        assert_eq!(linear(&[a.clone(), c.clone()], &stored), None, "a parent neither stored nor earlier: a gap to fill");
        assert_eq!(linear(&[pdu("$a", 5, &["$s"], &["$gone"])], &stored), None, "an auth event missing: fetched");
        assert_eq!(linear(&[a.clone(), b.clone(), b.clone()], &stored), None, "an event twice");
        assert_eq!(linear(&[a.clone(), pdu("$f", 5, &["$s"], &["$auth"])], &stored), Some(vec![]), "a fork at equal depth: nobody names the other");
        assert!(Linear::new(false).named().is_none(), "not wanted");
    }
}
