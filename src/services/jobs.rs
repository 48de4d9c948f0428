//! Background jobs: each runs on an interval, and under a lease in the database so that with
//! several replicas only one runs it at a time. Every run is counted in the metrics (last run,
//! duration, outcome).
//!
//! - `reconcile`: finishes issuances that a crash or a lost Octopus answer left `pending` (their
//!   Octopus key, found by its marker, is revoked; the record fails), and retries revocations
//!   that were asked for but failed;
//! - `expiry-sweep`: active records past their expiry become `expired`, each audited;
//! - `webhooks`: writes due notices to the outbox and delivers them;
//! - `drift`: compares active records with Octopus (see [`crate::services::drift`]);
//! - `credential`: re-reads Octopus's limits and the broker credential's expiry (every replica).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::config::{JobsConfig, WebhookConfig};
use crate::domain::audit::{Action, NewAuditEvent, Outcome, RequestContext};
use crate::services::PassError;
use crate::services::issuance::KeyService;

/// What one reconciliation pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Pending records marked failed.
    pub failed: usize,
    /// Octopus keys revoked because they belonged to those records.
    pub revoked_keys: usize,
    /// Records left pending because Octopus or the database failed; retried next pass.
    pub deferred: usize,
    /// Revocations asked for earlier (offboarding, removed scopes) that succeeded this time.
    pub revocations_retried: usize,
}

const BATCH: u32 = 100;

/// One pass over pending records older than `grace`, and over revocations still to do.
/// A record that cannot be finished now is logged and left for the next pass; a store that
/// cannot be read fails the pass (the job loop logs it).
pub async fn reconcile_once(keys: &KeyService, grace: Duration) -> Result<ReconcileReport, PassError> {
    let mut report = ReconcileReport::default();
    let cutoff = keys.now() - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::minutes(2));
    // A failed read of the pending records still lets the revocations be retried; the pass
    // fails afterwards.
    let (pending, unread) = match keys.store().pending_before(cutoff, keys.now(), BATCH).await {
        Ok(pending) => (pending, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    for record in pending {
        if !super::lease::lease_held() {
            break;
        }
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
    let system = KeyService::system_principal();
    for record in keys.store().revocations_to_retry(BATCH).await? {
        if !super::lease::lease_held() {
            break;
        }
        match keys.revoke(&system, record.id, &RequestContext::default()).await {
            Ok(_) => report.revocations_retried += 1,
            Err(e) => tracing::warn!(key_id = %record.id, error = %e, "revocation still failing; will retry"),
        }
    }
    match unread {
        Some(e) => Err(e.into()),
        None => Ok(report),
    }
}

/// Marks active records past their expiry as expired, one audit event each. Returns how many.
pub async fn expire_once(keys: &KeyService) -> Result<usize, PassError> {
    let now = keys.now();
    let due = keys.store().due_for_expiry(now, 500).await?;
    let mut expired = 0;
    for record in due {
        if !super::lease::lease_held() {
            break;
        }
        let event =
            NewAuditEvent::new(now, "keybroker", Action::KeyExpired, Outcome::Success, &RequestContext::default())
                .scope(&record.scope)
                .key(record.id)
                .octopus_key(record.octopus_key_id.as_deref())
                .detail(json!({ "expires_at": record.expires_at, "requester": record.requester }));
        if keys.store().mark_expired(record.id, &event).await? {
            expired += 1;
        }
    }
    Ok(expired)
}

/// Watches keybroker's own credential: re-reads Octopus's limits, exports the expiry, and audits
/// a warning once per threshold (20 and 10 days) per process.
pub async fn watch_credential(keys: &KeyService, warned: &std::sync::Mutex<Vec<i64>>) -> Result<(), PassError> {
    let limits = keys.refresh_upstream_limits().await?;
    let Some(expires) = limits.broker_key_expires else {
        keys.metrics().credential_expiry.set(0);
        return Ok(());
    };
    keys.metrics().credential_expiry.set(expires.timestamp());
    let left = expires - keys.now();
    for days in crate::services::webhooks::WARNING_DAYS {
        if left <= chrono::Duration::days(days) {
            let first = warned
                .lock()
                .map(|mut w| {
                    !w.contains(&days) && {
                        w.push(days);
                        true
                    }
                })
                .unwrap_or(false);
            if first {
                tracing::warn!(%expires, "keybroker's Octopus credential expires within {days} days");
                let event = NewAuditEvent::new(
                    keys.now(),
                    "keybroker",
                    Action::CredentialExpiring,
                    Outcome::Failure,
                    &RequestContext::default(),
                )
                .detail(json!({ "expires_at": expires, "threshold_days": days }));
                keys.audit(event).await?;
            }
        }
    }
    Ok(())
}

type JobFuture = Pin<Box<dyn Future<Output = Result<String, PassError>> + Send>>;

/// Runs `run` every `interval`; when `leased`, only while holding the job's lease.
fn spawn_job(
    keys: Arc<KeyService>,
    name: &'static str,
    interval: Duration,
    leased: bool,
    holder: String,
    run: impl Fn(Arc<KeyService>) -> JobFuture + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The first pass waits one interval: a record pending at start-up is at least that much
        // older by then, and tests that stage records are not raced.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ttl = chrono::Duration::from_std(interval * 3).unwrap_or(chrono::Duration::minutes(5));
        loop {
            tick.tick().await;
            let started = std::time::Instant::now();
            let at = keys.now();
            if leased {
                match keys.store().try_lease(name, &holder, at, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        keys.metrics().job_ran(name, "skipped", at, started.elapsed());
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(job = name, error = %e, "cannot take the job lease");
                        keys.metrics().job_ran(name, "error", at, started.elapsed());
                        continue;
                    }
                }
            }
            // The leased jobs (reconcile, expiry, webhooks, drift) are batch work: their Octopus
            // calls get the background half of the rate limit. Readiness and the credential watch
            // stay in the foreground half, so that a busy drift scan cannot make a replica look
            // unready.
            let pass = run(keys.clone());
            let result = if leased {
                // The lease is renewed while the pass runs; once it is lost, the pass stops at
                // its next unit of work.
                let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let renew = {
                    let (keys, holder, lost) = (keys.clone(), holder.clone(), lost.clone());
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(interval).await;
                            match keys.store().try_lease(name, &holder, keys.now(), ttl).await {
                                Ok(true) => {}
                                Ok(false) | Err(_) => {
                                    tracing::warn!(job = name, "lost the job lease; the pass stops");
                                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                                    return;
                                }
                            }
                        }
                    })
                };
                let result = super::lease::run_leased(lost, crate::octopus::BACKGROUND.scope((), pass)).await;
                renew.abort();
                result
            } else {
                pass.await
            };
            match result {
                Ok(summary) => {
                    if !summary.is_empty() {
                        tracing::info!(job = name, %summary, "job ran");
                    }
                    keys.metrics().job_ran(name, "ok", at, started.elapsed());
                }
                Err(e) => {
                    tracing::warn!(job = name, error = %e, "job failed");
                    keys.metrics().job_ran(name, "error", at, started.elapsed());
                }
            }
        }
    })
}

/// Starts every background job. Abort the handles to stop them.
pub fn spawn_all(
    keys: Arc<KeyService>,
    jobs: &JobsConfig,
    webhooks: &[WebhookConfig],
    readiness: Arc<crate::services::readiness::Readiness>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, reqwest::Error> {
    let holder = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let grace = jobs.pending_grace;
    let configs = Arc::new(webhooks.to_vec());
    let webhooks = Arc::new(crate::services::webhooks::Webhook::all(webhooks)?);
    let warned = Arc::new(std::sync::Mutex::new(Vec::new()));
    let drift = Arc::new(crate::services::drift::DriftState::default());
    Ok(vec![
        spawn_job(keys.clone(), "reconcile", jobs.reconcile_interval, true, holder.clone(), move |keys| {
            Box::pin(async move {
                let r = reconcile_once(&keys, grace).await?;
                Ok(if r == ReconcileReport::default() { String::new() } else { format!("{r:?}") })
            })
        }),
        spawn_job(keys.clone(), "expiry-sweep", jobs.expiry_sweep_interval, true, holder.clone(), |keys| {
            Box::pin(async move {
                let n = expire_once(&keys).await?;
                Ok(if n == 0 { String::new() } else { format!("{n} keys expired") })
            })
        }),
        spawn_job(keys.clone(), "webhooks", jobs.webhook_interval, true, holder.clone(), move |keys| {
            let (configs, webhooks) = (configs.clone(), webhooks.clone());
            Box::pin(async move {
                let queued = crate::services::webhooks::enqueue_notices(&keys, &configs).await?;
                let report = crate::services::webhooks::deliver_due(&keys, &webhooks).await?;
                Ok(if queued == 0 && report == Default::default() {
                    String::new()
                } else {
                    format!("{queued} queued, {report:?}")
                })
            })
        }),
        spawn_job(keys.clone(), "drift", jobs.drift_interval, true, holder.clone(), move |keys| {
            let drift = drift.clone();
            Box::pin(async move {
                let report = crate::services::drift::scan(&keys, &drift).await?;
                Ok(if report.is_quiet() { String::new() } else { format!("{report:?}") })
            })
        }),
        spawn_job(keys.clone(), "credential", jobs.credential_check_interval, false, holder.clone(), move |keys| {
            let warned = warned.clone();
            Box::pin(async move { watch_credential(&keys, &warned).await.map(|()| String::new()) })
        }),
        // Every replica keeps its own verdict: readiness is about this process's connections.
        spawn_job(keys, "readiness", jobs.readiness_interval, false, holder, move |keys| {
            let readiness = readiness.clone();
            Box::pin(async move {
                let verdict = readiness.refresh(&keys).await;
                Ok(if verdict.ready() { String::new() } else { "not ready".to_owned() })
            })
        }),
    ])
}
