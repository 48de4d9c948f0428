//! `/v1/scopes` and `/v1/me`: what the caller may ask for, and who keybroker thinks they are.

use std::collections::BTreeSet;

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::Caller;
use crate::domain::principal::Role;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_scopes)).routes(routes!(me))
}

/// A scope the caller may request keys for, with its limits.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScopeView {
    pub name: String,
    pub description: String,
    /// The Octopus service account keys are issued for (its username).
    pub octopus_user: String,
    pub teams: BTreeSet<String>,
    /// Default lifetime, in seconds, when the request gives no expiry.
    pub default_ttl_seconds: i64,
    /// Longest lifetime allowed, in seconds.
    pub max_ttl_seconds: i64,
    pub max_active_keys_per_requester: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScopeList {
    pub items: Vec<ScopeView>,
}

/// List the scopes the caller may request.
#[utoipa::path(
    get,
    path = "/v1/scopes",
    tag = "scopes",
    responses(
        (status = 200, description = "Scopes the caller may request (all of them for admins)", body = ScopeList),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list_scopes(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> Result<axum::Json<ScopeList>, ApiError> {
    let policy = state.keys.policy();
    let items = policy
        .requestable_by(&principal)
        .map(|s| ScopeView {
            name: s.name.to_string(),
            description: s.description.clone(),
            octopus_user: s.octopus_user.clone(),
            teams: s.teams.clone(),
            default_ttl_seconds: s.default_ttl.num_seconds(),
            max_ttl_seconds: s.max_ttl.num_seconds(),
            max_active_keys_per_requester: s.max_active_keys_per_requester,
        })
        .collect();
    Ok(axum::Json(ScopeList { items }))
}

/// Who keybroker thinks the caller is.
#[derive(Debug, Serialize, ToSchema)]
pub struct MeView {
    /// Recorded as `requester` on keys: the token's `sub` for the `default` issuer,
    /// `<issuer>:<sub>` for every other.
    pub subject: String,
    /// The name of the issuer entry that verified the token.
    pub issuer: String,
    pub name: String,
    pub teams: BTreeSet<String>,
    pub roles: BTreeSet<Role>,
}

/// Show the caller's identity, teams and roles.
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "scopes",
    responses(
        (status = 200, description = "The caller", body = MeView),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn me(Caller(principal): Caller) -> axum::Json<MeView> {
    axum::Json(MeView {
        subject: principal.subject,
        issuer: principal.issuer,
        name: principal.display_name,
        teams: principal.teams,
        roles: principal.roles,
    })
}
