//! The HTTP API: one module per resource, each with its own router and OpenAPI annotations,
//! assembled here with the cross-cutting layers (`edge`: request ids, client address, access log,
//! metrics, problem bodies; then CORS, panics, timeout, body limit).

pub mod admin;
pub mod audit;
mod edge;
pub mod error;
pub mod extract;
pub mod health;
pub mod keys;
pub mod meta;
pub mod ratelimit;
pub mod reports;
pub mod scopes;
pub mod tickets;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Authenticator;
use crate::config::ServerConfig;
use crate::services::issuance::KeyService;
use error::problem_response;
use utoipa_swagger_ui::SwaggerUi;

/// What every handler can reach, behind one `Arc`: axum clones the state into every request's
/// handler, and one reference count costs less than one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }

    /// The fields, to change before the app serves (a clone's own copy if it is shared).
    pub fn shared_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.0)
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The services and settings in [`AppState`].
#[derive(Clone)]
pub struct Shared {
    pub keys: Arc<KeyService>,
    pub auth: Arc<Authenticator>,
    /// Set when the app was started from a configuration file (reloads read it again).
    pub reloader: Option<Arc<crate::services::reload::Reloader>>,
    pub rate_limits: Arc<ratelimit::RateLimits>,
    /// Aggregates repeated denials before they reach the audit trail.
    pub denials: Arc<crate::services::denials::DenialAudit>,
    /// The readiness job's last verdict, which `/readyz` serves.
    pub readiness: Arc<crate::services::readiness::Readiness>,
    pub tickets: Arc<crate::services::tickets::TicketService>,
    /// The page at `/`, with `[ui]`.
    pub ui: Option<Arc<crate::ui::Ui>>,
    /// The trail's published head and where verification got to.
    pub audit: Arc<crate::services::audit_watch::AuditWatch>,
    /// The policy version this replica runs, published for the others, and theirs.
    pub policy_sync: Arc<crate::services::policy_sync::PolicySync>,
    /// `jobs.policy_sync_interval`: replicas not heard from in three are left out of the view.
    pub policy_sync_interval: std::time::Duration,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keybroker",
        description = "Brokers the issuance of scoped, expiring Octopus Deploy API keys. \
                       Callers authenticate with a Bearer JWT; errors are RFC 9457 problem documents.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    components(schemas(crate::services::webhooks::WebhookPayload, crate::services::webhooks::WebhookKey)),
    tags(
        (name = "keys", description = "Issue, list, read, revoke and identify Octopus API keys"),
        (name = "scopes", description = "What the caller may request, and who they are"),
        (name = "audit", description = "The hash-chained audit trail (auditors and admins)"),
        (name = "health", description = "Liveness and readiness"),
        (name = "meta", description = "Metrics and this document; Swagger UI is at /docs"),
        (name = "admin", description = "Offboarding, unmanaged keys and policy reloads (admins)"),
        (name = "tickets", description = "Pickup tickets: a chat-ops bot asks on a person's behalf, the person claims the key in their own browser"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".to_owned());
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(keys::router())
        .merge(scopes::router())
        .merge(audit::router())
        .merge(health::router())
        .merge(meta::router())
        .merge(admin::router())
        .merge(reports::router())
        .merge(tickets::router())
}

/// The OpenAPI document, generated from the handlers' annotations.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut api) = api_routes().split_for_parts();
    api.info.version = env!("CARGO_PKG_VERSION").to_owned();
    add_rate_limit_responses(&mut api);
    api
}

/// Every authenticated operation can be rate limited (per principal, or per address for failed
/// authentications): document its 429 once, here, rather than on every handler.
fn add_rate_limit_responses(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let too_many = ResponseBuilder::new()
        .description("Rate limited; retry after the `Retry-After` header's seconds")
        .header(
            "Retry-After",
            utoipa::openapi::header::Header::new(
                utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::Integer),
            ),
        )
        .content(
            "application/problem+json",
            ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
        )
        .build();
    for item in openapi.paths.paths.values_mut() {
        for op in [&mut item.get, &mut item.post, &mut item.delete].into_iter().flatten() {
            if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                op.responses.responses.insert("429".to_owned(), too_many.clone().into());
            }
        }
    }
}

/// The OpenAPI document as pretty JSON (what `keybroker openapi` prints and
/// `openapi/keybroker.json` holds).
pub fn openapi_json() -> String {
    openapi().to_pretty_json().unwrap_or_default()
}

/// The complete application router.
pub fn router(state: AppState, server: &ServerConfig) -> Router {
    let (routes, _) = api_routes().split_for_parts();
    let metrics = state.keys.metrics().clone();

    // Swagger UI's files are compiled into the binary (utoipa-swagger-ui's `vendored`), and it
    // reads the same /openapi.json as every other client.
    let swagger: Router<AppState> =
        SwaggerUi::new("/docs").config(utoipa_swagger_ui::Config::from("/openapi.json")).into();
    let page: Router<AppState> = state.ui.clone().map(crate::ui::router).unwrap_or_default();
    let routes = routes
        .merge(swagger)
        .merge(page)
        .fallback(|| async {
            problem_response(StatusCode::NOT_FOUND, "not-found", "Not found", "no such route".to_owned())
        })
        .method_not_allowed_fallback(|| async {
            problem_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this route does not support that method".to_owned(),
            )
        })
        .with_state(state);

    // Router::layer wraps every route (and the fallback) separately, so the route template is
    // known to the edge (access log, metrics). Later calls wrap earlier ones.
    let edge = Arc::new(edge::Edge { metrics, trusted_proxies: server.trusted_proxies.clone() });
    routes
        .layer(axum::extract::DefaultBodyLimit::max(server.request_body_limit_bytes))
        .layer(RequestBodyLimitLayer::new(server.request_body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, server.request_timeout))
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            // Its message (which could quote a request) is on stderr, from the panic hook;
            // this line ties the panic to the request.
            tracing::error!("a handler panicked");
            problem_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "keybroker failed to handle the request".to_owned(),
            )
        }))
        .layer(cors(server))
        .layer(middleware::from_fn_with_state(edge, edge::edge))
}

fn cors(server: &ServerConfig) -> CorsLayer {
    let origins: Vec<HeaderValue> =
        server.cors_allowed_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([header::LOCATION, HeaderName::from_static("x-request-id"), header::RETRY_AFTER])
        .max_age(std::time::Duration::from_secs(600))
}
