//! Given these log records, when a person sends this command, then the bot answers this
//! and logs exactly these changes. The consent flow is folded through the views as the
//! shell does: nothing is linked until the right account confirms the right code in time.

use ruma::OwnedEventId;
use serde_json::json;

use super::*;
use crate::core::{
    log_entry::{BotInvited, BotJoined, DirectInvite, BotTold, CommandHandled, LogRecord, PduEntry, PduStatus, StateRef},
    reconcile::{decide, Action, InviteSiblings, Routes},
    views::{Views, MAX_PENDING_COMMANDS},
};

const BOT: &str = "@fedlink:fl";
const A: &str = "@alice:kiwi";
const B: &str = "@alice:litchi";
const C: &str = "@mallory:kiwi";
const TTL: u64 = 600_000;

fn u(s: &str) -> OwnedUserId {
    s.try_into().unwrap()
}
fn r(s: &str) -> OwnedRoomId {
    s.try_into().unwrap()
}
fn hash(c: &str) -> String {
    format!("h:{}", normalize_code(c))
}

struct Given {
    views: Views,
    seq: u64,
    now: u64,
    linking: bool,
    n: u64,
    /// Wrong codes per account, as the shell counts them.
    wrong: std::collections::BTreeMap<String, u32>,
    /// Invites of the bot are accepted only as chats (the inviter is not in invites_from).
    chat_only: bool,
}

fn given() -> Given {
    Given { views: Views::new(BOT.try_into().unwrap()), seq: 0, now: 1_000_000, linking: true, n: 0, wrong: Default::default(), chat_only: false }
}

impl Given {
    fn record(&mut self, entry: Entry) -> &mut Self {
        self.seq += 1;
        self.views.apply(&LogRecord { v: 1, seq: self.seq, at_ms: self.now, entry });
        self
    }
    fn linked(&mut self, person: &str, accounts: &[&str], source: LinkSource) -> &mut Self {
        self.record(Entry::PersonSet(PersonSet { person: person.into(), accounts: accounts.iter().map(|a| u(a)).collect(), source }))
    }
    /// `who` sends `text`; the shell logs what the outcome names. Returns the outcome.
    fn says(&mut self, who: &str, text: &str, code: &str) -> Outcome {
        let outcome = match parse(text) {
            Ok(cmd) => {
                let names = |_: &OwnedRoomId| None;
                let routes = Routes::new();
                let wrong_codes = self.wrong.get(who).copied().unwrap_or(0);
                let ctx = Ctx { views: &self.views, routes: &routes, linking: self.linking, code_ttl_ms: TTL, now_ms: self.now, room_name: &names, wrong_codes };
                handle(&ctx, &u(who), &cmd, code, &hash)
            }
            Err(e) => Outcome { reply: e.to_string(), refused: true, ..Default::default() },
        };
        if outcome.wrong_code {
            *self.wrong.entry(who.to_owned()).or_default() += 1;
        } else if text.starts_with("confirm") {
            self.wrong.remove(who);
        }
        for e in outcome.entries.clone() {
            self.record(e);
        }
        outcome
    }
    fn person_of(&self, a: &str) -> Option<(String, Vec<String>, LinkSource)> {
        self.views.directory.person_of(&u(a)).map(|(id, p)| (id.clone(), p.accounts.iter().map(|x| x.to_string()).collect(), p.source))
    }
    fn pdu(&mut self, room: &str, sender: &str, kind: &str, state_key: Option<&str>, content: serde_json::Value) -> OwnedEventId {
        self.n += 1;
        let id: OwnedEventId = format!("$e{}", self.n).try_into().unwrap();
        self.record(Entry::Pdu(PduEntry {
            room_id: r(room),
            event_id: id.clone(),
            via: "kiwi".try_into().unwrap(),
            status: PduStatus::Accepted,
            event_type: kind.into(),
            state_key: state_key.map(String::from),
            sender: u(sender),
            membership: content.get("membership").and_then(|m| m.as_str()).map(String::from),
            prev_events: vec![],
            depth: self.n,
            origin_server_ts: 0,
            pdu: json!({ "content": content }),
            resolved_state: None,
            superseded: Vec::new(),
        }));
        id
    }
    /// `owner` invited the bot to `room` (direct or not) and the bot joined; `members` joined.
    fn bot_in(&mut self, room: &str, owner: &str, direct: bool, members: &[&str]) -> &mut Self {
        let content = if direct { json!({ "membership": "invite", "is_direct": true }) } else { json!({ "membership": "invite" }) };
        self.record(Entry::BotInvited(BotInvited {
            room_id: r(room),
            room_version: ruma::RoomVersionId::V12,
            event_id: "$botinvite".try_into().unwrap(),
            inviter: u(owner),
            event: json!({ "content": content }),
            direct: direct.then_some(if self.chat_only { DirectInvite::ChatOnly } else { DirectInvite::Allowed }),
        }));
        let mut state: Vec<StateRef> = members
            .iter()
            .enumerate()
            .map(|(i, m)| StateRef { event_type: "m.room.member".into(), state_key: (*m).into(), event_id: format!("$m{i}").try_into().unwrap(), membership: Some("join".into()) })
            .collect();
        state.push(StateRef { event_type: "m.room.member".into(), state_key: BOT.into(), event_id: "$mbot".try_into().unwrap(), membership: Some("join".into()) });
        self.record(Entry::BotJoined(BotJoined {
            room_id: r(room),
            room_version: ruma::RoomVersionId::V12,
            join_event_id: "$mbot".try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            state,
            power_levels: None,
        }))
    }
    fn commands(&self, room: &str) -> Vec<OwnedEventId> {
        self.views.rooms[&r(room)].bot_chat.as_ref().map(|c| c.commands.values().cloned().collect()).unwrap_or_default()
    }
}

// ---- the parser ----

#[test]
fn given_commands_as_people_type_them_then_each_parses() {
    assert_eq!(parse("help"), Ok(Command::Help));
    assert_eq!(parse("  STATUS \n"), Ok(Command::Status));
    assert_eq!(parse("!pause"), Ok(Command::Pause));
    assert_eq!(parse("Resume"), Ok(Command::Resume));
    assert_eq!(parse("off !abc:kiwi"), Ok(Command::Off(RoomRef::Id(r("!abc:kiwi")))));
    assert_eq!(parse("on #team:kiwi"), Ok(Command::On(RoomRef::Alias("#team:kiwi".try_into().unwrap()))));
    assert_eq!(parse("link @alice:litchi"), Ok(Command::Link(u(B))));
    assert_eq!(parse("unlink @alice:litchi"), Ok(Command::Unlink(u(B))));
    assert_eq!(parse("confirm abcd-efgh"), Ok(Command::Confirm("ABCDEFGH".into())));
    assert_eq!(parse("confirm ABCD EFGH"), Ok(Command::Confirm("ABCDEFGH".into())), "a code typed with a blank");
    assert_eq!(parse("> <@fedlink:fl> To link...\n\nstatus"), Ok(Command::Status), "a quoted reply is skipped");
}

#[test]
fn given_wrong_input_then_the_error_says_what_is_expected() {
    assert_eq!(parse(""), Err(ParseError::Empty));
    assert_eq!(parse("   \n "), Err(ParseError::Empty));
    assert_eq!(parse("hello there"), Err(ParseError::Unknown("hello".into())));
    assert!(matches!(parse("link"), Err(ParseError::Missing { command: "link", .. })));
    assert!(matches!(parse("link alice"), Err(ParseError::Bad { command: "link", .. })));
    assert!(matches!(parse("link @a:kiwi @b:kiwi"), Err(ParseError::TooMany("link", _))));
    assert!(matches!(parse("off room"), Err(ParseError::Bad { command: "off", .. })));
    assert!(matches!(parse("status now"), Err(ParseError::TooMany("status", _))));
    assert!(matches!(parse("confirm"), Err(ParseError::Missing { command: "confirm", .. })));
    assert!(matches!(parse(&"x".repeat(MAX_COMMAND_CHARS + 1)), Err(ParseError::Unknown(_))));
    let e = parse("link alice").unwrap_err().to_string();
    assert!(e.contains("alice") && e.contains("@you:server"), "{e}");
}

// ---- consent ----

#[test]
fn given_a_link_request_when_unconfirmed_then_nothing_is_linked() {
    let mut g = given();
    let o = g.says(A, "link @alice:litchi", "ABCD-EFGH");
    assert!(!o.refused, "{}", o.reply);
    assert!(o.reply.contains("confirm ABCD-EFGH") && o.reply.contains(B) && o.reply.contains(BOT), "{}", o.reply);
    assert_eq!(g.person_of(A), None);
    assert_eq!(g.person_of(B), None);
    assert_eq!(g.views.directory.link_requests[&u(A)].to, u(B));
    assert_eq!(g.views.directory.link_requests[&u(A)].code_sha256, hash("ABCD-EFGH"), "only the code's hash is kept");
}

#[test]
fn given_a_link_request_when_the_other_account_confirms_then_both_are_linked_by_self() {
    let mut g = given();
    g.says(A, "link @alice:litchi", "ABCD-EFGH");
    let o = g.says(B, "confirm abcd-efgh", "unused");
    assert!(!o.refused, "{}", o.reply);
    let (id, accounts, source) = g.person_of(A).unwrap();
    assert_eq!(accounts, vec![A.to_string(), B.to_string()]);
    assert_eq!(source, LinkSource::SelfService);
    assert_eq!(g.person_of(B).unwrap().0, id);
    assert!(g.views.directory.link_requests.is_empty(), "the request is closed");
    assert_eq!(o.tell.len(), 1, "the asking account is told");
    assert_eq!(o.tell[0].0, u(A));
    // The code is spent.
    let again = g.says(B, "confirm ABCD-EFGH", "unused");
    assert!(again.refused, "{}", again.reply);
}

#[test]
fn given_a_link_request_when_a_wrong_code_is_sent_then_nothing_is_linked_and_the_request_stays() {
    let mut g = given();
    g.says(A, "link @alice:litchi", "ABCD-EFGH");
    let o = g.says(B, "confirm ABCD-EFGJ", "unused");
    assert!(o.refused);
    assert!(o.reply.contains("does not match"), "{}", o.reply);
    assert_eq!(g.person_of(B), None);
    assert!(g.views.directory.link_requests.contains_key(&u(A)));
    assert!(!g.says(B, "confirm ABCD-EFGH", "unused").refused, "the right code still works");
}

#[test]
fn given_a_link_request_when_the_code_expired_then_it_is_refused_and_closed() {
    let mut g = given();
    g.says(A, "link @alice:litchi", "ABCD-EFGH");
    g.now += TTL;
    let o = g.says(B, "confirm ABCD-EFGH", "unused");
    assert!(o.refused);
    assert!(o.reply.contains("expired") && o.reply.contains(A), "{}", o.reply);
    assert_eq!(g.person_of(B), None);
    assert!(g.views.directory.link_requests.is_empty());
}

#[test]
fn given_a_link_request_when_another_account_sends_the_code_then_nothing_is_linked() {
    let mut g = given();
    g.says(A, "link @alice:litchi", "ABCD-EFGH");
    let o = g.says(C, "confirm ABCD-EFGH", "unused");
    assert!(o.refused, "{}", o.reply);
    assert!(o.reply.contains("No link request is waiting"), "a code made for another account matches nothing: {}", o.reply);
    assert_eq!(g.person_of(C), None);
    assert_eq!(g.person_of(A), None);
    assert!(g.views.directory.link_requests.contains_key(&u(A)), "the rightful account can still confirm");
    // And the asking account itself cannot confirm its own request.
    assert!(g.says(A, "confirm ABCD-EFGH", "unused").refused);
    assert_eq!(g.person_of(A), None);
}

#[test]
fn given_an_admin_link_when_a_self_link_touches_it_then_the_admin_link_wins() {
    let mut g = given();
    g.linked("alice", &[B, "@alice:mango"], LinkSource::Admin);
    // Asking reveals nothing about B's links: the same answer as for an unlinked account.
    let to_linked = g.says(A, "link @alice:litchi", "ABCD-EFGH");
    let to_unlinked = g.says(C, "link @nobody:litchi", "ABCD-EFGH");
    assert_eq!(to_linked.reply.replace(B, "X").replace(A, "Y"), to_unlinked.reply.replace("@nobody:litchi", "X").replace(C, "Y"));
    let o = g.says(B, "confirm ABCD-EFGH", "unused");
    assert!(o.refused);
    assert!(o.reply.contains("federation admin"), "{}", o.reply);
    assert_eq!(g.person_of(B).unwrap().1, vec![B.to_string(), "@alice:mango".to_string()], "the admin's person is unchanged");
    assert_eq!(g.person_of(A), None);
    // An admin-linked account cannot extend its person, nor unlink it.
    assert!(g.says(B, "link @alice:kiwi", "CODE-CODE").refused);
    assert!(g.says(B, "unlink @alice:mango", "").refused);
    assert_eq!(g.person_of(B).unwrap().1.len(), 2);
}

#[test]
fn given_a_self_link_when_an_admin_links_one_of_its_accounts_then_the_self_person_yields() {
    let mut g = given();
    g.says(A, "link @alice:litchi", "ABCD-EFGH");
    g.says(B, "confirm ABCD-EFGH", "");
    let (self_id, _, _) = g.person_of(A).unwrap();
    let admin = [u(B), u("@alice:mango")];
    assert!(g.views.directory.check_set("alice", &admin, LinkSource::Admin).is_ok(), "managed links take accounts from self-made ones");
    assert!(g.views.directory.check_set("x", &admin, LinkSource::SelfService).is_err(), "but not the other way round");
    let fixes = g.views.directory.taken_over("alice", &admin);
    assert_eq!(fixes, vec![(self_id.clone(), None)], "one account left: the self person goes");
    g.record(Entry::PersonRemoved(PersonRemoved { person: self_id, source: LinkSource::Admin }));
    g.linked("alice", &[B, "@alice:mango"], LinkSource::Admin);
    assert_eq!(g.person_of(A), None);
    assert_eq!(g.person_of(B).unwrap().2, LinkSource::Admin);
}

#[test]
fn given_self_service_linking_off_then_link_and_confirm_are_refused() {
    let mut g = given();
    g.linking = false;
    assert!(g.says(A, "link @alice:litchi", "ABCD-EFGH").refused);
    assert!(g.views.directory.link_requests.is_empty());
    assert!(g.says(B, "confirm ABCD-EFGH", "").refused);
    assert!(g.says(A, "help", "").reply.contains("turned off"));
}

#[test]
fn given_two_self_persons_when_linked_then_they_merge_into_the_askers() {
    let mut g = given();
    g.says(A, "link @alice:litchi", "AAAA-AAAA");
    g.says(B, "confirm AAAA-AAAA", "");
    g.says("@alice:mango", "link @alice:papaya", "BBBB-BBBB");
    g.says("@alice:papaya", "confirm BBBB-BBBB", "");
    g.says(A, "link @alice:mango", "CCCC-CCCC");
    let o = g.says("@alice:mango", "confirm CCCC-CCCC", "");
    assert!(!o.refused, "{}", o.reply);
    let (id, accounts, _) = g.person_of("@alice:papaya").unwrap();
    assert_eq!(accounts.len(), 4);
    assert_eq!(g.person_of(A).unwrap().0, id);
    assert_eq!(g.views.directory.persons.len(), 1);
}

#[test]
fn given_a_self_link_when_unlinked_then_the_person_goes_and_the_other_is_told() {
    let mut g = given();
    g.says(A, "link @alice:litchi", "ABCD-EFGH");
    g.says(B, "confirm ABCD-EFGH", "");
    assert!(g.says(A, "unlink @alice:mango", "").refused, "not linked");
    let o = g.says(A, "unlink @alice:litchi", "");
    assert!(!o.refused, "{}", o.reply);
    assert_eq!(g.person_of(A), None);
    assert_eq!(g.person_of(B), None);
    assert_eq!(o.tell, vec![(u(B), format!("{A} unlinked {B}: I no longer keep them in step."))]);
}

#[test]
fn given_a_linked_person_then_pause_resume_off_on_are_opt_outs() {
    let mut g = given();
    assert!(g.says(A, "pause", "").refused, "nothing to pause for an unlinked account");
    g.linked("alice", &[A, B], LinkSource::Admin);
    g.bot_in("!team:kiwi", "@bob:kiwi", false, &["@bob:kiwi", A]);
    assert!(!g.says(A, "pause", "").refused);
    assert!(g.views.directory.persons["alice"].opted_out);
    assert!(g.says(B, "pause", "").reply.contains("already paused"));
    g.says(B, "resume", "");
    assert!(!g.views.directory.persons["alice"].opted_out);
    g.says(A, "off !team:kiwi", "");
    assert!(g.views.directory.persons["alice"].opted_out_rooms.contains(&r("!team:kiwi")));
    g.says(A, "on !team:kiwi", "");
    assert!(g.views.directory.persons["alice"].opted_out_rooms.is_empty());
    assert!(g.says(A, "off #unknown:kiwi", "").refused, "an alias the shell could not resolve");
}

#[test]
fn given_a_linked_person_when_status_then_accounts_rooms_and_reasons_are_listed() {
    let mut g = given();
    g.linked("alice", &[A, B], LinkSource::SelfService);
    g.bot_in("!team:kiwi", "@bob:kiwi", false, &["@bob:kiwi", A]);
    // The bot has no power to invite here.
    g.pdu("!team:kiwi", "@bob:kiwi", "m.room.power_levels", Some(""), json!({ "users": { "@bob:kiwi": 100 }, "invite": 50 }));
    let o = g.says(A, "status", "");
    assert!(o.reply.contains(&format!("Linked accounts: {A}, {B} (linked by you)")), "{}", o.reply);
    assert!(o.reply.contains("Not in step in 1 room") && o.reply.contains("!team:kiwi") && o.reply.contains("power"), "{}", o.reply);
    let o = g.says(C, "status", "");
    assert!(o.reply.contains("not linked"), "{}", o.reply);
}

// ---- chats in the views ----

#[test]
fn given_a_direct_invite_then_the_room_is_the_owners_chat_and_only_their_text_is_a_command() {
    let mut g = given();
    g.linked("alice", &[A, B], LinkSource::Admin);
    g.bot_in("!chat:kiwi", A, true, &[A]);
    let room = &g.views.rooms[&r("!chat:kiwi")];
    assert_eq!(room.chat_owner(&u(BOT)), Some(&u(A)));
    let cmd = g.pdu("!chat:kiwi", A, "m.room.message", None, json!({ "msgtype": "m.text", "body": "status" }));
    g.pdu("!chat:kiwi", A, "m.room.message", None, json!({ "msgtype": "m.notice", "body": "status" }));
    g.pdu("!chat:kiwi", BOT, "m.room.message", None, json!({ "msgtype": "m.text", "body": "status" }));
    assert_eq!(g.commands("!chat:kiwi"), vec![cmd.clone()]);
    assert!(g.views.index.chat_work.contains(&r("!chat:kiwi")));
    g.record(Entry::CommandHandled(CommandHandled { room_id: r("!chat:kiwi"), event_id: cmd, command: "status".into(), reply: None }));
    assert!(g.commands("!chat:kiwi").is_empty());
    assert!(!g.views.index.chat_work.contains(&r("!chat:kiwi")));
    // A third person joins: no longer a direct chat; nothing there is a command.
    g.pdu("!chat:kiwi", C, "m.room.member", Some(C), json!({ "membership": "join" }));
    assert_eq!(g.views.rooms[&r("!chat:kiwi")].chat_owner(&u(BOT)), None);
    g.pdu("!chat:kiwi", A, "m.room.message", None, json!({ "msgtype": "m.text", "body": "status" }));
    assert!(g.commands("!chat:kiwi").is_empty(), "the bot never answers outside a direct chat");
    // The sibling is never invited into alice@kiwi's chat with the bot.
    assert!(decide(&g.views, &Routes::new()).is_empty());
}

#[test]
fn given_a_group_room_then_messages_are_not_commands() {
    let mut g = given();
    g.bot_in("!team:kiwi", A, false, &[A]);
    g.pdu("!team:kiwi", A, "m.room.message", None, json!({ "msgtype": "m.text", "body": "status" }));
    assert!(g.views.rooms[&r("!team:kiwi")].bot_chat.is_none());
    assert!(g.views.index.chat_work.is_empty());
}

#[test]
fn given_a_flood_of_commands_then_at_most_the_bound_waits() {
    let mut g = given();
    g.bot_in("!chat:kiwi", A, true, &[A]);
    for _ in 0..MAX_PENDING_COMMANDS + 5 {
        g.pdu("!chat:kiwi", A, "m.room.message", None, json!({ "msgtype": "m.text", "body": "help" }));
    }
    assert_eq!(g.commands("!chat:kiwi").len(), MAX_PENDING_COMMANDS);
}

#[test]
fn given_an_encrypted_chat_then_the_bot_owes_one_notice_once() {
    let mut g = given();
    g.bot_in("!chat:kiwi", A, true, &[A]);
    assert!(!g.views.index.chat_work.contains(&r("!chat:kiwi")));
    g.pdu("!chat:kiwi", A, "m.room.encryption", Some(""), json!({ "algorithm": "m.megolm.v1.aes-sha2" }));
    assert!(g.views.index.chat_work.contains(&r("!chat:kiwi")));
    g.record(Entry::BotTold(BotTold { room_id: r("!chat:kiwi"), about: r("!chat:kiwi"), reason: "encrypted".into() }));
    assert!(!g.views.index.chat_work.contains(&r("!chat:kiwi")));
}

// ---- told, not left wondering ----

#[test]
fn given_a_blocked_account_and_a_chat_then_the_person_is_told_once_per_room_and_reason() {
    let mut g = given();
    g.linked("alice", &[A, B], LinkSource::Admin);
    g.bot_in("!chat:litchi", B, true, &[B]);
    g.bot_in("!team:kiwi", "@bob:kiwi", false, &["@bob:kiwi", A]);
    g.pdu("!team:kiwi", "@bob:kiwi", "m.room.power_levels", Some(""), json!({ "users": { "@bob:kiwi": 100 }, "invite": 50 }));
    let report = crate::core::step::report(&g.views, &Routes::new());
    let names = |_: &OwnedRoomId| Some("Team".to_owned());
    let n = notices(&g.views, &report.out_of_step, &names);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!((n[0].chat.as_str(), n[0].about.as_str(), n[0].reason), ("!chat:litchi", "!team:kiwi", "missing_power"));
    assert!(n[0].text.contains("\"Team\"") && n[0].text.contains(B), "{}", n[0].text);
    g.record(Entry::BotTold(BotTold { room_id: n[0].chat.clone(), about: n[0].about.clone(), reason: n[0].reason.into() }));
    let report = crate::core::step::report(&g.views, &Routes::new());
    assert!(notices(&g.views, &report.out_of_step, &names).is_empty(), "told once");
}

#[test]
fn given_no_chat_then_nobody_is_told() {
    let mut g = given();
    g.linked("alice", &[A, B], LinkSource::Admin);
    g.bot_in("!team:kiwi", "@bob:kiwi", false, &["@bob:kiwi", A]);
    g.pdu("!team:kiwi", "@bob:kiwi", "m.room.power_levels", Some(""), json!({ "users": {}, "invite": 50 }));
    let report = crate::core::step::report(&g.views, &Routes::new());
    assert!(!report.out_of_step.is_empty());
    assert!(notices(&g.views, &report.out_of_step, &|_| None).is_empty());
}

// ---- private links ----

#[test]
fn given_on_join_when_an_account_is_only_invited_then_no_sibling_is_invited_until_it_joins() {
    let mut g = given();
    g.linked("alice", &[A, B], LinkSource::Admin);
    g.bot_in("!team:kiwi", "@bob:kiwi", false, &["@bob:kiwi"]);
    g.pdu("!team:kiwi", "@bob:kiwi", "m.room.member", Some(A), json!({ "membership": "invite" }));
    let on_join = Routes { invite_siblings: InviteSiblings::OnJoin, ..Routes::new() };
    assert!(decide(&g.views, &on_join).is_empty(), "an invite alone reveals nothing");
    assert!(
        decide(&g.views, &Routes::new()).iter().any(|a| matches!(a, Action::Invite { target, .. } if target.as_str() == B)),
        "on_invite (the default) invites at once"
    );
    g.pdu("!team:kiwi", A, "m.room.member", Some(A), json!({ "membership": "join" }));
    assert!(decide(&g.views, &on_join).iter().any(|a| matches!(a, Action::Invite { target, .. } if target.as_str() == B)));
}

#[test]
fn given_a_link_request_when_wrong_codes_keep_coming_then_the_requests_close() {
    let mut g = given();
    g.says(A, "link @alice:litchi", "ABCD-EFGH");
    for i in 0..MAX_WRONG_CODES {
        let o = g.says(B, &format!("confirm WRNG-000{i}"), "");
        assert!(o.refused && o.wrong_code, "{}", o.reply);
    }
    let o = g.says(B, "confirm ABCD-EFGH", "");
    assert!(o.refused, "the right code no longer works after {MAX_WRONG_CODES} wrong ones: {}", o.reply);
    assert!(o.reply.contains("Too many"), "{}", o.reply);
    assert!(g.views.directory.link_requests.is_empty());
    assert_eq!(g.person_of(B), None);
    // A new request from the asking account starts afresh.
    g.says(A, "link @alice:litchi", "JKLM-NPQR");
    g.wrong.clear(); // (the shell forgets the count on a restart or success)
    assert!(!g.says(B, "confirm JKLM-NPQR", "").refused);
}

#[test]
fn given_expired_requests_then_a_new_request_prunes_them() {
    let mut g = given();
    g.says(A, "link @alice:litchi", "ABCD-EFGH");
    g.says(C, "link @mallory:litchi", "ABCD-EFGJ");
    g.now += TTL + 1;
    g.says("@dave:kiwi", "link @dave:litchi", "ABCD-EFGK");
    assert_eq!(g.views.directory.link_requests.keys().map(|k| k.as_str()).collect::<Vec<_>>(), vec!["@dave:kiwi"]);
}

#[test]
fn given_a_linked_person_then_off_takes_only_rooms_of_their_accounts() {
    let mut g = given();
    g.linked("alice", &[A, B], LinkSource::Admin);
    g.bot_in("!team:kiwi", "@bob:kiwi", false, &["@bob:kiwi", A]);
    g.bot_in("!secret:kiwi", "@bob:kiwi", false, &["@bob:kiwi"]);
    assert!(g.says(A, "off !secret:kiwi", "").refused, "not a room of hers");
    assert!(g.views.directory.persons["alice"].opted_out_rooms.is_empty());
    assert!(!g.says(A, "off !team:kiwi", "").refused);
    assert!(!g.says(A, "on !team:kiwi", "").refused, "a room opted out of can be turned on again");
}

#[test]
fn given_a_direct_invite_from_an_allowed_inviter_into_a_room_with_others_then_it_is_a_normal_room() {
    let mut g = given();
    g.linked("alice", &[A, B], LinkSource::Admin);
    // A direct chat between bob and alice@kiwi that also invites the bot (Synapse sets
    // is_direct on every invite of such a room): synced as before.
    g.bot_in("!dm:kiwi", "@bob:kiwi", true, &["@bob:kiwi", A]);
    assert!(g.views.rooms[&r("!dm:kiwi")].bot_chat.is_none());
    assert!(decide(&g.views, &Routes::new()).iter().any(|a| matches!(a, Action::Invite { target, .. } if target.as_str() == B)));
    // Accepted only as a chat (bot.direct_chats for an inviter outside invites_from): never
    // synced, whoever is in it, and silent while others are.
    g.chat_only = true;
    g.bot_in("!crowd:kiwi", "@bob:kiwi", true, &["@bob:kiwi", A]);
    let room = &g.views.rooms[&r("!crowd:kiwi")];
    assert!(room.bot_chat.is_some() && room.chat_owner(&u(BOT)).is_none());
    assert!(!decide(&g.views, &Routes::new()).iter().any(|a| matches!(a, Action::Invite { room_id, .. } if room_id.as_str() == "!crowd:kiwi")));
}

#[test]
fn given_a_join_given_up_then_the_linked_inviter_is_told_once() {
    let mut g = given();
    g.linked("alice", &[A, B], LinkSource::Admin);
    g.bot_in("!chat:kiwi", A, true, &[A]);
    g.record(Entry::BotInvited(BotInvited {
        room_id: r("!far:kiwi"),
        room_version: ruma::RoomVersionId::V12,
        event_id: "$inv2".try_into().unwrap(),
        inviter: u(A),
        event: json!({}),
        direct: None,
    }));
    g.record(Entry::BotJoinFailed(crate::core::log_entry::BotJoinFailed { room_id: r("!far:kiwi"), reason: "the resident refused".into() }));
    let n = notices(&g.views, &Default::default(), &|_| None);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!((n[0].chat.as_str(), n[0].reason), ("!chat:kiwi", "join_failed"));
    assert!(n[0].text.contains("the resident refused"), "{}", n[0].text);
    g.record(Entry::BotTold(BotTold { room_id: r("!chat:kiwi"), about: r("!far:kiwi"), reason: "join_failed".into() }));
    assert!(notices(&g.views, &Default::default(), &|_| None).is_empty());
}

#[test]
fn given_many_rooms_to_tell_then_one_message_names_twenty_and_counts_the_rest() {
    let n: Vec<Notice> = (0..25)
        .map(|i| Notice { chat: r("!chat:kiwi"), account: u(B), about: r(&format!("!r{i}:kiwi")), reason: "no_registration", text: format!("room {i}") })
        .collect();
    let refs: Vec<&Notice> = n.iter().collect();
    let text = notices_text(&refs);
    assert_eq!(text.lines().filter(|l| l.starts_with("- room")).count(), MAX_LISTED_ROOMS);
    assert!(text.contains("and 5 more rooms"), "{text}");
}

#[test]
fn given_a_direct_room_whose_other_invites_come_after_the_bot_joined_then_it_becomes_a_normal_room_unless_used() {
    let mut g = given();
    g.linked("alice", &[A, B], LinkSource::Admin);
    // bob's createRoom invited the bot and alice@kiwi: the bot joined first.
    g.bot_in("!dm:kiwi", "@bob:kiwi", true, &["@bob:kiwi"]);
    assert!(g.views.rooms[&r("!dm:kiwi")].bot_chat.is_some());
    g.pdu("!dm:kiwi", "@bob:kiwi", "m.room.member", Some(A), json!({ "membership": "invite", "is_direct": true }));
    assert!(g.views.rooms[&r("!dm:kiwi")].bot_chat.is_none(), "a third member before any command: a normal room");
    assert!(decide(&g.views, &Routes::new()).iter().any(|a| matches!(a, Action::Invite { target, .. } if target.as_str() == B)));
    // A chat its owner used stays a chat (silent while others are in it).
    g.bot_in("!chat:kiwi", A, true, &[A]);
    g.pdu("!chat:kiwi", A, "m.room.message", None, json!({ "msgtype": "m.text", "body": "help" }));
    g.pdu("!chat:kiwi", A, "m.room.member", Some(C), json!({ "membership": "invite" }));
    let room = &g.views.rooms[&r("!chat:kiwi")];
    assert!(room.bot_chat.is_some() && room.chat_owner(&u(BOT)).is_none());
    assert!(g.views.index.chat_work.contains(&r("!chat:kiwi")), "its waiting command is work: it is dropped, not kept");
}
