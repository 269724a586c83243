//! A room's current state in its view: (type, state key) -> event id, in one map.
//!
//! A map per event type cost a B-tree node of its own (~460 bytes) per type and room,
//! about 2 KiB per room: 18 MiB of views at 10,000 rooms (heaptrack). One map per room
//! shares its nodes between types. The type of each entry is a static string for the
//! types rooms commonly hold (no allocation) and the state key a boxed string, so a big
//! room's thousands of `m.room.member` entries cost 16 bytes each more than in a map per
//! type. Serialized as before, `{type: {state key: event id}}`, so stored checkpoints and
//! the admin API keep their form.

use std::{borrow::Borrow, borrow::Cow, cmp::Ordering, collections::BTreeMap, fmt};

use ruma::OwnedEventId;
use serde::{
    de::{MapAccess, Visitor},
    ser::SerializeMap,
    Deserialize, Deserializer, Serialize, Serializer,
};

/// (type, state key): the key of one state entry.
type Key = (Cow<'static, str>, Box<str>);

/// (type, state key) -> event id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomState(BTreeMap<Key, OwnedEventId>);

/// State event types kept without an allocation per entry.
const KNOWN_TYPES: &[&str] = &[
    "m.room.member",
    "m.room.create",
    "m.room.power_levels",
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.server_acl",
    "m.room.pinned_events",
    "m.room.tombstone",
    "m.room.third_party_invite",
    "m.space.child",
    "m.space.parent",
];

fn type_name(t: String) -> Cow<'static, str> {
    match KNOWN_TYPES.iter().find(|k| **k == t) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(t),
    }
}

/// A (type, state key) pair, owned or borrowed: lets lookups by `(&str, &str)` find the
/// map's owned keys without allocating.
trait Pair {
    fn pair(&self) -> (&str, &str);
}

impl Pair for Key {
    fn pair(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl Pair for (&str, &str) {
    fn pair(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> Borrow<dyn Pair + 'a> for Key {
    fn borrow(&self) -> &(dyn Pair + 'a) {
        self
    }
}

// The order of the owned keys: by type, then state key.
impl PartialEq for dyn Pair + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.pair() == other.pair()
    }
}

impl Eq for dyn Pair + '_ {}

impl PartialOrd for dyn Pair + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn Pair + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        self.pair().cmp(&other.pair())
    }
}

impl RoomState {
    /// The event at (`event_type`, `state_key`).
    pub fn get(&self, event_type: &str, state_key: &str) -> Option<&OwnedEventId> {
        self.0.get(&(event_type, state_key) as &dyn Pair)
    }

    /// Set the event at (`event_type`, `state_key`).
    pub fn insert(&mut self, event_type: String, state_key: String, event_id: OwnedEventId) {
        self.0.insert((type_name(event_type), state_key.into_boxed_str()), event_id);
    }

    /// Forget every entry.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// ((type, state key), event id), by type, then state key.
    pub fn iter(&self) -> impl Iterator<Item = ((&str, &str), &OwnedEventId)> {
        self.0.iter().map(|((t, k), e)| ((t.as_ref(), k.as_ref()), e))
    }

    /// The event ids.
    pub fn ids(&self) -> impl Iterator<Item = &OwnedEventId> {
        self.0.values()
    }
}

/// The entries of one type, serialized as `{state key: event id}`.
struct OfType<'a>(&'a [((&'a str, &'a str), &'a OwnedEventId)]);

impl Serialize for OfType<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for ((_, k), e) in self.0 {
            m.serialize_entry(k, e)?;
        }
        m.end()
    }
}

impl Serialize for RoomState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Entries are sorted by type: each type's entries are one run.
        let entries: Vec<((&str, &str), &OwnedEventId)> = self.iter().collect();
        let mut m = s.serialize_map(None)?;
        for run in entries.chunk_by(|a, b| a.0 .0 == b.0 .0) {
            m.serialize_entry(run[0].0 .0, &OfType(run))?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for RoomState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Types;
        impl<'de> Visitor<'de> for Types {
            type Value = RoomState;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of event types to maps of state keys to event ids")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut types: A) -> Result<RoomState, A::Error> {
                let mut out = RoomState::default();
                while let Some((t, keys)) = types.next_entry::<String, BTreeMap<String, OwnedEventId>>()? {
                    let t = type_name(t);
                    for (k, e) in keys {
                        out.0.insert((t.clone(), k.into_boxed_str()), e);
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(Types)
    }
}

#[cfg(test)]
mod tests {
    use super::RoomState;

    fn id(s: &str) -> ruma::OwnedEventId {
        s.try_into().unwrap()
    }

    #[test]
    fn lookups_and_the_stored_form() {
        let mut s = RoomState::default();
        s.insert("m.room.member".into(), "@b:x".into(), id("$b"));
        s.insert("m.room.create".into(), "".into(), id("$c"));
        s.insert("m.room.member".into(), "@a:x".into(), id("$a"));
        s.insert("m.room.member".into(), "@a:x".into(), id("$a2"));
        assert_eq!(s.get("m.room.member", "@a:x"), Some(&id("$a2")));
        assert_eq!(s.get("m.room.member", "@c:x"), None);
        assert_eq!(s.get("m.room.create", ""), Some(&id("$c")));
        // A type that is a prefix of another, and an empty key, are told apart.
        assert_eq!(s.get("m.room", "member"), None);
        assert_eq!(s.len(), 3);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(text, r#"{"m.room.create":{"":"$c"},"m.room.member":{"@a:x":"$a2","@b:x":"$b"}}"#, "the nested form, sorted");
        let json = serde_json::to_value(&s).unwrap();
        let back: RoomState = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        let ids: Vec<&str> = s.ids().map(|e| e.as_str()).collect();
        assert_eq!(ids, ["$c", "$a2", "$b"]);
        // A type fedlink does not know is kept like the others.
        s.insert("org.example.custom".into(), "k".into(), id("$x"));
        assert_eq!(s.get("org.example.custom", "k"), Some(&id("$x")));
        let back: RoomState = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(serde_json::to_value(RoomState::default()).unwrap(), serde_json::json!({}));
    }
}
