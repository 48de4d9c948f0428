//! A real `kill -9` of `keybroker serve` between the Octopus call and the record that owns its
//! result, then a restart: the reconciler must revoke the orphan and the audit chain must verify.

use std::process::{Child, Stdio};
use std::time::Duration;

use keybroker::dev::{DEV_AUDIENCE, DEV_ISSUER, demo_config_toml, mint_token};
use octopus_sim::{Fault, FaultKind, Seed, Simulator};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::Connection;

use crate::helpers::JWT_SECRET;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn serve(config: &std::path::Path) -> Child {
    crate::helpers::keybroker_command(&["serve", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_healthy(http: &reqwest::Client, url: &str) {
    for _ in 0..100 {
        if http.get(format!("{url}/healthz")).send().await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("keybroker serve did not come up at {url}");
}

async fn record_state(db_url: &str) -> Option<String> {
    let mut conn = sqlx::SqliteConnection::connect(db_url).await.ok()?;
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM key_records ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut conn)
        .await
        .ok()?;
    let _ = conn.close().await;
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_create_and_activate_is_cleaned_up_after_restart() {
    let sim = Simulator::new(Seed::demo()).unwrap();
    let running = sim.spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    crate::helpers::write_secret_files(dir.path());
    let db = dir.path().join("keybroker.db");
    let listen = format!("127.0.0.1:{}", free_port());
    // A short request timeout: the pending record is the issuer's until its deadline (8 s + 1 s).
    let mut file = crate::helpers::demo_file(&running.url(), &listen, &db);
    crate::helpers::octopus(&mut file).timeout = crate::helpers::secs(1);
    file.server.request_timeout = crate::helpers::secs(8);
    file.jobs.reconcile_interval = crate::helpers::secs(1);
    file.jobs.pending_grace = crate::helpers::secs(3);
    let config = crate::helpers::write_file(dir.path(), &file);
    let url = format!("http://{listen}");
    let db_url = format!("sqlite://{}", db.display());
    let http = reqwest::Client::new();

    let mut first = serve(&config);
    wait_healthy(&http, &url).await;

    // Octopus answers slowly, so the request is caught between the two transactions.
    sim.inject(
        Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::Latency(Duration::from_millis(600))).times(1),
    );
    let token = mint_token(
        JWT_SECRET,
        DEV_ISSUER,
        DEV_AUDIENCE,
        "alice@example.com",
        "Alice",
        &["payments"],
        chrono::Duration::hours(1),
    )
    .unwrap();
    let request = {
        let http = http.clone();
        let url = format!("{url}/v1/keys");
        let token = token.clone();
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(token)
                .json(&json!({"scope": "payments-deploy", "purpose": "doomed"}))
                .send()
                .await
        })
    };

    // Once the record is pending, hold the database's write lock so activation cannot happen.
    let mut pending = false;
    for _ in 0..100 {
        if record_state(&db_url).await.as_deref() == Some("pending") {
            pending = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pending, "the pending record never appeared");
    let mut lock = sqlx::SqliteConnection::connect(&db_url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut lock).await.unwrap();

    // Wait until Octopus made the key, give keybroker a moment to block on the lock, then kill it.
    let mut created = false;
    for _ in 0..100 {
        if sim.api_keys().iter().any(|k| k.purpose.starts_with("keybroker:")) {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(created, "Octopus never created the key");
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.kill().unwrap(); // SIGKILL on Unix: no clean-up code runs
    first.wait().unwrap();
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    lock.close().await.unwrap();
    assert!(request.await.unwrap().is_err(), "the caller must not have received an answer");

    // The state a crash leaves: an Octopus key nobody received, and a pending record.
    assert_eq!(sim.api_keys().iter().filter(|k| k.purpose.starts_with("keybroker:")).count(), 1);
    assert_eq!(record_state(&db_url).await.as_deref(), Some("pending"));

    let mut second = serve(&config);
    wait_healthy(&http, &url).await;
    let mut cleaned = false;
    for _ in 0..250 {
        let orphans = sim.api_keys().iter().filter(|k| k.purpose.starts_with("keybroker:")).count();
        if orphans == 0 && record_state(&db_url).await.as_deref() == Some("failed") {
            cleaned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let auditor = mint_token(
        JWT_SECRET,
        DEV_ISSUER,
        DEV_AUDIENCE,
        "sam@example.com",
        "Sam",
        &["security"],
        chrono::Duration::hours(1),
    )
    .unwrap();
    let verify: Value =
        http.get(format!("{url}/v1/audit/verify")).bearer_auth(&auditor).send().await.unwrap().json().await.unwrap();
    let reconciled: Value = http
        .get(format!("{url}/v1/audit?action=key.reconciled"))
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    second.kill().unwrap();
    second.wait().unwrap();

    assert!(cleaned, "the reconciler did not revoke the orphan and fail its record");
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(reconciled["items"].as_array().unwrap().len(), 1, "{reconciled}");
    assert_eq!(reconciled["items"][0]["detail"]["revoked_octopus_keys"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy_of_a_running_server() {
    let sim = Simulator::new(Seed::demo()).unwrap();
    let running = sim.spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    crate::helpers::write_secret_files(dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let text = demo_config_toml(&running.url(), &listen, &dir.path().join("keybroker.db"));
    let config = dir.path().join("keybroker.toml");
    std::fs::write(&config, &text).unwrap();
    let url = format!("http://{listen}");
    let http = reqwest::Client::new();
    let mut server = serve(&config);
    wait_healthy(&http, &url).await;
    let admin = mint_token(
        JWT_SECRET,
        DEV_ISSUER,
        DEV_AUDIENCE,
        "root@example.com",
        "Root",
        &["platform-admins"],
        chrono::Duration::hours(1),
    )
    .unwrap();
    let scope_count = |http: reqwest::Client, url: String, admin: String| async move {
        let body: Value =
            http.get(format!("{url}/v1/scopes")).bearer_auth(admin).send().await.unwrap().json().await.unwrap();
        body["items"].as_array().unwrap().len()
    };
    assert_eq!(scope_count(http.clone(), url.clone(), admin.clone()).await, 3);

    let extra = "\n[[scopes]]\nname = \"data-export\"\noctopus_user = \"svc-readonly-reporting\"\nteams = [\"data\"]\ndefault_ttl = \"1h\"\nmax_ttl = \"1d\"\n";
    std::fs::write(&config, format!("{text}{extra}")).unwrap();
    let status = std::process::Command::new("kill").args(["-HUP", &server.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut reloaded = false;
    for _ in 0..50 {
        if scope_count(http.clone(), url.clone(), admin.clone()).await == 4 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(reloaded, "SIGHUP did not reload the policy");
}
