//! Offboarding: revoking every active key a selection matches (a requester, a scope, a team,
//! dormant keys), each audited, for `POST /v1/keys/revoke` and for policy reloads that remove a
//! scope. Keys still being issued are marked, and the reconciler revokes them once active.

use uuid::Uuid;

use crate::domain::audit::RequestContext;
use crate::domain::keys::KeyState;
use crate::domain::principal::Principal;
use crate::services::issuance::{KeyService, ServiceError};
use crate::store::KeyFilter;

/// Which keys to revoke; every given filter must match.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub requester: Option<String>,
    pub scope: Option<String>,
    pub team: Option<String>,
    /// Only keys Octopus has not seen used for this long (see [`crate::services::dormant`]).
    pub unused_for: Option<chrono::Duration>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.requester.is_none() && self.scope.is_none() && self.team.is_none() && self.unused_for.is_none()
    }
}

/// What became of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Revoked,
    /// The revocation failed now; it stays requested and the reconciler retries it.
    Failed(String),
    /// Still being issued: the reconciler revokes it once it is active.
    Scheduled,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub results: Vec<(Uuid, Outcome)>,
}

impl Report {
    pub fn revoked(&self) -> usize {
        self.results.iter().filter(|(_, o)| *o == Outcome::Revoked).count()
    }

    pub fn failed(&self) -> usize {
        self.results.iter().filter(|(_, o)| matches!(o, Outcome::Failed(_))).count()
    }
}

/// Revokes every active key `selection` matches as `principal`, and marks the keys still being
/// issued. Octopus calls are paced like a background job's, so offboarding never takes
/// issuance's share of the outbound rate limit.
pub async fn revoke_matching(
    keys: &KeyService,
    principal: &Principal,
    selection: Selection,
    ctx: &RequestContext,
) -> Result<Report, ServiceError> {
    crate::octopus::BACKGROUND.scope((), revoke_paced(keys, principal, selection, ctx)).await
}

async fn revoke_paced(
    keys: &KeyService,
    principal: &Principal,
    selection: Selection,
    ctx: &RequestContext,
) -> Result<Report, ServiceError> {
    let filter = KeyFilter {
        requester: selection.requester,
        scope: selection.scope,
        team: selection.team,
        state: Some(KeyState::Active),
        now: Some(keys.now()),
    };
    let (matching, in_flight): (Vec<Uuid>, Vec<Uuid>) = match selection.unused_for {
        // Keys still being issued have not been used yet, and are not dormant.
        Some(unused_for) => {
            let found = crate::services::dormant::find(keys, &filter, unused_for).await?;
            (found.dormant.into_iter().map(|d| d.record.id).collect(), Vec::new())
        }
        None => {
            let store = keys.store();
            let active = store.list_all_keys(&filter).await.map_err(ServiceError::Store)?;
            let pending = store
                .list_all_keys(&KeyFilter { state: Some(KeyState::Pending), ..filter })
                .await
                .map_err(ServiceError::Store)?;
            (active.into_iter().map(|r| r.id).collect(), pending.into_iter().map(|r| r.id).collect())
        }
    };
    for id in &in_flight {
        keys.store().request_revocation(*id, keys.now()).await.map_err(ServiceError::Store)?;
    }
    let mut report = Report::default();
    for id in matching {
        let outcome = match keys.revoke_requested(principal, id, ctx).await {
            Ok(_) => Outcome::Revoked,
            Err(e) => Outcome::Failed(e.to_string()),
        };
        report.results.push((id, outcome));
    }
    report.results.extend(in_flight.into_iter().map(|id| (id, Outcome::Scheduled)));
    Ok(report)
}
