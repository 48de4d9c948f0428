//! Every authorization decision keybroker makes, in one place: pure functions of the caller and
//! of what it acts on, with one table test. Handlers and services ask here (through
//! [`check`]); nothing else looks at roles. The model is crates.io's `AuthCheck`.

use std::collections::BTreeSet;

use crate::domain::keys::KeyRecord;
use crate::domain::principal::Principal;
use crate::domain::tickets::Ticket;

use super::Scope;

/// What a caller wants to do.
#[derive(Debug, Clone, Copy)]
pub enum Check<'a> {
    /// Request keys of a scope: admins any, everyone else a scope sharing one of their teams.
    RequestScope(&'a Scope),
    /// Read one key record: its owner, auditors and admins; to anyone else it does not exist.
    ReadKey(&'a KeyRecord),
    /// List the keys of `requester` (`None`: everyone's): one's own, or anyone's for auditors
    /// and admins.
    ListKeys { requester: Option<&'a str> },
    /// Revoke a key: its owner and admins. An auditor is told no; anyone else, that it does not
    /// exist.
    RevokeKey(&'a KeyRecord),
    /// Read or verify the audit trail: auditors and admins.
    ReadAudit,
    /// Identify a secret (`POST /v1/keys/identify`): auditors and admins.
    IdentifyKey,
    /// The admin routes (`/v1/admin/*`) and the details of `/readyz`: admins.
    Administer,
    /// Create pickup tickets for someone else: members of `auth.delegate_teams`.
    Delegate { delegate_teams: &'a BTreeSet<String> },
    /// Something with a pickup ticket.
    Ticket(&'a Ticket, TicketAccess),
}

/// What a caller wants to do with a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketAccess {
    /// `GET /v1/tickets/{id}`: the bot that asked, the person it is for, auditors and admins.
    View,
    /// `DELETE /v1/tickets/{id}`: the bot, the person, admins.
    Cancel,
    /// `POST /v1/tickets/{id}/claim`: the person it is for, and nobody else (not even an admin:
    /// the key is issued as the claimer).
    Claim,
}

/// The answer to a [`Check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// 403, with a message that says who may.
    Deny(String),
    /// 404: the caller may not learn that the thing exists.
    Hide,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        *self == Decision::Allow
    }
}

fn allow_or(allowed: bool, refusal: impl FnOnce() -> String) -> Decision {
    if allowed { Decision::Allow } else { Decision::Deny(refusal()) }
}

/// Whether `principal` may do `what`.
pub fn check(principal: &Principal, what: Check<'_>) -> Decision {
    let me = principal.subject.as_str();
    let (admin, sees_everything) = (principal.is_admin(), principal.is_admin() || principal.is_auditor());
    match what {
        Check::RequestScope(scope) => {
            allow_or(admin || principal.teams.iter().any(|t| scope.teams.contains(t)), || {
                format!("your teams share none of {}'s teams", scope.name)
            })
        }
        Check::ReadKey(record) => {
            if record.requester == me || sees_everything {
                Decision::Allow
            } else {
                Decision::Hide
            }
        }
        Check::ListKeys { requester } => allow_or(sees_everything || requester == Some(me), || {
            "only auditors and admins may list other requesters' keys".to_owned()
        }),
        Check::RevokeKey(record) => match (record.requester == me || admin, principal.is_auditor()) {
            (true, _) => Decision::Allow,
            (false, true) => Decision::Deny("only the key's owner or an admin may revoke it".to_owned()),
            (false, false) => Decision::Hide,
        },
        Check::ReadAudit => allow_or(sees_everything, || "the audit trail is for auditors and admins".to_owned()),
        Check::IdentifyKey => {
            allow_or(sees_everything, || "identifying keys needs the auditor or admin role".to_owned())
        }
        Check::Administer => allow_or(admin, || "this needs the admin role".to_owned()),
        Check::Delegate { delegate_teams } => {
            allow_or(principal.teams.iter().any(|t| delegate_teams.contains(t)), || {
                "only members of auth.delegate_teams may ask for keys on someone else's behalf".to_owned()
            })
        }
        Check::Ticket(ticket, access) => ticket_access(principal, ticket, access),
    }
}

fn ticket_access(principal: &Principal, ticket: &Ticket, access: TicketAccess) -> Decision {
    let me = principal.subject.as_str();
    let (bot, person) = (ticket.requested_by.as_str(), ticket.for_subject.as_str());
    let allowed = match access {
        TicketAccess::View => me == bot || me == person || principal.is_admin() || principal.is_auditor(),
        TicketAccess::Cancel => me == bot || me == person || principal.is_admin(),
        TicketAccess::Claim => me == person,
    };
    allow_or(allowed, || match access {
        TicketAccess::Claim => format!("this ticket is for `{person}`; only they may claim it"),
        TicketAccess::View => format!("this ticket is for someone else, not for `{me}`"),
        TicketAccess::Cancel => "only the bot that asked, the person it is for or an admin may cancel it".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::keys::KeyState;
    use crate::domain::tickets::{TicketId, TicketState};

    fn ticket() -> Ticket {
        let now = chrono::Utc::now();
        Ticket {
            id: TicketId::generate(),
            for_subject: "alice".to_owned(),
            scope: "s".to_owned(),
            purpose: "p".to_owned(),
            ttl: None,
            requested_by: "chatops:bot".to_owned(),
            requested_by_name: "Bot".to_owned(),
            state: TicketState::Waiting,
            key_id: None,
            created_at: now,
            expires_at: now,
            claim_started_at: None,
            ended_at: None,
        }
    }

    fn alices_key() -> KeyRecord {
        let now = chrono::Utc::now();
        KeyRecord {
            seq: 1,
            id: uuid::Uuid::new_v4(),
            scope: "payments-deploy".to_owned(),
            requester: "alice".to_owned(),
            purpose: "p".to_owned(),
            state: KeyState::Active,
            octopus_user_id: "Users-1".to_owned(),
            octopus_key_id: None,
            key_hint: None,
            created_at: now,
            expires_at: now,
            revoked_at: None,
            requested_by: None,
        }
    }

    /// One table for every decision: who (bot, alice, bob, the auditor, the admin) may do what.
    #[test]
    fn every_decision_by_caller() {
        let bot = Principal::for_tests("chatops:bot", &["chatops"], false, false);
        let alice = Principal::for_tests("alice", &["payments"], false, false);
        let bob = Principal::for_tests("bob", &["web"], false, false);
        let auditor = Principal::for_tests("sam", &["security"], false, true);
        let admin = Principal::for_tests("robin", &["platform"], true, false);
        let callers = [&bot, &alice, &bob, &auditor, &admin];
        let scope = Scope {
            name: super::super::ScopeName::parse("payments-deploy").unwrap(),
            description: String::new(),
            octopus_user: "svc".to_owned(),
            teams: ["payments".to_owned()].into(),
            default_ttl: chrono::Duration::hours(1),
            max_ttl: chrono::Duration::days(1),
            max_active_keys_per_requester: 3,
        };
        let (key, t) = (alices_key(), ticket());
        let delegates = BTreeSet::from(["chatops".to_owned()]);
        use Decision::{Allow, Deny, Hide};
        use TicketAccess::{Cancel, Claim, View};
        let d = |text: &str| Deny(text.to_owned());
        // (check, what bot, alice, bob, the auditor and the admin get)
        let table: Vec<(Check<'_>, [Decision; 5])> = vec![
            (
                Check::RequestScope(&scope),
                [
                    d("your teams share none of payments-deploy's teams"),
                    Allow,
                    d("your teams share none of payments-deploy's teams"),
                    d("your teams share none of payments-deploy's teams"),
                    Allow,
                ],
            ),
            (Check::ReadKey(&key), [Hide, Allow, Hide, Allow, Allow]),
            (
                Check::ListKeys { requester: Some("alice") },
                [
                    d("only auditors and admins may list other requesters' keys"),
                    Allow,
                    d("only auditors and admins may list other requesters' keys"),
                    Allow,
                    Allow,
                ],
            ),
            (
                Check::ListKeys { requester: None },
                [
                    d("only auditors and admins may list other requesters' keys"),
                    d("only auditors and admins may list other requesters' keys"),
                    d("only auditors and admins may list other requesters' keys"),
                    Allow,
                    Allow,
                ],
            ),
            (Check::RevokeKey(&key), [Hide, Allow, Hide, d("only the key's owner or an admin may revoke it"), Allow]),
            (
                Check::ReadAudit,
                [
                    d("the audit trail is for auditors and admins"),
                    d("the audit trail is for auditors and admins"),
                    d("the audit trail is for auditors and admins"),
                    Allow,
                    Allow,
                ],
            ),
            (
                Check::IdentifyKey,
                [
                    d("identifying keys needs the auditor or admin role"),
                    d("identifying keys needs the auditor or admin role"),
                    d("identifying keys needs the auditor or admin role"),
                    Allow,
                    Allow,
                ],
            ),
            (
                Check::Administer,
                [
                    d("this needs the admin role"),
                    d("this needs the admin role"),
                    d("this needs the admin role"),
                    d("this needs the admin role"),
                    Allow,
                ],
            ),
            (
                Check::Delegate { delegate_teams: &delegates },
                [
                    Allow,
                    d("only members of auth.delegate_teams may ask for keys on someone else's behalf"),
                    d("only members of auth.delegate_teams may ask for keys on someone else's behalf"),
                    d("only members of auth.delegate_teams may ask for keys on someone else's behalf"),
                    // Not even an admin: delegation is a bot's narrow identity, not a role.
                    d("only members of auth.delegate_teams may ask for keys on someone else's behalf"),
                ],
            ),
            (
                Check::Ticket(&t, View),
                [Allow, Allow, d("this ticket is for someone else, not for `bob`"), Allow, Allow],
            ),
            (
                Check::Ticket(&t, Cancel),
                [
                    Allow,
                    Allow,
                    d("only the bot that asked, the person it is for or an admin may cancel it"),
                    d("only the bot that asked, the person it is for or an admin may cancel it"),
                    Allow,
                ],
            ),
            (
                Check::Ticket(&t, Claim),
                [
                    d("this ticket is for `alice`; only they may claim it"),
                    Allow,
                    d("this ticket is for `alice`; only they may claim it"),
                    d("this ticket is for `alice`; only they may claim it"),
                    d("this ticket is for `alice`; only they may claim it"),
                ],
            ),
        ];
        for (what, expected) in table {
            for (who, want) in callers.iter().zip(expected) {
                assert_eq!(check(who, what), want, "{} {what:?}", who.subject);
            }
        }
        // Nobody is a delegate without delegate teams.
        assert!(!check(&bot, Check::Delegate { delegate_teams: &BTreeSet::new() }).is_allowed());
    }
}
