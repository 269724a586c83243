//! The demo behind `scripts/demo.sh` (ignored in normal test runs): two real Synapse
//! homeservers and fedlink on loopback, narrated step by step.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    appservice::{appservice_toml, install_registration, receipt_of},
    enc,
    fedlink_proc::FedlinkBin,
    wait_until, Synapse, SynapseOpts,
};

const T: Duration = Duration::from_secs(60);

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run through scripts/demo.sh"]
async fn demo() {
    step(1, "Starting two Synapse homeservers, kiwi and litchi ...");
    let (kiwi, litchi) = tokio::join!(Synapse::start(SynapseOpts::default()), Synapse::start(SynapseOpts::default()));
    let (mut kiwi, mut litchi) = (kiwi.unwrap(), litchi.unwrap());
    println!("    kiwi   = {}  (client API {})", kiwi.server_name, kiwi.client_url);
    println!("    litchi = {}  (client API {})", litchi.server_name, litchi.client_url);

    step(2, "Starting fedlink as its own federation server ...");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[federation]\nverify_tls = false\nallowed_servers = [\"{}\", \"{}\"]\n{}{}",
        kiwi.server_name,
        litchi.server_name,
        appservice_toml(&kiwi),
        appservice_toml(&litchi)
    );
    let f = FedlinkBin::start(dir.path(), &extra).await.unwrap();
    println!("    fedlink = {}  bot = {}  admin API = {}", f.name, f.bot(), f.admin_url);
    println!("    installing `fedlink appservice-registration` output on both homeservers (restart) ...");
    install_registration(&mut kiwi, &f).await;
    install_registration(&mut litchi, &f).await;

    step(3, "Registering bob@kiwi, alice@kiwi and alice@litchi ...");
    let bob = kiwi.register("bob").await.unwrap();
    let alice_k = kiwi.register("alice").await.unwrap();
    let alice_l = litchi.register("alice").await.unwrap();

    step(4, "Linking alice's two accounts through the admin API ...");
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/_fedlink/admin/v1/persons/alice", f.admin_url))
        .bearer_auth(support::fedlink_proc::ADMIN_TOKEN)
        .json(&json!({ "accounts": [alice_k.user_id, alice_l.user_id] }))
        .send()
        .await
        .unwrap();
    println!("    PUT /_fedlink/admin/v1/persons/alice -> {}", r.status());

    step(5, "bob creates a private room on kiwi, inviting alice@kiwi and fedlink's bot ...");
    let room = bob.create_room(&[&alice_k.user_id, &f.bot()], None, "private_chat").await.unwrap();
    println!("    room {room}");
    wait_until("bot joined", T, || async { Ok(bob.joined_members(&room).await?.contains(&f.bot()).then_some(())) }).await.unwrap();
    println!("    the bot joined (kiwi's member list shows {})", f.bot());

    step(6, "fedlink sees alice@kiwi invited and invites alice@litchi ...");
    wait_until("invite on litchi", T, || async {
        let v = alice_l.get("/_matrix/client/v3/sync?timeout=0").await?;
        Ok(v["rooms"]["invite"].get(&room).map(|_| ()))
    })
    .await
    .unwrap();
    println!("    litchi's /sync shows alice@litchi invited to {room}");

    step(7, "alice@kiwi joins; fedlink joins alice@litchi through litchi's registration (auto-join) ...");
    alice_k.join(&room, &[]).await.unwrap();
    wait_until("alice@litchi joined", T, || async { Ok(bob.joined_members(&room).await?.contains(&alice_l.user_id).then_some(())) }).await.unwrap();
    println!("    kiwi's member list now: {:?}", bob.joined_members(&room).await.unwrap());

    step(8, "bob sends a message; alice reads it on litchi ...");
    let m = bob.send_text(&room, "lunch at noon?").await.unwrap();
    wait_until("message on litchi", T, || async {
        Ok(alice_l.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&m))).await.ok().map(|_| ()))
    })
    .await
    .unwrap();
    alice_l.send_receipt(&room, &m).await.unwrap();
    println!("    alice@litchi marked {m} read");
    wait_until("receipt on kiwi", T, || async { Ok((receipt_of(&bob, &room, &alice_k.user_id).await.as_deref() == Some(m.as_str())).then_some(())) })
        .await
        .unwrap();
    println!("    kiwi now shows alice@kiwi's read marker at the same event: the read followed the person");

    step(9, "What the operator sees (GET /_fedlink/admin/v1/persons/alice):");
    let p = f.admin("/_fedlink/admin/v1/persons/alice").await.1;
    println!("{}", serde_json::to_string_pretty(&p).unwrap());
    let r = f.admin(&format!("/_fedlink/admin/v1/rooms/{}", enc(&room))).await.1;
    println!("    room view: version {}, {} events, members {}", r["room_version"], r["events"], r["members"]);
    step(10, "Done; tearing everything down.");
}
