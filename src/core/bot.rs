//! The bot's conversation: the commands a person sends in their direct chat with the bot,
//! and what each does. Pure: the shell reads the command's text, resolves room aliases,
//! supplies the time and a fresh code, and logs the entries an [`Outcome`] names together
//! with the bot's answer.
//!
//! Linking needs both accounts' consent: `link <mxid>` from account A opens a request and
//! tells A a code; the link is made only when B sends `confirm <code>` from its own direct
//! chat with the bot before the code expires. Links made this way have the source `self`;
//! config, admin and HTTP directory links win over them: a self-made link never changes a
//! managed person, and a managed link takes accounts over from self-made ones.
//!
//! Nothing here tells one account anything about another it could not already see: `link`
//! answers the same whether or not the other account is linked, and only the account
//! concerned learns why a confirmation is refused.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId};

use super::{
    log_entry::{Entry, LinkClosed, LinkRequested, LinkSource, OptOut, PersonRemoved, PersonSet},
    reconcile::Routes,
    step::{room_steps, Step},
    views::{directory::valid_person_id, RoomView, Views},
};

/// Most accounts a self-made person may have.
pub const MAX_SELF_ACCOUNTS: usize = 16;

/// Rooms listed by name in a `status` answer; the rest are counted.
pub const MAX_LISTED_ROOMS: usize = 20;

/// A room named in a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomRef {
    /// `!id:server`.
    Id(OwnedRoomId),
    /// `#alias:server` (the shell resolves it).
    Alias(OwnedRoomAliasId),
}

/// A command the bot understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `help`.
    Help,
    /// `status`.
    Status,
    /// `pause`: stop syncing everywhere.
    Pause,
    /// `resume`.
    Resume,
    /// `off <room>`: stop syncing in one room.
    Off(RoomRef),
    /// `on <room>`.
    On(RoomRef),
    /// `link <mxid>`: ask to link this account with another.
    Link(OwnedUserId),
    /// `confirm <code>`: the other account agrees.
    Confirm(String),
    /// `unlink <mxid>`.
    Unlink(OwnedUserId),
}

impl Command {
    /// The command's name (for metrics and logs).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Help => "help",
            Command::Status => "status",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Off(_) => "off",
            Command::On(_) => "on",
            Command::Link(_) => "link",
            Command::Confirm(_) => "confirm",
            Command::Unlink(_) => "unlink",
        }
    }
}

/// Why a message is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Nothing but blanks (or a quoted reply).
    #[error("send `help` to see what I understand")]
    Empty,
    /// Not a command word.
    #[error("I do not know `{0}`; send `help` to see what I understand")]
    Unknown(String),
    /// An argument is missing.
    #[error("`{command}` needs {what}, for example `{example}`")]
    Missing {
        /// The command.
        command: &'static str,
        /// What it needs.
        what: &'static str,
        /// An example.
        example: &'static str,
    },
    /// An argument is not what the command takes.
    #[error("`{command}`: `{arg}` is not {what}")]
    Bad {
        /// The command.
        command: &'static str,
        /// The argument given.
        arg: String,
        /// What it should be.
        what: &'static str,
    },
    /// More arguments than the command takes.
    #[error("`{0}` takes {1}")]
    TooMany(&'static str, &'static str),
}

/// Longest message read as a command; longer ones are answered with help.
pub const MAX_COMMAND_CHARS: usize = 1000;

/// Parse a message's body. The command word is case-insensitive and may start with `!`;
/// quoted reply lines (`> ...`) are skipped.
pub fn parse(body: &str) -> Result<Command, ParseError> {
    if body.chars().count() > MAX_COMMAND_CHARS {
        return Err(ParseError::Unknown(body.chars().take(20).collect::<String>() + "…"));
    }
    let text: Vec<&str> = body.lines().filter(|l| !l.trim_start().starts_with('>')).collect();
    let text = text.join(" ");
    let mut words = text.split_whitespace();
    let Some(word) = words.next() else { return Err(ParseError::Empty) };
    let word = word.trim_start_matches('!').to_lowercase();
    let args: Vec<&str> = words.collect();
    let none = |c: &'static str, cmd: Command| if args.is_empty() { Ok(cmd) } else { Err(ParseError::TooMany(c, "no argument")) };
    let one = |c: &'static str, what: &'static str, example: &'static str| match args.as_slice() {
        [] => Err(ParseError::Missing { command: c, what, example }),
        [a] => Ok(*a),
        _ => Err(ParseError::TooMany(c, "one argument")),
    };
    let user = |c: &'static str, a: &str| {
        ruma::UserId::parse(a).map_err(|_| ParseError::Bad { command: c, arg: a.to_owned(), what: "a Matrix user id like @you:server" })
    };
    let room = |c: &'static str, a: &str| {
        if a.starts_with('#') {
            ruma::RoomAliasId::parse(a).map(RoomRef::Alias).map_err(|_| ParseError::Bad { command: c, arg: a.to_owned(), what: "a room id or alias" })
        } else {
            ruma::RoomId::parse(a).map(RoomRef::Id).map_err(|_| ParseError::Bad { command: c, arg: a.to_owned(), what: "a room id (!id:server) or alias (#name:server)" })
        }
    };
    match word.as_str() {
        "help" | "?" => none("help", Command::Help),
        "status" => none("status", Command::Status),
        "pause" => none("pause", Command::Pause),
        "resume" => none("resume", Command::Resume),
        "off" => Ok(Command::Off(room("off", one("off", "a room", "off #team:kiwi.example")?)?)),
        "on" => Ok(Command::On(room("on", one("on", "a room", "on #team:kiwi.example")?)?)),
        "link" => Ok(Command::Link(user("link", one("link", "the account to link", "link @you:litchi.example")?)?)),
        "unlink" => Ok(Command::Unlink(user("unlink", one("unlink", "the account to unlink", "unlink @you:litchi.example")?)?)),
        "confirm" => {
            // A code may be typed with spaces or dashes, in any case.
            if args.is_empty() {
                return Err(ParseError::Missing { command: "confirm", what: "the code you were given", example: "confirm ABCD-EFGH" });
            }
            let code = normalize_code(&args.concat());
            if code.is_empty() || code.len() > 64 {
                return Err(ParseError::Bad { command: "confirm", arg: args.concat(), what: "a code" });
            }
            Ok(Command::Confirm(code))
        }
        other => Err(ParseError::Unknown(other.chars().take(40).collect())),
    }
}

/// A code as compared: upper case, without blanks and dashes.
pub fn normalize_code(code: &str) -> String {
    code.chars().filter(|c| !c.is_whitespace() && *c != '-').flat_map(char::to_uppercase).collect()
}

/// What the bot knows and may do while handling one command.
pub struct Ctx<'a> {
    /// The views.
    pub views: &'a Views,
    /// Routes and policy.
    pub routes: &'a Routes,
    /// Whether self-service linking is on (`bot.self_service_linking`).
    pub linking: bool,
    /// How long a link code is valid (ms).
    pub code_ttl_ms: u64,
    /// Now (ms since the epoch).
    pub now_ms: u64,
    /// A room's name, when the shell knows it.
    pub room_name: &'a dyn Fn(&OwnedRoomId) -> Option<String>,
    /// Wrong codes the sender sent since its last successful confirmation (the shell
    /// counts them).
    pub wrong_codes: u32,
}

/// Wrong codes an account may send; then its waiting requests are closed.
pub const MAX_WRONG_CODES: u32 = 5;

/// What a command does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// The answer, in the chat the command came from.
    pub reply: String,
    /// Directory changes and link bookkeeping to log with the answer.
    pub entries: Vec<Entry>,
    /// Other accounts to tell (in their own chats with the bot, if they have one).
    pub tell: Vec<(OwnedUserId, String)>,
    /// Whether the command was refused (for metrics).
    pub refused: bool,
    /// A `confirm` with a code that matched nothing (the shell counts these).
    pub wrong_code: bool,
}

impl Outcome {
    fn say(reply: impl Into<String>) -> Self {
        Outcome { reply: reply.into(), ..Default::default() }
    }
    fn refuse(reply: impl Into<String>) -> Self {
        Outcome { reply: reply.into(), refused: true, ..Default::default() }
    }
}

/// The help text.
pub fn help(bot: &str, linking: bool) -> String {
    let mut s = String::from(
        "I keep your Matrix accounts on different servers in step: same rooms, same read position.\n\
         Commands (send them here, one per message):\n\
         - status: your linked accounts and rooms, and anything I cannot do for you\n\
         - pause / resume: stop or restart syncing everywhere\n\
         - off <room> / on <room>: stop or restart syncing in one room (room id or #alias)\n",
    );
    if linking {
        s.push_str(&format!(
            "- link <@you:other.server>: link this account with another of yours; I answer with a code, \
             which you send as `confirm <code>` from the other account, in its own direct chat with me ({bot})\n\
             - unlink <@account>: unlink an account (yours or this one)\n"
        ));
    } else {
        s.push_str("- unlink <@account>: unlink an account you linked yourself\n(Linking accounts yourself is turned off on this server; your federation admin links accounts.)\n");
    }
    s.push_str("- help: this text\nI cannot read encrypted messages: talk to me in an unencrypted chat.");
    s
}

/// The person `account` belongs to.
fn person_of<'a>(views: &'a Views, account: &OwnedUserId) -> Option<(&'a String, &'a super::views::directory::Person)> {
    views.directory.person_of(account)
}

fn managed_by(source: LinkSource) -> &'static str {
    match source {
        LinkSource::Config => "your federation admin (in fedlink's configuration)",
        LinkSource::Admin => "your federation admin",
        LinkSource::Http => "your organisation's directory",
        LinkSource::SelfService => "you",
    }
}

fn list(accounts: impl IntoIterator<Item = impl std::fmt::Display>) -> String {
    accounts.into_iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
}

/// A fresh person id for a self-made person: from its smallest account, unique.
fn self_person_id(views: &Views, accounts: &BTreeSet<OwnedUserId>) -> String {
    let first = accounts.iter().next().map(|u| u.as_str()).unwrap_or("");
    let cleaned: String = first.chars().map(|c| if c.is_ascii_alphanumeric() || "._=-".contains(c) { c } else { '_' }).collect();
    let mut base = format!("self.{cleaned}");
    base.truncate(56);
    let mut id = base.clone();
    let mut n = 1;
    while views.directory.persons.contains_key(&id) || !valid_person_id(&id) {
        n += 1;
        id = format!("{base}.{n}");
    }
    id
}

/// Handle `cmd` from `sender` (the owner of the chat it came in). `code` is a fresh code
/// the shell drew, used by `link`; `code_hash` hashes a code the way requests store it.
pub fn handle(ctx: &Ctx, sender: &OwnedUserId, cmd: &Command, code: &str, code_hash: &dyn Fn(&str) -> String) -> Outcome {
    let views = ctx.views;
    let bot = &views.bot_user_id;
    match cmd {
        Command::Help => Outcome::say(help(bot.as_str(), ctx.linking)),
        Command::Status => Outcome::say(status(ctx, sender)),
        Command::Pause | Command::Resume => {
            let pause = matches!(cmd, Command::Pause);
            let Some((id, p)) = person_of(views, sender) else {
                return Outcome::refuse(format!("{sender} is not linked with any other account, so there is nothing to {}.", cmd.name()));
            };
            if p.opted_out == pause {
                return Outcome::say(if pause { "Syncing is already paused. Send `resume` to restart it." } else { "Syncing is already on." });
            }
            Outcome {
                reply: if pause {
                    format!("Paused: I no longer sync {} anywhere. Send `resume` to restart.", list(&p.accounts))
                } else {
                    format!("Resumed: I keep {} in step again.", list(&p.accounts))
                },
                entries: vec![Entry::OptOut(OptOut { person: id.clone(), room_id: None, opted_out: pause })],
                ..Default::default()
            }
        }
        Command::Off(room) | Command::On(room) => {
            let off = matches!(cmd, Command::Off(_));
            let RoomRef::Id(room_id) = room else {
                return Outcome::refuse("I could not find that room alias.");
            };
            let Some((id, p)) = person_of(views, sender) else {
                return Outcome::refuse(format!("{sender} is not linked with any other account, so there is nothing to turn {}.", cmd.name()));
            };
            // Only rooms of the person's accounts (nothing to learn about other rooms, and
            // the opt-out list stays as long as their rooms).
            let theirs = person_rooms(views, &p.accounts).any(|(r, _)| r == room_id);
            if !theirs && !p.opted_out_rooms.contains(room_id) {
                return Outcome::refuse(format!("None of your accounts is in {room_id} as far as I know."));
            }
            if p.opted_out_rooms.contains(room_id) == off {
                return Outcome::say(format!("Syncing in {} is already {}.", room_label(ctx, room_id), if off { "off" } else { "on" }));
            }
            Outcome {
                reply: format!("Syncing in {} is now {}.", room_label(ctx, room_id), if off { "off" } else { "on" }),
                entries: vec![Entry::OptOut(OptOut { person: id.clone(), room_id: Some(room_id.clone()), opted_out: off })],
                ..Default::default()
            }
        }
        Command::Link(other) => link(ctx, sender, other, code, code_hash),
        Command::Confirm(given) => confirm(ctx, sender, given, code_hash),
        Command::Unlink(other) => unlink(ctx, sender, other),
    }
}

fn link(ctx: &Ctx, sender: &OwnedUserId, other: &OwnedUserId, code: &str, code_hash: &dyn Fn(&str) -> String) -> Outcome {
    let views = ctx.views;
    if !ctx.linking {
        return Outcome::refuse("Linking accounts yourself is turned off on this server; ask your federation admin.");
    }
    if other == sender {
        return Outcome::refuse("That is this account. Name your other account, for example `link @you:other.server`.");
    }
    if other.server_name() == views.bot_user_id.server_name() {
        return Outcome::refuse(format!("{other} is on my own server; I link people's homeserver accounts only."));
    }
    if let Some((_, p)) = person_of(views, sender) {
        if p.accounts.contains(other) {
            return Outcome::say(format!("{sender} and {other} are already linked."));
        }
        if p.source != LinkSource::SelfService {
            return Outcome::refuse(format!(
                "{sender} was linked by {}; links made there win over links you make, so I cannot change them. Ask them to add {other}.",
                managed_by(p.source)
            ));
        }
        if p.accounts.len() >= MAX_SELF_ACCOUNTS {
            return Outcome::refuse(format!("You have {} linked accounts, the most I keep for one person.", p.accounts.len()));
        }
    }
    let minutes = ctx.code_ttl_ms.div_ceil(60_000);
    let mut entries = Vec::new();
    if views.directory.link_requests.contains_key(sender) {
        entries.push(Entry::LinkClosed(LinkClosed { from: sender.clone(), outcome: "replaced".into() }));
    }
    entries.push(Entry::LinkRequested(LinkRequested {
        from: sender.clone(),
        to: other.clone(),
        code_sha256: code_hash(code),
        expires_ms: ctx.now_ms.saturating_add(ctx.code_ttl_ms),
    }));
    // The answer is the same whether or not `other` is linked elsewhere: it reveals nothing.
    Outcome {
        reply: format!(
            "To link {other} with {sender}, send\n\n    confirm {code}\n\nfrom {other}, in its own direct chat with me ({bot}). \
             The code expires in {minutes} minutes. Nothing is linked until then; a new `link` replaces this request.",
            bot = views.bot_user_id
        ),
        entries,
        ..Default::default()
    }
}

fn confirm(ctx: &Ctx, sender: &OwnedUserId, given: &str, code_hash: &dyn Fn(&str) -> String) -> Outcome {
    let views = ctx.views;
    if !ctx.linking {
        return Outcome::refuse("Linking accounts yourself is turned off on this server; ask your federation admin.");
    }
    let waiting: Vec<&LinkRequested> = views.directory.link_requests.values().filter(|r| &r.to == sender).collect();
    if ctx.wrong_codes >= MAX_WRONG_CODES {
        // Guessing stops here: the requests for this account are closed.
        return Outcome {
            reply: "Too many wrong codes. I closed the link requests for this account; send `link` again from your other account for a new code.".into(),
            entries: waiting.iter().map(|r| Entry::LinkClosed(LinkClosed { from: r.from.clone(), outcome: "too_many_attempts".into() })).collect(),
            refused: true,
            ..Default::default()
        };
    }
    // Only requests made for this account count: a code made for another account matches
    // nothing here (it is confirmed from that account's own chat).
    let hash = code_hash(given);
    let Some(req) = waiting.iter().find(|r| r.code_sha256 == hash) else {
        let open = waiting.iter().any(|r| r.expires_ms > ctx.now_ms);
        return Outcome {
            reply: if open {
                "That code does not match the link request waiting for this account. Check it, or send `link` again from your other account for a new one."
            } else {
                "No link request is waiting for this account. Send `link <this account>` from your other account first."
            }
            .into(),
            refused: true,
            wrong_code: true,
            ..Default::default()
        };
    };
    let closed = |outcome: &str| Entry::LinkClosed(LinkClosed { from: req.from.clone(), outcome: outcome.into() });
    if req.expires_ms <= ctx.now_ms {
        return Outcome {
            reply: format!("This code has expired. Send `link {sender}` again from {} for a new one.", req.from),
            entries: vec![closed("expired")],
            refused: true,
            ..Default::default()
        };
    }
    let from = &req.from;
    let refuse_closing = |reply: String| Outcome { reply, entries: vec![closed("refused")], refused: true, ..Default::default() };
    let pa = person_of(views, from);
    let pb = person_of(views, sender);
    if let (Some((a, _)), Some((b, _))) = (&pa, &pb) {
        if a == b {
            return Outcome { reply: format!("{from} and {sender} are already linked."), entries: vec![closed("confirmed")], ..Default::default() };
        }
    }
    for (account, p) in [(from, &pa), (sender, &pb)] {
        if let Some((_, p)) = p.filter(|(_, p)| p.source != LinkSource::SelfService) {
            let whose = if account == sender { "This account".to_owned() } else { account.to_string() };
            return refuse_closing(format!(
                "{whose} was linked by {}; their links win over links you make, so I cannot link {from} and {sender}. Ask them.",
                managed_by(p.source)
            ));
        }
    }
    let mut accounts: BTreeSet<OwnedUserId> = [from.clone(), sender.clone()].into();
    for (_, p) in pa.iter().chain(pb.iter()) {
        accounts.extend(p.accounts.iter().cloned());
    }
    if accounts.len() > MAX_SELF_ACCOUNTS {
        return refuse_closing(format!("That would make {} linked accounts, more than the {MAX_SELF_ACCOUNTS} I keep for one person.", accounts.len()));
    }
    // The person of the asking account keeps its id (and its settings); the other's is merged in.
    let id = match (&pa, &pb) {
        (Some((a, _)), _) => (*a).clone(),
        (None, Some((b, _))) => (*b).clone(),
        (None, None) => self_person_id(views, &accounts),
    };
    let mut entries = Vec::new();
    if let (Some((a, _)), Some((b, _))) = (&pa, &pb) {
        if a != b {
            entries.push(Entry::PersonRemoved(PersonRemoved { person: (*b).clone(), source: LinkSource::SelfService }));
        }
    }
    entries.push(Entry::PersonSet(PersonSet { person: id, accounts: accounts.iter().cloned().collect(), source: LinkSource::SelfService }));
    entries.push(closed("confirmed"));
    let done = format!("Linked: {}. I now keep these accounts in step. Send `status` to see your rooms, `unlink` to undo.", list(&accounts));
    Outcome { reply: done.clone(), entries, tell: vec![(from.clone(), done)], ..Default::default() }
}

fn unlink(ctx: &Ctx, sender: &OwnedUserId, other: &OwnedUserId) -> Outcome {
    let views = ctx.views;
    let Some((id, p)) = person_of(views, sender) else {
        return Outcome::refuse(format!("{sender} is not linked with any other account."));
    };
    if !p.accounts.contains(other) {
        return Outcome::refuse(format!("{other} is not linked with {sender}."));
    }
    if p.source != LinkSource::SelfService {
        return Outcome::refuse(format!(
            "These accounts were linked by {}; I cannot unlink them for you. Ask them, or send `pause` to stop syncing.",
            managed_by(p.source)
        ));
    }
    let rest: Vec<OwnedUserId> = p.accounts.iter().filter(|a| *a != other).cloned().collect();
    let entry = if rest.len() >= 2 {
        Entry::PersonSet(PersonSet { person: id.clone(), accounts: rest.clone(), source: LinkSource::SelfService })
    } else {
        Entry::PersonRemoved(PersonRemoved { person: id.clone(), source: LinkSource::SelfService })
    };
    let reply = if rest.len() >= 2 {
        format!("Unlinked {other}. Still linked: {}.", list(&rest))
    } else {
        format!("Unlinked {other}. {} is not linked with any other account now.", list(&rest))
    };
    let tell = if other != sender { vec![(other.clone(), format!("{sender} unlinked {other}: I no longer keep them in step."))] } else { Vec::new() };
    Outcome { reply, entries: vec![entry], tell, ..Default::default() }
}

fn room_label(ctx: &Ctx, room_id: &OwnedRoomId) -> String {
    labelled((ctx.room_name)(room_id), room_id)
}

/// A room as the bot names it: `"Name" (!id)`, or the id.
fn labelled(name: Option<String>, room_id: &OwnedRoomId) -> String {
    match name {
        Some(name) => format!("\"{name}\" ({room_id})"),
        None => room_id.to_string(),
    }
}

/// Why `account` is not in step in `room` (a reason kind and words for the person), for
/// an account in state `step`. `None` for an account in step.
pub fn explain(room: &RoomView, bot: &OwnedUserId, account: &OwnedUserId, step: Step) -> Option<(&'static str, String)> {
    let kind = reason_kind(room, bot, account, step)?;
    let server = account.server_name();
    let text = match kind {
        "invite_pending" => format!("{account} is invited; accept the invite to join"),
        "catching_up" => format!("{account}: I am bringing it in step (an invite, join or read is under way)"),
        "no_registration" => {
            let kinds = room.unsupported.get(account).map(list).unwrap_or_else(|| "act".into());
            format!("{server} has no registration for me, so I cannot {kinds} for {account}; its admin can add one")
        }
        "missing_power" => match (room.failed_invites.get(account), &room.power) {
            (Some(f), _) => format!("I cannot invite {account}: {}. A room admin can raise my power level", f.reason),
            (None, Some(p)) => format!("I cannot invite {account}: my power level is {}, inviting needs {}. A room admin can raise it", p.level(bot), p.invite),
            (None, None) => format!("I cannot invite {account}. A room admin can raise my power level"),
        },
        // "refused": whichever refusal holds the account up.
        _ => match (room.failed_invites.get(account), room.blocked_actions.get(account), room.direct_failed.get(account)) {
            (Some(f), _, _) => format!("the invite for {account} was refused: {}", f.reason),
            (None, Some(a), _) => format!("{server}'s homeserver refused to {} for it: {}", a.kind, a.reason.as_deref().unwrap_or_default()),
            (None, None, Some(why)) => format!("I could not list this direct chat for {account}: {why}"),
            (None, None, None) => format!("{server}'s homeserver refused a read in a thread for {account}"),
        },
    };
    Some((kind, text))
}

/// Why `account` is not in step (the kind [`explain`] words), or `None` when it is.
fn reason_kind(room: &RoomView, bot: &OwnedUserId, account: &OwnedUserId, step: Step) -> Option<&'static str> {
    match step {
        Step::InStep if room.membership(account) == Some("invite") => Some("invite_pending"),
        Step::InStep | Step::OptedOut => None,
        Step::CatchingUp => Some("catching_up"),
        Step::Unsupported => Some("no_registration"),
        Step::Blocked => Some(match room.failed_invites.get(account) {
            Some(f) if f.power_levels_event.is_some() || f.reason.contains("power") => "missing_power",
            Some(_) => "refused",
            None if room.power.as_ref().is_some_and(|p| p.level(bot) < p.invite && room.membership(account).is_none()) => "missing_power",
            None => "refused",
        }),
    }
}

/// The rooms where any of `accounts` is, or where fedlink has work for them.
pub fn person_rooms<'a>(views: &'a Views, accounts: &'a BTreeSet<OwnedUserId>) -> impl Iterator<Item = (&'a OwnedRoomId, &'a RoomView)> {
    views.rooms.iter().filter(move |(_, r)| {
        r.bot_chat.is_none() && accounts.iter().any(|a| r.members.contains_key(a) || r.pending_invites.contains_key(a) || r.failed_invites.contains_key(a))
    })
}

fn status(ctx: &Ctx, sender: &OwnedUserId) -> String {
    let views = ctx.views;
    let mut out = String::new();
    let requests: Vec<String> = views
        .directory
        .link_requests
        .values()
        .filter(|r| &r.from == sender && r.expires_ms > ctx.now_ms)
        .map(|r| format!("Waiting for {} to confirm the link (the code expires in {} minutes).", r.to, (r.expires_ms - ctx.now_ms).div_ceil(60_000)))
        .collect();
    let Some((_, p)) = person_of(views, sender) else {
        out.push_str(&format!("{sender} is not linked with any other account."));
        if ctx.linking {
            out.push_str(" Send `link @you:other.server` to link one.");
        }
        for r in requests {
            out.push('\n');
            out.push_str(&r);
        }
        return out;
    };
    out.push_str(&format!("Linked accounts: {} (linked by {}).\n", list(&p.accounts), managed_by(p.source)));
    out.push_str(if p.opted_out { "Syncing is paused everywhere (send `resume` to restart).\n" } else { "Syncing is on.\n" });
    for r in requests {
        out.push_str(&r);
        out.push('\n');
    }
    // Rooms are named (a store read each) only as far as they are listed.
    let mut in_step: Vec<&OwnedRoomId> = Vec::new();
    let mut problems: Vec<(&OwnedRoomId, Vec<String>)> = Vec::new();
    let mut off: Vec<&OwnedRoomId> = Vec::new();
    for (room_id, room) in person_rooms(views, &p.accounts) {
        if p.opted_out_rooms.contains(room_id) {
            off.push(room_id);
            continue;
        }
        if p.opted_out {
            continue;
        }
        let steps = room_steps(views, ctx.routes, room_id, &p.accounts);
        let reasons: Vec<String> = steps.iter().filter_map(|(a, s)| explain(room, &views.bot_user_id, a, *s).map(|(_, text)| text)).collect();
        if steps.is_empty() {
            continue;
        }
        if reasons.is_empty() {
            in_step.push(room_id);
        } else {
            problems.push((room_id, reasons));
        }
    }
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    if !p.opted_out {
        out.push_str(&format!("In step in {} room{}", in_step.len(), plural(in_step.len())));
        if !in_step.is_empty() {
            out.push_str(&format!(": {}", list(in_step.iter().take(MAX_LISTED_ROOMS).map(|r| room_label(ctx, r)))));
            if in_step.len() > MAX_LISTED_ROOMS {
                out.push_str(&format!(" and {} more", in_step.len() - MAX_LISTED_ROOMS));
            }
        }
        out.push_str(".\n");
        if problems.is_empty() {
            out.push_str("Nothing is out of step.\n");
        } else {
            out.push_str(&format!("Not in step in {} room{}:\n", problems.len(), plural(problems.len())));
            for (r, why) in problems.iter().take(MAX_LISTED_ROOMS) {
                out.push_str(&format!("- {}: {}\n", room_label(ctx, r), why.join("; ")));
            }
            if problems.len() > MAX_LISTED_ROOMS {
                out.push_str(&format!("… and {} more.\n", problems.len() - MAX_LISTED_ROOMS));
            }
        }
    }
    if !off.is_empty() {
        out.push_str(&format!("Turned off (opted out) in: {}.\n", list(off.iter().take(MAX_LISTED_ROOMS).map(|r| room_label(ctx, r)))));
    }
    out.trim_end().to_owned()
}

/// A problem worth telling a person about, once per room and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The chat to tell it in.
    pub chat: OwnedRoomId,
    /// The account concerned.
    pub account: OwnedUserId,
    /// The room it is about.
    pub about: OwnedRoomId,
    /// `missing_power`, `no_registration` or `refused`.
    pub reason: &'static str,
    /// What to say.
    pub text: String,
}

/// The chat where fedlink talks to the person owning `accounts`: the first of their
/// accounts' chats with the bot that is one now (only the owner and the bot in it).
pub fn chat_of(views: &Views, accounts: &BTreeSet<OwnedUserId>) -> Option<OwnedRoomId> {
    accounts
        .iter()
        .filter_map(|a| views.index.chats.get(a))
        .flatten()
        .find(|id| views.rooms.get(*id).is_some_and(|r| r.chat_owner(&views.bot_user_id).is_some()))
        .cloned()
}

/// What to tell people about accounts fedlink cannot keep in step (`out_of_step`, from the
/// step report): blocked or unsupported ones, and rooms the bot gave up joining (told to
/// the linked person who invited it), in the person's chat with the bot, once per room and
/// reason (the chat's `told` set). Catching up is not a problem worth a message.
pub fn notices(views: &Views, out_of_step: &BTreeMap<(OwnedRoomId, OwnedUserId), Step>, room_name: &dyn Fn(&OwnedRoomId) -> Option<String>) -> Vec<Notice> {
    let mut out: Vec<Notice> = Vec::new();
    let mut seen: BTreeSet<(OwnedRoomId, OwnedRoomId, &'static str)> = BTreeSet::new();
    let mut chats: BTreeMap<&String, Option<OwnedRoomId>> = BTreeMap::new();
    for ((room_id, account), step) in out_of_step {
        if !matches!(step, Step::Blocked | Step::Unsupported) {
            continue;
        }
        let Some((pid, person)) = views.directory.person_of(account) else { continue };
        let chat = chats.entry(pid).or_insert_with(|| chat_of(views, &person.accounts));
        let Some(chat) = chat.clone() else { continue };
        let Some(room) = views.rooms.get(room_id) else { continue };
        // Cheap checks first: most problems were told long ago; words only for new ones.
        let Some(kind) = reason_kind(room, &views.bot_user_id, account, *step) else { continue };
        if told(views, &chat, room_id, kind) || !seen.insert((chat.clone(), room_id.clone(), kind)) {
            continue;
        }
        let Some((reason, text)) = explain(room, &views.bot_user_id, account, *step) else { continue };
        let name = labelled(room_name(room_id), room_id);
        out.push(Notice {
            chat,
            account: account.clone(),
            about: room_id.clone(),
            reason,
            text: format!("{name}: {text}"),
        });
    }
    // Rooms the bot gave up joining, told to the linked person who invited it.
    for room_id in &views.index.join_failed {
        let Some(room) = views.rooms.get(room_id) else { continue };
        let super::views::BotMembership::JoinFailed { inviter, reason, .. } = &room.bot else { continue };
        let Some((_, person)) = views.directory.person_of(inviter) else { continue };
        let Some(chat) = chat_of(views, &person.accounts) else { continue };
        if told(views, &chat, room_id, "join_failed") {
            continue;
        }
        let name = labelled(room_name(room_id), room_id);
        out.push(Notice {
            chat,
            account: inviter.clone(),
            about: room_id.clone(),
            reason: "join_failed",
            text: format!("{name}: you invited me, but I gave up joining ({reason}); invite me again to retry"),
        });
    }
    out
}

/// Whether the bot told chat `chat` about `about` for `reason` already.
pub fn told(views: &Views, chat: &OwnedRoomId, about: &OwnedRoomId, reason: &str) -> bool {
    views.rooms.get(chat).and_then(|c| c.bot_chat.as_ref()).is_some_and(|c| c.told_about(about, reason))
}

/// One message for a chat's notices: a line per room, at most [`MAX_LISTED_ROOMS`], and a
/// count of the others.
pub fn notices_text(lines: &[&Notice]) -> String {
    let mut s = String::from("I cannot keep your accounts fully in step here:\n");
    for n in lines.iter().take(MAX_LISTED_ROOMS) {
        s.push_str("- ");
        s.push_str(&n.text);
        s.push('\n');
    }
    if lines.len() > MAX_LISTED_ROOMS {
        s.push_str(&format!("- and {} more rooms.\n", lines.len() - MAX_LISTED_ROOMS));
    }
    s.push_str("I tell you about each room and reason once; send `status` to see where things stand.");
    s
}

/// What the bot says, once, in an encrypted chat.
pub fn encrypted_notice(bot: &OwnedUserId) -> String {
    format!(
        "This chat is encrypted and I cannot read encrypted messages, so I cannot see your commands here. \
         Start a new direct chat with me ({bot}) without encryption and send `help`."
    )
}

#[cfg(test)]
mod tests;
