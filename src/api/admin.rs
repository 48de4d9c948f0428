//! Admin operations: offboarding (revoke many keys at once), unmanaged keys found by the drift
//! scan, and policy reloads.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::{AdminCaller, ApiJson, Ctx, filter_value};
use crate::services::PassError;
use crate::services::drift::UnmanagedKey;
use crate::services::offboarding::Outcome;
use crate::services::reload::ReloadError;
use crate::services::reload::ReloadReport;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(revoke_many))
        .routes(routes!(revoke_unmanaged))
        .routes(routes!(reload))
        .routes(routes!(explain))
}

/// Which active keys to revoke; at least one filter, all given filters must match.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"requester": "alice@example.com"}))]
pub struct RevokeManyBody {
    /// Every active key of this requester (a token subject).
    #[schema(min_length = 1)]
    pub requester: Option<String>,
    /// Every active key of this scope.
    #[schema(min_length = 1)]
    pub scope: Option<String>,
    /// Every active key whose requester was in this team when it was issued.
    #[schema(min_length = 1)]
    pub team: Option<String>,
    /// Every active key Octopus says has not been used for this long (never-used keys count
    /// from their issuance), such as `"30d"`.
    #[schema(example = "30d")]
    pub unused_for: Option<String>,
}

/// One key's outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct RevokeResult {
    pub id: Uuid,
    /// `revoked`, `failed` (retried by the reconciler) or `scheduled` (still being issued; the
    /// reconciler revokes it once it is active).
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RevokeManyReport {
    /// True when every matching key was revoked now.
    pub complete: bool,
    pub revoked: usize,
    pub failed: usize,
    pub results: Vec<RevokeResult>,
}

/// Offboard: revoke every active key of a requester, a scope or a team, or every dormant one.
///
/// Each revocation is audited. A revocation that fails is reported here and retried by the
/// reconciler until it succeeds. With `unused_for`, Octopus's `LastUsedTimeStamp` decides.
#[utoipa::path(
    post,
    path = "/v1/keys/revoke",
    tag = "admin",
    request_body = RevokeManyBody,
    responses(
        (status = 200, description = "Per-key outcomes (look at `complete`)", body = RevokeManyReport),
        (status = 400, description = "No filter, or a malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Octopus failed while reading when keys were last used", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database or Octopus unavailable", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Octopus timed out while reading when keys were last used", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn revoke_many(
    State(state): State<AppState>,
    AdminCaller(principal): AdminCaller,
    Ctx(ctx): Ctx,
    ApiJson(body): ApiJson<RevokeManyBody>,
) -> Result<axum::Json<RevokeManyReport>, ApiError> {
    let clean = |name: &str, v: Option<String>| {
        filter_value(name, v).map(|v| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()))
    };
    let (requester, scope, team) =
        (clean("requester", body.requester)?, clean("scope", body.scope)?, clean("team", body.team)?);
    let unused_for = body
        .unused_for
        .as_deref()
        .map(|d| crate::domain::policy::parse_ttl(d).map_err(|e| ApiError::BadRequest(format!("unused_for: {e}"))))
        .transpose()?;
    let selection = crate::services::offboarding::Selection { requester, scope, team, unused_for };
    if selection.is_empty() {
        return Err(ApiError::BadRequest("give at least one of requester, scope, team or unused_for".to_owned()));
    }
    let keys = state.keys.clone();
    // Its own task: a caller that hangs up must not cut a revocation off half-way.
    let report =
        tokio::spawn(
            async move { crate::services::offboarding::revoke_matching(&keys, &principal, selection, &ctx).await },
        )
        .await
        .map_err(|e| ApiError::Internal(format!("offboarding task failed: {e}")))??;
    let (revoked, failed) = (report.revoked(), report.failed());
    let results = report
        .results
        .into_iter()
        .map(|(id, outcome)| match outcome {
            Outcome::Revoked => RevokeResult { id, outcome: "revoked".to_owned(), error: None },
            Outcome::Failed(error) => RevokeResult { id, outcome: "failed".to_owned(), error: Some(error) },
            Outcome::Scheduled => RevokeResult {
                id,
                outcome: "scheduled".to_owned(),
                error: Some("still being issued; the reconciler revokes it once it is active".to_owned()),
            },
        })
        .collect();
    let report = RevokeManyReport { complete: failed == 0, revoked, failed, results };
    Ok(axum::Json(report))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UnmanagedReport {
    pub revoked: Vec<UnmanagedKey>,
}

/// Delete the Octopus keys that carry a keybroker marker but have no active record.
///
/// The drift job only reports such keys (metric `keybroker_unmanaged_octopus_keys` and
/// `drift.unmanaged` audit events); this deletes them, each audited.
#[utoipa::path(
    post,
    path = "/v1/admin/drift/revoke-unmanaged",
    tag = "admin",
    responses(
        (status = 200, description = "The keys deleted", body = UnmanagedReport),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Octopus failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn revoke_unmanaged(
    State(state): State<AppState>,
    AdminCaller(principal): AdminCaller,
    Ctx(ctx): Ctx,
) -> Result<axum::Json<UnmanagedReport>, ApiError> {
    let keys = state.keys.clone();
    let revoked =
        tokio::spawn(async move { crate::services::drift::revoke_unmanaged(&keys, &principal.subject, &ctx).await })
            .await
            .map_err(|e| ApiError::Internal(format!("drift task failed: {e}")))?
            .map_err(|e| match e {
                // The database down is 503; whatever Octopus answered stays the 502 it always was.
                PassError::Store(e) => ApiError::from(e),
                other => ApiError::BadGateway(other.to_string()),
            })?;
    Ok(axum::Json(UnmanagedReport { revoked }))
}

/// Reload the policy from the configuration file.
///
/// The file is validated first: an invalid one is refused (422, audited) and the running
/// policy stays. Only `[[scopes]]` and `[lifecycle]` change on reload. SIGHUP does the same.
#[utoipa::path(
    post,
    path = "/v1/admin/reload",
    tag = "admin",
    responses(
        (status = 200, description = "Reloaded", body = ReloadReport),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "This instance was not started from a configuration file", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The new configuration is invalid; nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The reload could not be audited, so nothing changed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn reload(
    State(state): State<AppState>,
    AdminCaller(principal): AdminCaller,
    Ctx(ctx): Ctx,
) -> Result<axum::Json<ReloadReport>, ApiError> {
    let Some(reloader) = state.reloader.clone() else {
        return Err(ApiError::Conflict("this instance was not started from a configuration file".to_owned()));
    };
    let keys = state.keys.clone();
    let report = tokio::spawn(async move { reloader.reload(&keys, &principal.subject, &ctx).await })
        .await
        .map_err(|e| ApiError::Internal(format!("reload task failed: {e}")))?
        .map_err(|e| match e {
            ReloadError::Invalid(reason) => {
                ApiError::Unprocessable(format!("the configuration was not reloaded: {reason}"))
            }
            ReloadError::Audit(e) => e.into(),
        })?;
    Ok(axum::Json(report))
}

/// What to explain: the claims of a token as the named issuer would sign them.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "issuer": "github",
    "claims": {"sub": "repo:acme/payments:ref:refs/heads/main", "repository_id": "892764",
               "repository_owner_id": "4410", "ref": "refs/heads/main"},
    "scope": "payments-deploy"
}))]
pub struct ExplainBody {
    /// An issuer's `name` (`default` for the single-issuer `[auth]` form).
    pub issuer: String,
    /// The token's claims (payload), `sub` included. Nothing is verified: no token is needed.
    #[schema(value_type = Object)]
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Also check whether the principal may request keys for this scope.
    pub scope: Option<String>,
}

/// One binding of the issuer, and whether it matched.
#[derive(Debug, Serialize, ToSchema)]
pub struct BindingView {
    /// Its position among `[[bindings]]`, from 0.
    pub index: usize,
    pub teams: Vec<String>,
    pub matched: bool,
    /// For a binding that did not match: the first entry that failed (`subject` or
    /// `claims.<name>`) and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<FailedEntry>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FailedEntry {
    pub entry: String,
    pub detail: String,
}

/// The principal such a token would be.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExplainedPrincipal {
    pub subject: String,
    pub teams: Vec<String>,
    pub roles: Vec<crate::domain::principal::Role>,
}

/// Whether the principal may request keys for the scope.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScopeVerdict {
    pub scope: String,
    pub allowed: bool,
    pub reasons: Vec<crate::domain::policy::Reason>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Explanation {
    pub issuer: String,
    /// `null` when a token with these claims would be refused (`refused` says why).
    pub principal: Option<ExplainedPrincipal>,
    pub refused: Option<String>,
    pub bindings: Vec<BindingView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<ScopeVerdict>,
}

/// Explain how a token would be read: which bindings match and what teams and roles follow.
///
/// For operators writing `[[bindings]]`: give an issuer's name and a token's claims (nothing is
/// verified, no token is needed), and see every binding of that issuer, the first entry of each
/// that failed, and, with `scope`, whether the result may use it.
#[utoipa::path(
    post,
    path = "/v1/admin/explain",
    tag = "admin",
    request_body = ExplainBody,
    responses(
        (status = 200, description = "How such a token would be read", body = Explanation),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No issuer has that name", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn explain(
    State(state): State<AppState>,
    _admin: AdminCaller,
    ApiJson(body): ApiJson<ExplainBody>,
) -> Result<axum::Json<Explanation>, ApiError> {
    let explained =
        crate::services::queries::explain(&state.auth, &state.keys, &body.issuer, &body.claims, body.scope.as_deref())
            .map_err(|crate::services::queries::UnknownIssuer(known)| {
                ApiError::Unprocessable(format!(
                    "no issuer is named {:?}; known: {}",
                    body.issuer.chars().take(64).collect::<String>(),
                    known.join(", ")
                ))
            })?;
    let scope = explained.scope.map(|verdict| match verdict {
        Ok(scope) => ScopeVerdict { scope, allowed: true, reasons: Vec::new() },
        Err(e) => ScopeVerdict {
            scope: body.scope.as_deref().unwrap_or_default().chars().take(64).collect(),
            allowed: false,
            reasons: vec![e.reason()],
        },
    });
    let explained = explained.token;
    Ok(axum::Json(Explanation {
        issuer: body.issuer,
        principal: explained.principal.map(|p| ExplainedPrincipal {
            subject: p.subject,
            teams: p.teams.into_iter().collect(),
            roles: p.roles.into_iter().collect(),
        }),
        refused: explained.refused,
        bindings: explained
            .bindings
            .into_iter()
            .map(|b| BindingView {
                index: b.index,
                teams: b.teams.into_iter().collect(),
                matched: b.mismatch.is_none(),
                failed: b.mismatch.map(|m| FailedEntry { entry: m.entry, detail: m.detail }),
            })
            .collect(),
        scope,
    }))
}
