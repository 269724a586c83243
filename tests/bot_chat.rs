//! In-process, against a fake peer that signs its own events: the bot's direct chats.
//! - a direct-chat invite is accepted whatever `bot.invites_from` says; a group invite is not;
//!   such a chat with others in it is given up, and a room fedlink knows is never a chat;
//! - the bot answers its chat's owner, once per command (also across a restart), never in a
//!   group room and never once a third person is invited to or joined the chat (it leaves);
//! - a flood of commands costs at most `MAX_PENDING_COMMANDS` answers.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use ruma::RoomVersionId;
use serde_json::{json, Value};
use support::{enc, fake_peer::FakePeer, fedlink_proc::Fedlink, wait_until};

const LOOPBACK: &str = "[federation]\nverify_tls = false\n";

async fn wait_joined(f: &Fedlink, room: &str) {
    wait_bot(f, room, "joined").await;
}

/// Wait until the admin API shows the bot's membership in `room` as `state`.
async fn wait_bot(f: &Fedlink, room: &str, state: &str) {
    wait_until(&format!("the bot {state} in {room}"), Duration::from_secs(20), || async {
        let (s, v) = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(room))).await;
        Ok((s == 200 && v["bot_membership"] == state).then_some(()))
    })
    .await
    .unwrap();
}

/// The bot's notices the peer received in `room`: (in reply to, body). A transaction sent
/// again (the same id, e.g. across a restart) counts once, as a homeserver dedupes it.
fn notices(peer: &FakePeer, room: &str, bot: &str) -> Vec<(Option<String>, String)> {
    let st = peer.state.lock().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    st.transactions
        .iter()
        .filter(|(txn, _)| seen.insert(txn.clone()))
        .flat_map(|(_, pdus)| pdus.iter())
        .filter(|p| p["room_id"] == room && p["sender"] == bot && p["content"]["msgtype"] == "m.notice")
        .map(|p| {
            let to = p["content"]["m.relates_to"]["m.in_reply_to"]["event_id"].as_str().map(str::to_owned);
            (to, p["content"]["body"].as_str().unwrap_or("").to_owned())
        })
        .collect()
}

/// `sender_local` says `text` in `room` (one transaction); returns the event id.
async fn say(peer: &FakePeer, f: &Fedlink, room: &str, sender_local: &str, text: &str, txn: &str) -> String {
    let (id, ev) = peer.push(room, sender_local, "m.room.message", None, json!({ "msgtype": "m.text", "body": text }));
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, txn, vec![ev], vec![]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["pdus"][&id], json!({}), "{v}");
    id
}

async fn answered(peer: &FakePeer, room: &str, bot: &str, command: &str) -> String {
    wait_until(&format!("the bot's answer to {command}"), Duration::from_secs(20), || async {
        Ok(notices(peer, room, bot).into_iter().find(|(to, _)| to.as_deref() == Some(command)).map(|(_, b)| b))
    })
    .await
    .unwrap()
}

fn direct() -> Value {
    json!({ "membership": "invite", "is_direct": true })
}

#[tokio::test]
async fn anyone_may_open_a_direct_chat_whatever_invites_from_says_but_not_a_group_room() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let f = Fedlink::start(dir.path(), 0, &format!("{LOOPBACK}[bot]\ninvites_from = [\"@admin:nowhere.example\"]\n")).await;
    let group = peer.create_room("bob", RoomVersionId::V12);
    let (s, v) = peer.invite(&group, "bob", &f.bot(), &f.name, &f.fed_url).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let chat = peer.create_room("alice", RoomVersionId::V12);
    let (s, v) = peer.invite_with(&chat, "alice", &f.bot(), direct(), &f.name, &f.fed_url).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    wait_joined(&f, &chat).await;
    let help = say(&peer, &f, &chat, "alice", "help", "t1").await;
    assert!(answered(&peer, &chat, &f.bot(), &help).await.contains("status"));
    assert_eq!(f.admin("/_fedlink/admin/v1/status").await.1["bot_chats"], 1);
    // One account opens at most MAX_CHATS_PER_ACCOUNT such chats.
    for i in 1..fedlink::federation::membership::MAX_CHATS_PER_ACCOUNT {
        let more = peer.create_room("alice", RoomVersionId::V12);
        let (s, v) = peer.invite_with(&more, "alice", &f.bot(), direct(), &f.name, &f.fed_url).await;
        assert_eq!(s, StatusCode::OK, "chat {i}: {v}");
    }
    let one_too_many = peer.create_room("alice", RoomVersionId::V12);
    let (s, v) = peer.invite_with(&one_too_many, "alice", &f.bot(), direct(), &f.name, &f.fed_url).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["errcode"], "M_FORBIDDEN");
}

#[tokio::test]
async fn a_direct_invite_never_turns_a_room_with_others_or_a_known_room_into_a_chat() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let bob = peer.user("bob");
    let f = Fedlink::start(dir.path(), 0, &format!("{LOOPBACK}[bot]\ninvites_from = [\"{bob}\"]\n")).await;
    let bot = f.bot();
    // mallory (not allowed to invite the bot) "opens a chat" in a room where bob is too:
    // the bot gives the join up once it sees the room's members, logging none of them.
    let crowd = peer.create_room("mallory", RoomVersionId::V12);
    peer.push(&crowd, "mallory", "m.room.member", Some(&bob), json!({ "membership": "invite" }));
    peer.push(&crowd, "bob", "m.room.member", Some(&bob), json!({ "membership": "join" }));
    assert_eq!(peer.invite_with(&crowd, "mallory", &bot, direct(), &f.name, &f.fed_url).await.0, StatusCode::OK);
    wait_bot(&f, &crowd, "join_failed").await;
    // Nothing of the room's state was logged.
    let v = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&crowd))).await.1;
    assert!(v["members"].as_object().is_none_or(|m| m.is_empty()), "{v}");
    // A room the bot was in and was kicked from is known as a normal room: mallory's direct
    // invite there is an ordinary invite, which invites_from refuses.
    let team = peer.create_room("bob", RoomVersionId::V12);
    peer.push(&team, "bob", "m.room.member", Some(&peer.user("mallory")), json!({ "membership": "invite" }));
    peer.push(&team, "mallory", "m.room.member", Some(&peer.user("mallory")), json!({ "membership": "join" }));
    assert_eq!(peer.invite(&team, "bob", &bot, &f.name, &f.fed_url).await.0, StatusCode::OK);
    wait_joined(&f, &team).await;
    let (id, kick) = peer.push(&team, "bob", "m.room.member", Some(&bot), json!({ "membership": "leave" }));
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "kick", vec![kick], vec![]).await;
    assert_eq!((s, &v["pdus"][&id]), (StatusCode::OK, &json!({})), "{v}");
    wait_bot(&f, &team, "left").await;
    let (s, v) = peer.invite_with(&team, "mallory", &bot, direct(), &f.name, &f.fed_url).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
}

#[tokio::test]
async fn the_bot_answers_its_chats_owner_once_per_command_and_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    let peer = FakePeer::start().await;
    let f = Fedlink::start(dir.path(), 0, LOOPBACK).await;
    let bot = f.bot();
    let chat = peer.create_room("alice", RoomVersionId::V12);
    assert_eq!(peer.invite_with(&chat, "alice", &bot, direct(), &f.name, &f.fed_url).await.0, StatusCode::OK);
    wait_joined(&f, &chat).await;
    let group = peer.create_room("bob", RoomVersionId::V12);
    assert_eq!(peer.invite(&group, "bob", &bot, &f.name, &f.fed_url).await.0, StatusCode::OK);
    wait_joined(&f, &group).await;

    // A command in the group room, then one in the chat: when the second is answered, the
    // first would have been too.
    say(&peer, &f, &group, "bob", "status", "g1").await;
    let help = say(&peer, &f, &chat, "alice", "help", "c1").await;
    answered(&peer, &chat, &bot, &help).await;
    assert!(notices(&peer, &group, &bot).is_empty(), "never a word in a group room");

    // Answered once, also across a restart.
    let port = f.fed_port;
    f.stop().await;
    let f = Fedlink::start(dir.path(), port, LOOPBACK).await;
    let status = say(&peer, &f, &chat, "alice", "STATUS", "c2").await;
    assert!(answered(&peer, &chat, &bot, &status).await.contains("not linked"));
    let to_help = notices(&peer, &chat, &bot).into_iter().filter(|(to, _)| to.as_deref() == Some(help.as_str())).count();
    assert_eq!(to_help, 1, "one answer per command");

    // A flood in one transaction: at most MAX_PENDING_COMMANDS wait; the rest are ignored.
    let mut flood = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..25 {
        let (id, ev) = peer.push(&chat, "alice", "m.room.message", None, json!({ "msgtype": "m.text", "body": "help" }));
        ids.push(id);
        flood.push(ev);
    }
    assert_eq!(peer.send_txn(&f.name, &f.fed_url, "flood", flood, vec![]).await.0, StatusCode::OK);
    let after = say(&peer, &f, &chat, "alice", "help", "c3").await;
    answered(&peer, &chat, &bot, &after).await;
    let flood_answers = notices(&peer, &chat, &bot).into_iter().filter(|(to, _)| to.as_ref().is_some_and(|t| ids.contains(t))).count();
    assert_eq!(flood_answers, fedlink::core::views::MAX_PENDING_COMMANDS);

    // A third person in the chat: it is no longer a direct chat, the bot stays silent there.
    // (An invite is enough: nobody else may be joined or invited.)
    let (id, invite) = peer.push(&chat, "alice", "m.room.member", Some(&peer.user("carol")), json!({ "membership": "invite" }));
    let (s, v) = peer.send_txn(&f.name, &f.fed_url, "carol", vec![invite], vec![]).await;
    assert_eq!((s, &v["pdus"][&id]), (StatusCode::OK, &json!({})), "{v}");
    // The chat is over: the bot leaves it.
    wait_bot(&f, &chat, "left").await;
    let (silent, ev) = peer.push(&chat, "alice", "m.room.message", None, json!({ "msgtype": "m.text", "body": "help" }));
    assert_eq!(peer.send_txn(&f.name, &f.fed_url, "c4", vec![ev], vec![]).await.0, StatusCode::OK);
    // The point where an answer would have come: another chat's command is answered.
    let chat2 = peer.create_room("dave", RoomVersionId::V12);
    assert_eq!(peer.invite_with(&chat2, "dave", &bot, direct(), &f.name, &f.fed_url).await.0, StatusCode::OK);
    wait_joined(&f, &chat2).await;
    let dave = say(&peer, &f, &chat2, "dave", "help", "d1").await;
    answered(&peer, &chat2, &bot, &dave).await;
    assert!(notices(&peer, &chat, &bot).iter().all(|(to, _)| to.as_deref() != Some(silent.as_str())), "no answer with a third person in the room");

    assert!(f.metric("fedlink_bot_commands_total{command=\"help\",result=\"ok\"}").await >= 2.0);
}
