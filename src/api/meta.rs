//! `/metrics` and `/openapi.json`: the service describing itself.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics)).routes(routes!(openapi_document))
}

/// Prometheus metrics.
///
/// Requests and latency by route and status, issuance outcomes by scope, Octopus call latency
/// and outcomes by operation, active keys by scope (refreshed by the readiness job, every
/// `jobs.readiness_interval`), audit append failures.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses((status = 200, description = "OpenMetrics text format (Prometheus scrapes it)", body = String, content_type = "application/openmetrics-text"))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // No query per scrape: the gauges are kept by the readiness job, so scraping costs the
    // database nothing.
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.keys.metrics().render(),
    )
}

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object, content_type = "application/json"))
)]
pub async fn openapi_document() -> impl IntoResponse {
    static SPEC: OnceLock<String> = OnceLock::new();
    ([(header::CONTENT_TYPE, "application/json")], SPEC.get_or_init(super::openapi_json).clone())
}
