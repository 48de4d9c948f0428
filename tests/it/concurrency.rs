//! Issuance under concurrency, and the core path on PostgreSQL, through the real HTTP API.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::{BackendGuard, TestApp, TestOptions, postgres_store};

/// The app on SQLite (its default file) and, when configured, on PostgreSQL.
async fn apps() -> Vec<(&'static str, TestApp, Option<BackendGuard>)> {
    let mut out = vec![("sqlite", TestApp::spawn().await, None)];
    if let Some((store, guard)) = postgres_store().await {
        let app = TestApp::spawn_with(TestOptions { store: Some(store), ..Default::default() }).await;
        out.push(("postgres", app, Some(BackendGuard::Postgres(guard))));
    }
    out
}

#[tokio::test]
async fn a_hundred_simultaneous_issuances_from_a_hundred_requesters_all_succeed() {
    for (name, app, _guard) in apps().await {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let token = app.token(&format!("user{i:03}@example.com"), &["payments"]);
                let http = app.http.clone();
                let url = format!("{}/v1/keys", app.url);
                tokio::spawn(async move {
                    let res = http
                        .post(url)
                        .bearer_auth(token)
                        .json(&json!({"scope": "payments-deploy", "purpose": format!("load {i}")}))
                        .send()
                        .await
                        .unwrap();
                    let status = res.status().as_u16();
                    (status, res.json::<Value>().await.unwrap())
                })
            })
            .collect();
        let mut octopus_ids = HashSet::new();
        for task in tasks {
            let (status, body) = task.await.unwrap();
            assert_eq!(status, 201, "{name}: {body}");
            octopus_ids.insert(body["octopus_key_id"].as_str().unwrap().to_owned());
        }
        assert_eq!(octopus_ids.len(), 100, "{name}");
        assert_eq!(app.keybroker_keys_in_octopus().len(), 100, "{name}");
        let events = app.audit_events().await;
        assert_eq!(events.iter().filter(|e| e.action == "key.issued").count(), 100, "{name}");
        assert_eq!(events.iter().filter(|e| e.action == "key.requested").count(), 100, "{name}");
        let verify: Value = app.get("/v1/audit/verify", &app.auditor()).await.json().await.unwrap();
        assert_eq!(verify["ok"], true, "{name}: {verify}");
    }
}

#[tokio::test]
async fn ten_simultaneous_requests_of_one_requester_yield_exactly_the_limit() {
    for (name, app, _guard) in apps().await {
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let token = app.alice();
                let http = app.http.clone();
                let url = format!("{}/v1/keys", app.url);
                tokio::spawn(async move {
                    http.post(url)
                        .bearer_auth(token)
                        .json(&json!({"scope": "payments-deploy", "purpose": format!("race {i}")}))
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.push(task.await.unwrap());
        }
        assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 3, "{name}: {statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 422).count(), 7, "{name}: {statuses:?}");
        assert_eq!(app.keybroker_keys_in_octopus().len(), 3, "{name}");
    }
}

#[tokio::test]
async fn issue_list_revoke_and_audit_work_the_same_on_every_backend() {
    for (name, app, _guard) in apps().await {
        let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": name})).await;
        let secret = body["api_key"].as_str().unwrap();
        assert_eq!(app.octopus_me(secret).await.status(), 200, "{name}");
        let list: Value = app.get("/v1/keys", &app.alice()).await.json().await.unwrap();
        assert_eq!(list["items"][0]["id"], body["id"], "{name}");
        assert_eq!(list["items"][0]["expires_at"], body["expires_at"], "{name}");
        let path = format!("/v1/keys/{}", body["id"].as_str().unwrap());
        let revoked: Value = app.delete(&path, &app.alice()).await.json().await.unwrap();
        assert_eq!(revoked["state"], "revoked", "{name}");
        assert_eq!(app.octopus_me(secret).await.status(), 401, "{name}");
        let audit: Value = app.get("/v1/audit?action=key.revoked", &app.auditor()).await.json().await.unwrap();
        assert_eq!(audit["items"].as_array().unwrap().len(), 1, "{name}");
        let verify: Value = app.get("/v1/audit/verify", &app.auditor()).await.json().await.unwrap();
        assert_eq!(verify["ok"], true, "{name}");
        assert_eq!(verify["events_checked"], 4, "{name}: config, requested, issued, revoked");
    }
}

#[tokio::test]
async fn control_characters_in_filters_and_scopes_are_client_errors_on_every_backend() {
    for (name, app, _guard) in apps().await {
        for path in
            ["/v1/keys?scope=%00", "/v1/keys?team=a%00b", "/v1/audit?actor=%00", "/v1/audit?action=key.%01issued"]
        {
            let res = app.get(path, &app.auditor()).await;
            assert_eq!(res.status(), 400, "{name}: {path}");
        }
        let res = app.issue(&app.alice(), serde_json::json!({"scope": "payments-deploy\u{0}", "purpose": "p"})).await;
        assert_eq!(res.status(), 422, "{name}");
        let res = app.issue(&app.alice(), serde_json::json!({"scope": "x".repeat(10_000), "purpose": "p"})).await;
        assert_eq!(res.status(), 422, "{name}");
        let verify: Value = app.get("/v1/audit/verify", &app.auditor()).await.json().await.unwrap();
        assert_eq!(verify["ok"], true, "{name}");
        let denial = app.audit_events().await.into_iter().rev().find(|e| e.action == "policy.denied").unwrap();
        assert!(denial.scope.is_none(), "{name}: unknown scope text is not recorded as a scope");
        assert!(denial.detail["reason"].as_str().unwrap().len() < 200, "{name}");
    }
}

#[tokio::test]
async fn every_revocation_is_on_record_even_when_another_got_there_first() {
    let app = crate::helpers::TestApp::spawn().await;
    let issued = app.issue_ok(&app.alice(), serde_json::json!({"scope": "payments-deploy", "purpose": "twice"})).await;
    let path = format!("/v1/keys/{}", issued["id"].as_str().unwrap());
    let (alice, admin) = (app.alice(), app.admin());
    let (a, b) = tokio::join!(app.delete(&path, &alice), app.delete(&path, &admin));
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let again = app.delete(&path, &app.alice()).await;
    assert_eq!(again.status(), 200);
    let revoked: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "key.revoked").collect();
    assert_eq!(revoked.len(), 3, "one event per revocation: {revoked:?}");
    let actors: std::collections::BTreeSet<&str> = revoked.iter().map(|e| e.actor.as_str()).collect();
    assert!(actors.contains("alice@example.com") && actors.contains("root@example.com"), "{actors:?}");
    let repeats = revoked.iter().filter(|e| e.detail["result"] == "already_revoked").count();
    assert_eq!(repeats, 2);
}
