//! The core path: issue, use, list, read and revoke keys, and how Octopus failures surface.

use std::time::Duration;

use chrono::{DateTime, Utc};
use octopus_sim::{Fault, FaultKind, Seed, SeedUser};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestOptions};

const CREATE_ROUTE: &str = "POST /api/users/{id}/apikeys";

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap().with_timezone(&Utc)
}

async fn problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status(), status);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert!(body["type"].as_str().unwrap().starts_with("urn:keybroker:problem:"));
    assert!(body["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    body
}

#[tokio::test]
async fn an_issued_key_is_returned_once_and_works_in_octopus() {
    let app = TestApp::spawn().await;
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "deploy pipeline"})).await;
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = res.json().await.unwrap();
    assert_eq!(location, format!("/v1/keys/{}", body["id"].as_str().unwrap()));
    assert_eq!(body["state"], "active");
    assert_eq!(body["scope"], "payments-deploy");
    assert_eq!(body["requester"], "alice@example.com");
    let secret = body["api_key"].as_str().unwrap();
    assert!(secret.starts_with("API-"));
    assert_eq!(body["key_hint"], &secret[..8]);

    // The key works in Octopus, as the scope's service account.
    let me = app.octopus_me(secret).await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.unwrap();
    assert_eq!(me["Username"], "svc-payments-deploy");
    assert_eq!(me["Id"], body["octopus_user_id"]);

    // Reading it back never shows the secret again.
    let again: Value = app.get(&location, &app.alice()).await.json().await.unwrap();
    assert_eq!(again["id"], body["id"]);
    assert!(again.get("api_key").is_none());
    let list: Value = app.get("/v1/keys", &app.alice()).await.json().await.unwrap();
    assert!(list.to_string().find(secret).is_none());
}

#[tokio::test]
async fn the_octopus_key_carries_an_explicit_expiry_equal_to_the_record() {
    let app = TestApp::spawn().await;
    let body =
        app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "release 1.2", "ttl": "36h"})).await;
    let keys = app.keybroker_keys_in_octopus();
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!(key.id, body["octopus_key_id"].as_str().unwrap());
    assert_eq!(key.expires, Some(time(&body["expires_at"])));
    let lifetime = time(&body["expires_at"]) - time(&body["created_at"]);
    assert!((lifetime - chrono::Duration::hours(36)).num_seconds().abs() <= 1, "lifetime {lifetime}");
    // The purpose ties the Octopus key to the record and the requester.
    let id = body["id"].as_str().unwrap();
    assert_eq!(key.purpose, format!("keybroker:{id} alice@example.com: release 1.2"));
}

#[tokio::test]
async fn without_an_expiry_the_scope_default_applies() {
    let app = TestApp::spawn().await;
    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "default"})).await;
    let lifetime = time(&body["expires_at"]) - time(&body["created_at"]);
    assert!((lifetime - chrono::Duration::days(7)).num_seconds().abs() <= 1, "lifetime {lifetime}");
}

#[tokio::test]
async fn an_explicit_expires_at_is_honoured() {
    let app = TestApp::spawn().await;
    let at = (Utc::now() + chrono::Duration::days(3)).format("%Y-%m-%dT%H:%M:%S+02:00").to_string();
    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p", "expires_at": at})).await;
    let wanted = DateTime::parse_from_rfc3339(&at).unwrap().with_timezone(&Utc);
    assert_eq!(time(&body["expires_at"]), wanted);
    assert_eq!(app.keybroker_keys_in_octopus()[0].expires, Some(wanted));
}

#[tokio::test]
async fn issuing_beyond_max_ttl_is_refused_and_creates_nothing_in_octopus() {
    let app = TestApp::spawn().await;
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p", "ttl": "31d"})).await;
    let body = problem(res, 422).await;
    assert!(body["detail"].as_str().unwrap().contains("maximum lifetime"));
    let past = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p", "expires_at": past})).await;
    problem(res, 422).await;
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 0);
    assert!(app.keybroker_keys_in_octopus().is_empty());
    let list: Value = app.get("/v1/keys", &app.admin()).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_team_outsider_is_refused_and_the_denial_is_audited() {
    let app = TestApp::spawn().await;
    let res = app.issue(&app.bob(), json!({"scope": "payments-deploy", "purpose": "not my team"})).await;
    let body = problem(res, 403).await;
    assert!(body["detail"].as_str().unwrap().contains("payments-deploy"));
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 0);
    let events = app.audit_events().await;
    let denial = events.iter().find(|e| e.action == "policy.denied").expect("denial audited");
    assert_eq!(denial.actor, "bob@example.com");
    assert_eq!(denial.outcome, "denied");
    assert_eq!(denial.scope.as_deref(), Some("payments-deploy"));
}

#[tokio::test]
async fn admins_may_request_any_scope_and_unknown_scopes_are_422_never_404() {
    let app = TestApp::spawn().await;
    app.issue_ok(&app.admin(), json!({"scope": "web-deploy", "purpose": "admin"})).await;
    let res = app.issue(&app.admin(), json!({"scope": "no-such-scope", "purpose": "x"})).await;
    // External Secrets Operator takes a 404 for "the secret was deleted".
    let body = problem(res, 422).await;
    assert_eq!(body["type"], "urn:keybroker:problem:unknown-scope");
    assert_eq!(body["reasons"][0]["rule"], "scope");
}

#[tokio::test]
async fn the_active_key_limit_per_requester_holds() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": format!("k{i}")})).await;
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "one too many"})).await;
    let body = problem(res, 422).await;
    assert!(body["detail"].as_str().unwrap().contains("3 active keys"));
    assert_eq!(app.keybroker_keys_in_octopus().len(), 3);
    // The limit is per requester and per scope.
    app.issue_ok(&app.token("carol@example.com", &["payments"]), json!({"scope": "payments-deploy", "purpose": "c"}))
        .await;
    app.issue_ok(&app.alice(), json!({"scope": "reporting-readonly", "purpose": "other scope"})).await;
    // Revoking one frees a slot.
    assert_eq!(app.delete(&format!("/v1/keys/{}", ids[0]), &app.alice()).await.status(), 200);
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "after revoke"})).await;
}

#[tokio::test]
async fn revoking_stops_the_key_and_is_idempotent() {
    let app = TestApp::spawn().await;
    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "short-lived"})).await;
    let secret = body["api_key"].as_str().unwrap();
    let path = format!("/v1/keys/{}", body["id"].as_str().unwrap());
    assert_eq!(app.octopus_me(secret).await.status(), 200);

    let res = app.delete(&path, &app.alice()).await;
    assert_eq!(res.status(), 200);
    let revoked: Value = res.json().await.unwrap();
    assert_eq!(revoked["state"], "revoked");
    assert!(revoked["revoked_at"].is_string());
    assert_eq!(app.octopus_me(secret).await.status(), 401);
    assert!(app.keybroker_keys_in_octopus().is_empty());

    let again = app.delete(&path, &app.alice()).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["revoked_at"], revoked["revoked_at"]);
    assert_eq!(app.sim.request_count("DELETE /api/users/{id}/apikeys/{keyId}"), 1);
    // Octopus is asked once; the second revocation is on record as already done.
    let revocations: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "key.revoked").collect();
    assert_eq!(revocations.len(), 2);
    assert_eq!(revocations[1].detail["result"], "already_revoked");
}

#[tokio::test]
async fn a_key_already_gone_from_octopus_is_marked_revoked() {
    let app = TestApp::spawn().await;
    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p"})).await;
    assert!(app.sim.delete_api_key_behind_the_back(body["octopus_key_id"].as_str().unwrap()));
    let res = app.delete(&format!("/v1/keys/{}", body["id"].as_str().unwrap()), &app.alice()).await;
    assert_eq!(res.status(), 200);
    let revoked: Value = res.json().await.unwrap();
    assert_eq!(revoked["state"], "revoked");
    let event = app.audit_events().await.into_iter().find(|e| e.action == "key.revoked").unwrap();
    assert_eq!(event.detail["octopus"], "already_gone");
}

#[tokio::test]
async fn only_the_owner_or_an_admin_may_revoke() {
    let app = TestApp::spawn().await;
    let body = app.issue_ok(&app.alice(), json!({"scope": "reporting-readonly", "purpose": "p"})).await;
    let path = format!("/v1/keys/{}", body["id"].as_str().unwrap());
    // Another requester cannot even see it.
    problem(app.get(&path, &app.bob()).await, 404).await;
    problem(app.delete(&path, &app.bob()).await, 404).await;
    // An auditor can read it but not revoke it.
    assert_eq!(app.get(&path, &app.auditor()).await.status(), 200);
    problem(app.delete(&path, &app.auditor()).await, 403).await;
    assert_eq!(app.keybroker_keys_in_octopus().len(), 1);
    // An admin can.
    assert_eq!(app.delete(&path, &app.admin()).await.status(), 200);
    assert!(app.keybroker_keys_in_octopus().is_empty());
}

#[tokio::test]
async fn requesters_list_their_own_keys_and_auditors_list_all_with_filters_and_cursors() {
    let app = TestApp::spawn().await;
    for i in 0..3 {
        app.issue_ok(&app.alice(), json!({"scope": "reporting-readonly", "purpose": format!("a{i}")})).await;
    }
    for i in 0..2 {
        app.issue_ok(&app.bob(), json!({"scope": "web-deploy", "purpose": format!("b{i}")})).await;
    }
    let mine: Value = app.get("/v1/keys", &app.alice()).await.json().await.unwrap();
    let mine = mine["items"].as_array().unwrap();
    assert_eq!(mine.len(), 3);
    assert!(mine.iter().all(|k| k["requester"] == "alice@example.com"));
    problem(app.get("/v1/keys?requester=bob@example.com", &app.alice()).await, 403).await;

    let all: Value = app.get("/v1/keys", &app.auditor()).await.json().await.unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 5);
    let web: Value = app.get("/v1/keys?scope=web-deploy", &app.auditor()).await.json().await.unwrap();
    assert_eq!(web["items"].as_array().unwrap().len(), 2);
    let bobs: Value =
        app.get("/v1/keys?requester=bob@example.com&state=active", &app.admin()).await.json().await.unwrap();
    assert_eq!(bobs["items"].as_array().unwrap().len(), 2);
    let revoked: Value = app.get("/v1/keys?state=revoked", &app.admin()).await.json().await.unwrap();
    assert_eq!(revoked["items"].as_array().unwrap().len(), 0);

    // Pages of two, newest first, cover all five exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/keys?limit=2&cursor={c}"),
            None => "/v1/keys?limit=2".to_owned(),
        };
        let page: Value = app.get(&path, &app.auditor()).await.json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["purpose"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, vec!["b1", "b0", "a2", "a1", "a0"]);
}

#[tokio::test]
async fn a_second_issuance_for_the_same_scope_makes_no_user_lookup() {
    let app = TestApp::spawn().await;
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "first"})).await;
    app.sim.reset_counters();
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "second"})).await;
    assert_eq!(app.sim.request_count("GET /api/users"), 0);
    assert_eq!(app.sim.request_count("GET /api/users/all"), 0);
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 1);
}

fn user(username: &str, display: &str, service: bool) -> SeedUser {
    SeedUser {
        username: username.to_owned(),
        display_name: Some(display.to_owned()),
        email: Some(format!("{}@example.com", username.replace(' ', "."))),
        is_service: service,
        is_active: true,
        can_edit_users: false,
        permissions: Vec::new(),
        password: None,
    }
}

#[tokio::test]
async fn the_right_service_account_is_found_among_thousands_of_confusable_users() {
    let mut seed = Seed::demo();
    seed.extra_users = 5000;
    // Accounts whose username, display name or e-mail contain the wanted name, enough of them
    // that Octopus's substring filter returns several pages.
    for i in 0..250 {
        seed.users.push(user(&format!("svc-payments-deploy-{i:03}"), "Payments deployer clone", true));
    }
    seed.users.push(user("svc-payments-deployer2", "svc-payments-deploy", true));
    seed.users.push(user("old-svc-payments-deploy", "Old payments deployer", true));
    seed.users.push(user("SVC-PAYMENTS-DEPLOY-X", "Shouting", true));
    let app = TestApp::spawn_with(TestOptions { seed, ..Default::default() }).await;
    let wanted = app.sim.user_id("svc-payments-deploy").unwrap();

    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "find me"})).await;
    assert_eq!(body["octopus_user_id"], wanted);
    let keys = app.keybroker_keys_in_octopus();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].user_id, wanted);
    assert_eq!(keys[0].username, "svc-payments-deploy");
}

#[tokio::test]
async fn me_and_scopes_describe_the_caller() {
    let app = TestApp::spawn().await;
    let me: Value = app.get("/v1/me", &app.alice()).await.json().await.unwrap();
    assert_eq!(me["subject"], "alice@example.com");
    assert_eq!(me["teams"], json!(["payments"]));
    assert_eq!(me["roles"], json!(["requester"]));
    let admin: Value = app.get("/v1/me", &app.admin()).await.json().await.unwrap();
    assert_eq!(admin["roles"], json!(["requester", "admin"]));
    let auditor: Value = app.get("/v1/me", &app.auditor()).await.json().await.unwrap();
    assert_eq!(auditor["roles"], json!(["requester", "auditor"]));

    let scopes: Value = app.get("/v1/scopes", &app.alice()).await.json().await.unwrap();
    let names: Vec<&str> = scopes["items"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["payments-deploy", "reporting-readonly"]);
    let payments = &scopes["items"][0];
    assert_eq!(payments["default_ttl_seconds"], 7 * 86400);
    assert_eq!(payments["max_ttl_seconds"], 30 * 86400);
    assert_eq!(payments["max_active_keys_per_requester"], 3);
    let all: Value = app.get("/v1/scopes", &app.admin()).await.json().await.unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn health_and_readiness_report_dependencies() {
    let app = TestApp::spawn().await;
    let health = app.http.get(format!("{}/healthz", app.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.readyz_now().await;
    assert_eq!(ready.status(), 200);

    // A scope whose service account was disabled is reported, with the reason; the replica
    // stays ready for the other scopes.
    assert!(app.sim.set_user_active("svc-web-deploy", false));
    let ready = app.readyz_now().await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    let check = body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "scope:web-deploy").unwrap();
    assert_eq!(check["ok"], false);
    assert!(check["detail"].as_str().unwrap().contains("disabled"));
    assert!(app.sim.set_user_active("svc-web-deploy", true));

    // Octopus refusing the broker credential is reported too.
    app.sim.inject(Fault::on(
        Method::GET,
        "/api/users/me",
        FaultKind::Status {
            status: 401,
            error_message:
                "You must be logged in to perform this action. Please provide a valid API key or log in again."
                    .to_owned(),
        },
    ));
    let ready = app.readyz_now().await;
    assert_eq!(ready.status(), 503);
}

async fn assert_nothing_left_in_octopus(app: &TestApp) {
    assert!(app.keybroker_keys_in_octopus().is_empty(), "a keybroker key exists in Octopus without a record");
    let verify: Value = app.get("/v1/audit/verify", &app.auditor()).await.json().await.unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
}

#[tokio::test]
async fn an_octopus_server_error_on_create_is_502_and_the_record_fails() {
    let app = TestApp::spawn().await;
    app.sim.inject(
        Fault::on(
            Method::POST,
            "/api/users/{id}/apikeys",
            FaultKind::Status {
                status: 500,
                error_message: "Object reference not set to an instance of an object.".to_owned(),
            },
        )
        .times(1),
    );
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p"})).await;
    problem(res, 502).await;
    // Never retried: a retry could create a second key.
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 1);
    let failed: Value = app.get("/v1/keys?state=failed", &app.alice()).await.json().await.unwrap();
    assert_eq!(failed["items"].as_array().unwrap().len(), 1);
    assert_nothing_left_in_octopus(&app).await;
}

#[tokio::test]
async fn an_octopus_validation_error_is_422_with_octopus_message() {
    let app = TestApp::spawn().await;
    app.sim.inject(
        Fault::on(
            Method::POST,
            "/api/users/{id}/apikeys",
            FaultKind::Status { status: 400, error_message: "There was a problem with your request.".to_owned() },
        )
        .times(1),
    );
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p"})).await;
    let body = problem(res, 422).await;
    assert!(body["detail"].as_str().unwrap().contains("There was a problem with your request."));
}

#[tokio::test]
async fn a_refused_broker_credential_is_503_and_rate_limiting_is_not_retried_on_create() {
    let app = TestApp::spawn().await;
    app.sim.inject(
        Fault::on(
            Method::POST,
            "/api/users/{id}/apikeys",
            FaultKind::Status {
                status: 401,
                error_message:
                    "You must be logged in to perform this action. Please provide a valid API key or log in again."
                        .to_owned(),
            },
        )
        .times(1),
    );
    let body = problem(app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p"})).await, 503).await;
    assert!(body["detail"].as_str().unwrap().contains("credential"));

    app.sim.reset_counters();
    app.sim.inject(
        Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::RateLimited { retry_after_secs: 7 }).times(1),
    );
    problem(app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p"})).await, 503).await;
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 1);
    assert_nothing_left_in_octopus(&app).await;
}

#[tokio::test]
async fn a_lost_create_response_leaves_no_key_behind() {
    let app = TestApp::spawn().await;
    app.sim.inject(Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::LoseResponseAfterCreate).times(1));
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "lost"})).await;
    assert!(res.status().is_server_error());
    problem(res, 502).await;
    assert_nothing_left_in_octopus(&app).await;
    let failed: Value = app.get("/v1/keys?state=failed", &app.alice()).await.json().await.unwrap();
    assert_eq!(failed["items"].as_array().unwrap().len(), 1);
    let event = app.audit_events().await.into_iter().find(|e| e.action == "key.issue_failed").unwrap();
    assert_eq!(event.detail["revoked_orphans"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_octopus_timeout_is_504_and_leaves_no_key_behind() {
    let app = TestApp::spawn_with(TestOptions {
        configure: Box::new(|f| crate::helpers::octopus(f).timeout = crate::helpers::secs(1)),
        ..Default::default()
    })
    .await;
    app.sim.inject(
        Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::Latency(Duration::from_millis(1500))).times(1),
    );
    problem(app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "slow"})).await, 504).await;
    // The slow create still made a key after we gave up; the clean-up found and revoked it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let leftover = app.keybroker_keys_in_octopus();
    if !leftover.is_empty() {
        // The clean-up may have run before the slow create finished; then the record stays
        // pending for the reconciler, never active.
        let pending: Value = app.get("/v1/keys?state=pending", &app.alice()).await.json().await.unwrap();
        assert_eq!(pending["items"].as_array().unwrap().len(), 1);
    }
    let active: Value = app.get("/v1/keys?state=active", &app.alice()).await.json().await.unwrap();
    assert_eq!(active["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn identify_finds_the_record_of_a_leaked_secret() {
    let app = TestApp::spawn().await;
    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "leaky"})).await;
    let secret = body["api_key"].as_str().unwrap();
    let identify = |token: String, key: String| {
        let http = app.http.clone();
        let url = format!("{}/v1/keys/identify", app.url);
        async move { http.post(url).bearer_auth(token).json(&json!({"api_key": key})).send().await.unwrap() }
    };
    let res = identify(app.auditor(), secret.to_owned()).await;
    assert_eq!(res.status(), 200);
    let found: Value = res.json().await.unwrap();
    assert_eq!(found["id"], body["id"]);
    assert!(found.get("api_key").is_none());
    problem(identify(app.auditor(), "API-NOTAKEYKEYBROKERISSUED0000".to_owned()).await, 404).await;
    problem(identify(app.alice(), secret.to_owned()).await, 403).await;
    let lookups: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "secret.identified").collect();
    assert_eq!(lookups.len(), 2, "each identification is audited");
    assert_eq!(lookups[0].actor, "sam@example.com");
    assert_eq!(lookups[0].key_id.map(|k| k.to_string()).as_deref(), body["id"].as_str());
    assert_eq!(lookups[1].outcome, "failure");
    assert!(!format!("{lookups:?}").contains(secret), "the secret is not audited");
}

#[tokio::test]
async fn the_audit_trail_records_the_issuance_and_verifies() {
    let app = TestApp::spawn().await;
    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "audited"})).await;
    let id = body["id"].as_str().unwrap();
    let page: Value = app.get(&format!("/v1/audit?key_id={id}"), &app.auditor()).await.json().await.unwrap();
    let actions: Vec<&str> = page["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, vec!["key.issued", "key.requested"]);
    let issued = &page["items"][0];
    assert_eq!(issued["actor"], "alice@example.com");
    assert_eq!(issued["octopus_key_id"], body["octopus_key_id"]);
    assert!(issued["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    problem(app.get("/v1/audit", &app.alice()).await, 403).await;
    let verify: Value = app.get("/v1/audit/verify", &app.auditor()).await.json().await.unwrap();
    assert_eq!(verify["ok"], true);
    assert!(verify["events_checked"].as_u64().unwrap() >= 3);
}

#[tokio::test]
async fn shutting_down_lets_an_issuance_in_flight_finish() {
    let app = TestApp::spawn().await;
    app.sim.inject(
        Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::Latency(Duration::from_millis(500))).times(1),
    );
    let http = app.http.clone();
    let url = format!("{}/v1/keys", app.url);
    let token = app.alice();
    let in_flight = tokio::spawn(async move {
        http.post(url).bearer_auth(token).json(&json!({"scope": "payments-deploy", "purpose": "slow"})).send().await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let sim = app.sim.clone();
    let url = app.url.clone();
    let store = app.state.keys.store().clone();
    app.stop().await;
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(sim.api_keys().iter().filter(|k| k.purpose.starts_with("keybroker:")).count(), 1);
    // And the server no longer accepts connections, and its database pool is closed.
    assert!(reqwest::get(format!("{url}/healthz")).await.is_err());
    assert!(store.ping().await.is_err());
}
