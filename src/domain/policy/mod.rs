//! The policy: which scopes exist, who may request keys for them, and the rules every issuance
//! must pass. Plain types and functions, reachable by unit tests without HTTP or SQL.

pub mod authz;
pub mod document;
mod expiry;

use std::collections::{BTreeSet, HashMap};

pub use crate::domain::names::{InvalidPurpose, InvalidScopeName, InvalidTtl, Purpose, ScopeName, parse_ttl};
pub use document::ScopeRemoval;
pub use expiry::{ExpiryClamp, ExpiryDecision, ExpiryRequest, UpstreamLimits, resolve_expiry};

use crate::domain::principal::Principal;

/// A named grant: which Octopus service account, which teams, and the limits.
#[derive(Debug, Clone)]
pub struct Scope {
    pub name: ScopeName,
    pub description: String,
    /// The Octopus service account's username (resolved to its `Users-N` id at run time).
    pub octopus_user: String,
    pub teams: BTreeSet<String>,
    pub default_ttl: chrono::Duration,
    pub max_ttl: chrono::Duration,
    pub max_active_keys_per_requester: u32,
}

impl Scope {
    /// Whether `principal` may request keys of this scope ([`authz::Check::RequestScope`]).
    pub fn may_request(&self, principal: &Principal) -> bool {
        authz::check(principal, authz::Check::RequestScope(self)).is_allowed()
    }
}

/// One rule a request failed, explained: what a 403 or 422 problem lists in `reasons`, so that a
/// refusal tells the caller what to change instead of becoming a support ticket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"rule": "teams", "detail": "your teams [web] share none of payments-deploy's teams [payments]"}))]
pub struct Reason {
    /// `scope`, `teams`, `purpose`, `expiry`, `limit` or `role`.
    pub rule: String,
    pub detail: String,
}

impl Reason {
    pub fn new(rule: &str, detail: impl Into<String>) -> Self {
        Self { rule: rule.to_owned(), detail: detail.into() }
    }
}

/// Why a request was refused by the policy. The messages are shown to callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("scope `{0}` does not exist")]
    UnknownScope(String),
    #[error("none of your teams may request keys for scope `{scope}`")]
    NotPermitted { scope: ScopeName, your_teams: Vec<String>, scope_teams: Vec<String> },
    #[error("{0}")]
    InvalidExpiry(String),
    #[error("you already hold {limit} active keys for scope `{scope}`, the most it allows; revoke one first")]
    TooManyActiveKeys { scope: ScopeName, limit: u32 },
}

impl PolicyError {
    /// The refusal as a reason, with what the caller needs to fix it.
    pub fn reason(&self) -> Reason {
        match self {
            Self::UnknownScope(name) => Reason::new(
                "scope",
                format!("scope `{name}` does not exist; GET /v1/scopes lists the ones you may use"),
            ),
            Self::NotPermitted { scope, your_teams, scope_teams } => Reason::new(
                "teams",
                format!(
                    "your teams [{}] share none of {scope}'s teams [{}]",
                    your_teams.join(", "),
                    scope_teams.join(", ")
                ),
            ),
            Self::InvalidExpiry(message) => Reason::new("expiry", message.clone()),
            Self::TooManyActiveKeys { .. } => Reason::new("limit", self.to_string()),
        }
    }
}

/// All scopes, looked up by name.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    scopes: Vec<Scope>,
    by_name: HashMap<ScopeName, usize>,
}

impl Policy {
    pub fn new(scopes: Vec<Scope>) -> Self {
        let by_name = scopes.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Self { scopes, by_name }
    }

    pub fn scopes(&self) -> &[Scope] {
        &self.scopes
    }

    pub fn get(&self, name: &str) -> Option<&Scope> {
        self.by_name.get(name).map(|&i| &self.scopes[i])
    }

    /// The scopes this caller may request keys for.
    pub fn requestable_by<'a>(&'a self, principal: &'a Principal) -> impl Iterator<Item = &'a Scope> {
        self.scopes.iter().filter(move |s| s.may_request(principal))
    }

    /// The team check of an issuance: the scope must exist and the caller must be allowed.
    pub fn authorize(&self, principal: &Principal, scope: &str) -> Result<&Scope, PolicyError> {
        // The caller chose this text: keep it short and printable before it reaches a message,
        // a log or the audit trail.
        let found = self.get(scope).ok_or_else(|| {
            PolicyError::UnknownScope(scope.chars().take(64).collect::<String>().escape_debug().to_string())
        })?;
        if found.may_request(principal) {
            Ok(found)
        } else {
            Err(PolicyError::NotPermitted {
                scope: found.name.clone(),
                your_teams: principal.teams.iter().cloned().collect(),
                scope_teams: found.teams.iter().cloned().collect(),
            })
        }
    }
}

/// The per-requester limit: `active` counts the caller's active and pending keys in the scope.
pub fn check_active_limit(scope: &Scope, active: u64) -> Result<(), PolicyError> {
    if crate::domain::keys::limit_reached(active, scope.max_active_keys_per_requester) {
        Err(PolicyError::TooManyActiveKeys { scope: scope.name.clone(), limit: scope.max_active_keys_per_requester })
    } else {
        Ok(())
    }
}

/// The text sent to Octopus as the key's `Purpose`. The marker ties the Octopus key to the key
/// record, so the reconciler can find keys whose record never became active.
pub fn octopus_purpose(record_id: uuid::Uuid, requester: &str, purpose: &Purpose) -> String {
    format!("{} {requester}: {}", purpose_marker(record_id), purpose.as_str())
}

/// The exact prefix every keybroker key's Octopus `Purpose` starts with.
pub fn purpose_marker(record_id: uuid::Uuid) -> String {
    format!("keybroker:{record_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(teams: &[&str], max_active: u32) -> Scope {
        Scope {
            name: ScopeName::parse("payments-deploy").unwrap(),
            description: String::new(),
            octopus_user: "svc-payments-deploy".to_owned(),
            teams: teams.iter().map(|t| (*t).to_owned()).collect(),
            default_ttl: chrono::Duration::days(7),
            max_ttl: chrono::Duration::days(30),
            max_active_keys_per_requester: max_active,
        }
    }

    fn principal(teams: &[&str], admin: bool) -> Principal {
        Principal::for_tests("alice", teams, admin, false)
    }

    #[test]
    fn a_member_of_a_listed_team_may_request() {
        assert!(scope(&["payments"], 3).may_request(&principal(&["web", "payments"], false)));
    }

    #[test]
    fn an_outsider_may_not_request() {
        let policy = Policy::new(vec![scope(&["payments"], 3)]);
        let err = policy.authorize(&principal(&["web"], false), "payments-deploy").unwrap_err();
        assert!(matches!(err, PolicyError::NotPermitted { .. }));
        assert_eq!(
            err.reason(),
            Reason::new("teams", "your teams [web] share none of payments-deploy's teams [payments]")
        );
    }

    #[test]
    fn an_admin_may_request_any_scope() {
        let policy = Policy::new(vec![scope(&["payments"], 3)]);
        assert!(policy.authorize(&principal(&[], true), "payments-deploy").is_ok());
    }

    #[test]
    fn an_unknown_scope_is_reported_by_name() {
        let policy = Policy::new(vec![scope(&["payments"], 3)]);
        let err = policy.authorize(&principal(&["payments"], false), "nope").unwrap_err();
        assert_eq!(err, PolicyError::UnknownScope("nope".to_owned()));
    }

    #[test]
    fn the_active_key_limit_counts_up_to_the_maximum() {
        let s = scope(&["payments"], 3);
        assert!(check_active_limit(&s, 0).is_ok());
        assert!(check_active_limit(&s, 2).is_ok());
        assert!(matches!(check_active_limit(&s, 3), Err(PolicyError::TooManyActiveKeys { limit: 3, .. })));
    }

    #[test]
    fn the_octopus_purpose_starts_with_the_record_marker() {
        let id = uuid::Uuid::new_v4();
        let text = octopus_purpose(id, "alice@example.com", &Purpose::parse(" deploy ").unwrap());
        assert_eq!(text, format!("keybroker:{id} alice@example.com: deploy"));
        assert!(text.starts_with(&purpose_marker(id)));
    }
}
