//! Every issuance has a deadline, and a key whose secret nobody would receive never stays.

use std::time::Duration;

use octopus_sim::{Fault, FaultKind};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestOptions};

#[tokio::test]
async fn a_look_up_that_outlasts_the_deadline_creates_nothing_and_says_so() {
    let app = TestApp::spawn_with(TestOptions {
        configure: Box::new(|f| {
            crate::helpers::octopus(f).timeout = crate::helpers::secs(2);
            f.server.request_timeout = crate::helpers::secs(10);
        }),
        ..Default::default()
    })
    .await;
    // The account is looked up afresh, and Octopus's user list hangs past each call's timeout.
    app.state.keys.octopus().forget_user("svc-payments-deploy");
    app.sim.inject(Fault::on(Method::GET, "/api/users", FaultKind::Latency(Duration::from_secs(3))));
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "slow look-up"})).await;
    assert_eq!(res.status(), 503, "answered before the request's own timeout (408)");
    let problem: Value = res.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("ran out of time") && detail.contains("nothing was created"), "{detail}");
    assert_eq!(app.sim.request_count("POST /api/users/{id}/apikeys"), 0);
    let listed: Value = app.get("/v1/keys", &app.admin()).await.json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty(), "{listed}");
}

#[tokio::test]
async fn a_key_made_after_the_caller_hung_up_is_deleted_and_named() {
    let app = TestApp::spawn().await;
    app.sim.inject(Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::Latency(Duration::from_millis(1500))));
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let res = impatient
        .post(format!("{}/v1/keys", app.url))
        .bearer_auth(app.alice())
        .json(&json!({"scope": "payments-deploy", "purpose": "hung up"}))
        .send()
        .await;
    assert!(res.is_err(), "the caller was meant to give up");
    let mut abandoned = None;
    for _ in 0..100 {
        let events = app.audit_events().await;
        if let Some(e) = events.into_iter().find(|e| e.action == "key.issue_abandoned") {
            abandoned = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let event = abandoned.expect("a key.issue_abandoned event");
    assert!(event.octopus_key_id.is_some(), "it names the Octopus key: {event:?}");
    assert_eq!(event.detail["octopus_key_deleted"], true);
    assert!(app.keybroker_keys_in_octopus().is_empty(), "a key nobody received survived");
    let record: Value =
        app.get(&format!("/v1/keys/{}", event.key_id.unwrap()), &app.alice()).await.json().await.unwrap();
    assert_eq!(record["state"], "failed");
}

#[tokio::test]
async fn the_reconciler_leaves_a_pending_record_alone_until_its_issuance_deadline() {
    let app = TestApp::spawn().await;
    app.sim.inject(Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::Latency(Duration::from_millis(1500))));
    let (url, alice, http) = (app.url.clone(), app.alice(), app.http.clone());
    let issuing = tokio::spawn(async move {
        http.post(format!("{url}/v1/keys"))
            .bearer_auth(alice)
            .json(&json!({"scope": "payments-deploy", "purpose": "slow but alive"}))
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A reconciler with no grace at all: the record is pending and older than the cutoff, but
    // its issuance is within its deadline.
    let report = keybroker::services::jobs::reconcile_once(&app.state.keys, Duration::ZERO).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(issuing.await.unwrap(), 201, "the live issuance got its key");
    let events: Vec<Value> = app.audit_events().await.iter().map(|e| json!(e.action)).collect();
    assert!(
        !events.contains(&json!("key.issue_abandoned")) && !events.contains(&json!("key.reconciled")),
        "{events:?}"
    );
}
