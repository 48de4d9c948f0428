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
    pub scope: String,
    pub purpose: String,
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
            scope: "s".to_owned(),
            purpose: "p".to_owned(),
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

// ---------------------------------------------------------------------------------------------
// The service: create, read, cancel, claim and expire.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::json;

use crate::audit::{Action, NewAuditEvent, OnBehalf, Outcome, RequestContext};
use crate::auth::Principal;
use crate::config::WebhookConfig;
use crate::issuance::{IssueOutcome, IssueRequest, KeyService, ServiceError};
use crate::policy::tickets::{TicketAccess, may_delegate, ticket_access};
use crate::policy::{ExpiryRequest, PolicyError, Purpose, parse_ttl};
use crate::store::{Idempotency, KeyRecord, NewDelivery, StoreError};

/// What a bot asks for.
#[derive(Debug, Clone)]
pub struct NewTicket {
    /// The person's principal, as `GET /v1/me` shows it to them.
    pub for_subject: String,
    pub scope: String,
    pub purpose: Purpose,
    pub ttl: Option<String>,
}

/// Why a ticket operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no such ticket")]
    NotFound,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    /// The claim's issuance was refused or failed (its own status: 403 with reasons, 503, ...).
    #[error(transparent)]
    Issue(#[from] ServiceError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the ticket service is configured with.
#[derive(Debug, Clone)]
pub struct TicketSettings {
    /// `auth.delegate_teams`.
    pub delegate_teams: BTreeSet<String>,
    /// `[tickets] lifetime`.
    pub lifetime: std::time::Duration,
    /// `server.request_timeout`: a claim's issuance ends within it.
    pub request_timeout: std::time::Duration,
    /// `server.public_url`.
    pub public_url: url::Url,
    pub webhooks: Vec<WebhookConfig>,
}

pub struct TicketService {
    keys: Arc<KeyService>,
    settings: TicketSettings,
    lifetime: chrono::Duration,
    /// How long a started claim holds its ticket: its deadline and a margin.
    hold: chrono::Duration,
}

impl TicketService {
    pub fn new(keys: Arc<KeyService>, settings: TicketSettings) -> Self {
        let lifetime = chrono::Duration::from_std(settings.lifetime).unwrap_or(chrono::Duration::minutes(15));
        let hold = chrono::Duration::from_std(settings.request_timeout).unwrap_or(chrono::Duration::minutes(5))
            + CLAIM_HOLD_MARGIN;
        Self { keys, settings, lifetime, hold }
    }

    /// How long a started claim holds its ticket.
    pub fn claim_hold(&self) -> chrono::Duration {
        self.hold
    }

    /// The link the bot posts: the page's pickup view.
    pub fn pickup_url(&self, id: &TicketId) -> String {
        format!("{}tickets/{id}", self.settings.public_url)
    }

    /// A bot's request for `for_subject`. Checked now: the bot's right to delegate, the scope's
    /// existence and the lifetime's form and maximum. Not checked until the claim: whether the
    /// person may use the scope (the bot cannot know their teams).
    pub async fn create(
        &self,
        bot: &Principal,
        request: NewTicket,
        ctx: &RequestContext,
    ) -> Result<Ticket, TicketError> {
        if !may_delegate(bot, &self.settings.delegate_teams) {
            return Err(TicketError::Forbidden(
                "only members of auth.delegate_teams may ask for keys on someone else's behalf".to_owned(),
            ));
        }
        let for_subject = request.for_subject.trim().to_owned();
        if for_subject.is_empty() || for_subject.len() > 256 || for_subject.chars().any(char::is_control) {
            return Err(TicketError::BadRequest("`for` must be 1-256 printable characters: a subject".to_owned()));
        }
        if for_subject == bot.subject {
            return Err(TicketError::BadRequest(
                "a ticket is for someone else; ask POST /v1/keys for yourself".to_owned(),
            ));
        }
        let policy = self.keys.policy();
        let scope = policy.get(&request.scope).ok_or_else(|| {
            TicketError::Issue(ServiceError::Policy(PolicyError::UnknownScope(
                request.scope.chars().take(64).collect::<String>().escape_debug().to_string(),
            )))
        })?;
        let ttl = match request.ttl.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => {
                let ttl = parse_ttl(text).map_err(TicketError::BadRequest)?;
                // The same rules as at the claim (minimum, scope maximum, Octopus's limits).
                crate::policy::resolve_expiry(
                    ExpiryRequest::Ttl(ttl),
                    scope,
                    self.keys.now(),
                    self.keys.upstream_limits(),
                )
                .map_err(|e| TicketError::Issue(ServiceError::Policy(e)))?;
                Some(text.to_owned())
            }
        };
        let now = self.keys.now();
        let ticket = Ticket {
            id: TicketId::generate(),
            for_subject,
            scope: scope.name.to_string(),
            purpose: request.purpose.as_str().to_owned(),
            ttl,
            requested_by: bot.subject.clone(),
            requested_by_name: bot.display_name.chars().take(200).collect(),
            state: TicketState::Waiting,
            key_id: None,
            created_at: crate::audit::store_precision(now),
            expires_at: crate::audit::store_precision(now + self.lifetime),
            claim_started_at: None,
            ended_at: None,
        };
        let event = NewAuditEvent::new(now, &bot.subject, Action::TicketCreated, Outcome::Success, ctx)
            .scope(&ticket.scope)
            .detail(json!({
                "ticket": ticket.id.as_str(),
                "for": ticket.for_subject,
                "purpose": ticket.purpose,
                "ttl": ticket.ttl,
                "expires_at": ticket.expires_at,
            }));
        self.keys.store().insert_ticket(&ticket, &event).await?;
        Ok(ticket)
    }

    /// A ticket as `principal` may see it.
    pub async fn get(&self, principal: &Principal, id: &TicketId) -> Result<Ticket, TicketError> {
        let ticket = self.keys.store().get_ticket(id).await?.ok_or(TicketError::NotFound)?;
        ticket_access(principal, &ticket, TicketAccess::View).map_err(TicketError::Forbidden)?;
        Ok(ticket)
    }

    pub async fn cancel(
        &self,
        principal: &Principal,
        id: &TicketId,
        ctx: &RequestContext,
    ) -> Result<Ticket, TicketError> {
        let ticket = self.keys.store().get_ticket(id).await?.ok_or(TicketError::NotFound)?;
        ticket_access(principal, &ticket, TicketAccess::Cancel).map_err(TicketError::Forbidden)?;
        let now = self.keys.now();
        self.refuse_unless_waiting(&ticket, now).await?;
        let event = NewAuditEvent::new(now, &principal.subject, Action::TicketCancelled, Outcome::Success, ctx)
            .scope(&ticket.scope)
            .detail(json!({ "ticket": id.as_str(), "for": ticket.for_subject, "requested_by": ticket.requested_by }));
        let store = self.keys.store();
        let nobody = Hold::Nobody { stale_before: now - self.hold };
        if !store.end_ticket(id, TicketEnd::Cancelled, now, nobody, &event).await? {
            return Err(TicketError::Conflict("the ticket is being claimed or is no longer waiting".to_owned()));
        }
        store.get_ticket(id).await?.ok_or(TicketError::NotFound)
    }

    /// The person claims their ticket: the normal issuance, as them, naming the bot.
    pub async fn claim(
        &self,
        person: &Principal,
        id: &TicketId,
        idempotency_key: Option<String>,
        caller_gone: Option<Arc<std::sync::atomic::AtomicBool>>,
        ctx: &RequestContext,
    ) -> Result<(Ticket, IssueOutcome), TicketError> {
        let store = self.keys.store();
        let ticket = store.get_ticket(id).await?.ok_or(TicketError::NotFound)?;
        ticket_access(person, &ticket, TicketAccess::Claim).map_err(TicketError::Forbidden)?;
        let now = self.keys.now();
        self.refuse_unless_waiting(&ticket, now).await?;
        // The token makes this claim the only one that may end or release the ticket, even if
        // it outlives its hold and another claim takes over.
        let token = Uuid::new_v4().to_string();
        if !store.begin_ticket_claim(id, &token, now, now - self.hold).await? {
            return Err(TicketError::Conflict("the ticket is being claimed or is no longer waiting".to_owned()));
        }
        let result = self.issue_for(person, &ticket, idempotency_key, caller_gone, ctx).await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                // Nothing was issued: the person may try again (after fixing their teams, or
                // once Octopus is back).
                if let Err(release) = store.release_ticket_claim(id, &token).await {
                    tracing::warn!(error = %release, "could not release a failed claim; it lapses by itself");
                }
                return Err(e);
            }
        };
        let record = match &outcome {
            IssueOutcome::Issued(issued) => issued.record.clone(),
            IssueOutcome::Replayed(record) => record.clone(),
        };
        // The key exists and its secret is on its way: a failure to mark the ticket must not
        // withhold it. The key names the ticket, so a later claim or the expiry sweep finds the
        // ticket claimed and finishes marking it.
        if let Err(e) = self.mark_claimed(&ticket, &record, Hold::Claim(&token), person, ctx).await {
            tracing::error!(ticket = %id, error = %e, "could not mark a ticket claimed; the sweep will");
        }
        let ticket = store.get_ticket(id).await.ok().flatten().unwrap_or(ticket);
        Ok((ticket, outcome))
    }

    /// Ends a ticket as claimed by `record` (audited, announced by webhook). False when `hold`
    /// did not hold.
    async fn mark_claimed(
        &self,
        ticket: &Ticket,
        record: &KeyRecord,
        hold: Hold<'_>,
        person: &Principal,
        ctx: &RequestContext,
    ) -> Result<bool, StoreError> {
        let at = self.keys.now();
        let event = NewAuditEvent::new(at, &person.subject, Action::TicketClaimed, Outcome::Success, ctx)
            .scope(&ticket.scope)
            .key(record.id)
            .detail(json!({ "ticket": ticket.id.as_str(), "requested_by": ticket.requested_by }));
        let done = self.keys.store().end_ticket(&ticket.id, TicketEnd::Claimed(record.id), at, hold, &event).await?;
        if done {
            self.announce_claim(ticket, record, at).await;
        }
        Ok(done)
    }

    /// A waiting ticket through which a key was already issued (its claim lost the answer) is
    /// marked claimed now: the key's requester claimed it.
    async fn repair(&self, ticket: &Ticket, now: DateTime<Utc>) -> Result<Option<KeyRecord>, StoreError> {
        let Some(record) = self.keys.store().ticket_key(&ticket.id).await? else { return Ok(None) };
        let claimer = crate::auth::Principal {
            subject: record.requester.clone(),
            issuer: String::new(),
            display_name: record.requester.clone(),
            teams: BTreeSet::new(),
            roles: BTreeSet::new(),
        };
        let ctx = RequestContext::default();
        self.mark_claimed(ticket, &record, Hold::Nobody { stale_before: now - self.hold }, &claimer, &ctx).await?;
        Ok(Some(record))
    }

    /// 409 for a ticket that can no longer be claimed or cancelled, saying why.
    async fn refuse_unless_waiting(&self, ticket: &Ticket, now: DateTime<Utc>) -> Result<(), TicketError> {
        match ticket.effective_state(now, self.hold) {
            TicketState::Waiting if ticket.claim_in_progress(now, self.hold) => {
                Err(TicketError::Conflict("the ticket is being claimed right now".to_owned()))
            }
            TicketState::Waiting => match self.repair(ticket, now).await? {
                Some(record) => Err(claimed_conflict(Some(record.id))),
                None => Ok(()),
            },
            TicketState::Claimed => Err(claimed_conflict(ticket.key_id)),
            TicketState::Expired => {
                Err(TicketError::Conflict(format!("the ticket expired at {}", ticket.expires_at.to_rfc3339())))
            }
            TicketState::Cancelled => Err(TicketError::Conflict("the ticket was cancelled".to_owned())),
        }
    }

    async fn issue_for(
        &self,
        person: &Principal,
        ticket: &Ticket,
        idempotency_key: Option<String>,
        caller_gone: Option<Arc<std::sync::atomic::AtomicBool>>,
        ctx: &RequestContext,
    ) -> Result<IssueOutcome, TicketError> {
        let purpose = Purpose::parse(&ticket.purpose).map_err(TicketError::BadRequest)?;
        let expiry = match ticket.ttl.as_deref() {
            Some(text) => ExpiryRequest::Ttl(parse_ttl(text).map_err(TicketError::BadRequest)?),
            None => ExpiryRequest::Default,
        };
        let idempotency = idempotency_key.map(|key| {
            let request = json!({ "ticket": ticket.id.as_str() });
            let canonical = crate::audit::canonical_json(&request);
            Idempotency { key, request_hash: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(canonical.as_bytes())) }
        });
        let request = IssueRequest {
            scope: ticket.scope.clone(),
            purpose,
            expiry,
            idempotency,
            replace_previous: false,
            caller_gone,
        };
        let ctx = RequestContext {
            on_behalf: Some(OnBehalf { ticket: ticket.id.to_string(), requested_by: ticket.requested_by.clone() }),
            ..ctx.clone()
        };
        Ok(self.keys.issue(person, request, &ctx).await?)
    }

    /// Queues `ticket.claimed` for every webhook that wants it (the bot tells the channel).
    async fn announce_claim(&self, ticket: &Ticket, record: &KeyRecord, at: DateTime<Utc>) {
        let wanted = self
            .settings
            .webhooks
            .iter()
            .filter(|h| h.events.is_empty() || h.events.iter().any(|e| e == "ticket.claimed"));
        for hook in wanted {
            let delivery = NewDelivery {
                webhook: hook.name.clone(),
                event: "ticket.claimed".to_owned(),
                key_id: record.id,
                threshold: String::new(),
                payload: crate::webhooks::ticket_payload(record, ticket, &self.pickup_url(&ticket.id), at),
                created_at: at,
            };
            if let Err(e) = self.keys.store().enqueue_delivery(&delivery).await {
                tracing::warn!(webhook = %hook.name, error = %e, "could not queue ticket.claimed");
            }
        }
    }

    /// Marks waiting tickets past their expiry as expired, one event each (or claimed, when a
    /// key was issued through one whose claim lost its answer). Returns how many expired.
    pub async fn expire_due(&self) -> Result<usize, StoreError> {
        let now = self.keys.now();
        let store = self.keys.store();
        let mut expired = 0;
        for ticket in store.tickets_due_for_expiry(now, now - self.hold, 500).await? {
            if self.repair(&ticket, now).await?.is_some() {
                continue;
            }
            let event = NewAuditEvent::new(
                now,
                "keybroker",
                Action::TicketExpired,
                Outcome::Success,
                &RequestContext::default(),
            )
            .scope(&ticket.scope)
            .detail(json!({
                "ticket": ticket.id.as_str(),
                "for": ticket.for_subject,
                "requested_by": ticket.requested_by,
                "expires_at": ticket.expires_at,
            }));
            let nobody = Hold::Nobody { stale_before: now - self.hold };
            if store.end_ticket(&ticket.id, TicketEnd::Expired, now, nobody, &event).await? {
                expired += 1;
            }
        }
        Ok(expired)
    }
}

fn claimed_conflict(key_id: Option<Uuid>) -> TicketError {
    TicketError::Conflict(format!(
        "the ticket was already claimed{}; its secret was shown once",
        key_id.map(|k| format!(" (key {k})")).unwrap_or_default()
    ))
}
