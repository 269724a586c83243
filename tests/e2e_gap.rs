//! End-to-end, two real Synapse homeservers plus fedlink on loopback: fedlink is down
//! (SIGKILL) while alice@kiwi, linked to alice@litchi, joins a room the bot is in and 300
//! messages follow. After the restart kiwi catches fedlink up, fedlink sees alice@kiwi
//! joined, and invites alice@litchi.

mod support;

use std::time::Duration;

use support::{enc, fedlink_proc::FedlinkBin, kiwi_and_litchi, linked_alice_config, wait_until, KiwiLitchi};

const T: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_during_downtime_followed_by_300_messages_still_brings_the_sibling() {
    let KiwiLitchi { kiwi, litchi, bob, alice_k, alice_l } = kiwi_and_litchi().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = linked_alice_config(&[&kiwi.server_name, &litchi.server_name], &[&alice_k.user_id, &alice_l.user_id]);
    let mut f = FedlinkBin::start(dir.path(), &extra).await.expect("fedlink starts");
    let room = bob.create_room(&[&f.bot()], None, "private_chat").await.unwrap();
    wait_until("the bot joined", T, || async { Ok(bob.joined_members(&room).await?.contains(&f.bot()).then_some(())) }).await.unwrap();
    let first = bob.send_text(&room, "before the downtime").await.unwrap();
    wait_until("fedlink has the first message", T, || async {
        let v = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
        Ok((v["forward_extremities"][0] == first.as_str()).then_some(()))
    })
    .await
    .unwrap();

    f.kill();
    bob.invite(&room, &alice_k.user_id).await.unwrap();
    alice_k.join(&room, &[]).await.unwrap();
    for i in 0..300 {
        bob.send_text(&room, &format!("while fedlink was down {i}")).await.unwrap();
    }
    f.restart().await.unwrap();

    wait_until("alice@litchi invited after the restart", T, || async {
        let v = alice_l.get("/_matrix/client/v3/sync?timeout=0").await?;
        if v["rooms"]["invite"].get(&room).is_some() {
            return Ok(Some(()));
        }
        Err(anyhow::anyhow!("fedlink log:\n{}", f.log_tail()))
    })
    .await
    .unwrap();
    let v = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    assert_eq!(v["members"][&alice_k.user_id], "join", "{}", v["members"]);
    // Which way the events came back depends on how Synapse catches a destination up (all
    // queued transactions, or the latest event and `get_missing_events`); both must work.
    // The state-at-the-gap path is proven against a peer that sends only the latest event
    // (`tests/federation.rs`).
    eprintln!(
        "gap fills: get_missing_events {}, state at the gap {}",
        f.metric("fedlink_gap_fills_total{result=\"ok\"}").await,
        f.metric("fedlink_gap_fills_total{result=\"state\"}").await
    );
}
