//! The policy as a document: what replicas share through the database so that a reload on one
//! reaches every other (see [`crate::services::policy_sync`]), and its version, a hash of its content.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Policy, Scope, ScopeName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDocument {
    pub scopes: Vec<ScopeDocument>,
    pub on_scope_removed: ScopeRemoval,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeDocument {
    pub name: String,
    pub description: String,
    pub octopus_user: String,
    pub teams: BTreeSet<String>,
    pub default_ttl_seconds: i64,
    pub max_ttl_seconds: i64,
    pub max_active_keys_per_requester: u32,
}

impl PolicyDocument {
    pub fn of(policy: &Policy, on_scope_removed: ScopeRemoval) -> Self {
        let scopes = policy
            .scopes()
            .iter()
            .map(|s| ScopeDocument {
                name: s.name.to_string(),
                description: s.description.clone(),
                octopus_user: s.octopus_user.clone(),
                teams: s.teams.clone(),
                default_ttl_seconds: s.default_ttl.num_seconds(),
                max_ttl_seconds: s.max_ttl.num_seconds(),
                max_active_keys_per_requester: s.max_active_keys_per_requester,
            })
            .collect();
        Self { scopes, on_scope_removed }
    }

    /// The policy it describes (a document from the database is checked like a file's scopes).
    pub fn policy(&self) -> Result<Policy, super::InvalidScopeName> {
        let scopes = self
            .scopes
            .iter()
            .map(|s| {
                Ok(Scope {
                    name: ScopeName::parse(&s.name)?,
                    description: s.description.clone(),
                    octopus_user: s.octopus_user.clone(),
                    teams: s.teams.clone(),
                    default_ttl: chrono::Duration::seconds(s.default_ttl_seconds),
                    max_ttl: chrono::Duration::seconds(s.max_ttl_seconds),
                    max_active_keys_per_requester: s.max_active_keys_per_requester,
                })
            })
            .collect::<Result<Vec<_>, super::InvalidScopeName>>()?;
        Ok(Policy::new(scopes))
    }

    pub fn to_json(&self) -> String {
        crate::domain::audit::canonical_json(&serde_json::to_value(self).unwrap_or_default())
    }

    /// The first 16 hex characters of the SHA-256 of its canonical JSON: equal content, equal
    /// version, whatever replica computed it.
    pub fn version(&self) -> String {
        hex::encode(&Sha256::digest(self.to_json().as_bytes())[..8])
    }
}

/// What a policy reload does to the active keys of a scope it removes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeRemoval {
    /// They stay valid until they expire (or are revoked one by one).
    #[default]
    Keep,
    /// They are revoked at once, each audited.
    Revoke,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_round_trips_and_its_version_follows_its_content() {
        let scope = ScopeDocument {
            name: "payments-deploy".to_owned(),
            description: "d".to_owned(),
            octopus_user: "svc".to_owned(),
            teams: BTreeSet::from(["payments".to_owned()]),
            default_ttl_seconds: 3600,
            max_ttl_seconds: 86400,
            max_active_keys_per_requester: 3,
        };
        let doc = PolicyDocument { scopes: vec![scope.clone()], on_scope_removed: ScopeRemoval::Keep };
        let policy = doc.policy().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(PolicyDocument::of(&policy, ScopeRemoval::Keep), doc);
        let again: PolicyDocument = serde_json::from_str(&doc.to_json()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.version(), doc.version());
        let other = PolicyDocument { on_scope_removed: ScopeRemoval::Revoke, ..doc.clone() };
        assert_ne!(other.version(), doc.version());
        let bad = PolicyDocument { scopes: vec![ScopeDocument { name: "Bad Name!".to_owned(), ..scope }], ..doc };
        assert!(bad.policy().is_err());
    }
}
