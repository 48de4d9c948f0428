//! The domain: what keybroker's words mean and the rules over them, with no I/O. Key records
//! and their state machine, scope names and purposes, principals, pickup tickets, the audit
//! event and its chain, the policy (scopes, expiry, and every authorization decision in
//! [`policy::authz`]), durations and the clock. Everything else in the crate builds on this;
//! this imports nothing else of it.

pub mod audit;
pub mod clock;
pub mod duration;
pub mod keys;
pub mod names;
pub mod policy;
pub mod principal;
pub mod rfc3339;
pub mod tickets;
