//! The benchmark's scenarios (benches/scenarios.rs) with tiny counts, so `cargo bench --bench
//! broker` cannot rot. No timing is asserted: only that every scenario runs and counts.

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
    let memory = scenarios::memory(env!("CARGO_BIN_EXE_keybroker"), &counts).await.unwrap();
    assert!(memory.peak_rss_kb > 0);
    let (table, checks) = scenarios::render(&reports, Some(&memory));
    assert!(table.contains("| target | measured | result |"), "{table}");
    // Every scenario ran, so every target is checked: 8 per backend and the memory one.
    assert_eq!(checks.len(), 8 * reports.len() + 1, "{table}");
}
