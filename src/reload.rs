//! Reloading the policy without a restart (SIGHUP or `POST /v1/admin/reload`). The new file is
//! validated in full first; an invalid one is refused, the old policy stays, and the refusal is
//! logged and audited. Only `[[scopes]]` and `[lifecycle]` take effect on reload; the other
//! sections need a restart.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::audit::{Action, NewAuditEvent, Outcome, RequestContext};
use crate::config::{Config, ScopeRemoval};
use crate::issuance::KeyService;
use crate::store::{KeyFilter, KeyState};

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
    /// One reload at a time (SIGHUP and the endpoint may race).
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), running: tokio::sync::Mutex::new(()) }
    }

    pub async fn reload(&self, keys: &KeyService, actor: &str, ctx: &RequestContext) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.running.lock().await;
        let config = match Config::load(&self.path) {
            Ok(config) => config,
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(%reason, path = %self.path.display(), "policy reload refused; the old policy stays");
                let event = NewAuditEvent::new(keys.now(), actor, Action::ConfigReloadRefused, Outcome::Failure, ctx)
                    .detail(json!({ "reason": reason, "path": self.path.display().to_string() }));
                if let Err(store_err) = keys.audit(event).await {
                    tracing::error!(error = %store_err, "cannot audit a refused reload");
                }
                return Err(reason);
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
        keys.audit(event).await.map_err(|e| format!("the audit trail is unavailable: {e}"))?;
        keys.replace_policy(config.policy);
        if config.on_scope_removed == ScopeRemoval::Revoke {
            let system = KeyService::system_principal();
            for scope in &report.removed {
                let filter = KeyFilter {
                    scope: Some(scope.clone()),
                    state: Some(KeyState::Active),
                    now: Some(keys.now()),
                    ..Default::default()
                };
                let records = match keys.store().list_all_keys(&filter).await {
                    Ok(records) => records,
                    Err(e) => {
                        // The new policy is in force; what is left is retried by hand or on the next reload.
                        tracing::warn!(error = %e, scope, "cannot list the removed scope's keys");
                        continue;
                    }
                };
                for record in records {
                    match keys.revoke_requested(&system, record.id, ctx).await {
                        Ok(_) => report.revoked += 1,
                        Err(e) => {
                            tracing::warn!(key_id = %record.id, error = %e, "revocation after scope removal failed; will retry");
                            report.revocations_pending += 1;
                        }
                    }
                }
            }
        }
        tracing::info!(added = ?report.added, removed = ?report.removed, revoked = report.revoked, "policy reloaded");
        Ok(report)
    }
}
