//! Denials (failed authentications, role refusals, refused ticket operations), written to the
//! audit trail without letting anyone on the network fill it: a request with no credential at all is only counted (a metric), and repeated failed
//! authentications from one address for one reason, or repeated role refusals of one caller,
//! become one event per minute with a count (whatever routes they hit: the event names the first,
//! a summary the last).
//!
//! The first denial of a kind is audited at once, with `count: 1`. Those that follow within the
//! minute are counted; when the minute is over (at the next denial of that kind, or at the
//! periodic [`DenialAudit::flush`]), one event records how many there were, with `repeated: true`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::domain::audit::{Action, NewAuditEvent, Outcome, RequestContext};

/// One event per kind of denial per this long.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Kinds tracked at once; beyond it new kinds share one bucket per action and reason, so that
/// a spread of addresses cannot grow memory without bound.
const MAX_KINDS: usize = 10_000;

/// First events written per minute across all kinds; past it, new kinds share the overflow
/// bucket too, so that an attacker with many addresses (an IPv6 /48 holds 65,536 /64s) cannot
/// write thousands of rows a minute.
const MAX_FIRST_EVENTS_PER_WINDOW: u32 = 600;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kind {
    action: Action,
    /// The address bucket (auth.denied) or the subject (authz.denied); `*` on overflow.
    who: String,
    reason: String,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    suppressed: u64,
    /// The latest denial's request, its route included (a summary names the last one).
    context: RequestContext,
}

/// A denial to audit.
#[derive(Debug, Clone)]
pub struct Denial {
    pub action: Action,
    /// `anonymous` for failed authentications, the subject for role refusals.
    pub actor: String,
    /// The address bucket or the subject: what makes two denials "the same".
    pub who: String,
    pub reason: String,
    /// Its request; `context.route` names its route.
    pub context: RequestContext,
}

impl Denial {
    /// An authenticated caller refused for its role or for someone else's resource
    /// (`authz.denied`), aggregated per caller and reason (the event names the route).
    pub fn role(principal: &crate::domain::principal::Principal, reason: &str, context: RequestContext) -> Self {
        Self {
            action: Action::AuthzDenied,
            actor: principal.subject.clone(),
            who: principal.subject.clone(),
            reason: reason.to_owned(),
            context,
        }
    }
}

#[derive(Debug, Default)]
pub struct Denials {
    windows: Mutex<Windows>,
}

#[derive(Debug, Default)]
struct Windows {
    kinds: HashMap<Kind, Window>,
    /// First events written in the current minute, and when it began.
    written: u32,
    written_since: Option<Instant>,
}

/// Who an aggregated event names: `anonymous` for failed authentications, the caller for role
/// refusals, `*` for the overflow bucket of many callers.
fn actor_of(kind: &Kind) -> &str {
    if kind.action == Action::AuthDenied { "anonymous" } else { kind.who.as_str() }
}

impl Denials {
    /// The events to append for `denial` at `now`: none while its kind is within its minute,
    /// otherwise this denial's event (after the summary of the previous minute, if one is due).
    pub fn record(&self, denial: Denial, now: Instant, at: chrono::DateTime<chrono::Utc>) -> Vec<NewAuditEvent> {
        let Ok(mut guard) = self.windows.lock() else { return Vec::new() };
        let windows = &mut *guard;
        if windows.written_since.is_none_or(|since| now.duration_since(since) >= WINDOW) {
            windows.written = 0;
            windows.written_since = Some(now);
        }
        let mut kind = Kind { action: denial.action, who: denial.who.clone(), reason: denial.reason.clone() };
        let crowded = windows.kinds.len() >= MAX_KINDS || windows.written >= MAX_FIRST_EVENTS_PER_WINDOW;
        if crowded && !windows.kinds.contains_key(&kind) {
            kind.who = "*".to_owned();
        }
        let mut out = Vec::new();
        match windows.kinds.get_mut(&kind) {
            Some(window) if now.duration_since(window.started) < WINDOW => {
                window.suppressed += 1;
                window.context = denial.context;
                return out;
            }
            Some(window) => {
                if window.suppressed > 0 {
                    out.push(summary(&kind, window, at));
                }
                *window = Window { started: now, suppressed: 0, context: denial.context.clone() };
            }
            None => {
                windows
                    .kinds
                    .insert(kind.clone(), Window { started: now, suppressed: 0, context: denial.context.clone() });
            }
        }
        windows.written += 1;
        let actor = if kind.who == "*" { actor_of(&kind).to_owned() } else { denial.actor };
        out.push(event(&actor, &kind, &denial.context, 1, false, at));
        out
    }

    /// Summaries of every minute that is over, for the periodic flush; forgets those kinds.
    pub fn flush(&self, now: Instant, at: chrono::DateTime<chrono::Utc>) -> Vec<NewAuditEvent> {
        let Ok(mut windows) = self.windows.lock() else { return Vec::new() };
        let mut out = Vec::new();
        windows.kinds.retain(|kind, window| {
            if now.duration_since(window.started) < WINDOW {
                return true;
            }
            if window.suppressed > 0 {
                out.push(summary(kind, window, at));
            }
            false
        });
        out
    }
}

fn summary(kind: &Kind, window: &Window, at: chrono::DateTime<chrono::Utc>) -> NewAuditEvent {
    event(actor_of(kind), kind, &window.context, window.suppressed, true, at)
}

fn event(
    actor: &str,
    kind: &Kind,
    context: &RequestContext,
    count: u64,
    repeated: bool,
    at: chrono::DateTime<chrono::Utc>,
) -> NewAuditEvent {
    let mut detail = json!({ "reason": kind.reason, "route": context.route, "count": count });
    if repeated {
        detail["repeated"] = json!(true);
        detail["window_seconds"] = json!(WINDOW.as_secs());
    }
    NewAuditEvent::new(at, actor, kind.action, Outcome::Denied, context).detail(detail)
}

/// The bucket an address is limited and aggregated by: IPv4 addresses as they are, IPv6 by
/// their /64 (one host usually holds a whole /64), IPv4-mapped IPv6 as IPv4.
pub fn address_bucket(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The denials of one process, audited through the key service: the aggregator and its writes.
pub struct DenialAudit {
    denials: Denials,
    keys: std::sync::Arc<crate::services::issuance::KeyService>,
}

impl DenialAudit {
    pub fn new(keys: std::sync::Arc<crate::services::issuance::KeyService>) -> Self {
        Self { denials: Denials::default(), keys }
    }

    /// Audits a denial, unless one of its kind was written within the minute. A denial that
    /// cannot be audited is logged here: the refusal itself stands.
    pub async fn record(&self, denial: Denial) {
        let events = self.denials.record(denial, Instant::now(), self.keys.now());
        if events.is_empty() {
            self.keys.metrics().denials_aggregated.inc();
        }
        self.write(events, "could not audit a denial").await;
    }

    /// Writes the summaries of denial minutes that are over (run every [`WINDOW`]).
    pub async fn flush(&self) {
        let events = self.denials.flush(Instant::now(), self.keys.now());
        self.write(events, "could not audit repeated denials").await;
    }

    async fn write(&self, events: Vec<NewAuditEvent>, failure: &str) {
        for event in events {
            if let Err(e) = self.keys.audit(event).await {
                tracing::error!(error = %e, "{failure}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(who: &str, reason: &str) -> Denial {
        Denial {
            action: Action::AuthDenied,
            actor: "anonymous".to_owned(),
            who: who.to_owned(),
            reason: reason.to_owned(),
            context: RequestContext { route: Some("/v1/keys".to_owned()), ..Default::default() },
        }
    }

    #[test]
    fn a_flood_from_one_address_for_one_reason_is_one_event_per_minute_with_a_count() {
        let denials = Denials::default();
        let start = Instant::now();
        let at = chrono::Utc::now();
        let first = denials.record(denial("10.0.0.1", "expired"), start, at);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].detail["count"], 1);
        for i in 1..=99 {
            let later = start + Duration::from_millis(i * 100);
            assert!(denials.record(denial("10.0.0.1", "expired"), later, at).is_empty());
        }
        // Another reason or address is another kind.
        assert_eq!(denials.record(denial("10.0.0.1", "bad signature"), start, at).len(), 1);
        assert_eq!(denials.record(denial("10.0.0.2", "expired"), start, at).len(), 1);
        // The minute is over: the next denial brings the summary of the 99 and its own event.
        let next = denials.record(denial("10.0.0.1", "expired"), start + WINDOW, at);
        assert_eq!(next.len(), 2);
        assert_eq!(next[0].detail["count"], 99);
        assert_eq!(next[0].detail["repeated"], true);
        assert_eq!(next[1].detail["count"], 1);
    }

    #[test]
    fn the_flush_writes_what_a_quiet_minute_left_behind() {
        let denials = Denials::default();
        let start = Instant::now();
        let at = chrono::Utc::now();
        denials.record(denial("10.0.0.1", "expired"), start, at);
        denials.record(denial("10.0.0.1", "expired"), start, at);
        denials.record(denial("10.0.0.3", "expired"), start, at);
        assert!(denials.flush(start + Duration::from_secs(1), at).is_empty(), "the minute is not over");
        let flushed = denials.flush(start + WINDOW, at);
        assert_eq!(flushed.len(), 1, "only kinds with suppressed denials: {flushed:?}");
        assert_eq!(flushed[0].detail["count"], 1);
        assert!(denials.flush(start + WINDOW * 2, at).is_empty());
    }

    #[test]
    fn past_the_per_minute_budget_new_kinds_share_one_overflow_event() {
        let denials = Denials::default();
        let start = Instant::now();
        let at = chrono::Utc::now();
        let mut written = 0;
        for i in 0..(MAX_FIRST_EVENTS_PER_WINDOW + 500) {
            let events = denials.record(denial(&format!("2001:db8:{i:x}::"), "expired"), start, at);
            written += events.len();
        }
        assert_eq!(written, MAX_FIRST_EVENTS_PER_WINDOW as usize + 1, "the budget, then one overflow event");
        let flushed = denials.flush(start + WINDOW, at);
        let overflow: Vec<_> = flushed.iter().filter(|e| e.detail["count"] == 499).collect();
        assert_eq!(overflow.len(), 1, "{flushed:?}");
        assert_eq!(overflow[0].actor, "anonymous");
    }

    #[test]
    fn ipv6_addresses_share_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_bucket(a), address_bucket(b));
        assert_ne!(address_bucket(a), address_bucket(c));
        assert_eq!(address_bucket("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(address_bucket("10.1.2.3".parse().unwrap()), "10.1.2.3".parse::<IpAddr>().unwrap());
    }
}
