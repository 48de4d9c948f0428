//! `/v1/tickets`: pickup tickets for chat-ops (see [`crate::services::tickets`]).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::{ApiJson, Caller, Ctx};
use super::keys::{CallerPresence, idempotency_key, issued_response, replayed_response, within_deadline};
use crate::domain::policy::Purpose;
use crate::domain::tickets::{Ticket, TicketId, TicketState};
use crate::services::issuance::IssueOutcome;
use crate::services::tickets::{NewTicket, TicketError};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_ticket))
        .routes(routes!(get_ticket, cancel_ticket))
        .routes(routes!(claim_ticket))
}

/// A bot's request for a key on a person's behalf.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"for": "alice@example.com", "scope": "payments-deploy", "purpose": "hotfix deploy, asked in #payments", "ttl": "1d"}))]
pub struct CreateTicketBody {
    /// The person's subject, as `GET /v1/me` shows it to them. Only they may claim the ticket.
    #[serde(rename = "for")]
    #[schema(min_length = 1, max_length = 256)]
    pub for_subject: String,
    /// The scope's name. Whether the person may use it is checked when they claim.
    #[schema(min_length = 1, max_length = 64)]
    pub scope: String,
    /// Why the key is needed: 1-200 printable characters.
    #[schema(min_length = 1, max_length = 200)]
    pub purpose: String,
    /// The key's lifetime, such as `"1d"`; the scope's default when absent.
    pub ttl: Option<String>,
}

/// A pickup ticket. Never holds a secret.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "tkt_q3v5mz2k7x6n4b2c7d5f3h4j6k", "for": "alice@example.com", "scope": "payments-deploy",
    "purpose": "hotfix deploy, asked in #payments", "ttl": "1d", "state": "waiting", "requested_by": "chatops:deploy-bot",
    "requested_by_name": "Deploy bot", "pickup_url": "https://keybroker.example.com/tickets/tkt_q3v5mz2k7x6n4b2c7d5f3h4j6k",
    "created_at": "2026-12-01T10:00:00Z", "expires_at": "2026-12-01T10:15:00Z"}))]
pub struct TicketView {
    pub id: String,
    #[serde(rename = "for")]
    pub for_subject: String,
    pub scope: String,
    pub purpose: String,
    pub ttl: Option<String>,
    pub state: TicketState,
    /// The bot that asked.
    pub requested_by: String,
    pub requested_by_name: String,
    /// The page's pickup view (built from `server.public_url`): post it in chat. Opening it
    /// changes nothing; the person signs in and claims there.
    pub pickup_url: String,
    pub created_at: DateTime<Utc>,
    /// Until when it can be claimed.
    pub expires_at: DateTime<Utc>,
    /// When it was claimed, cancelled or expired.
    pub ended_at: Option<DateTime<Utc>>,
    /// Once claimed: the key record issued to the person.
    pub key_id: Option<Uuid>,
}

fn view(state: &AppState, ticket: Ticket) -> TicketView {
    let now = state.keys.now();
    TicketView {
        state: ticket.effective_state(now, state.tickets.claim_hold()),
        pickup_url: state.tickets.pickup_url(&ticket.id),
        id: ticket.id.to_string(),
        for_subject: ticket.for_subject,
        scope: ticket.scope.to_string(),
        purpose: ticket.purpose.to_string(),
        ttl: ticket.ttl,
        requested_by: ticket.requested_by,
        requested_by_name: ticket.requested_by_name,
        created_at: ticket.created_at,
        expires_at: ticket.expires_at,
        ended_at: ticket.ended_at,
        key_id: ticket.key_id,
    }
}

impl From<TicketError> for ApiError {
    fn from(e: TicketError) -> Self {
        match e {
            TicketError::BadRequest(m) => ApiError::BadRequest(m),
            TicketError::NotFound => ApiError::NotFound("no such ticket".to_owned()),
            TicketError::Forbidden(m) => ApiError::Forbidden(m),
            TicketError::Conflict(m) => ApiError::Conflict(m),
            TicketError::Issue(e) => e.into(),
            TicketError::Store(e) => crate::services::issuance::ServiceError::Store(e).into(),
        }
    }
}

fn parse_ticket_id(text: &str) -> Result<TicketId, ApiError> {
    TicketId::parse(text)
        .ok_or_else(|| ApiError::BadRequest("a ticket id is `tkt_` and 26 characters of a-z and 2-7".to_owned()))
}

/// Ask for a key on someone's behalf (chat-ops bots).
///
/// For members of `auth.delegate_teams`. Nothing is created in Octopus: the answer's
/// `pickup_url` is for the person, who signs in and claims the key in their own browser, so
/// the secret never reaches the bot. The ticket expires after `[tickets] lifetime`.
#[utoipa::path(
    post,
    path = "/v1/tickets",
    tag = "tickets",
    request_body = CreateTicketBody,
    responses(
        (status = 201, description = "Created, waiting for the person", body = TicketView,
         headers(("Location" = String, description = "The ticket's URL"))),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The caller is not in a delegate team", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown scope, or a lifetime the scope does not allow (`reasons` says which)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn create_ticket(
    State(state): State<AppState>,
    Caller(bot): Caller,
    Ctx(ctx): Ctx,
    ApiJson(body): ApiJson<CreateTicketBody>,
) -> Result<Response, ApiError> {
    let purpose = Purpose::parse(&body.purpose).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let request = NewTicket { for_subject: body.for_subject, scope: body.scope, purpose, ttl: body.ttl };
    let ticket = state.tickets.create(&bot, request, &ctx).await?;
    let view = view(&state, ticket);
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/tickets/{}", view.id)) {
        headers.insert(header::LOCATION, location);
    }
    Ok((StatusCode::CREATED, headers, axum::Json(view)).into_response())
}

/// Read a ticket.
///
/// For the bot that asked, the person it is for, auditors and admins. Never holds a secret.
#[utoipa::path(
    get,
    path = "/v1/tickets/{id}",
    tag = "tickets",
    params(("id" = String, Path, description = "The ticket's id")),
    responses(
        (status = 200, description = "The ticket", body = TicketView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The ticket is for someone else", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such ticket", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_ticket(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<axum::Json<TicketView>, ApiError> {
    let id = parse_ticket_id(&id)?;
    let ticket = state.tickets.get(&principal, &id, &ctx).await?;
    Ok(axum::Json(view(&state, ticket)))
}

/// Cancel a waiting ticket.
///
/// The bot that asked, the person it is for, or an admin.
#[utoipa::path(
    delete,
    path = "/v1/tickets/{id}",
    tag = "tickets",
    params(("id" = String, Path, description = "The ticket's id")),
    responses(
        (status = 200, description = "Cancelled", body = TicketView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Neither the bot, the person nor an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such ticket", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already claimed, expired or cancelled, or being claimed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_ticket(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<axum::Json<TicketView>, ApiError> {
    let id = parse_ticket_id(&id)?;
    let ticket = state.tickets.cancel(&principal, &id, &ctx).await?;
    Ok(axum::Json(view(&state, ticket)))
}

/// Claim a ticket: the key is issued to the caller, with the secret in this answer only.
///
/// Only the person the ticket is for, once. Runs the normal issuance as them (their teams, their
/// limits, the expiry rules); the record and every audit event name the bot as `requested_by`.
/// Send an `Idempotency-Key` to retry a 502/503/504 safely.
#[utoipa::path(
    post,
    path = "/v1/tickets/{id}/claim",
    tag = "tickets",
    params(
        ("id" = String, Path, description = "The ticket's id"),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[ -~]*[!-~][ -~]*$",
         description = "As on POST /v1/keys"),
    ),
    responses(
        (status = 201, description = "Claimed; the secret is in `api_key`, shown only this once", body = crate::api::keys::KeyView,
         headers(("Location" = String, description = "The key record's URL"), ("Cache-Control" = String, description = "no-store"))),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The ticket is for someone else, or the caller's teams may not use its scope (`reasons` says why)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such ticket", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already claimed, expired or cancelled, or being claimed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The issuance broke a rule (`reasons` says which)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Octopus failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database, audit trail or Octopus credential unavailable, or the issuance did not finish within its deadline (retry with the same Idempotency-Key)", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Octopus timed out", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn claim_ticket(
    State(state): State<AppState>,
    Caller(person): Caller,
    Ctx(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_ticket_id(&id)?;
    let idempotency = idempotency_key(&headers)?;
    let presence = CallerPresence::default();
    let gone = Some(presence.gone.clone());
    // As for POST /v1/keys: the issuance runs in its own task, so a caller who hangs up cannot
    // cut it off between Octopus's answer and the record that owns it.
    let tickets = state.tickets.clone();
    let flag = presence.gone.clone();
    let task = tokio::spawn(async move {
        super::keys::unanswered(&flag, tickets.claim(&person, &id, idempotency, gone, &ctx).await)
    });
    let (_, outcome) = within_deadline(&state, task, presence).await??;
    Ok(match outcome {
        IssueOutcome::Issued(issued) => issued_response(issued, state.keys.now()),
        IssueOutcome::Replayed(record) => replayed_response(record, state.keys.now()),
    })
}
