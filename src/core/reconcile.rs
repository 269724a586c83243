//! The reconciler: a pure function from the views to the actions that bring each person's
//! accounts in step. No I/O, no clock. Idempotent: once the shell has logged what it did
//! about an action (an `invite_pending` or `invite_failed` record), deciding again on the
//! folded views yields no new action for it.
//!
//! Rules for invites (issue #3):
//! - when account A of person P is invited to or joined in room R (creating a room is
//!   joining it), every other account B of P gets invited, unless B already has any
//!   membership in R other than `knock` (so an account that left, declined, was kicked or
//!   banned is never re-invited), an invite to B is pending, P opted out (everywhere or in
//!   R), or an earlier attempt failed for good;
//! - if the bot's power is below the room's invite level, the decision is `MissingPower`,
//!   made once per power levels event: a new power levels event brings the invite back.

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};

use super::views::{RoomView, Views};

/// What should happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Invite `target` to `room_id` (the bot sends the invite).
    Invite {
        /// The room.
        room_id: OwnedRoomId,
        /// The account to invite.
        target: OwnedUserId,
        /// The person it belongs to.
        person: String,
    },
    /// The bot lacks the power to invite `target`.
    MissingPower {
        /// The room.
        room_id: OwnedRoomId,
        /// The account that would have been invited.
        target: OwnedUserId,
        /// The power levels event that denies it.
        power_levels_event: Option<OwnedEventId>,
        /// Level needed to invite.
        needed: i64,
        /// The bot's level.
        have: i64,
    },
}

/// Every action the views call for, in a deterministic order.
pub fn decide(views: &Views) -> Vec<Action> {
    let mut out = Vec::new();
    for (room_id, room) in views.rooms.iter().filter(|(_, r)| r.bot_joined()) {
        decide_room(views, room_id, room, &mut out);
    }
    out
}

fn decide_room(views: &Views, room_id: &OwnedRoomId, room: &RoomView, out: &mut Vec<Action>) {
    let dir = &views.directory;
    let present = room.members.iter().filter(|(_, m)| matches!(m.as_str(), "invite" | "join")).map(|(u, _)| u);
    let mut persons: Vec<&String> = present.filter_map(|u| dir.by_account.get(u)).collect();
    persons.sort();
    persons.dedup();
    for person_id in persons {
        let Some(person) = dir.persons.get(person_id) else { continue };
        if person.opted_out || person.opted_out_rooms.contains(room_id) {
            continue;
        }
        for target in &person.accounts {
            if let Some(action) = decide_target(views, room_id, room, person_id, target) {
                out.push(action);
            }
        }
    }
}

fn decide_target(views: &Views, room_id: &OwnedRoomId, room: &RoomView, person: &str, target: &OwnedUserId) -> Option<Action> {
    if *target == views.bot_user_id || target.server_name() == views.bot_user_id.server_name() {
        return None;
    }
    if room.membership(target).is_some_and(|m| m != "knock") || room.pending_invites.contains_key(target) {
        return None;
    }
    let power_event = room.power.as_ref().and_then(|p| p.event_id.clone());
    if let Some(f) = room.failed_invites.get(target) {
        // Only a lack of power is worth retrying, and only once the power levels changed.
        if f.power_levels_event.is_none() || f.power_levels_event == power_event {
            return None;
        }
    }
    let (needed, have) = match &room.power {
        Some(p) => (p.invite, p.level(&views.bot_user_id)),
        None => (0, 0),
    };
    if have < needed {
        return Some(Action::MissingPower { room_id: room_id.clone(), target: target.clone(), power_levels_event: power_event, needed, have });
    }
    Some(Action::Invite { room_id: room_id.clone(), target: target.clone(), person: person.to_owned() })
}

#[cfg(test)]
mod tests;
