//! The records of the event log: the one source of truth. Every PDU fedlink accepted, every
//! EDU it acts on, and every change to the bot's membership is one [`Entry`].
//!
//! The stored format is an API: records carry a format version ([`LOG_FORMAT`]) and entries
//! are tagged by `kind`, so old logs keep loading as the set of kinds grows. In memory a PDU
//! entry holds the few derived fields views need (room, type, state key, membership, ...)
//! next to the full PDU; on disk (format 2) it leaves out those its PDU gives, and folding
//! reads them from the PDU's top-level fields (not its signatures, hashes or auth events).

use ruma::{OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomVersionId};
use serde::{Deserialize, Serialize};

use super::pdu::Pdu;

/// The current record format version: 2 since PDU entries leave out the fields their signed
/// PDU gives (see [`PduEntry`]); format 1 records read as before.
pub const LOG_FORMAT: u16 = 2;

/// One stored log record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Format version of this record.
    pub v: u16,
    /// Global sequence number, dense from 1.
    pub seq: u64,
    /// When it was appended (ms since the epoch), supplied by the store.
    pub at_ms: u64,
    /// What happened.
    pub entry: Entry,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// A PDU fedlink accepted (or soft-failed, or stored as an outlier).
    Pdu(PduEntry),
    /// A read receipt from a federation EDU.
    Receipt(ReceiptEntry),
    /// A typing notification.
    Typing(TypingEntry),
    /// A presence update.
    Presence(PresenceEntry),
    /// The bot was invited to a room.
    BotInvited(BotInvited),
    /// The bot's join completed; carries the room state at the join.
    BotJoined(BotJoined),
    /// fedlink signed the bot's join event and is about to send it (or gave it up: `event`
    /// absent). Retries send this same event, so a crash cannot make the bot join twice.
    BotJoinSigned(BotJoinSigned),
    /// fedlink gave up joining a room (a permanent failure, or too many transient ones); a
    /// new invite or an admin request starts again.
    BotJoinFailed(BotJoinFailed),
    /// An admin asked fedlink to try a given-up join again.
    BotJoinRetry(BotJoinRetry),
    /// A person's set of linked accounts was set (created or replaced).
    PersonSet(PersonSet),
    /// A person was unlinked (removed from the directory).
    PersonRemoved(PersonRemoved),
    /// A person opted out of (or back into) syncing, everywhere or in one room.
    OptOut(OptOut),
    /// A room event a homeserver pushed through fedlink's registration (rooms the bot is
    /// not in): trusted as that homeserver's account of its room.
    ClientEvent(ClientEventEntry),
    /// A person's settings changed.
    PersonSettings(PersonSettings),
    /// fedlink built and signed an invite for a linked account; delivery is pending.
    InvitePending(InvitePending),
    /// An invite fedlink wanted to send could not be sent.
    InviteFailed(InviteFailed),
    /// fedlink asked a homeserver to act for a user (read marker, join, leave).
    ActionPending(UserAction),
    /// Such an action failed for good.
    ActionFailed(UserAction),
    /// An action no route can perform for that user's homeserver (no registration).
    ActionUnsupported(UserAction),
    /// An action the homeserver did that no later event confirms (an `m.direct` entry
    /// written): it is settled by this record.
    ActionDone(UserAction),
    /// An account asked, in its direct chat with the bot, to be linked with another
    /// account (`link <mxid>`); the other account confirms with the code.
    LinkRequested(LinkRequested),
    /// A link request ended: confirmed, replaced, withdrawn or refused.
    LinkClosed(LinkClosed),
    /// The bot answered (or dropped) a command sent in its direct chat.
    CommandHandled(CommandHandled),
    /// The bot told the owner of a direct chat about something, once (a problem in a
    /// room, or that it cannot read encrypted messages).
    BotTold(BotTold),
    /// A linked account caught up, through its homeserver's registration, on the rooms it
    /// had joined, was invited to or had left before fedlink could see it (logged after
    /// the memberships found). Until then fedlink invites it nowhere as a sibling.
    CaughtUp(CaughtUp),
}

/// `link_requested`: `from` wants to be linked with `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRequested {
    /// The account that asked (in its direct chat with the bot).
    pub from: OwnedUserId,
    /// The account that must confirm.
    pub to: OwnedUserId,
    /// SHA-256 of the confirmation code (hex): the code itself is only told to `from`.
    pub code_sha256: String,
    /// When the request expires (ms since the epoch).
    pub expires_ms: u64,
}

/// `link_closed`: the request `from` made ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkClosed {
    /// The account that asked.
    pub from: OwnedUserId,
    /// Why: `confirmed`, `replaced`, `refused`.
    pub outcome: String,
}

/// `command_handled`: the command `event_id` in the bot's direct chat `room_id` is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandHandled {
    /// The direct chat.
    pub room_id: OwnedRoomId,
    /// The command's event.
    pub event_id: OwnedEventId,
    /// The parsed command (`status`, `link`, ...; `unknown`, `dropped`).
    pub command: String,
    /// The bot's answer, when it could send one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<OwnedEventId>,
}

/// `bot_told`: the bot told its direct chat `room_id` about `about` for `reason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotTold {
    /// The direct chat.
    pub room_id: OwnedRoomId,
    /// The room the message was about (the direct chat itself for `encrypted`).
    pub about: OwnedRoomId,
    /// `missing_power`, `no_registration`, `refused`, `encrypted`.
    pub reason: String,
}

/// `caught_up`: `account` caught up on its memberships (see [`Entry::CaughtUp`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaughtUp {
    /// The linked account.
    pub account: OwnedUserId,
    /// Memberships logged by the catch-up (join, invite, leave and ban).
    #[serde(default)]
    pub memberships: u64,
    /// fedlink gave up asking (the homeserver failed too often): the account's siblings
    /// are invited without knowing what it left before the registration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gave_up: bool,
}

/// Where a directory change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkSource {
    /// `[[directory.person]]` in the config.
    Config,
    /// The admin API.
    Admin,
    /// The HTTP directory.
    Http,
    /// The person themselves, through the bot (`link` confirmed by the other account).
    /// Config, admin and HTTP directory links win over these.
    #[serde(rename = "self")]
    SelfService,
}

impl LinkSource {
    /// As stored and shown (`config`, `admin`, `http`, `self`).
    pub fn label(self) -> &'static str {
        match self {
            LinkSource::Config => "config",
            LinkSource::Admin => "admin",
            LinkSource::Http => "http",
            LinkSource::SelfService => "self",
        }
    }
}

/// A person's accounts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonSet {
    /// The person's id.
    pub person: String,
    /// All of the person's accounts.
    pub accounts: Vec<OwnedUserId>,
    /// Who made the change.
    pub source: LinkSource,
}

/// A person removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonRemoved {
    /// The person's id.
    pub person: String,
    /// Who made the change.
    pub source: LinkSource,
}

/// A room event pushed by a homeserver's application-service registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientEventEntry {
    /// The homeserver that pushed it.
    pub via: OwnedServerName,
    /// The room.
    pub room_id: OwnedRoomId,
    /// The event.
    pub event_id: OwnedEventId,
    /// Its sender.
    pub sender: OwnedUserId,
    /// Its type.
    pub event_type: String,
    /// Its state key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_key: Option<String>,
    /// `content.membership` of member events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<String>,
    /// `origin_server_ts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_server_ts: Option<u64>,
    /// `content.is_direct` of an invite: a direct-chat invite.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_direct: bool,
    /// For a send that is a reply in a thread: the thread's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_root: Option<OwnedEventId>,
}

/// How far ahead of fedlink's clock a membership event's time is believed
/// ([`ClientEventEntry::membership_ts`]).
pub const MEMBERSHIP_CLOCK_AHEAD_MS: u64 = 5 * 60 * 1000;

impl ClientEventEntry {
    /// For a membership event, its `origin_server_ts`: one account's membership events in
    /// one room are ordered by it where fedlink cannot see the room's DAG (this assumes the
    /// homeservers' clocks agree to within the time between one account's membership
    /// changes in one room). A time further ahead of `at_ms` (when fedlink received or
    /// logged it) than [`MEMBERSHIP_CLOCK_AHEAD_MS`] counts as that bound: a server that
    /// stamps an event in the future cannot make later memberships look stale.
    pub fn membership_ts(&self, at_ms: u64) -> Option<u64> {
        self.membership.as_ref().and(self.origin_server_ts).map(|t| t.min(at_ms.saturating_add(MEMBERSHIP_CLOCK_AHEAD_MS)))
    }
}

/// A person's sync settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonSettings {
    /// The person's id.
    pub person: String,
    /// Join invited accounts automatically (default on).
    pub auto_join: bool,
}

/// Opting out of syncing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptOut {
    /// The person's id.
    pub person: String,
    /// One room, or every room when absent.
    #[serde(default)]
    pub room_id: Option<OwnedRoomId>,
    /// True to opt out, false to opt back in.
    pub opted_out: bool,
}

/// An invite fedlink authored, not yet accepted by the target's server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvitePending {
    /// The room.
    pub room_id: OwnedRoomId,
    /// The invited account.
    pub target: OwnedUserId,
    /// The invite event id.
    pub event_id: OwnedEventId,
    /// The signed invite event, sent as is on every retry.
    pub event: serde_json::Value,
}

/// Why fedlink could not invite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InviteFailed {
    /// The room.
    pub room_id: OwnedRoomId,
    /// The account fedlink wanted to invite.
    pub target: OwnedUserId,
    /// What went wrong.
    pub reason: String,
    /// For a lack of power: the power levels event that denied it (retried when it changes).
    #[serde(default)]
    pub power_levels_event: Option<OwnedEventId>,
}

/// How a stored PDU relates to the room's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PduStatus {
    /// Passed every check; part of the room's timeline and state.
    Accepted,
    /// Authorised by its auth events but not by the current state: kept, not applied.
    SoftFailed,
    /// Known (state or auth chain from a join) but not part of the live timeline.
    Outlier,
}

/// A PDU in the log. `P` is how the signed PDU is held: the whole JSON, except when decoded
/// for folding (see [`LogRecord::decode_for_fold`]).
///
/// Stored compactly (format 2): a derived field (`room_id`, `event_type`, `state_key`,
/// `sender`, `membership`, `prev_events`, `depth`, `origin_server_ts`) is left out of the
/// record when the signed PDU gives the same value, and a reader takes it from the PDU. A
/// field that differs is written (`null` for an absent `state_key` or `membership` the PDU
/// would give), so every entry reads back as it was written; records of format 1, which
/// carry every field, read as before.
#[derive(Debug, Clone, PartialEq)]
pub struct PduEntry<P = serde_json::Value> {
    /// The room.
    pub room_id: OwnedRoomId,
    /// The event id.
    pub event_id: OwnedEventId,
    /// The server that delivered it to fedlink.
    pub via: OwnedServerName,
    /// Its status.
    pub status: PduStatus,
    /// `type`.
    pub event_type: String,
    /// `state_key`, for state events.
    pub state_key: Option<String>,
    /// `sender`.
    pub sender: OwnedUserId,
    /// `content.membership` for member events.
    pub membership: Option<String>,
    /// `prev_events`.
    pub prev_events: Vec<OwnedEventId>,
    /// `depth`.
    pub depth: u64,
    /// `origin_server_ts`.
    pub origin_server_ts: u64,
    /// The signed PDU.
    pub pdu: P,
    /// When accepting this event changed the room's current state other than by the event
    /// itself (a fork resolved with state resolution): the whole new current state.
    pub resolved_state: Option<ResolvedState>,
    /// Forward extremities this event supersedes: it closed a gap fedlink could not fill
    /// event by event (its state came from `/state_ids` at the gap and was resolved against
    /// the room's), so the room moves on from here.
    pub superseded: Vec<OwnedEventId>,
}

/// The derived fields of a [`PduEntry`] as its signed PDU gives them (`None`: the PDU does
/// not give that field in the form the entry holds it).
struct FromPdu<'a> {
    room_id: Option<&'a str>,
    event_type: Option<&'a str>,
    state_key: Option<Option<&'a str>>,
    sender: Option<&'a str>,
    membership: Option<Option<&'a str>>,
    /// The PDU's `prev_events` when every one is a string.
    prev_events: Option<&'a [serde_json::Value]>,
    depth: Option<u64>,
    origin_server_ts: Option<u64>,
}

impl<'a> FromPdu<'a> {
    /// Read through `get`, the signed PDU's top-level fields: what
    /// [`crate::core::pdu::Pdu`] parses them to (`membership` is `content.membership` of an
    /// `m.room.member` event when that is a string, else none).
    fn read(get: impl Fn(&str) -> Option<&'a serde_json::Value>) -> Self {
        let string = |k: &str| get(k).and_then(serde_json::Value::as_str);
        let optional = |v: Option<&'a serde_json::Value>| match v {
            None => Some(None),
            Some(serde_json::Value::String(s)) => Some(Some(s.as_str())),
            Some(_) => None,
        };
        let event_type = string("type");
        let membership = event_type.map(|t| match t {
            "m.room.member" => get("content").and_then(|c| c.get("membership")).and_then(serde_json::Value::as_str),
            _ => None,
        });
        FromPdu {
            room_id: string("room_id"),
            event_type,
            state_key: optional(get("state_key")),
            sender: string("sender"),
            membership,
            prev_events: get("prev_events").and_then(serde_json::Value::as_array).filter(|a| a.iter().all(serde_json::Value::is_string)).map(Vec::as_slice),
            depth: get("depth").and_then(serde_json::Value::as_u64),
            origin_server_ts: get("origin_server_ts").and_then(serde_json::Value::as_u64),
        }
    }
}

/// A stored signed PDU: what a reader derives an entry's left-out fields from.
trait SignedPdu {
    fn derived(&self) -> FromPdu<'_>;
}

impl SignedPdu for serde_json::Value {
    fn derived(&self) -> FromPdu<'_> {
        FromPdu::read(|k| self.get(k))
    }
}

impl Serialize for PduEntry<serde_json::Value> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let d = self.pdu.derived();
        let mut st = ser.serialize_struct("PduEntry", 14)?;
        if d.room_id != Some(self.room_id.as_str()) {
            st.serialize_field("room_id", &self.room_id)?;
        }
        st.serialize_field("event_id", &self.event_id)?;
        st.serialize_field("via", &self.via)?;
        st.serialize_field("status", &self.status)?;
        if d.event_type != Some(self.event_type.as_str()) {
            st.serialize_field("event_type", &self.event_type)?;
        }
        if d.state_key != Some(self.state_key.as_deref()) {
            st.serialize_field("state_key", &self.state_key)?;
        }
        if d.sender != Some(self.sender.as_str()) {
            st.serialize_field("sender", &self.sender)?;
        }
        if d.membership != Some(self.membership.as_deref()) {
            st.serialize_field("membership", &self.membership)?;
        }
        let same_prev = d.prev_events.is_some_and(|p| p.len() == self.prev_events.len() && p.iter().zip(&self.prev_events).all(|(a, b)| a.as_str() == Some(b.as_str())));
        if !same_prev {
            st.serialize_field("prev_events", &self.prev_events)?;
        }
        if d.depth != Some(self.depth) {
            st.serialize_field("depth", &self.depth)?;
        }
        if d.origin_server_ts != Some(self.origin_server_ts) {
            st.serialize_field("origin_server_ts", &self.origin_server_ts)?;
        }
        st.serialize_field("pdu", &self.pdu)?;
        if let Some(r) = &self.resolved_state {
            st.serialize_field("resolved_state", r)?;
        }
        if !self.superseded.is_empty() {
            st.serialize_field("superseded", &self.superseded)?;
        }
        st.end()
    }
}

/// A stored PDU entry as written: derived fields may be left out (format 2).
#[derive(Deserialize)]
struct StoredPduEntry<P> {
    #[serde(default)]
    room_id: Option<OwnedRoomId>,
    event_id: OwnedEventId,
    via: OwnedServerName,
    status: PduStatus,
    #[serde(default)]
    event_type: Option<String>,
    #[serde(default, deserialize_with = "present")]
    state_key: Option<Option<String>>,
    #[serde(default)]
    sender: Option<OwnedUserId>,
    #[serde(default, deserialize_with = "present")]
    membership: Option<Option<String>>,
    #[serde(default)]
    prev_events: Option<Vec<OwnedEventId>>,
    #[serde(default)]
    depth: Option<u64>,
    #[serde(default)]
    origin_server_ts: Option<u64>,
    pdu: P,
    #[serde(default)]
    resolved_state: Option<ResolvedState>,
    #[serde(default)]
    superseded: Vec<OwnedEventId>,
}

/// A field that is there, `null` included (`Some(None)`); `#[serde(default)]` makes an
/// absent one `None`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl<P: SignedPdu> StoredPduEntry<P> {
    /// The entry, each left-out field taken from the signed PDU.
    fn complete<E: serde::de::Error>(self) -> Result<PduEntry<P>, E> {
        let id = self.event_id.as_str();
        let d = self.pdu.derived();
        let owned = |s: &str| Ok(s.to_owned());
        let room_id = stored_or_pdu(id, "room_id", self.room_id, d.room_id, OwnedRoomId::try_from)?;
        let sender = stored_or_pdu(id, "sender", self.sender, d.sender, OwnedUserId::try_from)?;
        // `FromPdu::read` keeps `prev_events` only when every one is a string.
        let prev_events = stored_or_pdu(id, "prev_events", self.prev_events, d.prev_events, |p| {
            p.iter().map(|e| OwnedEventId::try_from(e.as_str().expect("prev_events filtered to strings"))).collect()
        })?;
        let event_type = stored_or_pdu(id, "event_type", self.event_type, d.event_type, owned)?;
        let state_key = stored_or_pdu(id, "state_key", self.state_key, d.state_key, |k| Ok(k.map(str::to_owned)))?;
        let membership = stored_or_pdu(id, "membership", self.membership, d.membership, |m| Ok(m.map(str::to_owned)))?;
        let depth = stored_or_pdu(id, "depth", self.depth, d.depth, Ok)?;
        let origin_server_ts = stored_or_pdu(id, "origin_server_ts", self.origin_server_ts, d.origin_server_ts, Ok)?;
        Ok(PduEntry {
            room_id,
            event_id: self.event_id,
            via: self.via,
            status: self.status,
            event_type,
            state_key,
            sender,
            membership,
            prev_events,
            depth,
            origin_server_ts,
            pdu: self.pdu,
            resolved_state: self.resolved_state,
            superseded: self.superseded,
        })
    }
}

/// A PDU entry's field `field`: the stored value, else the signed PDU's converted, else an
/// error naming the field and the event.
fn stored_or_pdu<T, U, E: serde::de::Error>(
    id: &str,
    field: &str,
    stored: Option<T>,
    from_pdu: Option<U>,
    convert: impl FnOnce(U) -> Result<T, ruma::IdParseError>,
) -> Result<T, E> {
    match (stored, from_pdu) {
        (Some(v), _) => Ok(v),
        (None, Some(d)) => convert(d).map_err(|e| E::custom(format!("PDU entry {id}: the signed PDU's `{field}`: {e}"))),
        (None, None) => Err(E::custom(format!("PDU entry {id}: no `{field}`, and its signed PDU does not give one"))),
    }
}

impl<'de, P: SignedPdu + Deserialize<'de>> Deserialize<'de> for PduEntry<P> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        StoredPduEntry::<P>::deserialize(d)?.complete()
    }
}

/// A room's current state after state resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedState {
    /// Every state entry.
    pub state: Vec<StateRef>,
    /// Content of its power levels event, if any.
    #[serde(default)]
    pub power_levels: Option<serde_json::Value>,
}

/// The thread an event (its JSON, or a PDU decoded for folding) belongs to: the root of
/// its content's `m.thread` relation, if any.
pub fn thread_root(event: &serde_json::Value) -> Option<OwnedEventId> {
    let rel = event.get("content")?.get("m.relates_to")?;
    if rel.get("rel_type")?.as_str()? != "m.thread" {
        return None;
    }
    rel.get("event_id")?.as_str()?.try_into().ok()
}

/// What folding into views reads of a signed PDU: its `content`, and the fields a compact
/// entry leaves out (not its signatures, hashes or auth events).
#[derive(Deserialize)]
struct ContentOnly {
    #[serde(default)]
    content: Option<serde_json::Value>,
    #[serde(default)]
    room_id: Option<serde_json::Value>,
    #[serde(default, rename = "type")]
    event_type: Option<serde_json::Value>,
    #[serde(default)]
    state_key: Option<serde_json::Value>,
    #[serde(default)]
    sender: Option<serde_json::Value>,
    #[serde(default)]
    prev_events: Option<serde_json::Value>,
    #[serde(default)]
    depth: Option<serde_json::Value>,
    #[serde(default)]
    origin_server_ts: Option<serde_json::Value>,
}

impl SignedPdu for ContentOnly {
    fn derived(&self) -> FromPdu<'_> {
        FromPdu::read(|k| match k {
            "content" => self.content.as_ref(),
            "room_id" => self.room_id.as_ref(),
            "type" => self.event_type.as_ref(),
            "state_key" => self.state_key.as_ref(),
            "sender" => self.sender.as_ref(),
            "prev_events" => self.prev_events.as_ref(),
            "depth" => self.depth.as_ref(),
            "origin_server_ts" => self.origin_server_ts.as_ref(),
            _ => None,
        })
    }
}

/// An entry's first `kind`: its tag. (A `user_action` entry has a second `kind` of its own,
/// so the tag cannot be read as an ordinary field.)
fn first_kind(entry: &str) -> serde_json::Result<Option<String>> {
    struct FirstKind;
    impl<'de> serde::de::Visitor<'de> for FirstKind {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a log entry object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kind = None;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == "kind" && kind.is_none() {
                    kind = Some(map.next_value::<String>()?);
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(kind)
        }
    }
    serde::Deserializer::deserialize_map(&mut serde_json::Deserializer::from_str(entry), FirstKind)
}

impl LogRecord {
    /// Decode a stored record for folding into views. The same as deserializing a
    /// [`LogRecord`], except that a PDU entry's `pdu` keeps only `{"content": ...}`: views
    /// read nothing else of it, and parsing the signatures, hashes and references of every
    /// PDU was most of a replay's time. Records so decoded are for folding only.
    pub fn decode_for_fold(bytes: &[u8]) -> serde_json::Result<LogRecord> {
        Self::decode_for_fold_with(bytes, true)
    }

    /// [`LogRecord::decode_for_fold`], with or without the fast split of the record (for the
    /// replay bench's comparison).
    #[doc(hidden)]
    pub fn decode_for_fold_with(bytes: &[u8], split: bool) -> serde_json::Result<LogRecord> {
        // fedlink writes `{"v":..,"seq":..,"at_ms":..,"entry":{..}}`: read the three numbers
        // and take the entry's text as is, instead of scanning the whole record once more
        // (the entry is parsed, and so checked, below). Any other layout takes the general path.
        let (v, seq, at_ms, text) = match split.then(|| split_record(bytes)).flatten() {
            Some(parts) => parts,
            None => {
                let raw: RawRecord = serde_json::from_slice(bytes)?;
                (raw.v, raw.seq, raw.at_ms, raw.entry.get())
            }
        };
        let raw = RawParts { v, seq, at_ms };
        // fedlink writes the tag first: read it from the start when it is there.
        let pdu = if text.starts_with(r#"{"kind":"pdu","#) { true } else { first_kind(text)?.as_deref() == Some("pdu") };
        let entry = if pdu {
            // Not through `Entry`: its tag makes serde buffer the whole entry first.
            let p: PduEntry<ContentOnly> = serde_json::from_str(text)?;
            Entry::Pdu(PduEntry {
                room_id: p.room_id,
                event_id: p.event_id,
                via: p.via,
                status: p.status,
                event_type: p.event_type,
                state_key: p.state_key,
                sender: p.sender,
                membership: p.membership,
                prev_events: p.prev_events,
                depth: p.depth,
                origin_server_ts: p.origin_server_ts,
                pdu: serde_json::json!({ "content": p.pdu.content.unwrap_or(serde_json::Value::Null) }),
                resolved_state: p.resolved_state,
                superseded: p.superseded,
            })
        } else {
            entry_from_str(text)?
        };
        Ok(LogRecord { v: raw.v, seq: raw.seq, at_ms: raw.at_ms, entry })
    }

    /// Decode a stored record: every record fedlink ever wrote (see [`entry_from_str`]).
    pub fn decode(bytes: &[u8]) -> serde_json::Result<LogRecord> {
        let raw: RawRecord = serde_json::from_slice(bytes)?;
        Ok(LogRecord { v: raw.v, seq: raw.seq, at_ms: raw.at_ms, entry: entry_from_str(raw.entry.get())? })
    }
}

/// A record's numbers.
struct RawParts {
    v: u16,
    seq: u64,
    at_ms: u64,
}

/// `{"v":V,"seq":S,"at_ms":T,"entry":E}` as fedlink writes it: (V, S, T, E's text).
fn split_record(bytes: &[u8]) -> Option<(u16, u64, u64, &str)> {
    fn number<'a>(s: &'a str, key: &str) -> Option<(u64, &'a str)> {
        let rest = s.strip_prefix(key)?;
        let end = rest.find(|c: char| !c.is_ascii_digit())?;
        if end == 0 || end > 20 {
            return None;
        }
        Some((rest[..end].parse().ok()?, &rest[end..]))
    }
    let s = std::str::from_utf8(bytes).ok()?;
    let (v, rest) = number(s, "{\"v\":")?;
    let (seq, rest) = number(rest, ",\"seq\":")?;
    let (at_ms, rest) = number(rest, ",\"at_ms\":")?;
    let entry = rest.strip_prefix(",\"entry\":")?.strip_suffix('}')?;
    Some((u16::try_from(v).ok()?, seq, at_ms, entry))
}

#[derive(Deserialize)]
struct RawRecord<'a> {
    v: u16,
    seq: u64,
    at_ms: u64,
    #[serde(borrow)]
    entry: &'a serde_json::value::RawValue,
}

/// Decode a stored entry. Action entries (`action_pending`, `action_failed`,
/// `action_unsupported`) written before their action was stored as `action` carry it as a
/// second `kind` key after the tag, which serde refuses as a duplicate: those are read by
/// taking the first `kind` as the tag and the second as the action.
pub fn entry_from_str(entry: &str) -> serde_json::Result<Entry> {
    let err = match serde_json::from_str(entry) {
        Ok(e) => return Ok(e),
        Err(e) => e,
    };
    let Ok(pairs) = ordered_pairs(entry) else { return Err(err) };
    let kinds = pairs.iter().filter(|(k, _)| k == "kind").count();
    let is_action = pairs.iter().find(|(k, _)| k == "kind").and_then(|(_, v)| v.as_str()).is_some_and(|t| t.starts_with("action_"));
    if kinds != 2 || !is_action || pairs.iter().any(|(k, _)| k == "action") {
        return Err(err);
    }
    let mut seen = false;
    let map: serde_json::Map<String, serde_json::Value> = pairs
        .into_iter()
        .map(|(k, v)| if k == "kind" && std::mem::replace(&mut seen, true) { ("action".to_owned(), v) } else { (k, v) })
        .collect();
    serde_json::from_value(serde_json::Value::Object(map))
}

/// An object's keys and values in order, duplicates kept.
fn ordered_pairs(text: &str) -> serde_json::Result<Vec<(String, serde_json::Value)>> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(String, serde_json::Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(pair) = map.next_entry()? {
                out.push(pair);
            }
            Ok(out)
        }
    }
    serde::Deserializer::deserialize_map(&mut serde_json::Deserializer::from_str(text), Pairs)
}

impl PduEntry {
    /// An accepted `m.room.message` in `!r:kiwi` from `@a:kiwi` at depth 3: the plain
    /// record the storage and node tests append.
    #[cfg(test)]
    pub(crate) fn test_message(event_id: &str) -> Self {
        Self {
            room_id: "!r:kiwi".try_into().unwrap(),
            event_id: event_id.try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            status: PduStatus::Accepted,
            event_type: "m.room.message".into(),
            state_key: None,
            sender: "@a:kiwi".try_into().unwrap(),
            membership: None,
            prev_events: vec![],
            depth: 3,
            origin_server_ts: 1,
            pdu: serde_json::json!({"type": "m.room.message"}),
            resolved_state: None,
            superseded: Vec::new(),
        }
    }

    /// The log entry for `pdu`.
    pub fn new(pdu: &Pdu, via: OwnedServerName, status: PduStatus) -> Self {
        Self {
            room_id: pdu.room_id.clone(),
            event_id: pdu.event_id.clone(),
            via,
            status,
            event_type: pdu.kind.to_string(),
            state_key: pdu.state_key.clone(),
            sender: pdu.sender.clone(),
            membership: pdu.membership(),
            prev_events: pdu.prev_events.clone(),
            depth: pdu.depth,
            origin_server_ts: pdu.origin_server_ts.get().into(),
            pdu: pdu.to_value(),
            resolved_state: None,
            superseded: Vec::new(),
        }
    }
}

/// A read receipt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiptEntry {
    /// The server that sent the EDU (always the user's server).
    pub origin: OwnedServerName,
    /// The room.
    pub room_id: OwnedRoomId,
    /// `m.read` (federation never carries private receipts).
    pub receipt_type: String,
    /// Who read.
    pub user_id: OwnedUserId,
    /// Up to which event.
    pub event_id: OwnedEventId,
    /// The receipt's timestamp, if given.
    #[serde(default)]
    pub ts: Option<u64>,
    /// Thread id, if a threaded receipt: `main`, or the thread's root event. Where the
    /// sender left it out (Synapse's registration pushes drop it) but the event read is in a
    /// thread, fedlink fills in that thread's root and sets `thread_inferred`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    /// `thread_id` was not sent but taken from the event's `m.thread` relation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub thread_inferred: bool,
    /// Depth of the event read up to, when fedlink holds it (orders read positions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u64>,
    /// The event's `origin_server_ts` (the fallback order where fedlink lacks the event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_ts: Option<u64>,
    /// `appservice` when pushed by a homeserver's registration, else federation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_appservice: Option<bool>,
}

/// Something fedlink asked a homeserver to do for one of its users, through the
/// application-service route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAction {
    /// The room.
    pub room_id: OwnedRoomId,
    /// The user acted for.
    pub user_id: OwnedUserId,
    /// `read`, `thread_read`, `join`, `leave`, `invite` or `direct`. Stored as `action`: records written before
    /// that carry it as a second `kind` after the entry's tag (see [`entry_from_str`]).
    #[serde(rename = "action", alias = "kind")]
    pub kind: String,
    /// For `read`: the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<OwnedEventId>,
    /// For reads: the event's timestamp (orders it where fedlink lacks the event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_ts: Option<u64>,
    /// For reads: the event's depth, when fedlink holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u64>,
    /// For invites through the registration route: the sibling account that invites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<OwnedUserId>,
    /// For failures and unsupported actions: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `thread_read`: the thread's root event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<OwnedEventId>,
    /// For `direct`: the partner the room is listed under in `m.direct`; for `invite`: that
    /// the invite is a direct-chat invite from this partner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<OwnedUserId>,
}

impl UserAction {
    /// For a read within a thread: the thread's root. (Such actions are kept per thread,
    /// apart from the one pending action per user and room.)
    pub fn thread_read_root(&self) -> Option<&OwnedEventId> {
        self.thread_id.as_ref().filter(|_| self.kind == "thread_read")
    }

    /// An action of `kind` for `user_id` in `room_id`, with no details yet.
    pub fn new(room_id: OwnedRoomId, user_id: OwnedUserId, kind: &str) -> Self {
        Self { room_id, user_id, kind: kind.into(), event_id: None, event_ts: None, depth: None, actor: None, reason: None, thread_id: None, partner: None }
    }
}

/// A typing notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypingEntry {
    /// The sending server.
    pub origin: OwnedServerName,
    /// The room.
    pub room_id: OwnedRoomId,
    /// Who types.
    pub user_id: OwnedUserId,
    /// Started or stopped.
    pub typing: bool,
}

/// A presence update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// The sending server.
    pub origin: OwnedServerName,
    /// Whose presence.
    pub user_id: OwnedUserId,
    /// `online`, `unavailable` or `offline`.
    pub presence: String,
    /// Milliseconds since last activity, if given.
    #[serde(default)]
    pub last_active_ago: Option<u64>,
}

/// The bot accepted an invite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotInvited {
    /// The room.
    pub room_id: OwnedRoomId,
    /// Its version.
    pub room_version: RoomVersionId,
    /// The invite event id.
    pub event_id: OwnedEventId,
    /// The inviter (the join goes through their server).
    pub inviter: OwnedUserId,
    /// The invite event, countersigned by fedlink.
    pub event: serde_json::Value,
    /// A direct-chat invite (`is_direct`) and on what terms it was accepted. Absent: not a
    /// direct invite, or logged before fedlink had chats (such rooms stay normal rooms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<DirectInvite>,
}

/// On what terms a direct-chat invite of the bot was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectInvite {
    /// From an inviter `bot.invites_from` allows: the bot's chat if only the inviter and the
    /// bot are in the room when it joins, a normal (synced) room otherwise.
    Allowed,
    /// Accepted only as a chat with the bot (`bot.direct_chats`, the inviter is not in
    /// `bot.invites_from`): never synced, whoever is in it.
    ChatOnly,
}

/// The bot's signed join, before `send_join`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotJoinSigned {
    /// The room.
    pub room_id: OwnedRoomId,
    /// Its version.
    pub room_version: RoomVersionId,
    /// The signed join event; absent when the attempt was given up.
    #[serde(default)]
    pub event: Option<serde_json::Value>,
}

/// fedlink gave up joining a room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotJoinFailed {
    /// The room.
    pub room_id: OwnedRoomId,
    /// Why.
    pub reason: String,
}

/// An admin asked to retry a given-up join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotJoinRetry {
    /// The room.
    pub room_id: OwnedRoomId,
}

/// One state entry at the bot's join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRef {
    /// Event type.
    pub event_type: String,
    /// State key.
    pub state_key: String,
    /// The event.
    pub event_id: OwnedEventId,
    /// `content.membership` for member events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<String>,
}

/// The bot's join completed. The state and auth chain events precede this entry in the log
/// as outlier PDUs; the join event itself follows it as an accepted PDU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotJoined {
    /// The room.
    pub room_id: OwnedRoomId,
    /// Its version.
    pub room_version: RoomVersionId,
    /// The bot's join event.
    pub join_event_id: OwnedEventId,
    /// The resident server that handled the join.
    pub via: OwnedServerName,
    /// The room state before the join event.
    pub state: Vec<StateRef>,
    /// Content of the `m.room.power_levels` event in that state, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_levels: Option<serde_json::Value>,
}

/// What a record can change the reconciler's decisions for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Decisions in one room.
    Room(&'a OwnedRoomId),
    /// Any room (directory changes).
    Everything,
    /// No decision (typing, presence: presence is followed on its own path).
    Nothing,
}

impl Entry {
    /// Which decisions folding this record can change.
    pub fn scope(&self) -> Scope<'_> {
        match self {
            Entry::Pdu(e) => Scope::Room(&e.room_id),
            Entry::Receipt(e) => Scope::Room(&e.room_id),
            Entry::Typing(_) | Entry::Presence(_) => Scope::Nothing,
            Entry::BotInvited(e) => Scope::Room(&e.room_id),
            Entry::BotJoined(e) => Scope::Room(&e.room_id),
            Entry::BotJoinSigned(e) => Scope::Room(&e.room_id),
            Entry::BotJoinFailed(e) => Scope::Room(&e.room_id),
            Entry::BotJoinRetry(e) => Scope::Room(&e.room_id),
            Entry::PersonSet(_) | Entry::PersonRemoved(_) | Entry::OptOut(_) | Entry::PersonSettings(_) | Entry::CaughtUp(_) => Scope::Everything,
            Entry::ClientEvent(e) => Scope::Room(&e.room_id),
            Entry::InvitePending(e) => Scope::Room(&e.room_id),
            Entry::InviteFailed(e) => Scope::Room(&e.room_id),
            Entry::ActionPending(e) | Entry::ActionFailed(e) | Entry::ActionUnsupported(e) | Entry::ActionDone(e) => Scope::Room(&e.room_id),
            Entry::CommandHandled(e) => Scope::Room(&e.room_id),
            Entry::BotTold(e) => Scope::Room(&e.room_id),
            Entry::LinkRequested(_) | Entry::LinkClosed(_) => Scope::Nothing,
        }
    }

    /// Whether folding this record can change which rooms the bot is in, invited to or
    /// has given up on (the room gauges).
    pub fn moves_bot(&self) -> bool {
        match self {
            Entry::BotInvited(_) | Entry::BotJoined(_) | Entry::BotJoinFailed(_) | Entry::BotJoinRetry(_) => true,
            Entry::Pdu(p) => p.event_type == "m.room.member" || p.resolved_state.is_some(),
            _ => false,
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Pdu(_) => "pdu",
            Entry::Receipt(_) => "receipt",
            Entry::Typing(_) => "typing",
            Entry::Presence(_) => "presence",
            Entry::BotInvited(_) => "bot_invited",
            Entry::BotJoined(_) => "bot_joined",
            Entry::BotJoinSigned(_) => "bot_join_signed",
            Entry::BotJoinFailed(_) => "bot_join_failed",
            Entry::BotJoinRetry(_) => "bot_join_retry",
            Entry::PersonSet(_) => "person_set",
            Entry::PersonRemoved(_) => "person_removed",
            Entry::OptOut(_) => "opt_out",
            Entry::PersonSettings(_) => "person_settings",
            Entry::ClientEvent(_) => "client_event",
            Entry::InvitePending(_) => "invite_pending",
            Entry::InviteFailed(_) => "invite_failed",
            Entry::ActionPending(_) => "action_pending",
            Entry::ActionFailed(_) => "action_failed",
            Entry::ActionUnsupported(_) => "action_unsupported",
            Entry::ActionDone(_) => "action_done",
            Entry::LinkRequested(_) => "link_requested",
            Entry::LinkClosed(_) => "link_closed",
            Entry::CommandHandled(_) => "command_handled",
            Entry::BotTold(_) => "bot_told",
            Entry::CaughtUp(_) => "caught_up",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast split of a record and the general decode agree, on fedlink's own layout
    /// and on others (which take the general path).
    #[test]
    fn decoding_for_fold_splits_fedlinks_layout_and_falls_back_on_others() {
        let own = r#"{"v":1,"seq":7,"at_ms":1700000000000,"entry":{"kind":"receipt","origin":"kiwi","room_id":"!r:kiwi","receipt_type":"m.read","user_id":"@a:kiwi","event_id":"$e","ts":5}}"#;
        assert!(split_record(own.as_bytes()).is_some());
        let other = r#"{ "seq":7, "v":1, "entry":{"kind":"receipt","origin":"kiwi","room_id":"!r:kiwi","receipt_type":"m.read","user_id":"@a:kiwi","event_id":"$e","ts":5}, "at_ms":1700000000000 }"#;
        assert!(split_record(other.as_bytes()).is_none());
        let a = LogRecord::decode_for_fold(own.as_bytes()).unwrap();
        assert_eq!(a, LogRecord::decode_for_fold_with(own.as_bytes(), false).unwrap());
        assert_eq!(a, LogRecord::decode_for_fold(other.as_bytes()).unwrap());
        // A record cut short or with junk after the entry is an error, not a half record.
        assert!(LogRecord::decode_for_fold(&own.as_bytes()[..own.len() - 2]).is_err());
        assert!(LogRecord::decode_for_fold(format!("{}x}}", &own[..own.len() - 1]).as_bytes()).is_err());
    }

    /// The stored format is an API: this literal record must keep loading.
    #[test]
    fn v1_receipt_record_loads() {
        let text = r#"{"v":1,"seq":7,"at_ms":1700000000000,"entry":{"kind":"receipt","origin":"kiwi","room_id":"!r:kiwi","receipt_type":"m.read","user_id":"@a:kiwi","event_id":"$e","ts":5}}"#;
        let rec: LogRecord = serde_json::from_str(text).unwrap();
        assert_eq!(rec.seq, 7);
        let Entry::Receipt(r) = &rec.entry else { panic!("wrong kind") };
        assert_eq!(r.user_id.as_str(), "@a:kiwi");
        let back: LogRecord = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back, rec);
        assert_eq!(LogRecord::decode_for_fold(text.as_bytes()).unwrap(), rec, "non-PDU records decode whole for folding");
    }

    /// Action records written before the action was stored as `action` have two `kind` keys
    /// (the tag, then the action). They must keep loading, through every decoder; new ones
    /// have no duplicate key and round-trip.
    #[test]
    fn action_records_of_both_formats_load() {
        let old = r#"{"v":1,"seq":7,"at_ms":1,"entry":{"kind":"action_pending","room_id":"!r:kiwi","user_id":"@a:kiwi","kind":"read","event_id":"$e","depth":4}}"#;
        let action = UserAction {
            room_id: "!r:kiwi".try_into().unwrap(),
            user_id: "@a:kiwi".try_into().unwrap(),
            kind: "read".into(),
            event_id: Some("$e".try_into().unwrap()),
            event_ts: None,
            depth: Some(4),
            actor: None,
            reason: None, thread_id: None, partner: None,
        };
        let expected = LogRecord { v: 1, seq: 7, at_ms: 1, entry: Entry::ActionPending(action.clone()) };
        assert_eq!(LogRecord::decode(old.as_bytes()).unwrap(), expected);
        assert_eq!(LogRecord::decode_for_fold(old.as_bytes()).unwrap(), expected);
        let new = serde_json::to_string(&expected).unwrap();
        assert_eq!(new.matches("\"kind\"").count(), 1, "{new}");
        assert_eq!(LogRecord::decode(new.as_bytes()).unwrap(), expected);
        assert_eq!(LogRecord::decode_for_fold(new.as_bytes()).unwrap(), expected);
        for (kind, wrap) in [("action_failed", Entry::ActionFailed as fn(UserAction) -> Entry), ("action_unsupported", Entry::ActionUnsupported)] {
            let text = old.replace("action_pending", kind);
            assert_eq!(LogRecord::decode(text.as_bytes()).unwrap().entry, wrap(action.clone()));
        }
        // Only that one legacy shape is mended: other duplicate tags stay errors.
        for bad in [
            r#"{"v":1,"seq":7,"at_ms":1,"entry":{"kind":"receipt","kind":"receipt"}}"#,
            r#"{"v":1,"seq":7,"at_ms":1,"entry":{"kind":"action_pending","room_id":"!r:kiwi","user_id":"@a:kiwi","kind":"read","action":"join"}}"#,
            r#"{"v":1,"seq":7,"at_ms":1,"entry":{"kind":"action_pending","room_id":"!r:kiwi","user_id":"@a:kiwi","kind":"read","kind":"join"}}"#,
        ] {
            assert!(LogRecord::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    /// Decoding for folding keeps every field of a PDU entry but the signed PDU, of which
    /// it keeps the content; a record that does not decode fails the same way.
    #[test]
    fn a_record_decoded_for_folding_keeps_all_but_the_signed_pdu() {
        let mut p = PduEntry::test_message("$pl");
        p.event_type = "m.room.power_levels".into();
        p.state_key = Some(String::new());
        p.superseded = vec!["$old".try_into().unwrap()];
        p.resolved_state = Some(ResolvedState { state: vec![], power_levels: Some(serde_json::json!({"users_default": 5})) });
        p.pdu = serde_json::json!({
            "type": "m.room.power_levels", "state_key": "", "content": {"users": {"@a:kiwi": 100}, "note": "a \"quoted\" \u{00e9}"},
            "signatures": {"kiwi": {"ed25519:1": "sig"}}, "hashes": {"sha256": "h"}, "auth_events": ["$c"], "prev_events": ["$p"],
        });
        let rec = LogRecord { v: LOG_FORMAT, seq: 9, at_ms: 3, entry: Entry::Pdu(p.clone()) };
        let bytes = serde_json::to_vec(&rec).unwrap();
        let folded = LogRecord::decode_for_fold(&bytes).unwrap();
        let mut expected = p;
        expected.pdu = serde_json::json!({"content": {"users": {"@a:kiwi": 100}, "note": "a \"quoted\" \u{00e9}"}});
        assert_eq!(folded, LogRecord { v: LOG_FORMAT, seq: 9, at_ms: 3, entry: Entry::Pdu(expected) });
        // A PDU without content folds as one with null content, as views read it.
        let mut bare = PduEntry::test_message("$m");
        bare.pdu = serde_json::json!({"type": "m.room.message"});
        let bytes = serde_json::to_vec(&LogRecord { v: LOG_FORMAT, seq: 1, at_ms: 1, entry: Entry::Pdu(bare) }).unwrap();
        let Entry::Pdu(b) = LogRecord::decode_for_fold(&bytes).unwrap().entry else { panic!("wrong kind") };
        assert_eq!(b.pdu, serde_json::json!({"content": null}));
        // Broken records are errors, not defaults.
        for bad in [&b"{}"[..], br#"{"v":1,"seq":1,"at_ms":1,"entry":{"kind":"pdu"}}"#, br#"{"v":1,"seq":1,"at_ms":1,"entry":{"kind":"nope"}}"#, b"{\"v\":1"] {
            assert!(LogRecord::decode_for_fold(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// A member event's entry as fedlink logs it: every derived field agrees with the PDU.
    fn member_entry() -> PduEntry {
        PduEntry {
            room_id: "!r:kiwi".try_into().unwrap(),
            event_id: "$m".try_into().unwrap(),
            via: "kiwi".try_into().unwrap(),
            status: PduStatus::Accepted,
            event_type: "m.room.member".into(),
            state_key: Some("@b:kiwi".into()),
            sender: "@b:kiwi".try_into().unwrap(),
            membership: Some("join".into()),
            prev_events: vec!["$p1".try_into().unwrap(), "$p2".try_into().unwrap()],
            depth: 7,
            origin_server_ts: 1_700_000_000_000,
            pdu: serde_json::json!({
                "room_id": "!r:kiwi", "type": "m.room.member", "state_key": "@b:kiwi", "sender": "@b:kiwi",
                "content": {"membership": "join", "displayname": "B"}, "prev_events": ["$p1", "$p2"], "depth": 7,
                "origin_server_ts": 1_700_000_000_000u64, "auth_events": ["$c"], "hashes": {"sha256": "h"},
                "signatures": {"kiwi": {"ed25519:1": "sig"}},
            }),
            resolved_state: None,
            superseded: Vec::new(),
        }
    }

    /// Encode `p` in a record, then check both decodes give it back (folding: all but the
    /// signed PDU, which keeps its content only). Returns the entry's stored keys.
    fn round_trip(p: &PduEntry) -> Vec<String> {
        let rec = LogRecord { v: LOG_FORMAT, seq: 4, at_ms: 5, entry: Entry::Pdu(p.clone()) };
        let bytes = serde_json::to_vec(&rec).unwrap();
        assert_eq!(LogRecord::decode(&bytes).unwrap(), rec, "{}", String::from_utf8_lossy(&bytes));
        let Entry::Pdu(folded) = LogRecord::decode_for_fold(&bytes).unwrap().entry else { panic!("not a PDU entry") };
        let mut expected = p.clone();
        expected.pdu = serde_json::json!({ "content": p.pdu.get("content").cloned().unwrap_or(serde_json::Value::Null) });
        assert_eq!(folded, expected, "{}", String::from_utf8_lossy(&bytes));
        let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        stored["entry"].as_object().unwrap().keys().cloned().collect()
    }

    /// Format 2: an entry stores only what its signed PDU does not give, and reads back whole.
    #[test]
    fn pdu_entries_store_only_what_their_pdu_does_not_give() {
        let p = member_entry();
        let mut keys = round_trip(&p);
        keys.sort();
        assert_eq!(keys, ["event_id", "kind", "pdu", "status", "via"]);
        let full = serde_json::to_vec(&LogRecord { v: LOG_FORMAT, seq: 4, at_ms: 5, entry: Entry::Pdu(p) }).unwrap();
        assert!(full.len() < 600, "{} bytes", full.len());
    }

    /// Each derived field that differs from the PDU, or that the PDU does not give in the
    /// entry's form, is written, `null` included, and reads back as it was.
    #[test]
    fn fields_the_pdu_does_not_give_are_written() {
        type Change = Box<dyn Fn(&mut PduEntry)>;
        let cases: Vec<(&str, Change)> = vec![
            ("room_id", Box::new(|p| p.room_id = "!other:kiwi".try_into().unwrap())),
            ("room_id", Box::new(|p| p.pdu["room_id"] = serde_json::json!(5))),
            ("event_type", Box::new(|p| p.event_type = "m.room.message".into())),
            ("state_key", Box::new(|p| p.state_key = None)),
            ("state_key", Box::new(|p| p.state_key = Some(String::new()))),
            ("state_key", Box::new(|p| p.pdu["state_key"] = serde_json::Value::Null)),
            ("sender", Box::new(|p| p.sender = "@c:kiwi".try_into().unwrap())),
            ("membership", Box::new(|p| p.membership = None)),
            ("membership", Box::new(|p| p.membership = Some("leave".into()))),
            ("membership", Box::new(|p| p.pdu.as_object_mut().unwrap().remove("type").map(drop).unwrap_or(()))),
            ("prev_events", Box::new(|p| p.prev_events.pop().map(drop).unwrap_or(()))),
            ("prev_events", Box::new(|p| p.pdu["prev_events"] = serde_json::json!(["$p1", 2]))),
            ("depth", Box::new(|p| p.depth = 8)),
            ("depth", Box::new(|p| p.pdu["depth"] = serde_json::json!("7"))),
            ("origin_server_ts", Box::new(|p| p.pdu.as_object_mut().unwrap().remove("origin_server_ts").map(drop).unwrap_or(()))),
        ];
        for (field, change) in cases {
            let mut p = member_entry();
            change(&mut p);
            let keys = round_trip(&p);
            assert!(keys.iter().any(|k| k == field), "{field} not written: {keys:?} for {p:?}");
        }
        // An entry whose PDU says nothing (a test message) keeps every field.
        round_trip(&PduEntry::test_message("$t"));
    }

    /// Records of format 1 carry every field, whatever the PDU says; they read as written.
    #[test]
    fn format_1_pdu_records_load() {
        let text = r#"{"v":1,"seq":2,"at_ms":3,"entry":{"kind":"pdu","room_id":"!r:kiwi","event_id":"$m","via":"kiwi","status":"accepted","event_type":"m.room.member","state_key":"@b:kiwi","sender":"@b:kiwi","membership":"join","prev_events":["$p1","$p2"],"depth":7,"origin_server_ts":1700000000000,"pdu":{"room_id":"!r:kiwi","type":"m.room.member","state_key":"@b:kiwi","sender":"@b:kiwi","content":{"membership":"join","displayname":"B"},"prev_events":["$p1","$p2"],"depth":7,"origin_server_ts":1700000000000,"auth_events":["$c"],"hashes":{"sha256":"h"},"signatures":{"kiwi":{"ed25519:1":"sig"}}}}}"#;
        let rec = LogRecord::decode(text.as_bytes()).unwrap();
        assert_eq!(rec, LogRecord { v: 1, seq: 2, at_ms: 3, entry: Entry::Pdu(member_entry()) });
        let Entry::Pdu(folded) = LogRecord::decode_for_fold(text.as_bytes()).unwrap().entry else { panic!("not a PDU entry") };
        assert_eq!((folded.membership.as_deref(), folded.depth, folded.prev_events.len()), (Some("join"), 7, 2));
        // A format 1 entry without state_key or membership: the PDU has neither either.
        let msg = r#"{"v":1,"seq":2,"at_ms":3,"entry":{"kind":"pdu","room_id":"!r:kiwi","event_id":"$x","via":"kiwi","status":"accepted","event_type":"m.room.message","sender":"@b:kiwi","prev_events":[],"depth":1,"origin_server_ts":1,"pdu":{"type":"m.room.message","content":{"body":"hi"}}}}"#;
        let Entry::Pdu(m) = LogRecord::decode(msg.as_bytes()).unwrap().entry else { panic!("not a PDU entry") };
        assert_eq!((m.state_key, m.membership), (None, None));
    }

    /// A compact entry whose PDU cannot give a left-out field is an error naming it.
    #[test]
    fn a_left_out_field_the_pdu_cannot_give_is_an_error() {
        let text = |pdu: &str| format!(r#"{{"v":2,"seq":2,"at_ms":3,"entry":{{"kind":"pdu","event_id":"$m","via":"kiwi","status":"accepted","pdu":{pdu}}}}}"#);
        for (pdu, field) in [
            (r#"{"type":"m.room.message","sender":"@b:kiwi","prev_events":[],"depth":1,"origin_server_ts":1}"#, "room_id"),
            (r#"{"room_id":"not a room","type":"m.room.message","sender":"@b:kiwi","prev_events":[],"depth":1,"origin_server_ts":1}"#, "room_id"),
            (r#"{"room_id":"!r:kiwi","type":"m.room.message","sender":"@b:kiwi","prev_events":["nope"],"depth":1,"origin_server_ts":1}"#, "prev_events"),
            (r#"{"room_id":"!r:kiwi","type":"m.room.message","sender":"@b:kiwi","prev_events":[],"depth":-1,"origin_server_ts":1}"#, "depth"),
        ] {
            let t = text(pdu);
            for e in [LogRecord::decode(t.as_bytes()).unwrap_err(), LogRecord::decode_for_fold(t.as_bytes()).unwrap_err()] {
                assert!(e.to_string().contains(field) && e.to_string().contains("$m"), "{field}: {e}");
            }
        }
    }

    proptest::proptest! {
        /// Whatever an entry holds and whatever its PDU says, both decodes give it back.
        #[test]
        fn any_pdu_entry_reads_back_as_written(
            pick in proptest::collection::vec(0u8..4, 8),
            depth in 0u64..1u64 << 53,
            ts in 0u64..1u64 << 53,
            state in proptest::option::of("[a-z@:]{0,6}"),
            membership in proptest::option::of("(join|leave|invite)"),
            prevs in proptest::collection::vec("\\$[a-z]{1,4}", 0..3),
            member in proptest::bool::ANY,
        ) {
            let mut p = member_entry();
            p.event_type = if member { "m.room.member".into() } else { "m.room.topic".into() };
            p.state_key = state.clone();
            p.membership = membership.clone();
            p.prev_events = prevs.iter().map(|e| OwnedEventId::try_from(e.as_str()).unwrap()).collect();
            p.depth = depth;
            p.origin_server_ts = ts;
            // For each field the PDU agrees (0), disagrees (1), lacks it (2) or holds another type (3).
            let values: [(&str, serde_json::Value, serde_json::Value); 7] = [
                ("type", serde_json::json!(p.event_type), serde_json::json!("m.other")),
                ("state_key", serde_json::json!(state), serde_json::json!("zz")),
                ("sender", serde_json::json!(p.sender), serde_json::json!("@z:kiwi")),
                ("room_id", serde_json::json!(p.room_id), serde_json::json!("!z:kiwi")),
                ("prev_events", serde_json::json!(prevs), serde_json::json!(["$z"])),
                ("depth", serde_json::json!(depth), serde_json::json!(depth + 1)),
                ("origin_server_ts", serde_json::json!(ts), serde_json::json!(ts + 1)),
            ];
            let mut pdu = serde_json::Map::new();
            for ((key, same, other), how) in values.into_iter().zip(&pick) {
                match how {
                    0 if !same.is_null() => { pdu.insert(key.into(), same); }
                    1 => { pdu.insert(key.into(), other); }
                    3 => { pdu.insert(key.into(), serde_json::json!({"x": 1})); }
                    _ => {}
                }
            }
            match pick[7] {
                0 => { pdu.insert("content".into(), serde_json::json!({ "membership": membership })); }
                1 => { pdu.insert("content".into(), serde_json::json!({ "membership": "ban" })); }
                2 => {}
                _ => { pdu.insert("content".into(), serde_json::json!({ "membership": 3 })); }
            }
            p.pdu = serde_json::Value::Object(pdu);
            round_trip(&p);
        }
    }
}
