//! `/healthz` (the process is alive) and `/readyz` (the database answers, Octopus answers and
//! accepts keybroker's credential, every scope's account is usable), from the verdict the
//! readiness job keeps (see [`crate::services::readiness`]).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

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
    client: Option<axum::Extension<super::extract::ClientAddr>>,
    headers: HeaderMap,
) -> (StatusCode, axum::Json<Readiness>) {
    let client = client.map(|axum::Extension(c)| c);
    let verdict = state.readiness.served(state.keys.now());
    // A token is optional here: a bad one is not an error (and not audited), it only sees what
    // anyone sees. Tokens are checked within the per-address budget of failed authentications,
    // so this is no unmetered oracle for guessing them.
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let details = match (authorization, client.map(|c| super::denials::address_bucket(c.0))) {
        (Some(value), Some(addr)) if state.rate_limits.check_address(addr).is_ok() => {
            state.auth.authenticate(Some(value)).await.is_ok_and(|p| {
                crate::domain::policy::authz::check(&p, crate::domain::policy::authz::Check::Administer).is_allowed()
            })
        }
        _ => false,
    };
    let mut checks: Vec<Check> = verdict
        .checks
        .iter()
        .map(|c| Check { name: c.name.clone(), ok: c.ok, detail: if details { c.detail.clone() } else { None } })
        .collect();
    // Not critical: a replica that has not taken a reload yet still serves (it converges within
    // jobs.policy_sync_interval).
    let recent = chrono::Duration::from_std(state.policy_sync_interval * 3).unwrap_or(chrono::Duration::seconds(30));
    let (agree, detail) = state.policy_sync.check(state.keys.now(), recent);
    checks.push(Check { name: "policy".to_owned(), ok: agree, detail: details.then_some(detail) });
    let ready = verdict.ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(Readiness { status: if ready { "ready" } else { "not_ready" }.to_owned(), checks }))
}
