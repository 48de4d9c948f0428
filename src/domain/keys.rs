//! Key records and their life: the states a record goes through and the only transitions
//! between them. Both store backends apply these rules; nothing else decides them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::names::{Purpose, ScopeName};

/// The life of a key record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Written before Octopus is called; becomes active, or failed.
    Pending,
    Active,
    Revoked,
    Expired,
    Failed,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Self::Pending,
            "active" => Self::Active,
            "revoked" => Self::Revoked,
            "expired" => Self::Expired,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// Where `change` takes a record in this state: the key's whole state machine.
    ///
    /// ```text
    /// pending ─activate─▶ active ─expire─▶ expired
    ///    │                  │                 │
    ///   fail              revoke            revoke
    ///    ▼                  ▼                 ▼
    /// failed             revoked ◀────────────┘
    /// ```
    ///
    /// Revoking a revoked record and expiring one that is no longer active change nothing;
    /// every other change from the wrong state is refused.
    pub fn on(self, change: KeyChange) -> Step {
        use KeyChange::{Activate, Expire, Fail, Revoke};
        use KeyState::{Active, Expired, Failed, Pending, Revoked};
        match (change, self) {
            (Activate, Pending) => Step::To(Active),
            (Fail, Pending) => Step::To(Failed),
            (Activate | Fail, _) => Step::Refused { expected: Pending },
            (Revoke, Active | Expired) => Step::To(Revoked),
            (Revoke, Revoked) => Step::Stay,
            (Revoke, Pending | Failed) => Step::Refused { expected: Active },
            (Expire, Active) => Step::To(Expired),
            (Expire, _) => Step::Stay,
        }
    }
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What can happen to a key record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChange {
    /// Octopus made the key.
    Activate,
    /// The issuance ended without a key.
    Fail,
    /// The key was deleted in Octopus.
    Revoke,
    /// The key's expiry passed.
    Expire,
}

/// The answer of [`KeyState::on`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The record moves to this state.
    To(KeyState),
    /// The record is already where the change would take it, or past it: nothing to write.
    Stay,
    /// Not from this state; the record should have been in `expected`.
    Refused { expected: KeyState },
}

/// keybroker's record of one issued key. The secret is never here, only its keyed hash, which
/// stays inside the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub seq: i64,
    pub id: Uuid,
    pub scope: ScopeName,
    pub requester: String,
    pub purpose: Purpose,
    pub state: KeyState,
    pub octopus_user_id: String,
    pub octopus_key_id: Option<String>,
    pub key_hint: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Who asked on the requester's behalf (a chat-ops bot's pickup ticket), if anyone.
    pub requested_by: Option<String>,
}

impl KeyRecord {
    /// The state as callers should see it at `now`: an active key past its expiry is expired,
    /// even before the sweep has marked it.
    pub fn effective_state(&self, now: DateTime<Utc>) -> KeyState {
        if self.state == KeyState::Active && self.expires_at <= now { KeyState::Expired } else { self.state }
    }
}

/// A record to write as `pending`, before Octopus is called.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: Uuid,
    pub scope: ScopeName,
    pub requester: String,
    pub purpose: Purpose,
    pub octopus_user_id: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The scope's per-requester limit, checked atomically with the insert.
    pub max_active: u32,
    /// The caller's `Idempotency-Key` and a hash of the request it came with.
    pub idempotency: Option<Idempotency>,
    /// The requester's teams at issuance (offboarding can revoke by team).
    pub requester_teams: Vec<String>,
    /// The bot whose pickup ticket the requester claimed, if any.
    pub requested_by: Option<String>,
    /// That pickup ticket.
    pub ticket: Option<String>,
    /// When the issuance writing it gives up (`server.request_timeout` after it began): until
    /// then the record is its issuer's, and the reconciler leaves it alone.
    pub deadline: Option<DateTime<Utc>>,
}

/// A caller's `Idempotency-Key` and the hash of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub request_hash: String,
}

impl Idempotency {
    /// `key` for `request`: its hash is SHA-256 over the request's canonical JSON, so the same
    /// fields in any order are the same request.
    pub fn for_request(key: String, request: &serde_json::Value) -> Self {
        let canonical = crate::domain::audit::canonical_json(request);
        Self { key, request_hash: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(canonical.as_bytes())) }
    }
}

/// How long an `Idempotency-Key` is remembered: a use within it returns the first request's
/// record, a use after it is a new request.
pub const IDEMPOTENCY_WINDOW: chrono::Duration = chrono::Duration::hours(24);

/// The per-requester limit: `held` counts the requester's pending and unexpired active keys in
/// the scope. The store decides it with this, atomically with the insert; a dry run with it too.
pub fn limit_reached(held: u64, max_active: u32) -> bool {
    held >= u64::from(max_active)
}

/// What Octopus returned, recorded when the key becomes active.
#[derive(Debug, Clone)]
pub struct Activation {
    pub id: Uuid,
    pub octopus_key_id: String,
    pub key_hint: String,
    /// HMAC-SHA256 of the secret, hex; never the secret.
    pub secret_hmac: String,
    pub expires_at: DateTime<Utc>,
}

/// True for strings shaped like an Octopus API key: `API-` and upper-case letters and digits.
/// The length is not fixed by any source (octopus-api.md §5.5), so accept a generous range.
///
/// ```
/// use keybroker::domain::keys::looks_like_api_key;
/// assert!(looks_like_api_key("API-JRIXL3O2GQBKWJE2FI1TKRFTGU"));
/// assert!(!looks_like_api_key("api-jrixl3o2gqbkwje2fi1tkrftgu"));
/// ```
pub fn looks_like_api_key(text: &str) -> bool {
    text.strip_prefix("API-").is_some_and(|rest| {
        (16..=64).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_machine_allows_exactly_its_transitions() {
        use KeyChange::*;
        use KeyState::*;
        let table = [
            (Pending, Activate, Step::To(Active)),
            (Pending, Fail, Step::To(Failed)),
            (Pending, Revoke, Step::Refused { expected: Active }),
            (Pending, Expire, Step::Stay),
            (Active, Activate, Step::Refused { expected: Pending }),
            (Active, Fail, Step::Refused { expected: Pending }),
            (Active, Revoke, Step::To(Revoked)),
            (Active, Expire, Step::To(Expired)),
            (Expired, Revoke, Step::To(Revoked)),
            (Expired, Expire, Step::Stay),
            (Expired, Activate, Step::Refused { expected: Pending }),
            (Revoked, Revoke, Step::Stay),
            (Revoked, Expire, Step::Stay),
            (Revoked, Fail, Step::Refused { expected: Pending }),
            (Failed, Revoke, Step::Refused { expected: Active }),
            (Failed, Activate, Step::Refused { expected: Pending }),
            (Failed, Expire, Step::Stay),
            (Expired, Fail, Step::Refused { expected: Pending }),
            (Revoked, Activate, Step::Refused { expected: Pending }),
            (Failed, Fail, Step::Refused { expected: Pending }),
        ];
        for (from, change, step) in table {
            assert_eq!(from.on(change), step, "{from} on {change:?}");
        }
        // Every pair is in the table exactly once.
        assert_eq!(table.len(), 5 * 4);
        let pairs: std::collections::HashSet<_> =
            table.iter().map(|(s, c, _)| (s.as_str(), format!("{c:?}"))).collect();
        assert_eq!(pairs.len(), table.len());
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in [KeyState::Pending, KeyState::Active, KeyState::Revoked, KeyState::Expired, KeyState::Failed] {
            assert_eq!(KeyState::parse(state.as_str()), Some(state));
        }
        assert_eq!(KeyState::parse("Active"), None);
    }
}
