//! `/v1/audit`: the audit trail, for auditors and admins.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::{ApiQuery, AuditorCaller, filter_value};
use super::keys::{decode_cursor, encode_cursor, page_limit};
use crate::domain::audit::{AuditRecord, ChainBreak};
use crate::services::queries::{AuditFilter, PageRequest};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_events)).routes(routes!(verify))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only events by this actor (a token subject, or `anonymous`).
    pub actor: Option<String>,
    /// Only this action, e.g. `key.issued`.
    pub action: Option<String>,
    pub scope: Option<String>,
    pub key_id: Option<Uuid>,
    /// Events at or after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Events before this time (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditRecord>,
    pub next_cursor: Option<String>,
}

/// Query audit events, newest first.
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of events", body = AuditPage),
        (status = 400, description = "Bad filter or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the auditor or admin role", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list_events(
    State(state): State<AppState>,
    _auditor: AuditorCaller,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<axum::Json<AuditPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    let before_seq = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let filter = AuditFilter {
        actor: filter_value("actor", q.actor)?,
        action: filter_value("action", q.action)?,
        scope: filter_value("scope", q.scope)?,
        key_id: q.key_id,
        from: q.from,
        to: q.to,
    };
    let items = crate::services::queries::audit_page(&state.keys, &filter, PageRequest { before_seq, limit }).await?;
    let next_cursor = (items.len() == limit as usize).then(|| items.last().map(|e| encode_cursor(e.seq))).flatten();
    Ok(axum::Json(AuditPage { items, next_cursor }))
}

/// The result of walking the hash chain.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyReport {
    /// True when every event checked links to the one before it and matches its hash, and the
    /// events this process verified or published before are still there, unchanged.
    pub ok: bool,
    /// How many events this call checked (new ones since the last verification).
    pub events_checked: u64,
    /// The hash of the last event checked (the chain's head when `ok` and `complete`).
    pub head_hash: String,
    /// The first broken link, when there is one.
    pub first_break: Option<ChainBreak>,
    /// This call checked the events after this one (0: from the first); earlier calls checked
    /// those before.
    pub from_seq: i64,
    /// The last event checked.
    pub last_seq: i64,
    /// False when the call stopped at its bound (100,000 events); call again to go on.
    pub complete: bool,
    /// Whether new events are keyed with `audit.chain_key_file` (HMAC-SHA256). Without it the
    /// chain is plain SHA-256, which someone who can write the database can recompute.
    pub keyed: bool,
    /// The last head this process published (log line, `keybroker_audit_head_seq`,
    /// `audit.checkpoint`), which the trail must still hold.
    pub published_seq: Option<i64>,
}

/// Events one verification call checks at most.
const VERIFY_BOUND: u64 = 100_000;

/// Verify the audit trail's hash chain.
#[utoipa::path(
    get,
    path = "/v1/audit/verify",
    tag = "audit",
    responses(
        (status = 200, description = "The verification report (look at `ok`)", body = VerifyReport),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the auditor or admin role", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn verify(
    State(state): State<AppState>,
    _auditor: AuditorCaller,
) -> Result<axum::Json<VerifyReport>, ApiError> {
    let v = crate::services::queries::verify_trail(&state.keys, &state.audit, VERIFY_BOUND).await?;
    Ok(axum::Json(VerifyReport {
        ok: v.first_break.is_none(),
        events_checked: v.events_checked,
        head_hash: v.head_hash,
        first_break: v.first_break,
        from_seq: v.from_seq,
        last_seq: v.last_seq,
        complete: v.complete,
        keyed: v.keyed,
        published_seq: v.published.map(|h| h.seq),
    }))
}
