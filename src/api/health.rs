//! `/healthz` (the process is alive) and `/readyz` (the database answers, Octopus answers and
//! accepts keybroker's credential, every scope's account is usable).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
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
    /// What is wrong, written for an operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    pub checks: Vec<Check>,
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Readiness: the database, Octopus and the privileged credential, and every scope's account.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready; `checks` says why", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<Readiness>) {
    let mut checks = Vec::new();
    let db = tokio::time::timeout(CHECK_TIMEOUT, state.keys.store().ping()).await;
    checks.push(match db {
        Ok(Ok(())) => Check { name: "database".to_owned(), ok: true, detail: None },
        Ok(Err(e)) => Check { name: "database".to_owned(), ok: false, detail: Some(e.to_string()) },
        Err(_) => Check { name: "database".to_owned(), ok: false, detail: Some("no answer within 5 s".to_owned()) },
    });

    let octopus = tokio::time::timeout(CHECK_TIMEOUT, state.keys.octopus().current_user()).await;
    let octopus_ok = matches!(octopus, Ok(Ok(_)));
    checks.push(match octopus {
        Ok(Ok(user)) => Check {
            name: "octopus".to_owned(),
            ok: true,
            detail: Some(format!("signed in as {} ({})", user.username, user.id)),
        },
        Ok(Err(e)) => Check { name: "octopus".to_owned(), ok: false, detail: Some(e.to_string()) },
        Err(_) => Check { name: "octopus".to_owned(), ok: false, detail: Some("no answer within 5 s".to_owned()) },
    });

    if octopus_ok {
        let limits = state.keys.upstream_limits();
        if let Some(expires) = limits.broker_key_expires {
            let now = state.keys.now();
            checks.push(Check {
                name: "octopus_credential_expiry".to_owned(),
                ok: expires > now,
                detail: Some(format!("keybroker's Octopus API key expires at {}", expires.to_rfc3339())),
            });
        }
        let policy = state.keys.policy();
        for scope in policy.scopes() {
            let result = tokio::time::timeout(CHECK_TIMEOUT, state.keys.scope_account(scope, true)).await;
            checks.push(match result {
                Ok(Ok(user)) => Check { name: format!("scope:{}", scope.name), ok: true, detail: Some(user.id) },
                Ok(Err(e)) => Check { name: format!("scope:{}", scope.name), ok: false, detail: Some(e.to_string()) },
                Err(_) => Check {
                    name: format!("scope:{}", scope.name),
                    ok: false,
                    detail: Some("no answer within 5 s".to_owned()),
                },
            });
        }
    }

    let ready = checks.iter().all(|c| c.ok);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let report = Readiness { status: if ready { "ready" } else { "not_ready" }.to_owned(), checks };
    (status, axum::Json(report))
}
