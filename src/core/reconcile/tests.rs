//! Given these log records, when the reconciler runs, then exactly these actions; and after
//! the shell logs what it did, none on a second run.

use serde_json::json;

use super::*;
use super::decide_presence;
use crate::core::{
    log_entry::{
        BotJoined, Entry, InviteFailed, InvitePending, LinkSource, LogRecord, OptOut, PduEntry, PduStatus, PersonSet,
        StateRef,
    },
    views::Views,
};

const BOT: &str = "@fedlink:fl";
const ROOM: &str = "!r:kiwi";

struct Given {
    views: Views,
    seq: u64,
    n: u64,
}

fn given() -> Given {
    Given { views: Views::new(BOT.try_into().unwrap()), seq: 0, n: 0 }
}

fn room() -> OwnedRoomId {
    ROOM.try_into().unwrap()
}
fn user(u: &str) -> OwnedUserId {
    u.try_into().unwrap()
}

impl Given {
    fn record(&mut self, entry: Entry) -> &mut Self {
        self.seq += 1;
        self.views.apply(&LogRecord { v: 1, seq: self.seq, at_ms: 0, entry });
        self
    }
    fn linked(&mut self, person: &str, accounts: &[&str]) -> &mut Self {
        self.record(Entry::PersonSet(PersonSet {
            person: person.into(),
            accounts: accounts.iter().map(|a| user(a)).collect(),
            source: LinkSource::Admin,
        }))
    }
    /// `sender` set `target`'s membership to `m` at `ts`, as a registration pushed it (the
    /// bot is not in ROOM).
    fn pushed_member(&mut self, sender: &str, target: &str, m: &str, ts: Option<u64>) -> &mut Self {
        let event_id = format!("$pushed{}", self.seq + 1).try_into().unwrap();
        self.record(Entry::ClientEvent(crate::core::log_entry::ClientEventEntry {
            via: "kiwi".try_into().unwrap(),
            room_id: room(),
            event_id,
            sender: user(sender),
            event_type: "m.room.member".into(),
            state_key: Some(target.into()),
            membership: Some(m.into()),
            origin_server_ts: ts,
            is_direct: false,
            thread_root: None,
        }))
    }
    /// `account` caught up on its memberships through its registration.
    fn caught_up(&mut self, account: &str) -> &mut Self {
        self.record(Entry::CaughtUp(crate::core::log_entry::CaughtUp { account: user(account), memberships: 0, gave_up: false }))
    }
    /// The bot joined ROOM; `members` are (user, membership) in the state at the join.
    fn bot_joined(&mut self, members: &[(&str, &str)], invite_level: i64, bot_level: i64) -> &mut Self {
        let mut state: Vec<StateRef> = members
            .iter()
            .enumerate()
            .map(|(i, (u, m))| StateRef {
                event_type: "m.room.member".into(),
                state_key: (*u).into(),
                event_id: format!("$m{i}").try_into().unwrap(),
                membership: Some((*m).into()),
            })
            .collect();
        state.push(StateRef { event_type: "m.room.power_levels".into(), state_key: "".into(), event_id: "$pl0".try_into().unwrap(), membership: None });
        self.record(Entry::BotJoined(BotJoined {
            room_id: room(),
            room_version: ruma::RoomVersionId::V12,
            join_event_id: "$botjoin".try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            state,
            power_levels: Some(json!({ "users": { BOT: bot_level }, "invite": invite_level })),
        }))
        .state("m.room.member", BOT, Some("join"), json!({ "membership": "join" }))
    }
    fn state(&mut self, kind: &str, state_key: &str, membership: Option<&str>, content: serde_json::Value) -> &mut Self {
        self.state_by("@someone:kiwi", kind, state_key, membership, content)
    }
    fn state_by(&mut self, sender: &str, kind: &str, state_key: &str, membership: Option<&str>, content: serde_json::Value) -> &mut Self {
        self.n += 1;
        let id = format!("$e{}", self.n);
        self.record(Entry::Pdu(PduEntry {
            room_id: room(),
            event_id: id.try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            status: PduStatus::Accepted,
            event_type: kind.into(),
            state_key: Some(state_key.into()),
            sender: user(sender),
            membership: membership.map(String::from),
            prev_events: vec![],
            depth: self.n,
            origin_server_ts: 0,
            pdu: json!({ "content": content }),
            resolved_state: None,
            superseded: Vec::new(),
        }))
    }
    fn member(&mut self, u: &str, m: &str) -> &mut Self {
        self.state("m.room.member", u, Some(m), json!({ "membership": m }))
    }
    /// What the shell logs after acting on an incremental pass (the rooms touched since the
    /// last one), as the worker does. Tests then check with a full `decide` that nothing is
    /// left: an incremental pass that missed a decision fails them.
    fn acted(&mut self) -> &mut Self {
        let touched = std::mem::replace(&mut self.views.touched, crate::core::views::Touched::none());
        for a in decide_touched(&self.views, &Routes::new(), &touched) {
            match a {
                Action::Invite { room_id, target, .. } => {
                    self.record(Entry::InvitePending(InvitePending {
                        room_id,
                        target,
                        event_id: "$inv".try_into().unwrap(),
                        event: json!({}),
                    }));
                }
                Action::SetRead { .. } | Action::Join { .. } | Action::Leave { .. } | Action::Unsupported { .. } | Action::InviteAs { .. } | Action::MarkDirect { .. } | Action::AwaitCatchUp { .. } => {}
                Action::MissingPower { room_id, target, power_levels_event, .. } => {
                    self.record(Entry::InviteFailed(InviteFailed { room_id, target, reason: "missing power".into(), power_levels_event }));
                }
            }
        }
        self
    }
    /// Invite decisions only (the read/membership rules have their own tests).
    fn decide(&self) -> Vec<Action> {
        decide(&self.views, &Routes::new()).into_iter().filter(|a| matches!(a, Action::Invite { .. } | Action::MissingPower { .. })).collect()
    }
    /// Read/membership decisions, with read positions left out of the comparison.
    fn decide_sync(&self, routes: &Routes) -> Vec<Action> {
        decide(&self.views, routes)
            .into_iter()
            .filter(|a| !matches!(a, Action::Invite { .. } | Action::MissingPower { .. }))
            .map(|a| match a {
                Action::SetRead { room_id, target, event_id, thread, .. } => Action::SetRead { room_id, target, event_id, position: (None, None), thread },
                other => other,
            })
            .collect()
    }
    fn receipt(&mut self, u: &str, event: &str, depth: u64) -> &mut Self {
        self.read(u, None, event, depth)
    }
    /// A read receipt by `u` of `event` at `depth`, in thread `thread` or the main timeline.
    fn read(&mut self, u: &str, thread: Option<&str>, event: &str, depth: u64) -> &mut Self {
        self.record(Entry::Receipt(crate::core::log_entry::ReceiptEntry {
            origin: user(u).server_name().to_owned(),
            room_id: room(),
            receipt_type: "m.read".into(),
            user_id: user(u),
            event_id: event.try_into().unwrap(),
            ts: None,
            thread_id: thread.map(String::from),
            thread_inferred: thread.is_some(),
            depth: Some(depth),
            event_ts: None,
            via_appservice: thread.map(|_| true),
        }))
    }
    fn message(&mut self, sender: &str, depth: u64) -> String {
        self.sent("$msg", sender, depth, json!({}))
    }
    /// A message `pdu` by `sender` at `depth`, with an id of `prefix` and a counter.
    fn sent(&mut self, prefix: &str, sender: &str, depth: u64, pdu: serde_json::Value) -> String {
        self.n += 1;
        let id = format!("{prefix}{}", self.n);
        self.record(Entry::Pdu(PduEntry {
            room_id: room(),
            event_id: id.clone().try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            status: PduStatus::Accepted,
            event_type: "m.room.message".into(),
            state_key: None,
            sender: user(sender),
            membership: None,
            prev_events: vec![],
            depth,
            origin_server_ts: 0,
            pdu,
            resolved_state: None,
            superseded: Vec::new(),
        }));
        id
    }
}

fn invite(target: &str) -> Action {
    Action::Invite { room_id: room(), target: user(target), person: "alice".into(), partner: None }
}

#[test]
fn creator_joined_then_sibling_invited_once() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join")], 0, 0);
    assert_eq!(g.decide(), vec![invite("@alice:litchi")]);
    g.acted();
    assert_eq!(g.decide(), vec![], "second run: nothing new");
    // The invite lands: still nothing.
    g.member("@alice:litchi", "invite");
    assert_eq!(g.decide(), vec![]);
}

#[test]
fn an_invited_account_brings_its_siblings() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi", "@alice:mango"]).bot_joined(&[("@bob:kiwi", "join")], 0, 0);
    assert_eq!(g.decide(), vec![]);
    g.member("@alice:litchi", "invite");
    assert_eq!(g.decide(), vec![invite("@alice:kiwi"), invite("@alice:mango")]);
}

#[test]
fn a_join_brings_its_siblings() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[], 0, 0).member("@alice:kiwi", "join");
    assert_eq!(g.decide(), vec![invite("@alice:litchi")]);
}

#[test]
fn late_link_reconciles_rooms_already_known() {
    let mut g = given();
    g.bot_joined(&[("@alice:kiwi", "join")], 0, 0);
    assert_eq!(g.decide(), vec![]);
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]);
    assert_eq!(g.decide(), vec![invite("@alice:litchi")]);
}

#[test]
fn late_bot_join_reconciles_the_state_it_finds() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]);
    assert_eq!(g.decide(), vec![], "the bot is in no room yet");
    g.bot_joined(&[("@alice:kiwi", "invite")], 0, 0);
    assert_eq!(g.decide(), vec![invite("@alice:litchi")]);
}

#[test]
fn left_declined_kicked_and_banned_accounts_are_never_reinvited() {
    for gone in ["leave", "ban"] {
        let mut g = given();
        g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", gone)], 0, 0);
        assert_eq!(g.decide(), vec![], "{gone}");
    }
    // Declined: invited by fedlink, then left.
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join")], 0, 0).acted();
    g.member("@alice:litchi", "invite").member("@alice:litchi", "leave");
    assert_eq!(g.decide(), vec![]);
    // Kicked after joining; the sibling stays joined.
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    g.member("@alice:litchi", "leave");
    assert_eq!(g.decide(), vec![]);
}

#[test]
fn opt_out_everywhere_or_per_room() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join")], 0, 0);
    g.record(Entry::OptOut(OptOut { person: "alice".into(), room_id: Some(room()), opted_out: true }));
    assert_eq!(g.decide(), vec![]);
    g.record(Entry::OptOut(OptOut { person: "alice".into(), room_id: Some(room()), opted_out: false }));
    assert_eq!(g.decide(), vec![invite("@alice:litchi")]);
    g.record(Entry::OptOut(OptOut { person: "alice".into(), room_id: None, opted_out: true }));
    assert_eq!(g.decide(), vec![]);
}

#[test]
fn missing_power_is_recorded_once_and_retried_when_power_levels_change() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join")], 50, 0);
    assert_eq!(
        g.decide(),
        vec![Action::MissingPower {
            room_id: room(),
            target: user("@alice:litchi"),
            power_levels_event: Some("$pl0".try_into().unwrap()),
            needed: 50,
            have: 0
        }]
    );
    g.acted();
    assert_eq!(g.decide(), vec![], "recorded once, not retried in a loop");
    // Power levels change but the bot is still too weak: recorded again for the new event.
    g.state("m.room.power_levels", "", None, json!({ "users": { BOT: 10 }, "invite": 50 }));
    assert!(matches!(g.decide()[..], [Action::MissingPower { have: 10, .. }]));
    g.acted();
    assert_eq!(g.decide(), vec![]);
    // The bot gets enough power: the invite comes.
    g.state("m.room.power_levels", "", None, json!({ "users": { BOT: 50 }, "invite": 50 }));
    assert_eq!(g.decide(), vec![invite("@alice:litchi")]);
}

#[test]
fn unlinked_accounts_and_rooms_the_bot_left_get_nothing() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@bob:kiwi", "join"), ("@alice:kiwi", "join")], 0, 0);
    g.member(BOT, "leave");
    assert_eq!(g.decide(), vec![]);
}

fn routes(servers: &[&str]) -> Routes {
    servers.iter().map(|s| ((*s).try_into().unwrap(), Route { auto_join: true, mirror_leave: true })).collect()
}

fn set_read(target: &str, event: &str) -> Action {
    Action::SetRead { room_id: room(), target: user(target), event_id: event.try_into().unwrap(), position: (None, None), thread: None }
}

#[test]
fn read_markers_move_forward_to_the_furthest_read_and_sends_count() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    assert_eq!(g.decide_sync(&r), vec![]);
    g.receipt("@alice:litchi", "$e10", 10);
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:kiwi", "$e10")]);
    // alice@kiwi reads further herself: now litchi is behind, never kiwi back.
    g.receipt("@alice:kiwi", "$e12", 12);
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:litchi", "$e12")]);
    // An older receipt does not move anything back.
    g.receipt("@alice:kiwi", "$e5", 5);
    assert_eq!(g.views.rooms[&room()].receipts[&user("@alice:kiwi")].event_id.as_str(), "$e12");
    // Sending counts as reading.
    let sent = g.message("@alice:litchi", 20);
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:kiwi", &sent)]);
}

#[test]
fn no_echo_loop_and_no_repeat_while_pending() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    g.receipt("@alice:litchi", "$e10", 10);
    g.record(Entry::ActionPending(crate::core::log_entry::UserAction {
        room_id: room(),
        user_id: user("@alice:kiwi"),
        kind: "read".into(),
        event_id: Some("$e10".try_into().unwrap()),
        reason: None, thread_id: None, partner: None,
        actor: None,
        event_ts: None,
        depth: Some(10),
    }));
    assert_eq!(g.decide_sync(&r), vec![], "pending: not asked twice");
    // The receipt fedlink caused comes back (echo): nothing new happens.
    g.receipt("@alice:kiwi", "$e10", 10);
    assert_eq!(g.decide_sync(&r), vec![]);
    assert!(g.views.rooms[&room()].pending_actions.is_empty());
}

#[test]
fn private_receipts_do_not_spread() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    g.record(Entry::Receipt(crate::core::log_entry::ReceiptEntry {
        origin: "litchi".try_into().unwrap(),
        room_id: room(),
        receipt_type: "m.read.private".into(),
        user_id: user("@alice:litchi"),
        event_id: "$e9".try_into().unwrap(),
        ts: None,
        thread_id: None,
        thread_inferred: false,
        depth: Some(9),
        event_ts: None,
        via_appservice: Some(true),
    }));
    assert_eq!(g.decide_sync(&routes(&["kiwi", "litchi"])), vec![]);
}

#[test]
fn without_a_registration_the_read_is_unsupported_once() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["litchi"]);
    g.receipt("@alice:litchi", "$e10", 10);
    assert_eq!(g.decide_sync(&r), vec![Action::Unsupported { room_id: room(), target: user("@alice:kiwi"), kind: "read" }]);
    g.record(Entry::ActionUnsupported(crate::core::log_entry::UserAction {
        room_id: room(),
        user_id: user("@alice:kiwi"),
        kind: "read".into(),
        event_id: None,
        reason: Some("no registration".into()),
        actor: None,
        event_ts: None,
        depth: None,
        thread_id: None,
        partner: None,
    }));
    g.receipt("@alice:litchi", "$e11", 11);
    assert_eq!(g.decide_sync(&r), vec![], "recorded once, not per message");
}

#[test]
fn invited_sibling_is_joined_and_leaving_spreads_but_kicks_do_not() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    g.member("@alice:litchi", "invite");
    assert_eq!(g.decide_sync(&r), vec![Action::Join { room_id: room(), target: user("@alice:litchi") }]);
    // Turned off for this person: no auto-join.
    g.record(Entry::PersonSettings(crate::core::log_entry::PersonSettings { person: "alice".into(), auto_join: false }));
    assert_eq!(g.decide_sync(&r), vec![]);
    g.record(Entry::PersonSettings(crate::core::log_entry::PersonSettings { person: "alice".into(), auto_join: true }));
    g.member("@alice:litchi", "join");
    assert_eq!(g.decide_sync(&r), vec![]);
    // Kicked (leave sent by someone else): nothing spreads.
    g.member("@alice:kiwi", "leave");
    assert_eq!(g.decide_sync(&r), vec![]);
    // Rejoin, then leave by herself: the sibling leaves too.
    g.member("@alice:kiwi", "join");
    g.state_by("@alice:kiwi", "m.room.member", "@alice:kiwi", Some("leave"), json!({ "membership": "leave" }));
    assert_eq!(g.decide_sync(&r), vec![Action::Leave { room_id: room(), target: user("@alice:litchi") }]);
    // Opted out: nothing.
    g.record(Entry::OptOut(OptOut { person: "alice".into(), room_id: None, opted_out: true }));
    assert_eq!(g.decide_sync(&r), vec![]);
}

#[test]
fn presence_follows_where_enabled_and_only_online_spreads() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]);
    let enabled: std::collections::BTreeSet<ruma::OwnedServerName> = ["litchi".try_into().unwrap()].into();
    let presence = |g: &mut Given, u: &str, p: &str| {
        g.record(Entry::Presence(crate::core::log_entry::PresenceEntry {
            origin: user(u).server_name().to_owned(),
            user_id: user(u),
            presence: p.into(),
            last_active_ago: None,
        }));
    };
    assert_eq!(decide_presence(&g.views, &enabled), Vec::<OwnedUserId>::new());
    presence(&mut g, "@alice:kiwi", "online");
    assert_eq!(decide_presence(&g.views, &enabled), vec![user("@alice:litchi")]);
    presence(&mut g, "@alice:litchi", "online");
    assert_eq!(decide_presence(&g.views, &enabled), Vec::<OwnedUserId>::new(), "the echo changes nothing");
    presence(&mut g, "@alice:litchi", "offline");
    presence(&mut g, "@alice:kiwi", "offline");
    assert_eq!(decide_presence(&g.views, &enabled), Vec::<OwnedUserId>::new(), "offline does not spread");
    // kiwi has presence off: litchi online does not touch kiwi.
    presence(&mut g, "@alice:litchi", "online");
    assert_eq!(decide_presence(&g.views, &enabled), Vec::<OwnedUserId>::new());
}

#[test]
fn without_the_bot_a_joined_sibling_invites_through_its_registration() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]);
    let seen = |g: &mut Given, u: &str, m: &str| {
        g.pushed_member(u, u, m, None);
    };
    seen(&mut g, "@alice:kiwi", "invite");
    assert_eq!(decide(&g.views, &routes(&["kiwi"])), vec![], "nobody joined yet to invite from");
    seen(&mut g, "@alice:kiwi", "join");
    assert_eq!(
        decide(&g.views, &routes(&["kiwi"])),
        vec![Action::InviteAs { room_id: room(), actor: user("@alice:kiwi"), target: user("@alice:litchi"), partner: None }]
    );
    // No registration on the joined sibling's server: unsupported.
    assert_eq!(
        decide(&g.views, &routes(&["litchi"])),
        vec![Action::Unsupported { room_id: room(), target: user("@alice:litchi"), kind: "invite" }]
    );
    // Declined before: never again.
    seen(&mut g, "@alice:litchi", "leave");
    assert_eq!(decide(&g.views, &routes(&["kiwi"])), vec![]);
}

/// Given a room known from pushes only: a membership event older than the latest one
/// folded changes nothing (Synapse pushes its history to a new registration, possibly after
/// fedlink caught up); one without a time is never judged stale and keeps the latest time.
#[test]
fn a_stale_pushed_membership_does_not_undo_a_newer_one() {
    let mut g = given();
    let pushed = |g: &mut Given, sender: &str, target: &str, m: &str, ts: Option<u64>| {
        g.pushed_member(sender, target, m, ts);
    };
    let m = |g: &Given, u: &str| g.views.rooms.get(&room()).and_then(|r| r.membership(&user(u)).map(str::to_owned));
    pushed(&mut g, "@alice:kiwi", "@alice:kiwi", "join", Some(200));
    pushed(&mut g, "@bob:kiwi", "@alice:kiwi", "invite", Some(100));
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("join"), "the older invite is stale");
    pushed(&mut g, "@alice:kiwi", "@alice:kiwi", "leave", Some(300));
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("leave"));
    // Another server's invite from before the leave is history too.
    pushed(&mut g, "@bob:mango", "@alice:kiwi", "invite", Some(250));
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("leave"));
    pushed(&mut g, "@bob:mango", "@alice:kiwi", "invite", Some(350));
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("invite"));
    pushed(&mut g, "@alice:kiwi", "@alice:kiwi", "leave", None);
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("leave"), "no time: applied");
    pushed(&mut g, "@alice:kiwi", "@alice:kiwi", "join", Some(340));
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("leave"), "the latest time (350) stays");
    pushed(&mut g, "@alice:kiwi", "@alice:kiwi", "join", Some(360));
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("join"));
    // A profile change (join to join) moves no time, as the push check drops it unlogged.
    pushed(&mut g, "@alice:kiwi", "@alice:kiwi", "join", Some(500));
    pushed(&mut g, "@alice:kiwi", "@alice:kiwi", "leave", Some(400));
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("leave"));
    // A time in the future (another server's clock, or a lie) counts only up to five
    // minutes past the record's time (0 here): it cannot make later memberships stale.
    pushed(&mut g, "@eve:mango", "@alice:kiwi", "invite", Some(u64::MAX / 2));
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("invite"));
    pushed(&mut g, "@alice:kiwi", "@alice:kiwi", "leave", Some(400_000));
    assert_eq!(m(&g, "@alice:kiwi").as_deref(), Some("leave"), "the future invite counted as 300,000");
}

/// Given alice@kiwi joined to a room the bot is not in, and alice@litchi on a homeserver
/// with a registration: alice@litchi is invited only once she has caught up (she may have
/// declined the room before litchi's registration was installed); the catch-up is
/// forgotten when she is unlinked, so a new link waits for a new one.
#[test]
fn without_the_bot_a_sibling_is_invited_only_after_it_caught_up() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).pushed_member("@alice:kiwi", "@alice:kiwi", "join", None);
    let both = routes(&["kiwi", "litchi"]);
    let invite = vec![Action::InviteAs { room_id: room(), actor: user("@alice:kiwi"), target: user("@alice:litchi"), partner: None }];
    let wait = vec![Action::AwaitCatchUp { room_id: room(), target: user("@alice:litchi") }];
    assert_eq!(decide(&g.views, &both), wait, "litchi has a registration: wait for the catch-up");
    assert_eq!(crate::core::step::report(&g.views, &both).out_of_step.get(&(room(), user("@alice:litchi"))), Some(&crate::core::step::Step::CatchingUp));
    assert_eq!(decide(&g.views, &routes(&["kiwi"])), invite, "no registration on litchi: nothing to catch up on");
    g.caught_up("@alice:kiwi");
    assert_eq!(decide(&g.views, &both), wait, "a sibling's catch-up is not hers");
    g.caught_up("@alice:litchi");
    assert_eq!(decide(&g.views, &both), invite);
    // Unlinked and linked again: a new catch-up first. A catch-up of an unlinked account counts for nothing.
    g.record(Entry::PersonRemoved(crate::core::log_entry::PersonRemoved { person: "alice".into(), source: LinkSource::Admin }));
    g.caught_up("@alice:litchi");
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]);
    assert_eq!(decide(&g.views, &both), wait);
    // Relinking with the same accounts keeps what was caught up.
    g.caught_up("@alice:litchi");
    g.linked("alice", &["@alice:kiwi", "@alice:litchi", "@alice:mango"]);
    let mut three = invite.clone();
    three.push(Action::InviteAs { room_id: room(), actor: user("@alice:kiwi"), target: user("@alice:mango"), partner: None });
    assert_eq!(decide(&g.views, &both), three, "mango has no registration: invited at once");
}

#[test]
fn a_sibling_not_joined_yet_catches_up_once_it_joins() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "invite")], 0, 0);
    let r = routes(&["kiwi"]);
    g.receipt("@alice:kiwi", "$e10", 10);
    assert_eq!(
        g.decide_sync(&r),
        vec![Action::Unsupported { room_id: room(), target: user("@alice:litchi"), kind: "join" }],
        "invited, not joined: no read marker yet (and no route to join litchi)"
    );
    g.member("@alice:litchi", "join");
    assert_eq!(g.decide_sync(&routes(&["kiwi", "litchi"])), vec![set_read("@alice:litchi", "$e10")]);
}

#[test]
fn a_receipt_that_arrives_before_its_event_is_ordered_once_the_event_arrives() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    // litchi's receipt names an event fedlink does not hold yet: no depth, no decision.
    let next = format!("$msg{}", g.n + 1);
    g.record(Entry::Receipt(crate::core::log_entry::ReceiptEntry {
        origin: "litchi".try_into().unwrap(),
        room_id: room(),
        receipt_type: "m.read".into(),
        user_id: user("@alice:litchi"),
        event_id: next.clone().try_into().unwrap(),
        ts: None,
        thread_id: None,
        thread_inferred: false,
        depth: None,
        event_ts: None,
        via_appservice: None,
    }));
    assert_eq!(g.decide_sync(&r), vec![]);
    // The event arrives (sent by bob): now the read is placed and spreads.
    let id = g.message("@bob:kiwi", 30);
    assert_eq!(id, next);
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:kiwi", &next)]);
}

#[test]
fn where_fedlink_lacks_the_events_the_homeservers_timestamps_order_reads() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]);
    let (kiwi_ts, litchi_ts) = (1_000, 2_000);
    for (u, ts, ev) in [("@alice:kiwi", kiwi_ts, "$k"), ("@alice:litchi", litchi_ts, "$l")] {
        g.record(Entry::ClientEvent(crate::core::log_entry::ClientEventEntry {
            via: user(u).server_name().to_owned(),
            room_id: room(),
            event_id: format!("$join{}", u.len() + ts as usize).try_into().unwrap(),
            sender: user(u),
            event_type: "m.room.member".into(),
            state_key: Some(u.into()),
            membership: Some("join".into()),
            origin_server_ts: None,
            is_direct: false,
            thread_root: None,
        }));
        g.record(Entry::Receipt(crate::core::log_entry::ReceiptEntry {
            origin: user(u).server_name().to_owned(),
            room_id: room(),
            receipt_type: "m.read".into(),
            user_id: user(u),
            event_id: ev.try_into().unwrap(),
            ts: None,
            thread_id: None,
            thread_inferred: false,
            depth: None,
            event_ts: Some(ts),
            via_appservice: Some(true),
        }));
    }
    assert_eq!(g.decide_sync(&routes(&["kiwi", "litchi"])), vec![set_read("@alice:kiwi", "$l")]);
}

fn pending(u: &str, kind: &str, read: Option<(&str, u64)>) -> Entry {
    Entry::ActionPending(crate::core::log_entry::UserAction {
        room_id: room(),
        user_id: user(u),
        kind: kind.into(),
        event_id: read.map(|(e, _)| e.try_into().unwrap()),
        reason: None, thread_id: None, partner: None,
        actor: None,
        event_ts: None,
        depth: read.map(|(_, d)| d),
    })
}

fn read_action(u: &str, event: &str, depth: u64) -> Entry {
    pending(u, "read", Some((event, depth)))
}

/// The read loop: the target's own receipt moves past the event between `decide()` and
/// the `action_pending` record. The action must not stay pending (it would be retried,
/// re-logged and re-sent forever), and nothing new is decided.
#[test]
fn a_read_overtaken_before_it_was_logged_does_not_stay_pending() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    g.receipt("@alice:litchi", "$e10", 10);
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:kiwi", "$e10")]);
    // Meanwhile alice reads further on kiwi herself.
    g.receipt("@alice:kiwi", "$e12", 12);
    // Then the shell logs the decision it took before.
    g.record(read_action("@alice:kiwi", "$e10", 10));
    assert!(g.views.rooms[&room()].pending_actions.is_empty(), "an overtaken read is settled at once");
    // litchi is now behind kiwi: it is litchi that moves, once.
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:litchi", "$e12")]);
    g.record(read_action("@alice:litchi", "$e12", 12));
    assert_eq!(g.decide_sync(&r), vec![], "pending: not asked twice");
    // The echo of the set read, at the same place, settles it.
    g.receipt("@alice:litchi", "$e12", 12);
    assert!(g.views.rooms[&room()].pending_actions.is_empty());
    assert_eq!(g.decide_sync(&r), vec![]);
}

/// The echo of a read that lands behind the user's own later read still settles the action.
#[test]
fn an_echo_behind_a_later_read_settles_the_pending_read() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    g.receipt("@alice:litchi", "$e10", 10);
    g.record(read_action("@alice:kiwi", "$e10", 10));
    let sent = g.message("@alice:kiwi", 11); // she sent something: she has read past $e10
    assert!(g.views.rooms[&room()].pending_actions.is_empty());
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:litchi", &sent)]);
}

/// Mirror-leave does not stick: after alice left on kiwi and fedlink made litchi follow,
/// alice is invited again on kiwi and joins. fedlink neither declines that invite nor makes
/// her leave again.
#[test]
fn after_a_mirrored_leave_a_new_invite_and_rejoin_are_not_undone() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    g.state_by("@alice:kiwi", "m.room.member", "@alice:kiwi", Some("leave"), json!({ "membership": "leave" }));
    assert_eq!(g.decide_sync(&r), vec![Action::Leave { room_id: room(), target: user("@alice:litchi") }]);
    g.record(pending("@alice:litchi", "leave", None));
    // litchi leaves (fedlink acted as her).
    g.state_by("@alice:litchi", "m.room.member", "@alice:litchi", Some("leave"), json!({ "membership": "leave" }));
    assert_eq!(g.decide_sync(&r), vec![]);
    // bob invites alice@kiwi again: no decline.
    g.state_by("@bob:kiwi", "m.room.member", "@alice:kiwi", Some("invite"), json!({ "membership": "invite" }));
    assert_eq!(g.decide_sync(&r), vec![], "the new invite is not declined");
    // She joins: no leave either.
    g.state_by("@alice:kiwi", "m.room.member", "@alice:kiwi", Some("join"), json!({ "membership": "join" }));
    assert_eq!(g.decide_sync(&r), vec![], "the rejoin is not undone");
    // And when she leaves again by herself, litchi (already out) gets nothing new.
    g.state_by("@alice:kiwi", "m.room.member", "@alice:kiwi", Some("leave"), json!({ "membership": "leave" }));
    assert_eq!(g.decide_sync(&r), vec![]);
}

/// A membership that arrives through a resolved fork has its effects: a self-leave there is
/// mirrored, and a join fedlink asked for settles its pending action.
#[test]
fn memberships_of_a_resolved_fork_settle_actions_and_mirror_self_leaves() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "invite")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    assert_eq!(g.decide_sync(&r), vec![Action::Join { room_id: room(), target: user("@alice:litchi") }]);
    g.record(pending("@alice:litchi", "join", None));
    let fork = |g: &mut Given, id: &str, sender: &str, target: &str, m: &str, others: &[(&str, &str, &str)]| {
        let mut state = vec![
            StateRef { event_type: "m.room.member".into(), state_key: BOT.into(), event_id: "$e1".try_into().unwrap(), membership: Some("join".into()) },
            StateRef { event_type: "m.room.member".into(), state_key: target.into(), event_id: id.try_into().unwrap(), membership: Some(m.into()) },
        ];
        for (u, e, mm) in others {
            state.push(StateRef { event_type: "m.room.member".into(), state_key: (*u).into(), event_id: (*e).try_into().unwrap(), membership: Some((*mm).into()) });
        }
        g.record(Entry::Pdu(PduEntry {
            room_id: room(),
            event_id: id.try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            status: PduStatus::Accepted,
            event_type: "m.room.member".into(),
            state_key: Some(target.into()),
            sender: user(sender),
            membership: Some(m.into()),
            prev_events: vec![],
            depth: 50,
            origin_server_ts: 0,
            pdu: json!({}),
            resolved_state: Some(crate::core::log_entry::ResolvedState { state, power_levels: None }),
            superseded: Vec::new(),
        }));
    };
    // litchi's join arrives on a fork and resolves in.
    fork(&mut g, "$fj", "@alice:litchi", "@alice:litchi", "join", &[("@alice:kiwi", "$m0", "join")]);
    assert!(g.views.rooms[&room()].pending_actions.is_empty(), "the join settled the action");
    assert_eq!(g.decide_sync(&r), vec![]);
    // kiwi's self-leave arrives on another fork: litchi follows.
    fork(&mut g, "$fl", "@alice:kiwi", "@alice:kiwi", "leave", &[("@alice:litchi", "$fj", "join")]);
    assert_eq!(g.decide_sync(&r), vec![Action::Leave { room_id: room(), target: user("@alice:litchi") }]);
}

/// Opting out or unlinking cancels the invites and actions fedlink had pending for the
/// person's accounts, so they are never delivered.
#[test]
fn opt_out_and_unlink_cancel_pending_invites_and_actions() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join")], 0, 0);
    g.acted();
    assert!(g.views.rooms[&room()].pending_invites.contains_key(&user("@alice:litchi")));
    g.record(Entry::OptOut(OptOut { person: "alice".into(), room_id: Some(room()), opted_out: true }));
    assert!(g.views.rooms[&room()].pending_invites.is_empty(), "opt-out in this room cancels the invite");
    assert_eq!(g.decide(), vec![]);
    g.record(Entry::OptOut(OptOut { person: "alice".into(), room_id: Some(room()), opted_out: false }));
    assert_eq!(g.decide(), vec![invite("@alice:litchi")], "opting back in decides afresh");
    g.acted();
    g.record(read_action("@alice:kiwi", "$e9", 9));
    assert_eq!(g.views.rooms[&room()].pending_actions.len(), 1);
    // Unlinking litchi (the person keeps kiwi and a new account) cancels litchi's invite.
    g.linked("alice", &["@alice:kiwi", "@alice:mango"]);
    assert!(!g.views.rooms[&room()].pending_invites.contains_key(&user("@alice:litchi")));
    assert_eq!(g.views.rooms[&room()].pending_actions.len(), 1, "kiwi is still linked: its action stays");
    // Removing the person cancels the rest.
    g.record(Entry::PersonRemoved(crate::core::log_entry::PersonRemoved { person: "alice".into(), source: LinkSource::Admin }));
    assert!(g.views.rooms[&room()].pending_actions.is_empty());
    assert!(g.views.rooms[&room()].pending_invites.is_empty());
}

#[test]
fn an_incremental_pass_decides_only_touched_rooms_and_a_directory_change_touches_all() {
    let mut g = given();
    g.bot_joined(&[("@alice:kiwi", "join")], 0, 100).acted();
    assert!(g.views.touched.is_empty(), "a pass takes what was touched");
    assert!(decide_touched(&g.views, &Routes::new(), &g.views.touched).is_empty());
    // Linking touches every room: the linked sibling is invited on the next pass.
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]);
    assert!(g.views.touched.all);
    let touched = std::mem::replace(&mut g.views.touched, crate::core::views::Touched::none());
    assert_eq!(decide_touched(&g.views, &Routes::new(), &touched), decide(&g.views, &Routes::new()));
    assert!(!decide(&g.views, &Routes::new()).is_empty());
    // A record in the room touches that room only; presence touches nothing.
    g.member("@bob:kiwi", "join");
    assert!(!g.views.touched.all);
    assert_eq!(g.views.touched.rooms.iter().map(|r| r.as_str()).collect::<Vec<_>>(), vec![ROOM]);
    let before = g.views.touched.clone();
    g.record(Entry::Presence(crate::core::log_entry::PresenceEntry {
        origin: "kiwi".try_into().unwrap(),
        user_id: user("@alice:kiwi"),
        presence: "online".into(),
        last_active_ago: None,
    }));
    assert_eq!(g.views.touched, before);
}

impl Given {
    /// A read by `u` of `event` (at `depth`) within the thread rooted at `root`.
    fn thread_receipt(&mut self, u: &str, root: &str, event: &str, depth: u64) -> &mut Self {
        self.read(u, Some(root), event, depth)
    }
    /// What the shell logs for a thread read it asked for (or that failed).
    fn thread_read_logged(&mut self, u: &str, root: &str, event: &str, depth: u64, failed: bool) -> &mut Self {
        let a = crate::core::log_entry::UserAction {
            event_id: Some(event.try_into().unwrap()),
            depth: Some(depth),
            thread_id: Some(root.try_into().unwrap()),
            reason: failed.then(|| "refused".into()),
            ..crate::core::log_entry::UserAction::new(room(), user(u), "thread_read")
        };
        self.record(if failed { Entry::ActionFailed(a) } else { Entry::ActionPending(a) })
    }
}

fn thread_read(target: &str, root: &str, event: &str) -> Action {
    Action::SetRead { room_id: room(), target: user(target), event_id: event.try_into().unwrap(), position: (None, None), thread: Some(root.try_into().unwrap()) }
}

#[test]
fn thread_reads_follow_the_person_per_thread_forward_only_apart_from_the_main_timeline() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    g.receipt("@alice:kiwi", "$e5", 5).receipt("@alice:litchi", "$e5", 5);
    assert_eq!(g.decide_sync(&r), vec![], "in step");
    // A thread id that is not an event id reads nothing, in no timeline.
    g.thread_receipt("@alice:litchi", "not an event id", "$x30", 30);
    assert_eq!(g.decide_sync(&r), vec![]);
    assert_eq!(g.views.rooms[&room()].receipts[&user("@alice:litchi")].event_id.as_str(), "$e5");
    // Given alice reads a reply in thread $root on litchi,
    g.thread_receipt("@alice:litchi", "$root", "$t10", 10);
    // then kiwi reads it in that thread, and the main timeline does not move.
    assert_eq!(g.decide_sync(&r), vec![thread_read("@alice:kiwi", "$root", "$t10")]);
    assert_eq!(g.views.rooms[&room()].receipts[&user("@alice:litchi")].event_id.as_str(), "$e5", "a thread read never moves the main timeline");
    // An older read in the same thread moves nothing back.
    g.thread_receipt("@alice:litchi", "$root", "$t8", 8);
    assert_eq!(g.decide_sync(&r), vec![thread_read("@alice:kiwi", "$root", "$t10")]);
    // Each thread on its own: kiwi further in another thread moves litchi there only.
    g.thread_receipt("@alice:kiwi", "$root2", "$u12", 12);
    assert_eq!(g.decide_sync(&r), vec![thread_read("@alice:kiwi", "$root", "$t10"), thread_read("@alice:litchi", "$root2", "$u12")]);
    // When the shell logged the reads, they are not asked twice; their echoes settle them
    // and cause nothing.
    g.thread_read_logged("@alice:kiwi", "$root", "$t10", 10, false).thread_read_logged("@alice:litchi", "$root2", "$u12", 12, false);
    assert_eq!(g.decide_sync(&r), vec![], "pending: not asked twice");
    g.thread_receipt("@alice:kiwi", "$root", "$t10", 10).thread_receipt("@alice:litchi", "$root2", "$u12", 12);
    assert_eq!(g.decide_sync(&r), vec![], "echoes cause nothing");
    assert!(g.views.rooms[&room()].threads.values().all(|t| t.pending.is_empty()), "echoes settle the pending reads");
    assert!(!g.views.index.pending.contains(&room()));
    // A main-timeline read still moves the main timeline only, even past the threads' depth.
    g.receipt("@alice:kiwi", "$e20", 20);
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:litchi", "$e20")]);
    // The main timeline further on does not move the threads either.
    let room_view = &g.views.rooms[&room()];
    assert_eq!(room_view.threads[&ruma::OwnedEventId::try_from("$root").unwrap()].receipts[&user("@alice:kiwi")].event_id.as_str(), "$t10");
}

#[test]
fn a_refused_thread_read_waits_for_the_thread_to_move_and_no_route_is_unsupported_once() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    g.thread_receipt("@alice:litchi", "$root", "$t10", 10);
    g.thread_read_logged("@alice:kiwi", "$root", "$t10", 10, false).thread_read_logged("@alice:kiwi", "$root", "$t10", 10, true);
    assert_eq!(g.decide_sync(&r), vec![], "refused: not retried for the same event");
    assert!(!g.views.index.pending.contains(&room()));
    g.thread_receipt("@alice:litchi", "$root", "$t11", 11);
    assert_eq!(g.decide_sync(&r), vec![thread_read("@alice:kiwi", "$root", "$t11")], "the thread moved on: asked again");
    // No registration on kiwi: unsupported, recorded once.
    let only_litchi = routes(&["litchi"]);
    assert_eq!(g.decide_sync(&only_litchi), vec![Action::Unsupported { room_id: room(), target: user("@alice:kiwi"), kind: "thread_read" }]);
    g.record(Entry::ActionUnsupported(crate::core::log_entry::UserAction::new(room(), user("@alice:kiwi"), "thread_read")));
    assert_eq!(g.decide_sync(&only_litchi), vec![]);
}

#[test]
fn a_direct_chat_invite_makes_direct_invites_and_joined_siblings_list_it_once() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@bob:kiwi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    // Given bob invites alice@kiwi to a direct chat,
    g.state_by("@bob:kiwi", "m.room.member", "@alice:kiwi", Some("invite"), json!({ "membership": "invite", "is_direct": true }));
    // then the bot's invite to alice@litchi is a direct-chat invite with bob.
    assert_eq!(
        g.decide(),
        vec![Action::Invite { room_id: room(), target: user("@alice:litchi"), person: "alice".into(), partner: Some(user("@bob:kiwi")) }]
    );
    g.acted();
    g.member("@alice:litchi", "invite");
    assert_eq!(g.decide_sync(&r), vec![], "nothing to list before a sibling joined");
    // When both accounts join, only alice@litchi gets the room in m.direct under bob: the
    // account bob invited has its client do that.
    g.member("@alice:kiwi", "join").member("@alice:litchi", "join");
    let mark = Action::MarkDirect { room_id: room(), target: user("@alice:litchi"), partner: user("@bob:kiwi") };
    assert_eq!(g.decide_sync(&r), vec![mark.clone()]);
    let done = crate::core::log_entry::UserAction { partner: Some(user("@bob:kiwi")), ..crate::core::log_entry::UserAction::new(room(), user("@alice:litchi"), "direct") };
    g.record(Entry::ActionPending(done.clone()));
    assert_eq!(g.decide_sync(&r), vec![], "pending: not asked twice");
    g.record(Entry::ActionDone(done));
    assert_eq!(g.decide_sync(&r), vec![], "done once, never again");
    assert!(g.views.rooms[&room()].pending_actions.is_empty());
    assert_eq!(g.views.rooms[&room()].direct_marked[&user("@alice:litchi")], user("@bob:kiwi"));
    // A sibling's own direct invite, or the bot's, makes no partner of them.
    for inviter in ["@alice:kiwi", BOT] {
        let mut h = given();
        h.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@bob:kiwi", "join"), ("@alice:kiwi", "join")], 0, 0);
        h.state_by(inviter, "m.room.member", "@alice:litchi", Some("invite"), json!({ "membership": "invite", "is_direct": true }));
        h.member("@alice:litchi", "join");
        assert_eq!(h.decide_sync(&r), vec![], "invited by {inviter}");
        assert_eq!(h.decide(), vec![], "invited by {inviter}");
    }
}

#[test]
fn a_rejected_direct_invite_names_no_partner_and_the_first_inviter_stays_the_partner() {
    let r = routes(&["kiwi", "litchi"]);
    let dm = |g: &mut Given, by: &str, to: &str| {
        g.state_by(by, "m.room.member", to, Some("invite"), json!({ "membership": "invite", "is_direct": true }));
    };
    // Rejected: no partner, so nothing is listed for the sibling.
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@bob:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    dm(&mut g, "@bob:kiwi", "@alice:kiwi");
    g.member("@alice:kiwi", "leave");
    assert!(g.views.rooms[&room()].direct_invites.is_empty());
    assert_eq!(g.decide_sync(&r).into_iter().filter(|a| matches!(a, Action::MarkDirect { .. })).count(), 0);
    // Invited again by someone else while invited: the first inviter stays the partner.
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@bob:kiwi", "join"), ("@eve:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    dm(&mut g, "@bob:kiwi", "@alice:kiwi");
    dm(&mut g, "@eve:kiwi", "@alice:kiwi");
    let marks: Vec<Action> = g.decide_sync(&r).into_iter().filter(|a| matches!(a, Action::MarkDirect { .. })).collect();
    assert_eq!(marks, vec![Action::MarkDirect { room_id: room(), target: user("@alice:litchi"), partner: user("@bob:kiwi") }]);
}

#[test]
fn one_action_per_account_per_pass() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@bob:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    g.state_by("@bob:kiwi", "m.room.member", "@alice:kiwi", Some("invite"), json!({ "membership": "invite", "is_direct": true }));
    g.member("@alice:kiwi", "join");
    g.receipt("@alice:kiwi", "$e10", 10);
    let r = routes(&["kiwi", "litchi"]);
    // alice@litchi is behind and not listed: the read first, the listing once it settled.
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:litchi", "$e10")]);
    let read = crate::core::log_entry::UserAction { event_id: Some("$e10".try_into().unwrap()), depth: Some(10), ..crate::core::log_entry::UserAction::new(room(), user("@alice:litchi"), "read") };
    g.record(Entry::ActionPending(read));
    assert_eq!(g.decide_sync(&r), vec![]);
    g.receipt("@alice:litchi", "$e10", 10);
    assert_eq!(g.decide_sync(&r), vec![Action::MarkDirect { room_id: room(), target: user("@alice:litchi"), partner: user("@bob:kiwi") }]);
    // A failed listing is not retried, and blocks nothing else.
    let failed = crate::core::log_entry::UserAction { partner: Some(user("@bob:kiwi")), reason: Some("m.direct is not an object".into()), ..crate::core::log_entry::UserAction::new(room(), user("@alice:litchi"), "direct") };
    g.record(Entry::ActionPending(failed.clone())).record(Entry::ActionFailed(failed));
    assert_eq!(g.decide_sync(&r), vec![]);
    g.receipt("@alice:kiwi", "$e11", 11);
    assert_eq!(g.decide_sync(&r), vec![set_read("@alice:litchi", "$e11")]);
}

impl Given {
    /// A reply by `sender` in the thread rooted at `root`, at `depth`.
    fn thread_reply(&mut self, sender: &str, root: &str, depth: u64) -> String {
        self.sent("$reply", sender, depth, json!({ "content": { "body": "reply", "m.relates_to": { "rel_type": "m.thread", "event_id": root } } }))
    }
}

#[test]
fn a_reply_in_a_thread_reads_that_thread_whether_sent_or_read_before_it_arrived() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    let r = routes(&["kiwi", "litchi"]);
    g.receipt("@alice:kiwi", "$e5", 5).receipt("@alice:litchi", "$e5", 5);
    // alice@kiwi replies in a thread: she read that thread, not the main timeline.
    let reply = g.thread_reply("@alice:kiwi", "$root", 20);
    assert_eq!(g.decide_sync(&r), vec![thread_read("@alice:litchi", "$root", &reply)]);
    assert_eq!(g.views.rooms[&room()].receipts[&user("@alice:kiwi")].event_id.as_str(), "$e5");
    // A receipt that came before its event (no depth yet) on a reply in another thread
    // moves to that thread when the event arrives.
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    g.record(Entry::Receipt(crate::core::log_entry::ReceiptEntry {
        origin: "litchi".try_into().unwrap(),
        room_id: room(),
        receipt_type: "m.read".into(),
        user_id: user("@alice:litchi"),
        event_id: "$reply7".try_into().unwrap(),
        ts: None,
        thread_id: None,
        thread_inferred: false,
        depth: None,
        event_ts: Some(1),
        via_appservice: None,
    }));
    g.n = 6;
    let later = g.thread_reply("@bob:kiwi", "$root2", 30);
    assert_eq!(later, "$reply7");
    let view = &g.views.rooms[&room()];
    assert_ne!(view.receipts.get(&user("@alice:litchi")).map(|r| r.event_id.as_str()), Some("$reply7"), "not a main-timeline read");
    assert_eq!(view.threads[&ruma::OwnedEventId::try_from("$root2").unwrap()].receipts[&user("@alice:litchi")].depth, Some(30));
    // Unlinked accounts' thread reads are not kept.
    g.thread_reply("@bob:kiwi", "$root3", 31);
    assert!(!g.views.rooms[&room()].threads.contains_key(&ruma::OwnedEventId::try_from("$root3").unwrap()));
}

#[test]
fn threads_per_room_are_bounded_forgetting_the_oldest() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join")], 0, 0);
    for i in 0..=crate::core::views::MAX_THREADS_PER_ROOM {
        g.thread_receipt("@alice:kiwi", &format!("$root{i}"), &format!("$t{i}"), i as u64 + 1);
    }
    let threads = &g.views.rooms[&room()].threads;
    assert_eq!(threads.len(), crate::core::views::MAX_THREADS_PER_ROOM);
    assert!(!threads.contains_key(&ruma::OwnedEventId::try_from("$root0").unwrap()), "the oldest is forgotten");
    assert!(threads.contains_key(&ruma::OwnedEventId::try_from(format!("$root{}", crate::core::views::MAX_THREADS_PER_ROOM)).unwrap()));
}

#[test]
fn an_opt_out_cancels_one_persons_thread_reads_and_the_room_is_saved_again() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).linked("carol", &["@carol:kiwi", "@carol:litchi"]);
    g.bot_joined(&[("@alice:kiwi", "join"), ("@alice:litchi", "join"), ("@carol:kiwi", "join"), ("@carol:litchi", "join")], 0, 0);
    g.thread_read_logged("@alice:kiwi", "$root", "$t10", 10, false).thread_read_logged("@carol:kiwi", "$root", "$t10", 10, false);
    g.views.unsaved = crate::core::views::Touched::none();
    g.record(Entry::OptOut(OptOut { person: "alice".into(), room_id: None, opted_out: true }));
    let view = &g.views.rooms[&room()];
    let pending: Vec<&str> = view.threads.values().flat_map(|t| t.pending.keys().map(|u| u.as_str())).collect();
    assert_eq!(pending, vec!["@carol:kiwi"]);
    assert!(g.views.unsaved.all || g.views.unsaved.rooms.contains(&room()), "the room is written at the next checkpoint");
}

#[test]
fn without_a_registration_the_direct_listing_is_unsupported_once() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]).bot_joined(&[("@bob:kiwi", "join")], 0, 0);
    g.state_by("@bob:kiwi", "m.room.member", "@alice:kiwi", Some("invite"), json!({ "membership": "invite", "is_direct": true }));
    g.member("@alice:litchi", "join");
    let r = routes(&["kiwi"]);
    let direct = |g: &Given| g.decide_sync(&r).into_iter().filter(|a| matches!(a, Action::MarkDirect { .. } | Action::Unsupported { kind: "direct", .. })).collect::<Vec<_>>();
    assert_eq!(direct(&g), vec![Action::Unsupported { room_id: room(), target: user("@alice:litchi"), kind: "direct" }]);
    g.record(Entry::ActionUnsupported(crate::core::log_entry::UserAction::new(room(), user("@alice:litchi"), "direct")));
    assert_eq!(direct(&g), vec![]);
}

#[test]
fn without_the_bot_a_pushed_direct_invite_makes_the_siblings_invite_direct() {
    let mut g = given();
    g.linked("alice", &["@alice:kiwi", "@alice:litchi"]);
    let pushed = |g: &mut Given, sender: &str, u: &str, m: &str, is_direct: bool| {
        g.record(Entry::ClientEvent(crate::core::log_entry::ClientEventEntry {
            via: "kiwi".try_into().unwrap(),
            room_id: room(),
            event_id: format!("$p{}{m}", u.len()).try_into().unwrap(),
            sender: user(sender),
            event_type: "m.room.member".into(),
            state_key: Some(u.into()),
            membership: Some(m.into()),
            origin_server_ts: None,
            is_direct,
            thread_root: None,
        }));
    };
    pushed(&mut g, "@bob:kiwi", "@alice:kiwi", "invite", true);
    pushed(&mut g, "@alice:kiwi", "@alice:kiwi", "join", false);
    g.caught_up("@alice:litchi");
    assert_eq!(
        decide(&g.views, &routes(&["kiwi", "litchi"])),
        vec![Action::InviteAs { room_id: room(), actor: user("@alice:kiwi"), target: user("@alice:litchi"), partner: Some(user("@bob:kiwi")) }]
    );
    // Once alice@litchi joined (her invite was the sibling's, not bob's), she lists it.
    pushed(&mut g, "@alice:kiwi", "@alice:litchi", "invite", true);
    pushed(&mut g, "@alice:litchi", "@alice:litchi", "join", false);
    assert_eq!(
        decide(&g.views, &routes(&["kiwi", "litchi"])),
        vec![Action::MarkDirect { room_id: room(), target: user("@alice:litchi"), partner: user("@bob:kiwi") }]
    );
}
