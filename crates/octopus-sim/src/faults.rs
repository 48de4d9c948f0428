//! Fault injection: make a route fail, slow down, rate-limit, or lose its response, so that tests
//! can drive the broker through Octopus's bad days.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::ApiError;

/// A fault to inject.
///
/// Over HTTP (`POST /_sim/faults`) it is JSON such as
/// `{"method": "POST", "route": "/api/users/{id}/apikeys", "kind": {"Status": {"status": 503,
/// "error_message": "Down for maintenance"}}, "times": 1}`, or `{"route": "*", "kind":
/// {"Latency": 250}}` (milliseconds), `{"kind": {"RateLimited": {"retry_after_secs": 5}}, ...}`,
/// `{"kind": "LoseResponseAfterCreate", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Only requests with this method; `None` for any. A `POST` carrying
    /// `X-HTTP-Method-Override: DELETE` counts as a `DELETE`.
    #[serde(default, with = "method_serde")]
    pub method: Option<Method>,
    /// A route template as in the counters, without or with its method
    /// (`/api/users/{id}/apikeys` or `POST /api/users/{id}/apikeys`), or `*` for every `/api`
    /// route. `/_sim/` routes are never affected.
    pub route: String,
    /// What happens.
    pub kind: FaultKind,
    /// How many requests it affects; `None` until [`super::Simulator::clear_faults`].
    #[serde(default)]
    pub times: Option<u32>,
    /// Affects each matching request with this chance, in thousandths (`100`: 10 %). Faults with
    /// a chance share one roll per request, in order, so they never overlap: 100, 50 and 50 give
    /// 10 %, 5 % and 5 % of requests, and 85 % none. `None`: every matching request.
    #[serde(default)]
    pub per_mille: Option<u32>,
}

impl Fault {
    /// A fault on every request of `method` to `route`, until cleared.
    pub fn on(method: Method, route: &str, kind: FaultKind) -> Self {
        Self { method: Some(method), route: route.to_owned(), kind, times: None, per_mille: None }
    }

    /// Makes the fault affect each matching request with a chance of `per_mille` thousandths.
    #[must_use]
    pub fn per_mille(mut self, per_mille: u32) -> Self {
        self.per_mille = Some(per_mille.min(1000));
        self
    }

    /// Limits the fault to the next `n` matching requests.
    #[must_use]
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, method: &Method, route: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let wanted = self.route.trim();
        if wanted == "*" || wanted == route {
            return true;
        }
        match wanted.split_once(' ') {
            Some((m, r)) => m.eq_ignore_ascii_case(method.as_str()) && r.trim() == route,
            None => false,
        }
    }
}

/// What an injected fault does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    /// Answer this status with an Octopus error body; the request is not handled.
    Status { status: u16, error_message: String },
    /// Wait, then handle the request normally (milliseconds in JSON).
    Latency(#[serde(with = "millis")] Duration),
    /// 429 with `Retry-After`, as Octopus 2026.3+ rate limiting does; the request is not handled.
    RateLimited { retry_after_secs: u64 },
    /// Answer as something in front of Octopus would (an ingress's HTML 404, a proxy's 502, an
    /// empty body, a redirect): the status, a `Content-Type`, the body as is and, for 3xx, a
    /// `Location`. The request never reaches Octopus.
    Foreign { status: u16, content_type: String, body: String, location: Option<String> },
    /// Handle the request (for the create route: the key is created and stored), then break the
    /// connection in the middle of the response body: the client sees a transport error, never
    /// the secret.
    LoseResponseAfterCreate,
}

/// A fault with its remaining uses.
#[derive(Debug, Clone)]
pub(crate) struct ActiveFault {
    fault: Fault,
    remaining: Option<u32>,
}

impl ActiveFault {
    pub(crate) fn new(fault: Fault) -> Self {
        let remaining = fault.times;
        Self { fault, remaining }
    }

    pub(crate) fn fault(&self) -> &Fault {
        &self.fault
    }
}

/// Takes one use of the first fault matching the request, dropping used-up faults.
pub(crate) fn take_fault(faults: &mut Vec<ActiveFault>, method: &Method, route: &str) -> Option<FaultKind> {
    let roll = rand::Rng::gen_range(&mut rand::thread_rng(), 0..1000u32);
    let mut chances = 0u32;
    let index = faults.iter().position(|f| {
        if f.remaining == Some(0) || !f.fault.matches(method, route) {
            return false;
        }
        match f.fault.per_mille {
            None => true,
            Some(p) => {
                chances += p;
                roll < chances
            }
        }
    })?;
    let active = faults.get_mut(index)?;
    let kind = active.fault.kind.clone();
    if let Some(remaining) = active.remaining.as_mut() {
        *remaining = remaining.saturating_sub(1);
        if *remaining == 0 {
            faults.remove(index);
        }
    }
    Some(kind)
}

/// The answer of a `Status` fault.
pub(crate) fn status_response(status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    ApiError::Status(status, message.to_owned()).into_response()
}

/// The answer of a `Foreign` fault.
pub(crate) fn foreign_response(status: u16, content_type: &str, body: &str, location: Option<&str>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, body.to_owned()).into_response();
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    if let Some(value) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// The answer of a `RateLimited` fault.
pub(crate) fn rate_limited_response(retry_after_secs: u64) -> Response {
    let mut response = ApiError::Status(
        StatusCode::TOO_MANY_REQUESTS,
        "Rate limit policy Authenticated requests exceeded.".to_owned(),
    )
    .into_response();
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// Turns a response into one that breaks mid-body.
///
/// The head promises the full `Content-Length`, but the body sends only the first few bytes (the
/// start of `{"Id":"apikeys-...`, never far enough to reach the secret) and ends. hyper then
/// aborts the connection, so the client sees a transport error after, or instead of, the headers.
/// The body is wrapped in `TimeoutBody` only to hide its size from hyper, which would otherwise
/// trust the body's exact size over our header.
pub(crate) async fn lose_response(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let full = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let declared = full.len().max(1);
    let sent = full.slice(..full.len().saturating_sub(1).min(12));
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(declared));
    let body = tower_http::timeout::TimeoutBody::new(Duration::from_secs(86_400), Body::from(sent));
    Response::from_parts(parts, Body::new(body))
}

mod method_serde {
    use super::*;

    pub(super) fn serialize<S: Serializer>(method: &Option<Method>, s: S) -> Result<S::Ok, S::Error> {
        method.as_ref().map(Method::as_str).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Method>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) if text.trim() == "*" || text.trim().is_empty() => Ok(None),
            Some(text) => Method::from_bytes(text.trim().to_ascii_uppercase().as_bytes())
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("'{text}' is not an HTTP method"))),
        }
    }
}

mod millis {
    use super::*;

    pub(super) fn serialize<S: Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_with_a_chance_share_one_roll_and_never_overlap() {
        let route = "/api/users/{id}/apikeys";
        let mut faults = vec![
            ActiveFault::new(
                Fault::on(Method::POST, route, FaultKind::Latency(Duration::from_millis(1))).per_mille(100),
            ),
            ActiveFault::new(Fault::on(Method::POST, route, FaultKind::LoseResponseAfterCreate).per_mille(50)),
            ActiveFault::new(
                Fault::on(Method::POST, route, FaultKind::RateLimited { retry_after_secs: 1 }).per_mille(50),
            ),
        ];
        let (mut slow, mut lost, mut limited, mut none) = (0, 0, 0, 0);
        for _ in 0..20_000 {
            match take_fault(&mut faults, &Method::POST, route) {
                Some(FaultKind::Latency(_)) => slow += 1,
                Some(FaultKind::LoseResponseAfterCreate) => lost += 1,
                Some(FaultKind::RateLimited { .. }) => limited += 1,
                None => none += 1,
                Some(other) => panic!("{other:?}"),
            }
        }
        // 10 %, 5 %, 5 % and 80 %, within a few standard deviations.
        assert!((1700..2300).contains(&slow), "{slow}");
        assert!((800..1200).contains(&lost) && (800..1200).contains(&limited), "{lost} {limited}");
        assert!((15_400..16_600).contains(&none), "{none}");
    }

    #[test]
    fn faults_match_by_method_and_route_and_run_out() {
        let mut faults = vec![ActiveFault::new(
            Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::RateLimited { retry_after_secs: 1 }).times(2),
        )];
        assert!(take_fault(&mut faults, &Method::GET, "/api/users/{id}/apikeys").is_none());
        assert!(take_fault(&mut faults, &Method::POST, "/api/users").is_none());
        assert!(take_fault(&mut faults, &Method::POST, "/api/users/{id}/apikeys").is_some());
        assert!(take_fault(&mut faults, &Method::POST, "/api/users/{id}/apikeys").is_some());
        assert!(take_fault(&mut faults, &Method::POST, "/api/users/{id}/apikeys").is_none());
        assert!(faults.is_empty());
    }

    #[test]
    fn routes_may_carry_their_method_and_star_matches_all() {
        let with_method = Fault {
            method: None,
            route: "DELETE /api/users/{id}/apikeys/{keyId}".to_owned(),
            kind: FaultKind::LoseResponseAfterCreate,
            times: None,
            per_mille: None,
        };
        assert!(with_method.matches(&Method::DELETE, "/api/users/{id}/apikeys/{keyId}"));
        assert!(!with_method.matches(&Method::GET, "/api/users/{id}/apikeys/{keyId}"));
        let star = Fault { route: "*".to_owned(), ..with_method };
        assert!(star.matches(&Method::GET, "/api/users"));
    }

    #[test]
    fn faults_round_trip_through_json() {
        let fault: Fault = serde_json::from_str(
            r#"{"method":"post","route":"/api/users/{id}/apikeys","kind":{"Latency":250},"times":3}"#,
        )
        .unwrap();
        assert_eq!(fault.method, Some(Method::POST));
        assert_eq!(fault.kind, FaultKind::Latency(Duration::from_millis(250)));
        let again: Fault = serde_json::from_str(&serde_json::to_string(&fault).unwrap()).unwrap();
        assert_eq!(again, fault);
        let lose: Fault = serde_json::from_str(r#"{"route":"*","kind":"LoseResponseAfterCreate"}"#).unwrap();
        assert_eq!(lose.kind, FaultKind::LoseResponseAfterCreate);
        assert!(serde_json::from_str::<Fault>(r#"{"route":"*","kind":"Nope"}"#).is_err());
    }
}
