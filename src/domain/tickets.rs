//! Pickup tickets: a chat-ops bot asks for a key on a named person's behalf, and that person
//! claims it in their own browser, so the secret never passes through the bot or the chat.
//!
//! A ticket is only a request: nothing exists in Octopus until the person claims it. The claim
//! runs the normal issuance as the person (their teams, their limits, the expiry rules) with the
//! bot named as `requested_by` on the record and on every event. The pickup link is safe to
//! unfurl: opening it changes nothing.
//!
//! States: `waiting` → `claimed` (with the key record's id), `expired` (after `[tickets]
//! lifetime`) or `cancelled`. While a claim's issuance runs, the ticket stays `waiting` with its
//! claim marked, so a second claim or a cancel gets 409 instead of racing it; a claim that
//! fails (refused by the policy, Octopus down) is released and can be tried again.

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::names::{Purpose, ScopeName};

/// How long a started claim holds its ticket before another may take over, beyond the claim's
/// own deadline (`server.request_timeout`; see [`TicketService::new`]).
pub const CLAIM_HOLD_MARGIN: chrono::Duration = chrono::Duration::minutes(1);

/// Who must hold a waiting ticket for it to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold<'a> {
    /// The claim with this token (it ends the ticket as claimed, or lets go).
    Claim(&'a str),
    /// No claim, or only one started before this time (cancel, expiry, repair).
    Nobody { stale_before: DateTime<Utc> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TicketState {
    /// Waiting for its person to claim it.
    Waiting,
    /// Claimed: a key was issued to the person (`key_id`).
    Claimed,
    /// Not claimed within `[tickets] lifetime`.
    Expired,
    /// Cancelled by the bot, the person or an admin.
    Cancelled,
}

impl TicketState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Claimed => "claimed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "waiting" => Self::Waiting,
            "claimed" => Self::Claimed,
            "expired" => Self::Expired,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// A pickup ticket as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub id: TicketId,
    /// The principal who may claim it.
    pub for_subject: String,
    pub scope: ScopeName,
    pub purpose: Purpose,
    /// The lifetime the bot asked for (`"2d"`), or the scope's default.
    pub ttl: Option<String>,
    /// The bot's principal and display name.
    pub requested_by: String,
    pub requested_by_name: String,
    pub state: TicketState,
    pub key_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub claim_started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
}

impl Ticket {
    /// The state callers see at `now`: a waiting ticket past its expiry is expired, even
    /// before the job has marked it.
    pub fn effective_state(&self, now: DateTime<Utc>, hold: chrono::Duration) -> TicketState {
        if self.state == TicketState::Waiting && self.expires_at <= now && !self.claim_in_progress(now, hold) {
            TicketState::Expired
        } else {
            self.state
        }
    }

    /// A claim started less than `hold` ago and not finished.
    pub fn claim_in_progress(&self, now: DateTime<Utc>, hold: chrono::Duration) -> bool {
        self.state == TicketState::Waiting && self.claim_started_at.is_some_and(|at| at > now - hold)
    }
}

/// How a waiting ticket ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketEnd {
    /// By the claim holding it, with the key it issued.
    Claimed(Uuid),
    /// Unless a claim holds it.
    Cancelled,
    /// Unless a claim holds it.
    Expired,
}

impl TicketEnd {
    pub fn state(self) -> TicketState {
        match self {
            Self::Claimed(_) => TicketState::Claimed,
            Self::Cancelled => TicketState::Cancelled,
            Self::Expired => TicketState::Expired,
        }
    }

    pub fn key_id(self) -> Option<Uuid> {
        match self {
            Self::Claimed(id) => Some(id),
            _ => None,
        }
    }
}

/// A ticket's id: `tkt_` and 26 characters of base32 (128 random bits). It travels in chat, so
/// it must not be guessable; it is not a credential (claiming needs the person's own token).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TicketId(String);

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

impl TicketId {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut bytes);
        let mut bits: u128 = u128::from_be_bytes(bytes);
        let mut text = String::with_capacity(30);
        text.push_str("tkt_");
        for _ in 0..26 {
            text.push(char::from(ALPHABET[(bits & 31) as usize]));
            bits >>= 5;
        }
        Self(text)
    }

    /// A well-formed id, or `None` (a malformed id in a path is a 400, never a database query).
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("tkt_")?;
        (rest.len() == 26 && rest.bytes().all(|b| ALPHABET.contains(&b))).then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TicketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_malformed_ones_do_not() {
        let id = TicketId::generate();
        assert_eq!(TicketId::parse(id.as_str()), Some(id.clone()));
        assert_ne!(TicketId::generate(), id);
        for bad in ["", "tkt_", "tkt_ABCDEFGHIJKLMNOPQRSTUVWXYZ", "key_abcdefghijklmnopqrstuvwxyz", "tkt_abc'--"] {
            assert_eq!(TicketId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_waiting_ticket_past_its_expiry_reads_expired_unless_a_claim_holds_it() {
        let now = Utc::now();
        let mut ticket = Ticket {
            id: TicketId::generate(),
            for_subject: "alice".to_owned(),
            scope: ScopeName::parse("s").unwrap(),
            purpose: Purpose::parse("p").unwrap(),
            ttl: None,
            requested_by: "bot".to_owned(),
            requested_by_name: "Bot".to_owned(),
            state: TicketState::Waiting,
            key_id: None,
            created_at: now - chrono::Duration::minutes(20),
            expires_at: now - chrono::Duration::minutes(5),
            claim_started_at: None,
            ended_at: None,
        };
        let hold = chrono::Duration::minutes(10);
        assert_eq!(ticket.effective_state(now, hold), TicketState::Expired);
        ticket.claim_started_at = Some(now - chrono::Duration::minutes(6));
        assert_eq!(ticket.effective_state(now, hold), TicketState::Waiting);
        ticket.claim_started_at = Some(now - hold - chrono::Duration::seconds(1));
        assert_eq!(ticket.effective_state(now, hold), TicketState::Expired);
        ticket.state = TicketState::Claimed;
        assert_eq!(ticket.effective_state(now, hold), TicketState::Claimed);
    }
}
