//! Waits shared by the end-to-end tests: invites and joins as a homeserver's client sees
//! them, with fedlink's log on failure.

use std::time::Duration;

use super::{fedlink_proc::FedlinkBin, synapse::wait_until, ClientSession};

/// How long an end-to-end wait lasts.
pub const T: Duration = Duration::from_secs(60);

/// Rooms `c` is invited to, from a `/sync`.
pub async fn invited_rooms(c: &ClientSession) -> anyhow::Result<Vec<String>> {
    let v = c.get("/_matrix/client/v3/sync?timeout=0").await?;
    Ok(v["rooms"]["invite"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default())
}

/// Wait until `c` is invited to `room`.
pub async fn wait_invited(c: &ClientSession, room: &str, f: &FedlinkBin) {
    let t = std::time::Instant::now();
    wait_until(&format!("{} invited to {room}", c.user_id), T, || async {
        if invited_rooms(c).await?.iter().any(|r| r == room) {
            return Ok(Some(()));
        }
        Err(anyhow::anyhow!("fedlink log:\n{}", f.log_tail()))
    })
    .await
    .unwrap();
    if t.elapsed() > Duration::from_secs(10) {
        eprintln!("SLOW invite ({:?}); fedlink log:\n{}", t.elapsed(), f.log_tail());
    }
}

/// Wait until `c`'s homeserver shows `user` joined to `room`.
pub async fn wait_member(c: &ClientSession, room: &str, user: &str) {
    wait_until(&format!("{user} joined {room} as {} sees it", c.user_id), T, || async {
        Ok(c.joined_members(room).await?.iter().any(|m| m == user).then_some(()))
    })
    .await
    .unwrap();
}
