//! Prometheus metrics, in a registry per app (no process-wide recorder, so tests can run several
//! apps in one process). Labels never carry secrets, tokens or caller-chosen free text: routes are
//! templates and unknown scope names are folded into `unknown`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuanceLabels {
    pub scope: String,
    /// `issued`, `replayed`, `denied`, `invalid`, `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OctopusLabels {
    pub operation: String,
    /// `ok`, `rejected`, `not_found`, `credential`, `rate_limited`, `timeout`, `unavailable`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<RouteLabels>,
    pub issuances: Family<IssuanceLabels, Counter>,
    pub octopus_calls: Family<OctopusLabels, Counter>,
    pub octopus_duration: HistogramFamily<OperationLabels>,
    pub active_keys: Family<ScopeLabels, Gauge>,
    pub audit_append_failures: Counter,
    pub reconciled: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("keybroker");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration: HistogramFamily<RouteLabels> = Family::new_with_constructor(latency_histogram);
        let issuances = Family::<IssuanceLabels, Counter>::default();
        let octopus_calls = Family::<OctopusLabels, Counter>::default();
        let octopus_duration: HistogramFamily<OperationLabels> = Family::new_with_constructor(latency_histogram);
        let active_keys = Family::<ScopeLabels, Gauge>::default();
        let audit_append_failures = Counter::default();
        let reconciled = Counter::default();
        registry.register("http_requests", "HTTP requests by method, route and status", http_requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by route", http_duration.clone());
        registry.register("issuances", "Issuance requests by scope and outcome", issuances.clone());
        registry.register("octopus_calls", "Octopus API calls by operation and outcome", octopus_calls.clone());
        registry.register(
            "octopus_call_duration_seconds",
            "Octopus API call latency by operation",
            octopus_duration.clone(),
        );
        registry.register("active_keys", "Active, unexpired keys by scope (at scrape time)", active_keys.clone());
        registry.register(
            "audit_append_failures",
            "Audit events that could not be written (the action was refused)",
            audit_append_failures.clone(),
        );
        registry.register(
            "reconciled_records",
            "Pending records finished as failed by the reconciler",
            reconciled.clone(),
        );
        Arc::new(Self {
            registry,
            http_requests,
            http_duration,
            issuances,
            octopus_calls,
            octopus_duration,
            active_keys,
            audit_append_failures,
            reconciled,
        })
    }

    pub fn observe_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = RouteLabels { method: method.to_owned(), route: route.to_owned() };
        self.http_requests
            .get_or_create(&HttpLabels { method: labels.method.clone(), route: labels.route.clone(), status })
            .inc();
        self.http_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    pub fn observe_octopus(&self, operation: &str, outcome: &str, elapsed: Duration) {
        self.octopus_calls
            .get_or_create(&OctopusLabels { operation: operation.to_owned(), outcome: outcome.to_owned() })
            .inc();
        self.octopus_duration
            .get_or_create(&OperationLabels { operation: operation.to_owned() })
            .observe(elapsed.as_secs_f64());
    }

    pub fn issuance(&self, scope: &str, outcome: &str) {
        self.issuances.get_or_create(&IssuanceLabels { scope: scope.to_owned(), outcome: outcome.to_owned() }).inc();
    }

    /// Replaces the active-key gauges with fresh counts.
    pub fn set_active_keys(&self, counts: &[(String, u64)]) {
        self.active_keys.clear();
        for (scope, count) in counts {
            self.active_keys
                .get_or_create(&ScopeLabels { scope: scope.clone() })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
