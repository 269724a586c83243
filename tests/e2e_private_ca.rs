//! End-to-end, issue #10 item 7: two Synapses whose one TLS listener (federation and client
//! API) serves certificates from a private CA this test creates. fedlink checks TLS
//! (`verify_tls = true`) with that CA as `federation.ca_file`, and reaches both over
//! federation and through their registrations' `https` client URLs: alice@litchi is
//! invited over federation and joined through litchi's registration. Without the CA, the
//! registration route's client refuses the certificate and says why.

mod support;

use std::{sync::Arc, time::Duration};

use support::{
    appservice::{install_registration, token},
    fedlink_proc::FedlinkBin,
    free_port, wait_until, Synapse, SynapseOpts, FAST_RETRY,
};

const T: Duration = Duration::from_secs(90);

fn registration(hs: &Synapse) -> String {
    format!(
        "[[appservice]]\nserver_name = \"{}\"\nclient_url = \"{}\"\nas_token = \"{}\"\nhs_token = \"{}\"\n",
        hs.server_name,
        hs.https_client_url(),
        token(),
        token()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_for_federation_and_the_registration_route() {
    let ca = Arc::new(support::util::TestCa::new());
    let opts = || SynapseOpts { extra_yaml: FAST_RETRY.into(), private_ca: Some(ca.clone()) };
    let (kiwi, litchi) = tokio::join!(Synapse::start(opts()), Synapse::start(opts()));
    let (mut kiwi, mut litchi) = (kiwi.unwrap(), litchi.unwrap());
    let bob = kiwi.register("bob").await.unwrap();
    let alice_k = kiwi.register("alice").await.unwrap();
    let alice_l = litchi.register("alice").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let extra = format!(
        "[federation]\nverify_tls = true\nca_file = \"ca.pem\"\nallow_private_networks = true\nallowed_servers = [\"{}\", \"{}\"]\n\
         [[directory.person]]\nid = \"alice\"\naccounts = [\"{}\", \"{}\"]\n{}{}",
        kiwi.server_name,
        litchi.server_name,
        alice_k.user_id,
        alice_l.user_id,
        registration(&kiwi),
        registration(&litchi)
    );
    let f = FedlinkBin::start_on(dir.path(), free_port(), free_port(), &extra).await.unwrap();
    install_registration(&mut kiwi, &f).await;
    install_registration(&mut litchi, &f).await;

    // Over federation (verified TLS): the bot joins bob's room and invites alice@litchi;
    // through litchi's registration (https, the private CA): she is joined.
    let room = bob.create_room(&[&alice_k.user_id, &f.bot()], None, "private_chat").await.unwrap();
    alice_k.join(&room, &[]).await.unwrap();
    wait_until("alice@litchi joined through litchi's registration over https", T, || async {
        Ok(bob.joined_members(&room).await?.contains(&alice_l.user_id).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", f.log_tail()));
    wait_until("the join counted", T, || async {
        Ok((f.metric("fedlink_appservice_actions_total{kind=\"join\",result=\"ok\"}").await >= 1.0).then_some(()))
    })
    .await
    .unwrap();

    // The same registration without the CA: the certificate is refused, with its cause.
    let cfg = fedlink::config::Config::from_toml_str(
        &format!("server_name = \"x.test\"\n[tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n[admin]\ntoken = \"0123456789abcdef0123\"\n{}", registration(&litchi)),
        std::iter::empty(),
        dir.path(),
    )
    .unwrap();
    let clients = fedlink::appservice::clients(&cfg).unwrap();
    let err = clients[&litchi.server_name].get(format!("{}/_matrix/client/versions", litchi.https_client_url())).send().await.expect_err("an unknown CA must be refused");
    let chain = fedlink::federation::client::error_chain(&err);
    assert!(chain.contains("UnknownIssuer") || chain.contains("unknown issuer"), "the cause is named: {chain}");
}
