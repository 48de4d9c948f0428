//! The command line as an operator uses it: `check-config`, `migrate`, `openapi`.

use keybroker::dev::demo_config_toml;
use octopus_sim::{DEMO_BROKER_API_KEY, Seed, Simulator};

use crate::helpers::keybroker_command;

fn write_config(
    dir: &std::path::Path,
    octopus_url: &str,
    configure: impl FnOnce(&mut keybroker::config::ConfigFile),
) -> std::path::PathBuf {
    crate::helpers::write_secret_files(dir);
    let mut file = crate::helpers::demo_file(octopus_url, "127.0.0.1:0", &dir.join("keybroker.db"));
    configure(&mut file);
    crate::helpers::write_file(dir, &file)
}

/// For the tests of the file's text itself: the demo's text with one exact edit.
fn write_config_text(dir: &std::path::Path, octopus_url: &str, from: &str, to: &str) -> std::path::PathBuf {
    crate::helpers::write_secret_files(dir);
    let text = demo_config_toml(octopus_url, "127.0.0.1:0", &dir.join("keybroker.db"));
    let path = dir.join("keybroker.toml");
    std::fs::write(&path, crate::helpers::edit_once(&text, from, to)).unwrap();
    path
}

fn keybroker(args: &[&str]) -> std::process::Output {
    keybroker_command(args).output().unwrap()
}

#[tokio::test]
async fn check_config_accepts_a_good_file_and_checks_every_scope_account() {
    let sim = Simulator::new(Seed::demo()).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &sim.url(), |_| {});
    let out = tokio::task::spawn_blocking(move || keybroker(&["check-config", "--config", path.to_str().unwrap()]))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok    scope payments-deploy"), "{stdout}");
    assert!(stdout.contains("ok    scope web-deploy"), "{stdout}");
    assert!(!stdout.contains(DEMO_BROKER_API_KEY));
}

#[tokio::test]
async fn check_config_reports_scopes_whose_account_is_unusable() {
    let sim = Simulator::new(Seed::demo()).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &sim.url(), |f| {
        crate::helpers::scope(f, "web-deploy").octopus_user = "alice".to_owned();
        crate::helpers::scope(f, "reporting-readonly").octopus_user = "svc-retired".to_owned();
        crate::helpers::scope(f, "payments-deploy").octopus_user = "svc-nobody".to_owned();
    });
    let out = tokio::task::spawn_blocking(move || keybroker(&["check-config", "--config", path.to_str().unwrap()]))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("FAIL  scope web-deploy: alice") && stdout.contains("not a service account"), "{stdout}");
    assert!(stdout.contains("FAIL  scope reporting-readonly") && stdout.contains("disabled"), "{stdout}");
    assert!(stdout.contains("FAIL  scope payments-deploy: no Octopus user is named svc-nobody"), "{stdout}");
}

#[test]
fn check_config_names_the_offending_key() {
    let dir = tempfile::tempdir().unwrap();
    // A value no typed field can hold: the file's text itself.
    let path = write_config_text(dir.path(), "http://127.0.0.1:9", "max_ttl = \"30d\"", "max_ttl = \"30 parsecs\"");
    let out = keybroker(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_ttl") && stderr.contains("not a duration"), "{stderr}");

    let out = keybroker(&["check-config", "--config", dir.path().join("missing.toml").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn migrate_creates_the_database_and_openapi_prints_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "http://127.0.0.1:9", |_| {});
    let out = keybroker(&["migrate", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.path().join("keybroker.db").exists());

    let out = keybroker(&["openapi"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["paths"]["/v1/keys"].is_object());
}

/// The README's first command is `cargo run -- dev`. The workspace's default members build two
/// binaries (keybroker, and the test kit's kb-load for the benchmarks), and without the root
/// package naming its own, `cargo run` stops with "could not determine which binary to run":
/// it did, from the day kb-load was added until this test.
#[test]
fn cargo_run_at_the_workspace_root_runs_keybroker() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Value = toml::from_str(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap()).unwrap();
    assert_eq!(manifest["package"]["default-run"].as_str(), Some("keybroker"), "Cargo.toml [package] default-run");
    let bins = manifest["bin"].as_array().unwrap();
    assert!(bins.iter().any(|b| b["name"].as_str() == Some("keybroker")), "{bins:?}");
}
