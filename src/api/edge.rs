//! What every request goes through before and after its route, in one middleware: its request
//! id, its client's address, its span and access-log line, the HTTP metrics, and a problem
//! body for an error answered without one. Each `Router::layer` wraps every route and is cloned
//! into every request with a boxed future of its own, so one layer here costs less than the
//! seven it replaces (measured in BENCHMARKS.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::error::{REQUEST_ID, problem_response};
use super::extract::{self, ClientAddr};
use crate::metrics::Metrics;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const LOG_TARGET: &str = "keybroker::api";

/// What the edge needs besides the request.
pub(super) struct Edge {
    pub(super) metrics: Arc<Metrics>,
    pub(super) trusted_proxies: Vec<ipnet::IpNet>,
}

pub(super) async fn edge(State(edge): State<Arc<Edge>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request_id(&mut req);
    if let Some(addr) = client_addr(&req, &edge.trusted_proxies) {
        req.extensions_mut().insert(ClientAddr(addr));
    }
    let method = metric_method(req.method());
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("", MatchedPath::as_str);
    // The target the access log has always had, whatever module writes it.
    let span = tracing::info_span!(target: LOG_TARGET, "request", method = %req.method(), route, request_id = %request_id.as_str());

    let answer = REQUEST_ID.scope(request_id.as_str().to_owned(), problem_body(next.run(req)));
    let mut response = answer.instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let failed = response.status().is_server_error();
    let status = response.status().as_u16();
    let latency_ms = elapsed.as_millis() as u64;
    span.in_scope(|| {
        tracing::info!(target: LOG_TARGET, status, latency_ms, "handled");
        // At ERROR whatever the cause's own line says (a 502-504 is WARN there, the readiness
        // 503 has none): alerts on error lines see every failed answer.
        if failed {
            tracing::error!(target: LOG_TARGET, status, latency_ms, "response failed");
        }
    });
    edge.metrics.observe_http(method, matched.as_ref().map_or("unmatched", MatchedPath::as_str), status, elapsed);
    response.headers_mut().entry(X_REQUEST_ID).or_insert(request_id.0);
    response
}

/// The request's id: the client's `x-request-id` when it is 1-128 characters of
/// `[A-Za-z0-9._:-]` (it reaches logs, problem bodies and the audit trail, so it must not carry
/// markup, spaces or a megabyte), otherwise a fresh UUIDv4 put in its place.
fn request_id(req: &mut Request) -> RequestId {
    if let Some(id) = req.headers().get(X_REQUEST_ID).filter(|v| valid_request_id(v.as_bytes())) {
        return RequestId(id.clone());
    }
    // From the thread's CSPRNG: `Uuid::new_v4` would make a getrandom system call per request.
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let value = HeaderValue::from_str(id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    req.headers_mut().insert(X_REQUEST_ID, value.clone());
    RequestId(value)
}

/// A header value known to be visible ASCII.
struct RequestId(HeaderValue);

impl RequestId {
    fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

fn valid_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len()) && id.iter().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
}

/// The client's address (see [`extract::client_addr`]); a proxy chain may send several
/// `x-forwarded-for` lines, which read as one comma-separated list.
fn client_addr(req: &Request, trusted: &[ipnet::IpNet]) -> Option<std::net::IpAddr> {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>()?.0.ip();
    let mut lines = req.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    let forwarded = match (lines.next(), lines.next()) {
        (None, _) => None,
        (Some(one), None) => Some(std::borrow::Cow::Borrowed(one)),
        (Some(first), Some(second)) => {
            let rest: Vec<&str> = [first, second].into_iter().chain(lines).collect();
            Some(std::borrow::Cow::Owned(rest.join(",")))
        }
    };
    Some(extract::client_addr(peer, forwarded.as_deref(), trusted))
}

/// Unknown methods are caller text: they are folded so that they cannot multiply the series.
fn metric_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Turns an error that is not yet a problem document (413 from the body limit, 408 from the
/// timeout, extractor rejections) into one, keeping headers such as `Allow` and
/// `WWW-Authenticate`. JSON bodies (problems, the readiness report) are already meant for the
/// caller.
async fn problem_body(answer: impl Future<Output = Response>) -> Response {
    let response = answer.await;
    let status = response.status();
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
        StatusCode::REQUEST_TIMEOUT => ("timeout", "Request timed out", "keybroker did not finish the request in time"),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method-not-allowed", "Method not allowed", "this route does not support that method")
        }
        StatusCode::NOT_FOUND => ("not-found", "Not found", "no such resource"),
        s if s.is_client_error() => ("invalid-request", "Invalid request", "the request could not be understood"),
        _ => ("internal", "Internal error", "keybroker failed to handle the request"),
    };
    let mut problem = problem_response(status, kind, title, detail.to_owned()).into_response();
    // Every value of each (a header may come in several lines); CORS's `Vary` too, so that a
    // cache does not hand this answer to another origin.
    let kept = |name: &HeaderName| {
        [header::ALLOW, header::WWW_AUTHENTICATE, header::RETRY_AFTER, header::VARY].contains(name)
            || name.as_str().starts_with("access-control-")
    };
    for (name, value) in parts.headers.iter().filter(|(name, _)| kept(name)) {
        problem.headers_mut().append(name.clone(), value.clone());
    }
    problem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_request_ids_are_kept() {
        assert!(valid_request_id(b"build-42:step.7_a"));
        for bad in [&b""[..], b"a b", b"<x>", &[b'a'; 129][..]] {
            assert!(!valid_request_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_or_bad_request_id_is_replaced_by_a_uuid() {
        for header in [None, Some("a b")] {
            let mut req = Request::new(axum::body::Body::empty());
            if let Some(h) = header {
                req.headers_mut().insert(X_REQUEST_ID, HeaderValue::from_static(h));
            }
            let id = request_id(&mut req);
            let parsed = uuid::Uuid::parse_str(id.as_str()).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
            assert_eq!(req.headers()[X_REQUEST_ID], id.as_str(), "the handlers see the same id");
        }
    }
}
