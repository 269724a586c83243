//! The bot's conversations (a service): answers the commands people send in their direct
//! chats with the bot ([`crate::core::bot`] decides), tells a person once per room and
//! reason when fedlink cannot keep them in step, and says once in an encrypted chat that
//! it cannot read it.
//!
//! The bot's messages are `m.notice` events it authors and signs, checked against the
//! room's auth rules, and logged together with what the command changed and the record
//! that the command is handled, in one log append: a crash either loses all of it (and
//! the command is answered after the restart) or none of it (and it is not answered
//! twice). Delivery to the chat's other server goes through the outbox.

use std::{sync::Arc, time::Duration};

use rand::Rng;
use reqwest::Method;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde_json::{json, Value};
use sha2::Digest;

use crate::{
    core::{
        bot::{self as core_bot, Command, Ctx, Outcome, RoomRef},
        log_entry::{BotTold, CommandHandled, Entry, PduEntry, PduStatus},
        pdu::rules_for,
        views::Views,
    },
    federation::client::enc,
    node::{now_ms, Fedlink},
    rooms::build,
};

/// Letters of a link code: no 0/O, 1/I/L, so a code read aloud or retyped survives.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";

/// A fresh link code, `XXXX-XXXX` (about 40 bits).
fn new_code() -> String {
    let mut rng = rand::thread_rng();
    let c: String = (0..8).map(|_| CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())] as char).collect();
    format!("{}-{}", &c[..4], &c[4..])
}

/// How link requests store a code: SHA-256 (hex) of its normalised form.
pub fn code_hash(code: &str) -> String {
    sha2::Sha256::digest(core_bot::normalize_code(code).as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A room's name (`m.room.name`), from the stored state event.
pub fn room_name(app: &Fedlink, views: &Views, room_id: &OwnedRoomId) -> Option<String> {
    let id = views.rooms.get(room_id)?.state_event("m.room.name", "")?;
    let e = app.store.get_event(id.as_str()).ok().flatten()?;
    let name = e.pdu.get("content")?.get("name")?.as_str()?.trim().to_owned();
    (!name.is_empty()).then(|| name.chars().take(80).collect())
}

/// Chats served at once (one slow alias lookup never holds up the others).
const CONCURRENT_CHATS: usize = 16;

/// Longest wait for an alias's server to answer.
const ALIAS_TIMEOUT: Duration = Duration::from_secs(5);

/// The bot service's own state: wrong link codes per account (in memory: a restart
/// forgives them; a code has about 40 bits and expires).
#[derive(Default)]
pub struct BotState {
    wrong_codes: std::sync::Mutex<std::collections::HashMap<OwnedUserId, u32>>,
}

/// Answers commands in the bot's chats until `stop`.
pub async fn worker(app: Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    use futures::StreamExt;
    let mut changes = app.changes.subscribe();
    loop {
        changes.borrow_and_update();
        let chats: Vec<OwnedRoomId> = app.views.read().await.index.chat_work.iter().cloned().collect();
        let failed = std::sync::atomic::AtomicBool::new(false);
        futures::stream::iter(chats)
            .for_each_concurrent(CONCURRENT_CHATS, |chat| {
                let (app, failed) = (&app, &failed);
                async move {
                    if let Err(reason) = serve_chat(app, &chat).await {
                        tracing::warn!(room_id = %chat, %reason, "cannot answer in the bot's chat yet; will retry");
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
            .await;
        // A failure (storage) is retried on a timer.
        let wait = if failed.into_inner() { Duration::from_secs(5) } else { Duration::from_secs(300) };
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Everything the bot owes chat `room_id`: the encrypted-chat notice, then each command's
/// answer in order.
async fn serve_chat(app: &Fedlink, room_id: &OwnedRoomId) -> Result<(), String> {
    let (owner, commands, encrypted) = {
        let views = app.views.read().await;
        let Some(room) = views.rooms.get(room_id) else { return Ok(()) };
        let Some(chat) = room.bot_chat.as_ref() else { return Ok(()) };
        let commands: Vec<OwnedEventId> = chat.commands.values().cloned().collect();
        let Some(owner) = room.chat_owner(&views.bot_user_id) else {
            // No longer a chat (the owner left, or someone else came in): the bot leaves,
            // and its waiting commands are dropped.
            drop(views);
            return leave_chat(app, room_id).await;
        };
        (owner.clone(), commands, room.encrypted() && !chat.said("encrypted"))
    };
    if encrypted {
        let _lock = app.lock_ingest().await;
        let told = Entry::BotTold(BotTold { room_id: room_id.clone(), about: room_id.clone(), reason: "encrypted".into() });
        let msg = Message { room_id: room_id.clone(), owner: owner.clone(), text: core_bot::encrypted_notice(&app.bot), in_reply_to: None, kind: "encrypted" };
        speak_locked(app, vec![msg], vec![told]).await?;
        tracing::info!(%room_id, %owner, "told the owner of an encrypted chat that the bot cannot read it");
    }
    for event_id in commands {
        answer(app, room_id, &owner, &event_id).await?;
    }
    Ok(())
}

/// Leave `room_id`, a chat that is no longer one: the bot's own leave event, checked,
/// logged with the dropped commands and sent to the room's other servers.
async fn leave_chat(app: &Fedlink, room_id: &OwnedRoomId) -> Result<(), String> {
    let _lock = app.lock_ingest().await;
    let (entries, outbox, dropped) = {
        let views = app.views.read().await;
        let Some(room) = views.rooms.get(room_id).filter(|r| r.bot_joined()) else { return Ok(()) };
        if room.chat_owner(&views.bot_user_id).is_some() {
            return Ok(()); // a chat again meanwhile
        }
        let dropped: Vec<Entry> = room
            .bot_chat
            .as_ref()
            .map(|c| c.commands.values().map(|e| Entry::CommandHandled(CommandHandled { room_id: room_id.clone(), event_id: e.clone(), command: "dropped".into(), reply: None })).collect())
            .unwrap_or_default();
        let n = dropped.len();
        match build_event(app, &views, room_id, "m.room.member", Some(app.bot.as_str()), json!({ "membership": "leave" })) {
            Ok((entry, dests)) => {
                let outbox: Vec<(String, String)> = dests.into_iter().map(|d| (d, entry.event_id.to_string())).collect();
                (std::iter::once(Entry::Pdu(entry)).chain(dropped).collect::<Vec<_>>(), outbox, n)
            }
            Err(reason) => {
                // Recorded, so it is not tried again on every append.
                tracing::warn!(%room_id, %reason, "the bot cannot leave a room that is no longer its chat");
                let failed = Entry::BotTold(BotTold { room_id: room_id.clone(), about: room_id.clone(), reason: "leave_failed".into() });
                (dropped.into_iter().chain(std::iter::once(failed)).collect(), Vec::new(), n)
            }
        }
    };
    if entries.is_empty() {
        return Ok(());
    }
    let left = matches!(entries.first(), Some(Entry::Pdu(_)));
    app.append_and_send(entries, None, &outbox).await.map_err(|e| e.to_string())?;
    app.store.flush().await.map_err(|e| e.to_string())?;
    if dropped > 0 {
        app.metrics.bot_commands.with_label_values(&["dropped", "dropped"]).inc_by(dropped as u64);
    }
    app.metrics.bot_chats_left.with_label_values(&[if left { "ok" } else { "error" }]).inc();
    tracing::info!(%room_id, left, dropped, "the room is no longer a direct chat with the bot: it leaves");
    Ok(())
}

/// Answer one command.
async fn answer(app: &Fedlink, room_id: &OwnedRoomId, owner: &OwnedUserId, event_id: &OwnedEventId) -> Result<(), String> {
    let body: Option<String> = app
        .store
        .get_event(event_id.as_str())
        .map_err(|e| e.to_string())?
        .and_then(|e| e.pdu.get("content")?.get("body")?.as_str().map(str::to_owned));
    let parsed = core_bot::parse(body.as_deref().unwrap_or(""));
    // Aliases are resolved before anything is locked: it asks the alias's server.
    let parsed = match parsed {
        Ok(Command::Off(RoomRef::Alias(a))) => Ok(Command::Off(resolve_alias(app, &a).await)),
        Ok(Command::On(RoomRef::Alias(a))) => Ok(Command::On(resolve_alias(app, &a).await)),
        other => other,
    };
    let code = new_code();
    // `help` and `status` change nothing: their answer is worked out before the ingest lock
    // is taken (a status reads every room of the person; ingest goes on meanwhile).
    let read_only = match &parsed {
        Ok(cmd @ (Command::Help | Command::Status)) => {
            let views = app.views.read().await;
            Some(handle_with(app, &views, owner, cmd, &code, 0))
        }
        _ => None,
    };
    let _lock = app.lock_ingest().await;
    let wrong_codes = app.bot_state.wrong_codes.lock().expect("lock").get(owner).copied().unwrap_or(0);
    // Decided under the ingest lock: nothing else is logged between the decision and its
    // record. The room must still be a chat with this owner: a third person may have come
    // in meanwhile, and the answer (a status, say) is for the owner only.
    let (name, outcome, tells) = {
        let views = app.views.read().await;
        let Some(room) = views.rooms.get(room_id) else { return Ok(()) };
        if !room.bot_chat.as_ref().is_some_and(|c| c.commands.values().any(|e| e == event_id)) {
            return Ok(()); // handled meanwhile
        }
        if room.chat_owner(&views.bot_user_id) != Some(owner) {
            // No longer a chat: the next round leaves it and drops its commands (`leave_chat`).
            return Ok(());
        }
        let (name, outcome) = match (&parsed, read_only) {
            (Ok(cmd), Some(outcome)) => (cmd.name(), outcome),
            (Ok(cmd), None) => (cmd.name(), handle_with(app, &views, owner, cmd, &code, wrong_codes)),
            (Err(e), _) => ("not_understood", Outcome { reply: format!("Sorry, {e}."), refused: true, ..Default::default() }),
        };
        // The other accounts concerned are told in their own chats, in the same append.
        let tells: Vec<Message> = outcome
            .tell
            .iter()
            .filter_map(|(account, text)| {
                let chat = core_bot::chat_of(&views, &[account.clone()].into())?;
                Some(Message { room_id: chat, owner: account.clone(), text: text.clone(), in_reply_to: None, kind: "tell" })
            })
            .collect();
        (name, outcome, tells)
    };
    let result = if parsed.is_err() { "not_understood" } else if outcome.refused { "refused" } else { "ok" };
    {
        let mut wrong = app.bot_state.wrong_codes.lock().expect("lock");
        if outcome.wrong_code {
            *wrong.entry(owner.clone()).or_default() += 1;
        } else if name == "confirm" && !outcome.refused {
            wrong.remove(owner);
        }
    }
    let mut entries = outcome.entries.clone();
    entries.push(Entry::CommandHandled(CommandHandled { room_id: room_id.clone(), event_id: event_id.clone(), command: name.to_owned(), reply: None }));
    let reply = Message { room_id: room_id.clone(), owner: owner.clone(), text: outcome.reply.clone(), in_reply_to: Some(event_id.clone()), kind: "reply" };
    let sent = speak_locked(app, std::iter::once(reply).chain(tells).collect(), entries).await?;
    for e in &outcome.entries {
        match e {
            Entry::LinkRequested(_) => app.metrics.link_requests.with_label_values(&["requested"]).inc(),
            Entry::LinkClosed(c) => app.metrics.link_requests.with_label_values(&[c.outcome.as_str()]).inc(),
            _ => {}
        }
    }
    app.metrics.bot_commands.with_label_values(&[name, result]).inc();
    // One line per decision; never the code.
    tracing::info!(%room_id, %owner, command = name, result, messages = sent, changes = outcome.entries.len(), "answered a command in the bot's chat");
    Ok(())
}

/// What `cmd` from `owner` does, decided over `views` with fedlink's settings and clock.
fn handle_with(app: &Fedlink, views: &Views, owner: &OwnedUserId, cmd: &Command, code: &str, wrong_codes: u32) -> Outcome {
    let names = |r: &OwnedRoomId| room_name(app, views, r);
    let ctx = Ctx {
        views,
        routes: &app.routes,
        linking: app.cfg.bot.self_service_linking,
        code_ttl_ms: app.cfg.bot.link_code_ttl_secs.saturating_mul(1000),
        now_ms: now_ms(),
        room_name: &names,
        wrong_codes,
    };
    core_bot::handle(&ctx, owner, cmd, code, &code_hash)
}

/// An alias's room id, asked of the alias's server (only a server fedlink may talk to,
/// with a short timeout); `RoomRef::Alias` again when that fails.
async fn resolve_alias(app: &Fedlink, alias: &ruma::OwnedRoomAliasId) -> RoomRef {
    let server = alias.server_name().as_str();
    let allowed = &app.cfg.federation.allowed_servers;
    if !allowed.is_empty() && !allowed.iter().any(|s| s == server) {
        tracing::info!(%alias, "not resolving an alias on a server outside federation.allowed_servers");
        return RoomRef::Alias(alias.clone());
    }
    let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(alias.as_str()));
    match tokio::time::timeout(ALIAS_TIMEOUT, app.client.request(server, Method::GET, &path, None)).await {
        Ok(Ok(v)) => match v.get("room_id").and_then(Value::as_str).and_then(|r| ruma::RoomId::parse(r).ok()) {
            Some(id) => RoomRef::Id(id),
            None => RoomRef::Alias(alias.clone()),
        },
        Ok(Err(e)) => {
            tracing::info!(%alias, error = %e, "cannot resolve a room alias for a command");
            RoomRef::Alias(alias.clone())
        }
        Err(_) => {
            tracing::info!(%alias, "the alias's server did not answer in time");
            RoomRef::Alias(alias.clone())
        }
    }
}

/// One message the bot sends: `text` as an `m.notice` in `room_id`, the chat of `owner`.
struct Message {
    room_id: OwnedRoomId,
    owner: OwnedUserId,
    text: String,
    in_reply_to: Option<OwnedEventId>,
    kind: &'static str,
}

/// Send `msgs` as the bot's `m.notice`s, logged in one append with `entries`; call with the
/// ingest lock held. A message goes only to a room that is still its owner's direct chat
/// and whose rules let the bot speak; others are skipped (and counted), while `entries`
/// are logged regardless (a command's effect stands). Returns how many were sent. Errors
/// are storage failures: nothing was logged.
async fn speak_locked(app: &Fedlink, msgs: Vec<Message>, entries: Vec<Entry>) -> Result<usize, String> {
    speak_locked_if(app, msgs, entries, false).await
}

/// [`speak_locked`]; with `only_if_sent`, `entries` are logged only when a message was
/// sent (a notice marked told must have been told).
async fn speak_locked_if(app: &Fedlink, msgs: Vec<Message>, mut entries: Vec<Entry>, only_if_sent: bool) -> Result<usize, String> {
    let mut pdus = Vec::new();
    let mut outbox: Vec<(String, String)> = Vec::new();
    {
        let views = app.views.read().await;
        for m in msgs {
            let mut content = json!({ "msgtype": "m.notice", "body": m.text, "m.mentions": {} });
            if let Some(e) = &m.in_reply_to {
                content["m.relates_to"] = json!({ "m.in_reply_to": { "event_id": e } });
            }
            let still_chat = views.rooms.get(&m.room_id).is_some_and(|r| r.chat_owner(&views.bot_user_id) == Some(&m.owner));
            let built = if still_chat { build_message(app, &views, &m.room_id, content) } else { Err("the room is no longer a direct chat with its owner".into()) };
            match built {
                Ok((entry, dests)) => {
                    if m.in_reply_to.is_some() {
                        for e in entries.iter_mut() {
                            if let Entry::CommandHandled(c) = e {
                                c.reply = Some(entry.event_id.clone());
                            }
                        }
                    }
                    outbox.extend(dests.into_iter().map(|d| (d, entry.event_id.to_string())));
                    pdus.push(Entry::Pdu(entry));
                    app.metrics.bot_messages.with_label_values(&[m.kind, "ok"]).inc();
                }
                Err(reason) => {
                    app.metrics.bot_messages.with_label_values(&[m.kind, "error"]).inc();
                    tracing::warn!(room_id = %m.room_id, %reason, kind = m.kind, "the bot cannot send its message in this room");
                }
            }
        }
    }
    let sent = pdus.len();
    if pdus.is_empty() && (entries.is_empty() || only_if_sent) {
        return Ok(0);
    }
    pdus.extend(entries);
    app.append_and_send(pdus, None, &outbox).await.map_err(|e| e.to_string())?;
    app.store.flush().await.map_err(|e| e.to_string())?;
    Ok(sent)
}

/// Build, sign and admit the bot's message: its log entry and the servers to send it to.
fn build_message(app: &Fedlink, views: &Views, room_id: &OwnedRoomId, content: Value) -> Result<(PduEntry, Vec<String>), String> {
    build_event(app, views, room_id, "m.room.message", None, content)
}

/// Build, sign and admit an event of the bot (a message, its leave).
fn build_event(app: &Fedlink, views: &Views, room_id: &OwnedRoomId, kind: &str, state_key: Option<&str>, content: Value) -> Result<(PduEntry, Vec<String>), String> {
    let room = views.rooms.get(room_id).filter(|r| r.bot_joined()).ok_or("the bot is not in this room")?;
    let rules = rules_for(&room.version).ok_or("unsupported room version")?;
    let obj = build::template(&app.store, room_id.as_str(), room, &rules, &app.bot, kind, state_key, content, now_ms()).map_err(|e| e.to_string())?;
    let pdu = build::sign(app.server_name.as_str(), &app.key, obj, &rules).map_err(|e| e.to_string())?;
    let admitted = crate::rooms::admit(&app.store, room, &pdu, &rules).map_err(|e| format!("the room's rules refuse it: {e}"))?;
    if admitted.status != PduStatus::Accepted {
        return Err("the room's current state refuses it".into());
    }
    app.store.put_state_before_root(pdu.event_id.as_str(), admitted.before).map_err(|e| e.to_string())?;
    let mut entry = PduEntry::new(&pdu, app.server_name.clone(), PduStatus::Accepted);
    entry.resolved_state = admitted.resolved;
    entry.superseded = admitted.superseded;
    let dests = room.joined_servers().into_iter().filter(|s| *s != app.server_name).map(|s| s.to_string()).collect();
    Ok((entry, dests))
}

/// Tell people, once per room and reason, about accounts fedlink cannot keep in step
/// (from the step report's `out_of_step`) and rooms the bot gave up joining: one message
/// per chat and pass, listing at most `core::bot::MAX_LISTED_ROOMS` rooms and counting the
/// others (all of them, up to `MAX_TOLD_PER_PASS`, are told at once; the rest come on the
/// next pass). Each problem is checked again under the ingest lock, so one fixed since the
/// report is not announced.
pub async fn tell_problems(app: &Fedlink, out_of_step: &std::collections::BTreeMap<(OwnedRoomId, OwnedUserId), crate::core::step::Step>) {
    const MAX_TOLD_PER_PASS: usize = 500;
    let notices = {
        let views = app.views.read().await;
        let names = |r: &OwnedRoomId| room_name(app, &views, r);
        core_bot::notices(&views, out_of_step, &names)
    };
    let mut by_chat: std::collections::BTreeMap<OwnedRoomId, Vec<core_bot::Notice>> = Default::default();
    for n in notices {
        by_chat.entry(n.chat.clone()).or_default().push(n);
    }
    for (chat, notices) in by_chat {
        let _lock = app.lock_ingest().await;
        let (owner, current): (Option<OwnedUserId>, Vec<&core_bot::Notice>) = {
            let views = app.views.read().await;
            let owner = views.rooms.get(&chat).and_then(|r| r.chat_owner(&views.bot_user_id)).cloned();
            let told = |n: &core_bot::Notice| core_bot::told(&views, &chat, &n.about, n.reason);
            // The account still belongs to the chat owner's person, who still wants syncing
            // there (an unlink or an opt-out meanwhile silences it).
            let theirs = |n: &core_bot::Notice| {
                views.directory.person_of(&n.account).is_some_and(|(_, p)| {
                    owner.as_ref().is_some_and(|o| p.accounts.contains(o)) && !p.opted_out && !p.opted_out_rooms.contains(&n.about)
                })
            };
            let still = |n: &core_bot::Notice| theirs(n) && match n.reason {
                "join_failed" => views.rooms.get(&n.about).is_some_and(|r| matches!(r.bot, crate::core::views::BotMembership::JoinFailed { .. })),
                _ => crate::core::step::room_steps(&views, &app.routes, &n.about, &[n.account.clone()].into())
                    .get(&n.account)
                    .is_some_and(|s| matches!(s, crate::core::step::Step::Blocked | crate::core::step::Step::Unsupported)),
            };
            let current = notices.iter().filter(|n| !told(n) && still(n)).take(MAX_TOLD_PER_PASS).collect();
            (owner, current)
        };
        let Some(owner) = owner else { continue };
        if current.is_empty() {
            continue;
        }
        let entries: Vec<Entry> = current.iter().map(|n| Entry::BotTold(BotTold { room_id: chat.clone(), about: n.about.clone(), reason: n.reason.to_owned() })).collect();
        let msg = Message { room_id: chat.clone(), owner, text: core_bot::notices_text(&current), in_reply_to: None, kind: "told" };
        match speak_locked_if(app, vec![msg], entries, true).await {
            Ok(0) => {}
            Ok(_) => tracing::info!(%chat, rooms = current.len(), reasons = ?current.iter().map(|n| n.reason).collect::<Vec<_>>(), "told a person why fedlink cannot keep them in step"),
            Err(reason) => {
                tracing::warn!(%chat, %reason, "cannot tell a person about problems; will retry");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_fresh_readable_and_hash_as_typed() {
        let a = new_code();
        assert_eq!(a.len(), 9);
        assert!(a.chars().all(|c| c == '-' || CODE_ALPHABET.contains(&(c as u8))), "{a}");
        assert_ne!(a, new_code(), "two codes differ");
        assert_eq!(code_hash(&a), code_hash(&a.to_lowercase().replace('-', " ")), "case, blanks and dashes do not matter");
        assert_ne!(code_hash("ABCD-EFGH"), code_hash("ABCD-EFGJ"));
        assert_eq!(code_hash("x").len(), 64);
    }
}
