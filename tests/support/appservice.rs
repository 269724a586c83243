//! Installing fedlink's application-service registration on a test Synapse, and reading
//! receipts back through the client API.

use std::process::Command;

use serde_json::Value;

use super::{fedlink_proc::FedlinkBin, ClientSession, Synapse};

pub fn token() -> String {
    use rand::Rng;
    rand::thread_rng().sample_iter(&rand::distributions::Alphanumeric).take(32).map(char::from).collect()
}

/// Install fedlink's registration (as the CLI prints it) on `hs` and restart it.
pub async fn install_registration(hs: &mut Synapse, f: &FedlinkBin) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedlink"))
        .args(["appservice-registration", "-c"])
        .arg(&f.config)
        .args(["--server", &hs.server_name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = hs.dir.path().join("fedlink-registration.yaml");
    std::fs::write(&path, &out.stdout).unwrap();
    let mut cfg = std::fs::read_to_string(hs.config_path()).unwrap();
    cfg.push_str(&format!("app_service_config_files: [\"{}\"]\n", path.display()));
    std::fs::write(hs.config_path(), cfg).unwrap();
    hs.restart().await.unwrap();
}

pub fn appservice_toml(hs: &Synapse) -> String {
    format!(
        "[[appservice]]\nserver_name = \"{}\"\nclient_url = \"{}\"\nas_token = \"{}\"\nhs_token = \"{}\"\n",
        hs.server_name,
        hs.client_url,
        token(),
        token()
    )
}

pub async fn sync(c: &ClientSession) -> Value {
    c.get("/_matrix/client/v3/sync?timeout=0").await.unwrap()
}

/// The event `user`'s latest m.read receipt in `room` points at, as `viewer`'s server shows
/// it. A user can hold several (an unthreaded one and one per thread, `main` included): the
/// one set last counts.
pub async fn receipt_of(viewer: &ClientSession, room: &str, user: &str) -> Option<String> {
    let s = sync(viewer).await;
    let events = s["rooms"]["join"][room]["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
    events
        .iter()
        .filter(|e| e["type"] == "m.receipt")
        .flat_map(|e| e["content"].as_object().cloned().unwrap_or_default())
        .filter_map(|(event, v)| v["m.read"].get(user).map(|d| (d["ts"].as_u64().unwrap_or(0), event)))
        .max()
        .map(|(_, event)| event)
}

