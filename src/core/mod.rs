//! The pure core: log records, the PDU model, views folded from the log, and backoff.
//! Nothing here does I/O, reads the clock or spawns tasks; the shell around it owns storage
//! and the network and passes time in as values.

pub mod backoff;
pub mod bot;
pub mod log_entry;
pub mod pdu;
pub mod reconcile;
pub mod step;
pub mod views;
