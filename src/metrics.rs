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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub event: String,
    /// `delivered`, `retry`, `gave_up`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobOutcomeLabels {
    pub job: String,
    /// `ok`, `error`, `skipped` (another replica holds the lease).
    pub outcome: String,
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
    pub webhook_deliveries: Family<WebhookLabels, Counter>,
    pub job_runs: Family<JobOutcomeLabels, Counter>,
    pub job_last_run: Family<JobLabels, Gauge>,
    pub job_duration_ms: Family<JobLabels, Gauge>,
    pub unmanaged_keys: Gauge,
    pub credential_expiry: Gauge,
    /// The audit trail's newest event, as last published (compare it with what the trail holds).
    pub audit_head_seq: Gauge,
    /// Requests to authenticated routes that carried no credential at all (never audited).
    pub auth_missing: Counter,
    /// Failed authentications and role refusals left out of the audit trail because an event
    /// of the same kind was written within the minute (they are summed into the next one).
    pub denials_aggregated: Counter,
    /// Octopus calls that waited for keybroker's own outbound rate limit.
    pub octopus_paced: Counter,
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
        let webhook_deliveries = Family::<WebhookLabels, Counter>::default();
        let job_runs = Family::<JobOutcomeLabels, Counter>::default();
        let job_last_run = Family::<JobLabels, Gauge>::default();
        let job_duration_ms = Family::<JobLabels, Gauge>::default();
        let unmanaged_keys = Gauge::default();
        let credential_expiry = Gauge::default();
        let audit_head_seq = Gauge::default();
        let auth_missing = Counter::default();
        let denials_aggregated = Counter::default();
        let octopus_paced = Counter::default();
        registry.register(
            "octopus_calls_paced",
            "Octopus calls that waited for octopus.max_requests_per_minute",
            octopus_paced.clone(),
        );
        registry.register(
            "auth_missing_credential",
            "Requests to authenticated routes without any credential (not audited)",
            auth_missing.clone(),
        );
        registry.register(
            "denials_aggregated",
            "Repeated denials folded into one audit event per minute",
            denials_aggregated.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by event and outcome",
            webhook_deliveries.clone(),
        );
        registry.register("job_runs", "Background job runs by job and outcome", job_runs.clone());
        registry.register("job_last_run_timestamp_seconds", "When each job last ran (Unix time)", job_last_run.clone());
        registry.register(
            "job_last_duration_milliseconds",
            "How long each job's last run took",
            job_duration_ms.clone(),
        );
        registry.register(
            "unmanaged_octopus_keys",
            "Octopus keys carrying a keybroker marker without an active record (last drift scan)",
            unmanaged_keys.clone(),
        );
        registry.register(
            "audit_head_seq",
            "The audit trail's newest event (its seq), published every audit.head_interval",
            audit_head_seq.clone(),
        );
        registry.register(
            "octopus_credential_expiry_timestamp_seconds",
            "When keybroker's own Octopus API key expires (Unix time; 0 when unknown or never)",
            credential_expiry.clone(),
        );
        registry.register("http_requests", "HTTP requests by method, route and status", http_requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by route", http_duration.clone());
        registry.register("issuances", "Issuance requests by scope and outcome", issuances.clone());
        registry.register("octopus_calls", "Octopus API calls by operation and outcome", octopus_calls.clone());
        registry.register(
            "octopus_call_duration_seconds",
            "Octopus API call latency by operation",
            octopus_duration.clone(),
        );
        registry.register(
            "active_keys",
            "Active, unexpired keys by scope (as of the last readiness job run)",
            active_keys.clone(),
        );
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
            webhook_deliveries,
            job_runs,
            job_last_run,
            job_duration_ms,
            unmanaged_keys,
            credential_expiry,
            audit_head_seq,
            auth_missing,
            denials_aggregated,
            octopus_paced,
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

    pub fn webhook(&self, event: &str, outcome: &str) {
        self.webhook_deliveries
            .get_or_create(&WebhookLabels { event: event.to_owned(), outcome: outcome.to_owned() })
            .inc();
    }

    pub fn job_ran(&self, job: &str, outcome: &str, at: chrono::DateTime<chrono::Utc>, took: Duration) {
        self.job_runs.get_or_create(&JobOutcomeLabels { job: job.to_owned(), outcome: outcome.to_owned() }).inc();
        if outcome != "skipped" {
            let labels = JobLabels { job: job.to_owned() };
            self.job_last_run.get_or_create(&labels).set(at.timestamp());
            self.job_duration_ms.get_or_create(&labels).set(i64::try_from(took.as_millis()).unwrap_or(i64::MAX));
        }
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
