//! keybroker: brokers the issuance of scoped, expiring Octopus Deploy API keys.
//!
//! Start at [`services::issuance`] for the path of one key, [`api`] for the HTTP surface and
//! `ARCHITECTURE.md` for the map.

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dev;
pub mod dev_idp;
pub mod doctor;
pub mod domain;
pub mod metrics;
pub mod octopus;
pub mod outbound;
pub mod server;
pub mod services;
pub mod store;
pub mod telemetry;
pub mod ui;
