//! Typed configuration: TOML file, `FEDLINK_*` environment overrides, defaults, and
//! validation in one place with errors that name the offending key.
//!
//! Environment overrides address keys by path: a double underscore separates table levels,
//! so `FEDLINK_SERVER_NAME` sets `server_name` and `FEDLINK_LISTEN__FEDERATION` sets
//! `listen.federation`. Values are parsed as TOML values when they parse (numbers, booleans,
//! `["a","b"]` arrays), otherwise taken as strings; a comma-separated string is accepted for
//! list keys.
//!
//! This module does no network I/O and never logs secrets: [`Config::redacted`] is what
//! `check-config` prints.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// A configuration error; the message always names the key or file involved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The TOML did not parse or did not match the schema.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A key has an invalid value.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), reason: reason.into() }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// fedlink's federation server name; may carry a port (`localhost:8490`).
    pub server_name: String,
    /// Listening sockets.
    #[serde(default)]
    pub listen: Listen,
    /// TLS certificate and key for the federation listener.
    pub tls: Tls,
    /// fedlink's own signing key.
    #[serde(default)]
    pub keys: Keys,
    /// Where the sled database lives.
    #[serde(default)]
    pub storage: Storage,
    /// Memory housekeeping.
    #[serde(default)]
    pub memory: Memory,
    /// Who fedlink talks to and how.
    #[serde(default)]
    pub federation: Federation,
    /// The bot account fedlink places in rooms.
    #[serde(default)]
    pub bot: Bot,
    /// How accounts are kept in step.
    #[serde(default)]
    pub sync: SyncConfig,
    /// Admin API access.
    #[serde(default)]
    pub admin: Admin,
    /// Linked identities.
    #[serde(default)]
    pub directory: DirectoryConfig,
    /// Application-service registrations on homeservers (the route for acting as their users).
    #[serde(default)]
    pub appservice: Vec<AppserviceConfig>,
    /// How homeservers reach fedlink's application-service endpoint.
    #[serde(default)]
    pub appservice_endpoint: AppserviceEndpoint,
}

/// `[appservice_endpoint]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceEndpoint {
    /// Base URL homeservers push transactions to (plain HTTP on the metrics listener by
    /// default: Synapse checks appservice TLS against the system CAs).
    #[serde(default)]
    pub url: Option<String>,
}

/// One `[[appservice]]`: fedlink registered on a homeserver.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceConfig {
    /// The homeserver's server name.
    pub server_name: String,
    /// Its client-server API base URL.
    pub client_url: String,
    /// Token fedlink uses to act on the homeserver.
    pub as_token: String,
    /// Token the homeserver uses to push to fedlink.
    pub hs_token: String,
    /// Regex of the users fedlink may act as (default: every user of the server).
    #[serde(default)]
    pub user_regex: Option<String>,
    /// The registration's sender localpart.
    #[serde(default = "default_bot_localpart")]
    pub sender_localpart: String,
    /// Join invited sibling accounts automatically.
    #[serde(default = "yes")]
    pub auto_join: bool,
    /// Leave a room on this server when the person left it on another account.
    #[serde(default = "yes")]
    pub mirror_leave: bool,
    /// Show siblings online when one account goes online.
    #[serde(default)]
    pub presence: bool,
    /// CA certificates (PEM) that sign `client_url`'s TLS certificate, trusted next to
    /// the system's and the built-in (Mozilla) roots (default: `federation.ca_file`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl AppserviceConfig {
    /// The user namespace regex.
    pub fn regex(&self) -> String {
        self.user_regex.clone().unwrap_or_else(|| {
            let escaped: String = self.server_name.chars().flat_map(|c| if c.is_ascii_alphanumeric() { vec![c] } else { vec!['\\', c] }).collect();
            format!("@.*:{escaped}")
        })
    }
}

/// `[directory]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Static links: `[[directory.person]] id = "alice", accounts = [...]`.
    #[serde(default)]
    pub person: Vec<PersonConfig>,
    /// HTTP directory compatible with the earlier Synapse module: `GET <url><mxid>`
    /// answers a JSON array of the other MXIDs linked to it.
    #[serde(default)]
    pub url: Option<String>,
    /// How long an HTTP directory answer is trusted, in seconds.
    #[serde(default = "default_directory_ttl")]
    pub ttl_secs: u64,
}

fn default_directory_ttl() -> u64 {
    300
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self { person: Vec::new(), url: None, ttl_secs: default_directory_ttl() }
    }
}

/// One statically linked person.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonConfig {
    /// The person's id.
    pub id: String,
    /// Their accounts.
    pub accounts: Vec<String>,
}

/// `[listen]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Federation listener (TLS).
    #[serde(default = "default_federation_listen")]
    pub federation: String,
    /// Metrics and admin API listener (plain HTTP; keep it on a private interface).
    #[serde(default = "default_metrics_listen")]
    pub metrics: String,
}

impl Default for Listen {
    fn default() -> Self {
        Self { federation: default_federation_listen(), metrics: default_metrics_listen() }
    }
}
fn default_federation_listen() -> String {
    "127.0.0.1:8490".into()
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9490".into()
}

/// `[tls]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Create a self-signed certificate at `cert`/`key` when they are missing. For loopback
    /// and test setups only; peers must then run with certificate checks off.
    #[serde(default)]
    pub self_signed: bool,
}

/// `[keys]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keys {
    /// Signing key file in Synapse's format; created on first start if missing.
    #[serde(default = "default_signing_key")]
    pub signing_key: PathBuf,
    /// How long other servers may cache our key, in hours.
    #[serde(default = "default_key_validity_hours")]
    pub validity_hours: u64,
}
impl Default for Keys {
    fn default() -> Self {
        Self { signing_key: default_signing_key(), validity_hours: default_key_validity_hours() }
    }
}
fn default_signing_key() -> PathBuf {
    "keys/signing.key".into()
}
fn default_key_validity_hours() -> u64 {
    24 * 7
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// The sled directory.
    #[serde(default = "default_storage_path")]
    pub path: PathBuf,
    /// sled's page cache, in MiB (sled's own default, 1 GiB, lets fedlink's memory grow
    /// with the log).
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// Write sled's pages zstd-compressed: less disk for less ingest and join speed (see
    /// Performance in the README). Fixed when the database is created. Unset:
    /// an existing database keeps what it was created with, a new one is compressed. Set:
    /// a new database is created with it, and an existing one must have been.
    #[serde(default)]
    pub compression: Option<bool>,
}
impl Default for Storage {
    fn default() -> Self {
        Self { path: default_storage_path(), cache_mb: default_cache_mb(), compression: None }
    }
}
fn default_cache_mb() -> u64 {
    32
}
fn default_storage_path() -> PathBuf {
    "data/fedlink.sled".into()
}

/// `[memory]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// Every this many seconds, give the allocator's free pages back to the system (see
    /// `memory`); 0 never does.
    #[serde(default = "default_trim_secs")]
    pub trim_secs: u64,
}
impl Default for Memory {
    fn default() -> Self {
        Self { trim_secs: default_trim_secs() }
    }
}
fn default_trim_secs() -> u64 {
    10
}

/// `[federation]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Federation {
    /// Servers allowed to talk to fedlink; empty means any.
    #[serde(default, deserialize_with = "list_or_csv")]
    pub allowed_servers: Vec<String>,
    /// Verify peers' TLS certificates (turn off only on loopback test setups).
    #[serde(default = "yes")]
    pub verify_tls: bool,
    /// Extra CA bundle (PEM) to trust for peers.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Static server name -> base URL overrides, bypassing discovery.
    #[serde(default)]
    pub destinations: BTreeMap<String, String>,
    /// Largest accepted federation request body, in bytes.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Timeout for outbound federation requests, in seconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Allow outbound connections to loopback and private addresses (off by default so a
    /// hostile peer cannot point fedlink at internal services; on for loopback setups).
    #[serde(default)]
    pub allow_private_networks: bool,
    /// Largest response body accepted from a peer, in bytes (send_join answers can be big).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Most inbound requests one origin may have in flight; more get 429 `M_LIMIT_EXCEEDED`
    /// (in the spirit of Synapse's `rc_federation.concurrent`).
    #[serde(default = "default_max_inflight_per_origin")]
    pub max_inflight_per_origin: usize,
}
impl Default for Federation {
    fn default() -> Self {
        Self {
            allowed_servers: Vec::new(),
            verify_tls: true,
            ca_file: None,
            destinations: BTreeMap::new(),
            max_request_bytes: default_max_request_bytes(),
            request_timeout_secs: default_request_timeout(),
            allow_private_networks: false,
            max_response_bytes: default_max_response_bytes(),
            max_inflight_per_origin: default_max_inflight_per_origin(),
        }
    }
}
fn yes() -> bool {
    true
}
fn default_max_request_bytes() -> usize {
    // 50 PDUs of 64 KiB plus 100 EDUs and framing.
    8 * 1024 * 1024
}
fn default_max_response_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_inflight_per_origin() -> usize {
    8
}
fn default_request_timeout() -> u64 {
    30
}

/// `[bot]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bot {
    /// Localpart of the bot user, `@<localpart>:<server_name>`.
    #[serde(default = "default_bot_localpart")]
    pub localpart: String,
    /// Display name served through the profile query.
    #[serde(default = "default_bot_displayname")]
    pub displayname: String,
    /// Who may invite the bot: server names (`kiwi.example`) or user patterns with `*`
    /// wildcards (`@admin-*:kiwi.example`). Empty: any user of an allowed server.
    #[serde(default, deserialize_with = "list_or_csv")]
    pub invites_from: Vec<String>,
    /// Most rooms the bot is in or joining; further invites are refused.
    #[serde(default = "default_max_rooms")]
    pub max_rooms: usize,
    /// Any account of an allowed server may open a direct chat with the bot (`is_direct`
    /// invite), whatever `invites_from` says, to give it commands. Nobody is synced into
    /// such a chat.
    #[serde(default = "yes")]
    pub direct_chats: bool,
    /// People may link their own accounts (`link` / `confirm` in their direct chats).
    /// Config, admin and HTTP directory links win over self-made ones either way.
    #[serde(default = "yes")]
    pub self_service_linking: bool,
    /// How long a `link` code stays valid, in seconds.
    #[serde(default = "default_link_code_ttl")]
    pub link_code_ttl_secs: u64,
}
impl Default for Bot {
    fn default() -> Self {
        Self {
            localpart: default_bot_localpart(),
            displayname: default_bot_displayname(),
            invites_from: Vec::new(),
            max_rooms: default_max_rooms(),
            direct_chats: true,
            self_service_linking: true,
            link_code_ttl_secs: default_link_code_ttl(),
        }
    }
}
fn default_link_code_ttl() -> u64 {
    600
}

/// `[sync]`: how fedlink keeps a person's accounts in step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// `on_invite` (default): a person's other accounts are invited as soon as one is
    /// invited. `on_join`: only once one of them has joined, so an inviter cannot learn a
    /// person's other accounts by inviting one of them.
    #[serde(default)]
    pub invite_siblings: InviteSiblingsConfig,
}

/// `sync.invite_siblings`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InviteSiblingsConfig {
    /// Invite siblings when one account is invited.
    #[default]
    OnInvite,
    /// Invite siblings when one account joined.
    OnJoin,
}
fn default_max_rooms() -> usize {
    10_000
}

impl Bot {
    /// Whether `inviter` may invite the bot (`invites_from`; empty allows anyone the
    /// federation allow-list lets in).
    pub fn may_invite(&self, inviter: &ruma::UserId) -> bool {
        self.invites_from.is_empty()
            || self.invites_from.iter().any(|p| {
                if p.starts_with('@') {
                    crate::rooms::glob_match(p, inviter.as_str())
                } else {
                    p == inviter.server_name().as_str()
                }
            })
    }
}
fn default_bot_localpart() -> String {
    "fedlink".into()
}
fn default_bot_displayname() -> String {
    "fedlink".into()
}

/// `[admin]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Bearer token for the admin API.
    #[serde(default)]
    pub token: Option<String>,
    /// File holding the bearer token (first line), instead of `token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum L {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match L::deserialize(d)? {
        L::List(l) => l,
        L::Csv(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
    })
}

impl Config {
    /// Load `path`, apply `FEDLINK_*` overrides from `env`, and validate.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, env, base)
    }

    /// Parse TOML text, apply overrides, resolve relative paths against `base`, validate.
    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        base: &Path,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix("FEDLINK_") else { continue };
            // Variables that are not config keys (logging, test plumbing) are ignored.
            if matches!(rest, "LOG" | "LOG_FORMAT" | "CONFIG" | "SCHEMATHESIS" | "TEST_TOOLS") || ["SYNAPSE", "PROMETHEUS", "KEEP_"].iter().any(|p| rest.starts_with(p)) {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut value, &path, parse_env_value(&raw));
        }
        let mut cfg: Config = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.keys.signing_key);
        fix(&mut self.storage.path);
        if let Some(p) = self.federation.ca_file.as_mut() {
            fix(p);
        }
        for a in &mut self.appservice {
            if let Some(p) = a.ca_file.as_mut() {
                fix(p);
            }
        }
        if let Some(p) = self.admin.token_file.as_mut() {
            fix(p);
        }
    }

    /// Check every key; the first problem found is returned, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ruma::ServerName::parse(&self.server_name)
            .map_err(|e| invalid("server_name", format!("`{}` is not a server name: {e}", self.server_name)))?;
        self.federation_addr()?;
        self.metrics_addr()?;
        for (i, s) in self.federation.allowed_servers.iter().enumerate() {
            ruma::ServerName::parse(s)
                .map_err(|e| invalid(&format!("federation.allowed_servers[{i}]"), format!("`{s}`: {e}")))?;
        }
        for (name, url) in &self.federation.destinations {
            ruma::ServerName::parse(name)
                .map_err(|e| invalid(&format!("federation.destinations.{name}"), format!("bad server name: {e}")))?;
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(&format!("federation.destinations.{name}"), format!("`{url}` must be an http(s) base URL")));
            }
        }
        if self.federation.max_request_bytes < 65_536 {
            return Err(invalid("federation.max_request_bytes", "must be at least 65536 (one PDU)"));
        }
        if self.federation.max_inflight_per_origin == 0 {
            return Err(invalid("federation.max_inflight_per_origin", "must be positive"));
        }
        if !(8..=65_536).contains(&self.storage.cache_mb) {
            return Err(invalid("storage.cache_mb", "must be between 8 and 65536 (MiB)"));
        }
        if self.memory.trim_secs > 86_400 {
            return Err(invalid("memory.trim_secs", "must be between 0 (never) and 86400 (seconds)"));
        }
        if self.bot.max_rooms == 0 {
            return Err(invalid("bot.max_rooms", "must be positive"));
        }
        for (i, p) in self.bot.invites_from.iter().enumerate() {
            let ok = if p.starts_with('@') { p.contains(':') } else { ruma::ServerName::parse(p).is_ok() };
            if !ok {
                return Err(invalid(&format!("bot.invites_from[{i}]"), format!("`{p}` is neither a server name nor a user pattern like `@*:kiwi.example`")));
            }
        }
        if self.bot.link_code_ttl_secs == 0 || self.bot.link_code_ttl_secs > 7 * 86_400 {
            return Err(invalid("bot.link_code_ttl_secs", "must be between 1 and 604800 (a week)"));
        }
        if self.federation.request_timeout_secs == 0 {
            return Err(invalid("federation.request_timeout_secs", "must be positive"));
        }
        if self.keys.validity_hours == 0 {
            return Err(invalid("keys.validity_hours", "must be positive"));
        }
        let bot = format!("@{}:{}", self.bot.localpart, self.server_name);
        ruma::UserId::parse(&bot).map_err(|e| invalid("bot.localpart", format!("`{bot}` is not a valid user id: {e}")))?;
        if self.bot.localpart.is_empty()
            || !self.bot.localpart.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/+".contains(c))
        {
            return Err(invalid("bot.localpart", "use lowercase letters, digits and ._=-/+ only"));
        }
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (i, p) in self.directory.person.iter().enumerate() {
            let key = format!("directory.person[{i}]");
            if !crate::core::views::directory::valid_person_id(&p.id) {
                return Err(invalid(&format!("{key}.id"), "must be 1-64 characters of [A-Za-z0-9._=-]"));
            }
            if p.accounts.len() < 2 {
                return Err(invalid(&format!("{key}.accounts"), "a person needs at least two accounts"));
            }
            for a in &p.accounts {
                ruma::UserId::parse(a).map_err(|e| invalid(&format!("{key}.accounts"), format!("`{a}`: {e}")))?;
                if let Some(other) = seen.insert(a.clone(), p.id.clone()) {
                    if other != p.id {
                        return Err(invalid(&format!("{key}.accounts"), format!("`{a}` already belongs to person `{other}`")));
                    }
                }
            }
        }
        if let Some(url) = &self.directory.url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid("directory.url", "must be an http(s) URL"));
            }
        }
        let mut hs_tokens = std::collections::BTreeSet::new();
        for (i, a) in self.appservice.iter().enumerate() {
            let key = format!("appservice[{i}]");
            ruma::ServerName::parse(&a.server_name).map_err(|e| invalid(&format!("{key}.server_name"), format!("`{}`: {e}", a.server_name)))?;
            if !(a.client_url.starts_with("https://") || a.client_url.starts_with("http://")) {
                return Err(invalid(&format!("{key}.client_url"), "must be an http(s) URL"));
            }
            // A template's placeholder ("<...>") or a pasted line with spaces is not a token.
            for (name, t) in [("as_token", &a.as_token), ("hs_token", &a.hs_token)] {
                if t.contains(['<', '>']) || t.chars().any(char::is_whitespace) {
                    return Err(invalid(&format!("{key}.{name}"), "is a placeholder or contains whitespace; generate one, e.g. `openssl rand -hex 32`"));
                }
            }
            if a.as_token.len() < 16 {
                return Err(invalid(&format!("{key}.as_token"), "must be at least 16 characters"));
            }
            if a.hs_token.len() < 16 || !hs_tokens.insert(a.hs_token.clone()) {
                return Err(invalid(&format!("{key}.hs_token"), "must be at least 16 characters and unique"));
            }
            if self.appservice[..i].iter().any(|b| b.server_name == a.server_name) {
                return Err(invalid(&format!("{key}.server_name"), "one registration per homeserver"));
            }
        }
        if self.directory.ttl_secs == 0 {
            return Err(invalid("directory.ttl_secs", "must be positive"));
        }
        match (&self.admin.token, &self.admin.token_file) {
            (Some(_), Some(_)) => return Err(invalid("admin.token", "set either admin.token or admin.token_file, not both")),
            (Some(t), None) if t.len() < 16 => return Err(invalid("admin.token", "must be at least 16 characters")),
            (None, None) => return Err(invalid("admin.token", "an admin token is required (admin.token or admin.token_file)")),
            _ => {}
        }
        Ok(())
    }

    /// The federation listen address.
    pub fn federation_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.federation.parse().map_err(|e| invalid("listen.federation", format!("`{}`: {e}", self.listen.federation)))
    }

    /// The metrics/admin listen address.
    pub fn metrics_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.metrics.parse().map_err(|e| invalid("listen.metrics", format!("`{}`: {e}", self.listen.metrics)))
    }

    /// The admin token, read from `token_file` if that is how it is configured.
    pub fn admin_token(&self) -> Result<String, ConfigError> {
        if let Some(t) = &self.admin.token {
            return Ok(t.clone());
        }
        let path = self.admin.token_file.as_ref().ok_or_else(|| invalid("admin.token", "missing"))?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("admin.token_file", format!("cannot read {}: {e}", path.display())))?;
        let token = text.lines().next().unwrap_or("").trim().to_owned();
        if token.len() < 16 {
            return Err(invalid("admin.token_file", "token must be at least 16 characters"));
        }
        Ok(token)
    }

    /// The bot's full user id.
    pub fn bot_user_id(&self) -> String {
        format!("@{}:{}", self.bot.localpart, self.server_name)
    }

    /// The effective config with secrets replaced, for printing.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if c.admin.token.is_some() {
            c.admin.token = Some("<redacted>".into());
        }
        for a in &mut c.appservice {
            a.as_token = "<redacted>".into();
            a.hs_token = "<redacted>".into();
        }
        c
    }

    /// Whether `server` may talk to fedlink.
    pub fn is_allowed(&self, server: &str) -> bool {
        self.federation.allowed_servers.is_empty() || self.federation.allowed_servers.iter().any(|s| s == server)
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    // Try a TOML value (`true`, `42`, `["a"]`, `"quoted"`); fall back to the raw string.
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = entry {
                set_path(t, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
server_name = "localhost:8490"
[tls]
cert = "tls.crt"
key = "tls.key"
[admin]
token = "0123456789abcdef0123"
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, env.iter().map(|(a, b)| (a.to_string(), b.to_string())), Path::new("/etc/fedlink"))
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.bot_user_id(), "@fedlink:localhost:8490");
        assert_eq!(c.tls.cert, PathBuf::from("/etc/fedlink/tls.crt"));
        assert!(c.federation.verify_tls);
        assert!(c.is_allowed("anything"));
    }

    #[test]
    fn env_overrides_nested_and_lists() {
        let c = load(
            MIN,
            &[
                ("FEDLINK_SERVER_NAME", "fed.example:9000"),
                ("FEDLINK_FEDERATION__VERIFY_TLS", "false"),
                ("FEDLINK_FEDERATION__ALLOWED_SERVERS", "kiwi, litchi"),
                ("FEDLINK_LOG", "debug"),
                ("FEDLINK_LOG_FORMAT", "json"),
                ("FEDLINK_KEEP_SYNAPSE_DIRS", "1"),
            ],
        )
        .unwrap();
        assert_eq!(c.server_name, "fed.example:9000");
        assert!(!c.federation.verify_tls);
        assert_eq!(c.federation.allowed_servers, vec!["kiwi", "litchi"]);
        assert!(c.is_allowed("kiwi") && !c.is_allowed("mango"));
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(MIN, &[("FEDLINK_LISTEN__FEDERATION", "nope")]).unwrap_err().to_string();
        assert!(e.contains("listen.federation"), "{e}");
        let e = load(MIN, &[("FEDLINK_SERVER_NAME", "bad name!")]).unwrap_err().to_string();
        assert!(e.contains("server_name"), "{e}");
        let e = load(MIN, &[("FEDLINK_ADMIN__TOKEN", "short")]).unwrap_err().to_string();
        assert!(e.contains("admin.token"), "{e}");
        let e = load(&format!("{MIN}\n[bogus]\nx=1\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = load(MIN, &[("FEDLINK_FEDERATION__ALLOWED_SERVERS", "ok, bad server")]).unwrap_err().to_string();
        assert!(e.contains("federation.allowed_servers[1]"), "{e}");
        let e = load(MIN, &[("FEDLINK_STORAGE__CACHE_MB", "1")]).unwrap_err().to_string();
        assert!(e.contains("storage.cache_mb"), "{e}");
        assert_eq!(load(MIN, &[("FEDLINK_STORAGE__CACHE_MB", "64")]).unwrap().storage.cache_mb, 64);
        assert_eq!(load(MIN, &[]).unwrap().memory.trim_secs, 10);
        assert_eq!(load(MIN, &[("FEDLINK_MEMORY__TRIM_SECS", "0")]).unwrap().memory.trim_secs, 0);
        let e = load(MIN, &[("FEDLINK_MEMORY__TRIM_SECS", "100000")]).unwrap_err().to_string();
        assert!(e.contains("memory.trim_secs"), "{e}");
        // Unset: the database decides (an existing one keeps its setting, a new one compresses).
        assert_eq!(load(MIN, &[]).unwrap().storage.compression, None);
        assert_eq!(load(MIN, &[("FEDLINK_STORAGE__COMPRESSION", "false")]).unwrap().storage.compression, Some(false));
        assert_eq!(load(&format!("{MIN}\n[storage]\ncompression = true\n"), &[]).unwrap().storage.compression, Some(true));
        let e = load(&format!("{MIN}\n[storage]\ncompression = \"yes\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("storage.compression"), "{e}");
    }

    #[test]
    fn static_persons_are_validated() {
        let ok = format!("{MIN}\n[[directory.person]]\nid = \"alice\"\naccounts = [\"@alice:kiwi\", \"@alice:litchi\"]\n");
        assert_eq!(load(&ok, &[]).unwrap().directory.person.len(), 1);
        let dup = format!("{ok}\n[[directory.person]]\nid = \"other\"\naccounts = [\"@alice:kiwi\", \"@o:kiwi\"]\n");
        let e = load(&dup, &[]).unwrap_err().to_string();
        assert!(e.contains("directory.person[1].accounts") && e.contains("alice"), "{e}");
        let bad = format!("{MIN}\n[[directory.person]]\nid = \"x\"\naccounts = [\"alice\", \"@b:kiwi\"]\n");
        assert!(load(&bad, &[]).unwrap_err().to_string().contains("directory.person[0].accounts"));
    }

    #[test]
    fn redaction_hides_token() {
        let c = load(MIN, &[]).unwrap();
        let shown = toml::to_string(&c.redacted()).unwrap();
        assert!(!shown.contains("0123456789abcdef0123"));
        assert!(shown.contains("<redacted>"));
    }
}
