//! Dormant keys: active keys that Octopus says have not authenticated for a while
//! (`LastUsedTimeStamp`), read in one paged pass over each scope account's keys. Auditors list
//! them (`GET /v1/reports/dormant`); admins revoke them (`POST /v1/keys/revoke` with
//! `unused_for`).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::domain::keys::{KeyRecord, KeyState};
use crate::services::issuance::{KeyService, ServiceError};
use crate::store::KeyFilter;

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
    // A span longer than time itself: nothing is that old.
    now.checked_sub_signed(unused_for).is_some_and(|cutoff| last_used.unwrap_or(created_at) <= cutoff)
}

/// Dormant keys, and how many active keys Octopus could not say anything about.
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub dormant: Vec<DormantKey>,
    /// Keys whose server did not track their use (`IsLastUsedTimestampKnown` false or absent:
    /// servers before 2026, keys made before an upgrade): never counted as dormant.
    pub unknown: usize,
}

/// Every active key (of `filter`'s requester, scope and team, when given) unused for
/// `unused_for`, oldest use first. Keys Octopus no longer lists are left to the drift scan;
/// keys whose use Octopus did not track are counted apart and never taken for dormant.
/// Its Octopus reads are paced as background work, behind issuances.
pub async fn find(keys: &KeyService, filter: &KeyFilter, unused_for: chrono::Duration) -> Result<Found, ServiceError> {
    crate::octopus::BACKGROUND.scope((), find_paced(keys, filter, unused_for)).await
}

async fn find_paced(
    keys: &KeyService,
    filter: &KeyFilter,
    unused_for: chrono::Duration,
) -> Result<Found, ServiceError> {
    let now = keys.now();
    let filter = KeyFilter { state: Some(KeyState::Active), now: Some(now), ..filter.clone() };
    let records = keys.store().list_all_keys(&filter).await.map_err(ServiceError::Store)?;
    let mut by_account: BTreeMap<String, Vec<KeyRecord>> = BTreeMap::new();
    for record in records {
        by_account.entry(record.octopus_user_id.clone()).or_default().push(record);
    }
    let mut found = Found::default();
    for (account, records) in by_account {
        let listed = keys.octopus().list_api_keys(&account, Some("keybroker:")).await?;
        let last_used: HashMap<&str, (bool, Option<DateTime<Utc>>)> =
            listed.iter().map(|k| (k.id.as_str(), (k.last_used_known, k.last_used))).collect();
        for record in records {
            match record.octopus_key_id.as_deref().and_then(|id| last_used.get(id)) {
                None => {}
                Some((false, _)) => found.unknown += 1,
                Some((true, used)) if is_dormant(*used, record.created_at, unused_for, now) => {
                    found.dormant.push(DormantKey { last_used: *used, record });
                }
                Some((true, _)) => {}
            }
        }
    }
    found.dormant.sort_by_key(|d| d.last_used.unwrap_or(d.record.created_at));
    Ok(found)
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
        assert!(!is_dormant(None, now - days(1), chrono::Duration::MAX, now), "no panic on a huge span");
    }
}
