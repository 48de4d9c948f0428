//! `/v1/reports`: questions auditors ask of the keys, answered from Octopus's own records.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::{ApiQuery, AuditorCaller};
use super::keys::KeyView;
use crate::services::queries::KeyFilter;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(dormant))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DormantQuery {
    /// How long a key must have gone unused, such as `30d` (never-used keys count from their
    /// issuance).
    #[param(example = "30d")]
    pub unused_for: String,
}

/// An active key and when Octopus last saw it used.
#[derive(Debug, Serialize, ToSchema)]
pub struct DormantView {
    pub key: KeyView,
    /// Octopus's `LastUsedTimeStamp`; `null`: never used.
    pub last_used_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DormantReport {
    pub unused_for: String,
    /// Longest unused first.
    pub items: Vec<DormantView>,
    /// Active keys whose use the server did not track (servers before 2026, keys made before an
    /// upgrade): never reported or revoked as dormant.
    pub last_use_unknown: usize,
}

/// List dormant keys: active keys unused for at least `unused_for`.
///
/// Reads each scope account's keys from Octopus once (their `LastUsedTimeStamp`). Revoke them with
/// `POST /v1/keys/revoke` and `{"unused_for": ...}`.
#[utoipa::path(
    get,
    path = "/v1/reports/dormant",
    tag = "audit",
    params(DormantQuery),
    responses(
        (status = 200, description = "Dormant keys", body = DormantReport),
        (status = 400, description = "Missing or malformed unused_for", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the auditor or admin role", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Octopus failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database or Octopus unavailable", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Octopus timed out", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn dormant(
    State(state): State<AppState>,
    _auditor: AuditorCaller,
    ApiQuery(query): ApiQuery<DormantQuery>,
) -> Result<axum::Json<DormantReport>, ApiError> {
    let unused_for = crate::domain::policy::parse_ttl(&query.unused_for)
        .map_err(|e| ApiError::BadRequest(format!("unused_for: {e}")))?;
    let found = crate::services::dormant::find(&state.keys, &KeyFilter::default(), unused_for).await?;
    let now = state.keys.now();
    let items = found
        .dormant
        .into_iter()
        .map(|d| DormantView { key: KeyView::of(d.record, now), last_used_at: d.last_used })
        .collect();
    Ok(axum::Json(DormantReport {
        unused_for: query.unused_for.trim().to_owned(),
        items,
        last_use_unknown: found.unknown,
    }))
}
