//! The benchmark's scenarios (benches/scenarios.rs) with tiny counts, so `cargo bench --bench
//! broker` cannot rot. No timing is asserted: only that every scenario runs and counts.

#[path = "../../benches/process.rs"]
mod process;
#[path = "../../benches/scenarios.rs"]
mod scenarios;

use scenarios::{Backend, Counts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_scenarios_run_with_tiny_counts() {
    let counts = Counts::tiny();
    let mut backends = vec![Backend::Sqlite];
    if let Some(url) = crate::helpers::postgres_url() {
        backends.push(Backend::Postgres(url));
    }
    let mut reports = Vec::new();
    for backend in &backends {
        let report = scenarios::run_backend(backend, &counts).await.unwrap();
        assert_eq!(report.broker_parallel.latencies_us.len(), counts.issue_parallel);
        assert_eq!(report.direct_serial.latencies_us.len(), counts.issue_serial);
        assert_eq!(report.me.latencies_us.len(), counts.reads);
        assert!(!report.audit.latencies_us.is_empty());
        assert_eq!(report.first_issue.later_issues, 10);
        reports.push(report);
    }
    let mut processes = Vec::new();
    for backend in &backends {
        let run =
            process::run(env!("CARGO_BIN_EXE_keybroker"), backend, &counts, std::time::Duration::from_millis(100));
        let report = run.await.unwrap();
        // Tiny runs are shorter than the kernel's 10 ms tick of CPU time: only the shape is checked.
        assert_eq!(report.cpu.len(), 5, "direct, issuance and three reads: {report:?}");
        assert_eq!(report.open.len(), process::RATES.len());
        assert!(report.open.iter().all(|(_, d, k)| d.failed == 0 && k.failed == 0), "{report:?}");
        processes.push(report);
    }
    let (table, checks) = process::render(&processes);
    assert_eq!(checks.len(), 7 * processes.len(), "{table}");
    let memory = scenarios::memory(env!("CARGO_BIN_EXE_keybroker"), &counts).await.unwrap();
    assert!(memory.peak_rss_kb > 0);
    let (table, checks) = scenarios::render(&reports, Some(&memory));
    assert!(table.contains("| target | measured | result |"), "{table}");
    // Every scenario ran, so every target is checked: 8 per backend and the memory one.
    assert_eq!(checks.len(), 8 * reports.len() + 1, "{table}");
}
