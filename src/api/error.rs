//! The one error type of the HTTP layer, written as RFC 9457 problem JSON. Client errors keep
//! their message; server errors get a fixed text and the detail is logged once, here.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::domain::policy::{PolicyError, Reason};
use crate::octopus::OctopusError;
use crate::services::issuance::ServiceError;
use crate::services::queries::StoreError;

tokio::task_local! {
    /// The current request's id, so problem bodies can name it.
    pub static REQUEST_ID: String;
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:keybroker:problem:policy-denied",
    "title": "Forbidden by policy",
    "status": 403,
    "detail": "none of your teams may request keys for scope `payments-deploy`",
    "request_id": "0b6f0d52-7b55-4a3e-9b0b-2b1f0c0f8d11"
}))]
pub struct Problem {
    /// A stable identifier of the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The `x-request-id` of the request, for support and for the audit trail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// On refusals (403, 422): each rule the request failed, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasons: Option<Vec<Reason>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Unauthenticated(AuthError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    PolicyDenied(String, Vec<Reason>),
    /// 422 with the rules the request broke.
    #[error("{0}")]
    PolicyViolation(String, Vec<Reason>),
    #[error("{0}")]
    UnknownScope(String, Vec<Reason>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    UpstreamRejected(String),
    /// The limit is not named: a body read in chunks only learns it went over, not by how much,
    /// and the limit belongs to the server's configuration, not to the error.
    #[error("the request body exceeds the configured limit")]
    PayloadTooLarge,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("too many requests")]
    TooManyRequests(Option<Duration>),
    /// Shown to callers as is: these messages are written for operators and hold no secret.
    #[error("{0}")]
    Unavailable(String),
    /// 503 that an operator must fix (keybroker's Octopus credential, `octopus.url`, a scope's
    /// account): logged at error level.
    #[error("{0}")]
    Misconfigured(String),
    /// 503 for a failed database: callers see only that; the cause is logged once, here.
    #[error("the database is unavailable; nothing was changed")]
    StoreUnavailable(#[source] StoreError),
    #[error("Octopus failed: {0}")]
    BadGateway(String),
    #[error("Octopus did not answer in time")]
    GatewayTimeout,
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid-request", "Invalid request"),
            Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated", "Authentication required"),
            Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            PolicyDenied(..) => (StatusCode::FORBIDDEN, "policy-denied", "Forbidden by policy"),
            PolicyViolation(..) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "policy-violation", "Request violates the policy")
            }
            // 422, never 404: External Secrets Operator takes a 404 for "deleted".
            UnknownScope(..) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown-scope", "Unknown scope"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "policy-violation", "Request violates the policy"),
            UpstreamRejected(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "octopus-rejected", "Octopus refused the request")
            }
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Request body too large"),
            UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type")
            }
            TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Too many requests"),
            Unavailable(_) | StoreUnavailable(_) | Misconfigured(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable")
            }
            BadGateway(_) => (StatusCode::BAD_GATEWAY, "octopus-failed", "Octopus failed"),
            GatewayTimeout => (StatusCode::GATEWAY_TIMEOUT, "octopus-timeout", "Octopus timed out"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }
}

/// Client error details may quote the caller's input (a path segment, a query value, a field
/// name); past this many characters the quote is cut, so that a 60 KB id gets a short answer.
const MAX_DETAIL_CHARS: usize = 300;

fn clip(detail: String) -> String {
    match detail.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((cut, _)) => format!("{}…", &detail[..cut]),
        None => detail,
    }
}

/// Builds a problem response; used for errors raised outside handlers too.
pub fn problem_response(status: StatusCode, kind: &str, title: &str, detail: String) -> Response {
    problem_with_reasons(status, kind, title, detail, None)
}

fn problem_with_reasons(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: String,
    reasons: Option<Vec<Reason>>,
) -> Response {
    let request_id = REQUEST_ID.try_with(Clone::clone).ok();
    let body = Problem {
        kind: format!("urn:keybroker:problem:{kind}"),
        title: title.to_owned(),
        status: status.as_u16(),
        detail,
        request_id,
        reasons,
    };
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, title) = self.parts();
        let detail = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "keybroker failed to handle the request; the request id is in the logs".to_owned()
            }
            ApiError::BadGateway(detail) => {
                tracing::warn!(%detail, "Octopus failed");
                format!("Octopus failed: {detail}")
            }
            ApiError::Unavailable(detail) => {
                tracing::warn!(%detail, "unavailable");
                detail.clone()
            }
            ApiError::Misconfigured(detail) => {
                tracing::error!(%detail, "an operator must fix keybroker's configuration");
                detail.clone()
            }
            ApiError::StoreUnavailable(e) => {
                tracing::error!(error = %e, "the database failed");
                self.to_string()
            }
            ApiError::GatewayTimeout => {
                tracing::warn!("Octopus did not answer in time");
                self.to_string()
            }
            other => clip(other.to_string()),
        };
        let reasons = match &self {
            ApiError::PolicyDenied(_, r) | ApiError::PolicyViolation(_, r) | ApiError::UnknownScope(_, r) => {
                Some(r.clone())
            }
            ApiError::Forbidden(message) => Some(vec![Reason::new("role", message.clone())]),
            _ => None,
        };
        let mut response = problem_with_reasons(status, kind, title, detail, reasons);
        match &self {
            ApiError::Unauthenticated(e) => {
                let value = format!("Bearer realm=\"keybroker\", error=\"invalid_token\", error_description=\"{e}\"");
                let value = if matches!(e, AuthError::Missing) {
                    HeaderValue::from_static("Bearer realm=\"keybroker\"")
                } else {
                    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Bearer realm=\"keybroker\""))
                };
                response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
            }
            ApiError::TooManyRequests(Some(after)) => {
                if let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
                    response.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::StoreUnavailable(e)
    }
}

impl From<OctopusError> for ApiError {
    fn from(e: OctopusError) -> Self {
        match e {
            OctopusError::Rejected { message, .. } => ApiError::UpstreamRejected(message),
            OctopusError::NotFound { message } => ApiError::UpstreamRejected(message),
            OctopusError::Credential { status, message } => ApiError::Misconfigured(format!(
                "Octopus refused keybroker's own credential ({status}); an operator must check it: {message}"
            )),
            OctopusError::RateLimited { retry_after } => ApiError::Unavailable(format!(
                "Octopus is rate limiting keybroker; retry in {} s",
                retry_after.map(|d| d.as_secs()).unwrap_or(1)
            )),
            OctopusError::Timeout => ApiError::GatewayTimeout,
            e @ OctopusError::Redirected { .. } => {
                ApiError::Misconfigured(format!("an operator must fix octopus.url: {e}"))
            }
            OctopusError::Unavailable { detail } => ApiError::BadGateway(detail),
        }
    }
}

/// A short, caller-safe account of an Octopus failure (the texts hold no secret and never
/// Octopus's non-JSON bodies, see `octopus::error_from`).
fn octopus_summary(e: &OctopusError) -> String {
    match e {
        OctopusError::Timeout => "it did not answer in time".to_owned(),
        other => other.to_string(),
    }
}

impl From<crate::services::PassError> for ApiError {
    fn from(e: crate::services::PassError) -> Self {
        match e {
            crate::services::PassError::Store(e) => e.into(),
            crate::services::PassError::Octopus(e) => e.into(),
            crate::services::PassError::Service(e) => e.into(),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Policy(p) => {
                let reasons = vec![p.reason()];
                match p {
                    PolicyError::UnknownScope(_) => ApiError::UnknownScope(p.to_string(), reasons),
                    PolicyError::NotPermitted { .. } => ApiError::PolicyDenied(p.to_string(), reasons),
                    PolicyError::InvalidExpiry(_) | PolicyError::TooManyActiveKeys { .. } => {
                        ApiError::PolicyViolation(p.to_string(), reasons)
                    }
                }
            }
            ServiceError::NotFound => ApiError::NotFound("no such key record".to_owned()),
            ServiceError::Forbidden(m) => ApiError::Forbidden(m),
            ServiceError::Conflict(m) => ApiError::Conflict(m),
            e @ ServiceError::IdempotencyMismatch => ApiError::Unprocessable(e.to_string()),
            ServiceError::ScopeMisconfigured(m) => {
                ApiError::Misconfigured(format!("the scope is misconfigured; an operator must fix it: {m}"))
            }
            ServiceError::Store(e) => e.into(),
            ServiceError::Octopus(e) => e.into(),
            e @ (ServiceError::Abandoned { .. } | ServiceError::OutOfTime(_)) => ApiError::Unavailable(e.to_string()),
            ServiceError::RevocationDeferred(e) => ApiError::Unavailable(format!(
                "Octopus could not revoke the key now ({}); the key still works until keybroker's \
                 reconciler, which retries the revocation, succeeds",
                octopus_summary(&e)
            )),
        }
    }
}
