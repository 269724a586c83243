//! Shared support code for fedlink's integration tests.
//!
//! Include it from a test crate with `mod support;`. The main piece is
//! [`synapse`], which starts real Synapse homeservers on loopback (see
//! `scripts/test.sh` for how the Synapse virtualenv is installed).

#![allow(dead_code)]

pub mod synapse;
pub mod util;

#[allow(unused_imports)]
pub use synapse::*;

pub mod appservice;
pub mod e2e;
pub mod fake_peer;
pub mod fedlink_proc;
pub mod prometheus;
