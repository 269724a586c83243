//! Given these records, the report counts persons and accounts in the right states.

use serde_json::json;

use super::*;
use crate::core::{
    log_entry::{BotJoined, Entry, InvitePending, LinkSource, LogRecord, OptOut, PduEntry, PduStatus, PersonSet, ReceiptEntry, StateRef},
    reconcile::Route,
    views::Views,
};

const BOT: &str = "@fedlink:fl";

struct Given {
    views: Views,
    seq: u64,
}

fn user(u: &str) -> OwnedUserId {
    u.try_into().unwrap()
}

impl Given {
    fn new() -> Self {
        Given { views: Views::new(BOT.try_into().unwrap()), seq: 0 }
    }
    fn record(&mut self, entry: Entry) -> &mut Self {
        self.seq += 1;
        self.views.apply(&LogRecord { v: 1, seq: self.seq, at_ms: 0, entry });
        self
    }
    fn linked(&mut self, person: &str, accounts: &[&str]) -> &mut Self {
        self.record(Entry::PersonSet(PersonSet { person: person.into(), accounts: accounts.iter().map(|a| user(a)).collect(), source: LinkSource::Admin }))
    }
    fn room(&mut self, room: &str, members: &[(&str, &str)], bot_level: i64) -> &mut Self {
        let mut state: Vec<StateRef> = members
            .iter()
            .enumerate()
            .map(|(i, (u, m))| StateRef { event_type: "m.room.member".into(), state_key: (*u).into(), event_id: format!("$m{i}{}", room.len()).try_into().unwrap(), membership: Some((*m).into()) })
            .collect();
        state.push(StateRef { event_type: "m.room.member".into(), state_key: BOT.into(), event_id: "$bot".try_into().unwrap(), membership: Some("join".into()) });
        self.record(Entry::BotJoined(BotJoined {
            room_id: room.try_into().unwrap(),
            room_version: ruma::RoomVersionId::V12,
            join_event_id: "$botjoin".try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            state,
            power_levels: Some(json!({ "users": { BOT: bot_level }, "invite": 50 })),
        }))
    }
    fn receipt(&mut self, room: &str, u: &str, event: &str, depth: u64) -> &mut Self {
        self.record(Entry::Receipt(ReceiptEntry {
            origin: user(u).server_name().to_owned(),
            room_id: room.try_into().unwrap(),
            receipt_type: "m.read".into(),
            user_id: user(u),
            event_id: event.try_into().unwrap(),
            ts: None,
            thread_id: None,
            thread_inferred: false,
            depth: Some(depth),
            event_ts: None,
            via_appservice: None,
        }))
    }
}

fn routes(servers: &[&str]) -> Routes {
    servers.iter().map(|s| ((*s).try_into().unwrap(), Route { auto_join: true, mirror_leave: true })).collect()
}

fn counts(m: &BTreeMap<Step, usize>) -> Vec<(&'static str, usize)> {
    m.iter().filter(|(_, n)| **n > 0).map(|(s, n)| (s.label(), *n)).collect()
}

#[test]
fn persons_and_accounts_are_counted_by_how_far_they_are_in_step() {
    let mut g = Given::new();
    let both = routes(&["kiwi", "litchi"]);
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).linked("carol", &["@carol:kiwi", "@carol:litchi"]);
    g.record(Entry::OptOut(OptOut { person: "carol".into(), room_id: None, opted_out: true }));
    // alice@kiwi joined a room where the bot may invite: alice@litchi is to be invited.
    g.room("!a:kiwi", &[("@alice:kiwi", "join"), ("@carol:kiwi", "join")], 100);
    let r = report(&g.views, &both);
    assert_eq!(counts(&r.persons), vec![("catching_up", 1), ("opted_out", 1)]);
    assert_eq!(counts(&r.account_rooms), vec![("in_step", 1), ("catching_up", 1)]);
    assert_eq!(r.out_of_step.keys().map(|(_, a)| a.as_str()).collect::<Vec<_>>(), vec!["@alice:litchi"]);
    // The invite is pending: still catching up.
    g.record(Entry::InvitePending(InvitePending { room_id: "!a:kiwi".try_into().unwrap(), target: user("@alice:litchi"), event_id: "$inv".try_into().unwrap(), event: json!({}) }));
    assert_eq!(counts(&report(&g.views, &both).persons), vec![("catching_up", 1), ("opted_out", 1)]);
    // She joins; both have read the same: in step.
    g.record(Entry::Pdu(PduEntry {
        room_id: "!a:kiwi".try_into().unwrap(),
        event_id: "$j".try_into().unwrap(),
        via: "litchi".try_into().unwrap(),
        status: PduStatus::Accepted,
        event_type: "m.room.member".into(),
        state_key: Some("@alice:litchi".into()),
        sender: user("@alice:litchi"),
        membership: Some("join".into()),
        prev_events: vec![],
        depth: 5,
        origin_server_ts: 0,
        pdu: json!({ "content": { "membership": "join" } }),
        resolved_state: None,
        superseded: vec![],
    }));
    g.receipt("!a:kiwi", "@alice:kiwi", "$e9", 9).receipt("!a:kiwi", "@alice:litchi", "$e9", 9);
    let r = report(&g.views, &both);
    assert_eq!(counts(&r.persons), vec![("in_step", 1), ("opted_out", 1)]);
    assert!(r.out_of_step.is_empty());
    // alice@kiwi reads further and litchi has no registration: unsupported.
    g.receipt("!a:kiwi", "@alice:kiwi", "$e10", 10);
    assert_eq!(counts(&report(&g.views, &routes(&["kiwi"])).persons), vec![("unsupported", 1), ("opted_out", 1)]);
    // In a room where the bot lacks the power to invite, alice is blocked: the worst wins.
    g.room("!b:kiwi", &[("@alice:kiwi", "join")], 0);
    let r = report(&g.views, &both);
    assert_eq!(counts(&r.persons), vec![("blocked", 1), ("opted_out", 1)]);
    assert_eq!(r.out_of_step.get(&("!b:kiwi".try_into().unwrap(), user("@alice:litchi"))), Some(&Step::Blocked));
}

/// The cached classification, updated with the rooms each change touched, always equals a
/// full pass: through invites, reads, power changes, opt-outs and relinking.
#[test]
fn the_cached_pass_equals_a_full_pass_after_every_change() {
    let mut g = Given::new();
    let r = routes(&["kiwi"]);
    let mut cache = StepCache::default();
    let mut check = |g: &mut Given, what: &str| {
        let touched = std::mem::replace(&mut g.views.step_touched, crate::core::views::Touched::none());
        cache.update(&g.views, &r, &touched);
        assert_eq!(cache.report(&g.views), report(&g.views, &r), "after {what}");
    };
    check(&mut g, "nothing");
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]);
    check(&mut g, "a link");
    g.room("!a:kiwi", &[("@alice:kiwi", "join")], 100);
    check(&mut g, "a room with alice");
    g.room("!b:kiwi", &[("@alice:kiwi", "invite")], 0);
    check(&mut g, "a room without power");
    g.receipt("!a:kiwi", "@alice:kiwi", "$x", 5);
    check(&mut g, "a read");
    g.record(Entry::OptOut(OptOut { person: "alice".into(), room_id: Some("!b:kiwi".try_into().unwrap()), opted_out: true }));
    check(&mut g, "an opt-out");
    g.linked("carol", &["@carol:kiwi", "@carol:mango"]);
    g.room("!c:kiwi", &[("@carol:kiwi", "join"), ("@alice:litchi", "join")], 100);
    check(&mut g, "another person");
    g.record(Entry::InvitePending(InvitePending { room_id: "!c:kiwi".try_into().unwrap(), target: user("@carol:mango"), event_id: "$i".try_into().unwrap(), event: json!({}) }));
    check(&mut g, "an invite pending");
}
