//! Extractors whose failures come back in the same problem shape as every other error.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use crate::auth::AuthError;
use crate::domain::audit::{Action, RequestContext};
use crate::domain::policy::authz::{Check, Decision, check};
use crate::domain::principal::Principal;
use crate::services::denials::{Denial, address_bucket};

/// `Json<T>` whose rejections are problem responses. Only a JSON object is accepted as a body:
/// serde would otherwise read a struct from an array of its fields in order, so
/// `["payments-deploy", "p"]` would pass for an issuance request.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !has_json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType(
                "send the body as JSON with Content-Type: application/json".to_owned(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest(e.body_text())
            }
        })?;
        // JSON's own whitespace; anything else before the `{` is an error serde reports below.
        let first = bytes.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        if first != Some(&b'{') {
            return Err(ApiError::BadRequest("the body must be a JSON object".to_owned()));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// The test axum's `Json` applies: `application/json` or any `application/*+json`.
fn has_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", subtype)) => subtype == "json" || subtype.ends_with("+json"),
        _ => false,
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::UnsupportedMediaType("send the body as JSON with Content-Type: application/json".to_owned())
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::BadRequest(format!("the body is not valid JSON: {}", e.body_text()))
        }
        JsonRejection::JsonDataError(e) => {
            ApiError::BadRequest(format!("the body does not fit the schema: {}", e.body_text()))
        }
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// `Query<T>` whose rejections are problem responses.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::BadRequest(format!("bad query string: {}", e.body_text())))
            }
            Err(other) => Err(ApiError::BadRequest(other.body_text())),
        }
    }
}

/// Where the request came from, for the audit trail.
pub struct Ctx(pub RequestContext);

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(context_of(parts)))
    }
}

/// The client's address: the peer's, or with a trusted proxy in front, the one it forwarded
/// (set by the edge middleware, `super::edge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The client's address given the peer and its `X-Forwarded-For`: the peer, unless it is a
/// trusted proxy; then the rightmost forwarded address that is not one (addresses left of it
/// were written by the client itself and prove nothing). An entry that does not read as an
/// address (`unknown`, garbage) ends the walk at the last trusted hop: skipping it would hand
/// the choice to the client's own entries further left. Ports (`1.2.3.4:5`, `[::1]:5`) are
/// dropped.
pub fn client_addr(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded_for else { return peer };
    let mut last_trusted = peer;
    for hop in header.rsplit(',') {
        match forwarded_address(hop.trim()) {
            Some(ip) if is_trusted(&ip) => last_trusted = ip,
            Some(ip) => return ip,
            None => return last_trusted,
        }
    }
    last_trusted
}

fn forwarded_address(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    hop.parse::<SocketAddr>().ok().map(|s| s.ip())
}

fn peer_addr(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ClientAddr>()
        .map(|c| c.0)
        .or_else(|| parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ci| ci.0.ip()))
}

fn context_of(parts: &Parts) -> RequestContext {
    let header = |name: &str, max: usize| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().filter(|c| !c.is_control()).take(max).collect::<String>())
    };
    RequestContext {
        request_id: header("x-request-id", 128),
        client_addr: peer_addr(parts).map(|ip| ip.to_string()),
        user_agent: header("user-agent", 256),
        on_behalf: None,
        route: parts.extensions.get::<MatchedPath>().map(|m| m.as_str().to_owned()),
    }
}

/// The authenticated caller. A missing or bad token is a 401, audited.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(Self(principal.clone()));
        }
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        match state.auth.authenticate(header).await {
            Ok(principal) => {
                state
                    .rate_limits
                    .check_principal(&principal.subject)
                    .map_err(|wait| ApiError::TooManyRequests(Some(wait)))?;
                parts.extensions.insert(principal.clone());
                Ok(Self(principal))
            }
            // No credential at all: scanners, health checks pointed at the wrong path, browsers.
            // Counted, never audited, so anonymous noise cannot grow the trail.
            Err(AuthError::Missing) => {
                state.keys.metrics().auth_missing.inc();
                Err(ApiError::Unauthenticated(AuthError::Missing))
            }
            Err(e) => {
                // Failed authentications are limited per address (IPv6 per /64) before they are
                // audited, and repeats are aggregated (see `denials`).
                let addr = peer_addr(parts).map(address_bucket);
                if let Some(addr) = addr {
                    state.rate_limits.check_address(addr).map_err(|wait| ApiError::TooManyRequests(Some(wait)))?;
                }
                let denial = Denial {
                    action: Action::AuthDenied,
                    actor: "anonymous".to_owned(),
                    who: addr.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
                    reason: e.to_string(),
                    context: context_of(parts),
                };
                state.denials.record(denial).await;
                Err(ApiError::Unauthenticated(e))
            }
        }
    }
}

/// Whether the request carries an admin's bearer token, for answers that show admins more
/// (`/readyz`'s details). The token is optional: a missing or bad one is no error (and is not
/// audited), it only sees what anyone sees. Tokens are checked within the per-address budget of
/// failed authentications, so this is no unmetered oracle for guessing them.
pub struct MaybeAdmin(pub bool);

impl FromRequestParts<AppState> for MaybeAdmin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let authorization = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let admin = match (authorization, peer_addr(parts).map(address_bucket)) {
            (Some(value), Some(addr)) if state.rate_limits.check_address(addr).is_ok() => {
                state.auth.authenticate(Some(value)).await.is_ok_and(|p| check(&p, Check::Administer).is_allowed())
            }
            _ => false,
        };
        Ok(Self(admin))
    }
}

/// A caller with the admin role; anyone else gets 403, audited as `authz.denied`.
pub struct AdminCaller(pub Principal);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Caller(principal) = Caller::from_request_parts(parts, state).await?;
        require(parts, state, principal, Check::Administer).await.map(Self)
    }
}

/// A caller with the auditor or admin role; anyone else gets 403, audited as `authz.denied`.
pub struct AuditorCaller(pub Principal);

impl FromRequestParts<AppState> for AuditorCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Caller(principal) = Caller::from_request_parts(parts, state).await?;
        let what = match parts.extensions.get::<MatchedPath>().map(MatchedPath::as_str) {
            Some("/v1/keys/identify") => Check::IdentifyKey,
            _ => Check::ReadAudit,
        };
        require(parts, state, principal, what).await.map(Self)
    }
}

/// The caller, if [`check`] allows `what`; otherwise its refusal, audited.
async fn require(
    parts: &Parts,
    state: &AppState,
    principal: Principal,
    what: Check<'_>,
) -> Result<Principal, ApiError> {
    match check(&principal, what) {
        Decision::Allow => Ok(principal),
        Decision::Deny(message) => Err(refuse_role(parts, state, &principal, &message).await),
        // A role check never hides what it guards; refuse all the same if one ever does.
        Decision::Hide => Err(refuse_role(parts, state, &principal, "not allowed").await),
    }
}

/// Audits a role refusal (aggregated per caller, reason and route) and returns its 403.
pub async fn refuse_role(parts: &Parts, state: &AppState, principal: &Principal, message: &str) -> ApiError {
    state.denials.record(Denial::role(principal, message, context_of(parts))).await;
    ApiError::Forbidden(message.to_owned())
}

/// A free-text query filter (requester, scope, team, actor, action): at most 256 printable
/// characters. Both databases then treat it alike (PostgreSQL refuses NUL in text).
pub fn filter_value(name: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.len() > 256 || v.chars().any(char::is_control) => {
            Err(ApiError::BadRequest(format!("{name} must be at most 256 printable characters")))
        }
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let addr = |xff: &str| client_addr(peer, Some(xff), &trusted).to_string();
        assert_eq!(addr("198.51.100.7, 203.0.113.9, 10.0.0.2"), "203.0.113.9");
        assert_eq!(addr("203.0.113.9:4711"), "203.0.113.9");
        assert_eq!(addr("[2001:db8::1]:443, 10.0.0.3"), "2001:db8::1");
        // An unreadable hop ends the walk: the client's own entry left of it is not believed.
        assert_eq!(addr("198.51.100.7, unknown, 10.0.0.2"), "10.0.0.2");
        assert_eq!(addr("198.51.100.7, unknown"), "10.0.0.1");
        assert_eq!(addr("10.0.0.9"), "10.0.0.9");
        let untrusted: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_addr(untrusted, Some("203.0.113.9"), &trusted), untrusted);
    }
}
