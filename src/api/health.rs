//! `/healthz` (the process is alive) and `/readyz` (the database answers, Octopus answers and
//! accepts keybroker's credential, every scope's account is usable), from the verdict the
//! readiness job keeps (see [`crate::services::readiness`]).

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::MaybeAdmin;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok".to_owned() })
}

/// One dependency's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// What is wrong, written for an operator. Shown only to an admin's bearer token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    pub checks: Vec<Check>,
}

/// Readiness: the database, Octopus and the privileged credential, and every scope's account.
///
/// Answers from the verdict of the last readiness job run (every `jobs.readiness_interval`): a
/// probe makes no Octopus call and no database write. Anonymously it shows each check's name and
/// `ok`; an admin's bearer token also sees the details.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready; `checks` says which dependency", body = Readiness),
    )
)]
pub async fn readyz(
    State(state): State<AppState>,
    MaybeAdmin(details): MaybeAdmin,
) -> (StatusCode, axum::Json<Readiness>) {
    let verdict = state.readiness.served_with_policy(state.keys.now(), &state.policy_sync, state.policy_sync_interval);
    let ready = verdict.ready();
    let checks = verdict
        .checks
        .into_iter()
        .map(|c| Check { name: c.name, ok: c.ok, detail: if details { c.detail } else { None } })
        .collect();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(Readiness { status: if ready { "ready" } else { "not_ready" }.to_owned(), checks }))
}
