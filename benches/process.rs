//! Issue 20's measures, with `keybroker serve` and `keybroker octopus-sim` as processes of their
//! own (the release binary), so that each one's CPU is read from `/proc/<pid>/stat`:
//! - keybroker's CPU per request, at 32 callers (closed loop), per scenario;
//! - issuances offered at fixed rates (open loop, latency from each request's due time) against
//!   direct creations offered at the same rates;
//! - the one-caller overhead, and the peak RSS.
//!
//! The yardstick of issue 20 is wrk's CPU per direct create. Here, without wrk, a fixed
//! reference workload (`keybroker_testkit::load::reference_unit`, CPU-bound, nobody's code) is
//! timed in the same run; [`REFERENCE_PER_YARDSTICK`] is its ratio to wrk's yardstick, which
//! `benches/crosscheck.sh` measures side by side.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use keybroker_testkit::load::{Latencies, cpu_time, open_loop, status_kb};
use serde_json::json;

use super::scenarios::{self, Backend, Check, Counts, Stats, http_client, token};

/// The reference workload's time over wrk's CPU per direct create (the yardstick), as
/// `benches/crosscheck.sh` measured them side by side (BENCHMARKS.md, issue 20, "How it is measured").
pub const REFERENCE_PER_YARDSTICK: f64 = 445.0;

/// The open-loop rates (requests a second).
pub const RATES: [f64; 3] = [100.0, 500.0, 1000.0];

/// What one backend's run measured.
#[derive(Debug, Default)]
pub struct ProcessReport {
    pub backend: &'static str,
    /// The simulator's CPU per direct create, in microseconds.
    pub sim_direct_us: f64,
    /// The reference workload, in microseconds, timed before the run.
    pub reference_us: f64,
    /// `(scenario, its closed-loop run, keybroker's CPU per request in microseconds)`.
    pub cpu: Vec<(&'static str, Stats, f64)>,
    /// `(rate, direct, keybroker)`.
    pub open: Vec<(f64, Latencies, Latencies)>,
    pub serial_direct: Stats,
    pub serial_issue: Stats,
    pub peak_rss_kb: u64,
}

impl ProcessReport {
    /// The yardstick, in microseconds, as estimated from this run's reference workload.
    pub fn yardstick_us(&self) -> f64 {
        self.reference_us / REFERENCE_PER_YARDSTICK
    }

    pub fn cpu_of(&self, scenario: &str) -> f64 {
        self.cpu.iter().find(|(name, ..)| *name == scenario).map_or(f64::NAN, |(_, _, us)| *us)
    }
}

/// A child process, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &str, args: &[&str]) -> anyhow::Result<Running> {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("KEYBROKER_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    Ok(Running(cmd.spawn().with_context(|| format!("cannot start {bin}"))?))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_for(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} did not come up")
}

/// A database for the `keybroker serve` process: a SQLite file in `dir`, or a fresh PostgreSQL
/// database (dropped by [`drop_database`]).
async fn database_url(backend: &Backend, dir: &Path) -> anyhow::Result<(String, Option<String>)> {
    match backend {
        Backend::Sqlite => Ok((format!("sqlite://{}", dir.join("keybroker.db").display()), None)),
        Backend::Postgres(url) => {
            let name = format!("kb_bench_{}", uuid::Uuid::new_v4().simple());
            let admin = sqlx::PgPool::connect(url).await.context("cannot reach PostgreSQL")?;
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await?;
            admin.close().await;
            let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
            Ok((format!("{base}/{name}"), Some(name)))
        }
    }
}

async fn drop_database(backend: &Backend, name: Option<String>) -> anyhow::Result<()> {
    if let (Backend::Postgres(url), Some(name)) = (backend, name) {
        let admin = sqlx::PgPool::connect(url).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await?;
        admin.close().await;
    }
    Ok(())
}

/// The closed-loop run `run` with keybroker's (and the simulator's) CPU over it.
async fn with_cpu<Fut: std::future::Future<Output = anyhow::Result<Stats>>>(
    kb: u32,
    sim: u32,
    run: Fut,
) -> anyhow::Result<(Stats, f64, f64)> {
    let (kb0, sim0) = (cpu_time(kb)?, cpu_time(sim)?);
    let stats = run.await?;
    let (kb1, sim1) = (cpu_time(kb)?, cpu_time(sim)?);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / stats.requests.max(1) as f64;
    let (kb_us, sim_us) = (per(kb1 - kb0), per(sim1 - sim0));
    Ok((stats, kb_us, sim_us))
}

/// Runs every measure of issue 20 against `bin serve` on `backend`.
pub async fn run(bin: &str, backend: &Backend, counts: &Counts, open_for: Duration) -> anyhow::Result<ProcessReport> {
    let dir = tempfile::tempdir()?;
    let (sim_port, kb_port) = (free_port()?, free_port()?);
    let sim_url = format!("http://127.0.0.1:{sim_port}");
    let sim = spawn(bin, &["octopus-sim", "--port", &sim_port.to_string()])?;
    let http = http_client()?;
    wait_for(&http, &format!("{sim_url}/api")).await?;
    let (db_url, pg_db) = database_url(backend, dir.path()).await?;
    keybroker_testkit::write_secret_files(dir.path());
    let mut file = keybroker_testkit::demo_file(&sim_url, &format!("127.0.0.1:{kb_port}"), &dir.path().join("kb.db"));
    scenarios::unlimited(&mut file);
    file.database.url = Some(db_url);
    let config = keybroker_testkit::write_file(dir.path(), &file);
    let kb = spawn(bin, &["serve", "--config", &config.display().to_string()])?;
    let url = format!("http://127.0.0.1:{kb_port}");
    let result = async {
        wait_for(&http, &format!("{url}/healthz")).await?;
        measure(&http, &url, &sim_url, kb.0.id(), sim.0.id(), backend, counts, open_for).await
    }
    .await;
    drop(kb);
    drop(sim);
    drop_database(backend, pg_db).await?;
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    http: &reqwest::Client,
    url: &str,
    sim_url: &str,
    kb: u32,
    sim: u32,
    backend: &Backend,
    counts: &Counts,
    open_for: Duration,
) -> anyhow::Result<ProcessReport> {
    let users: serde_json::Value = http
        .get(format!("{sim_url}/api/users?filter=svc-payments-deploy"))
        .header("X-Octopus-ApiKey", octopus_sim::DEMO_BROKER_API_KEY)
        .send()
        .await?
        .json()
        .await?;
    let user_id = users["Items"][0]["Id"].as_str().context("no svc-payments-deploy in the simulator")?.to_owned();
    let (n, callers) = (counts.issue_parallel, counts.callers);
    // Warm-up: connections, the user cache, the first pages; and bench-0 holds a page of keys.
    scenarios::issue_through_broker(http, url, callers, (callers * 4).max(100)).await?;
    let mut out = ProcessReport {
        backend: backend.name(),
        reference_us: keybroker_testkit::load::reference_unit(),
        ..Default::default()
    };
    let (direct, _, sim_us) =
        with_cpu(kb, sim, scenarios::issue_direct_to(http, sim_url, &user_id, callers, n)).await?;
    out.sim_direct_us = sim_us;
    out.cpu.push(("direct create", direct, f64::NAN));
    let (issue, kb_us, _) = with_cpu(kb, sim, scenarios::issue_through_broker(http, url, callers, n)).await?;
    out.cpu.push(("issuance", issue, kb_us));
    let reader = token("bench-0@example.com", &["payments"])?;
    let auditor = token("auditor@example.com", &["security"])?;
    let reads: [(&'static str, String, &String, usize); 3] = [
        ("GET /v1/me", "/v1/me".to_owned(), &reader, counts.reads),
        ("GET /v1/keys?limit=50", "/v1/keys?limit=50".to_owned(), &reader, counts.reads / 4),
        (
            "GET /v1/audit?actor=..&limit=50",
            "/v1/audit?actor=bench-0@example.com&limit=50".to_owned(),
            &auditor,
            counts.reads / 4,
        ),
    ];
    for (name, path, who, total) in reads {
        let (stats, kb_us, _) =
            with_cpu(kb, sim, scenarios::read(http, url, &path, who, callers, total.max(1))).await?;
        out.cpu.push((name, stats, kb_us));
    }
    out.serial_direct = scenarios::issue_direct_to(http, sim_url, &user_id, 1, counts.issue_serial).await?;
    out.serial_issue = scenarios::issue_through_broker(http, url, 1, counts.issue_serial).await?;
    for rate in RATES {
        let direct = offer(http, rate, open_for, Target::Direct { sim_url, user_id: &user_id }).await;
        let issued = offer(http, rate, open_for, Target::Keybroker { url, callers }).await;
        out.open.push((rate, direct, issued));
    }
    out.peak_rss_kb = status_kb(kb, "VmHWM:")?;
    Ok(out)
}

enum Target<'a> {
    Direct { sim_url: &'a str, user_id: &'a str },
    Keybroker { url: &'a str, callers: usize },
}

/// Offers creations (direct) or issuances at `rate` for `duration`.
async fn offer(http: &reqwest::Client, rate: f64, duration: Duration, target: Target<'_>) -> Latencies {
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let requests: Vec<reqwest::RequestBuilder> = match target {
        Target::Direct { sim_url, user_id } => vec![
            http.post(format!("{sim_url}/api/users/{user_id}/apikeys"))
                .header("X-Octopus-ApiKey", octopus_sim::DEMO_BROKER_API_KEY)
                .json(&json!({"Purpose": "benchmark open loop", "Expires": expires})),
        ],
        Target::Keybroker { url, callers } => (0..callers.max(1))
            .map(|c| {
                let token = token(&format!("bench-{c}@example.com"), &["payments"]).unwrap_or_default();
                http.post(format!("{url}/v1/keys"))
                    .bearer_auth(token)
                    .json(&json!({"scope": "payments-deploy", "purpose": "benchmark open loop", "ttl": "1d"}))
            })
            .collect(),
    };
    open_loop(rate, duration, move |i| {
        let request = requests[i % requests.len()].try_clone();
        async move {
            match request {
                Some(request) => match request.send().await {
                    Ok(res) if res.status().is_success() => res.bytes().await.is_ok(),
                    _ => false,
                },
                None => false,
            }
        }
    })
    .await
}

/// The tables and issue 20's target checks, as Markdown.
pub fn render(reports: &[ProcessReport]) -> (String, Vec<Check>) {
    let mut out = String::new();
    let mut checks = Vec::new();
    for r in reports {
        let sqlite = r.backend == "SQLite";
        let y = r.yardstick_us();
        out.push_str(&format!(
            "\n### {} (keybroker serve and keybroker octopus-sim as processes)\n\nReference workload {:.0} µs, so a \
             yardstick (÷ {REFERENCE_PER_YARDSTICK}) is {y:.2} µs; the simulator's CPU per direct create {:.1} µs.\n\n\
             | scenario (32 callers) | requests | throughput | p50 | p99 | keybroker CPU/request | yardsticks |\n\
             |---|---:|---:|---:|---:|---:|---:|\n",
            r.backend, r.reference_us, r.sim_direct_us
        ));
        for (name, s, us) in &r.cpu {
            let (cpu, ys) = if us.is_nan() {
                ("-".to_owned(), "-".to_owned())
            } else {
                (format!("{us:.0} µs"), format!("{:.1}", us / y))
            };
            out.push_str(&format!(
                "| {name} | {} | {:.0}/s | {:.2} ms | {:.2} ms | {cpu} | {ys} |\n",
                s.requests,
                s.per_sec(),
                s.p50(),
                s.p99()
            ));
        }
        out.push_str(
            "\n| offered | direct p50 | p99 | p99.9 | issuance p50 | p99 | p99.9 | failed | p99 overhead |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (rate, d, k) in &r.open {
            out.push_str(&format!(
                "| {rate:.0}/s | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} | {:.2} ms |\n",
                d.quantile_ms(0.5),
                d.quantile_ms(0.99),
                d.quantile_ms(0.999),
                k.quantile_ms(0.5),
                k.quantile_ms(0.99),
                k.quantile_ms(0.999),
                d.failed + k.failed,
                k.quantile_ms(0.99) - d.quantile_ms(0.99)
            ));
        }
        let serial = r.serial_issue.p50() - r.serial_direct.p50();
        out.push_str(&format!(
            "\nOne caller: direct p50 {:.2} ms, issuance p50 {:.2} ms, overhead {serial:.2} ms. Peak RSS {:.1} MB.\n",
            r.serial_direct.p50(),
            r.serial_issue.p50(),
            r.peak_rss_kb as f64 / 1024.0
        ));
        let at_500 = r
            .open
            .iter()
            .find(|(rate, ..)| *rate == 500.0)
            .map_or(f64::INFINITY, |(_, d, k)| k.quantile_ms(0.99) - d.quantile_ms(0.99));
        let b = r.backend;
        let mut check = |target: String, value: f64, limit: f64, unit: &str| {
            checks.push(Check { target, measured: format!("{value:.2}{unit}"), pass: value <= limit });
        };
        let issue_limit = if sqlite { 15.0 } else { 20.0 };
        check(format!("{b}: issuance ≤ {issue_limit} yardsticks"), r.cpu_of("issuance") / y, issue_limit, "");
        check(format!("{b}: GET /v1/me ≤ 2.5 yardsticks"), r.cpu_of("GET /v1/me") / y, 2.5, "");
        check(format!("{b}: 50-record page ≤ 8 yardsticks"), r.cpu_of("GET /v1/keys?limit=50") / y, 8.0, "");
        check(format!("{b}: audit page ≤ 10 yardsticks"), r.cpu_of("GET /v1/audit?actor=..&limit=50") / y, 10.0, "");
        let p99_limit = if sqlite { 5.0 } else { 10.0 };
        check(format!("{b}: p99 overhead at 500/s ≤ {p99_limit} ms"), at_500, p99_limit, " ms");
        let serial_limit = if sqlite { 0.5 } else { 1.5 };
        check(format!("{b}: 1-caller issuance overhead ≤ {serial_limit} ms"), serial, serial_limit, " ms");
        check(format!("{b}: peak RSS ≤ 48 MB"), r.peak_rss_kb as f64 / 1024.0, 48.0, " MB");
    }
    if !checks.is_empty() {
        out.push_str("\n### Targets of issue 20\n\n| target | measured | result |\n|---|---:|---|\n");
        for c in &checks {
            out.push_str(&format!("| {} | {} | {} |\n", c.target, c.measured, if c.pass { "PASS" } else { "MISS" }));
        }
    }
    (out, checks)
}
