//! Who may do what with a pickup ticket (pure rules, table-tested).

use std::collections::BTreeSet;

use crate::domain::principal::Principal;
use crate::domain::tickets::Ticket;

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

/// Whether `principal` may create tickets for someone else: a member of `auth.delegate_teams`.
pub fn may_delegate(principal: &Principal, delegate_teams: &BTreeSet<String>) -> bool {
    principal.teams.iter().any(|t| delegate_teams.contains(t))
}

/// `Ok` when allowed; otherwise the refusal's message (a 403).
pub fn ticket_access(principal: &Principal, ticket: &Ticket, access: TicketAccess) -> Result<(), String> {
    let me = principal.subject.as_str();
    let (bot, person) = (ticket.requested_by.as_str(), ticket.for_subject.as_str());
    let allowed = match access {
        TicketAccess::View => me == bot || me == person || principal.sees_everything(),
        TicketAccess::Cancel => me == bot || me == person || principal.is_admin(),
        TicketAccess::Claim => me == person,
    };
    if allowed {
        return Ok(());
    }
    Err(match access {
        TicketAccess::Claim => format!("this ticket is for `{person}`; only they may claim it"),
        TicketAccess::View => format!("this ticket is for someone else, not for `{me}`"),
        TicketAccess::Cancel => "only the bot that asked, the person it is for or an admin may cancel it".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn who_may_view_cancel_and_claim() {
        let bot = Principal::for_tests("chatops:bot", &["chatops"], false, false);
        let alice = Principal::for_tests("alice", &["payments"], false, false);
        let bob = Principal::for_tests("bob", &["payments"], false, false);
        let auditor = Principal::for_tests("sam", &["security"], false, true);
        let admin = Principal::for_tests("robin", &["platform"], true, false);
        use TicketAccess::*;
        let table: &[(&Principal, TicketAccess, bool)] = &[
            (&bot, View, true),
            (&bot, Cancel, true),
            (&bot, Claim, false),
            (&alice, View, true),
            (&alice, Cancel, true),
            (&alice, Claim, true),
            (&bob, View, false),
            (&bob, Cancel, false),
            (&bob, Claim, false),
            (&auditor, View, true),
            (&auditor, Cancel, false),
            (&auditor, Claim, false),
            (&admin, View, true),
            (&admin, Cancel, true),
            (&admin, Claim, false),
        ];
        let t = ticket();
        for (who, access, allowed) in table {
            assert_eq!(ticket_access(who, &t, *access).is_ok(), *allowed, "{} {access:?}", who.subject);
        }
    }

    #[test]
    fn only_members_of_a_delegate_team_may_ask_for_others() {
        let teams = BTreeSet::from(["chatops".to_owned()]);
        assert!(may_delegate(&Principal::for_tests("bot", &["chatops", "x"], false, false), &teams));
        assert!(!may_delegate(&Principal::for_tests("alice", &["payments"], false, false), &teams));
        assert!(!may_delegate(&Principal::for_tests("robin", &["admins"], true, false), &teams));
        assert!(!may_delegate(&Principal::for_tests("bot", &["chatops"], false, false), &BTreeSet::new()));
    }
}
