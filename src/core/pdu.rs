//! A parsed PDU: the signed canonical JSON as received, plus the fields fedlink and the
//! state-resolution crate need, checked for type once at parse time.
//!
//! Room versions 10, 11 and 12 are supported (event ids are reference hashes; in v12 the
//! room id of a create event is derived from its own event id).

use std::collections::BTreeSet;

use ruma::{
    canonical_json::{CanonicalJsonObject, CanonicalJsonValue},
    events::TimelineEventType,
    room_version_rules::{RoomIdFormatVersion, RoomVersionRules},
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UInt, UserId,
};
use serde_json::value::RawValue;

/// The largest PDU, in bytes of canonical JSON, that servers accept.
pub const MAX_PDU_BYTES: usize = 65_536;

/// Room versions fedlink joins and serves.
pub const SUPPORTED_ROOM_VERSIONS: [RoomVersionId; 3] = [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];

/// Whether fedlink supports `v`.
pub fn is_supported(v: &RoomVersionId) -> bool {
    SUPPORTED_ROOM_VERSIONS.contains(v)
}

/// The rules of a supported room version.
pub fn rules_for(v: &RoomVersionId) -> Option<RoomVersionRules> {
    if is_supported(v) {
        v.rules()
    } else {
        None
    }
}

/// Why a PDU could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The canonical JSON is larger than [`MAX_PDU_BYTES`].
    #[error("PDU is larger than {MAX_PDU_BYTES} bytes")]
    TooLarge,
    /// A field is missing or has the wrong type.
    #[error("invalid PDU: {0}")]
    Format(String),
}

fn fmt_err(s: impl Into<String>) -> PduError {
    PduError::Format(s.into())
}

/// A PDU with its derived event id.
#[derive(Debug, Clone)]
pub struct Pdu {
    /// `$` + reference hash.
    pub event_id: OwnedEventId,
    /// The room; for a v12 create event, derived from the event id.
    pub room_id: OwnedRoomId,
    /// Whether `room_id` appears in the JSON (false only for v12 create events).
    room_id_in_json: bool,
    /// The sender.
    pub sender: OwnedUserId,
    /// `origin_server_ts`.
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    /// `type`.
    pub kind: TimelineEventType,
    /// `content` as raw JSON.
    pub content: Box<RawValue>,
    /// `state_key`, for state events.
    pub state_key: Option<String>,
    /// `prev_events`.
    pub prev_events: Vec<OwnedEventId>,
    /// `auth_events`.
    pub auth_events: Vec<OwnedEventId>,
    /// `redacts` (top level or, from v11, in content).
    pub redacts: Option<OwnedEventId>,
    /// `depth`.
    pub depth: u64,
    /// The signed JSON as received.
    pub json: CanonicalJsonObject,
}

impl Pdu {
    /// Parse `json` as a PDU of a room with `rules`.
    pub fn parse(json: CanonicalJsonObject, rules: &RoomVersionRules) -> Result<Self, PduError> {
        Self::parse_signed(json, rules).map(|(pdu, _)| pdu)
    }

    /// [`Pdu::parse`], also returning the bytes the event's signatures cover (its redacted
    /// canonical JSON without `signatures` and `unsigned`). The event id is the hash of the
    /// same bytes, so checking the signatures afterwards ([`crate::rooms::verify_signed`])
    /// needs no second redaction and serialization.
    pub fn parse_signed(json: CanonicalJsonObject, rules: &RoomVersionRules) -> Result<(Self, String), PduError> {
        let mut size = ByteCount(0);
        serde_json::to_writer(&mut size, &json).map_err(|e| fmt_err(e.to_string()))?;
        if size.0 > MAX_PDU_BYTES {
            return Err(PduError::TooLarge);
        }
        ruma::state_res::check_pdu_format(&json, &rules.event_format).map_err(fmt_err)?;
        let signed = signed_bytes(&json, rules)?;
        let reference = reference_hash(signed.as_bytes(), rules);
        let event_id = EventId::parse(format!("${reference}")).map_err(|e| fmt_err(e.to_string()))?;
        let s = |k: &str| -> Result<&str, PduError> {
            match json.get(k) {
                Some(CanonicalJsonValue::String(s)) => Ok(s),
                _ => Err(fmt_err(format!("`{k}` must be a string"))),
            }
        };
        let kind = TimelineEventType::from(s("type")?);
        let (room_id, room_id_in_json) = match json.get("room_id") {
            Some(CanonicalJsonValue::String(r)) => {
                (RoomId::parse(r).map_err(|e| fmt_err(format!("room_id: {e}")))?, true)
            }
            None if kind == TimelineEventType::RoomCreate && rules.room_id_format == RoomIdFormatVersion::V2 => {
                (RoomId::parse(format!("!{reference}")).map_err(|e| fmt_err(e.to_string()))?, false)
            }
            _ => return Err(fmt_err("`room_id` must be a string")),
        };
        if kind == TimelineEventType::RoomCreate && rules.room_id_format == RoomIdFormatVersion::V2 && room_id_in_json {
            return Err(fmt_err("a v12 create event must not carry room_id"));
        }
        let sender = UserId::parse(s("sender")?).map_err(|e| fmt_err(format!("sender: {e}")))?;
        let origin_server_ts = match json.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(i)) => {
                let v = u64::try_from(i64::from(*i)).map_err(|_| fmt_err("origin_server_ts is negative"))?;
                MilliSecondsSinceUnixEpoch(UInt::new(v).ok_or_else(|| fmt_err("origin_server_ts too large"))?)
            }
            _ => return Err(fmt_err("`origin_server_ts` must be an integer")),
        };
        let depth = match json.get("depth") {
            Some(CanonicalJsonValue::Integer(i)) => {
                u64::try_from(i64::from(*i)).map_err(|_| fmt_err("depth is negative"))?
            }
            _ => return Err(fmt_err("`depth` must be an integer")),
        };
        let content = match json.get("content") {
            Some(c @ CanonicalJsonValue::Object(_)) => {
                RawValue::from_string(serde_json::to_string(c).map_err(|e| fmt_err(e.to_string()))?)
                    .map_err(|e| fmt_err(e.to_string()))?
            }
            _ => return Err(fmt_err("`content` must be an object")),
        };
        let state_key = match json.get("state_key") {
            None => None,
            Some(CanonicalJsonValue::String(s)) => Some(s.clone()),
            Some(_) => return Err(fmt_err("`state_key` must be a string")),
        };
        let ids = |k: &str| -> Result<Vec<OwnedEventId>, PduError> {
            match json.get(k) {
                Some(CanonicalJsonValue::Array(a)) => a
                    .iter()
                    .map(|v| match v {
                        CanonicalJsonValue::String(s) => EventId::parse(s).map_err(|e| fmt_err(format!("{k}: {e}"))),
                        _ => Err(fmt_err(format!("`{k}` must hold event id strings"))),
                    })
                    .collect(),
                _ => Err(fmt_err(format!("`{k}` must be an array"))),
            }
        };
        let prev_events = ids("prev_events")?;
        let auth_events = ids("auth_events")?;
        if prev_events.len() > 20 || auth_events.len() > 10 {
            return Err(fmt_err("too many prev_events or auth_events"));
        }
        let redacts = if kind == TimelineEventType::RoomRedaction {
            let top = json.get("redacts");
            let inner = match json.get("content") {
                Some(CanonicalJsonValue::Object(c)) if rules.redaction.content_field_redacts => c.get("redacts"),
                _ => None,
            };
            match inner.or(top) {
                Some(CanonicalJsonValue::String(s)) => Some(EventId::parse(s).map_err(|e| fmt_err(format!("redacts: {e}")))?),
                _ => None,
            }
        } else {
            None
        };
        let pdu = Self {
            event_id,
            room_id,
            room_id_in_json,
            sender,
            origin_server_ts,
            kind,
            content,
            state_key,
            prev_events,
            auth_events,
            redacts,
            depth,
            json,
        };
        Ok((pdu, signed))
    }

    /// `content.membership` of a member event.
    pub fn membership(&self) -> Option<String> {
        if self.kind != TimelineEventType::RoomMember {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct M {
            membership: String,
        }
        serde_json::from_str::<M>(self.content.get()).ok().map(|m| m.membership)
    }

    /// The server that sent the event (the sender's server).
    pub fn origin_server(&self) -> &ruma::ServerName {
        self.sender.server_name()
    }

    /// The PDU as a `serde_json::Value`, for storage and responses.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(&self.json).expect("canonical JSON always serializes")
    }

    /// All event ids this event references.
    pub fn references(&self) -> BTreeSet<OwnedEventId> {
        self.prev_events.iter().chain(self.auth_events.iter()).cloned().collect()
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id_in_json.then_some(&*self.room_id)
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        false
    }
}

/// Counts the bytes serialized into it: a size without a buffer.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The bytes an event's signatures cover: its canonical JSON, redacted by the room
/// version's rules, without `signatures` and `unsigned`. Its reference hash covers the same
/// bytes (the spec removes the same two fields for both).
pub fn signed_bytes(json: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<String, PduError> {
    let signed = ruma::canonical_json::RedactingSerializer::new()
        .rules(&rules.redaction)
        .custom_redacted_root_fields(&["signatures", "unsigned"])
        .serialize(json)
        .map_err(|e| fmt_err(e.to_string()))?;
    // The limit ruma's reference hash applies to the redacted form.
    if signed.len() > MAX_PDU_BYTES - 1 {
        return Err(PduError::TooLarge);
    }
    Ok(signed)
}

/// The reference hash of an event whose [`signed_bytes`] are `signed`: unpadded base64 of
/// their SHA-256, URL-safe from event id format v3 on.
fn reference_hash(signed: &[u8], rules: &RoomVersionRules) -> String {
    use base64::Engine;
    use ruma::room_version_rules::EventIdFormatVersion;
    use sha2::Digest;
    let hash = sha2::Sha256::digest(signed);
    match rules.event_id_format {
        EventIdFormatVersion::V1 | EventIdFormatVersion::V2 => base64::engine::general_purpose::STANDARD_NO_PAD.encode(hash),
        _ => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash),
    }
}

/// Parse JSON text straight into canonical JSON (no `serde_json::Value` in between):
/// floats and integers beyond +-(2^53 - 1) are refused, a repeated key keeps its last value,
/// as converting a parsed `Value` does. One difference: an object whose only key is
/// serde_json's private raw-value marker stays an object here (a `Value` would turn it into
/// the string it holds); this is the spec's reading of the text.
pub fn canonical_from_slice(text: &[u8]) -> Result<CanonicalJsonValue, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = CanonicalSeed.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

struct CanonicalSeed;

impl<'de> serde::de::DeserializeSeed<'de> for CanonicalSeed {
    type Value = CanonicalJsonValue;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(CanonicalVisitor)
    }
}

struct CanonicalVisitor;

impl<'de> serde::de::Visitor<'de> for CanonicalVisitor {
    type Value = CanonicalJsonValue;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("canonical JSON")
    }
    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::Bool(b))
    }
    fn visit_i64<E: serde::de::Error>(self, i: i64) -> Result<Self::Value, E> {
        ruma::Int::try_from(i).map(CanonicalJsonValue::Integer).map_err(|_| E::custom("integer out of the canonical JSON range"))
    }
    fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<Self::Value, E> {
        i64::try_from(u).map_err(|_| E::custom("integer out of the canonical JSON range")).and_then(|i| self.visit_i64(i))
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom("a float is not canonical JSON"))
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::String(s.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::String(s))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::Null)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(v) = seq.next_element_seed(CanonicalSeed)? {
            out.push(v);
        }
        Ok(CanonicalJsonValue::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = CanonicalJsonObject::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(CanonicalSeed)?;
            out.insert(k, v);
        }
        Ok(CanonicalJsonValue::Object(out))
    }
}

/// Parse JSON text into a canonical object, rejecting floats and out-of-range integers.
pub fn canonical_object(value: serde_json::Value) -> Result<CanonicalJsonObject, PduError> {
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(o)) => Ok(o),
        Ok(_) => Err(fmt_err("a PDU must be a JSON object")),
        Err(e) => Err(fmt_err(format!("not canonical JSON: {e}"))),
    }
}
