//! The HTTP API: one module per resource, each with its own router and OpenAPI annotations,
//! assembled here with the cross-cutting layers (request ids, access log, problem bodies, CORS,
//! body limit, timeout).

pub mod admin;
pub mod audit;
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
use axum::body::Body;
use axum::extract::State;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Authenticator;
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::services::issuance::KeyService;
use error::{REQUEST_ID, problem_response};
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
    let x_request_id = HeaderName::from_static("x-request-id");
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
    // known to the access log. Later calls wrap earlier ones: the request id is set first.
    let trusted_proxies = Arc::new(server.trusted_proxies.clone());
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
        .layer(middleware::from_fn(problem_bodies))
        .layer(middleware::from_fn_with_state(metrics, http_metrics))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<Body>| {
                    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                    let route = req.extensions().get::<MatchedPath>().map(MatchedPath::as_str).unwrap_or("");
                    tracing::info_span!("request", method = %req.method(), route, request_id)
                })
                .on_request(())
                .on_response(|res: &Response, latency: std::time::Duration, _span: &tracing::Span| {
                    tracing::info!(status = res.status().as_u16(), latency_ms = latency.as_millis() as u64, "handled");
                }),
        )
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .layer(middleware::from_fn(drop_bad_request_id))
        .layer(middleware::from_fn_with_state(trusted_proxies, client_addr))
}

/// A client's `x-request-id` is kept only when it is 1-128 characters of `[A-Za-z0-9._:-]`;
/// otherwise it is dropped and a fresh one is made. It reaches logs, problem bodies and the
/// audit trail, so it must not carry markup, spaces or a megabyte.
async fn drop_bad_request_id(mut req: Request, next: Next) -> Response {
    let keep = req.headers().get("x-request-id").is_none_or(|v| valid_request_id(v.as_bytes()));
    if !keep {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

pub fn valid_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len()) && id.iter().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
}

/// Works out the client's address once per request (see [`extract::client_addr`]).
async fn client_addr(State(trusted): State<Arc<Vec<ipnet::IpNet>>>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|ci| ci.0.ip());
    if let Some(peer) = peer {
        // A proxy chain may send several header lines; they read as one comma-separated list.
        let forwarded: Vec<&str> =
            req.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
        let forwarded = (!forwarded.is_empty()).then(|| forwarded.join(","));
        let addr = extract::client_addr(peer, forwarded.as_deref(), &trusted);
        req.extensions_mut().insert(extract::ClientAddr(addr));
    }
    next.run(req).await
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

/// Counts the request and its latency by method, route template and status.
async fn http_metrics(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    // Unknown methods are caller text: fold them so they cannot multiply the series.
    let method = match *req.method() {
        Method::GET | Method::POST | Method::DELETE | Method::PUT | Method::PATCH | Method::HEAD | Method::OPTIONS => {
            req.method().as_str().to_owned()
        }
        _ => "other".to_owned(),
    };
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let response = next.run(req).await;
    metrics.observe_http(&method, &route, response.status().as_u16(), started.elapsed());
    response
}

/// Runs the request with its id in scope (so problem bodies carry it) and turns any error that
/// is not yet a problem document (413 from the body limit, 408 from the timeout, extractor
/// rejections) into one, keeping headers such as `Allow` and `WWW-Authenticate`.
async fn problem_bodies(req: Request, next: Next) -> Response {
    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    REQUEST_ID
        .scope(request_id, async move {
            let response = next.run(req).await;
            let status = response.status();
            // JSON bodies (problems, the readiness report) are already meant for the caller.
            let is_json = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
                v.as_bytes().starts_with(b"application/problem+json") || v.as_bytes().starts_with(b"application/json")
            });
            if !(status.is_client_error() || status.is_server_error()) || is_json {
                return response;
            }
            let (parts, _) = response.into_parts();
            let (kind, title, detail) = match status {
                StatusCode::PAYLOAD_TOO_LARGE => {
                    ("payload-too-large", "Request body too large", "the request body exceeds the configured limit")
                }
                StatusCode::REQUEST_TIMEOUT => {
                    ("timeout", "Request timed out", "keybroker did not finish the request in time")
                }
                StatusCode::METHOD_NOT_ALLOWED => {
                    ("method-not-allowed", "Method not allowed", "this route does not support that method")
                }
                StatusCode::NOT_FOUND => ("not-found", "Not found", "no such resource"),
                s if s.is_client_error() => {
                    ("invalid-request", "Invalid request", "the request could not be understood")
                }
                _ => ("internal", "Internal error", "keybroker failed to handle the request"),
            };
            let mut problem = problem_response(status, kind, title, detail.to_owned());
            for name in [header::ALLOW, header::WWW_AUTHENTICATE, header::RETRY_AFTER] {
                if let Some(v) = parts.headers.get(&name) {
                    problem.headers_mut().insert(name, v.clone());
                }
            }
            for (name, value) in parts.headers.iter().filter(|(n, _)| n.as_str().starts_with("access-control-")) {
                problem.headers_mut().insert(name.clone(), value.clone());
            }
            problem.into_response()
        })
        .await
}
