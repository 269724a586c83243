//! `PUT /_matrix/app/v1/transactions/{txnId}` bodies from a homeserver. Besides not
//! panicking, the parser must never let a homeserver speak for another server's users.
#![no_main]

use fedlink::appservice::{parse_push, MAX_PUSH_ITEMS};
use fedlink_fuzz::ORIGIN;
use libfuzzer_sys::fuzz_target;
use ruma::ServerName;

fuzz_target!(|data: &[u8]| {
    let server = <&ServerName>::try_from(ORIGIN).expect("fixed server name");
    let Ok(push) = parse_push(server, data) else { return };
    for r in &push.receipts {
        assert_eq!(r.user_id.server_name(), server, "receipt for foreign user {}", r.user_id);
    }
    for (user, presence, _) in &push.presence {
        assert_eq!(user.server_name(), server, "presence for foreign user {user}");
        assert!(matches!(presence.as_str(), "online" | "unavailable" | "offline"), "presence {presence}");
    }
    for ev in &push.events {
        assert_eq!(&*ev.via, server);
        let speaker = if ev.event_type == "m.room.member" {
            let sk = ev.state_key.as_deref().expect("member event without state_key");
            ruma::UserId::parse(sk).expect("member event with a state_key that is not a user id")
        } else {
            assert!(ev.state_key.is_none(), "message with a state_key");
            ev.sender.clone()
        };
        assert_eq!(speaker.server_name(), server, "event {} spoken for foreign user {speaker}", ev.event_id);
    }
    assert!(push.events.len() <= MAX_PUSH_ITEMS, "{} events accepted", push.events.len());
});
