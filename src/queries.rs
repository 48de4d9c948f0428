//! The read side: key records and audit events as a caller may see them, and the walk of the
//! audit trail's hash chain. Handlers call these; only services reach the store.

use uuid::Uuid;

use crate::audit::{AuditRecord, ChainBreak, GENESIS_HASH, verify_chain};
use crate::auth::Principal;
use crate::issuance::{KeyService, ServiceError};
// The domain types of the read side, so that the HTTP layer names them without reaching into
// storage.
pub use crate::store::{AuditFilter, Idempotency, KeyFilter, KeyRecord, KeyState, PageRequest, StoreError};

/// A page of key records: a requester's own, or, for auditors and admins, anyone's (the
/// filter's `requester` then picks whose).
pub async fn key_page(
    keys: &KeyService,
    principal: &Principal,
    mut filter: KeyFilter,
    page: PageRequest,
) -> Result<Vec<KeyRecord>, ServiceError> {
    if !principal.sees_everything() {
        match &filter.requester {
            Some(r) if *r != principal.subject => {
                return Err(ServiceError::Forbidden(
                    "only auditors and admins may list other requesters' keys".to_owned(),
                ));
            }
            _ => filter.requester = Some(principal.subject.clone()),
        }
    }
    filter.now = Some(keys.now());
    keys.store().list_keys(&filter, page).await.map_err(ServiceError::Store)
}

/// One record, for its owner, auditors and admins; anyone else is told it does not exist.
pub async fn key(keys: &KeyService, principal: &Principal, id: Uuid) -> Result<KeyRecord, ServiceError> {
    match keys.store().get_key(id).await.map_err(ServiceError::Store)? {
        Some(r) if r.requester == principal.subject || principal.sees_everything() => Ok(r),
        _ => Err(ServiceError::NotFound),
    }
}

/// A page of audit events, newest first (auditors and admins; the caller checks the role).
pub async fn audit_page(
    keys: &KeyService,
    filter: &AuditFilter,
    page: PageRequest,
) -> Result<Vec<AuditRecord>, ServiceError> {
    keys.store().list_audit(filter, page).await.map_err(ServiceError::Store)
}

/// The result of walking the hash chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub events_checked: u64,
    /// The hash of the last event that checked out (the chain's head when there is no break).
    pub head_hash: String,
    pub first_break: Option<ChainBreak>,
}

/// Walks the whole chain, oldest first, in batches, and stops at the first broken link.
pub async fn verify_trail(keys: &KeyService) -> Result<Verification, ServiceError> {
    const BATCH: u32 = 1000;
    let mut head = GENESIS_HASH.to_owned();
    let mut after = 0;
    let mut checked = 0u64;
    loop {
        let batch = keys.store().audit_chain(after, BATCH).await.map_err(ServiceError::Store)?;
        let Some(last) = batch.last() else { break };
        after = last.seq;
        match verify_chain(head.clone(), &batch) {
            Ok(h) => {
                head = h;
                checked += batch.len() as u64;
            }
            Err(brk) => {
                checked += batch.iter().take_while(|e| e.seq < brk.seq).count() as u64;
                return Ok(Verification { events_checked: checked, head_hash: head, first_break: Some(brk) });
            }
        }
        if batch.len() < BATCH as usize {
            break;
        }
    }
    Ok(Verification { events_checked: checked, head_hash: head, first_break: None })
}
