//! `Idempotency-Key` on `POST /v1/keys`: retries never make a second Octopus key.

use octopus_sim::{Fault, FaultKind};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::TestApp;

const CREATE_ROUTE: &str = "POST /api/users/{id}/apikeys";

async fn issue_with_key(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/keys", app.url))
        .bearer_auth(app.alice())
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_retry_with_the_same_key_and_body_returns_the_first_record_without_the_secret() {
    let app = TestApp::spawn().await;
    let body = json!({"scope": "payments-deploy", "purpose": "pipeline 42", "ttl": "1d"});
    let first = issue_with_key(&app, "build-42", body.clone()).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    assert!(first["api_key"].is_string());

    let retry = issue_with_key(&app, "build-42", body).await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry["id"], first["id"]);
    assert_eq!(retry["octopus_key_id"], first["octopus_key_id"]);
    assert!(retry.get("api_key").is_none(), "the secret is only in the first response");
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 1);
    assert_eq!(app.keybroker_keys_in_octopus().len(), 1);

    // Another requester's identical key is theirs alone.
    let res = app
        .http
        .post(format!("{}/v1/keys", app.url))
        .bearer_auth(app.token("carol@example.com", &["payments"]))
        .header("Idempotency-Key", "build-42")
        .json(&json!({"scope": "payments-deploy", "purpose": "pipeline 42", "ttl": "1d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
}

#[tokio::test]
async fn the_same_key_with_another_body_is_refused() {
    let app = TestApp::spawn().await;
    let res = issue_with_key(&app, "k", json!({"scope": "payments-deploy", "purpose": "a"})).await;
    assert_eq!(res.status(), 201);
    let res = issue_with_key(&app, "k", json!({"scope": "payments-deploy", "purpose": "b"})).await;
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("Idempotency-Key"));
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 1);
}

#[tokio::test]
async fn racing_retries_make_exactly_one_octopus_key() {
    let app = TestApp::spawn().await;
    app.sim.inject(
        Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::Latency(std::time::Duration::from_millis(300)))
            .times(1),
    );
    let body = json!({"scope": "payments-deploy", "purpose": "race"});
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let http = app.http.clone();
            let url = format!("{}/v1/keys", app.url);
            let token = app.alice();
            let body = body.clone();
            tokio::spawn(async move {
                let res = http
                    .post(url)
                    .bearer_auth(token)
                    .header("Idempotency-Key", "same")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (res.status().as_u16(), res.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        match status {
            201 => created += 1,
            200 => assert!(body.get("api_key").is_none()),
            other => panic!("unexpected {other}: {body}"),
        }
        ids.insert(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 1);
    assert_eq!(app.keybroker_keys_in_octopus().len(), 1);
}

#[tokio::test]
async fn a_retry_after_a_transient_failure_gets_its_key_with_the_same_idempotency_key() {
    let app = TestApp::spawn().await;
    app.sim.inject(
        Fault::on(
            Method::POST,
            "/api/users/{id}/apikeys",
            FaultKind::Status { status: 500, error_message: "boom".to_owned() },
        )
        .times(1),
    );
    let body = json!({"scope": "payments-deploy", "purpose": "flaky"});
    assert_eq!(issue_with_key(&app, "once", body.clone()).await.status(), 502);
    assert!(app.keybroker_keys_in_octopus().is_empty());
    // The retry runs the issuance again and gets the key; a second retry replays it.
    let res = issue_with_key(&app, "once", body.clone()).await;
    assert_eq!(res.status(), 201);
    let issued: Value = res.json().await.unwrap();
    assert_eq!(app.octopus_me(issued["api_key"].as_str().unwrap()).await.status(), 200);
    let again = issue_with_key(&app, "once", body.clone()).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], issued["id"]);
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 2);
    assert_eq!(app.keybroker_keys_in_octopus().len(), 1);
    // Another body with that key is still refused.
    let other = issue_with_key(&app, "once", json!({"scope": "payments-deploy", "purpose": "other"})).await;
    assert_eq!(other.status(), 422);
}

#[tokio::test]
async fn a_retry_with_another_body_after_a_failure_is_refused() {
    let app = TestApp::spawn().await;
    app.sim.inject(
        Fault::on(
            Method::POST,
            "/api/users/{id}/apikeys",
            FaultKind::Status { status: 500, error_message: "boom".to_owned() },
        )
        .times(1),
    );
    assert_eq!(issue_with_key(&app, "k", json!({"scope": "payments-deploy", "purpose": "a"})).await.status(), 502);
    let res = issue_with_key(&app, "k", json!({"scope": "payments-deploy", "purpose": "b"})).await;
    assert_eq!(res.status(), 422);
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 1);
}

#[tokio::test]
async fn malformed_idempotency_keys_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let body = json!({"scope": "payments-deploy", "purpose": "bad key"});
    for bad in ["", "   ", &"x".repeat(256)] {
        let res = issue_with_key(&app, bad, body.clone()).await;
        assert_eq!(res.status(), 400, "{bad:?}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    let res = app
        .http
        .post(format!("{}/v1/keys", app.url))
        .bearer_auth(app.alice())
        .header("Idempotency-Key", reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = app
        .http
        .post(format!("{}/v1/keys", app.url))
        .bearer_auth(app.alice())
        .header("Idempotency-Key", "one")
        .header("Idempotency-Key", "two")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(app.sim.request_count(CREATE_ROUTE), 0);
}
