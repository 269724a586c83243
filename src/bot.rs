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

/// Answers commands in the bot's chats until `stop`.
pub async fn worker(app: Arc<Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut changes = app.changes.subscribe();
    loop {
        changes.borrow_and_update();
        let chats: Vec<OwnedRoomId> = app.views.read().await.index.chat_work.iter().cloned().collect();
        let mut failed = false;
        for chat in chats {
            if let Err(reason) = serve_chat(&app, &chat).await {
                tracing::warn!(room_id = %chat, %reason, "cannot answer in the bot's chat yet; will retry");
                failed = true;
            }
        }
        // A failure (storage, a room the bot cannot write in yet) is retried on a timer.
        let wait = if failed { Duration::from_secs(5) } else { Duration::from_secs(300) };
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
        let (Some(owner), Some(chat)) = (room.chat_owner(&views.bot_user_id), room.bot_chat.as_ref()) else { return Ok(()) };
        let told = chat.told.iter().any(|(_, r)| r == "encrypted");
        (owner.clone(), chat.commands.values().cloned().collect::<Vec<_>>(), room.encrypted() && !told)
    };
    if encrypted {
        let _lock = app.ingest.lock().await;
        let told = Entry::BotTold(BotTold { room_id: room_id.clone(), about: room_id.clone(), reason: "encrypted".into() });
        say_locked(app, room_id, &core_bot::encrypted_notice(&app.bot), None, vec![told], "encrypted").await?;
        tracing::info!(%room_id, %owner, "told the owner of an encrypted chat that the bot cannot read it");
    }
    for event_id in commands {
        answer(app, room_id, &owner, &event_id).await?;
    }
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
    let _lock = app.ingest.lock().await;
    // Decided under the ingest lock: nothing else is logged between the decision and its
    // record.
    let (name, outcome) = {
        let views = app.views.read().await;
        if !views.rooms.get(room_id).and_then(|r| r.bot_chat.as_ref()).is_some_and(|c| c.commands.values().any(|e| e == event_id)) {
            return Ok(()); // handled meanwhile
        }
        match &parsed {
            Ok(cmd) => {
                let names = |r: &OwnedRoomId| room_name(app, &views, r);
                let ctx = Ctx {
                    views: &views,
                    routes: &app.routes,
                    linking: app.cfg.bot.self_service_linking,
                    code_ttl_ms: app.cfg.bot.link_code_ttl_secs.saturating_mul(1000),
                    now_ms: now_ms(),
                    room_name: &names,
                };
                (cmd.name(), core_bot::handle(&ctx, owner, cmd, &code, &code_hash))
            }
            Err(e) => ("not_understood", Outcome { reply: format!("Sorry, {e}."), refused: true, ..Default::default() }),
        }
    };
    let result = if parsed.is_err() { "not_understood" } else if outcome.refused { "refused" } else { "ok" };
    for e in &outcome.entries {
        match e {
            Entry::LinkRequested(_) => app.metrics.link_requests.with_label_values(&["requested"]).inc(),
            Entry::LinkClosed(c) => app.metrics.link_requests.with_label_values(&[c.outcome.as_str()]).inc(),
            _ => {}
        }
    }
    let mut entries = outcome.entries.clone();
    entries.push(Entry::CommandHandled(CommandHandled { room_id: room_id.clone(), event_id: event_id.clone(), command: name.to_owned(), reply: None }));
    let reply = say_locked(app, room_id, &outcome.reply, Some(event_id), entries, "reply").await?;
    app.metrics.bot_commands.with_label_values(&[name, result]).inc();
    // One line per decision; never the code.
    tracing::info!(%room_id, %owner, command = name, result, reply = ?reply, changes = outcome.entries.len(), "answered a command in the bot's chat");
    // Tell the other accounts concerned, in their own chats (when they have one).
    for (account, text) in &outcome.tell {
        let chat = {
            let views = app.views.read().await;
            core_bot::chat_of(&views, &[account.clone()].into())
        };
        if let Some(chat) = chat {
            if let Err(reason) = say_locked(app, &chat, text, None, Vec::new(), "tell").await {
                tracing::warn!(room_id = %chat, %account, %reason, "cannot tell another account about a command");
            }
        }
    }
    Ok(())
}

/// An alias's room id, asked of the alias's server; `RoomRef::Alias` again when that fails.
async fn resolve_alias(app: &Fedlink, alias: &ruma::OwnedRoomAliasId) -> RoomRef {
    let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(alias.as_str()));
    match app.client.request(alias.server_name().as_str(), Method::GET, &path, None).await {
        Ok(v) => match v.get("room_id").and_then(Value::as_str).and_then(|r| ruma::RoomId::parse(r).ok()) {
            Some(id) => RoomRef::Id(id),
            None => RoomRef::Alias(alias.clone()),
        },
        Err(e) => {
            tracing::info!(%alias, error = %e, "cannot resolve a room alias for a command");
            RoomRef::Alias(alias.clone())
        }
    }
}

/// Send `text` as the bot's `m.notice` in `room_id` (a reply to `in_reply_to`), logged in
/// one append with `entries`; call with the ingest lock held. When the room's rules do not
/// let the bot speak, `entries` are still logged (the command's effect stands) and `None`
/// is returned. Errors are storage failures: nothing was logged.
async fn say_locked(app: &Fedlink, room_id: &OwnedRoomId, text: &str, in_reply_to: Option<&OwnedEventId>, mut entries: Vec<Entry>, kind: &str) -> Result<Option<OwnedEventId>, String> {
    let mut content = json!({ "msgtype": "m.notice", "body": text, "m.mentions": {} });
    if let Some(e) = in_reply_to {
        content["m.relates_to"] = json!({ "m.in_reply_to": { "event_id": e } });
    }
    let built = {
        let views = app.views.read().await;
        build_message(app, &views, room_id, content)
    };
    let (pdu_entry, dests) = match built {
        Ok(b) => b,
        Err(reason) => {
            app.metrics.bot_messages.with_label_values(&[kind, "error"]).inc();
            tracing::warn!(%room_id, %reason, kind, "the bot cannot send its message in this room");
            if entries.is_empty() {
                return Ok(None);
            }
            app.append(entries, None).await.map_err(|e| e.to_string())?;
            app.store.flush().await.map_err(|e| e.to_string())?;
            return Ok(None);
        }
    };
    let event_id = pdu_entry.event_id.clone();
    for e in entries.iter_mut() {
        if let Entry::CommandHandled(c) = e {
            c.reply = Some(event_id.clone());
        }
    }
    entries.insert(0, Entry::Pdu(pdu_entry));
    let outbox: Vec<(String, String)> = dests.into_iter().map(|d| (d, event_id.to_string())).collect();
    app.append_and_send(entries, None, &outbox).await.map_err(|e| e.to_string())?;
    app.store.flush().await.map_err(|e| e.to_string())?;
    app.metrics.bot_messages.with_label_values(&[kind, "ok"]).inc();
    Ok(Some(event_id))
}

/// Build, sign and admit the bot's message: its log entry and the servers to send it to.
fn build_message(app: &Fedlink, views: &Views, room_id: &OwnedRoomId, content: Value) -> Result<(PduEntry, Vec<String>), String> {
    let room = views.rooms.get(room_id).filter(|r| r.bot_joined()).ok_or("the bot is not in this room")?;
    let rules = rules_for(&room.version).ok_or("unsupported room version")?;
    let obj = build::template(&app.store, room_id.as_str(), room, &rules, &app.bot, "m.room.message", None, content, now_ms()).map_err(|e| e.to_string())?;
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
/// (from the step report's `out_of_step`). At most `MAX_TOLD_PER_PASS` messages a pass;
/// the rest come on the next one.
pub async fn tell_problems(app: &Fedlink, out_of_step: &std::collections::BTreeMap<(OwnedRoomId, OwnedUserId), crate::core::step::Step>) {
    const MAX_TOLD_PER_PASS: usize = 20;
    let notices = {
        let views = app.views.read().await;
        let names = |r: &OwnedRoomId| room_name(app, &views, r);
        core_bot::notices(&views, out_of_step, &names)
    };
    for n in notices.into_iter().take(MAX_TOLD_PER_PASS) {
        let _lock = app.ingest.lock().await;
        // Told meanwhile (another pass), or the chat is no longer one: skip.
        let still = {
            let views = app.views.read().await;
            views.rooms.get(&n.chat).and_then(|r| r.bot_chat.as_ref()).is_some_and(|c| !c.told.contains(&(n.about.clone(), n.reason.to_owned())))
        };
        if !still {
            continue;
        }
        let told = Entry::BotTold(BotTold { room_id: n.chat.clone(), about: n.about.clone(), reason: n.reason.to_owned() });
        match say_locked(app, &n.chat, &n.text, None, vec![told], "told").await {
            Ok(_) => tracing::info!(chat = %n.chat, about = %n.about, reason = n.reason, "told a person why fedlink cannot keep them in step"),
            Err(reason) => {
                tracing::warn!(chat = %n.chat, about = %n.about, %reason, "cannot tell a person about a problem; will retry");
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
