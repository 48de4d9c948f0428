//! Readiness as a verdict kept in memory: a background job checks the dependencies (the
//! database, Octopus and keybroker's credential, every scope's account) every
//! `jobs.readiness_interval` and refreshes the metrics gauges that need the database; `GET
//! /readyz` only reads the last verdict. A flood of probes therefore costs Octopus and the
//! database nothing, and never empties the user cache the issuance path relies on.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::services::issuance::KeyService;

/// One dependency's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// Written for an operator; may name user ids, expiry times and Octopus's messages, so it is
    /// shown to admins only.
    pub detail: Option<String>,
    /// Whether a failure means this replica can serve no issuance at all (the database,
    /// Octopus or keybroker's credential). A broken scope is reported but does not make the
    /// replica unready: one bad scope must not take every replica out of a load balancer.
    pub critical: bool,
}

impl Check {
    fn ok(name: impl Into<String>, detail: Option<String>) -> Self {
        Self { name: name.into(), ok: true, detail, critical: true }
    }

    fn failed(name: impl Into<String>, detail: String) -> Self {
        Self { name: name.into(), ok: false, detail: Some(detail), critical: true }
    }

    fn scope(self) -> Self {
        Self { critical: false, ..self }
    }
}

/// The result of one pass over the dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub checks: Vec<Check>,
    pub checked_at: Option<DateTime<Utc>>,
}

impl Verdict {
    pub fn ready(&self) -> bool {
        self.checked_at.is_some() && self.checks.iter().all(|c| c.ok || !c.critical)
    }
}

/// Each check waits at most this long.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The last verdict, shared by the job and the handler.
#[derive(Debug)]
pub struct Readiness {
    current: RwLock<Arc<Verdict>>,
    /// A verdict older than this is not believed: the job has stopped.
    max_age: chrono::Duration,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new(Duration::from_secs(30))
    }
}

impl Readiness {
    /// For a job that runs every `interval`; a verdict three intervals old is stale.
    pub fn new(interval: Duration) -> Self {
        let unchecked = Verdict {
            checks: vec![Check::failed("startup", "the dependencies have not been checked yet".to_owned())],
            checked_at: None,
        };
        let max_age = chrono::Duration::from_std(interval * 3).unwrap_or(chrono::Duration::minutes(5));
        Self { current: RwLock::new(Arc::new(unchecked)), max_age }
    }

    /// The verdict to serve at `now`: the last one, or, when it is stale, that one with a failed
    /// `readiness` check saying so.
    pub fn served(&self, now: DateTime<Utc>) -> Arc<Verdict> {
        let verdict = self.current();
        match verdict.checked_at {
            Some(at) if now - at > self.max_age => {
                let mut stale = (*verdict).clone();
                stale.checks.push(Check::failed(
                    "readiness",
                    format!("the last check ran at {}; the readiness job has stopped", at.to_rfc3339()),
                ));
                Arc::new(stale)
            }
            _ => verdict,
        }
    }

    /// [`Readiness::served`] with the `policy` check appended: whether every replica heard from
    /// within three `jobs.policy_sync_interval`s runs the same policy. Not critical: a replica
    /// that has not taken a reload yet still serves, and converges within one interval.
    pub fn served_with_policy(
        &self,
        now: DateTime<Utc>,
        policy: &crate::services::policy_sync::PolicySync,
        sync_interval: Duration,
    ) -> Verdict {
        let mut verdict = (*self.served(now)).clone();
        let recent = chrono::Duration::from_std(sync_interval * 3).unwrap_or(chrono::Duration::seconds(30));
        let (agree, detail) = policy.check(now, recent);
        verdict.checks.push(Check { name: "policy".to_owned(), ok: agree, detail: Some(detail), critical: false });
        verdict
    }

    pub fn current(&self) -> Arc<Verdict> {
        match self.current.read() {
            Ok(v) => Arc::clone(&v),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Checks every dependency once, keeps the verdict and refreshes the active-key gauges.
    pub async fn refresh(&self, keys: &KeyService) -> Arc<Verdict> {
        let verdict = Arc::new(check_all(keys).await);
        for check in verdict.checks.iter().filter(|c| !c.ok) {
            tracing::warn!(check = %check.name, detail = check.detail.as_deref().unwrap_or(""), "not ready");
        }
        if let Ok(mut current) = self.current.write() {
            *current = Arc::clone(&verdict);
        }
        verdict
    }
}

async fn check_all(keys: &KeyService) -> Verdict {
    let mut checks = Vec::new();
    let db = tokio::time::timeout(CHECK_TIMEOUT, keys.store().ping()).await;
    checks.push(match db {
        Ok(Ok(())) => Check::ok("database", None),
        Ok(Err(e)) => Check::failed("database", e.to_string()),
        Err(_) => Check::failed("database", "no answer within 5 s".to_owned()),
    });
    if let Ok(Ok(counts)) = tokio::time::timeout(CHECK_TIMEOUT, keys.store().active_counts(keys.now())).await {
        keys.metrics().set_active_keys(&counts);
    }

    let octopus = tokio::time::timeout(CHECK_TIMEOUT, keys.octopus().current_user()).await;
    let octopus_ok = matches!(octopus, Ok(Ok(_)));
    checks.push(match octopus {
        Ok(Ok(user)) => Check::ok("octopus", Some(format!("signed in as {} ({})", user.username, user.id))),
        Ok(Err(e)) => Check::failed("octopus", e.to_string()),
        Err(_) => Check::failed("octopus", "no answer within 5 s".to_owned()),
    });
    if octopus_ok {
        let limits = keys.upstream_limits();
        if let Some(expires) = limits.broker_key_expires {
            checks.push(Check {
                name: "octopus_credential_expiry".to_owned(),
                ok: expires > keys.now(),
                detail: Some(format!("keybroker's Octopus API key expires at {}", expires.to_rfc3339())),
                critical: true,
            });
        } else if let Some(listed) = limits.broker_key_missing_among {
            // Not a reason to take the replica out: Octopus still enforces the expiry.
            checks.push(Check::ok(
                "octopus_credential_expiry",
                Some(format!(
                    "unknown: keybroker's own key was not found among the {listed} keys of its user (hints are \
                     matched as prefixes); keys are issued without that bound"
                )),
            ));
        }
        let policy = keys.policy();
        for scope in policy.scopes() {
            let name = format!("scope:{}", scope.name);
            let result = tokio::time::timeout(CHECK_TIMEOUT, keys.check_scope_account(scope)).await;
            checks.push(
                match result {
                    Ok(Ok(user)) => {
                        Check::ok(name, Some(format!("{} ({}): its keys are manageable", user.username, user.id)))
                    }
                    Ok(Err(e)) => Check::failed(name, e.to_string()),
                    Err(_) => Check::failed(name, "no answer within 5 s".to_owned()),
                }
                .scope(),
            );
        }
    }
    // Scopes are not critical one by one, but when every scope fails (keybroker's account lost
    // UserEdit, say) this replica can serve no issuance at all.
    let scopes: Vec<&Check> = checks.iter().filter(|c| c.name.starts_with("scope:")).collect();
    if !scopes.is_empty() && scopes.iter().all(|c| !c.ok) {
        checks.push(Check::failed("scopes", "no scope's account is usable".to_owned()));
    }
    Verdict { checks, checked_at: Some(keys.now()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_older_than_three_intervals_is_served_as_not_ready() {
        let readiness = Readiness::new(Duration::from_secs(10));
        let at = Utc::now();
        if let Ok(mut current) = readiness.current.write() {
            let broken_scope = Check::failed("scope:x", "403".to_owned()).scope();
            *current =
                Arc::new(Verdict { checks: vec![Check::ok("database", None), broken_scope], checked_at: Some(at) });
        }
        assert!(readiness.served(at + chrono::Duration::seconds(30)).ready(), "a broken scope is not critical");
        let stale = readiness.served(at + chrono::Duration::seconds(31));
        assert!(!stale.ready());
        assert_eq!(stale.checks.last().map(|c| c.name.as_str()), Some("readiness"));
        assert!(!readiness.served(at).checks.iter().any(|c| c.name == "readiness"));
    }
}
