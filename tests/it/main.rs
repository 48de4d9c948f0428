//! Black-box tests: the real app on port 0, its own SQLite database and the Octopus simulator,
//! spoken to over HTTP. One test binary, so the crate is linked once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit_trail;
mod auth;
mod bad_input;
mod bench_smoke;
mod browser;
mod callers;
mod cdp;
mod chaos;
mod cli;
mod concurrency;
mod contract;
mod crash;
mod database;
mod deadlines;
mod deploy;
mod helpers;
mod idempotency;
mod keys;
mod leases;
mod lifecycle;
mod octopus_client;
mod openapi;
mod policy_sync;
mod real_octopus;
mod reconcile;
mod secrets;
mod security;
mod storage;
mod tickets;
mod transport;
