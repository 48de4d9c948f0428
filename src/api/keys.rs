//! `/v1/keys`: issue, list, read, revoke and identify keys.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::{ApiJson, ApiQuery, AuditorCaller, Caller, Ctx, filter_value};
use crate::domain::keys::{Idempotency, KeyRecord, KeyState};
use crate::domain::policy::{ExpiryClamp, ExpiryRequest, Purpose, Reason, parse_ttl};
use crate::domain::rfc3339;
use crate::services::issuance::{IssueOutcome, IssueRequest};
use crate::services::queries::{KeyFilter, PageRequest};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(issue_key, list_keys))
        .routes(routes!(get_key, revoke_key))
        .routes(routes!(identify_key))
}

/// A request for a key. Give `expires_at` or `ttl`, or neither for the scope's default.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"scope": "payments-deploy", "purpose": "deploy pipeline for payments-api", "ttl": "7d"}))]
pub struct IssueKeyBody {
    /// The scope's name, as listed by `GET /v1/scopes`.
    #[schema(min_length = 1, max_length = 64)]
    pub scope: String,
    /// Why the key is needed: 1-200 printable characters, shown in Octopus next to the key.
    #[schema(min_length = 1, max_length = 200)]
    pub purpose: String,
    /// When the key expires (RFC 3339). Not in the past, not beyond the scope's maximum.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<String>,
    /// How long the key lives, such as `"12h"` or `"7d"`; an alternative to `expires_at`.
    pub ttl: Option<String>,
    /// Run every check (teams, purpose, expiry and its clamping, the active-key limit) and
    /// answer 200 with a `DryRunView`; nothing is created in Octopus or in keybroker.
    #[serde(default)]
    pub dry_run: bool,
    /// Once the new key is active, revoke the caller's other active keys in this scope with the
    /// same purpose (audited as superseded): a refresh loop holds one key, not one per refresh.
    #[serde(default)]
    pub replace_previous: bool,
}

/// The answer of a dry run.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"allowed": false, "expires_at": "2026-12-08T10:00:00Z",
    "reasons": [{"rule": "teams", "detail": "your teams [web] share none of payments-deploy's teams [payments]"}]}))]
pub struct DryRunView {
    /// Whether the same request without `dry_run` would be issued (Octopus permitting).
    pub allowed: bool,
    /// When the key would expire, once the expiry passed its checks.
    pub expires_at: Option<DateTime<Utc>>,
    /// Set when the scope's default lifetime would be shortened to fit Octopus's limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_clamped_by: Option<ExpiryClamp>,
    /// Every rule the request breaks; empty when allowed.
    pub reasons: Vec<Reason>,
}

/// A 200 answer of `POST /v1/keys`: a replay of an earlier request, or a dry run. (For the
/// OpenAPI document; handlers send the two views themselves.)
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code, clippy::large_enum_variant)]
pub enum IssueOk {
    Replay(KeyView),
    DryRun(DryRunView),
}

/// keybroker's record of an issued key. `api_key` is present only in the issuing response.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "id": "5b0e2d8c-3f4a-4c1e-9d57-8a0e6b1c2d3f",
    "scope": "payments-deploy",
    "requester": "alice@example.com",
    "purpose": "deploy pipeline for payments-api",
    "state": "active",
    "octopus_user_id": "Users-42",
    "octopus_key_id": "apikeys-I6D74k9rh7eyoqXDlqJCvlsVgU",
    "key_hint": "API-ABCD",
    "created_at": "2026-11-23T10:00:00Z",
    "expires_at": "2026-11-30T10:00:00Z",
    "revoked_at": null,
    "api_key": "API-ABCDEFGHIJKLMNOPQRSTUVWXYZ"
}))]
pub struct KeyView {
    pub id: Uuid,
    pub scope: String,
    pub requester: String,
    pub purpose: String,
    pub state: KeyState,
    pub octopus_user_id: String,
    pub octopus_key_id: Option<String>,
    /// The first 8 characters of the key, as Octopus shows them.
    pub key_hint: Option<String>,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub expires_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339::serialize_option")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// The bot whose pickup ticket the requester claimed (chat-ops), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// The secret: returned once, in the issuing response, and stored nowhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Set when the scope's default lifetime was shortened to fit Octopus's limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_clamped_by: Option<ExpiryClamp>,
    /// With `replace_previous`: the records this key supersedes, revoked right after this answer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<Uuid>,
}

impl KeyView {
    pub fn of(record: KeyRecord, now: DateTime<Utc>) -> Self {
        Self {
            state: record.effective_state(now),
            id: record.id,
            scope: record.scope.to_string(),
            requester: record.requester,
            purpose: record.purpose.to_string(),
            octopus_user_id: record.octopus_user_id,
            octopus_key_id: record.octopus_key_id,
            key_hint: record.key_hint,
            created_at: record.created_at,
            expires_at: record.expires_at,
            revoked_at: record.revoked_at,
            requested_by: record.requested_by,
            api_key: None,
            expiry_clamped_by: None,
            replaced: Vec::new(),
        }
    }
}

/// Issue a key.
///
/// Checks the policy, creates the key in Octopus with an explicit expiry and returns the secret
/// in `api_key`, once. keybroker keeps only a keyed hash of it.
#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "keys",
    request_body = IssueKeyBody,
    params(
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[ -~]*[!-~][ -~]*$",
         description = "1-255 printable ASCII characters. A retry with the same key and body within 24 h returns the first request's record (200, without the secret) and never creates a second Octopus key; the same key with another body is 422."),
    ),
    responses(
        (status = 201, description = "Issued; the secret is in `api_key`, shown only this once", body = KeyView,
         headers(("Location" = String, description = "The record's URL"), ("Cache-Control" = String, description = "no-store"))),
        (status = 200, description = "A retry with the same Idempotency-Key and body: the first request's record, without the secret (with `Idempotent-Replayed: true`); or, with `dry_run`, the checks' verdict (`DryRunView`)", body = IssueOk,
         headers(("Idempotent-Replayed" = String, description = "true, on a replay"))),
        (status = 409, description = "The first request with this Idempotency-Key is still in progress, or failed", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The caller's teams may not use this scope; `reasons` says why", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown scope (never 404), expiry or limit violates the policy (`reasons` says which), or Octopus refused", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Octopus failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database, audit trail or Octopus credential unavailable, or the issuance did not finish within its deadline (retry with the same Idempotency-Key)", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Octopus timed out", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn issue_key(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Ctx(ctx): Ctx,
    headers: HeaderMap,
    ApiJson(body): ApiJson<IssueKeyBody>,
) -> Result<Response, ApiError> {
    if body.dry_run {
        return dry_run(&state, &principal, &ctx, body).await;
    }
    let scope = body.scope.clone();
    let mut request = parse_issue_request(&headers, body).inspect_err(|_| state.keys.refuse_unreadable(&scope))?;
    // Dropped with this handler (the caller hung up, or the request timed out) before the
    // issuance answered: the issuance then deletes a key Octopus makes instead of activating it.
    let presence = CallerPresence::default();
    request.caller_gone = Some(presence.gone.clone());

    // The protocol runs in its own task: a caller that hangs up or times out must not cut it
    // off between the Octopus call and the record that owns its result.
    let keys = state.keys.clone();
    let gone = presence.gone.clone();
    let task = tokio::spawn(async move { unanswered(&gone, keys.issue(&principal, request, &ctx).await) });
    let outcome = within_deadline(&state, task, presence).await??;

    Ok(match outcome {
        IssueOutcome::Issued(issued) => issued_response(issued, state.keys.now()),
        IssueOutcome::Replayed(record) => replayed_response(record, state.keys.now()),
    })
}

/// 201 with the secret, shown this once (never cached).
pub(super) fn issued_response(issued: crate::services::issuance::Issued, now: DateTime<Utc>) -> Response {
    let mut view = KeyView::of(issued.record, now);
    view.api_key = Some(issued.secret.expose_secret().to_owned());
    view.expiry_clamped_by = issued.clamped;
    view.replaced = issued.replaced;
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/keys/{}", view.id)) {
        headers.insert(header::LOCATION, location);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    (StatusCode::CREATED, headers, axum::Json(view)).into_response()
}

/// 200 with the first request's record, without the secret.
pub(super) fn replayed_response(record: KeyRecord, now: DateTime<Utc>) -> Response {
    let view = KeyView::of(record, now);
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/keys/{}", view.id)) {
        headers.insert(header::LOCATION, location);
    }
    headers.insert(HeaderName::from_static("idempotent-replayed"), HeaderValue::from_static("true"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    (StatusCode::OK, headers, axum::Json(view)).into_response()
}

/// Waits for an issuance task until a second short of `server.request_timeout`. Past that, the
/// caller gets 503 (never the timeout's bare 408) and is marked gone, so that a key Octopus makes
/// from then on is deleted at once; the task itself runs to its end.
pub(super) async fn within_deadline<T, E>(
    state: &AppState,
    task: tokio::task::JoinHandle<Result<T, E>>,
    presence: CallerPresence,
) -> Result<Result<T, E>, ApiError> {
    let joined = match state.keys.answer_within() {
        Some(limit) => match tokio::time::timeout(limit, task).await {
            Ok(joined) => joined,
            Err(_) => {
                drop(presence);
                return Err(ApiError::Unavailable(
                    "the issuance did not finish within its deadline (server.request_timeout); a key Octopus makes \
                     for it from now on is deleted at once. Retry with the same Idempotency-Key"
                        .to_owned(),
                ));
            }
        },
        None => task.await,
    };
    let outcome = joined.map_err(|e| ApiError::Internal(format!("issuance task failed: {e}")))?;
    presence.answered();
    Ok(outcome)
}

/// An issuance's error that no caller will see (it hung up, or the deadline answered first) is
/// logged here, the one place it surfaces; an answered one is logged with its answer.
pub(super) fn unanswered<T, E: std::fmt::Display>(
    gone: &std::sync::atomic::AtomicBool,
    outcome: Result<T, E>,
) -> Result<T, E> {
    if let Err(e) = &outcome {
        if gone.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::error!(error = %e, "an issuance failed after its caller was answered or gone");
        }
    }
    outcome
}

/// Marks the caller gone when dropped before [`CallerPresence::answered`].
#[derive(Default)]
pub(super) struct CallerPresence {
    pub(super) gone: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: bool,
}

impl CallerPresence {
    pub(super) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for CallerPresence {
    fn drop(&mut self) {
        if !self.answered {
            self.gone.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// `dry_run: true`: the verdict of every check, nothing created.
async fn dry_run(
    state: &AppState,
    principal: &crate::domain::principal::Principal,
    ctx: &crate::domain::audit::RequestContext,
    body: IssueKeyBody,
) -> Result<Response, ApiError> {
    let expiry = parse_expiry(&body)?;
    let purpose = Purpose::parse(&body.purpose);
    let verdict = state.keys.dry_run(principal, &body.scope, purpose, expiry, ctx).await?;
    let view = DryRunView {
        allowed: verdict.allowed,
        expires_at: verdict.expires_at,
        expiry_clamped_by: verdict.clamped,
        reasons: verdict.reasons,
    };
    Ok((StatusCode::OK, [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))], axum::Json(view))
        .into_response())
}

/// Validates an issuance request at the edge.
fn parse_issue_request(headers: &HeaderMap, body: IssueKeyBody) -> Result<IssueRequest, ApiError> {
    let idempotency = idempotency_of(headers, &body)?;
    let purpose = Purpose::parse(&body.purpose).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let expiry = parse_expiry(&body)?;
    Ok(IssueRequest {
        scope: body.scope,
        purpose,
        expiry,
        idempotency,
        replace_previous: body.replace_previous,
        caller_gone: None,
    })
}

fn parse_expiry(body: &IssueKeyBody) -> Result<ExpiryRequest, ApiError> {
    Ok(match (body.expires_at.as_deref(), body.ttl.as_deref()) {
        (Some(_), Some(_)) => return Err(ApiError::BadRequest("give expires_at or ttl, not both".to_owned())),
        (Some(at), None) => ExpiryRequest::At(
            DateTime::parse_from_rfc3339(at.trim())
                .map_err(|_| {
                    ApiError::BadRequest(format!("expires_at `{}` is not an RFC 3339 time", at.escape_debug()))
                })?
                .with_timezone(&Utc),
        ),
        (None, Some(ttl)) => ExpiryRequest::Ttl(parse_ttl(ttl).map_err(|e| ApiError::BadRequest(e.to_string()))?),
        (None, None) => ExpiryRequest::Default,
    })
}

/// The `Idempotency-Key` header, if any, with a hash of the request it came with: 1-255
/// printable ASCII characters.
fn idempotency_of(headers: &HeaderMap, body: &IssueKeyBody) -> Result<Option<Idempotency>, ApiError> {
    let Some(key) = idempotency_key(headers)? else { return Ok(None) };
    let mut request = serde_json::json!({
        "scope": body.scope,
        "purpose": body.purpose,
        "expires_at": body.expires_at,
        "ttl": body.ttl,
    });
    // Only when set, so that the hashes of requests made before the field existed still match.
    if body.replace_previous {
        request["replace_previous"] = serde_json::json!(true);
    }
    Ok(Some(Idempotency::for_request(key, &request)))
}

/// The `Idempotency-Key` header's value, if any: one header of 1-255 printable ASCII characters.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::BadRequest("send one Idempotency-Key header, not several".to_owned()));
    }
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .ok_or_else(|| ApiError::BadRequest("Idempotency-Key must be 1-255 printable ASCII characters".to_owned()))?;
    Ok(Some(key.to_owned()))
}

/// Filters and paging for `GET /v1/keys`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListKeysQuery {
    /// Only this scope.
    pub scope: Option<String>,
    /// Only this state.
    pub state: Option<KeyState>,
    /// Only this requester (auditors and admins; others only see their own keys).
    pub requester: Option<String>,
    /// Only keys whose requester was in this team when the key was issued.
    pub team: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// A page of key records, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyPage {
    pub items: Vec<KeyView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

pub(super) fn encode_cursor(seq: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("seq:{seq}"))
}

pub(super) fn decode_cursor(cursor: &str) -> Result<i64, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix("seq:").and_then(|n| n.parse::<i64>().ok()))
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::BadRequest("cursor is not one keybroker handed out".to_owned()))
}

pub(super) fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(50),
        Some(n @ 1..=200) => Ok(n),
        Some(_) => Err(ApiError::BadRequest("limit must be between 1 and 200".to_owned())),
    }
}

/// List key records.
///
/// Requesters see their own keys; auditors and admins see everyone's.
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    params(ListKeysQuery),
    responses(
        (status = 200, description = "A page of key records", body = KeyPage),
        (status = 400, description = "Bad filter or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Filtering by another requester needs the auditor or admin role", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list_keys(
    State(state): State<AppState>,
    Caller(principal): Caller,
    ApiQuery(query): ApiQuery<ListKeysQuery>,
) -> Result<axum::Json<KeyPage>, ApiError> {
    let query = ListKeysQuery {
        requester: filter_value("requester", query.requester)?,
        scope: filter_value("scope", query.scope)?,
        team: filter_value("team", query.team)?,
        ..query
    };
    let limit = page_limit(query.limit)?;
    let before_seq = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let filter =
        KeyFilter { requester: query.requester, scope: query.scope, state: query.state, now: None, team: query.team };
    let records =
        crate::services::queries::key_page(&state.keys, &principal, filter, PageRequest { before_seq, limit }).await?;
    let now = state.keys.now();
    let next_cursor = (records.len() == limit as usize).then(|| records.last().map(|r| encode_cursor(r.seq))).flatten();
    Ok(axum::Json(KeyPage { items: records.into_iter().map(|r| KeyView::of(r, now)).collect(), next_cursor }))
}

fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::BadRequest(format!("`{}` is not a key record id (a UUID)", text.escape_debug())))
}

/// Read one key record.
///
/// Its owner, auditors and admins may read it.
#[utoipa::path(
    get,
    path = "/v1/keys/{id}",
    tag = "keys",
    params(("id" = Uuid, Path, description = "The key record's id")),
    responses(
        (status = 200, description = "The record", body = KeyView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such record visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_key(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<KeyView>, ApiError> {
    let id = parse_id(&id)?;
    let record = crate::services::queries::key(&state.keys, &principal, id).await?;
    Ok(axum::Json(KeyView::of(record, state.keys.now())))
}

/// Revoke a key.
///
/// Deletes the key in Octopus and marks the record revoked. Its owner and admins may; revoking
/// an already revoked key answers 200 with the record.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "keys",
    params(("id" = Uuid, Path, description = "The key record's id")),
    responses(
        (status = 200, description = "Revoked (now or before)", body = KeyView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Auditors may read but not revoke others' keys", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such record visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The key is still being issued, or was never issued", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Octopus failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database or Octopus credential unavailable", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Octopus timed out", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn revoke_key(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<axum::Json<KeyView>, ApiError> {
    let id = parse_id(&id)?;
    let keys = state.keys.clone();
    let record = tokio::spawn(async move { keys.revoke(&principal, id, &ctx).await })
        .await
        .map_err(|e| ApiError::Internal(format!("revocation task failed: {e}")))??;
    Ok(axum::Json(KeyView::of(record, state.keys.now())))
}

/// A leaked secret to identify.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentifyBody {
    /// The full secret, as found (e.g. `API-...`).
    #[schema(min_length = 1, max_length = 256)]
    pub api_key: String,
}

/// Identify a leaked key.
///
/// Auditors and admins: given a secret found somewhere it should not be, return the record it
/// belongs to (matched by keyed hash; keybroker never stores secrets).
#[utoipa::path(
    post,
    path = "/v1/keys/identify",
    tag = "keys",
    request_body = IdentifyBody,
    responses(
        (status = 200, description = "The record the secret belongs to", body = KeyView),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the auditor or admin role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No key issued by keybroker has this secret", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn identify_key(
    State(state): State<AppState>,
    AuditorCaller(principal): AuditorCaller,
    Ctx(ctx): Ctx,
    ApiJson(body): ApiJson<IdentifyBody>,
) -> Result<axum::Json<KeyView>, ApiError> {
    let secret = body.api_key.trim();
    if secret.is_empty() || secret.len() > 256 {
        return Err(ApiError::BadRequest("api_key must hold the secret to identify".to_owned()));
    }
    let found = state.keys.identify(&principal, secret, &ctx).await?;
    match found {
        Some(record) => Ok(axum::Json(KeyView::of(record, state.keys.now()))),
        None => Err(ApiError::NotFound("no key issued by keybroker has this secret".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_forgeries_are_refused() {
        assert_eq!(decode_cursor(&encode_cursor(42)).unwrap(), 42);
        assert!(decode_cursor("nope").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("seq:-1")).is_err());
    }
}
