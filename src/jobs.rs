//! Background jobs. The reconciler finishes issuances that a crash or a lost Octopus answer
//! left `pending`: it revokes any Octopus key carrying the record's marker (nobody received its
//! secret) and marks the record `failed`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::audit::{Action, NewAuditEvent, Outcome, RequestContext};
use crate::issuance::KeyService;

/// What one reconciliation pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Pending records marked failed.
    pub failed: usize,
    /// Octopus keys revoked because they belonged to those records.
    pub revoked_keys: usize,
    /// Records left pending because Octopus or the database failed; retried next pass.
    pub deferred: usize,
}

const BATCH: u32 = 100;

/// One pass over pending records older than `grace`.
pub async fn reconcile_once(keys: &KeyService, grace: Duration) -> ReconcileReport {
    let mut report = ReconcileReport::default();
    let cutoff = keys.now() - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::minutes(2));
    let pending = match keys.store().pending_before(cutoff, BATCH).await {
        Ok(pending) => pending,
        Err(e) => {
            tracing::warn!(error = %e, "reconciler cannot read pending records");
            return report;
        }
    };
    for record in pending {
        let revoked = match keys.revoke_by_marker(&record.octopus_user_id, record.id).await {
            Ok(revoked) => revoked,
            Err(e) => {
                tracing::warn!(key_id = %record.id, error = %e, "reconciler cannot clean up in Octopus; will retry");
                report.deferred += 1;
                continue;
            }
        };
        let event = NewAuditEvent::new(
            keys.now(),
            "keybroker",
            Action::KeyReconciled,
            Outcome::Failure,
            &RequestContext::default(),
        )
        .scope(&record.scope)
        .key(record.id)
        .detail(json!({
            "reason": "the issuance never completed (crash or lost Octopus answer)",
            "requester": record.requester,
            "revoked_octopus_keys": revoked,
        }));
        match keys.store().mark_failed(record.id, &event).await {
            Ok(()) => {
                tracing::info!(key_id = %record.id, revoked = revoked.len(), "reconciled an unfinished issuance");
                report.failed += 1;
                report.revoked_keys += revoked.len();
                keys.metrics().reconciled.inc();
            }
            Err(e) => {
                tracing::warn!(key_id = %record.id, error = %e, "reconciler cannot mark the record failed; will retry");
                report.deferred += 1;
            }
        }
    }
    report
}

/// Runs the reconciler every `interval` until the returned handle is aborted.
pub fn spawn_reconciler(keys: Arc<KeyService>, interval: Duration, grace: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The first pass waits one interval: a record that is pending at start-up is at least
        // that much older by then, and tests that stage records are not raced.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let report = reconcile_once(&keys, grace).await;
            if report != ReconcileReport::default() {
                tracing::info!(?report, "reconciliation pass");
            }
        }
    })
}
