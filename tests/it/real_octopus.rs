//! Octopus as it really is: the privilege rule, rate limits, login lockouts, version profiles,
//! dormant keys, and `keybroker doctor`.

use std::sync::Arc;
use std::time::Duration;

use keybroker::config::{Config, OctopusConfig, OctopusCredential};
use keybroker::octopus::OctopusClient;
use octopus_sim::{DEMO_BROKER_API_KEY, Fault, FaultKind, Seed, SeedUser, ServerSettings, Simulator};
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::{ManualClock, TestApp, TestOptions, config_file, keybroker_command, scope};

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap_or(0.0))).unwrap_or(0.0)
}

async fn metrics(app: &TestApp) -> String {
    app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap()
}

/// The demo seed with `username`'s permissions set.
fn seed_with_permissions(username: &str, permissions: &[&str]) -> Seed {
    let mut seed = Seed::demo();
    for user in seed.users.iter_mut().filter(|u| u.username == username) {
        user.permissions = permissions.iter().map(|p| (*p).to_owned()).collect();
    }
    seed
}

// ---------------------------------------------------------------------------------------------
// The privilege rule.

#[tokio::test]
async fn a_scope_whose_account_outranks_the_broker_is_that_scopes_problem_only() {
    let seed = seed_with_permissions("svc-payments-deploy", &["AdministerSystem"]);
    let app = TestApp::spawn_with(TestOptions { seed, ..Default::default() }).await;

    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "outranked"})).await;
    assert_eq!(res.status(), 503);
    let problem: Value = res.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("scope `payments-deploy`") && detail.contains("no more privileged than itself"),
        "{detail}"
    );
    assert!(!detail.contains("keybroker's own credential"), "{detail}");
    assert!(app.keybroker_keys_in_octopus().is_empty());
    // Other scopes keep working.
    app.issue_ok(&app.bob(), json!({"scope": "web-deploy", "purpose": "unaffected"})).await;

    // Readiness names the scope and the rule, and the replica stays in the load balancer.
    let ready = app.readyz_now().await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    let check =
        body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "scope:payments-deploy").unwrap().clone();
    assert_eq!(check["ok"], false);
    assert!(check["detail"].as_str().unwrap().contains("AdministerSystem"), "{check}");
    let web = body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "scope:web-deploy").unwrap().clone();
    assert_eq!(web["ok"], true, "{body}");
}

#[tokio::test]
async fn check_config_reports_the_privilege_rule_per_scope() {
    let sim = Simulator::new(seed_with_permissions("svc-web-deploy", &["ProjectEdit"]))
        .unwrap()
        .spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let (_dir, path) = config_file(&sim.url(), |_| {});
    let out = tokio::task::spawn_blocking(move || {
        keybroker_command(&["check-config", "--config", path.to_str().unwrap()]).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("ok    scope payments-deploy"), "{stdout}");
    assert!(
        stdout.contains("FAIL  scope web-deploy: Octopus refuses keybroker the keys of svc-web-deploy"),
        "{stdout}"
    );
    assert!(stdout.contains("fix: give keybroker's account every permission svc-web-deploy has"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// Rate limits.

#[tokio::test]
async fn a_rate_limited_key_creation_is_sent_again_after_retry_after() {
    let app = TestApp::spawn().await;
    app.sim.inject(
        Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::RateLimited { retry_after_secs: 1 }).times(1),
    );
    let issued = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "after a 429"})).await;
    assert_eq!(app.octopus_me(issued["api_key"].as_str().unwrap()).await.status(), 200);
    assert_eq!(app.keybroker_keys_in_octopus().len(), 1, "one key, not two");
    let text = metrics(&app).await;
    assert_eq!(
        metric(&text, "keybroker_octopus_calls_total{operation=\"create_api_key\",outcome=\"rate_limited\"}"),
        1.0
    );

    // A Retry-After too long to wait inside a request is answered at once, and nothing is made.
    app.sim.inject(
        Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::RateLimited { retry_after_secs: 60 }).times(1),
    );
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "long wait"})).await;
    assert_eq!(res.status(), 503);
    let problem: Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("retry in 60 s"), "{problem}");
    assert_eq!(app.keybroker_keys_in_octopus().len(), 1);
}

#[tokio::test]
async fn keybroker_paces_its_own_calls_to_octopus() {
    let app = TestApp::spawn_with(TestOptions {
        configure: Box::new(|f| crate::helpers::octopus(f).max_requests_per_minute = 60),
        ..Default::default()
    })
    .await;
    // 60 a minute is a burst of 60, then one a second: draining the burst makes the next calls
    // wait (counted), instead of meeting Octopus's 429s.
    let octopus = app.state.keys.octopus().clone();
    for _ in 0..62 {
        octopus.current_user().await.unwrap();
    }
    let text = metrics(&app).await;
    assert!(metric(&text, "keybroker_octopus_calls_paced_total") >= 1.0, "{text}");
}

#[tokio::test]
async fn a_rate_limiting_server_is_paced_and_every_issuance_still_gets_its_key() {
    let mut seed = Seed::demo();
    seed.server.rate_limit_per_minute = Some(60);
    seed.server.rate_limit_burst = Some(3);
    let app = TestApp::spawn_with(TestOptions { seed, ..Default::default() }).await;
    for i in 0..3 {
        let issued =
            app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": format!("burst {i}")})).await;
        assert!(issued["api_key"].as_str().is_some());
    }
    assert_eq!(app.keybroker_keys_in_octopus().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Logins without lockouts.

fn human_broker(password: &str) -> SeedUser {
    SeedUser {
        username: "broker-human".to_owned(),
        display_name: None,
        email: None,
        is_service: false,
        is_active: true,
        can_edit_users: true,
        permissions: Vec::new(),
        password: Some(password.to_owned()),
    }
}

fn login_client(url: &str, password: &str) -> Arc<OctopusClient> {
    OctopusClient::new(&OctopusConfig {
        url: url.parse().unwrap(),
        credential: OctopusCredential::Login {
            username: "broker-human".to_owned(),
            password: SecretString::from(password.to_owned()),
        },
        timeout: Duration::from_secs(5),
        ca_certificates: Vec::new(),
        max_requests_per_minute: 0,
    })
    .unwrap()
}

#[tokio::test]
async fn a_wrong_password_is_tried_a_few_times_and_never_locks_the_account() {
    let mut seed = Seed::demo();
    seed.users.push(human_broker("the right one"));
    let sim = Simulator::new(seed).unwrap();
    let running = sim.spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let wrong = login_client(&running.url(), "a stale one");
    let mut last = String::new();
    for _ in 0..20 {
        last = wrong.current_user().await.unwrap_err().to_string();
    }
    // One attempt, then it waits (2 minutes, then longer after each further failure).
    assert_eq!(sim.request_count("POST /api/users/login"), 1, "keybroker kept logging in");
    assert!(last.contains("tries again in") && last.contains("locks an account"), "{last}");
    // The account is not locked: the right password still works.
    assert_eq!(login_client(&running.url(), "the right one").current_user().await.unwrap().username, "broker-human");
}

#[tokio::test]
async fn the_simulator_locks_an_account_after_nine_failed_logins() {
    let mut seed = Seed::demo();
    seed.users.push(human_broker("the right one"));
    let running = Simulator::new(seed).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let http = reqwest::Client::new();
    let login = |password: &'static str| {
        http.post(format!("{}/api/users/login", running.url()))
            .json(&json!({"Username": "broker-human", "Password": password}))
            .send()
    };
    for _ in 0..9 {
        assert_eq!(login("wrong").await.unwrap().status(), 400);
    }
    assert_eq!(login("the right one").await.unwrap().status(), 400, "locked for 10 minutes");
}

// ---------------------------------------------------------------------------------------------
// Version profiles.

#[tokio::test]
async fn the_issuance_path_runs_against_each_version_profile() {
    for profile in ["2020.5", "2023.3", "2025.4", "2026.3"] {
        let mut seed = Seed::demo();
        seed.server = ServerSettings::for_profile(profile).unwrap();
        let app = TestApp::spawn_with(TestOptions { seed, ..Default::default() }).await;
        let res =
            app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": format!("on {profile}")})).await;
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        if profile == "2020.5" {
            // Such a server ignores Expires: its key would never expire, so it is revoked at once.
            assert_eq!(status, 502, "{profile}: {body}");
            assert!(body["detail"].as_str().unwrap().contains("instead of"), "{body}");
            assert!(app.keybroker_keys_in_octopus().is_empty(), "{profile}: a never-expiring key was left");
        } else {
            assert_eq!(status, 201, "{profile}: {body}");
            assert_eq!(app.octopus_me(body["api_key"].as_str().unwrap()).await.status(), 200, "{profile}");
            let expires = chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
            let in_octopus = app.keybroker_keys_in_octopus()[0].expires.unwrap();
            assert!((in_octopus.timestamp() - expires.timestamp()).abs() <= 60, "{profile}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dormant keys.

/// `POST /v1/keys/revoke {"unused_for": ...}` as an admin.
async fn revoke_unused(app: &TestApp, unused_for: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/keys/revoke", app.url))
        .bearer_auth(app.admin())
        .json(&json!({ "unused_for": unused_for }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn dormant_keys_are_listed_from_octopus_and_revoked_on_request() {
    let clock = ManualClock::starting_now();
    let app = TestApp::spawn_with(TestOptions { clock: Some(clock.clone()), ..Default::default() }).await;
    let used = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "in use", "ttl": "30d"})).await;
    let idle = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "idle", "ttl": "30d"})).await;
    let (used_key, idle_key) = (used["api_key"].as_str().unwrap(), idle["api_key"].as_str().unwrap());
    assert_eq!(app.octopus_me(used_key).await.status(), 200);
    let report = |app: &TestApp, query: &'static str| {
        let http = app.http.clone();
        let url = format!("{}/v1/reports/dormant?{query}", app.url);
        let token = app.auditor();
        async move { http.get(url).bearer_auth(token).send().await.unwrap() }
    };
    let fresh: Value = report(&app, "unused_for=10d").await.json().await.unwrap();
    assert!(fresh["items"].as_array().unwrap().is_empty(), "nothing is 10 days old yet: {fresh}");

    clock.advance(chrono::Duration::days(15));
    app.sim.advance_clock(chrono::Duration::days(15));
    assert_eq!(app.octopus_me(used_key).await.status(), 200, "used again today");
    let dormant: Value = report(&app, "unused_for=10d").await.json().await.unwrap();
    let items = dormant["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{dormant}");
    assert_eq!(items[0]["key"]["id"], idle["id"]);
    assert!(items[0]["last_used_at"].is_null(), "never used");
    assert_eq!(report(&app, "unused_for=soon").await.status(), 400);
    assert_eq!(app.get("/v1/reports/dormant?unused_for=10d", &app.alice()).await.status(), 403);

    let res = revoke_unused(&app, "10d").await;
    assert_eq!(res.status(), 200);
    let revoked: Value = res.json().await.unwrap();
    assert_eq!(revoked["revoked"], 1, "{revoked}");
    assert_eq!(revoked["results"][0]["id"], idle["id"]);
    assert_eq!(app.octopus_me(idle_key).await.status(), 401);
    assert_eq!(app.octopus_me(used_key).await.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// keybroker doctor.

async fn doctor(
    seed: Seed,
    probe_create: bool,
    configure: impl FnOnce(&mut keybroker::config::ConfigFile),
) -> Vec<keybroker::doctor::Row> {
    let sim = Simulator::new(seed).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let (_dir, path) = config_file(&sim.url(), configure);
    let config = Config::load(&path).unwrap();
    keybroker::doctor::run(&config, probe_create).await.unwrap()
}

fn row<'a>(rows: &'a [keybroker::doctor::Row], check: &str) -> &'a keybroker::doctor::Row {
    rows.iter().find(|r| r.check == check).unwrap_or_else(|| panic!("no row {check}: {rows:?}"))
}

#[tokio::test]
async fn doctor_passes_a_healthy_server_and_probes_each_scope_with_a_real_key() {
    use keybroker::doctor::Status;
    let sim = Simulator::new(Seed::demo()).unwrap();
    let running = sim.spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let (_dir, path) = config_file(&running.url(), |_| {});
    let keys_before = sim.api_keys().len();
    let out = tokio::task::spawn_blocking(move || {
        keybroker_command(&["doctor", "--config", path.to_str().unwrap(), "--probe-create"]).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "server",
        "credential ",
        "credential expiry",
        "server key limits",
        "rate limits",
        "scope payments-deploy",
        "probe-create payments-deploy",
    ] {
        assert!(stdout.lines().any(|l| l.starts_with("ok") && l.contains(line)), "no ok line for {line}:\n{stdout}");
    }
    assert!(stdout.contains("authenticated as") && stdout.contains("it is gone"), "{stdout}");
    assert!(!stdout.contains(DEMO_BROKER_API_KEY));
    assert_eq!(sim.api_keys().len(), keys_before, "probe keys were left behind");
    assert_eq!(sim.request_count("POST /api/users/{id}/apikeys"), 3, "one probe per scope");

    // Every failure it can report, with a fix line.
    let mut seed = seed_with_permissions("svc-web-deploy", &["AdministerSystem"]);
    seed.server.api_key_hint_length = 0;
    seed.server.rate_limit_per_minute = Some(600);
    seed.server.rate_limit_burst = Some(200);
    let rows = doctor(seed, false, |f| scope(f, "reporting-readonly").octopus_user = "svc-retired".to_owned()).await;
    assert_eq!(row(&rows, "credential expiry").status, Status::Warn, "{rows:?}");
    assert!(row(&rows, "credential expiry").detail.contains("not found among"));
    assert!(row(&rows, "rate limits").detail.contains("l=200;rpm=600"), "{rows:?}");
    assert_eq!(row(&rows, "scope payments-deploy").status, Status::Ok);
    let web = row(&rows, "scope web-deploy");
    assert_eq!(web.status, Status::Fail);
    assert!(web.fix.as_deref().unwrap().contains("privilege rule"), "{web:?}");
    assert!(row(&rows, "scope reporting-readonly").detail.contains("disabled"));
    assert!(keybroker::doctor::failed(&rows));

    let rows = doctor(Seed::demo(), false, |f| scope(f, "web-deploy").octopus_user = "alice".to_owned()).await;
    assert!(row(&rows, "scope web-deploy").detail.contains("a person's account"));
    let rows = doctor(Seed::demo(), false, |f| scope(f, "web-deploy").octopus_user = "svc-nobody".to_owned()).await;
    assert!(row(&rows, "scope web-deploy").detail.contains("no Octopus user is named exactly"));
}

#[tokio::test]
async fn doctor_reports_a_refused_credential_and_a_failing_probe() {
    use keybroker::doctor::Status;
    let mut seed = Seed::demo();
    seed.api_keys.retain(|k| k.secret != DEMO_BROKER_API_KEY);
    let rows = doctor(seed, false, |_| {}).await;
    let credential = row(&rows, "credential");
    assert_eq!(credential.status, Status::Fail, "{rows:?}");
    assert!(credential.fix.as_deref().unwrap().contains("octopus.api_key_file"));

    let sim = Simulator::new(Seed::demo()).unwrap();
    let running = sim.spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    sim.inject(Fault::on(
        Method::POST,
        "/api/users/{id}/apikeys",
        FaultKind::Status {
            status: 500,
            error_message: "Object reference not set to an instance of an object.".to_owned(),
        },
    ));
    let (_dir, path) = config_file(&running.url(), |_| {});
    let rows = keybroker::doctor::run(&Config::load(&path).unwrap(), true).await.unwrap();
    let probe = row(&rows, "probe-create payments-deploy");
    assert_eq!(probe.status, Status::Fail, "{rows:?}");
    assert!(probe.detail.contains("creating a key failed"), "{probe:?}");
}

#[tokio::test]
async fn keys_whose_use_the_server_did_not_track_are_never_taken_for_dormant() {
    let clock = ManualClock::starting_now();
    let mut seed = Seed::demo();
    seed.server = ServerSettings::for_profile("2023.3").unwrap();
    let app = TestApp::spawn_with(TestOptions { seed, clock: Some(clock.clone()), ..Default::default() }).await;
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "untracked", "ttl": "30d"})).await;
    clock.advance(chrono::Duration::days(15));
    app.sim.advance_clock(chrono::Duration::days(15));
    let report: Value = app.get("/v1/reports/dormant?unused_for=10d", &app.auditor()).await.json().await.unwrap();
    assert!(report["items"].as_array().unwrap().is_empty(), "{report}");
    assert_eq!(report["last_use_unknown"], 1);
    let res = revoke_unused(&app, "10d").await;
    let revoked: Value = res.json().await.unwrap();
    assert_eq!(revoked["revoked"], 0, "{revoked}");
}
