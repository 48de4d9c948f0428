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
        let mut r = Registry::with_prefix("keybroker");
        // Registered in this order, which is the order `/metrics` lists them in.
        let octopus_paced =
            registered(&mut r, "octopus_calls_paced", "Octopus calls that waited for octopus.max_requests_per_minute");
        let auth_missing = registered(
            &mut r,
            "auth_missing_credential",
            "Requests to authenticated routes without any credential (not audited)",
        );
        let denials_aggregated =
            registered(&mut r, "denials_aggregated", "Repeated denials folded into one audit event per minute");
        let webhook_deliveries =
            registered(&mut r, "webhook_deliveries", "Webhook delivery attempts by event and outcome");
        let job_runs = registered(&mut r, "job_runs", "Background job runs by job and outcome");
        let job_last_run = registered(&mut r, "job_last_run_timestamp_seconds", "When each job last ran (Unix time)");
        let job_duration_ms = registered(&mut r, "job_last_duration_milliseconds", "How long each job's last run took");
        let unmanaged_keys = registered(
            &mut r,
            "unmanaged_octopus_keys",
            "Octopus keys carrying a keybroker marker without an active record (last drift scan)",
        );
        let audit_head_seq = registered(
            &mut r,
            "audit_head_seq",
            "The audit trail's newest event (its seq), published every audit.head_interval",
        );
        let credential_expiry = registered(
            &mut r,
            "octopus_credential_expiry_timestamp_seconds",
            "When keybroker's own Octopus API key expires (Unix time; 0 when unknown or never)",
        );
        let http_requests = registered(&mut r, "http_requests", "HTTP requests by method, route and status");
        let http_duration = register(
            &mut r,
            "http_request_duration_seconds",
            "HTTP request latency by route",
            Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        );
        let issuances = registered(&mut r, "issuances", "Issuance requests by scope and outcome");
        let octopus_calls = registered(&mut r, "octopus_calls", "Octopus API calls by operation and outcome");
        let octopus_duration = register(
            &mut r,
            "octopus_call_duration_seconds",
            "Octopus API call latency by operation",
            Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        );
        let active_keys =
            registered(&mut r, "active_keys", "Active, unexpired keys by scope (as of the last readiness job run)");
        let audit_append_failures = registered(
            &mut r,
            "audit_append_failures",
            "Audit events that could not be written (the action was refused)",
        );
        let reconciled =
            registered(&mut r, "reconciled_records", "Pending records finished as failed by the reconciler");
        Arc::new(Self {
            registry: r,
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

/// Registers `metric` under `name` and hands it back for the struct to keep.
fn register<M: prometheus_client::registry::Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

/// [`register`] for a metric that starts from its default.
fn registered<M: prometheus_client::registry::Metric + Clone + Default>(r: &mut Registry, name: &str, help: &str) -> M {
    register(r, name, help, M::default())
}
