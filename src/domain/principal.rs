//! Who is calling: the principal a verified token describes, and the roles its teams give.
//! Authentication itself (tokens, issuers, bindings) is in `crate::auth`.

use std::collections::BTreeSet;

/// The issuer entry `[auth]` (as opposed to `[[auth.issuers]]`) is called: its principals keep
/// their plain `sub`.
pub const DEFAULT_ISSUER: &str = "default";

/// Roles derived from the caller's teams. Everyone is a requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Requester,
    Auditor,
    Admin,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Who the caller is for ownership, limits and the audit trail: the token's `sub` for the
    /// `default` issuer, `<issuer>:<sub>` for every other, so that one `sub` from two issuers is
    /// two principals.
    pub subject: String,
    /// The name of the issuer entry that verified the token.
    pub issuer: String,
    pub display_name: String,
    pub teams: BTreeSet<String>,
    pub roles: BTreeSet<Role>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    pub fn is_auditor(&self) -> bool {
        self.roles.contains(&Role::Auditor)
    }

    #[cfg(test)]
    pub fn for_tests(subject: &str, teams: &[&str], admin: bool, auditor: bool) -> Self {
        let mut roles = BTreeSet::from([Role::Requester]);
        if admin {
            roles.insert(Role::Admin);
        }
        if auditor {
            roles.insert(Role::Auditor);
        }
        Self {
            subject: subject.to_owned(),
            issuer: crate::domain::principal::DEFAULT_ISSUER.to_owned(),
            display_name: subject.to_owned(),
            teams: teams.iter().map(|t| (*t).to_owned()).collect(),
            roles,
        }
    }
}
