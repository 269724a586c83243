//! The directory view: person -> accounts, account -> person, and opt-outs, folded from
//! `person_set`, `person_removed` and `opt_out` records.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};

use crate::core::log_entry::{LinkRequested, LinkSource, OptOut, PersonRemoved, PersonSet};

/// One person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    /// The person's accounts.
    pub accounts: BTreeSet<OwnedUserId>,
    /// Where the link came from.
    pub source: LinkSource,
    /// Opted out of syncing everywhere.
    pub opted_out: bool,
    /// Rooms opted out of.
    pub opted_out_rooms: BTreeSet<OwnedRoomId>,
    /// Join invited accounts automatically.
    #[serde(default = "yes")]
    pub auto_join: bool,
}

fn yes() -> bool {
    true
}

/// Why a directory change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// An account already belongs to another person.
    #[error("{account} already belongs to person `{person}`")]
    Conflict {
        /// The account.
        account: OwnedUserId,
        /// Its current person.
        person: String,
    },
    /// A person needs at least two accounts to be worth linking.
    #[error("a person needs at least two accounts, got {0}")]
    TooFew(usize),
    /// The person id is not usable.
    #[error("person id must be 1-64 characters of [A-Za-z0-9._=-]")]
    BadId,
}

/// The directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// Persons by id.
    pub persons: BTreeMap<String, Person>,
    /// Account -> person id.
    pub by_account: BTreeMap<OwnedUserId, String>,
    /// Open self-service link requests, by the account that asked (one each).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub link_requests: BTreeMap<OwnedUserId, LinkRequested>,
    /// Linked accounts that caught up on their memberships through their homeserver's
    /// registration ([`crate::core::log_entry::Entry::CaughtUp`]); an account leaves this
    /// set when it is unlinked, so a new link catches up again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub caught_up: BTreeSet<OwnedUserId>,
}

/// Whether `id` is a usable person id.
pub fn valid_person_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || "._=-".contains(c))
}

impl Directory {
    /// Check a `person_set` from `source` before it is logged: no account may belong to
    /// another person, except that config, admin and HTTP directory links take accounts
    /// over from self-service ones (see [`Directory::taken_over`]).
    pub fn check_set(&self, person: &str, accounts: &[OwnedUserId], source: LinkSource) -> Result<(), DirectoryError> {
        if !valid_person_id(person) {
            return Err(DirectoryError::BadId);
        }
        let distinct: BTreeSet<_> = accounts.iter().collect();
        if distinct.len() < 2 {
            return Err(DirectoryError::TooFew(distinct.len()));
        }
        for a in accounts {
            if let Some(p) = self.by_account.get(a) {
                let yields = source != LinkSource::SelfService && self.persons.get(p).is_some_and(|x| x.source == LinkSource::SelfService);
                if p != person && !yields {
                    return Err(DirectoryError::Conflict { account: a.clone(), person: p.clone() });
                }
            }
        }
        Ok(())
    }

    /// What setting `person` to `accounts` does to self-service persons holding some of
    /// them: each keeps its other accounts (`Some`), or is removed (`None`) when fewer than
    /// two remain. Logged before the `person_set`, so the directory never holds a person of
    /// one account.
    pub fn taken_over(&self, person: &str, accounts: &[OwnedUserId]) -> Vec<(String, Option<Vec<OwnedUserId>>)> {
        let mut out: BTreeMap<&String, Vec<OwnedUserId>> = BTreeMap::new();
        for a in accounts {
            if let Some(p) = self.by_account.get(a).filter(|p| *p != person) {
                out.entry(p).or_insert_with(|| self.persons.get(p).map(|x| x.accounts.iter().cloned().collect()).unwrap_or_default()).retain(|x| x != a);
            }
        }
        out.into_iter().map(|(p, rest)| (p.clone(), (rest.len() >= 2).then_some(rest))).collect()
    }

    /// The person owning `account`.
    pub fn person_of(&self, account: &OwnedUserId) -> Option<(&String, &Person)> {
        let id = self.by_account.get(account)?;
        self.persons.get(id).map(|p| (id, p))
    }

    /// Fold a `person_set`. A conflicting record (which `check_set` keeps out of the log)
    /// takes the accounts over, so folding never fails.
    pub fn apply_set(&mut self, s: &PersonSet) {
        let (opted_out, rooms, auto_join) = match self.persons.get(&s.person) {
            Some(p) => (p.opted_out, p.opted_out_rooms.clone(), p.auto_join),
            None => (false, BTreeSet::new(), true),
        };
        self.remove(&s.person);
        for a in &s.accounts {
            if let Some(old) = self.by_account.get(a).cloned() {
                if let Some(p) = self.persons.get_mut(&old) {
                    p.accounts.remove(a);
                }
            }
            self.by_account.insert(a.clone(), s.person.clone());
        }
        self.persons.insert(
            s.person.clone(),
            Person { accounts: s.accounts.iter().cloned().collect(), source: s.source, opted_out, opted_out_rooms: rooms, auto_join },
        );
        self.forget_unlinked();
    }

    /// Fold a `person_removed`.
    pub fn apply_removed(&mut self, r: &PersonRemoved) {
        self.remove(&r.person);
        self.forget_unlinked();
    }

    /// Fold a `caught_up` (of an account still linked).
    pub fn apply_caught_up(&mut self, account: &OwnedUserId) {
        if self.by_account.contains_key(account) {
            self.caught_up.insert(account.clone());
        }
    }

    /// Whether `account` (linked) has caught up on its memberships.
    pub fn is_caught_up(&self, account: &OwnedUserId) -> bool {
        self.caught_up.contains(account)
    }

    fn forget_unlinked(&mut self) {
        let by_account = &self.by_account;
        self.caught_up.retain(|a| by_account.contains_key(a));
    }

    fn remove(&mut self, person: &str) {
        if let Some(p) = self.persons.remove(person) {
            for a in p.accounts {
                if self.by_account.get(&a).map(String::as_str) == Some(person) {
                    self.by_account.remove(&a);
                }
            }
        }
    }

    /// Fold `person_settings`.
    pub fn apply_settings(&mut self, s: &crate::core::log_entry::PersonSettings) {
        if let Some(p) = self.persons.get_mut(&s.person) {
            p.auto_join = s.auto_join;
        }
    }

    /// Fold an `opt_out`.
    pub fn apply_opt_out(&mut self, o: &OptOut) {
        let Some(p) = self.persons.get_mut(&o.person) else { return };
        match &o.room_id {
            None => p.opted_out = o.opted_out,
            Some(r) if o.opted_out => {
                p.opted_out_rooms.insert(r.clone());
            }
            Some(r) => {
                p.opted_out_rooms.remove(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> OwnedUserId {
        s.try_into().unwrap()
    }
    fn set(person: &str, accounts: &[&str]) -> PersonSet {
        PersonSet { person: person.into(), accounts: accounts.iter().map(|a| u(a)).collect(), source: LinkSource::Admin }
    }

    #[test]
    fn an_account_belongs_to_at_most_one_person() {
        let mut d = Directory::default();
        d.apply_set(&set("alice", &["@alice:kiwi", "@alice:litchi"]));
        assert_eq!(
            d.check_set("other", &[u("@alice:kiwi"), u("@x:kiwi")], LinkSource::Admin),
            Err(DirectoryError::Conflict { account: u("@alice:kiwi"), person: "alice".into() })
        );
        assert!(d.check_set("alice", &[u("@alice:kiwi"), u("@alice:mango")], LinkSource::Admin).is_ok(), "a person may change its own set");
        assert_eq!(d.check_set("x", &[u("@a:kiwi"), u("@a:kiwi")], LinkSource::Admin), Err(DirectoryError::TooFew(1)));
        assert_eq!(d.check_set("bad id", &[u("@a:kiwi"), u("@b:kiwi")], LinkSource::Admin), Err(DirectoryError::BadId));
    }

    #[test]
    fn replacing_and_removing_keep_the_index_consistent_and_opt_outs_survive_replacement() {
        let mut d = Directory::default();
        d.apply_set(&set("alice", &["@alice:kiwi", "@alice:litchi"]));
        d.apply_opt_out(&OptOut { person: "alice".into(), room_id: None, opted_out: true });
        d.apply_set(&set("alice", &["@alice:kiwi", "@alice:mango"]));
        assert!(d.persons["alice"].opted_out);
        assert_eq!(d.by_account.get(&u("@alice:litchi")), None);
        assert_eq!(d.by_account[&u("@alice:mango")], "alice");
        d.apply_removed(&PersonRemoved { person: "alice".into(), source: LinkSource::Admin });
        assert!(d.by_account.is_empty() && d.persons.is_empty());
    }
}
