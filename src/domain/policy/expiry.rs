//! Expiry arithmetic: what `expires_at` an issuance gets, or why it is refused.

use chrono::{DateTime, Duration, DurationRound, Utc};

use super::{PolicyError, Scope};

/// What the caller asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryRequest {
    /// Neither `expires_at` nor `ttl`: the scope's default lifetime.
    Default,
    At(DateTime<Utc>),
    Ttl(Duration),
}

/// Limits Octopus itself enforces on a new key (octopus-api.md §5.2): not beyond the server's
/// maximum lifetime and not beyond the expiry of the key that creates it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamLimits {
    /// `ApiKeyMaxExpiryDays` from `/api/authentication`; `None` on servers before 2025.4.
    pub server_max_days: Option<u32>,
    /// The broker credential's own `Expires`, when known.
    pub broker_key_expires: Option<DateTime<Utc>>,
    /// Set when the broker credential was not found among this many keys of its user, so its
    /// expiry is unknown (reported by readiness rather than silently ignored).
    pub broker_key_missing_among: Option<usize>,
}

/// Why a default lifetime was shortened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryClamp {
    OctopusServerMaximum,
    BrokerCredentialExpiry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryDecision {
    pub expires_at: DateTime<Utc>,
    /// Set when the scope's default lifetime was shortened to fit Octopus's limits.
    pub clamped: Option<ExpiryClamp>,
}

/// The shortest lifetime worth issuing; anything shorter is almost surely a mistake.
const MIN_LIFETIME: Duration = Duration::minutes(1);

/// Octopus measures its maximum from its own clock, which may run a little behind ours.
const SERVER_MAX_SAFETY: Duration = Duration::minutes(5);

/// Decides the expiry of a new key. Times are truncated to whole seconds so that the record,
/// the Octopus key and every response carry the same instant.
pub fn resolve_expiry(
    request: ExpiryRequest,
    scope: &Scope,
    now: DateTime<Utc>,
    upstream: UpstreamLimits,
) -> Result<ExpiryDecision, PolicyError> {
    let wanted = match request {
        ExpiryRequest::Default => now + scope.default_ttl,
        ExpiryRequest::At(at) => at,
        ExpiryRequest::Ttl(ttl) => now.checked_add_signed(ttl).ok_or_else(|| too_far(scope))?,
    };
    let wanted = wanted.duration_trunc(Duration::seconds(1)).unwrap_or(wanted);

    if wanted < now + MIN_LIFETIME {
        return Err(PolicyError::InvalidExpiry(if wanted <= now {
            "the requested expiry is in the past".to_owned()
        } else {
            "the requested expiry is less than one minute away".to_owned()
        }));
    }
    if wanted > now + scope.max_ttl {
        return Err(too_far(scope));
    }

    let mut caps: Vec<(DateTime<Utc>, ExpiryClamp)> = Vec::new();
    if let Some(days) = upstream.server_max_days {
        // Octopus chose this number; an absurd one must not overflow.
        if let Some(cap) =
            Duration::try_days(i64::from(days)).and_then(|d| now.checked_add_signed(d - SERVER_MAX_SAFETY))
        {
            caps.push((cap, ExpiryClamp::OctopusServerMaximum));
        }
    }
    if let Some(broker) = upstream.broker_key_expires {
        caps.push((broker, ExpiryClamp::BrokerCredentialExpiry));
    }
    let Some((cap, reason)) = caps.into_iter().min_by_key(|(at, _)| *at) else {
        return Ok(ExpiryDecision { expires_at: wanted, clamped: None });
    };
    if wanted <= cap {
        return Ok(ExpiryDecision { expires_at: wanted, clamped: None });
    }
    let cap = cap.duration_trunc(Duration::seconds(1)).unwrap_or(cap);
    let explain = match reason {
        ExpiryClamp::OctopusServerMaximum => {
            format!("Octopus allows API keys to live at most {} days", upstream.server_max_days.unwrap_or_default())
        }
        ExpiryClamp::BrokerCredentialExpiry => {
            format!("keybroker's own Octopus credential expires at {}", cap.to_rfc3339())
        }
    };
    if request != ExpiryRequest::Default {
        return Err(PolicyError::InvalidExpiry(format!(
            "the requested expiry is too late: {explain}; ask for {} or earlier",
            cap.to_rfc3339()
        )));
    }
    if cap < now + MIN_LIFETIME {
        return Err(PolicyError::InvalidExpiry(format!("no key can be issued now: {explain}")));
    }
    Ok(ExpiryDecision { expires_at: cap, clamped: Some(reason) })
}

fn too_far(scope: &Scope) -> PolicyError {
    PolicyError::InvalidExpiry(format!(
        "the requested expiry is beyond scope `{}`'s maximum lifetime of {}",
        scope.name,
        humantime::format_duration(scope.max_ttl.to_std().unwrap_or_default())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::policy::ScopeName;

    fn scope() -> Scope {
        Scope {
            name: ScopeName::parse("payments-deploy").unwrap(),
            description: String::new(),
            octopus_user: "svc".to_owned(),
            teams: ["payments".to_owned()].into(),
            default_ttl: Duration::days(7),
            max_ttl: Duration::days(30),
            max_active_keys_per_requester: 3,
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00.750Z").unwrap().with_timezone(&Utc)
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn no_request_gets_the_scope_default_truncated_to_seconds() {
        let d = resolve_expiry(ExpiryRequest::Default, &scope(), now(), UpstreamLimits::default()).unwrap();
        assert_eq!(d.expires_at, at("2026-11-30T10:00:00Z"));
        assert_eq!(d.clamped, None);
    }

    #[test]
    fn a_ttl_is_added_to_now() {
        let d = resolve_expiry(ExpiryRequest::Ttl(Duration::hours(12)), &scope(), now(), UpstreamLimits::default())
            .unwrap();
        assert_eq!(d.expires_at, at("2026-11-23T22:00:00Z"));
    }

    #[test]
    fn an_explicit_time_is_kept() {
        let d =
            resolve_expiry(ExpiryRequest::At(at("2026-12-01T08:30:00Z")), &scope(), now(), UpstreamLimits::default())
                .unwrap();
        assert_eq!(d.expires_at, at("2026-12-01T08:30:00Z"));
    }

    #[test]
    fn an_expiry_in_the_past_is_refused() {
        let err =
            resolve_expiry(ExpiryRequest::At(at("2026-11-22T00:00:00Z")), &scope(), now(), UpstreamLimits::default())
                .unwrap_err();
        assert!(matches!(err, PolicyError::InvalidExpiry(m) if m.contains("past")));
    }

    #[test]
    fn an_expiry_under_a_minute_away_is_refused() {
        let err = resolve_expiry(ExpiryRequest::Ttl(Duration::seconds(30)), &scope(), now(), UpstreamLimits::default())
            .unwrap_err();
        assert!(matches!(err, PolicyError::InvalidExpiry(_)));
    }

    #[test]
    fn issuing_beyond_max_ttl_is_refused() {
        let err = resolve_expiry(ExpiryRequest::Ttl(Duration::days(31)), &scope(), now(), UpstreamLimits::default())
            .unwrap_err();
        assert!(matches!(err, PolicyError::InvalidExpiry(m) if m.contains("maximum lifetime")));
        // Exactly the maximum is allowed.
        assert!(
            resolve_expiry(ExpiryRequest::Ttl(Duration::days(30)), &scope(), now(), UpstreamLimits::default()).is_ok()
        );
    }

    #[test]
    fn an_absurd_ttl_does_not_overflow() {
        let err = resolve_expiry(ExpiryRequest::Ttl(Duration::MAX), &scope(), now(), UpstreamLimits::default());
        assert!(err.is_err());
    }

    #[test]
    fn an_explicit_expiry_beyond_the_broker_credential_is_refused() {
        let limits = UpstreamLimits {
            server_max_days: None,
            broker_key_expires: Some(at("2026-11-25T00:00:00Z")),
            ..Default::default()
        };
        let err = resolve_expiry(ExpiryRequest::Ttl(Duration::days(3)), &scope(), now(), limits).unwrap_err();
        assert!(matches!(err, PolicyError::InvalidExpiry(m) if m.contains("own Octopus credential")));
    }

    #[test]
    fn the_default_is_clamped_to_the_broker_credential() {
        let limits = UpstreamLimits {
            server_max_days: Some(366),
            broker_key_expires: Some(at("2026-11-25T00:00:00Z")),
            ..Default::default()
        };
        let d = resolve_expiry(ExpiryRequest::Default, &scope(), now(), limits).unwrap();
        assert_eq!(d.expires_at, at("2026-11-25T00:00:00Z"));
        assert_eq!(d.clamped, Some(ExpiryClamp::BrokerCredentialExpiry));
    }

    #[test]
    fn the_server_maximum_applies_with_a_safety_margin() {
        let limits = UpstreamLimits { server_max_days: Some(5), broker_key_expires: None, ..Default::default() };
        let err = resolve_expiry(ExpiryRequest::Ttl(Duration::days(5)), &scope(), now(), limits).unwrap_err();
        assert!(matches!(err, PolicyError::InvalidExpiry(m) if m.contains("5 days")));
        let d = resolve_expiry(ExpiryRequest::Default, &scope(), now(), limits).unwrap();
        assert_eq!(d.clamped, Some(ExpiryClamp::OctopusServerMaximum));
        assert!(d.expires_at <= now() + Duration::days(5) - SERVER_MAX_SAFETY);
        assert_eq!(d.expires_at.timestamp_subsec_nanos(), 0);
    }

    #[test]
    fn a_broker_credential_about_to_expire_refuses_everything() {
        let limits = UpstreamLimits {
            server_max_days: None,
            broker_key_expires: Some(now() + Duration::seconds(20)),
            ..Default::default()
        };
        assert!(resolve_expiry(ExpiryRequest::Default, &scope(), now(), limits).is_err());
    }
}
