//! The ticket service: create, read, cancel, claim and expire pickup tickets (the model and
//! its states are in [`crate::domain::tickets`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::json;

use crate::config::WebhookConfig;
use crate::domain::audit::{Action, NewAuditEvent, OnBehalf, Outcome, RequestContext};
use crate::domain::keys::{Idempotency, KeyRecord};
use crate::domain::policy::authz::{Check, Decision, TicketAccess, check};
use crate::domain::policy::{ExpiryRequest, PolicyError, Purpose, parse_ttl};
use crate::domain::principal::Principal;
use crate::domain::tickets::{CLAIM_HOLD_MARGIN, Hold, Ticket, TicketEnd, TicketId, TicketState};
use crate::services::issuance::{IssueOutcome, IssueRequest, KeyService, ServiceError};
use crate::store::{NewDelivery, StoreError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

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
    /// Refusals are audited as `authz.denied`, aggregated like every role refusal.
    denials: Arc<crate::services::denials::DenialAudit>,
    settings: TicketSettings,
    lifetime: chrono::Duration,
    /// How long a started claim holds its ticket: its deadline and a margin.
    hold: chrono::Duration,
}

impl TicketService {
    pub fn new(
        keys: Arc<KeyService>,
        settings: TicketSettings,
        denials: Arc<crate::services::denials::DenialAudit>,
    ) -> Self {
        let lifetime = chrono::Duration::from_std(settings.lifetime).unwrap_or(chrono::Duration::minutes(15));
        let hold = chrono::Duration::from_std(settings.request_timeout).unwrap_or(chrono::Duration::minutes(5))
            + CLAIM_HOLD_MARGIN;
        Self { keys, denials, settings, lifetime, hold }
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
        self.allowed(bot, Check::Delegate { delegate_teams: &self.settings.delegate_teams }, ctx).await?;
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
                let ttl = parse_ttl(text).map_err(|e| TicketError::BadRequest(e.to_string()))?;
                // The same rules as at the claim (minimum, scope maximum, Octopus's limits).
                crate::domain::policy::resolve_expiry(
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
            scope: scope.name.clone(),
            purpose: request.purpose.clone(),
            ttl,
            requested_by: bot.subject.clone(),
            requested_by_name: bot.display_name.chars().take(200).collect(),
            state: TicketState::Waiting,
            key_id: None,
            created_at: crate::domain::audit::store_precision(now),
            expires_at: crate::domain::audit::store_precision(now + self.lifetime),
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
    pub async fn get(&self, principal: &Principal, id: &TicketId, ctx: &RequestContext) -> Result<Ticket, TicketError> {
        let ticket = self.keys.store().get_ticket(id).await?.ok_or(TicketError::NotFound)?;
        self.allowed(principal, Check::Ticket(&ticket, TicketAccess::View), ctx).await?;
        Ok(ticket)
    }

    pub async fn cancel(
        &self,
        principal: &Principal,
        id: &TicketId,
        ctx: &RequestContext,
    ) -> Result<Ticket, TicketError> {
        let ticket = self.keys.store().get_ticket(id).await?.ok_or(TicketError::NotFound)?;
        self.allowed(principal, Check::Ticket(&ticket, TicketAccess::Cancel), ctx).await?;
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
        self.allowed(person, Check::Ticket(&ticket, TicketAccess::Claim), ctx).await?;
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
        let claimer = crate::domain::principal::Principal {
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
        let purpose = ticket.purpose.clone();
        let expiry = match ticket.ttl.as_deref() {
            Some(text) => ExpiryRequest::Ttl(parse_ttl(text).map_err(|e| TicketError::BadRequest(e.to_string()))?),
            None => ExpiryRequest::Default,
        };
        let idempotency =
            idempotency_key.map(|key| Idempotency::for_request(key, &json!({ "ticket": ticket.id.as_str() })));
        let request = IssueRequest {
            scope: ticket.scope.to_string(),
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

    /// The ticket service's answer to an authorization [`check`]; a refusal (someone else's
    /// ticket, no delegate team) is audited.
    async fn allowed(&self, principal: &Principal, what: Check<'_>, ctx: &RequestContext) -> Result<(), TicketError> {
        match check(principal, what) {
            Decision::Allow => Ok(()),
            Decision::Deny(message) => {
                let denial = crate::services::denials::Denial::role(principal, &message, ctx.clone());
                self.denials.record(denial).await;
                Err(TicketError::Forbidden(message))
            }
            Decision::Hide => Err(TicketError::NotFound),
        }
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
                payload: crate::services::webhooks::ticket_payload(record, ticket, &self.pickup_url(&ticket.id), at),
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
