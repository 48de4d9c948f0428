//! `cargo bench --bench broker`: keybroker against a direct Octopus call, on SQLite and
//! PostgreSQL, with the targets of issue 8 (in-process) and of issue 20 (`process`: keybroker's
//! own CPU per request, open-loop latency, as processes). See BENCHMARKS.md.
//!
//! PostgreSQL: `KEYBROKER_BENCH_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! set it to `off` to skip. `KEYBROKER_BENCH_TINY=1` runs every scenario with tiny counts.
//! `KEYBROKER_BENCH_ONLY=issue,reads,audit,first,memory,process` runs only the named scenarios.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process;
mod scenarios;

use scenarios::{Backend, Counts};

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; there are no options to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let counts = if std::env::var_os("KEYBROKER_BENCH_TINY").is_some() { Counts::tiny() } else { Counts::full() };
    let pg = std::env::var("KEYBROKER_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut backends = vec![Backend::Sqlite];
    if pg != "off" {
        backends.push(Backend::Postgres(pg));
    }
    let mem_info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total = mem_info.lines().find(|l| l.starts_with("MemTotal:")).unwrap_or("MemTotal: ?").to_owned();
    println!(
        "keybroker benchmark: {} cores, {}, counts {:?}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        mem_total.split_whitespace().skip(1).collect::<Vec<_>>().join(" "),
        counts
    );
    let mut reports = Vec::new();
    let mut processes = Vec::new();
    let tiny = std::env::var_os("KEYBROKER_BENCH_TINY").is_some();
    let open_for = std::time::Duration::from_secs_f64(if tiny { 0.2 } else { 8.0 });
    for backend in &backends {
        println!("running {} ...", backend.name());
        reports.push(scenarios::run_backend(backend, &counts).await?);
        if scenarios::wanted("process") {
            println!("running {} with keybroker serve as its own process ...", backend.name());
            processes.push(process::run(env!("CARGO_BIN_EXE_keybroker"), backend, &counts, open_for).await?);
        }
    }
    let memory = if scenarios::wanted("memory") {
        println!("running keybroker serve as its own process ...");
        Some(scenarios::memory(env!("CARGO_BIN_EXE_keybroker"), &counts).await?)
    } else {
        None
    };
    let (table, mut checks) = scenarios::render(&reports, memory.as_ref());
    println!("{table}");
    let (table, process_checks) = process::render(&processes);
    println!("{table}");
    checks.extend(process_checks);
    let missed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
    if missed.is_empty() {
        println!("every target met");
    } else {
        println!("TARGETS MISSED ({} of {}):", missed.len(), checks.len());
        for c in missed {
            println!("  MISS: {} (measured {})", c.target, c.measured);
        }
    }
    Ok(())
}
