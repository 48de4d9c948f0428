//! Drift between keybroker's records and Octopus: keys deleted in Octopus behind keybroker's back
//! (their records become `revoked`, audited as drift) and keys that carry a keybroker marker but
//! have no active record (reported in metrics and the audit trail; deleted only when an admin
//! asks).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::audit::{Action, NewAuditEvent, Outcome, RequestContext};
use crate::domain::keys::{KeyRecord, KeyState};
use crate::domain::policy::purpose_marker;
use crate::octopus::ApiKeyInfo;
use crate::services::PassError;
use crate::services::issuance::KeyService;
use crate::store::KeyFilter;
use chrono::{DateTime, Utc};

/// Remembers which unmanaged keys were already audited, so each is reported once per process.
#[derive(Debug, Default)]
pub struct DriftState {
    reported: Mutex<HashSet<String>>,
}

/// An Octopus key with a keybroker marker and no active record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct UnmanagedKey {
    pub scope: String,
    pub octopus_user_id: String,
    pub octopus_key_id: String,
    pub purpose: String,
    /// The record the marker names, when it parses and exists.
    pub record_id: Option<Uuid>,
    /// That record's state, when it exists.
    pub record_state: Option<KeyState>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DriftReport {
    /// Records marked revoked because their key is gone from Octopus.
    pub revoked_behind_back: Vec<Uuid>,
    pub unmanaged: Vec<UnmanagedKey>,
    /// Keys of failed issuances that were still in Octopus, now revoked.
    pub orphans_revoked: Vec<String>,
    /// Records whose key is gone while a revocation of theirs is running: left to it.
    pub left_to_revoker: Vec<Uuid>,
}

impl DriftReport {
    pub fn is_quiet(&self) -> bool {
        self.revoked_behind_back.is_empty() && self.unmanaged.is_empty() && self.orphans_revoked.is_empty()
    }
}

/// The record id in a purpose that starts with a keybroker marker.
fn marked_record(purpose: &str) -> Option<Uuid> {
    let rest = purpose.strip_prefix("keybroker:")?;
    Uuid::parse_str(rest.split(' ').next()?).ok().filter(|id| purpose.starts_with(&purpose_marker(*id)))
}

/// One comparison of every scope account's keys with the records.
pub async fn scan(keys: &KeyService, state: &DriftState) -> Result<DriftReport, PassError> {
    let mut report = DriftReport::default();
    let now = keys.now();
    let accounts = scope_accounts(keys).await;
    // Read the active records once, after the look-ups and just before the listings; each
    // account's are picked out below.
    let filter = KeyFilter { state: Some(KeyState::Active), now: Some(now), ..Default::default() };
    let active = keys.store().list_all_keys(&filter).await?;
    for (user_id, scope_name) in accounts {
        let in_octopus = keys.octopus().list_api_keys(&user_id, Some("keybroker:")).await?;
        let mine: Vec<&KeyRecord> = active.iter().filter(|r| r.octopus_user_id == user_id).collect();
        revoke_deleted_behind_back(keys, &user_id, &mine, &in_octopus, now, &mut report).await?;
        for key in in_octopus.iter().filter(|k| k.purpose.starts_with("keybroker:")) {
            check_marked_key(keys, &user_id, &scope_name, key, now, &mut report).await?;
        }
    }
    keys.metrics().unmanaged_keys.set(i64::try_from(report.unmanaged.len()).unwrap_or(i64::MAX));
    report_unmanaged_once(keys, state, &report.unmanaged, now).await?;
    Ok(report)
}

/// Every scope's Octopus account, each once, with the first scope that names it.
async fn scope_accounts(keys: &KeyService) -> HashMap<String, String> {
    let mut accounts: HashMap<String, String> = HashMap::new();
    for scope in keys.policy().scopes() {
        match keys.scope_account(scope, false).await {
            Ok(user) => {
                accounts.entry(user.id).or_insert_with(|| scope.name.to_string());
            }
            Err(e) => tracing::debug!(scope = %scope.name, error = %e, "drift scan skips a scope"),
        }
    }
    accounts
}

fn drift_event(now: DateTime<Utc>, action: Action, outcome: Outcome, scope: impl AsRef<str>) -> NewAuditEvent {
    NewAuditEvent::new(now, "keybroker", action, outcome, &RequestContext::default()).scope(scope)
}

/// Active records whose key is gone from Octopus (confirmed by a direct read) become revoked,
/// unless someone is revoking them right now: theirs is the event that names who revoked it.
async fn revoke_deleted_behind_back(
    keys: &KeyService,
    user_id: &str,
    active: &[&KeyRecord],
    in_octopus: &[ApiKeyInfo],
    now: DateTime<Utc>,
    report: &mut DriftReport,
) -> Result<(), PassError> {
    let present: HashSet<&str> = in_octopus.iter().map(|k| k.id.as_str()).collect();
    for record in active {
        let Some(octopus_key_id) = record.octopus_key_id.as_deref() else { continue };
        if present.contains(octopus_key_id) || keys.octopus().get_api_key(user_id, octopus_key_id).await?.is_some() {
            continue;
        }
        let since = now - keys.revocation_window();
        if keys.store().revocation_in_progress(record.id, since).await? {
            report.left_to_revoker.push(record.id);
            continue;
        }
        let event = drift_event(now, Action::KeyRevoked, Outcome::Success, &record.scope)
            .key(record.id)
            .octopus_key(Some(octopus_key_id))
            .detail(
                json!({ "drift": "the key was deleted in Octopus behind keybroker's back", "octopus": "already_gone" }),
            );
        keys.store().mark_revoked(record.id, now, &event).await?;
        tracing::warn!(key_id = %record.id, "key deleted in Octopus behind keybroker's back");
        report.revoked_behind_back.push(record.id);
    }
    Ok(())
}

/// A marked key without an active (or in-flight) record: the key of a failed issuance is
/// revoked (nobody received its secret, so that is the crash-safety rule, not an admin's
/// decision); any other is unmanaged, and reported.
async fn check_marked_key(
    keys: &KeyService,
    user_id: &str,
    scope_name: &str,
    key: &ApiKeyInfo,
    now: DateTime<Utc>,
    report: &mut DriftReport,
) -> Result<(), PassError> {
    let record_id = marked_record(&key.purpose);
    let record = match record_id {
        Some(id) => keys.store().get_key(id).await?,
        None => None,
    };
    if let Some(failed) = record.as_ref().filter(|r| r.state == KeyState::Failed) {
        keys.octopus().delete_api_key(user_id, &key.id).await?;
        let event = drift_event(now, Action::KeyReconciled, Outcome::Failure, &failed.scope)
            .key(failed.id)
            .octopus_key(Some(&key.id))
            .detail(json!({
                "reason": "an Octopus key of a failed issuance was still present; it was revoked",
                "revoked_octopus_keys": [key.id],
            }));
        keys.audit(event).await?;
        report.orphans_revoked.push(key.id.clone());
        return Ok(());
    }
    let managed = record.as_ref().is_some_and(|r| {
        matches!(r.state, KeyState::Active | KeyState::Pending | KeyState::Expired)
            && r.octopus_key_id.as_deref().is_none_or(|id| id == key.id)
    });
    if !managed {
        report.unmanaged.push(UnmanagedKey {
            scope: scope_name.to_owned(),
            octopus_user_id: user_id.to_owned(),
            octopus_key_id: key.id.clone(),
            purpose: key.purpose.clone(),
            record_id,
            record_state: record.map(|r| r.state),
        });
    }
    Ok(())
}

/// Audits each unmanaged key the first time this process sees it.
async fn report_unmanaged_once(
    keys: &KeyService,
    state: &DriftState,
    unmanaged: &[UnmanagedKey],
    now: DateTime<Utc>,
) -> Result<(), PassError> {
    for key in unmanaged {
        let first = state.reported.lock().map(|mut r| r.insert(key.octopus_key_id.clone())).unwrap_or(false);
        if first {
            let event = drift_event(now, Action::DriftUnmanaged, Outcome::Failure, &key.scope)
                .octopus_key(Some(&key.octopus_key_id))
                .detail(json!({
                    "reason": "an Octopus key carries a keybroker marker but has no active record",
                    "octopus_user_id": key.octopus_user_id,
                    "record_id": key.record_id,
                    "record_state": key.record_state,
                    "action": "reported",
                }));
            keys.audit(event).await?;
        }
    }
    Ok(())
}

/// Deletes the unmanaged keys a fresh scan finds (an admin's decision), auditing each.
pub async fn revoke_unmanaged(
    keys: &KeyService,
    actor: &str,
    ctx: &RequestContext,
) -> Result<Vec<UnmanagedKey>, PassError> {
    let report = scan(keys, &DriftState::default()).await?;
    let mut revoked = Vec::new();
    for key in report.unmanaged {
        keys.octopus().delete_api_key(&key.octopus_user_id, &key.octopus_key_id).await?;
        let event = NewAuditEvent::new(keys.now(), actor, Action::DriftUnmanaged, Outcome::Success, ctx)
            .scope(&key.scope)
            .octopus_key(Some(&key.octopus_key_id))
            .detail(json!({ "action": "revoked", "record_id": key.record_id, "purpose": key.purpose }));
        keys.audit(event).await?;
        revoked.push(key);
    }
    keys.metrics().unmanaged_keys.set(0);
    Ok(revoked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_exact_marker_names_a_record() {
        let id = Uuid::new_v4();
        assert_eq!(marked_record(&format!("keybroker:{id} alice: deploy")), Some(id));
        assert_eq!(marked_record(&format!("keybroker:{id}")), Some(id));
        assert_eq!(marked_record("keybroker:not-a-uuid alice: x"), None);
        assert_eq!(marked_record(&format!("someone else keybroker:{id}")), None);
    }
}
