//! Dormant keys: active keys that Octopus says have not authenticated for a while
//! (`LastUsedTimeStamp`), read in one paged pass over each scope account's keys. Auditors list
//! them (`GET /v1/reports/dormant`); admins revoke them (`POST /v1/keys/revoke` with
//! `unused_for`).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::issuance::{KeyService, ServiceError};
use crate::store::{KeyFilter, KeyRecord, KeyState};

/// An active key and when it was last used.
#[derive(Debug, Clone)]
pub struct DormantKey {
    pub record: KeyRecord,
    /// `None`: never used.
    pub last_used: Option<DateTime<Utc>>,
}

/// Whether a key last used at `last_used` (or never, since `created_at`) counts as unused for
/// `unused_for` at `now`. A key never used counts from its issuance, so a key issued an hour ago
/// is not "unused for 30 days".
pub fn is_dormant(
    last_used: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    unused_for: chrono::Duration,
    now: DateTime<Utc>,
) -> bool {
    last_used.unwrap_or(created_at) <= now - unused_for
}

/// Every active key (of `filter`'s requester, scope and team, when given) unused for
/// `unused_for`, oldest use first. Keys Octopus no longer lists are left to the drift scan.
pub async fn find(
    keys: &KeyService,
    filter: &KeyFilter,
    unused_for: chrono::Duration,
) -> Result<Vec<DormantKey>, ServiceError> {
    let now = keys.now();
    let filter = KeyFilter { state: Some(KeyState::Active), now: Some(now), ..filter.clone() };
    let records = keys.store().list_all_keys(&filter).await.map_err(ServiceError::Store)?;
    let mut by_account: BTreeMap<String, Vec<KeyRecord>> = BTreeMap::new();
    for record in records {
        by_account.entry(record.octopus_user_id.clone()).or_default().push(record);
    }
    let mut dormant = Vec::new();
    for (account, records) in by_account {
        let listed = keys.octopus().list_api_keys(&account, Some("keybroker:")).await?;
        let last_used: HashMap<&str, Option<DateTime<Utc>>> =
            listed.iter().map(|k| (k.id.as_str(), k.last_used)).collect();
        for record in records {
            let Some(used) = record.octopus_key_id.as_deref().and_then(|id| last_used.get(id)) else { continue };
            if is_dormant(*used, record.created_at, unused_for, now) {
                dormant.push(DormantKey { last_used: *used, record });
            }
        }
    }
    dormant.sort_by_key(|d| d.last_used.unwrap_or(d.record.created_at));
    Ok(dormant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_dormant_when_its_last_use_or_its_issuance_is_old_enough() {
        let now = Utc::now();
        let days = chrono::Duration::days;
        assert!(is_dormant(Some(now - days(31)), now - days(60), days(30), now));
        assert!(!is_dormant(Some(now - days(29)), now - days(60), days(30), now));
        assert!(is_dormant(None, now - days(30), days(30), now), "never used since issuance, 30 days ago");
        assert!(!is_dormant(None, now - chrono::Duration::hours(1), days(30), now), "issued an hour ago");
    }
}
