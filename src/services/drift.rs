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
use crate::domain::keys::KeyState;
use crate::domain::policy::purpose_marker;
use crate::services::issuance::KeyService;
use crate::store::KeyFilter;

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
pub async fn scan(keys: &KeyService, state: &DriftState) -> Result<DriftReport, String> {
    let mut report = DriftReport::default();
    let now = keys.now();
    let policy = keys.policy();
    let mut accounts: HashMap<String, String> = HashMap::new();
    for scope in policy.scopes() {
        match keys.scope_account(scope, false).await {
            Ok(user) => {
                accounts.entry(user.id).or_insert_with(|| scope.name.to_string());
            }
            Err(e) => tracing::debug!(scope = %scope.name, error = %e, "drift scan skips a scope"),
        }
    }
    // Read the active records once; each account's are picked out below.
    let filter = KeyFilter { state: Some(KeyState::Active), now: Some(now), ..Default::default() };
    let active = keys.store().list_all_keys(&filter).await.map_err(|e| e.to_string())?;
    for (user_id, scope_name) in accounts {
        let in_octopus = keys.octopus().list_api_keys(&user_id, Some("keybroker:")).await.map_err(|e| e.to_string())?;
        let present: HashSet<&str> = in_octopus.iter().map(|k| k.id.as_str()).collect();

        // Active records whose key is gone.
        for record in active.iter().filter(|r| r.octopus_user_id == user_id) {
            let Some(octopus_key_id) = record.octopus_key_id.as_deref() else { continue };
            if present.contains(octopus_key_id) {
                continue;
            }
            // Confirm with a direct read before acting on a listing.
            if keys.octopus().get_api_key(&user_id, octopus_key_id).await.map_err(|e| e.to_string())?.is_some() {
                continue;
            }
            // Someone is revoking it right now: theirs is the event that names who revoked it.
            let since = now - keys.revocation_window();
            if keys.store().revocation_in_progress(record.id, since).await.map_err(|e| e.to_string())? {
                report.left_to_revoker.push(record.id);
                continue;
            }
            let event = NewAuditEvent::new(
                now,
                "keybroker",
                Action::KeyRevoked,
                Outcome::Success,
                &RequestContext::default(),
            )
            .scope(&record.scope)
            .key(record.id)
            .octopus_key(Some(octopus_key_id))
            .detail(
                json!({ "drift": "the key was deleted in Octopus behind keybroker's back", "octopus": "already_gone" }),
            );
            keys.store().mark_revoked(record.id, now, &event).await.map_err(|e| e.to_string())?;
            tracing::warn!(key_id = %record.id, "key deleted in Octopus behind keybroker's back");
            report.revoked_behind_back.push(record.id);
        }

        // Marked keys without an active (or in-flight) record.
        for key in in_octopus.iter().filter(|k| k.purpose.starts_with("keybroker:")) {
            let record_id = marked_record(&key.purpose);
            let record = match record_id {
                Some(id) => keys.store().get_key(id).await.map_err(|e| e.to_string())?,
                None => None,
            };
            let managed = record.as_ref().is_some_and(|r| {
                matches!(r.state, KeyState::Active | KeyState::Pending | KeyState::Expired)
                    && r.octopus_key_id.as_deref().is_none_or(|id| id == key.id)
            });
            // A failed record proves nobody received the key's secret (its issuance never
            // completed): revoking it is the crash-safety rule, not an admin's decision.
            if let Some(failed) = record.as_ref().filter(|r| r.state == KeyState::Failed) {
                keys.octopus().delete_api_key(&user_id, &key.id).await.map_err(|e| e.to_string())?;
                let event = NewAuditEvent::new(
                    now,
                    "keybroker",
                    Action::KeyReconciled,
                    Outcome::Failure,
                    &RequestContext::default(),
                )
                .scope(&failed.scope)
                .key(failed.id)
                .octopus_key(Some(&key.id))
                .detail(json!({
                    "reason": "an Octopus key of a failed issuance was still present; it was revoked",
                    "revoked_octopus_keys": [key.id],
                }));
                keys.audit(event).await.map_err(|e| e.to_string())?;
                report.orphans_revoked.push(key.id.clone());
                continue;
            }
            if !managed {
                report.unmanaged.push(UnmanagedKey {
                    scope: scope_name.clone(),
                    octopus_user_id: user_id.clone(),
                    octopus_key_id: key.id.clone(),
                    purpose: key.purpose.clone(),
                    record_id,
                    record_state: record.map(|r| r.state),
                });
            }
        }
    }
    keys.metrics().unmanaged_keys.set(i64::try_from(report.unmanaged.len()).unwrap_or(i64::MAX));
    for key in &report.unmanaged {
        let first = state.reported.lock().map(|mut r| r.insert(key.octopus_key_id.clone())).unwrap_or(false);
        if first {
            let event = NewAuditEvent::new(
                now,
                "keybroker",
                Action::DriftUnmanaged,
                Outcome::Failure,
                &RequestContext::default(),
            )
            .scope(&key.scope)
            .octopus_key(Some(&key.octopus_key_id))
            .detail(json!({
                "reason": "an Octopus key carries a keybroker marker but has no active record",
                "octopus_user_id": key.octopus_user_id,
                "record_id": key.record_id,
                "record_state": key.record_state,
                "action": "reported",
            }));
            keys.audit(event).await.map_err(|e| e.to_string())?;
        }
    }
    Ok(report)
}

/// Deletes the unmanaged keys a fresh scan finds (an admin's decision), auditing each.
pub async fn revoke_unmanaged(
    keys: &KeyService,
    actor: &str,
    ctx: &RequestContext,
) -> Result<Vec<UnmanagedKey>, String> {
    let report = scan(keys, &DriftState::default()).await?;
    let mut revoked = Vec::new();
    for key in report.unmanaged {
        keys.octopus().delete_api_key(&key.octopus_user_id, &key.octopus_key_id).await.map_err(|e| e.to_string())?;
        let event = NewAuditEvent::new(keys.now(), actor, Action::DriftUnmanaged, Outcome::Success, ctx)
            .scope(&key.scope)
            .octopus_key(Some(&key.octopus_key_id))
            .detail(json!({ "action": "revoked", "record_id": key.record_id, "purpose": key.purpose }));
        keys.audit(event).await.map_err(|e| e.to_string())?;
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
