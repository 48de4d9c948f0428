//! The benchmark's scenarios (issue 8), shared by `benches/broker.rs` (full counts) and
//! `tests/it/bench_smoke.rs` (tiny counts, so the benchmark cannot rot).
//!
//! Every scenario starts its own Octopus simulator and keybroker on ephemeral ports, drives them
//! with a bounded number of requests from a Rust load generator, and returns what it measured.
//! Nothing here asserts a timing: the caller decides what to do with the figures.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keybroker::config::{ConfigFile, RawJobs};
use keybroker::store::Store;
use keybroker_testkit::{TestApp, TestOptions};
use octopus_sim::{DEMO_BROKER_API_KEY, Seed, Simulator};
use serde_json::{Value, json};

pub const JWT_SECRET: &str = "bench-jwt-secret-0123456789abcdef0123456789abcdef";
pub const HMAC_SECRET: &str = "bench-hmac-secret-0123456789abcdef0123456789abcdef";
const SCOPE: &str = "payments-deploy";
const SCOPE_ACCOUNT: &str = "svc-payments-deploy";

/// How much work each scenario does.
#[derive(Debug, Clone)]
pub struct Counts {
    /// Issuances (and as many direct creations) with one caller.
    pub issue_serial: usize,
    /// Issuances (and as many direct creations) with `callers` callers.
    pub issue_parallel: usize,
    /// Concurrent callers of the parallel runs.
    pub callers: usize,
    /// Key records seeded before the read scenario.
    pub key_records: usize,
    /// Requests per read endpoint.
    pub reads: usize,
    /// Audit events seeded before the audit scenario.
    pub audit_events: usize,
    /// Audit queries (first and second pages).
    pub audit_queries: usize,
    /// Generated Octopus users for the first-issuance scenario.
    pub extra_users: usize,
}

impl Counts {
    /// The figures issue 8 asks for.
    pub fn full() -> Self {
        Self {
            issue_serial: 500,
            issue_parallel: 3_000,
            callers: 32,
            key_records: 10_000,
            reads: 20_000,
            audit_events: 1_000_000,
            audit_queries: 3_000,
            extra_users: 100_000,
        }
    }

    /// Enough to run every code path once or twice.
    pub fn tiny() -> Self {
        Self {
            issue_serial: 3,
            issue_parallel: 8,
            callers: 4,
            key_records: 20,
            reads: 8,
            audit_events: 50,
            audit_queries: 4,
            extra_users: 50,
        }
    }
}

/// Whether the scenario `name` (`issue`, `reads`, `audit`, `first`, `memory`) should run:
/// `KEYBROKER_BENCH_ONLY` is a comma-separated list of them (all when unset), for profiling one.
pub fn wanted(name: &str) -> bool {
    match std::env::var("KEYBROKER_BENCH_ONLY") {
        Ok(only) => only.split(',').any(|s| s.trim() == name),
        Err(_) => true,
    }
}

/// Which store the in-process keybroker uses.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    /// A server URL; each run gets a schema of its own, dropped afterwards.
    Postgres(String),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres(_) => "PostgreSQL",
        }
    }
}

/// Latencies of one bounded run.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub requests: usize,
    pub callers: usize,
    pub elapsed: Duration,
    /// Sorted, in microseconds.
    pub latencies_us: Vec<u64>,
}

impl Stats {
    pub fn per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        keybroker_testkit::load::quantile_ms(&self.latencies_us, q)
    }

    pub fn p50(&self) -> f64 {
        self.quantile_ms(0.50)
    }

    pub fn p99(&self) -> f64 {
        self.quantile_ms(0.99)
    }
}

/// Runs `total` calls of `call(i)` from `callers` concurrent tasks and records each latency.
/// Any failed call fails the run: a benchmark of errors measures nothing.
pub async fn load<F, Fut>(callers: usize, total: usize, call: F) -> anyhow::Result<Stats>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers.max(1) {
        let call = call.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                call(i).await?;
                latencies.push(t.elapsed().as_micros() as u64);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies_us = Vec::with_capacity(total);
    for task in tasks {
        latencies_us.extend(task.await.context("a load task panicked")??);
    }
    let elapsed = started.elapsed();
    latencies_us.sort_unstable();
    Ok(Stats { requests: total, callers: callers.max(1), elapsed, latencies_us })
}

#[derive(serde::Deserialize)]
struct CursorOnly {
    next_cursor: Option<String>,
}

/// Checks a response's status and reads its body without parsing it: the load generator shares
/// the cores with the service, and parsing every 20 kB page would measure the client.
async fn expect_status(res: reqwest::Response, status: u16) -> anyhow::Result<()> {
    let got = res.status().as_u16();
    let body = res.bytes().await?;
    if got != status {
        bail!("expected {status}, got {got}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// Checks a response's status, returning its body as JSON.
async fn expect(res: reqwest::Response, status: u16) -> anyhow::Result<Value> {
    let got = res.status().as_u16();
    let body = res.bytes().await?;
    if got != status {
        bail!("expected {status}, got {got}: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
}

pub fn token(subject: &str, groups: &[&str]) -> anyhow::Result<String> {
    // Two hours: longer than the longest run.
    Ok(keybroker_testkit::token_for(subject, groups, chrono::Duration::hours(2)))
}

pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().pool_max_idle_per_host(256).tcp_nodelay(true).build()?)
}

/// The benchmark's changes to the demo configuration: limits that never stop it.
pub fn unlimited(file: &mut ConfigFile) {
    for scope in &mut file.scopes {
        scope.max_active_keys_per_requester = 1_000_000;
    }
    // The load generator is a handful of principals sending thousands of requests a second.
    file.server.rate_limit_per_minute = 0;
    // keybroker's own pace towards Octopus (150 a minute by default, under Octopus's rate limit)
    // would measure the pace; the benchmark measures keybroker (BENCHMARKS.md, sizing).
    keybroker_testkit::octopus(file).max_requests_per_minute = 0;
    // The jobs at their defaults (the test kit quiets them), but for the reconciler.
    file.jobs = RawJobs { reconcile_interval: Duration::from_secs(3600).into(), ..RawJobs::default() };
}

/// Writes the demo configuration, [`unlimited`], plus its secret files, into `dir`; returns the
/// configuration's path (for a `keybroker serve` process).
pub fn write_config(dir: &Path, sim_url: &str, listen: &str) -> anyhow::Result<PathBuf> {
    keybroker_testkit::write_secret_files(dir);
    let mut file = keybroker_testkit::demo_file(sim_url, listen, &dir.join("keybroker.db"));
    unlimited(&mut file);
    Ok(keybroker_testkit::write_file(dir, &file))
}

/// A store for one run, and what must be cleaned up after it.
pub struct StoreHandle {
    pub store: Arc<dyn Store>,
    pub dir: tempfile::TempDir,
    /// `(server url, schema)` for PostgreSQL.
    pub pg: Option<(String, String)>,
}

impl StoreHandle {
    pub async fn open(backend: &Backend) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}", dir.path().join("keybroker.db").display());
                let store = keybroker::store::SqliteStore::connect(&url).await?;
                store.migrate().await?;
                Ok(Self { store: Arc::new(store), dir, pg: None })
            }
            Backend::Postgres(url) => {
                let schema = format!("kb_bench_{}", uuid::Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(url).await.context("cannot reach PostgreSQL")?;
                sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await?;
                admin.close().await;
                let store = keybroker::store::PgStore::connect_in_schema(url, Some(&schema)).await?;
                store.migrate().await?;
                Ok(Self { store: Arc::new(store), dir, pg: Some((url.clone(), schema)) })
            }
        }
    }

    /// Runs one SQL statement (bulk seeding) directly against the database, in one transaction.
    pub async fn execute(&self, sqlite_sql: &str, pg_sql: &str, n: i64) -> anyhow::Result<()> {
        match &self.pg {
            None => {
                let url = format!("sqlite://{}", self.dir.path().join("keybroker.db").display());
                let pool = sqlx::SqlitePool::connect(&url).await?;
                let mut tx = pool.begin().await?;
                sqlx::query(sqlite_sql).bind(n).execute(&mut *tx).await?;
                tx.commit().await?;
                pool.close().await;
            }
            Some((url, schema)) => {
                let pool = sqlx::PgPool::connect(url).await?;
                let mut tx = pool.begin().await?;
                sqlx::query(&format!("SET LOCAL search_path TO {schema}")).execute(&mut *tx).await?;
                sqlx::query(pg_sql).bind(n).execute(&mut *tx).await?;
                tx.commit().await?;
                // What autovacuum would do after a bulk insert. SQLite gets no ANALYZE: keybroker
                // never runs one, and statistics change how SQLite executes every query (with
                // `sqlite_stat4`, a statement whose plan used a bound value is prepared again
                // whenever that value changes).
                sqlx::query(&format!("ANALYZE {schema}.key_records")).execute(&pool).await?;
                sqlx::query(&format!("ANALYZE {schema}.audit_events")).execute(&pool).await?;
                pool.close().await;
            }
        }
        Ok(())
    }

    /// Drops the PostgreSQL schema (SQLite's folder goes with `dir`).
    pub async fn cleanup(self) -> anyhow::Result<()> {
        self.store.close().await;
        if let Some((url, schema)) = &self.pg {
            let pool = sqlx::PgPool::connect(url).await?;
            sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&pool).await?;
            pool.close().await;
        }
        Ok(())
    }
}

/// A simulator and an in-process keybroker on ephemeral ports (the test kit's), with the
/// benchmark's limits, on `store`.
pub struct Rig {
    pub sim: Simulator,
    pub sim_url: String,
    pub url: String,
    pub http: reqwest::Client,
    app: TestApp,
}

impl Rig {
    pub async fn start(seed: Seed, store: &StoreHandle) -> anyhow::Result<Self> {
        let app = TestApp::spawn_with(TestOptions {
            seed,
            configure: Box::new(unlimited),
            store: Some(store.store.clone()),
            clock: None,
        })
        .await;
        Ok(Self { sim: app.sim.clone(), sim_url: app.sim_url.clone(), url: app.url.clone(), http: http_client()?, app })
    }

    pub async fn stop(self) {
        self.app.stop().await;
    }
}

/// Issues keys through keybroker: caller `i % callers` is `bench-<n>@example.com`.
pub async fn issue_through_broker(
    http: &reqwest::Client,
    url: &str,
    callers: usize,
    total: usize,
) -> anyhow::Result<Stats> {
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..callers.max(1))
            .map(|c| token(&format!("bench-{c}@example.com"), &["payments"]))
            .collect::<anyhow::Result<_>>()?,
    );
    let http = http.clone();
    let endpoint = format!("{url}/v1/keys");
    load(callers, total, move |i| {
        let http = http.clone();
        let endpoint = endpoint.clone();
        let token = tokens[i % tokens.len()].clone();
        async move {
            let res = http
                .post(endpoint)
                .bearer_auth(token)
                .json(&json!({"scope": SCOPE, "purpose": "benchmark", "ttl": "1d"}))
                .send()
                .await?;
            expect_status(res, 201).await
        }
    })
    .await
}

/// Creates keys directly in the simulator with the broker's credential, as keybroker does.
pub async fn issue_direct(
    http: &reqwest::Client,
    sim: &Simulator,
    sim_url: &str,
    callers: usize,
    total: usize,
) -> anyhow::Result<Stats> {
    let user_id = sim.user_id(SCOPE_ACCOUNT).context("the scope's service account is missing")?;
    issue_direct_to(http, sim_url, &user_id, callers, total).await
}

/// [`issue_direct`] to a simulator that runs elsewhere: `user_id` is the scope's account there.
pub async fn issue_direct_to(
    http: &reqwest::Client,
    sim_url: &str,
    user_id: &str,
    callers: usize,
    total: usize,
) -> anyhow::Result<Stats> {
    let endpoint = format!("{sim_url}/api/users/{user_id}/apikeys");
    let http = http.clone();
    load(callers, total, move |_| {
        let http = http.clone();
        let endpoint = endpoint.clone();
        async move {
            let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
            let res = http
                .post(endpoint)
                .header("X-Octopus-ApiKey", DEMO_BROKER_API_KEY)
                .json(&json!({"Purpose": "benchmark direct", "Expires": expires}))
                .send()
                .await?;
            expect_status(res, 200).await
        }
    })
    .await
}

/// GETs `path` with `token`, expecting 200.
pub async fn read(
    http: &reqwest::Client,
    url: &str,
    path: &str,
    token: &str,
    callers: usize,
    total: usize,
) -> anyhow::Result<Stats> {
    let http = http.clone();
    let endpoint = format!("{url}{path}");
    let token = token.to_owned();
    load(callers, total, move |_| {
        let http = http.clone();
        let endpoint = endpoint.clone();
        let token = token.clone();
        async move { expect_status(http.get(endpoint).bearer_auth(token).send().await?, 200).await }
    })
    .await
}

const SEED_KEYS_SQLITE: &str = "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?1) \
    INSERT INTO key_records (id, scope, requester, purpose, state, octopus_user_id, octopus_key_id, key_hint, \
    created_at, expires_at, revoked_at, updated_at) \
    SELECT printf('00000000-0000-4000-8000-%012d', n), 'payments-deploy', 'reader' || (n % 10) || '@example.com', \
    'seeded', 'revoked', 'Users-1', 'apikeys-seed-' || n, 'API-SEED', '2026-01-01T00:00:00.000000Z', \
    '2026-01-02T00:00:00.000000Z', '2026-01-01T01:00:00.000000Z', '2026-01-01T01:00:00.000000Z' FROM g";

const SEED_KEYS_PG: &str = "INSERT INTO key_records (id, scope, requester, purpose, state, octopus_user_id, \
    octopus_key_id, key_hint, created_at, expires_at, revoked_at, updated_at) \
    SELECT ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid, 'payments-deploy', \
    'reader' || (n % 10) || '@example.com', 'seeded', 'revoked', 'Users-1', 'apikeys-seed-' || n, 'API-SEED', \
    timestamptz '2026-01-01 00:00:00+00', timestamptz '2026-01-02 00:00:00+00', \
    timestamptz '2026-01-01 01:00:00+00', timestamptz '2026-01-01 01:00:00+00' FROM generate_series(1, $1::bigint) n";

const SEED_AUDIT_SQLITE: &str = "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?1) \
    INSERT INTO audit_events (id, occurred_at, actor, action, outcome, scope, detail, prev_hash, hash) \
    SELECT printf('00000000-0000-4000-9000-%012d', n), \
    strftime('%Y-%m-%dT%H:%M:%f', 1767225600 + n, 'unixepoch') || '000Z', 'actor' || (n % 1000) || '@example.com', \
    'key.issued', 'success', 'payments-deploy', '{}', 'seed-prev-' || n, 'seed-hash-' || n FROM g";

const SEED_AUDIT_PG: &str = "INSERT INTO audit_events (id, occurred_at, actor, action, outcome, scope, detail, \
    prev_hash, hash) \
    SELECT ('00000000-0000-4000-9000-' || lpad(n::text, 12, '0'))::uuid, \
    timestamptz '2026-01-01 00:00:00+00' + n * interval '1 second', 'actor' || (n % 1000) || '@example.com', \
    'key.issued', 'success', 'payments-deploy', '{}'::jsonb, 'seed-prev-' || n, 'seed-hash-' || n \
    FROM generate_series(1, $1::bigint) n";

/// What one backend's run measured.
#[derive(Debug, Clone, Default)]
pub struct BackendReport {
    pub backend: String,
    pub direct_serial: Stats,
    pub broker_serial: Stats,
    pub direct_parallel: Stats,
    pub broker_parallel: Stats,
    pub me: Stats,
    pub keys_list: Stats,
    pub key_records_seeded: usize,
    /// The audit query with one caller: the query's own latency, without queueing.
    pub audit_serial: Stats,
    pub audit: Stats,
    pub audit_events_seeded: usize,
    pub audit_seed_time: Duration,
    pub first_issue: FirstIssue,
}

/// The first issuance for a scope when Octopus holds many users.
#[derive(Debug, Clone, Default)]
pub struct FirstIssue {
    pub octopus_users: usize,
    /// Upstream user look-ups (`GET /api/users...`) while the app started.
    pub startup_user_requests: u64,
    /// Every upstream request of the first issuance, by route.
    pub first_requests: Vec<(String, u64)>,
    /// Upstream user look-ups of the first issuance.
    pub first_user_requests: u64,
    pub first_time: Duration,
    /// Issuances after the first, and the user look-ups they made.
    pub later_issues: usize,
    pub later_user_requests: u64,
}

fn user_requests(counters: &std::collections::BTreeMap<String, u64>) -> u64 {
    counters.iter().filter(|(k, _)| k.starts_with("GET /api/users") && !k.contains("apikeys")).map(|(_, v)| v).sum()
}

/// Every in-process scenario on one backend.
pub async fn run_backend(backend: &Backend, counts: &Counts) -> anyhow::Result<BackendReport> {
    let mut report = BackendReport { backend: backend.name().to_owned(), ..Default::default() };

    // Issuance vs. direct creation, then reads and the audit query on the same database.
    let store = StoreHandle::open(backend).await?;
    let result = async {
        let rig = Rig::start(Seed::demo(), &store).await?;
        let http = rig.http.clone();
        // Warm-up: connections, the user cache, the database's pages.
        issue_through_broker(&http, &rig.url, 2, counts.callers.min(40)).await?;
        issue_direct(&http, &rig.sim, &rig.sim_url, 2, counts.callers.min(40)).await?;
        if wanted("issue") {
            report.direct_serial = issue_direct(&http, &rig.sim, &rig.sim_url, 1, counts.issue_serial).await?;
            report.broker_serial = issue_through_broker(&http, &rig.url, 1, counts.issue_serial).await?;
            report.direct_parallel =
                issue_direct(&http, &rig.sim, &rig.sim_url, counts.callers, counts.issue_parallel).await?;
            report.broker_parallel =
                issue_through_broker(&http, &rig.url, counts.callers, counts.issue_parallel).await?;
        }

        if wanted("reads") {
            store.execute(SEED_KEYS_SQLITE, SEED_KEYS_PG, counts.key_records as i64).await?;
            report.key_records_seeded = counts.key_records;
            let reader = token("reader0@example.com", &["payments"])?;
            read(&http, &rig.url, "/v1/me", &reader, counts.callers, counts.callers).await?;
            report.me = read(&http, &rig.url, "/v1/me", &reader, counts.callers, counts.reads).await?;
            report.keys_list = read(&http, &rig.url, "/v1/keys", &reader, counts.callers, counts.reads).await?;
        }

        if wanted("audit") {
            let seeded = Instant::now();
            store.execute(SEED_AUDIT_SQLITE, SEED_AUDIT_PG, counts.audit_events as i64).await?;
            report.audit_seed_time = seeded.elapsed();
            report.audit_events_seeded = counts.audit_events;
            report.audit_serial = audit_queries(&http, &rig.url, counts, 1).await?;
            report.audit = audit_queries(&http, &rig.url, counts, counts.callers).await?;
        }
        rig.stop().await;
        anyhow::Ok(())
    }
    .await;
    store.cleanup().await?;
    result?;

    if wanted("first") {
        report.first_issue = first_issue(backend, counts).await?;
    }
    Ok(report)
}

/// `GET /v1/audit?actor=...&limit=50`, then its second page, over many actors.
async fn audit_queries(http: &reqwest::Client, url: &str, counts: &Counts, callers: usize) -> anyhow::Result<Stats> {
    let auditor = token("sam@example.com", &["security"])?;
    let http = http.clone();
    let url = url.to_owned();
    let actors = counts.audit_events.clamp(1, 1000);
    let single = Arc::new(tokio::sync::Mutex::new(Vec::<u64>::new()));
    let latencies = single.clone();
    // Each call is one actor's first page then its second page, timed separately.
    let pairs = load(callers, counts.audit_queries.div_ceil(2), move |i| {
        let http = http.clone();
        let auditor = auditor.clone();
        let base = format!("{url}/v1/audit?actor=actor{}%40example.com&limit=50", (i * 7919) % actors);
        let latencies = latencies.clone();
        async move {
            let t = Instant::now();
            let res = http.get(&base).bearer_auth(&auditor).send().await?;
            if res.status() != 200 {
                bail!("expected 200, got {}: {}", res.status(), res.text().await?);
            }
            // Only the cursor is needed: the rest of the page is skipped, not built.
            let page: CursorOnly = serde_json::from_slice(&res.bytes().await?)?;
            let first = t.elapsed().as_micros() as u64;
            let mut mine = vec![first];
            if let Some(cursor) = page.next_cursor {
                let t = Instant::now();
                expect_status(http.get(format!("{base}&cursor={cursor}")).bearer_auth(&auditor).send().await?, 200)
                    .await?;
                mine.push(t.elapsed().as_micros() as u64);
            }
            latencies.lock().await.extend(mine);
            Ok(())
        }
    })
    .await?;
    let mut latencies_us = std::mem::take(&mut *single.lock().await);
    latencies_us.sort_unstable();
    Ok(Stats { requests: latencies_us.len(), callers: pairs.callers, elapsed: pairs.elapsed, latencies_us })
}

/// The first issuance for a scope against an Octopus with `extra_users` more users, then more.
pub async fn first_issue(backend: &Backend, counts: &Counts) -> anyhow::Result<FirstIssue> {
    let store = StoreHandle::open(backend).await?;
    let result = async {
        let seed = Seed { extra_users: counts.extra_users, ..Seed::demo() };
        let rig = Rig::start(seed, &store).await?;
        let mut out = FirstIssue { octopus_users: rig.sim.users().len(), ..Default::default() };
        out.startup_user_requests = user_requests(&rig.sim.counters());
        rig.sim.reset_counters();
        let alice = token("alice@example.com", &["payments"])?;
        let body = json!({"scope": SCOPE, "purpose": "first", "ttl": "1d"});
        let t = Instant::now();
        expect(rig.http.post(format!("{}/v1/keys", rig.url)).bearer_auth(&alice).json(&body).send().await?, 201)
            .await?;
        out.first_time = t.elapsed();
        let counters = rig.sim.counters();
        out.first_user_requests = user_requests(&counters);
        out.first_requests = counters.into_iter().collect();
        rig.sim.reset_counters();
        out.later_issues = 10;
        issue_through_broker(&rig.http, &rig.url, 2, out.later_issues).await?;
        out.later_user_requests = user_requests(&rig.sim.counters());
        rig.stop().await;
        anyhow::Ok(out)
    }
    .await;
    store.cleanup().await?;
    result
}

/// `keybroker serve` as its own process (SQLite), under the parallel issuance load and reads.
#[derive(Debug, Clone, Default)]
pub struct MemoryReport {
    pub idle_rss_kb: u64,
    pub peak_rss_kb: u64,
    pub issue: Stats,
    pub direct: Stats,
    pub me: Stats,
}

fn proc_status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field} in /proc status"))?;
    Ok(line.split_whitespace().nth(1).context("malformed status line")?.parse()?)
}

pub async fn memory(bin: &str, counts: &Counts) -> anyhow::Result<MemoryReport> {
    let sim = Simulator::new(Seed::demo())?;
    let running = sim.spawn(([127, 0, 0, 1], 0).into()).await?;
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    let config = write_config(dir.path(), &running.url(), &listen)?;
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("KEYBROKER_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot start {bin}"))?;
    let pid = child.id();
    let result = async {
        let url = format!("http://{listen}");
        let http = http_client()?;
        let mut up = false;
        for _ in 0..200 {
            if http.get(format!("{url}/healthz")).send().await.is_ok_and(|r| r.status() == 200) {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !up {
            bail!("keybroker serve did not come up at {url}");
        }
        let mut out = MemoryReport { idle_rss_kb: proc_status_kb(pid, "VmRSS:")?, ..Default::default() };
        issue_through_broker(&http, &url, 2, counts.callers.min(40)).await?;
        out.direct = issue_direct(&http, &sim, &running.url(), counts.callers, counts.issue_parallel).await?;
        out.issue = issue_through_broker(&http, &url, counts.callers, counts.issue_parallel).await?;
        let reader = token("bench-0@example.com", &["payments"])?;
        out.me = read(&http, &url, "/v1/me", &reader, counts.callers, counts.reads).await?;
        out.peak_rss_kb = proc_status_kb(pid, "VmHWM:")?;
        Ok(out)
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// One target of issue 8 and whether the run met it.
#[derive(Debug, Clone)]
pub struct Check {
    pub target: String,
    pub measured: String,
    pub pass: bool,
}

fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

fn row(out: &mut String, name: &str, s: &Stats) {
    out.push_str(&format!(
        "| {name} | {} | {} | {:.0}/s | {} | {} |\n",
        s.requests,
        s.callers,
        s.per_sec(),
        ms(s.p50()),
        ms(s.p99())
    ));
}

/// The tables and the target checks, as Markdown.
pub fn render(reports: &[BackendReport], memory: Option<&MemoryReport>) -> (String, Vec<Check>) {
    let mut out = String::new();
    let mut checks = Vec::new();
    for r in reports {
        let b = &r.backend;
        let issued = r.broker_parallel.requests > 0;
        let first_ran = r.first_issue.octopus_users > 0;
        out.push_str(&format!("\n### {b}\n\n"));
        out.push_str("| scenario | requests | callers | throughput | p50 | p99 |\n|---|---:|---:|---:|---:|---:|\n");
        let audit_name = format!("GET /v1/audit?actor=..&limit=50 ({} events)", r.audit_events_seeded);
        for (name, s) in [
            ("direct create (simulator)", &r.direct_serial),
            ("issuance via keybroker", &r.broker_serial),
            ("direct create (simulator)", &r.direct_parallel),
            ("issuance via keybroker", &r.broker_parallel),
            (&format!("GET /v1/me ({} key records)", r.key_records_seeded), &r.me),
            (&format!("GET /v1/keys ({} key records)", r.key_records_seeded), &r.keys_list),
            (&audit_name, &r.audit_serial),
            (&audit_name, &r.audit),
        ] {
            // A scenario left out with KEYBROKER_BENCH_ONLY has no row and no check.
            if s.requests > 0 {
                row(&mut out, name, s);
            }
        }
        let over = |b: &Stats, d: &Stats, q: f64| b.quantile_ms(q) - d.quantile_ms(q);
        if issued {
            out.push_str(&format!(
                "\nOverhead (keybroker − direct): 1 caller p50 {} p99 {}; {} callers p50 {} p99 {}.\n\
                 Ratios (keybroker / direct): throughput {:.3} at 1 caller, {:.3} at {} callers; \
                 p50 latency ×{:.1} at 1 caller, ×{:.1} at {} callers.\n",
                ms(over(&r.broker_serial, &r.direct_serial, 0.5)),
                ms(over(&r.broker_serial, &r.direct_serial, 0.99)),
                r.broker_parallel.callers,
                ms(over(&r.broker_parallel, &r.direct_parallel, 0.5)),
                ms(over(&r.broker_parallel, &r.direct_parallel, 0.99)),
                r.broker_serial.per_sec() / r.direct_serial.per_sec(),
                r.broker_parallel.per_sec() / r.direct_parallel.per_sec(),
                r.broker_parallel.callers,
                r.broker_serial.p50() / r.direct_serial.p50(),
                r.broker_parallel.p50() / r.direct_parallel.p50(),
                r.broker_parallel.callers,
            ));
        }
        let f = &r.first_issue;
        if first_ran {
            out.push_str(&format!(
                "First issuance with {} Octopus users: {} user look-up request(s) ({} at start-up), {}; \
                 upstream requests {:?}. Then {} user look-ups over {} more issuances.\n",
                f.octopus_users,
                f.first_user_requests,
                f.startup_user_requests,
                ms(f.first_time.as_secs_f64() * 1000.0),
                f.first_requests,
                f.later_user_requests,
                f.later_issues,
            ));
        }
        if r.audit_events_seeded > 0 {
            out.push_str(&format!(
                "Audit seed of {} events took {:.1} s.\n",
                r.audit_events_seeded,
                r.audit_seed_time.as_secs_f64()
            ));
        }
        if issued {
            let p50 = over(&r.broker_parallel, &r.direct_parallel, 0.5);
            let p99 = over(&r.broker_parallel, &r.direct_parallel, 0.99);
            checks.push(Check {
                target: format!("{b}: overhead p50 ≤ 1 ms at 32 callers"),
                measured: ms(p50),
                pass: p50 <= 1.0,
            });
            checks.push(Check {
                target: format!("{b}: overhead p99 ≤ 5 ms at 32 callers"),
                measured: ms(p99),
                pass: p99 <= 5.0,
            });
            checks.push(Check {
                target: format!("{b}: ≥ 1,000 issuances/s (direct: {:.0}/s)", r.direct_parallel.per_sec()),
                measured: format!("{:.0}/s", r.broker_parallel.per_sec()),
                pass: r.broker_parallel.per_sec() >= 1000.0,
            });
        }
        for (name, s) in [("GET /v1/me", &r.me), ("GET /v1/keys", &r.keys_list)] {
            if s.requests > 0 {
                checks.push(Check {
                    target: format!("{b}: ≥ 20,000 reads/s, {name}"),
                    measured: format!("{:.0}/s", s.per_sec()),
                    pass: s.per_sec() >= 20_000.0,
                });
            }
        }
        if first_ran {
            checks.push(Check {
                target: format!(
                    "{b}: ≤ 2 upstream user look-ups per scope account ({} at start-up for 3 scopes, {} in the first issuance), 0 after",
                    f.startup_user_requests, f.first_user_requests
                ),
                measured: format!(
                    "{} + {} then {}",
                    f.startup_user_requests, f.first_user_requests, f.later_user_requests
                ),
                pass: f.startup_user_requests + f.first_user_requests <= 2 * 3 && f.later_user_requests == 0,
            });
        }
        for s in [&r.audit_serial, &r.audit] {
            if s.requests > 0 {
                checks.push(Check {
                    target: format!(
                        "{b}: audit query p99 ≤ 20 ms at {} events, {} caller(s)",
                        r.audit_events_seeded, s.callers
                    ),
                    measured: ms(s.p99()),
                    pass: s.p99() <= 20.0,
                });
            }
        }
    }
    if let Some(m) = memory {
        out.push_str("\n### `keybroker serve` as its own process (SQLite)\n\n");
        out.push_str("| scenario | requests | callers | throughput | p50 | p99 |\n|---|---:|---:|---:|---:|---:|\n");
        row(&mut out, "direct create (simulator)", &m.direct);
        row(&mut out, "issuance via keybroker", &m.issue);
        row(&mut out, "GET /v1/me", &m.me);
        out.push_str(&format!(
            "\nRatios (keybroker / direct) at {} callers: throughput {:.3}, p50 latency ×{:.1}.\n",
            m.issue.callers,
            m.issue.per_sec() / m.direct.per_sec(),
            m.issue.p50() / m.direct.p50()
        ));
        out.push_str(&format!(
            "RSS idle {:.1} MB, peak (VmHWM) {:.1} MB.\n",
            m.idle_rss_kb as f64 / 1024.0,
            m.peak_rss_kb as f64 / 1024.0
        ));
        checks.push(Check {
            target: "peak RSS ≤ 64 MB under the 32-caller load".to_owned(),
            measured: format!("{:.1} MB", m.peak_rss_kb as f64 / 1024.0),
            pass: m.peak_rss_kb <= 64 * 1024,
        });
    }
    out.push_str("\n### Targets\n\n| target | measured | result |\n|---|---:|---|\n");
    for c in &checks {
        out.push_str(&format!("| {} | {} | {} |\n", c.target, c.measured, if c.pass { "PASS" } else { "MISS" }));
    }
    (out, checks)
}
