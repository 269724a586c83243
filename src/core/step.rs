//! Whether people are in step: a pure reading of the views and the reconciler's decisions,
//! for the operator's gauges (`fedlink_persons`, `fedlink_account_rooms`) and the age of the
//! oldest account out of step.
//!
//! Per (room, account) of a linked, not opted-out person, in the rooms fedlink knows:
//! - `blocked`: fedlink cannot act without someone's help: it lacks the power to invite,
//!   or the homeserver refused an invite, join, leave, read or `m.direct` write;
//! - `unsupported`: no route can do what is needed there (no registration);
//! - `catching_up`: fedlink has work pending or decided for it;
//! - `in_step` otherwise.
//!
//! A person takes the worst state of their accounts (blocked, then unsupported, then
//! catching up), or `opted_out`. The pass costs a full `decide`: it runs on a timer, not
//! per record.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedRoomId, OwnedUserId};

use super::{
    reconcile::{decide, Action, Routes},
    views::{RoomView, Views},
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

fn account_step(room: &RoomView, account: &OwnedUserId, decided: &BTreeSet<&OwnedUserId>, unsupported_decided: &BTreeSet<&OwnedUserId>) -> Step {
    let refused = room.failed_invites.contains_key(account)
        || room.blocked_actions.contains_key(account)
        || room.direct_failed.contains_key(account)
        || room.threads.values().any(|t| t.blocked.contains_key(account));
    if refused {
        return Step::Blocked;
    }
    if room.unsupported.contains_key(account) || unsupported_decided.contains(account) {
        return Step::Unsupported;
    }
    let pending = room.pending_invites.contains_key(account)
        || room.pending_actions.contains_key(account)
        || room.pending_actions.values().any(|a| a.actor.as_ref() == Some(account))
        || room.threads.values().any(|t| t.pending.contains_key(account));
    if pending || decided.contains(account) {
        return Step::CatchingUp;
    }
    Step::InStep
}

/// Whether people are in step, from `views` and what the reconciler would do now.
pub fn report(views: &Views, routes: &Routes) -> StepReport {
    // What the reconciler would still do, by room and target.
    let mut decided: BTreeMap<&OwnedRoomId, (BTreeSet<&OwnedUserId>, BTreeSet<&OwnedUserId>)> = BTreeMap::new();
    let actions = decide(views, routes);
    for a in &actions {
        let (room, target, unsupported) = match a {
            Action::Invite { room_id, target, .. }
            | Action::SetRead { room_id, target, .. }
            | Action::MarkDirect { room_id, target, .. }
            | Action::Join { room_id, target }
            | Action::Leave { room_id, target }
            | Action::InviteAs { room_id, target, .. } => (room_id, target, false),
            Action::Unsupported { room_id, target, .. } => (room_id, target, true),
            // Lacking power is blocked, as once it is recorded.
            Action::MissingPower { room_id, target, .. } => (room_id, target, false),
        };
        let entry = decided.entry(room).or_default();
        if unsupported {
            entry.1.insert(target);
        } else {
            entry.0.insert(target);
        }
    }
    let missing_power: BTreeSet<(&OwnedRoomId, &OwnedUserId)> =
        actions.iter().filter_map(|a| if let Action::MissingPower { room_id, target, .. } = a { Some((room_id, target)) } else { None }).collect();
    let empty = (BTreeSet::new(), BTreeSet::new());
    let dir = &views.directory;
    let mut worst: BTreeMap<&String, Step> = BTreeMap::new();
    let mut out = StepReport::default();
    for (id, person) in dir.persons.iter() {
        worst.insert(id, if person.opted_out { Step::OptedOut } else { Step::InStep });
    }
    for (room_id, room) in views.rooms.iter() {
        // The persons with an account that has a membership or fedlink's work here.
        let here: BTreeSet<&String> = room
            .members
            .keys()
            .chain(room.pending_invites.keys())
            .chain(room.failed_invites.keys())
            .chain(room.pending_actions.keys())
            .filter_map(|u| dir.by_account.get(u))
            .collect();
        let (d, u) = decided.get(room_id).unwrap_or(&empty);
        for id in here {
            let Some(person) = dir.persons.get(id) else { continue };
            if person.opted_out || person.opted_out_rooms.contains(room_id) {
                continue;
            }
            for account in &person.accounts {
                let s = if missing_power.contains(&(room_id, account)) { Step::Blocked } else { account_step(room, account, d, u) };
                *out.account_rooms.entry(s).or_default() += 1;
                if s != Step::InStep {
                    out.out_of_step.insert((room_id.clone(), account.clone()), s);
                }
                if let Some(w) = worst.get_mut(id) {
                    *w = (*w).max(s);
                }
            }
        }
    }
    for s in worst.into_values() {
        *out.persons.entry(s).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests;
