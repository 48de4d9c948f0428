//! Policy reloads converge across replicas: a reload through one replica reaches the other within
//! `jobs.policy_sync_interval`, and the admin view of readiness shows each replica's version.

use std::time::Duration;

use serde_json::{Value, json};

use keybroker::domain::policy::ScopeRemoval;

use crate::helpers::{TestApp, TestOptions, backends, second_store};

fn options(store: std::sync::Arc<dyn keybroker::store::Store>) -> TestOptions {
    TestOptions {
        store: Some(store),
        configure: Box::new(|f| {
            f.jobs.policy_sync_interval = crate::helpers::secs(1);
            f.lifecycle.on_scope_removed = ScopeRemoval::Revoke;
        }),
        ..Default::default()
    }
}

/// The configuration file without its `web-deploy` scope.
fn without_web_deploy(text: &str) -> String {
    let mut file = keybroker::config::ConfigFile::from_toml(text).unwrap();
    let before = file.scopes.len();
    file.scopes.retain(|s| s.name != "web-deploy");
    assert_eq!(file.scopes.len(), before - 1, "the file has no web-deploy scope");
    file.to_toml().unwrap()
}

async fn policy_check(app: &TestApp) -> Value {
    let res = app.http.get(format!("{}/readyz", app.url)).bearer_auth(app.admin()).send().await.unwrap();
    let body: Value = res.json().await.unwrap();
    body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "policy").cloned().unwrap()
}

#[tokio::test]
async fn a_reload_through_one_replica_reaches_the_other_within_the_interval_on_both_backends() {
    for (name, store, guard) in backends().await {
        let a = TestApp::spawn_with(options(store)).await;
        let b = TestApp::spawn_with(options(second_store(&guard).await)).await;
        let bob = b.bob();
        b.issue_ok(&bob, json!({"scope": "web-deploy", "purpose": "before the reload"})).await;

        let path = a.dir.path().join("keybroker.toml");
        std::fs::write(&path, without_web_deploy(&std::fs::read_to_string(&path).unwrap())).unwrap();
        let res = a.http.post(format!("{}/v1/admin/reload", a.url)).bearer_auth(a.admin()).send().await.unwrap();
        assert_eq!(res.status(), 200, "{name}");
        let report: Value = res.json().await.unwrap();
        assert_eq!(report["removed"], json!(["web-deploy"]), "{name}");

        // b has its own file, unchanged: it refuses the scope once it has taken a's policy.
        let started = std::time::Instant::now();
        let dry_run = json!({"scope": "web-deploy", "purpose": "after the reload", "dry_run": true});
        loop {
            let res = b.issue(&bob, dry_run.clone()).await;
            let (status, verdict) = (res.status(), res.json::<Value>().await.unwrap());
            if status == 200 && verdict["allowed"] == true {
                assert!(started.elapsed() < Duration::from_secs(8), "{name}: b still allows the removed scope");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let refused = verdict.to_string();
            assert!(refused.contains("does not exist"), "{name}: {refused}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{name}: took {:?}", started.elapsed());
        let res = b.issue(&bob, json!({"scope": "web-deploy", "purpose": "after the reload"})).await;
        assert_eq!(res.status(), 422, "{name}");
        assert_eq!(res.json::<Value>().await.unwrap()["type"], "urn:keybroker:problem:unknown-scope", "{name}");
        let took = b.audit_events().await;
        assert!(took.iter().any(|e| e.action == "config.reloaded" && e.detail["source"] == "database"), "{name}");

        // The admin view of readiness: both replicas, one version.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let check = policy_check(&b).await;
        assert_eq!(check["ok"], true, "{name}: {check}");
        let detail = check["detail"].as_str().unwrap();
        assert_eq!(detail.matches(" runs ").count(), 3, "{name}: this replica and both in the list: {detail}");

        // b restarts with the file it had (older than a's reload): it runs the policy in force,
        // and does not put the removed scope back for everyone.
        let config = keybroker::config::Config::load(&b.dir.path().join("keybroker.toml")).unwrap();
        let restarted = keybroker::app::App::build_with(
            config,
            std::sync::Arc::new(keybroker::domain::clock::SystemClock),
            Some(second_store(&guard).await),
        )
        .await
        .unwrap();
        assert!(
            restarted.state.keys.policy().get("web-deploy").is_none(),
            "{name}: the restart took the policy in force"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let res = a.issue(&a.bob(), json!({"scope": "web-deploy", "purpose": "after b's restart"})).await;
        assert_eq!(res.status(), 422, "{name}: a still refuses the removed scope");
        b.stop().await;
        a.stop().await;
    }
}

#[tokio::test]
async fn a_key_of_a_scope_removed_while_it_was_being_issued_is_revoked_when_it_activates() {
    use axum::http::Method;
    use octopus_sim::{Fault, FaultKind};
    let app = TestApp::spawn_with(TestOptions {
        configure: Box::new(|f| f.lifecycle.on_scope_removed = ScopeRemoval::Revoke),
        ..Default::default()
    })
    .await;
    app.sim.inject(Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::Latency(Duration::from_millis(1500))));
    let (url, bob, http) = (app.url.clone(), app.bob(), app.http.clone());
    let in_flight = tokio::spawn(async move {
        let res = http
            .post(format!("{url}/v1/keys"))
            .bearer_auth(bob)
            .json(&json!({"scope": "web-deploy", "purpose": "in flight during the reload"}))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let path = app.dir.path().join("keybroker.toml");
    std::fs::write(&path, without_web_deploy(&std::fs::read_to_string(&path).unwrap())).unwrap();
    let res = app.http.post(format!("{}/v1/admin/reload", app.url)).bearer_auth(app.admin()).send().await.unwrap();
    assert_eq!(res.status(), 200);

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body.get("api_key").is_none(), "nobody receives the key of a removed scope");
    assert!(app.keybroker_keys_in_octopus().is_empty(), "its Octopus key is gone");
    let events = app.audit_events().await;
    let revoked = events.iter().find(|e| e.action == "key.revoked").unwrap();
    assert!(
        revoked.detail["reason"].as_str().unwrap().contains("removed while it was being issued"),
        "{:?}",
        revoked.detail
    );
}
