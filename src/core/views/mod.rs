//! Views folded from the log: per room its version, the bot's membership, current state,
//! forward extremities, members and latest read receipts. `apply` cannot fail and does no
//! I/O, so a view rebuilt by replaying the whole log equals the view folded incrementally.
//!
//! Current state here follows the accepted events in log order. Forks are not yet resolved
//! with state resolution: that arrives with the auth work of issue 3.

pub mod directory;
pub mod room_state;

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomVersionId};
use serde::{Deserialize, Serialize};

use self::{directory::Directory, room_state::RoomState};
use super::log_entry::{ClientEventEntry, Entry, LogRecord, PduEntry, PduStatus};

/// Whether a membership event sent at `ts` is older than the latest one folded, sent at
/// `known` ([`RoomView::member_ts`]): the one rule for folding and for the push check.
/// Without both times it is not.
pub fn older_membership(known: Option<u64>, ts: Option<u64>) -> bool {
    matches!((known, ts), (Some(known), Some(ts)) if ts < known)
}

/// Format version of the stored views snapshot; bump to force a rebuild.
pub const VIEWS_FORMAT: u16 = 9;

/// The parts of `m.room.power_levels` fedlink decides with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerLevels {
    /// The power levels event.
    pub event_id: Option<OwnedEventId>,
    /// Explicit user levels.
    pub users: BTreeMap<OwnedUserId, i64>,
    /// Level of users not listed.
    pub users_default: i64,
    /// Level needed to invite.
    pub invite: i64,
}

impl PowerLevels {
    /// Parse the content of a power levels event (integers or numeric strings).
    pub fn from_content(event_id: Option<OwnedEventId>, content: &serde_json::Value) -> Self {
        let num = |v: &serde_json::Value| v.as_i64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
        let users = content
            .get("users")
            .and_then(|u| u.as_object())
            .map(|m| m.iter().filter_map(|(k, v)| Some((ruma::UserId::parse(k).ok()?, num(v)?))).collect())
            .unwrap_or_default();
        Self {
            event_id,
            users,
            users_default: content.get("users_default").and_then(num).unwrap_or(0),
            invite: content.get("invite").and_then(num).unwrap_or(0),
        }
    }

    /// A user's level.
    pub fn level(&self, user: &OwnedUserId) -> i64 {
        self.users.get(user).copied().unwrap_or(self.users_default)
    }
}

/// An invite fedlink signed and has yet to deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInvite {
    /// The invite event id.
    pub event_id: OwnedEventId,
    /// The signed event, sent as is on every attempt.
    pub event: serde_json::Value,
}

/// Why fedlink did not invite an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteFailure {
    /// What went wrong.
    pub reason: String,
    /// For missing power: the power levels event that denied it.
    pub power_levels_event: Option<OwnedEventId>,
}

/// The bot's membership in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BotMembership {
    /// Invited; the join has not completed.
    Invited {
        /// Whose server to join through.
        inviter: OwnedUserId,
        /// The invite.
        invite_event_id: OwnedEventId,
    },
    /// Joined.
    Joined,
    /// Not in the room: fedlink knows the room only from application-service pushes.
    Absent,
    /// fedlink gave up joining (until a new invite or an admin request).
    JoinFailed {
        /// Whose server the join went through.
        inviter: OwnedUserId,
        /// The invite.
        invite_event_id: OwnedEventId,
        /// Why it was given up.
        reason: String,
    },
    /// Left, kicked or banned.
    Left {
        /// The membership that removed the bot (`leave` or `ban`).
        membership: String,
    },
}

/// A user's latest read receipt in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The event read up to.
    pub event_id: OwnedEventId,
    /// Receipt type (`m.read`).
    pub receipt_type: String,
    /// The receipt's timestamp.
    pub ts: Option<u64>,
    /// Log position of the receipt.
    pub seq: u64,
    /// Depth of the event (orders read positions; `None` when fedlink lacks the event).
    #[serde(default)]
    pub depth: Option<u64>,
    /// The event's `origin_server_ts` as its homeserver reports it: the fallback order
    /// where fedlink does not hold the event.
    #[serde(default)]
    pub event_ts: Option<u64>,
}

/// Whether read position `a` is strictly after `b`: by depth in the room DAG where both are
/// known, else by the events' timestamps as the homeservers report them.
pub fn position_after(a: (Option<u64>, Option<u64>), b: (Option<u64>, Option<u64>)) -> bool {
    match (a, b) {
        ((Some(x), _), (Some(y), _)) => x > y,
        ((_, Some(x)), (_, Some(y))) => x > y,
        ((Some(_), _) | (_, Some(_)), (None, None)) => true,
        _ => false,
    }
}

impl Receipt {
    /// Where this read sits.
    pub fn position(&self) -> (Option<u64>, Option<u64>) {
        (self.depth, self.event_ts)
    }

    /// Whether a read at `pos` is strictly further in the room than this one.
    pub fn is_before(&self, pos: (Option<u64>, Option<u64>)) -> bool {
        position_after(pos, self.position())
    }
}

/// One room as fedlink sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomView {
    /// Room version.
    pub version: RoomVersionId,
    /// The bot's membership.
    pub bot: BotMembership,
    /// Current state: (type, state key) -> event id.
    pub state: RoomState,
    /// Forward extremities (events with no known successor).
    pub extremities: BTreeSet<OwnedEventId>,
    /// Current membership of every user with a member event.
    pub members: BTreeMap<OwnedUserId, String>,
    /// Latest read receipt per user.
    pub receipts: BTreeMap<OwnedUserId, Receipt>,
    /// Number of PDUs of this room in the log (all statuses).
    pub event_count: u64,
    /// Highest depth seen among accepted events.
    pub max_depth: u64,
    /// The resident server the bot joined through.
    pub joined_via: Option<OwnedServerName>,
    /// Current power levels (None: no power levels event).
    #[serde(default)]
    pub power: Option<PowerLevels>,
    /// Invites fedlink authored that are not delivered yet: target -> event.
    #[serde(default)]
    pub pending_invites: BTreeMap<OwnedUserId, PendingInvite>,
    /// Invites fedlink could not send: target -> why.
    #[serde(default)]
    pub failed_invites: BTreeMap<OwnedUserId, InviteFailure>,
    /// Actions fedlink asked homeservers to perform, not confirmed yet: user -> action.
    #[serde(default)]
    pub pending_actions: BTreeMap<OwnedUserId, super::log_entry::UserAction>,
    /// Actions that failed or no route supports: user -> action (not retried until the
    /// situation changes).
    #[serde(default)]
    pub blocked_actions: BTreeMap<OwnedUserId, super::log_entry::UserAction>,
    /// Users whose current `leave` they sent themselves (not a kick), with the log position
    /// of that leave (mirror-leave only follows a leave newer than the sibling's membership).
    #[serde(default)]
    pub left_by_self: BTreeMap<OwnedUserId, u64>,
    /// Log position of each user's current membership.
    #[serde(default)]
    pub member_seq: BTreeMap<OwnedUserId, u64>,
    /// In rooms known from registrations only: the `origin_server_ts` of the latest
    /// membership event folded for each user ([`ClientEventEntry::membership_ts`]). A
    /// membership event older than that is stale and ignored: Synapse pushes its whole
    /// history to the first registration it is given (its push position stands still
    /// while it has none), possibly after fedlink caught up on the account.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub member_ts: BTreeMap<OwnedUserId, u64>,
    /// The bot's signed join not yet confirmed by `send_join`: (version, event).
    #[serde(default)]
    pub signed_join: Option<(RoomVersionId, serde_json::Value)>,
    /// Kinds of action no route supports for a user (recorded once, visible to operators).
    #[serde(default)]
    pub unsupported: BTreeMap<OwnedUserId, BTreeSet<String>>,
    /// Reads within threads, by the thread's root event (a thread read never moves the
    /// main timeline's receipts above).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub threads: BTreeMap<OwnedEventId, ThreadReads>,
    /// Direct-chat invites (`is_direct` in the invite) of accounts invited or joined:
    /// invited account -> (inviter, log position of the first such invite).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub direct_invites: BTreeMap<OwnedUserId, (OwnedUserId, u64)>,
    /// Accounts whose `m.direct` fedlink wrote for this room: account -> partner.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub direct_marked: BTreeMap<OwnedUserId, OwnedUserId>,
    /// Accounts whose `m.direct` could not be written: account -> why (not retried).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub direct_failed: BTreeMap<OwnedUserId, String>,
    /// The bot's direct chat with one account (the bot was invited with `is_direct`):
    /// the bot answers commands here, and fedlink never syncs anyone into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_chat: Option<BotChat>,
}

/// Commands waiting for the bot's answer in one chat; beyond, new ones are ignored (a
/// flood costs fedlink at most this much per chat).
pub const MAX_PENDING_COMMANDS: usize = 20;

/// The bot's direct chat with one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotChat {
    /// Who opened it: the account that invited the bot with `is_direct`.
    pub owner: OwnedUserId,
    /// Accepted only as a chat (the owner may not invite the bot to other rooms): never a
    /// synced room, whoever joins it.
    #[serde(default)]
    pub chat_only: bool,
    /// Commands the owner sent and the bot has not handled yet: log position -> event.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub commands: BTreeMap<u64, OwnedEventId>,
    /// What the bot told here already, once each: (room, reason).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub told: BTreeSet<(OwnedRoomId, String)>,
    /// The owner has sent a command here: from then on the room stays a chat.
    #[serde(default)]
    pub used: bool,
}

impl BotChat {
    /// Whether the bot told this chat about `about` for `reason` already.
    pub fn told_about(&self, about: &OwnedRoomId, reason: &str) -> bool {
        self.told.iter().any(|(a, r)| a == about && r == reason)
    }

    /// Whether the bot recorded `reason` about the chat itself (`encrypted`, `leave_failed`).
    pub fn said(&self, reason: &str) -> bool {
        self.told.iter().any(|(_, r)| r == reason)
    }
}

/// Where a read is: the event, its position, the receipt's time and log position.
struct ReadAt<'a> {
    event_id: &'a OwnedEventId,
    pos: (Option<u64>, Option<u64>),
    ts: Option<u64>,
    seq: u64,
}

/// Threads with reads kept per room; beyond, the thread read longest ago is forgotten.
pub const MAX_THREADS_PER_ROOM: usize = 256;

/// The reads of one thread: per user, forward only within the thread.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadReads {
    /// Latest read receipt per user in this thread.
    #[serde(default)]
    pub receipts: BTreeMap<OwnedUserId, Receipt>,
    /// Thread reads fedlink asked homeservers to set, not confirmed yet.
    #[serde(default)]
    pub pending: BTreeMap<OwnedUserId, super::log_entry::UserAction>,
    /// Thread reads a homeserver refused (not retried for that event).
    #[serde(default)]
    pub blocked: BTreeMap<OwnedUserId, super::log_entry::UserAction>,
    /// Log position of the last record about this thread (the oldest is forgotten first).
    #[serde(default)]
    pub last_seq: u64,
}

impl ThreadReads {
    /// Move `user`'s read position in this thread forward (never back), and settle a
    /// pending thread read it reaches.
    fn read_up_to(&mut self, user: &OwnedUserId, event_id: &OwnedEventId, pos: (Option<u64>, Option<u64>), ts: Option<u64>, seq: u64) {
        if advance(&mut self.receipts, user, event_id, pos, ts, seq) {
            self.blocked.remove(user);
        }
        self.settle(user);
    }

    fn settle(&mut self, user: &OwnedUserId) {
        if self.pending.get(user).is_some_and(|p| reached(&self.receipts, user, p)) {
            self.pending.remove(user);
        }
    }
}

/// Move `user`'s receipt in `receipts` forward to `event_id` at `pos`; whether it moved.
fn advance(receipts: &mut BTreeMap<OwnedUserId, Receipt>, user: &OwnedUserId, event_id: &OwnedEventId, pos: (Option<u64>, Option<u64>), ts: Option<u64>, seq: u64) -> bool {
    let newer = receipts.get(user).is_none_or(|r| r.is_before(pos));
    if newer {
        let (depth, event_ts) = pos;
        receipts.insert(user.clone(), Receipt { event_id: event_id.clone(), receipt_type: "m.read".into(), ts, seq, depth, event_ts });
    }
    newer
}

/// Whether `user`'s receipt in `receipts` is at or past what read action `p` asked for.
fn reached(receipts: &BTreeMap<OwnedUserId, Receipt>, user: &OwnedUserId, p: &super::log_entry::UserAction) -> bool {
    let asked = (p.depth, p.event_ts);
    receipts.get(user).is_some_and(|r| Some(&r.event_id) == p.event_id.as_ref() || (asked != (None, None) && !r.is_before(asked)))
}

impl RoomView {
    fn new(version: RoomVersionId, bot: BotMembership) -> Self {
        Self {
            version,
            bot,
            state: RoomState::default(),
            extremities: BTreeSet::new(),
            members: BTreeMap::new(),
            receipts: BTreeMap::new(),
            event_count: 0,
            max_depth: 0,
            joined_via: None,
            power: None,
            pending_invites: BTreeMap::new(),
            failed_invites: BTreeMap::new(),
            pending_actions: BTreeMap::new(),
            blocked_actions: BTreeMap::new(),
            left_by_self: BTreeMap::new(),
            member_seq: BTreeMap::new(),
            member_ts: BTreeMap::new(),
            unsupported: BTreeMap::new(),
            signed_join: None,
            threads: BTreeMap::new(),
            direct_invites: BTreeMap::new(),
            direct_marked: BTreeMap::new(),
            direct_failed: BTreeMap::new(),
            bot_chat: None,
        }
    }

    /// The owner of this room as the bot's direct chat, while it is one: the bot and the
    /// owner are joined and nobody else is joined or invited. The bot answers only then.
    pub fn chat_owner(&self, bot: &OwnedUserId) -> Option<&OwnedUserId> {
        let chat = self.bot_chat.as_ref()?;
        (self.bot_joined() && self.membership(&chat.owner) == Some("join") && !self.others_than(bot, &chat.owner)).then_some(&chat.owner)
    }

    /// Whether anyone but `a` and `b` is joined or invited.
    pub fn others_than(&self, a: &OwnedUserId, b: &OwnedUserId) -> bool {
        self.members.iter().any(|(u, m)| u != a && u != b && matches!(m.as_str(), "join" | "invite"))
    }

    /// Whether the bot owes this chat something: a command's answer, (once) the word that
    /// it cannot read encrypted messages, or, when the room is no longer a chat, leaving it.
    pub fn chat_work(&self, bot: &OwnedUserId) -> bool {
        let Some(chat) = &self.bot_chat else { return false };
        if !self.bot_joined() {
            return false;
        }
        match self.chat_owner(bot) {
            // No longer a chat (the owner left, or someone else came in): the bot leaves
            // (unless leaving failed for good).
            None => !chat.said("leave_failed"),
            Some(_) => !chat.commands.is_empty() || (self.encrypted() && !chat.said("encrypted")),
        }
    }

    /// Whether the room is encrypted (`m.room.encryption` in its state).
    pub fn encrypted(&self) -> bool {
        self.state_event("m.room.encryption", "").is_some()
    }

    /// The reads of thread `root`, created when absent (forgetting the thread read longest
    /// ago beyond [`MAX_THREADS_PER_ROOM`]), as of log position `seq`.
    fn thread(&mut self, root: &OwnedEventId, seq: u64) -> &mut ThreadReads {
        if !self.threads.contains_key(root) && self.threads.len() >= MAX_THREADS_PER_ROOM {
            let oldest = self.threads.iter().min_by_key(|(id, t)| (t.last_seq, (*id).clone())).map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                self.threads.remove(&id);
            }
        }
        let t = self.threads.entry(root.clone()).or_default();
        t.last_seq = t.last_seq.max(seq);
        t
    }

    /// A read by `user` (see [`ReadAt`]): in thread `thread`, or the main timeline; folded
    /// at log position `rec_seq`.
    fn read_in(&mut self, thread: Option<&OwnedEventId>, user: &OwnedUserId, at: ReadAt<'_>, rec_seq: u64) {
        let ReadAt { event_id, pos, ts, seq } = at;
        match thread {
            None => self.read_up_to(user, event_id, pos, ts, seq),
            Some(root) => self.thread(root, rec_seq).read_up_to(user, event_id, pos, ts, seq),
        }
    }

    /// Move `user`'s read position forward to `event_id` at `depth` (never back).
    pub fn read_up_to(&mut self, user: &OwnedUserId, event_id: &OwnedEventId, pos: (Option<u64>, Option<u64>), ts: Option<u64>, seq: u64) {
        if advance(&mut self.receipts, user, event_id, pos, ts, seq) {
            self.blocked_actions.retain(|u, a| u != user || a.kind != "read");
        }
        // A read at or past what fedlink asked for settles the request, whether or not it
        // moved the user's position (the echo of a read the user already passed).
        self.settle_read(user);
    }

    /// Drop `user`'s pending read action if their read position is at or past it.
    fn settle_read(&mut self, user: &OwnedUserId) {
        let Some(p) = self.pending_actions.get(user).filter(|p| p.kind == "read") else { return };
        if reached(&self.receipts, user, p) {
            self.pending_actions.remove(user);
        }
    }

    /// The partner of a direct chat for a person with `accounts`: the one who invited one
    /// of them with `is_direct` (not a sibling, not `bot`). The first such invite wins.
    pub fn direct_partner(&self, accounts: &BTreeSet<OwnedUserId>, bot: &OwnedUserId) -> Option<&OwnedUserId> {
        accounts
            .iter()
            .filter_map(|a| self.direct_invites.get(a))
            .filter(|(inviter, _)| !accounts.contains(inviter) && inviter != bot)
            .min_by_key(|(_, seq)| *seq)
            .map(|(inviter, _)| inviter)
    }

    /// Whether any thread has a pending read.
    fn thread_reads_pending(&self) -> bool {
        self.threads.values().any(|t| !t.pending.is_empty())
    }

    /// Replace the current state (and members and power levels) with `state`.
    pub fn set_state(&mut self, state: &[super::log_entry::StateRef], power_levels: Option<&serde_json::Value>) {
        self.state.clear();
        self.members.clear();
        for s in state {
            self.state.insert(s.event_type.clone(), s.state_key.clone(), s.event_id.clone());
            if let (Some(m), Ok(user)) = (&s.membership, ruma::UserId::parse(&s.state_key)) {
                self.members.insert(user, m.clone());
            }
        }
        let pl_id = state.iter().find(|s| s.event_type == "m.room.power_levels" && s.state_key.is_empty()).map(|s| s.event_id.clone());
        self.power = power_levels.map(|c| PowerLevels::from_content(pl_id, c));
    }

    /// A user's current membership (`None` if they have no member event).
    pub fn membership(&self, user: &OwnedUserId) -> Option<&str> {
        self.members.get(user).map(String::as_str)
    }

    /// Whether a membership event of `user` sent at `ts` is older than the one behind the
    /// membership folded (see [`RoomView::member_ts`]). Without both times it is not.
    pub fn stale_membership(&self, user: &OwnedUserId, ts: Option<u64>) -> bool {
        older_membership(self.member_ts.get(user).copied(), ts)
    }

    /// Users whose membership is `join`.
    pub fn joined_members(&self) -> impl Iterator<Item = &OwnedUserId> {
        self.members.iter().filter(|(_, m)| m.as_str() == "join").map(|(u, _)| u)
    }

    /// Servers with at least one joined member, sorted.
    pub fn joined_servers(&self) -> BTreeSet<OwnedServerName> {
        self.joined_members().map(|u| u.server_name().to_owned()).collect()
    }

    /// The current state event for (`event_type`, `state_key`).
    pub fn state_event(&self, event_type: &str, state_key: &str) -> Option<&OwnedEventId> {
        self.state.get(event_type, state_key)
    }

    /// Whether the bot is joined.
    pub fn bot_joined(&self) -> bool {
        self.bot == BotMembership::Joined
    }
}

/// All views, with the log position they have folded up to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Views {
    /// Snapshot format version.
    pub format: u16,
    /// The bot's user id (membership changes of this user move [`RoomView::bot`]).
    pub bot_user_id: OwnedUserId,
    /// Highest log sequence number folded in.
    pub folded_seq: u64,
    /// Rooms by id.
    pub rooms: BTreeMap<OwnedRoomId, RoomView>,
    /// Linked identities.
    #[serde(default)]
    pub directory: Directory,
    /// Latest presence per user (`online`, `unavailable`, `offline`).
    #[serde(default)]
    pub presence: BTreeMap<OwnedUserId, String>,
    /// What folding changed since the reconciler last looked: it decides for these rooms
    /// only. Not persisted: views loaded or rebuilt start with everything touched.
    #[serde(skip)]
    pub touched: Touched,
    /// Rooms changed since the last checkpoint: a checkpoint writes these only. Not
    /// persisted: views loaded or rebuilt start with everything unsaved.
    #[serde(skip)]
    pub unsaved: Touched,
    /// Rooms changed since the in-step pass last looked ([`crate::core::step::StepCache`]).
    /// Not persisted: views loaded or rebuilt start with everything touched.
    #[serde(skip)]
    pub step_touched: Touched,
    /// Which rooms are in which state, kept in step by folding so that workers never scan
    /// every room. Not persisted: rebuilt when views are loaded.
    #[serde(skip)]
    pub index: RoomIndex,
}

/// Rooms by the bot's membership and by pending work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomIndex {
    /// Rooms the bot is joined to.
    pub joined: BTreeSet<OwnedRoomId>,
    /// Rooms the bot is invited to and joining, with the inviter (whose server it joins through).
    pub joining: BTreeMap<OwnedRoomId, OwnedUserId>,
    /// Rooms whose join was given up.
    pub join_failed: BTreeSet<OwnedRoomId>,
    /// Rooms with pending invites or actions.
    pub pending: BTreeSet<OwnedRoomId>,
    /// The bot's direct chats by owner.
    pub chats: BTreeMap<OwnedUserId, BTreeSet<OwnedRoomId>>,
    /// The owner of each direct chat (to keep [`RoomIndex::chats`] right when it changes).
    pub chat_owner: BTreeMap<OwnedRoomId, OwnedUserId>,
    /// Chats where the bot owes an answer.
    pub chat_work: BTreeSet<OwnedRoomId>,
}

impl RoomIndex {
    fn update(&mut self, id: &OwnedRoomId, room: Option<&RoomView>) {
        let bot = room.map(|r| &r.bot);
        set_in(&mut self.joined, id, matches!(bot, Some(BotMembership::Joined)));
        set_in(&mut self.join_failed, id, matches!(bot, Some(BotMembership::JoinFailed { .. })));
        match bot {
            Some(BotMembership::Invited { inviter, .. }) => {
                self.joining.insert(id.clone(), inviter.clone());
            }
            _ => {
                self.joining.remove(id);
            }
        }
        set_in(&mut self.pending, id, room.is_some_and(|r| !r.pending_invites.is_empty() || !r.pending_actions.is_empty() || r.thread_reads_pending()));
        let owner = room.and_then(|r| r.bot_chat.as_ref()).map(|c| &c.owner);
        if self.chat_owner.get(id) != owner {
            if let Some(old) = self.chat_owner.remove(id) {
                if let Some(set) = self.chats.get_mut(&old) {
                    set.remove(id);
                    if set.is_empty() {
                        self.chats.remove(&old);
                    }
                }
            }
            if let Some(o) = owner {
                self.chat_owner.insert(id.clone(), o.clone());
                self.chats.entry(o.clone()).or_default().insert(id.clone());
            }
        }
    }

    /// Update [`RoomIndex::chat_work`] for room `id` (needs the bot's id, so apart from
    /// [`RoomIndex::update`]).
    fn update_chat(&mut self, id: &OwnedRoomId, room: Option<&RoomView>, bot: &OwnedUserId) {
        set_in(&mut self.chat_work, id, room.is_some_and(|r| r.chat_work(bot)));
    }
}

fn set_in(set: &mut BTreeSet<OwnedRoomId>, id: &OwnedRoomId, member: bool) {
    if member {
        if !set.contains(id) {
            set.insert(id.clone());
        }
    } else {
        set.remove(id);
    }
}

/// Views are equal when what they show is: the bookkeeping of what changed since the last
/// pass or checkpoint is not part of it (a replay equals incremental folding).
impl PartialEq for Views {
    fn eq(&self, other: &Self) -> bool {
        self.format == other.format
            && self.bot_user_id == other.bot_user_id
            && self.folded_seq == other.folded_seq
            && self.rooms == other.rooms
            && self.directory == other.directory
            && self.presence == other.presence
    }
}

impl Eq for Views {}

/// The part of [`Views`] a checkpoint writes whole (rooms are written one by one).
#[derive(Debug, Serialize, Deserialize)]
pub struct ViewsMeta {
    /// Snapshot format version.
    pub format: u16,
    /// The bot's user id.
    pub bot_user_id: OwnedUserId,
    /// Highest log sequence number folded in.
    pub folded_seq: u64,
    /// Linked identities.
    pub directory: Directory,
    /// Latest presence per user.
    pub presence: BTreeMap<OwnedUserId, String>,
}

impl Views {
    /// The non-room part, for a checkpoint.
    pub fn meta(&self) -> ViewsMeta {
        ViewsMeta {
            format: self.format,
            bot_user_id: self.bot_user_id.clone(),
            folded_seq: self.folded_seq,
            directory: self.directory.clone(),
            presence: self.presence.clone(),
        }
    }

    /// Views from a checkpoint: its non-room part and its rooms.
    pub fn from_parts(meta: ViewsMeta, rooms: BTreeMap<OwnedRoomId, RoomView>) -> Self {
        Views {
            format: meta.format,
            bot_user_id: meta.bot_user_id,
            folded_seq: meta.folded_seq,
            rooms,
            directory: meta.directory,
            presence: meta.presence,
            touched: Touched::default(),
            unsaved: Touched::none(),
            step_touched: Touched::default(),
            index: RoomIndex::default(),
        }
        .reindexed()
    }

    /// These views with [`Views::index`] rebuilt from every room (after loading).
    pub fn reindexed(mut self) -> Self {
        let mut index = RoomIndex::default();
        for (id, r) in &self.rooms {
            index.update(id, Some(r));
            index.update_chat(id, Some(r), &self.bot_user_id);
        }
        self.index = index;
        self
    }
}

/// Rooms whose decisions may have changed since the reconciler last ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touched {
    /// Every room (a directory change, or fresh views).
    pub all: bool,
    /// These rooms.
    pub rooms: BTreeSet<OwnedRoomId>,
}

impl Default for Touched {
    fn default() -> Self {
        Touched { all: true, rooms: BTreeSet::new() }
    }
}

impl Touched {
    /// Nothing touched.
    pub fn none() -> Self {
        Touched { all: false, rooms: BTreeSet::new() }
    }

    /// Whether nothing was touched.
    pub fn is_empty(&self) -> bool {
        !self.all && self.rooms.is_empty()
    }
}

impl Views {
    /// Empty views for `bot_user_id`.
    pub fn new(bot_user_id: OwnedUserId) -> Self {
        Self {
            format: VIEWS_FORMAT,
            bot_user_id,
            folded_seq: 0,
            rooms: BTreeMap::new(),
            directory: Directory::default(),
            presence: BTreeMap::new(),
            touched: Touched::default(),
            unsaved: Touched::default(),
            step_touched: Touched::default(),
            index: RoomIndex::default(),
        }
    }

    /// Fold one record. Records at or below `folded_seq` are ignored, so folding is idempotent.
    pub fn apply(&mut self, rec: &LogRecord) {
        if rec.seq <= self.folded_seq {
            return;
        }
        self.folded_seq = rec.seq;
        if let crate::core::log_entry::Scope::Room(r) = rec.entry.scope() {
            let r = r.clone();
            self.apply_entry(rec);
            self.index.update(&r, self.rooms.get(&r));
            self.index.update_chat(&r, self.rooms.get(&r), &self.bot_user_id);
        } else {
            self.apply_entry(rec);
        }
    }

    fn apply_entry(&mut self, rec: &LogRecord) {
        match rec.entry.scope() {
            crate::core::log_entry::Scope::Room(r) => {
                if !self.touched.all {
                    self.touched.rooms.insert(r.clone());
                }
                if !self.unsaved.all {
                    self.unsaved.rooms.insert(r.clone());
                }
                if !self.step_touched.all {
                    self.step_touched.rooms.insert(r.clone());
                }
            }
            crate::core::log_entry::Scope::Everything => {
                self.touched = Touched::default();
                self.step_touched = Touched::default();
            }
            _ => {}
        }
        match &rec.entry {
            Entry::Pdu(p) => self.apply_pdu(p, rec.seq),
            Entry::Receipt(r) => {
                // The main timeline's reads and each thread's are kept apart: a thread read
                // never moves the main timeline, nor a main read a thread.
                // Threads are kept for linked accounts only (what a peer can make fedlink
                // keep stays bounded), at most MAX_THREADS_PER_ROOM per room.
                let linked = self.directory.by_account.contains_key(&r.user_id);
                if let Some(room) = self.rooms.get_mut(&r.room_id).filter(|_| r.receipt_type == "m.read") {
                    let pos = (r.depth, r.event_ts);
                    match r.thread_id.as_deref() {
                        None | Some("main") => room.read_up_to(&r.user_id, &r.event_id, pos, r.ts, rec.seq),
                        // A thread id that is not an event id reads nothing.
                        Some(t) => {
                            if let (Ok(root), true) = (OwnedEventId::try_from(t), linked) {
                                room.read_in(Some(&root), &r.user_id, ReadAt { event_id: &r.event_id, pos, ts: r.ts, seq: rec.seq }, rec.seq);
                            }
                        }
                    }
                }
            }
            Entry::Typing(_) => {}
            Entry::Presence(p) => {
                self.presence.insert(p.user_id.clone(), p.presence.clone());
            }
            Entry::BotInvited(i) => {
                let invited =
                    BotMembership::Invited { inviter: i.inviter.clone(), invite_event_id: i.event_id.clone() };
                // A direct-chat invite makes the room the bot's chat with the inviter (until
                // the join shows others in it, for an invite from an allowed inviter).
                let chat = i.direct.map(|d| BotChat {
                    owner: i.inviter.clone(),
                    chat_only: d == super::log_entry::DirectInvite::ChatOnly,
                    commands: BTreeMap::new(),
                    told: BTreeSet::new(),
                    used: false,
                });
                match self.rooms.get_mut(&i.room_id) {
                    // A re-invite after leaving starts a new membership; an invite while
                    // joined changes nothing.
                    Some(room) if !room.bot_joined() => {
                        room.bot = invited;
                        room.signed_join = None;
                        room.bot_chat = chat;
                    }
                    Some(_) => {}
                    None => {
                        let mut room = RoomView::new(i.room_version.clone(), invited);
                        room.bot_chat = chat;
                        self.rooms.insert(i.room_id.clone(), room);
                    }
                }
            }
            Entry::CommandHandled(c) => {
                if let Some(chat) = self.rooms.get_mut(&c.room_id).and_then(|r| r.bot_chat.as_mut()) {
                    chat.commands.retain(|_, e| *e != c.event_id);
                }
            }
            Entry::BotTold(t) => {
                if let Some(chat) = self.rooms.get_mut(&t.room_id).and_then(|r| r.bot_chat.as_mut()) {
                    chat.told.insert((t.about.clone(), t.reason.clone()));
                }
            }
            Entry::LinkRequested(l) => {
                // Expired requests go as new ones come (by the record's time: replay folds
                // the same way), so they never pile up.
                self.directory.link_requests.retain(|_, r| r.expires_ms > rec.at_ms);
                self.directory.link_requests.insert(l.from.clone(), l.clone());
            }
            Entry::LinkClosed(l) => {
                self.directory.link_requests.remove(&l.from);
            }
            Entry::ActionPending(a) => {
                if let Some(room) = self.rooms.get_mut(&a.room_id) {
                    match a.thread_read_root() {
                        Some(root) => {
                            let thread = room.thread(root, rec.seq);
                            thread.pending.insert(a.user_id.clone(), a.clone());
                            thread.settle(&a.user_id);
                        }
                        None => {
                            room.pending_actions.insert(a.user_id.clone(), a.clone());
                            // The user may have read past it between the decision and this record.
                            room.settle_read(&a.user_id);
                        }
                    }
                }
            }
            Entry::ActionFailed(a) => {
                if let Some(room) = self.rooms.get_mut(&a.room_id) {
                    match (a.thread_read_root(), a.kind.as_str()) {
                        (Some(root), _) => {
                            let thread = room.thread(root, rec.seq);
                            thread.pending.remove(&a.user_id);
                            thread.blocked.insert(a.user_id.clone(), a.clone());
                        }
                        (_, "direct") => {
                            if room.pending_actions.get(&a.user_id).is_some_and(|p| p.kind == "direct") {
                                room.pending_actions.remove(&a.user_id);
                            }
                            room.direct_failed.insert(a.user_id.clone(), a.reason.clone().unwrap_or_default());
                        }
                        _ => {
                            room.pending_actions.remove(&a.user_id);
                            room.blocked_actions.insert(a.user_id.clone(), a.clone());
                        }
                    }
                }
            }
            Entry::ActionDone(a) => {
                if let Some(room) = self.rooms.get_mut(&a.room_id) {
                    if room.pending_actions.get(&a.user_id).is_some_and(|p| p.kind == a.kind) {
                        room.pending_actions.remove(&a.user_id);
                    }
                    if let (Some(partner), "direct") = (&a.partner, a.kind.as_str()) {
                        room.direct_marked.insert(a.user_id.clone(), partner.clone());
                    }
                }
            }
            Entry::ActionUnsupported(a) => {
                if let Some(room) = self.rooms.get_mut(&a.room_id) {
                    room.unsupported.entry(a.user_id.clone()).or_default().insert(a.kind.clone());
                }
            }
            Entry::ClientEvent(c) => self.apply_client_event(c, rec.seq, rec.at_ms),
            Entry::BotJoinFailed(f) => {
                if let Some(room) = self.rooms.get_mut(&f.room_id) {
                    if let BotMembership::Invited { inviter, invite_event_id } = &room.bot {
                        room.bot = BotMembership::JoinFailed { inviter: inviter.clone(), invite_event_id: invite_event_id.clone(), reason: f.reason.clone() };
                        room.signed_join = None;
                    }
                }
            }
            Entry::BotJoinRetry(r) => {
                if let Some(room) = self.rooms.get_mut(&r.room_id) {
                    if let BotMembership::JoinFailed { inviter, invite_event_id, .. } = &room.bot {
                        room.bot = BotMembership::Invited { inviter: inviter.clone(), invite_event_id: invite_event_id.clone() };
                    }
                }
            }
            Entry::BotJoinSigned(j) => {
                if let Some(room) = self.rooms.get_mut(&j.room_id) {
                    room.signed_join = j.event.clone().map(|e| (j.room_version.clone(), e));
                }
            }
            Entry::PersonSet(p) => {
                // Accounts no longer linked: work fedlink had pending for them is cancelled.
                let dropped: Vec<OwnedUserId> = match self.directory.persons.get(&p.person) {
                    Some(old) => old.accounts.iter().filter(|a| !p.accounts.contains(a)).cloned().collect(),
                    None => Vec::new(),
                };
                self.cancel_pending(&dropped, None);
                self.directory.apply_set(p);
            }
            Entry::PersonRemoved(p) => {
                let accounts: Vec<OwnedUserId> = self.directory.persons.get(&p.person).map(|x| x.accounts.iter().cloned().collect()).unwrap_or_default();
                self.cancel_pending(&accounts, None);
                self.directory.apply_removed(p);
            }
            Entry::OptOut(o) => {
                if o.opted_out {
                    let accounts: Vec<OwnedUserId> = self.directory.persons.get(&o.person).map(|x| x.accounts.iter().cloned().collect()).unwrap_or_default();
                    self.cancel_pending(&accounts, o.room_id.as_ref());
                }
                self.directory.apply_opt_out(o);
            }
            Entry::PersonSettings(s) => self.directory.apply_settings(s),
            Entry::CaughtUp(c) => self.directory.apply_caught_up(&c.account),
            Entry::InvitePending(i) => {
                if let Some(room) = self.rooms.get_mut(&i.room_id) {
                    room.pending_invites
                        .insert(i.target.clone(), PendingInvite { event_id: i.event_id.clone(), event: i.event.clone() });
                    room.failed_invites.remove(&i.target);
                }
            }
            Entry::InviteFailed(f) => {
                if let Some(room) = self.rooms.get_mut(&f.room_id) {
                    room.pending_invites.remove(&f.target);
                    room.failed_invites.insert(
                        f.target.clone(),
                        InviteFailure { reason: f.reason.clone(), power_levels_event: f.power_levels_event.clone() },
                    );
                }
            }
            Entry::BotJoined(j) => {
                let room = self
                    .rooms
                    .entry(j.room_id.clone())
                    .or_insert_with(|| RoomView::new(j.room_version.clone(), BotMembership::Joined));
                room.version = j.room_version.clone();
                room.bot = BotMembership::Joined;
                room.signed_join = None;
                room.joined_via = Some(j.via.clone());
                room.extremities.clear();
                // The room's PDUs are the truth from now on.
                room.member_ts.clear();
                room.set_state(&j.state, j.power_levels.as_ref());
                // A direct invite into a room with others in it (a direct chat between
                // people that includes the bot) is a normal room, unless it was accepted only
                // as a chat.
                let bot = self.bot_user_id.clone();
                if let Some(chat) = room.bot_chat.as_ref().filter(|c| !c.chat_only) {
                    if room.others_than(&bot, &chat.owner) {
                        room.bot_chat = None;
                    }
                }
                for s in j.state.iter().filter(|s| s.membership.is_some()) {
                    if let Ok(u) = ruma::UserId::parse(&s.state_key) {
                        room.member_seq.insert(u, rec.seq);
                    }
                }
            }
        }
    }

    /// Drop invites and actions fedlink has pending for `accounts` (in `room`, or everywhere):
    /// the person opted out or the account was unlinked.
    fn cancel_pending(&mut self, accounts: &[OwnedUserId], room: Option<&OwnedRoomId>) {
        if accounts.is_empty() {
            return;
        }
        for (id, r) in self.rooms.iter_mut() {
            if room.is_some_and(|only| only != id) {
                continue;
            }
            let before = (r.pending_invites.len(), r.pending_actions.len());
            let threads_before: usize = r.threads.values().map(|t| t.pending.len()).sum();
            for a in accounts {
                r.pending_invites.remove(a);
                r.pending_actions.remove(a);
                for t in r.threads.values_mut() {
                    t.pending.remove(a);
                }
            }
            // An invite as a sibling is pending under its target's id.
            r.pending_actions.retain(|_, act| !act.actor.as_ref().is_some_and(|x| accounts.contains(x)));
            if (r.pending_invites.len(), r.pending_actions.len()) != before || threads_before != r.threads.values().map(|t| t.pending.len()).sum::<usize>() {
                if !self.unsaved.all {
                    self.unsaved.rooms.insert(id.clone());
                }
                self.index.update(id, Some(r));
            }
        }
    }

    fn apply_pdu(&mut self, p: &PduEntry, seq: u64) {
        let bot = self.bot_user_id.clone();
        let Some(room) = self.rooms.get_mut(&p.room_id) else { return };
        room.event_count += 1;
        if p.status != PduStatus::Accepted {
            return;
        }
        room.max_depth = room.max_depth.max(p.depth);
        // A text message from the owner of the bot's chat is a command for the bot.
        if p.event_type == "m.room.message" && p.state_key.is_none() && room.chat_owner(&bot) == Some(&p.sender) {
            let text = p.pdu.get("content").and_then(|c| c.get("msgtype")).and_then(serde_json::Value::as_str) == Some("m.text");
            if let Some(chat) = room.bot_chat.as_mut().filter(|c| text && c.commands.len() < MAX_PENDING_COMMANDS) {
                chat.commands.insert(seq, p.event_id.clone());
                chat.used = true;
            }
        }
        let thread = crate::core::log_entry::thread_root(&p.pdu);
        // Receipts that arrived before their event get its place in the room now; one on a
        // reply in a thread was a read of that thread (of a linked account), not of the
        // main timeline.
        let early: Vec<OwnedUserId> = room.receipts.iter().filter(|(_, r)| r.depth.is_none() && r.event_id == p.event_id).map(|(u, _)| u.clone()).collect();
        for user in early {
            match &thread {
                None => {
                    if let Some(r) = room.receipts.get_mut(&user) {
                        r.depth = Some(p.depth);
                    }
                }
                Some(root) => {
                    let Some(r) = room.receipts.remove(&user) else { continue };
                    if self.directory.by_account.contains_key(&user) {
                        room.read_in(Some(root), &user, ReadAt { event_id: &r.event_id, pos: (Some(p.depth), r.event_ts), ts: r.ts, seq: r.seq }, seq);
                    }
                }
            }
        }
        for t in room.threads.values_mut() {
            for r in t.receipts.values_mut().filter(|r| r.depth.is_none() && r.event_id == p.event_id) {
                r.depth = Some(p.depth);
            }
        }
        // Sending counts as reading up to the event sent: in its thread, for a reply in one.
        if p.state_key.is_none() && (thread.is_none() || self.directory.by_account.contains_key(&p.sender)) {
            room.read_in(thread.as_ref(), &p.sender, ReadAt { event_id: &p.event_id, pos: (Some(p.depth), Some(p.origin_server_ts)), ts: Some(p.origin_server_ts), seq: 0 }, seq);
        }
        for prev in p.prev_events.iter().chain(&p.superseded) {
            room.extremities.remove(prev);
        }
        room.extremities.insert(p.event_id.clone());
        if let Some(resolved) = &p.resolved_state {
            // A fork resolved: every membership the resolution changed has its effects
            // (settled invites and actions, self-leaves), like a plain membership event.
            let new_members: BTreeMap<OwnedUserId, (String, OwnedEventId)> = resolved
                .state
                .iter()
                .filter_map(|s| Some((ruma::UserId::parse(&s.state_key).ok()?, (s.membership.clone()?, s.event_id.clone()))))
                .collect();
            for (user, (m, event_id)) in &new_members {
                if room.members.get(user) == Some(m) && room.state_event("m.room.member", user.as_str()) == Some(event_id) {
                    continue;
                }
                // Only this event's sender is known; a resolution to another event is
                // treated as not self-sent (no mirror-leave from it).
                let sender = (*event_id == p.event_id).then_some(&p.sender);
                room.apply_membership(user.clone(), m, sender, seq);
            }
            room.set_state(&resolved.state, resolved.power_levels.as_ref());
            if let Some(m) = room.members.get(&bot).cloned() {
                if m == "join" {
                    room.bot = BotMembership::Joined;
                } else if room.bot_joined() && matches!(m.as_str(), "leave" | "ban") {
                    room.bot = BotMembership::Left { membership: m };
                }
            }
            return;
        }
        let Some(state_key) = &p.state_key else { return };
        room.state.insert(p.event_type.clone(), state_key.clone(), p.event_id.clone());
        if p.event_type == "m.room.power_levels" && state_key.is_empty() {
            let content = p.pdu.get("content").cloned().unwrap_or_default();
            room.power = Some(PowerLevels::from_content(Some(p.event_id.clone()), &content));
        }
        if let (Some(m), Ok(user)) = (&p.membership, ruma::UserId::parse(state_key)) {
            if user == bot {
                match m.as_str() {
                    "join" => room.bot = BotMembership::Joined,
                    "leave" | "ban" if room.bot_joined() => room.bot = BotMembership::Left { membership: m.clone() },
                    _ => {}
                }
            }
            if m == "invite" && p.pdu.get("content").and_then(|c| c.get("is_direct")).and_then(serde_json::Value::as_bool) == Some(true) {
                room.direct_invites.entry(user.clone()).or_insert((p.sender.clone(), seq));
            }
            // A direct room between people that includes the bot, whose other invites came
            // after the bot joined: a normal room, if nobody used it as a chat yet.
            if let Some(chat) = room.bot_chat.as_ref().filter(|c| !c.chat_only && !c.used) {
                if user != bot && user != chat.owner && matches!(m.as_str(), "join" | "invite") {
                    room.bot_chat = None;
                }
            }
            room.apply_membership(user, m, Some(&p.sender), seq);
        }
    }

    fn apply_client_event(&mut self, c: &ClientEventEntry, seq: u64, at_ms: u64) {
        let room = self
            .rooms
            .entry(c.room_id.clone())
            .or_insert_with(|| RoomView::new(RoomVersionId::try_from("unknown").expect("a valid room version string"), BotMembership::Absent));
        // Where the bot is in the room, its verified PDUs are the truth.
        if room.bot_joined() {
            return;
        }
        if let (Some(m), Some(Ok(user))) = (&c.membership, c.state_key.as_deref().map(ruma::UserId::parse)) {
            let ts = c.membership_ts(at_ms);
            if room.stale_membership(&user, ts) {
                return;
            }
            // Only a change of membership moves the time (the push check drops the rest).
            if let Some(ts) = ts.filter(|_| room.membership(&user) != Some(m.as_str())) {
                room.member_ts.insert(user.clone(), ts);
            }
            if m == "invite" && c.is_direct {
                room.direct_invites.entry(user.clone()).or_insert((c.sender.clone(), seq));
            }
            room.apply_membership(user, m, Some(&c.sender), seq);
        } else if c.state_key.is_none() && c.origin_server_ts.is_some() {
            // Sending counts as reading, ordered by the homeserver's timestamp: in its
            // thread, for a reply in one.
            room.read_in(c.thread_root.as_ref(), &c.sender, ReadAt { event_id: &c.event_id, pos: (None, c.origin_server_ts), ts: c.origin_server_ts, seq: 0 }, seq);
        }
    }
}

impl RoomView {
    /// A membership change of `user` to `m`, sent by `sender` (when known), at log position
    /// `seq`.
    fn apply_membership(&mut self, user: OwnedUserId, m: &str, sender: Option<&OwnedUserId>, seq: u64) {
        // A profile change (join to join) or a repeated invite changes no membership: it
        // neither settles nor starts anything, and does not reset the membership's age.
        if self.members.get(&user).is_some_and(|old| old == m) {
            return;
        }
        // A membership event for the target settles any invite fedlink had pending,
        // and any join, leave or invite it asked for.
        self.pending_invites.remove(&user);
        if self.pending_actions.get(&user).is_some_and(|a| a.kind != "read") {
            self.pending_actions.remove(&user);
        }
        self.blocked_actions.retain(|u, a| *u != user || a.kind == "read");
        if m == "leave" && sender == Some(&user) && self.members.get(&user).is_some_and(|old| old == "join") {
            self.left_by_self.insert(user.clone(), seq);
        } else {
            self.left_by_self.remove(&user);
        }
        if m != "leave" {
            self.failed_invites.remove(&user);
        }
        if matches!(m, "leave" | "ban") {
            // A rejected or ended direct chat names no partner any more.
            self.direct_invites.remove(&user);
        }
        self.member_seq.insert(user.clone(), seq);
        self.members.insert(user, m.to_owned());
    }

    /// Whether a sibling of `user` among `accounts` left by itself after `user`'s current
    /// membership began (so `user` should follow it out). A leave older than `user`'s
    /// membership (the person came back, or was invited again) does not count.
    pub fn sibling_left_after(&self, user: &OwnedUserId, accounts: &BTreeSet<OwnedUserId>) -> bool {
        let since = self.member_seq.get(user).copied().unwrap_or(0);
        accounts.iter().any(|a| a != user && self.left_by_self.get(a).is_some_and(|left| *left > since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::log_entry::{BotInvited, BotJoined, ReceiptEntry, StateRef};

    fn id(s: &str) -> OwnedEventId {
        s.try_into().unwrap()
    }
    fn rec(seq: u64, entry: Entry) -> LogRecord {
        LogRecord { v: 1, seq, at_ms: 0, entry }
    }
    fn pdu(event: &str, prev: &[&str], state: Option<(&str, &str, Option<&str>)>) -> Entry {
        Entry::Pdu(PduEntry {
            room_id: "!r:kiwi".try_into().unwrap(),
            event_id: id(event),
            via: "kiwi".try_into().unwrap(),
            status: PduStatus::Accepted,
            event_type: state.map(|s| s.0).unwrap_or("m.room.message").into(),
            state_key: state.map(|s| s.1.to_owned()),
            sender: "@a:kiwi".try_into().unwrap(),
            membership: state.and_then(|s| s.2.map(String::from)),
            prev_events: prev.iter().map(|p| id(p)).collect(),
            depth: 1,
            origin_server_ts: 0,
            pdu: serde_json::json!({}),
            resolved_state: None,
            superseded: Vec::new(),
        })
    }

    pub(crate) fn sample_log() -> Vec<LogRecord> {
        let room: OwnedRoomId = "!r:kiwi".try_into().unwrap();
        vec![
            rec(1, Entry::BotInvited(BotInvited {
                room_id: room.clone(),
                room_version: RoomVersionId::V12,
                event_id: id("$inv"),
                inviter: "@a:kiwi".try_into().unwrap(),
                event: serde_json::json!({}),
                direct: None,
            })),
            rec(2, Entry::BotJoined(BotJoined {
                room_id: room.clone(),
                room_version: RoomVersionId::V12,
                join_event_id: id("$join"),
                via: "kiwi".try_into().unwrap(),
                state: vec![
                    StateRef { event_type: "m.room.create".into(), state_key: "".into(), event_id: id("$c"), membership: None },
                    StateRef { event_type: "m.room.member".into(), state_key: "@a:kiwi".into(), event_id: id("$ma"), membership: Some("join".into()) },
                ],
                power_levels: None,
            })),
            rec(3, pdu("$join", &["$ma"], Some(("m.room.member", "@fedlink:fl", Some("join"))))),
            rec(4, pdu("$m1", &["$join"], None)),
            rec(5, Entry::Receipt(ReceiptEntry {
                origin: "kiwi".try_into().unwrap(),
                room_id: room.clone(),
                receipt_type: "m.read".into(),
                user_id: "@a:kiwi".try_into().unwrap(),
                event_id: id("$m1"),
                ts: Some(9),
                thread_id: None,
                thread_inferred: false,
                depth: Some(1),
                event_ts: None,
                via_appservice: None,
            })),
            rec(6, pdu("$m2", &["$m1"], None)),
            rec(7, pdu("$mb", &["$m2"], Some(("m.room.member", "@b:litchi", Some("join"))))),
        ]
    }

    #[test]
    fn given_join_and_messages_then_state_members_extremities_receipts() {
        let mut v = Views::new("@fedlink:fl".try_into().unwrap());
        for r in sample_log() {
            v.apply(&r);
        }
        let room = &v.rooms[&OwnedRoomId::try_from("!r:kiwi").unwrap()];
        assert!(room.bot_joined());
        assert_eq!(room.extremities, BTreeSet::from([id("$mb")]));
        let joined: Vec<_> = room.joined_members().map(|u| u.as_str()).collect();
        assert_eq!(joined, vec!["@a:kiwi", "@b:litchi", "@fedlink:fl"]);
        assert_eq!(room.receipts[&OwnedUserId::try_from("@a:kiwi").unwrap()].event_id, id("$m1"));
        assert_eq!(room.event_count, 4);
        assert_eq!(v.folded_seq, 7);
    }

    /// Replay == incremental, from any checkpoint: folding a prefix, snapshotting through
    /// serde, and folding the rest gives the same views as one full fold; re-folding a
    /// record already folded changes nothing.
    #[test]
    fn replay_equals_incremental_from_every_checkpoint() {
        let log = sample_log();
        let mut full = Views::new("@fedlink:fl".try_into().unwrap());
        log.iter().for_each(|r| full.apply(r));
        for cut in 0..=log.len() {
            let mut v = Views::new("@fedlink:fl".try_into().unwrap());
            log[..cut].iter().for_each(|r| v.apply(r));
            let mut v: Views = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
            log.iter().for_each(|r| v.apply(r));
            assert_eq!(v, full, "checkpoint at {cut}");
        }
    }

    #[test]
    fn bot_kicked_is_left() {
        let mut v = Views::new("@fedlink:fl".try_into().unwrap());
        let mut log = sample_log();
        log.push(rec(8, pdu("$kick", &["$mb"], Some(("m.room.member", "@fedlink:fl", Some("leave"))))));
        log.iter().for_each(|r| v.apply(r));
        let room = &v.rooms[&OwnedRoomId::try_from("!r:kiwi").unwrap()];
        assert_eq!(room.bot, BotMembership::Left { membership: "leave".into() });
    }
}
