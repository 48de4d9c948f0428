//! Reloading the policy without a restart (SIGHUP or `POST /v1/admin/reload`). The new file is
//! validated in full first; an invalid one is refused, the old policy stays, and the refusal is
//! logged and audited. Only `[[scopes]]` and `[lifecycle]` take effect on reload; the other
//! sections need a restart.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::config::{Config, ScopeRemoval};
use crate::domain::audit::{Action, NewAuditEvent, Outcome, RequestContext};
use crate::services::issuance::KeyService;

/// What a reload changed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReloadReport {
    pub scopes: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// The rule applied to the removed scopes' active keys: `keep` or `revoke`.
    pub on_scope_removed: String,
    /// Keys revoked because their scope was removed.
    pub revoked: usize,
    /// Revocations that failed now; the reconciler retries them.
    pub revocations_pending: usize,
}

/// Where the configuration lives, for reloads.
#[derive(Debug)]
pub struct Reloader {
    pub path: PathBuf,
    /// Where the reloaded policy is published for the other replicas.
    sync: std::sync::Arc<crate::services::policy_sync::PolicySync>,
    /// One reload at a time (SIGHUP and the endpoint may race).
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(path: &Path, sync: std::sync::Arc<crate::services::policy_sync::PolicySync>) -> Self {
        Self { path: path.to_owned(), sync, running: tokio::sync::Mutex::new(()) }
    }

    pub async fn reload(
        &self,
        keys: &KeyService,
        actor: &str,
        ctx: &RequestContext,
    ) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.running.lock().await;
        let config = match Config::load(&self.path) {
            Ok(config) => config,
            Err(invalid) => {
                let reason = invalid.to_string();
                tracing::error!(%reason, path = %self.path.display(), "policy reload refused; the old policy stays");
                let event = NewAuditEvent::new(keys.now(), actor, Action::ConfigReloadRefused, Outcome::Failure, ctx)
                    .detail(json!({ "reason": reason, "path": self.path.display().to_string() }));
                if let Err(store_err) = keys.audit(event).await {
                    tracing::error!(error = %store_err, "cannot audit a refused reload");
                }
                return Err(ReloadError::Invalid(invalid));
            }
        };
        let new_names: Vec<String> = config.policy.scopes().iter().map(|s| s.name.to_string()).collect();
        let old_names: Vec<String> = keys.policy().scopes().iter().map(|s| s.name.to_string()).collect();
        let added: Vec<String> = new_names.iter().filter(|n| !old_names.contains(n)).cloned().collect();
        let removed: Vec<String> = old_names.iter().filter(|n| !new_names.contains(n)).cloned().collect();
        let mut report = ReloadReport {
            scopes: new_names,
            added,
            removed,
            on_scope_removed: match config.on_scope_removed {
                ScopeRemoval::Keep => "keep",
                ScopeRemoval::Revoke => "revoke",
            }
            .to_owned(),
            revoked: 0,
            revocations_pending: 0,
        };
        // Audit first: a reload the trail cannot record does not happen.
        let event = NewAuditEvent::new(keys.now(), actor, Action::ConfigReloaded, Outcome::Success, ctx)
            .detail(serde_json::to_value(&report).unwrap_or_default());
        keys.audit(event).await.map_err(ReloadError::Audit)?;
        // The other replicas take it within jobs.policy_sync_interval; the reload holds here
        // whether or not the database takes it now (then the next sync publishes it).
        if let Err(e) = self.sync.reloaded(keys, config.policy, config.on_scope_removed, actor).await {
            tracing::error!(error = %e, "cannot publish the reloaded policy yet; the next sync retries");
        }
        if config.on_scope_removed == ScopeRemoval::Revoke {
            let system = KeyService::system_principal();
            for scope in &report.removed {
                let selection =
                    crate::services::offboarding::Selection { scope: Some(scope.clone()), ..Default::default() };
                match crate::services::offboarding::revoke_matching(keys, &system, selection, ctx).await {
                    Ok(done) => {
                        report.revoked += done.revoked();
                        // Failed ones stay requested and keys still being issued are marked:
                        // the reconciler revokes both.
                        report.revocations_pending += done.results.len() - done.revoked();
                    }
                    // The new policy is in force; what is left is retried by hand or on the next reload.
                    Err(e) => tracing::warn!(error = %e, scope, "cannot revoke the removed scope's keys"),
                }
            }
        }
        tracing::info!(added = ?report.added, removed = ?report.removed, revoked = report.revoked, "policy reloaded");
        Ok(report)
    }
}

/// Why a reload did not happen; the policy in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is invalid (a 422 for `POST /v1/admin/reload`).
    #[error(transparent)]
    Invalid(crate::config::ConfigError),
    /// The reload could not be audited, so it was not done (a 503).
    #[error("the audit trail is unavailable: {0}")]
    Audit(crate::store::StoreError),
}
