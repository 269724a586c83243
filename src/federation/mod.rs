//! fedlink as a federation peer: X-Matrix auth ([`auth`]), server discovery
//! ([`discovery`]), the outbound client ([`client`]), the inbound HTTP server ([`server`]),
//! transaction ingest ([`send`]) and the bot's invites and joins ([`membership`]).

pub mod auth;
pub mod client;
pub mod discovery;
pub mod error;
pub mod membership;
pub mod netguard;
pub mod resident;
pub mod send;
pub mod server;
