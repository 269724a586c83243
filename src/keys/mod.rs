//! Signing keys: fedlink's own key ([`own`]) and the cache of other servers' keys
//! ([`remote`]). Nothing else in the crate touches key material.

pub mod own;
pub mod remote;

pub use own::SigningKey;
pub use remote::{KeyError, RemoteKeys};
