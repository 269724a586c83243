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
//!
//! With `sync.invite_siblings = "on_join"` ([`InviteSiblings::OnJoin`]), only a joined
//! account brings its siblings in: an invite alone reveals nothing about the person.
//! The bot's direct chats ([`RoomView::bot_chat`]) are never synced.
//!
//! Rules for read state and membership (issue #4), for the person's accounts joined to a
//! room the bot is in:
//! - read markers move forward only, to the furthest read position (ordered by depth) any
//!   of the person's joined accounts has; receipts and sent messages both count;
//! - an invited account is joined when a sibling is joined (auto-join), and a joined one
//!   leaves when a sibling left by itself (mirror-leave; kicks and bans do not spread);
//! - these act through a homeserver's application-service registration ([`Routes`]); where
//!   none exists the decision is `Unsupported`, recorded once per user, room and kind.
//!   Echoes of what fedlink set are no-ops: a read at the furthest position changes nothing.
//!
//! Rules for conversations (issue #9):
//! - each thread's reads follow the person within that thread, forward only, apart from the
//!   main timeline (a thread read never moves the main timeline, nor the reverse); a main
//!   read also moves the read marker (`m.fully_read`) in the same call;
//! - when an account of the person was invited to a direct chat (`is_direct`), invites to
//!   its siblings carry `is_direct`, and each joined sibling gets the room listed under the
//!   original inviter in its `m.direct` (once; the account the partner invited does that
//!   itself through its client).

use std::collections::BTreeMap;

use ruma::{OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId};

/// What the application-service route offers on one homeserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Join invited sibling accounts.
    pub auto_join: bool,
    /// Leave when a sibling left.
    pub mirror_leave: bool,
}

/// When a person's other accounts are invited (`sync.invite_siblings`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InviteSiblings {
    /// As soon as one of the person's accounts is invited (or joined).
    #[default]
    OnInvite,
    /// Only once one of the person's accounts has joined: an inviter cannot learn a
    /// person's other accounts by inviting one of them.
    OnJoin,
}

/// What fedlink may do where: the homeservers with a registration for fedlink (it derefs
/// to that map), and the sync policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Homeservers with a registration, and what it offers.
    pub servers: BTreeMap<OwnedServerName, Route>,
    /// When siblings are invited.
    pub invite_siblings: InviteSiblings,
}

impl Routes {
    /// No registration anywhere, the default policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl std::ops::Deref for Routes {
    type Target = BTreeMap<OwnedServerName, Route>;
    fn deref(&self) -> &Self::Target {
        &self.servers
    }
}

impl std::ops::DerefMut for Routes {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.servers
    }
}

impl FromIterator<(OwnedServerName, Route)> for Routes {
    fn from_iter<I: IntoIterator<Item = (OwnedServerName, Route)>>(iter: I) -> Self {
        Routes { servers: iter.into_iter().collect(), invite_siblings: InviteSiblings::default() }
    }
}

use super::views::{directory::Person, position_after, BotMembership, Receipt, RoomView, Views};

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
        /// A direct chat with this partner: the invite carries `is_direct`.
        partner: Option<OwnedUserId>,
    },
    /// Move `target`'s read receipt to `event_id`: in the main timeline (with the read
    /// marker, `m.fully_read`), or in `thread`.
    SetRead {
        /// The room.
        room_id: OwnedRoomId,
        /// The account.
        target: OwnedUserId,
        /// The event to mark read.
        event_id: OwnedEventId,
        /// Where it sits: (depth, origin_server_ts).
        position: (Option<u64>, Option<u64>),
        /// The thread's root, for a read within a thread.
        thread: Option<OwnedEventId>,
    },
    /// List the room under `partner` in `target`'s `m.direct` account data.
    MarkDirect {
        /// The room.
        room_id: OwnedRoomId,
        /// The account (joined).
        target: OwnedUserId,
        /// Who the direct chat is with: the original inviter.
        partner: OwnedUserId,
    },
    /// Join `target` (invited) to the room.
    Join {
        /// The room.
        room_id: OwnedRoomId,
        /// The account.
        target: OwnedUserId,
    },
    /// Make `target` leave the room.
    Leave {
        /// The room.
        room_id: OwnedRoomId,
        /// The account.
        target: OwnedUserId,
    },
    /// Invite `target` as its sibling `actor` (the bot is not in the room).
    InviteAs {
        /// The room.
        room_id: OwnedRoomId,
        /// The sibling account that invites (joined, on a server with a registration).
        actor: OwnedUserId,
        /// The account to invite.
        target: OwnedUserId,
        /// A direct chat with this partner: the invite carries `is_direct`.
        partner: Option<OwnedUserId>,
    },
    /// `target` would be invited as a sibling (the bot is not in the room), once it has
    /// caught up on its memberships through its homeserver's registration (it may have
    /// left or declined the room before fedlink could see it). Nothing is logged for it.
    AwaitCatchUp {
        /// The room.
        room_id: OwnedRoomId,
        /// The account waiting.
        target: OwnedUserId,
    },
    /// No route can do `kind` for `target`'s homeserver.
    Unsupported {
        /// The room.
        room_id: OwnedRoomId,
        /// The account.
        target: OwnedUserId,
        /// `read`, `thread_read`, `join`, `leave`, `invite` or `direct`.
        kind: &'static str,
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
pub fn decide(views: &Views, routes: &Routes) -> Vec<Action> {
    let mut out = Vec::new();
    for (room_id, room) in views.rooms.iter() {
        decide_in(views, routes, room_id, room, &mut out);
    }
    out
}

/// The actions the touched rooms call for: the same as [`decide`] restricted to those
/// rooms (decisions in a room depend only on that room and the directory, and a directory
/// change touches every room). Its cost follows what changed, not how many rooms there are.
pub fn decide_touched(views: &Views, routes: &Routes, touched: &crate::core::views::Touched) -> Vec<Action> {
    if touched.all {
        return decide(views, routes);
    }
    let mut out = Vec::new();
    for room_id in &touched.rooms {
        if let Some(room) = views.rooms.get(room_id) {
            decide_in(views, routes, room_id, room, &mut out);
        }
    }
    out
}

fn decide_in(views: &Views, routes: &Routes, room_id: &OwnedRoomId, room: &RoomView, out: &mut Vec<Action>) {
    // The bot's direct chat with one account is between them: nobody is synced into it.
    if room.bot_chat.is_some() {
        return;
    }
    {
        match room.bot {
            BotMembership::Joined => decide_room(views, routes, room_id, room, out),
            // Known only from a registration's pushes: a joined sibling invites.
            BotMembership::Absent => decide_invites_as(views, routes, room_id, room, out),
            _ => return,
        }
        decide_sync(views, routes, room_id, room, out);
    }
}

fn decide_invites_as(views: &Views, routes: &Routes, room_id: &OwnedRoomId, room: &RoomView, out: &mut Vec<Action>) {
    for (_, person) in persons_in(views, room_id, room, |m| m == "join") {
        let actor = person.accounts.iter().find(|a| room.membership(a) == Some("join") && routes.contains_key(a.server_name()));
        let partner = room.direct_partner(&person.accounts, &views.bot_user_id);
        for target in &person.accounts {
            let taken = room.membership(target).is_some_and(|m| m != "knock");
            if taken || room.pending_actions.contains_key(target) || room.blocked_actions.contains_key(target) || target.server_name() == views.bot_user_id.server_name() {
                continue;
            }
            // Here fedlink knows memberships only from pushes: an account whose homeserver
            // has a registration may have left or declined this room before the
            // registration was installed. It is invited once it has caught up.
            let catching_up = routes.contains_key(target.server_name()) && !views.directory.is_caught_up(target);
            match actor {
                Some(_) if catching_up => out.push(Action::AwaitCatchUp { room_id: room_id.clone(), target: target.clone() }),
                Some(a) => out.push(Action::InviteAs { room_id: room_id.clone(), actor: a.clone(), target: target.clone(), partner: partner.cloned() }),
                None if !room.unsupported.get(target).is_some_and(|k| k.contains("invite")) => {
                    out.push(Action::Unsupported { room_id: room_id.clone(), target: target.clone(), kind: "invite" })
                }
                None => {}
            }
        }
    }
}

/// Persons (not opted out here) with an account whose membership in `room` passes `keep`.
fn persons_in<'a>(views: &'a Views, room_id: &OwnedRoomId, room: &'a RoomView, keep: impl Fn(&str) -> bool) -> Vec<(&'a String, &'a Person)> {
    let dir = &views.directory;
    let mut ids: Vec<&String> = room.members.iter().filter(|(_, m)| keep(m)).filter_map(|(u, _)| dir.by_account.get(u)).collect();
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| dir.persons.get(id).map(|p| (id, p)))
        .filter(|(_, p)| !p.opted_out && !p.opted_out_rooms.contains(room_id))
        .collect()
}

fn decide_sync(views: &Views, routes: &Routes, room_id: &OwnedRoomId, room: &RoomView, out: &mut Vec<Action>) {
    for (_, person) in persons_in(views, room_id, room, |_| true) {
        let joined: Vec<&OwnedUserId> = person.accounts.iter().filter(|a| room.membership(a) == Some("join")).collect();
        let unsupported = |u: &OwnedUserId, kind: &str| room.unsupported.get(u).is_some_and(|k| k.contains(kind));
        // One pending action per account (reads, joins, leaves, direct listings share the
        // slot): one decided in this pass also makes the account busy until it is logged.
        let decided: std::cell::RefCell<std::collections::BTreeSet<OwnedUserId>> = Default::default();
        let busy = |u: &OwnedUserId| room.pending_actions.contains_key(u) || !decided.borrow_mut().insert(u.clone());
        // Main-timeline reads: forward to the furthest position among joined accounts.
        for (b, event_id, position) in reads_behind(&joined, &room.receipts) {
            let failed = room.blocked_actions.get(b).is_some_and(|a| a.kind == "read" && a.event_id.as_ref() == Some(event_id));
            if failed || unsupported(b, "read") || busy(b) {
                continue;
            }
            out.push(match routes.get(b.server_name()) {
                Some(_) => Action::SetRead { room_id: room_id.clone(), target: b.clone(), event_id: event_id.clone(), position, thread: None },
                None => Action::Unsupported { room_id: room_id.clone(), target: b.clone(), kind: "read" },
            });
        }
        // Each thread's reads, the same way, apart from the main timeline's.
        for (root, thread) in &room.threads {
            for (b, event_id, position) in reads_behind(&joined, &thread.receipts) {
                let failed = thread.blocked.get(b).is_some_and(|a| a.event_id.as_ref() == Some(event_id));
                if thread.pending.contains_key(b) || failed || unsupported(b, "thread_read") {
                    continue;
                }
                out.push(match routes.get(b.server_name()) {
                    Some(_) => Action::SetRead { room_id: room_id.clone(), target: b.clone(), event_id: event_id.clone(), position, thread: Some(root.clone()) },
                    None => Action::Unsupported { room_id: room_id.clone(), target: b.clone(), kind: "thread_read" },
                });
            }
        }
        // A direct chat stays direct: joined siblings list it under the partner in their
        // `m.direct` (the account the partner invited has its own client do that).
        if let Some(partner) = room.direct_partner(&person.accounts, &views.bot_user_id) {
            for b in &joined {
                let own_invite = room.direct_invites.get(*b).is_some_and(|(inviter, _)| inviter == partner);
                if own_invite || room.direct_marked.contains_key(*b) || room.direct_failed.contains_key(*b) || unsupported(b, "direct") || busy(b) {
                    continue;
                }
                out.push(match routes.get(b.server_name()) {
                    Some(_) => Action::MarkDirect { room_id: room_id.clone(), target: (*b).clone(), partner: partner.clone() },
                    None => Action::Unsupported { room_id: room_id.clone(), target: (*b).clone(), kind: "direct" },
                });
            }
        }
        let sibling_joined = !joined.is_empty();
        for b in &person.accounts {
            let sibling_left = room.sibling_left_after(b, &person.accounts);
            let blocked = room.blocked_actions.get(b).is_some_and(|a| a.kind != "read");
            if blocked || room.pending_actions.contains_key(b) || decided.borrow().contains(b) {
                continue;
            }
            let route = routes.get(b.server_name());
            match room.membership(b) {
                Some("invite") if sibling_joined && !sibling_left => match route {
                    Some(r) if r.auto_join && person.auto_join => out.push(Action::Join { room_id: room_id.clone(), target: b.clone() }),
                    Some(_) => {}
                    None if !unsupported(b, "join") => out.push(Action::Unsupported { room_id: room_id.clone(), target: b.clone(), kind: "join" }),
                    None => {}
                },
                Some("join") | Some("invite") if sibling_left => match route {
                    Some(r) if r.mirror_leave => out.push(Action::Leave { room_id: room_id.clone(), target: b.clone() }),
                    Some(_) => {}
                    None if !unsupported(b, "leave") => out.push(Action::Unsupported { room_id: room_id.clone(), target: b.clone(), kind: "leave" }),
                    None => {}
                },
                _ => {}
            }
        }
    }
}

/// A read position: (depth, origin_server_ts).
type Position = (Option<u64>, Option<u64>);

/// The joined accounts behind the furthest read among them in `receipts`, with that read:
/// (account, event, position).
fn reads_behind<'a>(joined: &[&'a OwnedUserId], receipts: &'a BTreeMap<OwnedUserId, Receipt>) -> Vec<(&'a OwnedUserId, &'a OwnedEventId, Position)> {
    let best = joined
        .iter()
        .filter_map(|a| receipts.get(*a))
        .filter(|r| r.depth.is_some() || r.event_ts.is_some())
        .fold(None::<&Receipt>, |best, r| match best {
            Some(b) if !position_after(r.position(), b.position()) => Some(b),
            _ => Some(r),
        });
    let Some(best) = best else { return Vec::new() };
    let position = best.position();
    joined
        .iter()
        .filter(|b| receipts.get(**b).is_none_or(|r| r.is_before(position)))
        .map(|b| (*b, &best.event_id, position))
        .collect()
}

fn decide_room(views: &Views, routes: &Routes, room_id: &OwnedRoomId, room: &RoomView, out: &mut Vec<Action>) {
    let on_invite = routes.invite_siblings == InviteSiblings::OnInvite;
    for (person_id, person) in persons_in(views, room_id, room, |m| m == "join" || (on_invite && m == "invite")) {
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
    let partner = views.directory.persons.get(person).and_then(|p| room.direct_partner(&p.accounts, &views.bot_user_id)).cloned();
    Some(Action::Invite { room_id: room_id.clone(), target: target.clone(), person: person.to_owned(), partner })
}

#[cfg(test)]
mod tests;

/// Accounts to show online because a sibling is online (presence follows the person, where
/// a homeserver's registration enables it). Only "online" spreads, so there is no loop:
/// the siblings' own "online" changes nothing.
pub fn decide_presence(views: &Views, enabled: &std::collections::BTreeSet<OwnedServerName>) -> Vec<OwnedUserId> {
    let mut out = Vec::new();
    for person in views.directory.persons.values().filter(|p| !p.opted_out) {
        let online = person.accounts.iter().any(|a| views.presence.get(a).map(String::as_str) == Some("online"));
        if !online {
            continue;
        }
        for a in &person.accounts {
            if enabled.contains(a.server_name()) && views.presence.get(a).map(String::as_str) != Some("online") {
                out.push(a.clone());
            }
        }
    }
    out
}
