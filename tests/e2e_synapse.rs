//! End-to-end against a real Synapse (from PyPI, SQLite, TLS on loopback): a user creates
//! a room with Synapse's default room version and invites fedlink's bot; the bot joins as
//! Synapse sees it; messages and read receipts land in fedlink's log and views; after
//! fedlink is killed (SIGKILL) and restarted, it is still joined, a message sent while it
//! was down arrives, and no event is logged twice.

mod support;

use std::{collections::BTreeMap, time::Duration};

use fedlink::{core::log_entry::Entry, store::Store};
use serde_json::Value;
use support::{enc, fedlink_proc::FedlinkBin, wait_until, Synapse, SynapseOpts, FAST_RETRY};

const T: Duration = Duration::from_secs(60);


async fn room_view(f: &FedlinkBin, room: &str) -> Value {
    f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(room))).await.1
}

async fn wait_for_event(f: &FedlinkBin, room: &str, event_id: &str) {
    wait_until(&format!("{event_id} in fedlink's views"), T, || async {
        let v = room_view(f, room).await;
        let ext = v["forward_extremities"].as_array().cloned().unwrap_or_default();
        if ext.iter().any(|e| e == event_id) {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("room view: {v}\nfedlink log:\n{}", f.log_tail()))
        }
    })
    .await
    .unwrap();
}

async fn scenario(room_version: Option<&str>) {
    let kiwi = Synapse::start(SynapseOpts { extra_yaml: FAST_RETRY.into(), ..Default::default() }).await.expect("synapse starts");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[federation]\nverify_tls = false\nallowed_servers = [\"{}\"]\n", kiwi.server_name);
    let mut f = FedlinkBin::start(dir.path(), &extra).await.expect("fedlink starts");

    let alice = kiwi.register("alice").await.unwrap();
    let bob = kiwi.register("bob").await.unwrap();
    let room = alice.create_room(&[&f.bot(), &bob.user_id], room_version, "private_chat").await.unwrap();
    bob.join(&room, &[]).await.unwrap();

    // The bot is joined as Synapse sees it.
    wait_until("bot joined on Synapse", T, || async {
        let m = alice.joined_members(&room).await?;
        Ok(m.contains(&f.bot()).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:?}\nfedlink log:\n{}\nsynapse log:\n{}", f.log_tail(), kiwi.log_tail()));
    let v = room_view(&f, &room).await;
    let expected_version = room_version.unwrap_or("12");
    assert_eq!(v["room_version"], expected_version);

    // Messages and receipts reach the log and views.
    let m1 = alice.send_text(&room, "hello fedlink").await.unwrap();
    wait_for_event(&f, &room, &m1).await;
    bob.send_receipt(&room, &m1).await.unwrap();
    wait_until("bob's receipt in fedlink", T, || async {
        let v = room_view(&f, &room).await;
        Ok((v["receipts"][&bob.user_id]["event_id"] == m1.as_str()).then_some(()))
    })
    .await
    .unwrap();
    let members = room_view(&f, &room).await["joined_members"].clone();
    for u in [&alice.user_id, &bob.user_id, &f.bot()] {
        assert!(members.as_array().unwrap().iter().any(|m| m == u.as_str()), "{u} in {members}");
    }

    // Kill fedlink; a message sent meanwhile must arrive after the restart.
    // The kill may land between an append and its flush: that transaction was never
    // acknowledged, and Synapse sends it again. Either way nothing is lost.
    f.kill();
    let m2 = alice.send_text(&room, "sent while fedlink was down").await.unwrap();
    f.restart().await.unwrap();
    let v = room_view(&f, &room).await;
    assert_eq!(v["bot_membership"], "joined", "still joined after restart");
    wait_until("bob's receipt after the restart", T, || async {
        Ok((room_view(&f, &room).await["receipts"][&bob.user_id]["event_id"] == m1.as_str()).then_some(()))
    })
    .await
    .unwrap();
    wait_for_event(&f, &room, &m2).await;
    let m3 = alice.send_text(&room, "after restart").await.unwrap();
    wait_for_event(&f, &room, &m3).await;
    alice.send_receipt(&room, &m3).await.unwrap();
    wait_until("alice's receipt after restart", T, || async {
        Ok((room_view(&f, &room).await["receipts"][&alice.user_id]["event_id"] == m3.as_str()).then_some(()))
    })
    .await
    .unwrap();
    f.kill();

    // The log holds each event exactly once, including all three messages.
    let store = Store::open(&dir.path().join("db")).unwrap();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for rec in store.records_after(0) {
        if let Entry::Pdu(p) = rec.unwrap().entry {
            *seen.entry(p.event_id.to_string()).or_default() += 1;
        }
    }
    let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dupes.is_empty(), "events logged twice: {dupes:?}");
    for m in [&m1, &m2, &m3] {
        assert!(seen.contains_key(m.as_str()), "{m} is in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_default_room_version_bot_joins_and_logs_messages_and_receipts() {
    scenario(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_room_version_10() {
    scenario(Some("10")).await;
}
