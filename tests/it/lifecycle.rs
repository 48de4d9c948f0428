//! Key lifecycle: expiry, webhook notices, drift, offboarding, the broker credential, reloads.
//! Time is driven by a manual clock, never by sleeping for days.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use keybroker::config::{ConfigFile, RawWebhook};
use keybroker::services::jobs::{expire_once, reconcile_once, watch_credential};
use keybroker::services::webhooks::{Webhook, deliver_due, enqueue_notices, signature};
use octopus_sim::{DEMO_BROKER_API_KEY, Fault, FaultKind, Seed, SeedApiKey};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{ManualClock, TestApp, TestOptions, create_marked_key, stage_pending};

/// A webhook receiver that records what it gets and answers with a chosen status.
struct Sink {
    url: String,
    received: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    status: Arc<Mutex<u16>>,
    /// Holds the webhook's secret file.
    dir: tempfile::TempDir,
}

impl Sink {
    async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(200u16));
        let handler = {
            let (received, status) = (received.clone(), status.clone());
            move |headers: HeaderMap, body: axum::body::Bytes| async move {
                received.lock().unwrap().push((headers, serde_json::from_slice(&body).unwrap_or(Value::Null)));
                axum::http::StatusCode::from_u16(*status.lock().unwrap()).unwrap()
            }
        };
        let router = axum::Router::new().route("/hook", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { url, received, status, dir: tempfile::tempdir().unwrap() }
    }

    fn events(&self) -> Vec<(String, Option<i64>)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| (body["event"].as_str().unwrap_or("").to_owned(), body["threshold_days"].as_i64()))
            .collect()
    }
}

/// What a key issued 25 days before expiry must get over its life: each notice exactly once.
fn assert_one_notice_of_each_kind(sink: &Sink) {
    let mut events = sink.events();
    events.sort();
    assert_eq!(
        events,
        vec![
            ("key.expired".to_owned(), None),
            ("key.expiring".to_owned(), Some(10)),
            ("key.expiring".to_owned(), Some(20)),
            ("key.issued".to_owned(), None),
        ]
    );
}

const WEBHOOK_SECRET: &str = "webhook-secret-0123456789abcdef-0123456789";

async fn app_with_webhook(sink: &Sink, clock: Arc<ManualClock>) -> TestApp {
    let secret_file = sink.dir.path().join("webhook-secret");
    std::fs::write(&secret_file, WEBHOOK_SECRET).unwrap();
    let hook = RawWebhook {
        name: Some("sink".to_owned()),
        url: sink.url.clone(),
        events: ["key.issued", "key.expiring", "key.expired", "key.revoked"].map(str::to_owned).to_vec(),
        secret_file: Some(secret_file),
        ..Default::default()
    };
    TestApp::spawn_with(TestOptions {
        configure: Box::new(move |f| f.webhooks.push(hook)),
        clock: Some(clock),
        ..Default::default()
    })
    .await
}

async fn notices(app: &TestApp) {
    let webhooks = webhooks_of(app);
    enqueue_notices(&app.state.keys, &webhooks).await.unwrap();
    deliver_due(&app.state.keys, &Webhook::all(&webhooks).unwrap()).await.unwrap();
}

fn webhooks_of(app: &TestApp) -> Vec<keybroker::config::WebhookConfig> {
    keybroker::config::Config::load(&app.dir.path().join("keybroker.toml")).unwrap().webhooks
}

#[tokio::test]
async fn active_keys_past_their_expiry_are_swept_and_audited() {
    let clock = ManualClock::starting_now();
    let app = TestApp::spawn_with(TestOptions { clock: Some(clock.clone()), ..Default::default() }).await;
    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "short", "ttl": "1d"})).await;
    let path = format!("/v1/keys/{}", body["id"].as_str().unwrap());
    assert_eq!(expire_once(&app.state.keys).await.unwrap(), 0);

    clock.advance(chrono::Duration::days(2));
    // Reads show it expired even before the sweep.
    let read: Value = app.get(&path, &app.alice()).await.json().await.unwrap();
    assert_eq!(read["state"], "expired");
    assert_eq!(expire_once(&app.state.keys).await.unwrap(), 1);
    assert_eq!(expire_once(&app.state.keys).await.unwrap(), 0, "each key is expired once");
    let record = app
        .state
        .keys
        .store()
        .get_key(uuid::Uuid::parse_str(body["id"].as_str().unwrap()).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.state, keybroker::domain::keys::KeyState::Expired);
    let expired: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "key.expired").collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].key_id.unwrap().to_string(), body["id"].as_str().unwrap());
}

#[tokio::test]
async fn a_key_issued_twenty_five_days_before_expiry_gets_one_warning_per_threshold() {
    let sink = Sink::start().await;
    let clock = ManualClock::starting_now();
    let app = app_with_webhook(&sink, clock.clone()).await;
    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "long", "ttl": "25d"})).await;
    let secret = body["api_key"].as_str().unwrap().to_owned();
    for _ in 0..(27 * 2) {
        notices(&app).await;
        notices(&app).await; // running twice changes nothing
        clock.advance(chrono::Duration::hours(12));
    }
    assert_one_notice_of_each_kind(&sink);
    for (headers, body_json) in sink.received.lock().unwrap().iter() {
        let raw = body_json.to_string();
        assert!(!raw.contains(&secret), "a webhook must never carry the secret");
        assert_eq!(body_json["key"]["id"], body["id"]);
        assert_eq!(body_json["requester"], "alice@example.com");
        // The signature covers the exact body that was sent.
        let sent = headers["x-keybroker-signature"].to_str().unwrap();
        assert!(sent.starts_with("t="), "{sent}");
        let event = headers["x-keybroker-event"].to_str().unwrap();
        assert_eq!(event, body_json["event"]);
    }
    let delivered = app.audit_events().await.into_iter().filter(|e| e.action == "webhook.delivery").count();
    assert_eq!(delivered, 4);
}

#[tokio::test]
async fn webhook_signatures_verify_over_the_body() {
    let sink = Sink::start().await;
    let clock = ManualClock::starting_now();
    let app = app_with_webhook(&sink, clock).await;
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "signed"})).await;
    notices(&app).await;
    let received = sink.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let (headers, body) = &received[0];
    // `t=<unix seconds>,id=<delivery id>,v1=<hex HMAC of "<t>.<id>.<body>">`, checked the way the
    // README tells receivers to. The receiver re-serialises; serde_json keeps the compact form.
    let header = headers["x-keybroker-signature"].to_str().unwrap();
    let fields: std::collections::HashMap<&str, &str> = header.split(',').filter_map(|f| f.split_once('=')).collect();
    let t: i64 = fields["t"].parse().unwrap();
    let id: i64 = fields["id"].parse().unwrap();
    assert_eq!(id.to_string(), headers["x-keybroker-delivery"].to_str().unwrap());
    assert!((chrono::Utc::now().timestamp() - t).abs() < 300, "signed at {t}");
    assert_eq!(header, signature(WEBHOOK_SECRET, t, id, body.to_string().as_bytes()));
    assert_ne!(header, signature(WEBHOOK_SECRET, t, id, b"{}"), "the body is signed");
}

#[tokio::test]
async fn a_webhook_that_is_down_never_fails_an_issuance_and_is_retried_then_given_up() {
    let sink = Sink::start().await;
    *sink.status.lock().unwrap() = 500;
    let clock = ManualClock::starting_now();
    let app = app_with_webhook(&sink, clock.clone()).await;
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "while down"})).await;
    notices(&app).await;
    assert_eq!(sink.events().len(), 1);
    // Not due again until its backoff has passed.
    notices(&app).await;
    assert_eq!(sink.events().len(), 1);
    clock.advance(chrono::Duration::minutes(1));
    notices(&app).await;
    assert_eq!(sink.events().len(), 2);
    // A day later it is given up, and that is audited.
    clock.advance(chrono::Duration::hours(25));
    notices(&app).await;
    let attempts = sink.events().len();
    clock.advance(chrono::Duration::hours(2));
    notices(&app).await;
    assert_eq!(sink.events().len(), attempts, "no attempts after giving up");
    let outcomes: Vec<String> = app
        .audit_events()
        .await
        .into_iter()
        .filter(|e| e.action == "webhook.delivery")
        .map(|e| e.detail["result"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(outcomes.last().map(String::as_str), Some("gave_up"));
    assert!(outcomes.iter().filter(|o| *o == "retry").count() >= 2);
    let metrics = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"keybroker_webhook_deliveries_total{event="key.issued",outcome="gave_up"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn drift_marks_keys_deleted_behind_keybrokers_back_and_reports_unmanaged_ones() {
    let app = TestApp::spawn().await;
    let gone = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "deleted by hand"})).await;
    let kept = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "still there"})).await;
    assert!(app.sim.delete_api_key_behind_the_back(gone["octopus_key_id"].as_str().unwrap()));
    // A key with a keybroker marker that no record owns.
    let user = app.sim.user_id("svc-payments-deploy").unwrap();
    let stray = uuid::Uuid::new_v4();
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%S.000+00:00").to_string();
    let res = app
        .http
        .post(format!("{}/api/users/{user}/apikeys", app.sim_url))
        .header("X-Octopus-ApiKey", DEMO_BROKER_API_KEY)
        .json(&json!({"Purpose": format!("keybroker:{stray} mallory: stray"), "Expires": expires}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let state = keybroker::services::drift::DriftState::default();
    let report = keybroker::services::drift::scan(&app.state.keys, &state).await.unwrap();
    assert_eq!(report.revoked_behind_back.len(), 1);
    assert_eq!(report.revoked_behind_back[0].to_string(), gone["id"].as_str().unwrap());
    assert_eq!(report.unmanaged.len(), 1);
    assert_eq!(report.unmanaged[0].record_id, Some(stray));
    let read: Value =
        app.get(&format!("/v1/keys/{}", gone["id"].as_str().unwrap()), &app.alice()).await.json().await.unwrap();
    assert_eq!(read["state"], "revoked");
    let read: Value =
        app.get(&format!("/v1/keys/{}", kept["id"].as_str().unwrap()), &app.alice()).await.json().await.unwrap();
    assert_eq!(read["state"], "active");
    // Reported, never silently deleted; reported once however often the scan runs.
    keybroker::services::drift::scan(&app.state.keys, &state).await.unwrap();
    assert_eq!(app.keybroker_keys_in_octopus().len(), 2);
    let events = app.audit_events().await;
    assert_eq!(events.iter().filter(|e| e.action == "drift.unmanaged").count(), 1);
    assert!(events.iter().any(|e| e.action == "key.revoked" && e.detail["drift"].is_string()));
    let metrics = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keybroker_unmanaged_octopus_keys 1"), "{metrics}");

    // An admin asks: the stray key goes, the managed one stays.
    let url = format!("{}/v1/admin/drift/revoke-unmanaged", app.url);
    assert_eq!(app.http.post(&url).bearer_auth(app.alice()).send().await.unwrap().status(), 403);
    let res = app.http.post(&url).bearer_auth(app.admin()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["revoked"].as_array().unwrap().len(), 1);
    let left = app.keybroker_keys_in_octopus();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, kept["octopus_key_id"].as_str().unwrap());
}

#[tokio::test]
async fn an_admin_offboards_a_team_in_one_call_and_failures_are_retried() {
    let app = TestApp::spawn().await;
    let carol = app.token("carol@example.com", &["payments"]);
    let a1 = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "a1"})).await;
    app.issue_ok(&app.alice(), json!({"scope": "reporting-readonly", "purpose": "a2"})).await;
    app.issue_ok(&carol, json!({"scope": "payments-deploy", "purpose": "c1"})).await;
    let bobs = app.issue_ok(&app.bob(), json!({"scope": "web-deploy", "purpose": "b1"})).await;

    let url = format!("{}/v1/keys/revoke", app.url);
    let post = |token: String, body: Value| app.http.post(&url).bearer_auth(token).json(&body).send();
    assert_eq!(post(app.alice(), json!({"team": "payments"})).await.unwrap().status(), 403);
    assert_eq!(post(app.admin(), json!({})).await.unwrap().status(), 400);

    // One Octopus delete fails even after the client's retries.
    app.sim.inject(
        Fault::on(
            Method::DELETE,
            "/api/users/{id}/apikeys/{keyId}",
            FaultKind::Status { status: 503, error_message: "busy".to_owned() },
        )
        .times(4),
    );
    let res = post(app.admin(), json!({"team": "payments"})).await.unwrap();
    assert_eq!(res.status(), 200);
    let report: Value = res.json().await.unwrap();
    assert_eq!(report["complete"], false, "{report}");
    assert_eq!(report["revoked"], 2);
    assert_eq!(report["failed"], 1);
    assert_eq!(report["results"].as_array().unwrap().len(), 3);
    assert_eq!(app.keybroker_keys_in_octopus().len(), 2, "bob's key and the failed one remain");

    // The reconciler finishes the job.
    let retried = reconcile_once(&app.state.keys, std::time::Duration::from_secs(3600)).await.unwrap();
    assert_eq!(retried.revocations_retried, 1);
    let left = app.keybroker_keys_in_octopus();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, bobs["octopus_key_id"].as_str().unwrap());
    let revoked = app.audit_events().await.into_iter().filter(|e| e.action == "key.revoked").count();
    assert_eq!(revoked, 3);
    let read: Value =
        app.get(&format!("/v1/keys/{}", a1["id"].as_str().unwrap()), &app.alice()).await.json().await.unwrap();
    assert_eq!(read["state"], "revoked");

    // By requester too.
    let report: Value = post(app.admin(), json!({"requester": "bob@example.com"})).await.unwrap().json().await.unwrap();
    assert_eq!(report["revoked"], 1);
    assert!(app.keybroker_keys_in_octopus().is_empty());
}

#[tokio::test]
async fn the_broker_credential_expiry_is_watched_and_warned_about_once() {
    let mut seed = Seed::demo();
    seed.api_keys[0] = SeedApiKey {
        username: "keybroker".to_owned(),
        secret: DEMO_BROKER_API_KEY.to_owned(),
        purpose: "expiring soon".to_owned(),
        expires: None,
        expires_in_days: Some(15),
    };
    let app = TestApp::spawn_with(TestOptions { seed, ..Default::default() }).await;
    let warned = Mutex::new(Vec::new());
    watch_credential(&app.state.keys, &warned).await.unwrap();
    watch_credential(&app.state.keys, &warned).await.unwrap();
    let warnings: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "credential.expiring").collect();
    assert_eq!(warnings.len(), 1, "one warning for the 20-day threshold");
    assert_eq!(warnings[0].detail["threshold_days"], 20);
    let metrics = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    let line =
        metrics.lines().find(|l| l.starts_with("keybroker_octopus_credential_expiry_timestamp_seconds ")).unwrap();
    let at: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((at - (chrono::Utc::now() + chrono::Duration::days(15)).timestamp()).abs() < 120, "{line}");
    // Keys never outlive it: asking for more is refused with the reason.
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "too long", "ttl": "20d"})).await;
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("own Octopus credential"), "{problem}");
    assert!(app.keybroker_keys_in_octopus().is_empty());
}

#[tokio::test]
async fn an_expired_broker_credential_makes_the_service_not_ready() {
    let app = TestApp::spawn().await;
    app.sim.advance_clock(chrono::Duration::days(400));
    let res = app.readyz_now().await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    let octopus = body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "octopus").unwrap();
    assert_eq!(octopus["ok"], false);
    assert!(octopus["detail"].as_str().unwrap().contains("credential"), "{body}");
}

#[tokio::test]
async fn an_invalid_reload_is_refused_and_a_valid_one_applies_the_removal_rule() {
    let app = TestApp::spawn().await;
    let payments = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "before reload"})).await;
    let path = app.dir.path().join("keybroker.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let reload = || app.http.post(format!("{}/v1/admin/reload", app.url)).bearer_auth(app.admin()).send();

    assert_eq!(
        app.http.post(format!("{}/v1/admin/reload", app.url)).bearer_auth(app.alice()).send().await.unwrap().status(),
        403
    );

    // A value no typed field can hold: the file's text itself.
    std::fs::write(&path, crate::helpers::edit_once(&original, "max_ttl = \"30days\"", "max_ttl = \"thirty days\""))
        .unwrap();
    let res = reload().await.unwrap();
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("max_ttl"), "{problem}");
    let scopes: Value = app.get("/v1/scopes", &app.admin()).await.json().await.unwrap();
    assert_eq!(scopes["items"].as_array().unwrap().len(), 3, "the old policy stays");
    assert!(app.audit_events().await.iter().any(|e| e.action == "config.reload_refused"));

    // A valid file: a new scope, payments-deploy removed, and removed scopes' keys revoked.
    let mut file = ConfigFile::from_toml(&original).unwrap();
    file.scopes.retain(|s| s.name != "payments-deploy");
    file.scopes.extend(crate::helpers::entries::<keybroker::config::RawScope>(
        "[[entries]]\nname = \"data-export\"\noctopus_user = \"svc-readonly-reporting\"\nteams = [\"data\"]\n\
         default_ttl = \"1h\"\nmax_ttl = \"1d\"\n",
    ));
    file.lifecycle.on_scope_removed = keybroker::domain::policy::ScopeRemoval::Revoke;
    std::fs::write(&path, file.to_toml().unwrap()).unwrap();
    let res = reload().await.unwrap();
    assert_eq!(res.status(), 200);
    let report: Value = res.json().await.unwrap();
    assert_eq!(report["added"], json!(["data-export"]));
    assert_eq!(report["removed"], json!(["payments-deploy"]));
    assert_eq!(report["revoked"], 1);
    let read: Value =
        app.get(&format!("/v1/keys/{}", payments["id"].as_str().unwrap()), &app.alice()).await.json().await.unwrap();
    assert_eq!(read["state"], "revoked");
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "gone"})).await;
    assert_eq!(res.status(), 422);
    app.issue_ok(&app.token("dana@example.com", &["data"]), json!({"scope": "data-export", "purpose": "new scope"}))
        .await;
    assert!(app.audit_events().await.iter().any(|e| e.action == "config.reloaded"));
}

#[tokio::test]
async fn removed_scopes_keep_their_keys_by_default() {
    let app = TestApp::spawn().await;
    let web = app.issue_ok(&app.bob(), json!({"scope": "web-deploy", "purpose": "kept"})).await;
    let path = app.dir.path().join("keybroker.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let mut file = ConfigFile::from_toml(&original).unwrap();
    file.scopes.retain(|s| s.name != "web-deploy");
    assert_eq!(file.scopes.len(), 2);
    std::fs::write(&path, file.to_toml().unwrap()).unwrap();
    let res = app.http.post(format!("{}/v1/admin/reload", app.url)).bearer_auth(app.admin()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let report: Value = res.json().await.unwrap();
    assert_eq!(report["on_scope_removed"], "keep");
    assert_eq!(report["revoked"], 0);
    let read: Value =
        app.get(&format!("/v1/keys/{}", web["id"].as_str().unwrap()), &app.bob()).await.json().await.unwrap();
    assert_eq!(read["state"], "active");
    // The owner can still revoke it.
    assert_eq!(app.delete(&format!("/v1/keys/{}", web["id"].as_str().unwrap()), &app.bob()).await.status(), 200);
}

#[tokio::test]
async fn background_jobs_run_on_their_own_and_report_in_metrics() {
    let app = TestApp::spawn_with(TestOptions {
        configure: Box::new(|f| f.jobs.expiry_sweep_interval = crate::helpers::secs(1)),
        ..Default::default()
    })
    .await;
    let mut ran = false;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let metrics = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
        if metrics.contains(r#"keybroker_job_runs_total{job="expiry-sweep",outcome="ok"}"#) {
            assert!(metrics.contains(r#"keybroker_job_last_run_timestamp_seconds{job="expiry-sweep"}"#));
            ran = true;
            break;
        }
    }
    assert!(ran, "the expiry sweep did not run within 4 s of a 1 s interval");
}

#[tokio::test]
async fn two_replicas_on_one_database_never_send_a_notice_twice() {
    let Some((store, _guard)) = crate::helpers::postgres_store().await else { return };
    let sink = Sink::start().await;
    let clock = ManualClock::starting_now();
    let hook = |f: &mut ConfigFile, url: String| {
        f.webhooks.push(RawWebhook { name: Some("sink".to_owned()), url, unsigned: true, ..Default::default() });
    };
    let url_a = sink.url.clone();
    let url_b = sink.url.clone();
    let a = TestApp::spawn_with(TestOptions {
        store: Some(store.clone()),
        clock: Some(clock.clone()),
        configure: Box::new(move |f| hook(f, url_a)),
        ..Default::default()
    })
    .await;
    let b = TestApp::spawn_with(TestOptions {
        store: Some(store),
        clock: Some(clock.clone()),
        configure: Box::new(move |f| hook(f, url_b)),
        ..Default::default()
    })
    .await;
    a.issue_ok(&a.alice(), json!({"scope": "payments-deploy", "purpose": "replicated", "ttl": "25d"})).await;
    let ttl = chrono::Duration::minutes(1);
    for _ in 0..(27 * 2) {
        // Each replica runs its webhook job when it holds the lease, as `jobs::spawn_all` does.
        let run = |app: &TestApp, holder: &'static str| {
            let keys = app.state.keys.clone();
            let webhooks = webhooks_of(app);
            async move {
                if keys.store().try_lease("webhooks", holder, keys.now(), ttl).await.unwrap() {
                    enqueue_notices(&keys, &webhooks).await.unwrap();
                    deliver_due(&keys, &Webhook::all(&webhooks).unwrap()).await.unwrap();
                }
            }
        };
        tokio::join!(run(&a, "replica-a"), run(&b, "replica-b"));
        clock.advance(chrono::Duration::hours(12));
    }
    assert_one_notice_of_each_kind(&sink);
}

#[tokio::test]
async fn a_key_of_a_failed_issuance_found_later_is_revoked_without_waiting_for_an_admin() {
    let app = TestApp::spawn().await;
    let id = stage_pending(&app, chrono::Utc::now()).await;
    // The reconciler gave up on the record before Octopus made the key (a very slow create).
    let event = keybroker::domain::audit::NewAuditEvent::new(
        chrono::Utc::now(),
        "keybroker",
        keybroker::domain::audit::Action::KeyReconciled,
        keybroker::domain::audit::Outcome::Failure,
        &Default::default(),
    )
    .key(id);
    app.state.keys.store().mark_failed(id, &event).await.unwrap();
    let octopus_key = create_marked_key(&app, id).await;
    let report = keybroker::services::drift::scan(&app.state.keys, &keybroker::services::drift::DriftState::default())
        .await
        .unwrap();
    assert_eq!(report.orphans_revoked, vec![octopus_key]);
    assert!(report.unmanaged.is_empty());
    assert!(app.keybroker_keys_in_octopus().is_empty());
}

#[tokio::test]
async fn offboarding_schedules_keys_still_being_issued() {
    let app = TestApp::spawn().await;
    let id = stage_pending(&app, chrono::Utc::now()).await;
    let res = app
        .http
        .post(format!("{}/v1/keys/revoke", app.url))
        .bearer_auth(app.admin())
        .json(&json!({"requester": "alice@example.com"}))
        .send()
        .await
        .unwrap();
    let report: Value = res.json().await.unwrap();
    assert_eq!(report["results"][0]["outcome"], "scheduled", "{report}");
    // The issuance completes; the next reconciliation revokes it.
    let octopus_key = create_marked_key(&app, id).await;
    let activation = keybroker::domain::keys::Activation {
        id,
        octopus_key_id: octopus_key,
        key_hint: "API-XXXX".to_owned(),
        secret_hmac: "00".repeat(32),
        expires_at: chrono::Utc::now() + chrono::Duration::days(1),
    };
    let issued = keybroker::domain::audit::NewAuditEvent::new(
        chrono::Utc::now(),
        "alice@example.com",
        keybroker::domain::audit::Action::KeyIssued,
        keybroker::domain::audit::Outcome::Success,
        &Default::default(),
    )
    .key(id);
    app.state.keys.store().activate(&activation, &issued).await.unwrap();
    let retried = reconcile_once(&app.state.keys, std::time::Duration::from_secs(3600)).await.unwrap();
    assert_eq!(retried.revocations_retried, 1);
    assert!(app.keybroker_keys_in_octopus().is_empty());
}

#[tokio::test]
async fn drift_leaves_a_key_being_revoked_to_its_revoker_so_the_revoker_is_on_record() {
    let app = TestApp::spawn().await;
    let key = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "revoked by alice"})).await;
    let (id, octopus_id) = (key["id"].as_str().unwrap().to_owned(), key["octopus_key_id"].as_str().unwrap().to_owned());
    // Alice's revocation is under way (its delete is slow); meanwhile the key is already gone
    // from Octopus's listing, as it is once a delete has gone through.
    app.sim.inject(
        Fault::on(Method::DELETE, "/api/users/{id}/apikeys/{keyId}", FaultKind::Latency(Duration::from_millis(800)))
            .times(1),
    );
    let (url, alice, http, path) = (app.url.clone(), app.alice(), app.http.clone(), format!("/v1/keys/{id}"));
    let revoking =
        tokio::spawn(
            async move { http.delete(format!("{url}{path}")).bearer_auth(alice).send().await.unwrap().status() },
        );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(app.sim.delete_api_key_behind_the_back(&octopus_id));
    let report = keybroker::services::drift::scan(&app.state.keys, &keybroker::services::drift::DriftState::default())
        .await
        .unwrap();
    assert!(report.revoked_behind_back.is_empty(), "{report:?}");
    assert_eq!(report.left_to_revoker.len(), 1);
    assert_eq!(revoking.await.unwrap(), 200);
    let events = app.audit_events().await;
    let revoked: Vec<_> = events.iter().filter(|e| e.action == "key.revoked").collect();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0].actor, "alice@example.com", "the person who revoked is on record");
}
