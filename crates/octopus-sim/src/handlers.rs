//! The HTTP face of the simulator: Octopus's `/api` routes and the `/_sim/` test hooks.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, MatchedPath, Path, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::SimApiKey;
use super::error::ApiError;
use super::faults::{self, ActiveFault, Fault, FaultKind};
use super::state::{Caller, CreateKeyRequest, Presented, RequestedExpiry, Shared, User};
use super::wire::{self, Paging, Query};

/// The API key header [C: CS `ApiConstants`].
const API_KEY_HEADER: &str = "x-octopus-apikey";
/// The CSRF header cookie sessions must send [C: BLOG; CS `DispatchRequest`].
const CSRF_HEADER: &str = "x-octopus-csrf-token";
/// The .NET client sends DELETE as POST with this header [C: CS `DispatchRequest`].
const METHOD_OVERRIDE_HEADER: &str = "x-http-method-override";
const IDENTIFICATION_COOKIE: &str = "OctopusIdentificationToken";
const CSRF_COOKIE: &str = "Octopus-Csrf-Token";

type AppState = Arc<Shared>;

/// Every route, the `/_sim/` hooks, and the layer that counts requests, injects faults and stamps
/// `Octopus-Node`.
pub(crate) fn router(shared: AppState) -> Router {
    Router::new()
        .route("/api", get(root))
        .route("/api/", get(root))
        .route("/api/authentication", get(authentication))
        .route("/api/users/login", post(login))
        .route("/api/users/logout", post(logout))
        .route("/api/users", get(list_users))
        .route("/api/users/all", get(all_users))
        .route("/api/users/me", get(me))
        .route("/api/users/{id}", get(get_user))
        .route("/api/users/{id}/apikeys", get(list_keys).post(create_key))
        .route("/api/users/{id}/apikeys/{keyId}", get(get_key).delete(delete_key).post(delete_key_by_override))
        .route("/_sim/counters", get(sim_counters).delete(sim_reset_counters))
        .route("/_sim/faults", get(sim_faults).post(sim_inject).delete(sim_clear_faults))
        .route("/_sim/keys", get(sim_keys))
        .route("/_sim/clock", post(sim_advance_clock))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(shared.clone(), observe))
        .with_state(shared)
}

/// Counts the request under `METHOD /route/{template}`, applies any matching fault, stamps
/// `Octopus-Node` and logs one line (never a query string, header value or body: they may hold
/// keys or passwords).
async fn observe(State(shared): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let method = effective_method(request.method(), request.headers());
    let path = request.uri().path().to_owned();
    let limited = match route.as_deref() {
        Some(route) if !route.starts_with("/_sim") => rate_limit(&shared, request.headers(), request.uri()),
        _ => None,
    };
    if let Some(RateLimit { allowed: false, headers }) = &limited {
        let retry_after = headers.iter().find(|(n, _)| n == "Retry-After").map_or(1, |(_, v)| v.parse().unwrap_or(1));
        let mut response = faults::rate_limited_response(retry_after);
        for (name, value) in headers.iter().filter(|(n, _)| n != "Retry-After") {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
                response.headers_mut().insert(name, value);
            }
        }
        return response;
    }
    let mut response = match route.as_deref() {
        Some(route) if !route.starts_with("/_sim") => {
            let fault = {
                let mut state = shared.lock();
                *state.counters.entry(format!("{method} {route}")).or_default() += 1;
                faults::take_fault(&mut state.faults, &method, route)
            };
            match fault {
                None => next.run(request).await,
                Some(FaultKind::Status { status, error_message }) => faults::status_response(status, &error_message),
                Some(FaultKind::RateLimited { retry_after_secs }) => faults::rate_limited_response(retry_after_secs),
                Some(FaultKind::Foreign { status, content_type, body, location }) => {
                    faults::foreign_response(status, &content_type, &body, location.as_deref())
                }
                Some(FaultKind::Latency(delay)) => {
                    tokio::time::sleep(delay).await;
                    next.run(request).await
                }
                Some(FaultKind::LoseResponseAfterCreate) => {
                    let response = next.run(request).await;
                    tracing::info!(%method, route, "octopus-sim: losing this response on purpose");
                    faults::lose_response(response).await
                }
            }
        }
        _ => next.run(request).await,
    };
    if let Some(node) = &shared.node_header {
        response.headers_mut().insert(HeaderName::from_static("octopus-node"), node.clone());
    }
    for (name, value) in limited.map(|l| l.headers).unwrap_or_default() {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
            response.headers_mut().insert(name, value);
        }
    }
    tracing::debug!(
        %method,
        route = route.as_deref().unwrap_or(&path),
        status = response.status().as_u16(),
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "octopus-sim request"
    );
    response
}

/// The method the request means: a POST with `X-HTTP-Method-Override` counts as the override.
fn effective_method(method: &Method, headers: &HeaderMap) -> Method {
    if method == Method::POST {
        if let Some(value) = headers.get(METHOD_OVERRIDE_HEADER) {
            if let Ok(text) = value.to_str() {
                if let Ok(overridden) = Method::from_bytes(text.trim().to_ascii_uppercase().as_bytes()) {
                    return overridden;
                }
            }
        }
    }
    method.clone()
}

/// The verdict of the rate-limit mode, with the headers every rate-limited request carries.
struct RateLimit {
    allowed: bool,
    headers: Vec<(String, String)>,
}

/// Octopus 2026.3+'s token bucket per user (octopus-api.md §10): `None` when the mode is off.
fn rate_limit(shared: &AppState, headers: &HeaderMap, uri: &Uri) -> Option<RateLimit> {
    let rpm = shared.settings.rate_limit_per_minute.filter(|r| *r > 0)?;
    let burst = f64::from(shared.settings.rate_limit_burst.unwrap_or(rpm).max(1));
    let per_second = f64::from(rpm) / 60.0;
    let presented = presented_credential(headers, uri, &shared.installation_id);
    let mut state = shared.lock();
    let who = state.user_of(&presented).unwrap_or_else(|| "anonymous".to_owned());
    let now = std::time::Instant::now();
    let (tokens, at) = state.rate_buckets.entry(who).or_insert((burst, now));
    *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(burst);
    *at = now;
    let allowed = *tokens >= 1.0;
    if allowed {
        *tokens -= 1.0;
    }
    let to_full = ((burst - *tokens) / per_second).ceil();
    let mut out = vec![
        ("Octopus-RateLimit-Policy".to_owned(), format!("l={burst};rpm={rpm}")),
        ("Octopus-RateLimit".to_owned(), format!("r={};t={to_full}", tokens.floor())),
    ];
    if !allowed {
        out.push(("Retry-After".to_owned(), format!("{}", ((1.0 - *tokens) / per_second).ceil().max(1.0))));
    }
    Some(RateLimit { allowed, headers: out })
}

/// The caller of an `/api` route that needs authentication; rejects with Octopus's 401.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &AppState) -> Result<Self, ApiError> {
        let presented = presented_credential(&parts.headers, &parts.uri, &shared.installation_id);
        shared.lock().authenticate(&presented)
    }
}

/// Finds the credential: the API key header first, then `?apikey=` (any case), then the login
/// cookie.
fn presented_credential(headers: &HeaderMap, uri: &Uri, installation_id: &str) -> Presented {
    let header_key = headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    if let Some(key) = header_key {
        return Presented::ApiKey(key.to_owned());
    }
    let query = Query::parse(uri.query());
    if let Some(key) = query.get("apikey").map(str::trim).filter(|k| !k.is_empty()) {
        return Presented::ApiKey(key.to_owned());
    }
    match session_token(headers, installation_id) {
        Some(token) => Presented::Session {
            token,
            csrf: headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).map(|v| v.trim().to_owned()),
        },
        None => Presented::Nothing,
    }
}

/// The URL-decoded value of this installation's identification cookie.
fn session_token(headers: &HeaderMap, installation_id: &str) -> Option<String> {
    let name = format!("{IDENTIFICATION_COOKIE}_{installation_id}");
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| wire::percent_decode(value.trim()))
}

/// `GET /api`: the root document, open to anonymous callers.
async fn root(State(shared): State<AppState>) -> Json<Value> {
    Json(json!({
        "Application": "Octopus Deploy",
        "Version": shared.settings.version,
        "ApiVersion": "3.0.0",
        "InstallationId": shared.installation_id,
        "Links": {
            "Self": "/api",
            "Authentication": "/api/authentication",
            "CurrentUser": "/api/users/me",
            "SignIn": "/api/users/login{?returnUrl}",
            "SignOut": "/api/users/logout",
            "Users": "/api/users{/id}{?skip,take,ids,filter}",
        }
    }))
}

/// `GET /api/authentication`: the key-expiry policy; the expiry fields are absent when the seed
/// models a server before 2025.4.
async fn authentication(State(shared): State<AppState>) -> Json<Value> {
    let settings = &shared.settings;
    let mut body = json!({
        "UserApiKeysEnabled": settings.user_api_keys_enabled,
        "AuthenticationProviders": [],
        "AutoLoginEnabled": false,
        "RememberMeEnabled": true,
        "AnyAuthenticationProvidersSupportPasswordManagement": true,
        "Links": { "Self": "/api/authentication" },
    });
    if let Some(object) = body.as_object_mut() {
        if let Some(days) = settings.api_key_default_expiry_days {
            object.insert("ApiKeyDefaultExpiryDays".to_owned(), Value::from(days));
        }
        if let Some(days) = settings.api_key_max_expiry_days {
            object.insert("ApiKeyMaxExpiryDays".to_owned(), Value::from(days));
        }
    }
    Json(body)
}

/// Parses a JSON object body, the way the create and login routes need it.
fn json_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid("No request body was supplied."));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(ApiError::invalid("The request body must be a JSON object.")),
    }
}

fn optional_string(object: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match wire::field(object, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(format!("{name} must be a string."))),
    }
}

/// `POST /api/users/login`: a cookie session. The answer is the user, plus the identification
/// cookie (HttpOnly, URL-encoded) and the CSRF cookie, both suffixed with the installation id.
async fn login(State(shared): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let invalid = || ApiError::BadRequest(super::error::INVALID_LOGIN.to_owned());
    let object = json_object(&body).map_err(|_| invalid())?;
    let username = optional_string(&object, "Username").map_err(|_| invalid())?;
    let password = optional_string(&object, "Password").map_err(|_| invalid())?;
    let remember_me = matches!(wire::field(&object, "RememberMe"), Some(Value::Bool(true)));
    let (Some(username), Some(password)) = (username, password) else {
        return Err(invalid());
    };
    let login = shared.lock().login(&shared.settings, &username, &password)?;
    tracing::info!(user_id = %login.user.id, "octopus-sim: signed in");

    let iid = &shared.installation_id;
    // Remember-me sessions survive a browser restart; both end with the session timeout.
    let lifetime =
        if remember_me { format!("; Max-Age={}", shared.settings.session_timeout_secs) } else { String::new() };
    let identification = format!(
        "{IDENTIFICATION_COOKIE}_{iid}={}; Path=/; HttpOnly; SameSite=Lax{lifetime}",
        wire::percent_encode(&login.token)
    );
    // The CSRF cookie's value is URL-encoded (octopus-api.md §2); the header carries it decoded.
    let csrf = format!("{CSRF_COOKIE}_{iid}={}; Path=/; SameSite=Lax{lifetime}", wire::percent_encode(&login.csrf));
    let mut response = Json(wire::user_json(&login.user)).into_response();
    for cookie in [identification, csrf] {
        let value = HeaderValue::from_str(&cookie)
            .map_err(|_| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, "Cookie could not be set.".to_owned()))?;
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// `POST /api/users/logout`: ends the cookie's session (when its CSRF header matches) and clears
/// the cookies; 200 either way.
async fn logout(State(shared): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = session_token(&headers, &shared.installation_id) {
        let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).map(str::trim);
        shared.lock().logout(&token, csrf);
    }
    let iid = &shared.installation_id;
    let mut response = Json(json!({})).into_response();
    for name in [IDENTIFICATION_COOKIE, CSRF_COOKIE] {
        if let Ok(value) = HeaderValue::from_str(&format!("{name}_{iid}=; Path=/; Max-Age=0")) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

/// `GET /api/users`: paged, sorted by username; `filter` is a case-insensitive substring of the
/// username, display name or email; `ids`, `isActive` and `isServiceAccount` narrow further.
async fn list_users(
    State(shared): State<AppState>,
    _caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let query = Query::parse(raw.as_deref());
    let paging = Paging::from_query(&query)?;
    let filter = query.get("filter").map(str::trim).filter(|f| !f.is_empty());
    let filter_lc = filter.map(str::to_lowercase);
    let ids = query.list("ids");
    let is_active = query.flag("isActive")?;
    let is_service = query.flag("isServiceAccount")?;
    let ids_param = (!ids.is_empty()).then(|| ids.join(","));

    let state = shared.lock();
    let matching: Vec<&User> = state
        .users()
        .iter()
        .filter(|u| filter_lc.as_deref().is_none_or(|f| u.matches(f)))
        .filter(|u| ids.is_empty() || ids.contains(&u.id.as_str()))
        .filter(|u| is_active.is_none_or(|a| u.is_active == a))
        .filter(|u| is_service.is_none_or(|s| u.is_service == s))
        .collect();
    let items = paging.slice(&matching).iter().map(|u| wire::user_json(u)).collect();
    let is_active_param = is_active.map(|a| a.to_string());
    let is_service_param = is_service.map(|s| s.to_string());
    Ok(Json(wire::collection(
        "User",
        "/api/users",
        "/api/users{?skip,take,ids,filter,isActive,isServiceAccount}",
        &[
            ("filter", filter),
            ("ids", ids_param.as_deref()),
            ("isActive", is_active_param.as_deref()),
            ("isServiceAccount", is_service_param.as_deref()),
        ],
        matching.len(),
        paging,
        items,
    )))
}

/// `GET /api/users/all`: every user, unpaged, sorted by username.
async fn all_users(State(shared): State<AppState>, _caller: Caller) -> Json<Value> {
    let state = shared.lock();
    Json(Value::Array(state.users().iter().map(wire::user_json).collect()))
}

/// `GET /api/users/me`.
async fn me(State(shared): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let state = shared.lock();
    let user = state.user(&caller.user_id).ok_or(ApiError::Unauthorized)?;
    Ok(Json(wire::user_json(user)))
}

/// `GET /api/users/{id}`: oneself, or anyone with `UserEdit`.
async fn get_user(
    State(shared): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let state = shared.lock();
    Ok(Json(wire::user_json(state.get_user(&caller, &id)?)))
}

/// `GET /api/users/{id}/apikeys`: most recent first; `partialPurpose` and `partialKeyword`
/// (purpose or hint) filter case-insensitively.
async fn list_keys(
    State(shared): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let query = Query::parse(raw.as_deref());
    let paging = Paging::from_query(&query)?;
    let purpose = query.get("partialPurpose").filter(|p| !p.is_empty());
    let keyword = query.get("partialKeyword").filter(|k| !k.is_empty());
    let state = shared.lock();
    let keys = state.list_keys(&caller, &id, purpose, keyword)?;
    let (hint_length, tracks_use) = (shared.settings.api_key_hint_length, shared.settings.api_key_last_use_tracked);
    let items = paging.slice(&keys).iter().map(|k| wire::api_key_json(k, hint_length, tracks_use)).collect();
    let path = format!("/api/users/{id}/apikeys");
    let template = format!("{path}{{?skip,take,partialPurpose,partialKeyword}}");
    Ok(Json(wire::collection(
        "ApiKey",
        &path,
        &template,
        &[("partialPurpose", purpose), ("partialKeyword", keyword)],
        keys.len(),
        paging,
        items,
    )))
}

/// Reads the create body. Unknown fields are ignored like the real server; `Expires` omitted and
/// `Expires: null` are told apart.
fn parse_create_request(body: &Bytes) -> Result<CreateKeyRequest, ApiError> {
    let object = json_object(body)?;
    let expires = match wire::field(&object, "Expires") {
        None => RequestedExpiry::Omitted,
        Some(Value::Null) => RequestedExpiry::Null,
        Some(Value::String(text)) => DateTime::parse_from_rfc3339(text.trim())
            .map(|at| RequestedExpiry::At(at.with_timezone(&Utc)))
            .unwrap_or(RequestedExpiry::Unparseable),
        Some(_) => RequestedExpiry::Unparseable,
    };
    Ok(CreateKeyRequest {
        purpose: optional_string(&object, "Purpose")?,
        expires,
        user_id: optional_string(&object, "UserId")?,
        actor_type: optional_string(&object, "ActorType")?,
    })
}

/// `POST /api/users/{id}/apikeys`: 200 (not 201) with `ApiKeyCreatedResource`, whose `ApiKey` is
/// the secret; it is not stored and never shown again.
async fn create_key(
    State(shared): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request = parse_create_request(&body);
    let (record, secret) = shared.lock().create_key(&shared.settings, &caller, &id, request)?;
    tracing::info!(key_id = %record.id, user_id = %record.user_id, "octopus-sim: API key created");
    Ok(Json(wire::created_key_json(&record, &secret)))
}

/// `GET /api/users/{id}/apikeys/{keyId}`.
async fn get_key(
    State(shared): State<AppState>,
    caller: Caller,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let state = shared.lock();
    let settings = &shared.settings;
    Ok(Json(wire::api_key_json(
        state.get_key(&caller, &id, &key_id)?,
        settings.api_key_hint_length,
        settings.api_key_last_use_tracked,
    )))
}

/// `DELETE /api/users/{id}/apikeys/{keyId}`: 200 `{}`; 404 once gone.
async fn delete_key(
    State(shared): State<AppState>,
    caller: Caller,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    shared.lock().delete_key(&caller, &id, &key_id)?;
    tracing::info!(%key_id, user_id = %id, "octopus-sim: API key deleted");
    Ok(Json(json!({})))
}

/// `POST` + `X-HTTP-Method-Override: DELETE` on a key, as the .NET client revokes.
async fn delete_key_by_override(
    State(shared): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    path: Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if effective_method(&Method::POST, &headers) != Method::DELETE {
        return Err(method_not_allowed_error(&Method::POST));
    }
    delete_key(State(shared), caller, path).await
}

/// Unknown routes: a JSON 404 rather than an empty body.
async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

async fn method_not_allowed(method: Method) -> ApiError {
    method_not_allowed_error(&method)
}

fn method_not_allowed_error(method: &Method) -> ApiError {
    ApiError::Status(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("The requested resource does not support http method '{method}'."),
    )
}

/// `GET /_sim/counters`: requests per `METHOD /route/{template}`.
async fn sim_counters(State(shared): State<AppState>) -> Json<Value> {
    Json(json!(shared.lock().counters))
}

/// `DELETE /_sim/counters`.
async fn sim_reset_counters(State(shared): State<AppState>) -> Json<Value> {
    shared.lock().counters.clear();
    Json(json!({}))
}

/// `GET /_sim/faults`: the faults still active.
async fn sim_faults(State(shared): State<AppState>) -> Json<Value> {
    let state = shared.lock();
    let faults: Vec<&Fault> = state.faults.iter().map(ActiveFault::fault).collect();
    Json(json!(faults))
}

/// `POST /_sim/faults` with a [`Fault`] as JSON.
async fn sim_inject(State(shared): State<AppState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let fault: Fault =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("Not a valid fault: {e}")))?;
    if let FaultKind::Status { status, .. } | FaultKind::Foreign { status, .. } = &fault.kind {
        if StatusCode::from_u16(*status).is_err() {
            return Err(ApiError::BadRequest(format!("{status} is not an HTTP status code.")));
        }
    }
    shared.lock().faults.push(ActiveFault::new(fault));
    Ok(Json(json!({})))
}

/// `DELETE /_sim/faults`.
async fn sim_clear_faults(State(shared): State<AppState>) -> Json<Value> {
    shared.lock().faults.clear();
    Json(json!({}))
}

/// `GET /_sim/keys`: every stored key, without secrets.
async fn sim_keys(State(shared): State<AppState>) -> Json<Vec<SimApiKey>> {
    Json(super::snapshot_keys(&shared.lock()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceClock {
    advance_secs: i64,
}

/// `POST /_sim/clock` with `{"advance_secs": N}`: moves the simulator's clock forward (or back).
async fn sim_advance_clock(State(shared): State<AppState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let advance: AdvanceClock = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("Expected {{\"advance_secs\": N}}: {e}")))?;
    let by = chrono::Duration::try_seconds(advance.advance_secs)
        .ok_or_else(|| ApiError::BadRequest("advance_secs is out of range.".to_owned()))?;
    let mut state = shared.lock();
    state.advance_clock(by);
    Ok(Json(json!({ "Now": wire::format_date(state.now()) })))
}
