//! Self-test of the Synapse test harness (`tests/support/synapse.rs`).
//!
//! Starts two real Synapse homeservers on loopback and checks what fedlink's
//! end-to-end tests rely on: open registration, rooms, invites, joins,
//! messages, read receipts, and federation between two loopback servers with
//! self-signed certificates (TLS listener, `federation_verify_certificates:
//! false`, empty `ip_range_blacklist`).

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use support::{enc, wait_until, ClientSession, Synapse, SynapseOpts};

const WAIT: Duration = Duration::from_secs(60);

/// Whether `session`'s `/sync` shows an `m.read` receipt by `reader` on `event_id`.
async fn sees_receipt(
    session: &ClientSession,
    room_id: &str,
    event_id: &str,
    reader: &str,
) -> Result<bool> {
    let sync = session.get("/_matrix/client/v3/sync?timeout=0").await?;
    let ephemeral = &sync["rooms"]["join"][room_id]["ephemeral"]["events"];
    Ok(ephemeral
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.receipt")
        .any(|e| !e["content"][event_id]["m.read"][reader].is_null()))
}

/// Polls until `session`'s server lists `user` among the room's joined members.
async fn wait_joined(session: &ClientSession, room_id: &str, user: &str) -> Result<Vec<String>> {
    wait_until(
        &format!("{user} joined in {room_id} as seen by {}", session.user_id),
        WAIT,
        || async move {
            let members = session.joined_members(room_id).await?;
            Ok(members.iter().any(|m| m == user).then_some(members))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_synapses_rooms_receipts_and_federation() -> Result<()> {
    let t0 = Instant::now();
    let (hs1, hs2) = tokio::try_join!(
        Synapse::start(SynapseOpts::default()),
        Synapse::start(SynapseOpts::default())
    )?;
    eprintln!(
        "started {} in {:?} and {} in {:?} (both ready after {:?})",
        hs1.server_name,
        hs1.startup_time,
        hs2.server_name,
        hs2.startup_time,
        t0.elapsed()
    );

    let result = scenario(&hs1, &hs2).await;
    if let Err(e) = &result {
        eprintln!(
            "test failed: {e:#}\n=== {} homeserver.log tail ===\n{}\n=== {} homeserver.log tail ===\n{}",
            hs1.server_name,
            hs1.log_tail(),
            hs2.server_name,
            hs2.log_tail()
        );
    }
    result
}

async fn scenario(hs1: &Synapse, hs2: &Synapse) -> Result<()> {
    // --- one server: register, room, invite, join, message, receipt ---
    let a = hs1.register("alice").await?;
    let b = hs1.register("bob").await?;
    assert_eq!(a.user_id, format!("@alice:{}", hs1.server_name));

    let room = a.create_room(&[&b.user_id], None, "private_chat").await?;
    b.join(&room, &[]).await?;
    let members = a.joined_members(&room).await?;
    assert!(
        members.contains(&a.user_id) && members.contains(&b.user_id),
        "joined members {members:?}"
    );
    let create = a
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.create/",
            enc(&room)
        ))
        .await?;
    eprintln!("room {room}: version {}", create["room_version"]);

    let event_id = a.send_text(&room, "hello bob").await?;
    b.send_receipt(&room, &event_id).await?;
    wait_until("alice to see bob's read receipt", WAIT, || async {
        Ok(sees_receipt(&a, &room, &event_id, &b.user_id)
            .await?
            .then_some(()))
    })
    .await?;

    // --- two servers: invite over federation, remote join, messages both ways ---
    let c = hs2.register("carol").await?;
    a.invite(&room, &c.user_id).await?;
    wait_until(
        "carol's invite to arrive on the second server",
        WAIT,
        || async {
            let sync = c.get("/_matrix/client/v3/sync?timeout=0").await?;
            Ok((!sync["rooms"]["invite"][room.as_str()].is_null()).then_some(()))
        },
    )
    .await?;
    c.join(&room, &[&hs1.server_name]).await?;

    let seen_by_a = wait_joined(&a, &room, &c.user_id).await?;
    let seen_by_c = wait_joined(&c, &room, &a.user_id).await?;
    assert_eq!(seen_by_a, seen_by_c, "both servers agree on the members");
    assert_eq!(seen_by_a.len(), 3, "{seen_by_a:?}");

    let from_c = c.send_text(&room, "hello from the other server").await?;
    wait_until(
        "carol's message to reach the first server",
        WAIT,
        || async {
            let path = format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&from_c)
            );
            let ev: Value = a.get(&path).await?;
            Ok((ev["content"]["body"] == "hello from the other server").then_some(()))
        },
    )
    .await
    .context("federation hs2 -> hs1")?;

    let from_a = a.send_text(&room, "hello carol").await?;
    // Synapse answers 200 but silently drops a receipt for an event it does not
    // have yet, so wait for the event to federate first.
    wait_until(
        "alice's message to reach the second server",
        WAIT,
        || async {
            let path = format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&from_a)
            );
            Ok(c.get(&path).await.ok().map(drop))
        },
    )
    .await?;
    c.send_receipt(&room, &from_a).await?;
    wait_until(
        "carol's receipt to reach alice over federation",
        WAIT,
        || async {
            Ok(sees_receipt(&a, &room, &from_a, &c.user_id)
                .await?
                .then_some(()))
        },
    )
    .await?;

    c.leave(&room).await?;
    wait_until("carol's leave to reach the first server", WAIT, || async {
        let members = a.joined_members(&room).await?;
        Ok((!members.contains(&c.user_id)).then_some(()))
    })
    .await?;
    Ok(())
}
