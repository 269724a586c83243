//! End-to-end, issue #11: two real Synapse homeservers (no registrations) and fedlink, with
//! nobody linked by the admin except carol (a control). alice talks to the bot herself:
//! - alice@kiwi opens a direct chat with the bot and sends `link @alice:litchi`; the bot
//!   answers with a code; nothing is linked yet;
//! - alice@litchi opens her own direct chat; a wrong code is refused and links nothing; the
//!   right code links both accounts (source `self`), and alice@kiwi is told;
//! - a room bob@kiwi shares with alice@kiwi then reaches alice@litchi (the bot invites her);
//!   once alice@kiwi joined, the bot tells alice once that litchi has no registration;
//! - `status` lists both accounts and the room; `off` and `on` take the room's alias;
//! - in an encrypted chat (bob's) the bot says once, also across a restart, that it cannot
//!   read it;
//! - after `pause`, a new room invites carol@litchi (the control) but not alice@litchi;
//!   `resume` brings alice@litchi's invite;
//! - restarted with `sync.invite_siblings = "on_join"`, inviting alice@kiwi alone invites
//!   nobody else, though carol's join brings carol@litchi in; alice@kiwi's join brings
//!   alice@litchi's invite.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{
    e2e::{invited_rooms, wait_invited, wait_member},
    enc, fedlink_proc::FedlinkBin, kiwi_and_litchi, wait_until, ClientSession, KiwiLitchi};

const T: Duration = Duration::from_secs(60);

/// alice's direct chat with the bot, opened as Element does (`is_direct`, trusted private chat).
async fn open_chat(c: &ClientSession, bot: &str) -> String {
    let body = json!({ "preset": "trusted_private_chat", "is_direct": true, "invite": [bot] });
    c.post("/_matrix/client/v3/createRoom", &body).await.unwrap()["room_id"].as_str().unwrap().to_owned()
}

/// The bot's notices in `room`, oldest first, as `c` sees them.
async fn notices(c: &ClientSession, room: &str, bot: &str) -> anyhow::Result<Vec<String>> {
    let v = c.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room))).await?;
    let mut out: Vec<String> = v["chunk"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|e| e["sender"] == bot && e["content"]["msgtype"] == "m.notice")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    out.reverse();
    Ok(out)
}

/// Send `text` in the chat and wait for the bot's next notice there containing `expect`.
async fn ask(c: &ClientSession, room: &str, f: &FedlinkBin, text: &str, expect: &str) -> String {
    let before = notices(c, room, &f.bot()).await.unwrap().len();
    c.send_text(room, text).await.unwrap();
    wait_notice(c, room, f, before, expect).await
}

async fn wait_notice(c: &ClientSession, room: &str, f: &FedlinkBin, after: usize, expect: &str) -> String {
    wait_until(&format!("the bot's answer containing `{expect}` in {room}"), T, || async {
        let all = notices(c, room, &f.bot()).await?;
        if let Some(n) = all.iter().skip(after).find(|n| n.contains(expect)) {
            return Ok(Some(n.clone()));
        }
        Err(anyhow::anyhow!("notices so far: {all:?}\nfedlink log:\n{}", f.log_tail()))
    })
    .await
    .unwrap()
}

async fn room_view(f: &FedlinkBin, room: &str) -> Value {
    f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(room))).await.1
}

/// What fedlink shows for `user` in `room`: membership, or a pending invite.
async fn fedlink_knows(f: &FedlinkBin, room: &str, user: &str) -> bool {
    let v = room_view(f, room).await;
    v.to_string().contains(user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_links_their_accounts_and_steers_fedlink_from_a_chat_with_the_bot() {
    let t0 = std::time::Instant::now();
    let mark = |what: &str| eprintln!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    let KiwiLitchi { kiwi, litchi, bob, alice_k, alice_l } = kiwi_and_litchi().await;
    let carol_k = kiwi.register("carol").await.unwrap();
    let carol_l = litchi.register("carol").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[federation]\nverify_tls = false\nallowed_servers = [\"{}\", \"{}\"]\n[bot]\nlink_code_ttl_secs = 300\n[[directory.person]]\nid = \"carol\"\naccounts = [\"{}\", \"{}\"]\n",
        kiwi.server_name, litchi.server_name, carol_k.user_id, carol_l.user_id
    );
    let mut f = FedlinkBin::start(dir.path(), &extra).await.expect("fedlink starts");
    let bot = f.bot();
    mark("started");

    // alice@kiwi opens a chat and asks to link alice@litchi.
    let chat_k = open_chat(&alice_k, &bot).await;
    wait_member(&alice_k, &chat_k, &bot).await;
    let help = ask(&alice_k, &chat_k, &f, "help", "link <@you:other.server>").await;
    assert!(help.contains("status") && help.contains("pause"), "{help}");
    let answer = ask(&alice_k, &chat_k, &f, &format!("link {}", alice_l.user_id), "confirm ").await;
    let code = answer.split("confirm ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    assert_eq!(code.len(), 9, "{answer}");
    let log = std::fs::read_to_string(f.dir.join("fedlink.log")).unwrap();
    assert!(log.contains("answered a command in the bot's chat"), "the answer was logged");
    assert!(!log.contains(&code) && !log.contains(&code.replace('-', "")), "the code never appears in fedlink's log");
    let persons = f.admin("/_fedlink/admin/v1/persons").await.1;
    assert!(!persons.to_string().contains(&alice_l.user_id), "nothing linked before the confirmation: {persons}");
    mark("link asked");

    // alice@litchi confirms from her own chat: a wrong code first.
    let chat_l = open_chat(&alice_l, &bot).await;
    wait_member(&alice_l, &chat_l, &bot).await;
    ask(&alice_l, &chat_l, &f, "confirm AAAA-AAAA", "does not match").await;
    let persons = f.admin("/_fedlink/admin/v1/persons").await.1;
    assert!(!persons.to_string().contains(&alice_l.user_id), "a wrong code links nothing: {persons}");
    let told_k = notices(&alice_k, &chat_k, &bot).await.unwrap().len();
    let linked = ask(&alice_l, &chat_l, &f, &format!("confirm {}", code.to_lowercase()), "Linked:").await;
    assert!(linked.contains(&alice_k.user_id), "{linked}");
    wait_notice(&alice_k, &chat_k, &f, told_k, "Linked:").await;
    let persons = f.admin("/_fedlink/admin/v1/persons").await.1;
    let person = persons["persons"].as_array().unwrap().iter().find(|p| p.to_string().contains(&alice_l.user_id)).cloned().unwrap_or_else(|| panic!("{persons}"));
    assert_eq!(person["source"], "self", "{person}");
    mark("linked by consent");

    // A room bob shares with alice@kiwi reaches alice@litchi.
    let room = bob.create_room(&[&alice_k.user_id, &bot], None, "private_chat").await.unwrap();
    wait_member(&bob, &room, &bot).await;
    wait_invited(&alice_l, &room, &f).await;
    mark("room reached alice@litchi");
    // alice@kiwi joins; litchi has no registration, so alice@litchi cannot be joined for
    // her: she is told once, in one of her chats.
    alice_k.join(&room, &[]).await.unwrap();
    let (before_k, before_l) = (notices(&alice_k, &chat_k, &bot).await.unwrap().len(), notices(&alice_l, &chat_l, &bot).await.unwrap().len());
    wait_until("alice told about litchi's missing registration", Duration::from_secs(60), || async {
        let k = notices(&alice_k, &chat_k, &bot).await?;
        let l = notices(&alice_l, &chat_l, &bot).await?;
        let found = k.iter().skip(before_k).chain(l.iter().skip(before_l)).find(|n| n.contains("no registration")).cloned();
        Ok(found.filter(|n| n.contains(&room)))
    })
    .await
    .unwrap();
    mark("told");

    let status = ask(&alice_k, &chat_k, &f, "status", "Linked accounts").await;
    assert!(status.contains(&alice_k.user_id) && status.contains(&alice_l.user_id) && status.contains(&room), "{status}");
    assert!(status.contains("linked by you"), "{status}");

    // off / on by alias: kiwi resolves it over federation.
    let alias = format!("#team-{}:{}", std::process::id(), kiwi.server_name);
    bob.put(&format!("/_matrix/client/v3/directory/room/{}", enc(&alias)), &json!({ "room_id": room })).await.unwrap();
    ask(&alice_k, &chat_k, &f, &format!("off {alias}"), "is now off").await;
    let person_id = person["id"].as_str().unwrap().to_owned();
    let p = f.admin(&format!("/_fedlink/admin/v1/persons/{person_id}")).await.1;
    assert_eq!(p["opted_out_rooms"], json!([room]), "{p}");
    ask(&alice_k, &chat_k, &f, &format!("on {alias}"), "is now on").await;

    // bob opens an encrypted chat with the bot: it says once that it cannot read it.
    let body = json!({
        "preset": "trusted_private_chat", "is_direct": true, "invite": [bot],
        "initial_state": [{ "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } }],
    });
    let secret = bob.post("/_matrix/client/v3/createRoom", &body).await.unwrap()["room_id"].as_str().unwrap().to_owned();
    wait_notice(&bob, &secret, &f, 0, "cannot read encrypted messages").await;

    // pause: a new room brings carol@litchi (the control) but not alice@litchi.
    ask(&alice_k, &chat_k, &f, "pause", "Paused").await;
    let room2 = bob.create_room(&[&alice_k.user_id, &carol_k.user_id, &bot], None, "private_chat").await.unwrap();
    wait_member(&bob, &room2, &bot).await;
    wait_invited(&carol_l, &room2, &f).await;
    assert!(!invited_rooms(&alice_l).await.unwrap().contains(&room2), "paused: no invite for alice@litchi");
    assert!(!fedlink_knows(&f, &room2, &alice_l.user_id).await, "paused: nothing pending for alice@litchi: {}", room_view(&f, &room2).await);
    ask(&alice_k, &chat_k, &f, "resume", "Resumed").await;
    wait_invited(&alice_l, &room2, &f).await;
    mark("pause and resume");

    // Commands (before the restart resets the counters) and messages are counted.
    let m = f.metrics().await;
    assert!(m.contains("fedlink_bot_commands_total{command=\"link\",result=\"ok\"} 1"), "{m}");
    assert!(m.contains("fedlink_bot_commands_total{command=\"confirm\",result=\"refused\"} 1"), "{m}");
    assert!(m.contains("fedlink_link_requests_total{outcome=\"confirmed\"} 1"), "{m}");

    // Private links: on_join.
    let mut cfg = std::fs::read_to_string(&f.config).unwrap();
    cfg.push_str("\n[sync]\ninvite_siblings = \"on_join\"\n");
    std::fs::write(&f.config, cfg).unwrap();
    f.restart().await.unwrap();
    let room3 = bob.create_room(&[&alice_k.user_id, &carol_k.user_id, &bot], None, "private_chat").await.unwrap();
    wait_member(&bob, &room3, &bot).await;
    // The control: carol@kiwi joins, and carol@litchi is invited.
    carol_k.join(&room3, &[]).await.unwrap();
    wait_invited(&carol_l, &room3, &f).await;
    assert!(!invited_rooms(&alice_l).await.unwrap().contains(&room3), "on_join: alice@kiwi's invite alone invites nobody");
    assert!(!fedlink_knows(&f, &room3, &alice_l.user_id).await, "{}", room_view(&f, &room3).await);
    alice_k.join(&room3, &[]).await.unwrap();
    wait_invited(&alice_l, &room3, &f).await;
    mark("on_join");

    // After the restart, once alice's command is answered, the encrypted chat has still
    // heard the bot once.
    ask(&alice_k, &chat_k, &f, "status", "Linked accounts").await;
    let said = notices(&bob, &secret, &bot).await.unwrap();
    assert_eq!(said.len(), 1, "{said:?}");

}
