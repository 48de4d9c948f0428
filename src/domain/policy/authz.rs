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
            scope: super::super::ScopeName::parse("s").unwrap(),
            purpose: super::super::Purpose::parse("p").unwrap(),
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
            scope: super::super::ScopeName::parse("payments-deploy").unwrap(),
            requester: "alice".to_owned(),
            purpose: super::super::Purpose::parse("p").unwrap(),
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

    /// The five callers of the tables: the bot, alice, bob, the auditor, the admin.
    fn callers() -> [Principal; 5] {
        [
            Principal::for_tests("chatops:bot", &["chatops"], false, false),
            Principal::for_tests("alice", &["payments"], false, false),
            Principal::for_tests("bob", &["web"], false, false),
            Principal::for_tests("sam", &["security"], false, true),
            Principal::for_tests("robin", &["platform"], true, false),
        ]
    }

    fn deny(text: &str) -> Decision {
        Decision::Deny(text.to_owned())
    }

    fn assert_table(table: Vec<(Check<'_>, [Decision; 5])>) {
        let callers = callers();
        for (what, expected) in table {
            for (who, want) in callers.iter().zip(expected) {
                assert_eq!(check(who, what), want, "{} {what:?}", who.subject);
            }
        }
    }

    /// Who may request a scope, read, list and revoke keys, and use the roles' routes.
    #[test]
    fn key_and_role_decisions_by_caller() {
        let scope = Scope {
            name: super::super::ScopeName::parse("payments-deploy").unwrap(),
            description: String::new(),
            octopus_user: "svc".to_owned(),
            teams: ["payments".to_owned()].into(),
            default_ttl: chrono::Duration::hours(1),
            max_ttl: chrono::Duration::days(1),
            max_active_keys_per_requester: 3,
        };
        let key = alices_key();
        use Decision::{Allow, Hide};
        let teams = deny("your teams share none of payments-deploy's teams");
        let others = deny("only auditors and admins may list other requesters' keys");
        let audit = deny("the audit trail is for auditors and admins");
        let identify = deny("identifying keys needs the auditor or admin role");
        let admin = deny("this needs the admin role");
        // (check, what the bot, alice, bob, the auditor and the admin get)
        assert_table(vec![
            (Check::RequestScope(&scope), [teams.clone(), Allow, teams.clone(), teams, Allow]),
            (Check::ReadKey(&key), [Hide, Allow, Hide, Allow, Allow]),
            (Check::ListKeys { requester: Some("alice") }, [others.clone(), Allow, others.clone(), Allow, Allow]),
            (Check::ListKeys { requester: None }, [others.clone(), others.clone(), others, Allow, Allow]),
            (
                Check::RevokeKey(&key),
                [Hide, Allow, Hide, deny("only the key's owner or an admin may revoke it"), Allow],
            ),
            (Check::ReadAudit, [audit.clone(), audit.clone(), audit, Allow, Allow]),
            (Check::IdentifyKey, [identify.clone(), identify.clone(), identify, Allow, Allow]),
            (Check::Administer, [admin.clone(), admin.clone(), admin.clone(), admin, Allow]),
        ]);
    }

    /// Who may create, view, cancel and claim pickup tickets.
    #[test]
    fn ticket_decisions_by_caller() {
        let t = ticket();
        let delegates = BTreeSet::from(["chatops".to_owned()]);
        use Decision::Allow;
        use TicketAccess::{Cancel, Claim, View};
        let delegate = deny("only members of auth.delegate_teams may ask for keys on someone else's behalf");
        let cancel = deny("only the bot that asked, the person it is for or an admin may cancel it");
        let claim = deny("this ticket is for `alice`; only they may claim it");
        assert_table(vec![
            // Not even an admin delegates: delegation is a bot's narrow identity, not a role.
            (
                Check::Delegate { delegate_teams: &delegates },
                [Allow, delegate.clone(), delegate.clone(), delegate.clone(), delegate],
            ),
            (
                Check::Ticket(&t, View),
                [Allow, Allow, deny("this ticket is for someone else, not for `bob`"), Allow, Allow],
            ),
            (Check::Ticket(&t, Cancel), [Allow, Allow, cancel.clone(), cancel, Allow]),
            (Check::Ticket(&t, Claim), [claim.clone(), Allow, claim.clone(), claim.clone(), claim]),
        ]);
        // Nobody is a delegate without delegate teams.
        let bot = &callers()[0];
        assert!(!check(bot, Check::Delegate { delegate_teams: &BTreeSet::new() }).is_allowed());
    }
}
