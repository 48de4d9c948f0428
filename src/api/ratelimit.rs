//! Per-principal rate limits, and per-address limits for requests that fail authentication (so
//! a flood of bad tokens cannot fill the audit trail). Over the limit: 429 with `Retry-After`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub struct RateLimits {
    principals: Option<DefaultKeyedRateLimiter<String>>,
    addresses: Option<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").field("enabled", &self.principals.is_some()).finish()
    }
}

impl RateLimits {
    /// `per_minute` requests a minute, in bursts of up to that many; 0 turns limits off.
    pub fn new(per_minute: u32) -> Self {
        let quota = NonZeroU32::new(per_minute).map(Quota::per_minute);
        Self {
            principals: quota.map(RateLimiter::keyed),
            addresses: quota.map(RateLimiter::keyed),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(wait)` when this principal is over its limit.
    pub fn check_principal(&self, subject: &str) -> Result<(), Duration> {
        match &self.principals {
            Some(limiter) => limiter.check_key(&subject.to_owned()).map_err(|n| n.wait_time_from(self.clock.now())),
            None => Ok(()),
        }
    }

    /// `Err(wait)` when this address has failed authentication too often.
    pub fn check_address(&self, addr: IpAddr) -> Result<(), Duration> {
        match &self.addresses {
            Some(limiter) => limiter.check_key(&addr).map_err(|n| n.wait_time_from(self.clock.now())),
            None => Ok(()),
        }
    }

    /// Forgets keys whose limit has fully recovered (run now and then to bound memory).
    pub fn forget_idle(&self) {
        if let Some(l) = &self.principals {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.addresses {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_principal_has_its_own_budget() {
        let limits = RateLimits::new(3);
        for _ in 0..3 {
            assert!(limits.check_principal("alice").is_ok());
        }
        let wait = limits.check_principal("alice").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(20), "{wait:?}");
        assert!(limits.check_principal("bob").is_ok());
    }

    #[test]
    fn zero_turns_limits_off() {
        let limits = RateLimits::new(0);
        for _ in 0..10_000 {
            assert!(limits.check_principal("alice").is_ok());
        }
    }
}
