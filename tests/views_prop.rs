//! Property: views rebuilt from the log equal views folded incrementally, whatever the
//! checkpoints in between. A generated log (several rooms, joins and leaves, forks resolved
//! with a whole new state, superseded extremities, receipts, registration pushes, directory
//! changes and opt-outs, pending and failed actions, presence) is folded once straight
//! through; and again with checkpoints at random points that write only the rooms changed
//! since the last one (`Store::save_views` with `Views::unsaved`), each followed by a
//! "restart" that loads the checkpoint and folds the rest. Both must equal, and so must a
//! checkpoint of the straight fold loaded back.

use fedlink::{
    core::{
        log_entry::{
            BotJoined, ClientEventEntry, Entry, LinkSource, LogRecord, OptOut, PduEntry, PduStatus, PersonSet, PresenceEntry, ReceiptEntry,
            ResolvedState, StateRef, UserAction,
        },
        views::{Touched, Views},
    },
    store::Store,
};
use proptest::prelude::*;
use serde_json::json;

const BOT: &str = "@fedlink:fl";
const USERS: [&str; 5] = ["@a:kiwi", "@a:litchi", "@b:kiwi", "@c:mango", BOT];

fn room(i: u8) -> ruma::OwnedRoomId {
    format!("!r{}:kiwi", i % 4).try_into().unwrap()
}
fn user(i: u8) -> ruma::OwnedUserId {
    USERS[i as usize % USERS.len()].try_into().unwrap()
}
fn event(n: u64) -> ruma::OwnedEventId {
    format!("$e{n}").try_into().unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Join(u8),
    Member(u8, u8, u8),
    Message(u8, u8, bool),
    Resolved(u8, Vec<(u8, u8)>),
    Receipt(u8, u8, u64),
    Pushed(u8, u8, u8),
    Link(u8),
    Unlink,
    OptOut(Option<u8>, bool),
    Action(u8, u8, bool),
    Presence(u8, u8),
    Chat(u8, u8, bool),
    Encrypt(u8),
    Handled(u8, u64),
    Told(u8, u8, u8),
    LinkRequest(u8, u8),
    LinkClosed(u8),
    CaughtUp(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<u8>().prop_map(Op::Join),
        (any::<u8>(), any::<u8>(), 0u8..4).prop_map(|(r, u, m)| Op::Member(r, u, m)),
        (any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(r, u, fork)| Op::Message(r, u, fork)),
        (any::<u8>(), prop::collection::vec((any::<u8>(), 0u8..4), 0..4)).prop_map(|(r, m)| Op::Resolved(r, m)),
        (any::<u8>(), any::<u8>(), 0u64..40).prop_map(|(r, u, e)| Op::Receipt(r, u, e)),
        (any::<u8>(), any::<u8>(), 0u8..3).prop_map(|(r, u, k)| Op::Pushed(r, u, k)),
        (0u8..3).prop_map(Op::Link),
        Just(Op::Unlink),
        (prop::option::of(any::<u8>()), any::<bool>()).prop_map(|(r, o)| Op::OptOut(r, o)),
        (any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(r, u, f)| Op::Action(r, u, f)),
        (any::<u8>(), 0u8..3).prop_map(|(u, p)| Op::Presence(u, p)),
        (any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(r, u, d)| Op::Chat(r, u, d)),
        any::<u8>().prop_map(Op::Encrypt),
        (any::<u8>(), 0u64..120).prop_map(|(r, e)| Op::Handled(r, e)),
        (any::<u8>(), any::<u8>(), 0u8..3).prop_map(|(r, a, k)| Op::Told(r, a, k)),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::LinkRequest(a, b)),
        any::<u8>().prop_map(Op::LinkClosed),
        any::<u8>().prop_map(Op::CaughtUp),
    ]
}

const MEMBERSHIPS: [&str; 4] = ["join", "leave", "invite", "ban"];

fn pdu(r: u8, n: u64, sender: u8, state: Option<(String, Option<&str>)>, prev: Vec<ruma::OwnedEventId>) -> PduEntry {
    PduEntry {
        room_id: room(r),
        event_id: event(n),
        via: "kiwi".try_into().unwrap(),
        status: PduStatus::Accepted,
        event_type: if state.is_some() { "m.room.member".into() } else { "m.room.message".into() },
        state_key: state.as_ref().map(|(k, _)| k.clone()),
        sender: user(sender),
        membership: state.as_ref().and_then(|(_, m)| m.map(String::from)),
        prev_events: prev,
        depth: n,
        origin_server_ts: n * 1000,
        pdu: json!({ "content": {} }),
        resolved_state: None,
        superseded: Vec::new(),
    }
}

fn return_done(out: &mut Vec<Entry>, a: UserAction) {
    out.push(Entry::ActionPending(a.clone()));
    out.push(Entry::ActionDone(a));
}

fn entries(ops: &[Op]) -> Vec<Entry> {
    let mut out = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        let n = i as u64 + 1;
        let prev = vec![event(n.saturating_sub(1))];
        out.push(match o.clone() {
            Op::Join(r) => Entry::BotJoined(BotJoined {
                room_id: room(r),
                room_version: ruma::RoomVersionId::V11,
                join_event_id: event(n),
                via: "kiwi".try_into().unwrap(),
                state: vec![
                    StateRef { event_type: "m.room.member".into(), state_key: BOT.into(), event_id: event(n), membership: Some("join".into()) },
                    StateRef { event_type: "m.room.member".into(), state_key: "@b:kiwi".into(), event_id: event(n + 10_000), membership: Some("join".into()) },
                ],
                power_levels: Some(json!({ "users": { BOT: 100 } })),
            }),
            Op::Member(r, u, m) => {
                let mut p = pdu(r, n, u, Some((user(u).to_string(), Some(MEMBERSHIPS[m as usize]))), prev);
                // Some invites are direct-chat invites.
                if m == 2 && u % 2 == 0 {
                    p.pdu = json!({ "content": { "membership": "invite", "is_direct": true } });
                }
                Entry::Pdu(p)
            }
            Op::Message(r, u, fork) => {
                let mut p = pdu(r, n, u, None, if fork { vec![event(n.saturating_sub(3))] } else { prev });
                // Some messages are text: commands, in the bot's chats.
                if !n.is_multiple_of(3) {
                    p.pdu = json!({ "content": { "msgtype": if n % 3 == 1 { "m.text" } else { "m.notice" }, "body": "status" } });
                }
                if fork {
                    p.superseded = vec![event(n.saturating_sub(2))];
                }
                Entry::Pdu(p)
            }
            Op::Resolved(r, members) => {
                let mut p = pdu(r, n, 2, None, prev);
                p.resolved_state = Some(ResolvedState {
                    state: members
                        .iter()
                        .map(|(u, m)| StateRef { event_type: "m.room.member".into(), state_key: user(*u).to_string(), event_id: event(n + 20_000 + u64::from(*u)), membership: Some(MEMBERSHIPS[*m as usize].into()) })
                        .collect(),
                    power_levels: None,
                });
                Entry::Pdu(p)
            }
            Op::Receipt(r, u, e) => Entry::Receipt(ReceiptEntry {
                origin: user(u).server_name().to_owned(),
                room_id: room(r),
                receipt_type: "m.read".into(),
                user_id: user(u),
                event_id: event(e),
                ts: Some(n),
                // A third of the reads are in one of two threads.
                thread_id: (e % 3 == 0).then(|| format!("$t{}", r % 2)),
                thread_inferred: e % 2 == 0,
                depth: Some(e),
                event_ts: Some(e * 1000),
                via_appservice: None,
            }),
            Op::Pushed(r, u, k) => Entry::ClientEvent(ClientEventEntry {
                via: user(u).server_name().to_owned(),
                room_id: format!("!p{}:kiwi", r % 3).try_into().unwrap(),
                event_id: event(n),
                sender: user(u),
                event_type: if k == 0 { "m.room.message".into() } else { "m.room.member".into() },
                state_key: (k != 0).then(|| user(u).to_string()),
                membership: (k != 0).then(|| if k == 1 { "join".into() } else { "leave".into() }),
                origin_server_ts: Some(n * 1000),
                is_direct: k == 1,
                // Some sends are replies in a thread.
                thread_root: (k == 0 && n.is_multiple_of(2)).then(|| format!("$t{}", r % 2).try_into().unwrap()),
            }),
            Op::Link(k) => Entry::PersonSet(PersonSet {
                person: "alice".into(),
                accounts: USERS[..(k as usize + 1).min(2)].iter().map(|a| (*a).try_into().unwrap()).collect(),
                source: LinkSource::Admin,
            }),
            Op::Unlink => Entry::PersonRemoved(fedlink::core::log_entry::PersonRemoved { person: "alice".into(), source: LinkSource::Admin }),
            Op::OptOut(r, o) => Entry::OptOut(OptOut { person: "alice".into(), room_id: r.map(room), opted_out: o }),
            Op::Action(r, u, failed) => {
                let mut a = UserAction { room_id: room(r), user_id: user(u), kind: "read".into(), event_id: Some(event(n)), reason: None, thread_id: None, partner: None, actor: None, event_ts: Some(n), depth: Some(n) };
                match n % 3 {
                    // Thread reads, pending or failed.
                    0 => {
                        a.kind = "thread_read".into();
                        a.thread_id = Some(format!("$t{}", r % 2).try_into().unwrap());
                    }
                    // A direct chat listed.
                    2 if !failed => {
                        a.kind = "direct".into();
                        a.partner = Some(user(u.wrapping_add(1)));
                        return_done(&mut out, a);
                        continue;
                    }
                    _ => {}
                }
                if failed { Entry::ActionFailed(a) } else { Entry::ActionPending(a) }
            }
            Op::Chat(r, u, direct) => {
                let content = if direct { json!({ "membership": "invite", "is_direct": true }) } else { json!({ "membership": "invite" }) };
                Entry::BotInvited(fedlink::core::log_entry::BotInvited {
                    room_id: room(r),
                    room_version: ruma::RoomVersionId::V11,
                    event_id: event(n),
                    inviter: user(u),
                    event: json!({ "content": content }),
                    direct: direct.then_some(if r % 2 == 0 { fedlink::core::log_entry::DirectInvite::Allowed } else { fedlink::core::log_entry::DirectInvite::ChatOnly }),
                })
            }
            Op::Encrypt(r) => {
                let mut p = pdu(r, n, 2, Some((String::new(), None)), prev);
                p.event_type = "m.room.encryption".into();
                Entry::Pdu(p)
            }
            Op::Handled(r, e) => Entry::CommandHandled(fedlink::core::log_entry::CommandHandled { room_id: room(r), event_id: event(e), command: "status".into(), reply: None }),
            Op::Told(r, a, k) => Entry::BotTold(fedlink::core::log_entry::BotTold { room_id: room(r), about: room(a), reason: ["encrypted", "missing_power", "no_registration"][k as usize].into() }),
            Op::LinkRequest(a, b) => Entry::LinkRequested(fedlink::core::log_entry::LinkRequested { from: user(a), to: user(b), code_sha256: format!("{n}"), expires_ms: n }),
            Op::LinkClosed(a) => Entry::LinkClosed(fedlink::core::log_entry::LinkClosed { from: user(a), outcome: "confirmed".into() }),
            Op::CaughtUp(a) => Entry::CaughtUp(fedlink::core::log_entry::CaughtUp { account: user(a), memberships: 0, gave_up: a % 2 == 0 }),
            Op::Presence(u, p) => Entry::Presence(PresenceEntry {
                origin: user(u).server_name().to_owned(),
                user_id: user(u),
                presence: ["online", "offline", "unavailable"][p as usize].into(),
                last_active_ago: None,
            }),
        });
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn replay_equals_incremental_folding_across_room_by_room_checkpoints(
        ops in prop::collection::vec(op(), 1..120),
        cuts in prop::collection::btree_set(0usize..120, 0..60),
    ) {
        let records: Vec<LogRecord> = entries(&ops).into_iter().enumerate().map(|(i, entry)| LogRecord { v: 1, seq: i as u64 + 1, at_ms: 0, entry }).collect();
        let bot: ruma::OwnedUserId = BOT.try_into().unwrap();
        let mut straight = Views::new(bot.clone());
        records.iter().for_each(|r| straight.apply(r));

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut views = Views::new(bot);
        for (i, r) in records.iter().enumerate() {
            views.apply(r);
            if cuts.contains(&i) {
                let taken = std::mem::replace(&mut views.unsaved, Touched::none());
                rt.block_on(store.save_views(&views, (!taken.all).then_some(&taken.rooms))).unwrap();
                // A restart: the checkpoint is all there is.
                views = store.load_views().unwrap().expect("a checkpoint");
            }
        }
        prop_assert_eq!(&views, &straight);
        // The room index kept in step by folding equals one rebuilt from scratch.
        prop_assert_eq!(&straight.index, &straight.clone().reindexed().index);
        prop_assert_eq!(&views.index, &straight.index);
        rt.block_on(store.save_views(&straight, None)).unwrap();
        prop_assert_eq!(&store.load_views().unwrap().expect("a checkpoint"), &straight);
        // `fedlink replay`: the same records written to the log and folded as read back
        // for folding give the same views.
        let entries: Vec<Entry> = records.iter().map(|r| r.entry.clone()).collect();
        store.append(entries, None, &[], 0).unwrap();
        store.clear_views().unwrap();
        let replayed = fedlink::node::fold_views(&store, BOT.try_into().unwrap(), true).unwrap();
        prop_assert_eq!(&replayed, &straight);
    }
}
