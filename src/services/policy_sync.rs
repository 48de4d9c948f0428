//! Policy reloads converge across replicas. The policy in force is published in the database as
//! a document with its version (a hash of its content): at start (the configuration file is the
//! source then) and after every reload. Every replica polls the newest published version every
//! `jobs.policy_sync_interval` and, when it differs from its own, takes that policy, audits it as
//! `config.reloaded` (`"source": "database"`) and reports the version it runs, which the admin
//! view of `/readyz` lists per replica.
//!
//! Only the replica that reloaded applies `on_scope_removed = "revoke"` to the removed scopes'
//! active keys; the others refuse the removed scope from the moment they take the new policy, and
//! a key of a removed scope still being issued anywhere is revoked when it activates.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::config::ScopeRemoval;
use crate::domain::audit::{Action, NewAuditEvent, Outcome, RequestContext};
use crate::domain::policy::document::PolicyDocument;
use crate::services::issuance::KeyService;
use crate::store::StoreError;

/// One replica's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPolicy {
    pub replica: String,
    pub version: String,
    pub seen_at: DateTime<Utc>,
}

#[derive(Debug)]
pub struct PolicySync {
    /// This replica's name in `replica_policies` (the host and the process id).
    replica: String,
    /// The version in force here, and the published position it came from.
    current: Mutex<(String, i64)>,
    /// Every replica's last report, as the last sync read it.
    seen: Mutex<Vec<ReplicaPolicy>>,
    /// A reload whose publication failed: the next sync publishes it.
    unpublished: std::sync::atomic::AtomicBool,
    /// Reloads, publications and syncs of this replica one at a time, so a sync cannot put back
    /// an older policy over a reload it raced.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl PolicySync {
    pub fn new() -> Self {
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "keybroker".to_owned());
        let replica = format!("{host}-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..6]);
        Self {
            replica,
            current: Mutex::new((String::new(), 0)),
            seen: Mutex::new(Vec::new()),
            unpublished: std::sync::atomic::AtomicBool::new(false),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The version in force on this replica.
    pub fn version(&self) -> String {
        self.current.lock().map(|c| c.0.clone()).unwrap_or_default()
    }

    /// At start, the newer of this replica's file and the policy in force across replicas wins:
    /// a file changed after that policy was published (a new deployment) is published; an older
    /// one (a replica restarted with the file it had) gives way, so that it cannot put back what
    /// a reload elsewhere removed. A reload (SIGHUP or `POST /v1/admin/reload`) always publishes.
    pub async fn start(&self, keys: &KeyService, file_modified: Option<DateTime<Utc>>) -> Result<String, StoreError> {
        let _one = self.one_at_a_time.lock().await;
        let document = PolicyDocument::of(&keys.policy(), keys.scope_removal());
        let file_version = document.version();
        let Some((seq, version, text, published_at)) = keys.store().latest_policy().await? else {
            drop(_one);
            return self.publish(keys, "keybroker (first start)").await;
        };
        if version != file_version && file_modified.is_none_or(|m| m > published_at) {
            drop(_one);
            return self.publish(keys, "keybroker (start, a newer file)").await;
        }
        if version != file_version {
            match parse(&text) {
                Ok((policy, rule)) => {
                    tracing::warn!(
                        in_force = version,
                        file = file_version,
                        "this replica's configuration file differs from the policy in force on the other replicas; \
                         it runs the policy in force. Reload (SIGHUP or POST /v1/admin/reload) to publish the file's"
                    );
                    keys.replace_policy(policy);
                    keys.set_scope_removal(rule);
                }
                Err(e) => {
                    tracing::error!(version, error = %e, "the published policy is unreadable; publishing the file's");
                    drop(_one);
                    return self.publish(keys, "keybroker (start)").await;
                }
            }
        }
        if let Ok(mut c) = self.current.lock() {
            *c = (version.clone(), seq);
        }
        keys.store().report_replica_policy(&self.replica, &version, keys.now()).await?;
        Ok(version)
    }

    /// Publishes the policy in force here (after a reload through this replica).
    pub async fn publish(&self, keys: &KeyService, by: &str) -> Result<String, StoreError> {
        let _one = self.one_at_a_time.lock().await;
        self.publish_locked(keys, by).await
    }

    async fn publish_locked(&self, keys: &KeyService, by: &str) -> Result<String, StoreError> {
        let document = PolicyDocument::of(&keys.policy(), keys.scope_removal());
        let version = document.version();
        let published = keys.store().publish_policy(&version, &document.to_json(), keys.now(), by).await;
        let seq = match published {
            Ok(seq) => seq,
            Err(e) => {
                // In force here already: the next sync publishes it.
                self.unpublished.store(true, std::sync::atomic::Ordering::SeqCst);
                if let Ok(mut c) = self.current.lock() {
                    c.0.clone_from(&version);
                }
                return Err(e);
            }
        };
        self.unpublished.store(false, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut c) = self.current.lock() {
            *c = (version.clone(), seq);
        }
        keys.store().report_replica_policy(&self.replica, &version, keys.now()).await?;
        tracing::info!(version, seq, "policy published for every replica");
        Ok(version)
    }

    /// A reload through this replica: the new policy in force here, then published.
    pub async fn reloaded(
        &self,
        keys: &KeyService,
        policy: crate::domain::policy::Policy,
        rule: ScopeRemoval,
        by: &str,
    ) -> Result<String, StoreError> {
        let _one = self.one_at_a_time.lock().await;
        keys.replace_policy(policy);
        keys.set_scope_removal(rule);
        self.publish_locked(keys, by).await
    }

    /// Takes the newest published policy when it is not the one in force; reports this
    /// replica's version either way. Returns the version taken, if any.
    pub async fn sync_once(&self, keys: &KeyService) -> Result<Option<String>, StoreError> {
        let _one = self.one_at_a_time.lock().await;
        if self.unpublished.load(std::sync::atomic::Ordering::SeqCst) {
            self.publish_locked(keys, "keybroker (a reload's late publication)").await?;
        }
        let mut taken = None;
        if let Some((seq, version, text, _)) = keys.store().latest_policy().await? {
            let (current, current_seq) = self.current.lock().map(|c| c.clone()).unwrap_or_default();
            if version != current && seq > current_seq {
                match parse(&text) {
                    Ok((policy, rule)) => {
                        let before: Vec<String> = keys.policy().scopes().iter().map(|s| s.name.to_string()).collect();
                        let scopes: Vec<String> = policy.scopes().iter().map(|s| s.name.to_string()).collect();
                        let event = NewAuditEvent::new(
                            keys.now(),
                            "keybroker",
                            Action::ConfigReloaded,
                            Outcome::Success,
                            &RequestContext::default(),
                        )
                        .detail(json!({
                            "source": "database", "version": version, "replica": self.replica, "scopes": scopes,
                        }));
                        keys.audit(event).await?;
                        keys.replace_policy(policy);
                        keys.set_scope_removal(rule);
                        if let Ok(mut c) = self.current.lock() {
                            *c = (version.clone(), seq);
                        }
                        tracing::info!(version, "took the policy another replica published");
                        // The reloading replica revoked the removed scopes' keys; one activated
                        // here in the meantime is revoked now.
                        if rule == ScopeRemoval::Revoke {
                            for scope in before.iter().filter(|n| !scopes.contains(n)) {
                                let selection = crate::services::offboarding::Selection {
                                    scope: Some(scope.clone()),
                                    ..Default::default()
                                };
                                let system = KeyService::system_principal();
                                if let Err(e) = crate::services::offboarding::revoke_matching(
                                    keys,
                                    &system,
                                    selection,
                                    &RequestContext::default(),
                                )
                                .await
                                {
                                    tracing::warn!(error = %e, scope, "cannot revoke a removed scope's keys");
                                }
                            }
                        }
                        taken = Some(version);
                    }
                    Err(e) => tracing::error!(version, error = %e, "the published policy is unreadable; keeping ours"),
                }
            }
        }
        keys.store().report_replica_policy(&self.replica, &self.version(), keys.now()).await?;
        let seen = self.replicas(keys).await?;
        if let Ok(mut s) = self.seen.lock() {
            *s = seen;
        }
        Ok(taken)
    }

    /// For the admin view of `/readyz`: whether every replica heard from within `recent` runs
    /// this replica's version, and each one's version.
    pub fn check(&self, now: DateTime<Utc>, recent: chrono::Duration) -> (bool, String) {
        let mine = self.version();
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let live: Vec<&ReplicaPolicy> = seen.iter().filter(|r| r.seen_at > now - recent).collect();
        let agree = live.iter().all(|r| r.version == mine);
        let list: Vec<String> = live
            .iter()
            .map(|r| format!("{} runs {} ({}s ago)", r.replica, r.version, (now - r.seen_at).num_seconds().max(0)))
            .collect();
        (agree, format!("this replica ({}) runs policy {mine}; {}", self.replica, list.join("; ")))
    }

    /// Every replica's last report, newest first.
    pub async fn replicas(&self, keys: &KeyService) -> Result<Vec<ReplicaPolicy>, StoreError> {
        Ok(keys
            .store()
            .replica_policies()
            .await?
            .into_iter()
            .map(|(replica, version, seen_at)| ReplicaPolicy { replica, version, seen_at })
            .collect())
    }
}

impl Default for PolicySync {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a published policy cannot be taken.
#[derive(Debug, thiserror::Error)]
enum UnreadablePolicy {
    #[error("not a policy document: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Scope(#[from] crate::domain::policy::InvalidScopeName),
}

fn parse(text: &str) -> Result<(crate::domain::policy::Policy, ScopeRemoval), UnreadablePolicy> {
    let document: PolicyDocument = serde_json::from_str(text)?;
    Ok((document.policy()?, document.on_scope_removed))
}

/// `keep` or `revoke`, as reports write it.
pub fn rule_name(rule: ScopeRemoval) -> &'static str {
    match rule {
        ScopeRemoval::Keep => "keep",
        ScopeRemoval::Revoke => "revoke",
    }
}
