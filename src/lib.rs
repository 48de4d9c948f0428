//! keybroker: brokers the issuance of scoped, expiring Octopus Deploy API keys.
//!
//! Start at [`issuance`] for the path of one key, [`api`] for the HTTP surface and
//! `ARCHITECTURE.md` for the map.

pub mod api;
pub mod app;
pub mod audit;
pub mod audit_watch;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dev;
pub mod dev_idp;
pub mod doctor;
pub mod dormant;
pub mod drift;
pub mod issuance;
pub mod jobs;
pub mod metrics;
pub mod octopus;
pub mod octopus_sim;
pub mod offboarding;
pub mod outbound;
pub mod policy;
pub mod policy_sync;
pub mod queries;
pub mod readiness;
pub mod reload;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tickets;
pub mod ui;
pub mod webhooks;
