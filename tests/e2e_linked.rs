//! End-to-end, two real Synapse homeservers plus fedlink on loopback: `@alice` on kiwi and
//! `@alice` on litchi are linked. A user on kiwi creates a private room inviting alice@kiwi
//! and the bot; alice@litchi receives an invite from the bot (seen through litchi's client
//! API), accepts it, and litchi joins through fedlink (as the inviter's server); kiwi sees
//! her joined. In a second room alice@litchi declines; when alice@kiwi then joins, fedlink
//! does not invite alice@litchi again.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{
    e2e::{invited_rooms, wait_invited, wait_member},
    enc, fedlink_proc::FedlinkBin, kiwi_and_litchi, linked_alice_config, wait_until, KiwiLitchi};

const T: Duration = Duration::from_secs(60);

async fn room_view(f: &FedlinkBin, room: &str) -> Value {
    f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(room))).await.1
}

async fn scenario(room_version: Option<&str>) {
    let t0 = std::time::Instant::now();
    let mark = |what: &str| eprintln!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    let KiwiLitchi { kiwi, litchi, bob, alice_k, alice_l } = kiwi_and_litchi().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = linked_alice_config(&[&kiwi.server_name, &litchi.server_name], &[&alice_k.user_id, &alice_l.user_id]);
    let f = FedlinkBin::start(dir.path(), &extra).await.expect("fedlink starts");

    mark("started");
    // Room 1: bob invites alice@kiwi and the bot.
    let room = bob.create_room(&[&alice_k.user_id, &f.bot()], room_version, "private_chat").await.unwrap();
    wait_member(&bob, &room, &f.bot()).await;
    assert_eq!(room_view(&f, &room).await["room_version"], room_version.unwrap_or("12"));

    mark("bot joined room 1");
    // alice@litchi is invited by the bot, accepts, and litchi joins through fedlink.
    wait_invited(&alice_l, &room, &f).await;
    mark("alice@litchi invited");
    alice_l.join(&room, &[]).await.unwrap_or_else(|e| panic!("join through fedlink: {e:?}\nfedlink log:\n{}", f.log_tail()));
    wait_member(&bob, &room, &alice_l.user_id).await;
    assert!(f.metric("fedlink_served_membership_total{endpoint=\"send_join\",result=\"ok\"}").await >= 1.0);
    let p = f.admin("/_fedlink/admin/v1/persons/alice").await.1;
    let r = p["rooms"].as_array().unwrap().iter().find(|r| r["room_id"] == room.as_str()).cloned().unwrap();
    assert_eq!(r["accounts"][&alice_l.user_id]["membership"], "join", "{p}");

    mark("alice@litchi joined room 1");
    // Room 2: alice@litchi declines the invite; alice@kiwi's later join brings no new invite.
    let room2 = bob.create_room(&[&alice_k.user_id, &f.bot()], room_version, "private_chat").await.unwrap();
    wait_member(&bob, &room2, &f.bot()).await;
    wait_invited(&alice_l, &room2, &f).await;
    mark("alice@litchi invited to room 2");
    alice_l.leave(&room2).await.unwrap_or_else(|e| panic!("decline through fedlink: {e:?}\nfedlink log:\n{}", f.log_tail()));
    wait_until("the decline in fedlink's view", T, || async {
        Ok((room_view(&f, &room2).await["members"][&alice_l.user_id] == "leave").then_some(()))
    })
    .await
    .unwrap();
    mark("decline seen");
    let sent = f.metric("fedlink_invites_sent_total{result=\"ok\"}").await;
    alice_k.join(&room2, &[]).await.unwrap();
    wait_until("alice@kiwi's join in fedlink's view", T, || async {
        Ok((room_view(&f, &room2).await["members"][&alice_k.user_id] == "join").then_some(()))
    })
    .await
    .unwrap();
    mark("alice@kiwi join seen");
    // The reconciler has run on the join (it runs on every append); nothing was sent.
    let v = room_view(&f, &room2).await;
    assert_eq!(v["pending_invites"], serde_json::json!({}), "{v}");
    assert_eq!(f.metric("fedlink_invites_sent_total{result=\"ok\"}").await, sent);
    assert!(!invited_rooms(&alice_l).await.unwrap().contains(&room2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_account_follows_into_rooms_default_version() {
    scenario(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_account_follows_into_rooms_v10() {
    scenario(Some("10")).await;
}
