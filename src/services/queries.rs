//! The read side: key records and audit events as a caller may see them, and the walk of the
//! audit trail's hash chain. Handlers call these; only services reach the store.

use uuid::Uuid;

use crate::domain::audit::AuditRecord;
use crate::domain::policy::authz::Check;
use crate::domain::principal::Principal;
use crate::services::issuance::{KeyService, ServiceError, authorized};
// The domain types of the read side, so that the HTTP layer names them without reaching into
// storage.
use crate::domain::keys::KeyRecord;
pub use crate::store::{AuditFilter, KeyFilter, PageRequest, StoreError};

/// A page of key records: a requester's own, or, for auditors and admins, anyone's (the
/// filter's `requester` then picks whose).
pub async fn key_page(
    keys: &KeyService,
    principal: &Principal,
    mut filter: KeyFilter,
    page: PageRequest,
) -> Result<Vec<KeyRecord>, ServiceError> {
    // Without a requester filter, a caller who may not list everyone's keys lists their own.
    if filter.requester.is_none() && authorized(principal, Check::ListKeys { requester: None }).is_err() {
        filter.requester = Some(principal.subject.clone());
    }
    authorized(principal, Check::ListKeys { requester: filter.requester.as_deref() })?;
    filter.now = Some(keys.now());
    keys.store().list_keys(&filter, page).await.map_err(ServiceError::Store)
}

/// One record, for its owner, auditors and admins; anyone else is told it does not exist.
pub async fn key(keys: &KeyService, principal: &Principal, id: Uuid) -> Result<KeyRecord, ServiceError> {
    let record = keys.store().get_key(id).await.map_err(ServiceError::Store)?.ok_or(ServiceError::NotFound)?;
    authorized(principal, Check::ReadKey(&record))?;
    Ok(record)
}

/// A page of audit events, newest first (auditors and admins; the caller checks the role).
pub async fn audit_page(
    keys: &KeyService,
    filter: &AuditFilter,
    page: PageRequest,
) -> Result<Vec<AuditRecord>, ServiceError> {
    keys.store().list_audit(filter, page).await.map_err(ServiceError::Store)
}

/// Verifies the audit trail from where this process last did, at most `bound` events (see
/// [`AuditWatch::verify`](crate::services::audit_watch::AuditWatch::verify)).
pub async fn verify_trail(
    keys: &KeyService,
    watch: &crate::services::audit_watch::AuditWatch,
    bound: u64,
) -> Result<crate::services::audit_watch::Verification, ServiceError> {
    watch.verify(keys.store().as_ref(), bound).await.map_err(ServiceError::Store)
}

/// How a token with `claims` from `issuer` would be read, and, given a scope, whether the
/// principal it makes may use it (`POST /v1/admin/explain`).
pub struct Explained {
    pub token: crate::auth::Explanation,
    /// The scope's verdict: its name when allowed, the rule it broke otherwise.
    pub scope: Option<Result<String, crate::domain::policy::PolicyError>>,
}

/// No configured issuer has the name asked for; the names there are.
pub struct UnknownIssuer(pub Vec<String>);

pub fn explain(
    auth: &crate::auth::Authenticator,
    keys: &KeyService,
    issuer: &str,
    claims: &serde_json::Map<String, serde_json::Value>,
    scope: Option<&str>,
) -> Result<Explained, UnknownIssuer> {
    let token =
        auth.explain(issuer, claims).ok_or_else(|| UnknownIssuer(auth.issuer_names().map(str::to_owned).collect()))?;
    let scope = match (scope, &token.principal) {
        (Some(name), Some(principal)) => Some(keys.policy().authorize(principal, name).map(|s| s.name.to_string())),
        _ => None,
    };
    Ok(Explained { token, scope })
}
