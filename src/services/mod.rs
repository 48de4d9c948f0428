//! The services: the application's operations, and the only callers of the store. Handlers
//! parse a request, call one service, and render its answer.
//!
//! - [`issuance`]: `KeyService`, issue, revoke, identify, the Octopus side of each;
//! - [`tickets`]: pickup tickets (create, claim, cancel, expire);
//! - [`offboarding`] and [`dormant`]: revoking a person's or a team's keys;
//! - [`queries`]: listing keys, reading and verifying the audit trail;
//! - [`reload`] and [`policy_sync`]: a new policy, on this replica and on every other;
//! - [`jobs`] (with [`lease`]): reconcile, expiry, webhooks, drift, readiness, on their timers;
//! - [`drift`], [`webhooks`], [`audit_watch`], [`readiness`]: the passes those jobs run;
//! - [`denials`]: refusals, audited without letting the network fill the trail.

pub mod audit_watch;
pub mod denials;
pub mod dormant;
pub mod drift;
pub mod issuance;
pub mod jobs;
pub mod lease;
pub mod offboarding;
pub mod policy_sync;
pub mod queries;
pub mod readiness;
pub mod reload;
pub mod tickets;
pub mod webhooks;

/// Why a background pass (or an admin operation that runs one) stopped: the database, Octopus,
/// or a service it called. Logged once, by the job runner or the handler that ran it.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("the database failed: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("Octopus failed: {0}")]
    Octopus(#[from] crate::octopus::OctopusError),
    #[error(transparent)]
    Service(#[from] issuance::ServiceError),
}
