//! Whether people are in step: a pure reading of the views and the reconciler's decisions,
//! for the operator's gauges (`fedlink_persons`, `fedlink_account_rooms`) and the age of the
//! oldest account out of step.
//!
//! Per (room, account) of a linked, not opted-out person, in the rooms fedlink knows:
//! - `blocked`: fedlink cannot act without someone's help: it lacks the power to invite,
//!   or the homeserver refused an invite, join, leave, read or `m.direct` write;
//! - `unsupported`: no route can do what is needed there (no registration);
//! - `catching_up`: fedlink has work pending or decided for it (or waits for the account
//!   to catch up on its memberships before inviting it);
//! - `in_step` otherwise.
//!
//! An account counts in a room while it is there (joined or invited) or fedlink has work
//! under way or refused for it; rooms the bot left, is joining or gave up do not count. A
//! person takes the worst state of their accounts (blocked, then unsupported, then catching
//! up), or `opted_out`. [`StepCache`] keeps the classification room by room: a pass decides
//! again only for the rooms touched since the last one.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedRoomId, OwnedUserId};

use super::{
    reconcile::{decide_touched, Action, Routes},
    views::{BotMembership, RoomView, Touched, Views},
};

/// The state of one account in one room, or of a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// Nothing to do.
    InStep,
    /// fedlink has work under way.
    CatchingUp,
    /// No route can do what is needed.
    Unsupported,
    /// Stuck until someone acts (power, a refusal).
    Blocked,
    /// The person opted out of syncing.
    OptedOut,
}

impl Step {
    /// Every state, for gauges that must show zeros too.
    pub const ALL: [Step; 5] = [Step::InStep, Step::CatchingUp, Step::Unsupported, Step::Blocked, Step::OptedOut];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Step::InStep => "in_step",
            Step::CatchingUp => "catching_up",
            Step::Unsupported => "unsupported",
            Step::Blocked => "blocked",
            Step::OptedOut => "opted_out",
        }
    }
}

/// What a pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// Persons by state.
    pub persons: BTreeMap<Step, usize>,
    /// (room, account) pairs by state.
    pub account_rooms: BTreeMap<Step, usize>,
    /// The (room, account) pairs not in step, with their state.
    pub out_of_step: BTreeMap<(OwnedRoomId, OwnedUserId), Step>,
}

/// What the reconciler would still do in one room: targets of actions, targets of
/// `Unsupported` decisions, and targets lacking the bot's power.
#[derive(Default)]
struct Decided<'a> {
    acting: BTreeSet<&'a OwnedUserId>,
    unsupported: BTreeSet<&'a OwnedUserId>,
    missing_power: BTreeSet<&'a OwnedUserId>,
}

fn decided_by_room(actions: &[Action]) -> BTreeMap<&OwnedRoomId, Decided<'_>> {
    let mut out: BTreeMap<&OwnedRoomId, Decided> = BTreeMap::new();
    for a in actions {
        match a {
            Action::Invite { room_id, target, .. }
            | Action::SetRead { room_id, target, .. }
            | Action::MarkDirect { room_id, target, .. }
            | Action::Join { room_id, target }
            | Action::Leave { room_id, target }
            | Action::InviteAs { room_id, target, .. }
            | Action::AwaitCatchUp { room_id, target } => {
                out.entry(room_id).or_default().acting.insert(target);
            }
            Action::Unsupported { room_id, target, .. } => {
                out.entry(room_id).or_default().unsupported.insert(target);
            }
            Action::MissingPower { room_id, target, .. } => {
                out.entry(room_id).or_default().missing_power.insert(target);
            }
        }
    }
    out
}

/// The state of `account` in `room`, or `None` when it does not count there: it is not in
/// the room (no membership, or left, declined, kicked, banned) and fedlink has nothing under
/// way or refused for it. A refusal or an unsupported kind counts only while the account is
/// in the room, or, for an invite, while it is still to be invited.
fn account_step(room: &RoomView, account: &OwnedUserId, d: &Decided) -> Option<Step> {
    let present = matches!(room.membership(account), Some("join") | Some("invite"));
    let pending = room.pending_invites.contains_key(account)
        || room.pending_actions.contains_key(account)
        || room.pending_actions.values().any(|a| a.actor.as_ref() == Some(account))
        || room.threads.values().any(|t| t.pending.contains_key(account));
    let to_invite = d.missing_power.contains(account) || (room.failed_invites.contains_key(account) && room.membership(account).is_none());
    let refused = to_invite
        || (present
            && (room.blocked_actions.contains_key(account) || room.direct_failed.contains_key(account) || room.threads.values().any(|t| t.blocked.contains_key(account))));
    if refused {
        return Some(Step::Blocked);
    }
    if d.unsupported.contains(account) || (present && room.unsupported.contains_key(account)) {
        return Some(Step::Unsupported);
    }
    if pending || d.acting.contains(account) {
        return Some(Step::CatchingUp);
    }
    present.then_some(Step::InStep)
}

/// Whether rooms of this kind are kept in step: the bot is in them, or they are known from
/// registrations only. (Rooms the bot left, is joining or gave up are not acted on, nor
/// the bot's direct chats.)
fn kept(room: &RoomView) -> bool {
    matches!(room.bot, BotMembership::Joined | BotMembership::Absent) && room.bot_chat.is_none()
}

/// The states of a person's accounts in one room (those that count there; see
/// [`report`]). For the admin API: one room's `decide`, not every room's.
pub fn room_steps(views: &Views, routes: &Routes, room_id: &OwnedRoomId, accounts: &BTreeSet<OwnedUserId>) -> BTreeMap<OwnedUserId, Step> {
    let Some(room) = views.rooms.get(room_id).filter(|r| kept(r)) else { return BTreeMap::new() };
    let touched = crate::core::views::Touched { all: false, rooms: [room_id.clone()].into() };
    let actions = crate::core::reconcile::decide_touched(views, routes, &touched);
    let decided = decided_by_room(&actions);
    let empty = Decided::default();
    let d = decided.get(room_id).unwrap_or(&empty);
    accounts.iter().filter_map(|a| Some((a.clone(), account_step(room, a, d)?))).collect()
}

/// Whether people are in step, from `views` and what the reconciler would do now (a full
/// pass over every room).
pub fn report(views: &Views, routes: &Routes) -> StepReport {
    let mut cache = StepCache::default();
    cache.update(views, routes, &Touched::default());
    cache.report(views)
}

/// One room's classification: (person, account, state) of every account that counts there.
type RoomEntries = Vec<(String, OwnedUserId, Step)>;

/// The in-step classification kept room by room, with its sums, so that a pass costs what
/// changed since the last one (the rooms folding touched, [`Views::step_touched`]): those
/// rooms are classified again and their old entries swapped out of the sums. Only the
/// per-person worst state is summed over persons. A directory change touches every room.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepCache {
    rooms: BTreeMap<OwnedRoomId, RoomEntries>,
    account_rooms: BTreeMap<Step, usize>,
    out_of_step: BTreeMap<(OwnedRoomId, OwnedUserId), Step>,
    /// Per person, how many of their (room, account) pairs are in each state.
    person_states: BTreeMap<String, BTreeMap<Step, usize>>,
}

impl StepCache {
    /// Classify the `touched` rooms again.
    pub fn update(&mut self, views: &Views, routes: &Routes, touched: &Touched) {
        if touched.all {
            *self = StepCache::default();
        }
        let actions = decide_touched(views, routes, touched);
        let decided = decided_by_room(&actions);
        let empty = Decided::default();
        let ids: Vec<&OwnedRoomId> = if touched.all { views.rooms.keys().collect() } else { touched.rooms.iter().collect() };
        for room_id in ids {
            self.remove(room_id);
            if let Some(room) = views.rooms.get(room_id).filter(|r| kept(r)) {
                let entries = room_entries(views, room_id, room, decided.get(room_id).unwrap_or(&empty));
                self.add(room_id, entries);
            }
        }
    }

    fn remove(&mut self, room_id: &OwnedRoomId) {
        let Some(entries) = self.rooms.remove(room_id) else { return };
        for (person, account, s) in entries {
            if let Some(n) = self.account_rooms.get_mut(&s) {
                *n -= 1;
            }
            self.out_of_step.remove(&(room_id.clone(), account));
            if let Some(states) = self.person_states.get_mut(&person) {
                if let Some(n) = states.get_mut(&s) {
                    *n -= 1;
                    if *n == 0 {
                        states.remove(&s);
                    }
                }
                if states.is_empty() {
                    self.person_states.remove(&person);
                }
            }
        }
    }

    fn add(&mut self, room_id: &OwnedRoomId, entries: RoomEntries) {
        if entries.is_empty() {
            return;
        }
        for (person, account, s) in &entries {
            *self.account_rooms.entry(*s).or_default() += 1;
            if *s != Step::InStep {
                self.out_of_step.insert((room_id.clone(), account.clone()), *s);
            }
            *self.person_states.entry(person.clone()).or_default().entry(*s).or_default() += 1;
        }
        self.rooms.insert(room_id.clone(), entries);
    }

    /// (room, account) pairs by state.
    pub fn account_rooms(&self) -> &BTreeMap<Step, usize> {
        &self.account_rooms
    }

    /// The (room, account) pairs not in step.
    pub fn out_of_step(&self) -> &BTreeMap<(OwnedRoomId, OwnedUserId), Step> {
        &self.out_of_step
    }

    /// Persons by state: each takes the worst of their accounts', or `opted_out`.
    pub fn persons(&self, views: &Views) -> BTreeMap<Step, usize> {
        let mut out = BTreeMap::new();
        for (id, p) in views.directory.persons.iter() {
            let base = if p.opted_out { Step::OptedOut } else { Step::InStep };
            let worst = self.person_states.get(id).and_then(|m| m.keys().next_back().copied()).map_or(base, |w| w.max(base));
            *out.entry(worst).or_default() += 1;
        }
        out
    }

    /// The whole report (copies the sums).
    pub fn report(&self, views: &Views) -> StepReport {
        StepReport {
            persons: self.persons(views),
            account_rooms: self.account_rooms.iter().filter(|(_, n)| **n > 0).map(|(s, n)| (*s, *n)).collect(),
            out_of_step: self.out_of_step.clone(),
        }
    }
}

/// The accounts that count in one kept room, with their states.
fn room_entries(views: &Views, room_id: &OwnedRoomId, room: &RoomView, d: &Decided) -> RoomEntries {
    let dir = &views.directory;
    // The persons with an account that has a membership or fedlink's work here.
    let here: BTreeSet<&String> = room
        .members
        .keys()
        .chain(room.pending_invites.keys())
        .chain(room.failed_invites.keys())
        .chain(room.pending_actions.keys())
        .filter_map(|u| dir.by_account.get(u))
        .collect();
    let mut out = Vec::new();
    for id in here {
        let Some(person) = dir.persons.get(id) else { continue };
        if person.opted_out || person.opted_out_rooms.contains(room_id) {
            continue;
        }
        for account in &person.accounts {
            if let Some(s) = account_step(room, account, d) {
                out.push((id.clone(), account.clone(), s));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
