//! Every caller the mission names authenticates as itself: an identity provider's people, CI
//! pipelines and Kubernetes workloads through bindings, bots with narrow identities; refusals
//! that explain themselves; dry runs; and the refresh loop of External Secrets Operator.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keybroker::config::{Config, ConfigFile, RawBinding, RawIssuer};
use serde_json::{Value, json};

use crate::helpers::{HMAC_SECRET, TestApp, TestOptions, entries};

const RSA_K1: &str = include_str!("../fixtures/rsa-private.pem");
const RSA_K2: &str = include_str!("../fixtures/rsa2-private.pem");
const GITHUB: &str = "https://token.actions.githubusercontent.com";
const GITLAB: &str = "https://gitlab.example.com";
const K8S: &str = "https://kubernetes.default.svc.cluster.local";
const BOTS: &str = "https://chatops.example.com";
const K8S_JWKS_TOKEN: &str = "k8s-api-server-reader-token";

/// JWKS documents for the CI issuers, as their servers publish them; the Kubernetes one only to
/// a Bearer token, as an API server does.
async fn jwks_server(k8s_fetches: Arc<AtomicUsize>) -> String {
    let k1: Value = serde_json::from_str(include_str!("../fixtures/jwks-k1.json")).unwrap();
    let k2: Value = serde_json::from_str(include_str!("../fixtures/jwks-k2.json")).unwrap();
    let (github, gitlab) = (k1.clone(), k1);
    let app = Router::new()
        .route("/github/jwks", get(move || async move { axum::Json(github) }))
        .route("/gitlab/jwks", get(move || async move { axum::Json(gitlab) }))
        .route(
            "/k8s/jwks",
            get(move |headers: HeaderMap| async move {
                k8s_fetches.fetch_add(1, Ordering::SeqCst);
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
                if auth == format!("Bearer {K8S_JWKS_TOKEN}") {
                    Ok(axum::Json(k2))
                } else {
                    Err(StatusCode::UNAUTHORIZED)
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Adds to the demo configuration a CI issuer per kind, a bot issuer, and bindings.
fn add_callers(f: &mut ConfigFile, jwks: &str) {
    let callers = ConfigFile::from_toml(&callers_config(jwks)).unwrap();
    crate::helpers::auth(f).issuers.extend(callers.auth.unwrap().issuers);
    f.bindings.extend(callers.bindings);
}

/// A CI issuer per kind, a bot issuer, and bindings, as an operator would write them.
fn callers_config(jwks: &str) -> String {
    format!(
        r#"
[[auth.issuers]]
name = "github"
issuer = "{GITHUB}"
audience = "keybroker"
algorithms = ["RS256"]
jwks_url = "{jwks}/github/jwks"

[[auth.issuers]]
name = "gitlab"
issuer = "{GITLAB}"
audience = ["keybroker", "https://keybroker.example.com"]
algorithms = ["RS256"]
jwks_url = "{jwks}/gitlab/jwks"

[[auth.issuers]]
name = "k8s"
issuer = "{K8S}"
audience = "keybroker"
algorithms = ["RS256"]
jwks_url = "{jwks}/k8s/jwks"
jwks_bearer_token_file = "k8s-jwks-token"
teams_claim = "/kubernetes.io/namespace"

[[auth.issuers]]
name = "bots"
issuer = "{BOTS}"
audience = "keybroker"
algorithms = ["HS256"]
hs256_secret_file = "audit-hmac"
teams_claim = "groups"
subjects = ["chatops-*"]
allowed_teams = ["payments", "web", "platform-admins"]

[[bindings]]
issuer = "github"
claims = {{ repository_id = "892764", repository_owner_id = "4410" }}
teams = ["payments"]

[[bindings]]
issuer = "gitlab"
claims = {{ project_path = "acme/payments", ref_protected = "true" }}
teams = ["payments"]

[[bindings]]
issuer = "k8s"
subject = "system:serviceaccount:payments:*"
teams = ["payments"]
"#
    )
}

async fn app_with_callers() -> (TestApp, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let jwks = jwks_server(fetches.clone()).await;
    let extra = jwks.clone();
    let app =
        TestApp::spawn_with(TestOptions { configure: Box::new(move |f| add_callers(f, &extra)), ..Default::default() })
            .await;
    std::fs::write(app.dir.path().join("k8s-jwks-token"), K8S_JWKS_TOKEN).unwrap();
    (app, fetches)
}

fn rs256(kid: &str, pem: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()).unwrap()
}

fn times() -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"iat": now, "nbf": now - 5, "exp": now + 600})
}

fn with_times(mut claims: Value) -> Value {
    for (k, v) in times().as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

/// A GitHub Actions OIDC token's claims (no `groups`).
fn github_claims(repository_owner_id: &str, git_ref: &str) -> Value {
    with_times(json!({
        "iss": GITHUB, "aud": "keybroker",
        "sub": format!("repo:acme/payments:ref:{git_ref}"),
        "repository": "acme/payments", "repository_id": "892764", "repository_owner": "acme",
        "repository_owner_id": repository_owner_id, "ref": git_ref,
        "job_workflow_ref": format!("acme/payments/.github/workflows/deploy.yml@{git_ref}"),
        "environment": "production",
    }))
}

fn github(repository_owner_id: &str) -> String {
    rs256("k1", RSA_K1, &github_claims(repository_owner_id, "refs/heads/main"))
}

/// A GitLab CI `id_tokens` token's claims.
fn gitlab(ref_protected: &str) -> String {
    let claims = with_times(json!({
        "iss": GITLAB, "aud": "https://keybroker.example.com",
        "sub": "project_path:acme/payments:ref_type:branch:ref:main",
        "project_path": "acme/payments", "namespace_path": "acme", "ref": "main", "ref_type": "branch",
        "ref_protected": ref_protected,
    }));
    rs256("k1", RSA_K1, &claims)
}

/// A projected Kubernetes service-account token's claims.
fn kubernetes(namespace: &str, name: &str) -> String {
    let claims = with_times(json!({
        "iss": K8S, "aud": ["keybroker"],
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": "0b7e"}},
    }));
    rs256("k2", RSA_K2, &claims)
}

fn bot(sub: &str, groups: &[&str]) -> String {
    let claims = with_times(json!({"iss": BOTS, "aud": "keybroker", "sub": sub, "groups": groups}));
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(HMAC_SECRET.as_bytes()))
        .unwrap()
}

async fn me(app: &TestApp, token: &str) -> (u16, Value) {
    let res = app.get("/v1/me", token).await;
    (res.status().as_u16(), res.json().await.unwrap())
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect()
}

// ---------------------------------------------------------------------------------------------
// Several issuers and bindings.

#[tokio::test]
async fn a_github_actions_token_gets_its_teams_from_a_binding_pinned_by_ids() {
    let (app, _) = app_with_callers().await;
    let (status, body) = me(&app, &github("4410")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subject"], "github:repo:acme/payments:ref:refs/heads/main");
    assert_eq!(body["issuer"], "github");
    assert_eq!(strings(&body["teams"]), ["payments"]);
    let issued = app.issue_ok(&github("4410"), json!({"scope": "payments-deploy", "purpose": "deploy from CI"})).await;
    assert_eq!(issued["requester"], "github:repo:acme/payments:ref:refs/heads/main");
    assert_eq!(app.octopus_me(issued["api_key"].as_str().unwrap()).await.status(), 200);
    let events = app.audit_events().await;
    let event = events.iter().find(|e| e.action == "key.issued").unwrap();
    assert_eq!(event.actor, "github:repo:acme/payments:ref:refs/heads/main", "the audit trail names the issuer");

    // The same repository name under another owner (a fork, a renamed org) gets nothing.
    let (_, body) = me(&app, &github("6666")).await;
    assert!(body["teams"].as_array().unwrap().is_empty(), "{body}");
    let res = app.issue(&github("6666"), json!({"scope": "payments-deploy", "purpose": "from a fork"})).await;
    assert_eq!(res.status(), 403);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["reasons"][0]["rule"], "teams");
    assert_eq!(problem["reasons"][0]["detail"], "your teams [] share none of payments-deploy's teams [payments]");
}

#[tokio::test]
async fn a_gitlab_token_binds_only_on_protected_refs() {
    let (app, _) = app_with_callers().await;
    let (status, body) = me(&app, &gitlab("true")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(strings(&body["teams"]), ["payments"]);
    let (_, body) = me(&app, &gitlab("false")).await;
    assert!(body["teams"].as_array().unwrap().is_empty(), "{body}");
}

#[tokio::test]
async fn a_kubernetes_service_account_token_reads_nested_claims_and_its_jwks_needs_a_bearer_token() {
    let (app, fetches) = app_with_callers().await;
    let (status, body) = me(&app, &kubernetes("payments", "deployer")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subject"], "k8s:system:serviceaccount:payments:deployer");
    assert_eq!(strings(&body["teams"]), ["payments"], "from the namespace claim and the binding");
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    let (_, body) = me(&app, &kubernetes("web", "deployer")).await;
    assert_eq!(strings(&body["teams"]), ["web"], "only the namespace: the binding pins payments");
    app.issue_ok(&kubernetes("web", "deployer"), json!({"scope": "web-deploy", "purpose": "in-cluster"})).await;
}

#[tokio::test]
async fn one_subject_from_two_issuers_is_two_principals() {
    let (app, _) = app_with_callers().await;
    let alice = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "mine"})).await;
    let mut claims = github_claims("4410", "refs/heads/main");
    claims["sub"] = json!("alice@example.com");
    let impostor = rs256("k1", RSA_K1, &claims);
    let (_, body) = me(&app, &impostor).await;
    assert_eq!(body["subject"], "github:alice@example.com");
    let listed: Value = app.get("/v1/keys", &impostor).await.json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty(), "{listed}");
    let path = format!("/v1/keys/{}", alice["id"].as_str().unwrap());
    assert_eq!(app.delete(&path, &impostor).await.status(), 404);
    // And a default-issuer token cannot pose as the GitHub principal.
    assert_eq!(app.get("/v1/me", &app.token("github:alice@example.com", &["payments"])).await.status(), 401);
}

#[tokio::test]
async fn unknown_issuers_and_keys_of_another_issuer_are_refused() {
    let (app, _) = app_with_callers().await;
    let mut claims = github_claims("4410", "refs/heads/main");
    claims["iss"] = json!("https://token.actions.example.net");
    let res = app.get("/v1/me", &rs256("k1", RSA_K1, &claims)).await;
    assert_eq!(res.status(), 401);
    let problem: Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("not one keybroker trusts"), "{problem}");
    // GitHub's iss, signed with the Kubernetes key.
    let forged = rs256("k2", RSA_K2, &github_claims("4410", "refs/heads/main"));
    assert_eq!(app.get("/v1/me", &forged).await.status(), 401);
    // An audience the issuer does not list.
    let mut claims = github_claims("4410", "refs/heads/main");
    claims["aud"] = json!("sts.amazonaws.com");
    assert_eq!(app.get("/v1/me", &rs256("k1", RSA_K1, &claims)).await.status(), 401);
}

// ---------------------------------------------------------------------------------------------
// Bots.

#[tokio::test]
async fn a_bot_secret_is_pinned_to_its_subjects_and_teams_and_never_mints_admins() {
    let (app, _) = app_with_callers().await;
    let (status, body) = me(&app, &bot("chatops-slack", &["payments"])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subject"], "bots:chatops-slack");
    for (token, reason) in [
        (bot("root@example.com", &["payments"]), "does not allow this token's subject"),
        (bot("chatops-slack", &["payments", "data"]), "does not allow the team \"data\""),
        (bot("chatops-slack", &["platform-admins"]), "may not carry admin or auditor teams"),
    ] {
        let res = app.get("/v1/me", &token).await;
        assert_eq!(res.status(), 401);
        let problem: Value = res.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().contains(reason), "{problem}");
    }
    // The default issuer's HS256 secret still makes admins, as it always did.
    assert_eq!(me(&app, &app.admin()).await.1["roles"], json!(["requester", "admin"]));
}

#[test]
fn bindings_that_would_match_everything_or_grant_admins_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    crate::helpers::write_secret_files(dir.path());
    let base = crate::helpers::demo_file("http://127.0.0.1:9", "127.0.0.1:0", &dir.path().join("k.db"));
    let with_issuers_and = |issuers: Vec<RawIssuer>, bindings: Vec<RawBinding>| {
        let mut f = base.clone();
        add_callers(&mut f, "http://127.0.0.1:9");
        crate::helpers::auth(&mut f).issuers.extend(issuers);
        f.bindings.extend(bindings);
        Config::from_file(f, dir.path())
    };
    // One more binding, written as an operator would.
    let with = |binding: &str| {
        let bindings = if binding.is_empty() { Vec::new() } else { entries(&format!("[[entries]]\n{binding}")) };
        with_issuers_and(Vec::new(), bindings)
    };
    assert!(with("").is_ok());
    let err = with("issuer = \"github\"\nteams = [\"payments\"]\n").unwrap_err().to_string();
    assert!(err.starts_with("bindings[3].subject: a binding needs a subject or a claim"), "{err}");
    let err = with("issuer = \"github\"\nsubject = \"repo:acme/*\"\nteams = [\"platform-admins\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("bindings[3].teams") && err.contains("privileged = true"), "{err}");
    assert!(
        with("issuer = \"github\"\nsubject = \"repo:acme/*\"\nteams = [\"platform-admins\"]\nprivileged = true\n")
            .is_ok()
    );
    let err = with("issuer = \"nope\"\nsubject = \"x\"\nteams = [\"payments\"]\n").unwrap_err().to_string();
    assert!(err.starts_with("bindings[3].issuer") && err.contains("github"), "{err}");
    let again = entries(&format!(
        "[[entries]]\nname = \"again\"\nissuer = \"{GITHUB}\"\naudience = \"k\"\nalgorithms = [\"RS256\"]\njwks_url = \"http://127.0.0.1:9/j\"\n"
    ));
    let err = with_issuers_and(again, Vec::new()).unwrap_err().to_string();
    assert!(err.contains("is trusted twice"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Denials explain themselves; dry runs; explain.

#[tokio::test]
async fn every_kind_of_refusal_names_its_rule() {
    let app = TestApp::spawn().await;
    let refusal = |token: String, body: Value| {
        let app = &app;
        async move {
            let res = app.issue(&token, body).await;
            let status = res.status().as_u16();
            let problem: Value = res.json().await.unwrap();
            (status, problem["reasons"][0]["rule"].as_str().unwrap_or_default().to_owned(), problem)
        }
    };
    let (status, rule, _) = refusal(app.bob(), json!({"scope": "payments-deploy", "purpose": "p"})).await;
    assert_eq!((status, rule.as_str()), (403, "teams"));
    let (status, rule, _) = refusal(app.alice(), json!({"scope": "nope", "purpose": "p"})).await;
    assert_eq!((status, rule.as_str()), (422, "scope"));
    let (status, rule, problem) =
        refusal(app.alice(), json!({"scope": "payments-deploy", "purpose": "p", "ttl": "90d"})).await;
    assert_eq!((status, rule.as_str()), (422, "expiry"), "{problem}");
    for i in 0..3 {
        app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": format!("k{i}")})).await;
    }
    let (status, rule, _) = refusal(app.alice(), json!({"scope": "payments-deploy", "purpose": "fourth"})).await;
    assert_eq!((status, rule.as_str()), (422, "limit"));
    let res = app.get("/v1/audit", &app.alice()).await;
    assert_eq!(res.status(), 403);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["reasons"][0]["rule"], "role", "{problem}");
}

#[tokio::test]
async fn a_dry_run_runs_every_check_and_creates_nothing() {
    let app = TestApp::spawn().await;
    app.sim.reset_counters();
    let octopus_keys = app.sim.api_keys().len();
    let dry = |token: String, body: Value| {
        let app = &app;
        async move {
            let res = app.issue(&token, body).await;
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()
        }
    };
    let allowed =
        dry(app.alice(), json!({"scope": "payments-deploy", "purpose": "would I?", "ttl": "2d", "dry_run": true}))
            .await;
    assert_eq!(allowed["allowed"], true, "{allowed}");
    assert!(allowed["reasons"].as_array().unwrap().is_empty());
    let expires = chrono::DateTime::parse_from_rfc3339(allowed["expires_at"].as_str().unwrap()).unwrap();
    assert!((expires.timestamp() - (chrono::Utc::now() + chrono::Duration::days(2)).timestamp()).abs() < 60);
    assert!(allowed.get("api_key").is_none() && allowed.get("id").is_none());

    let denied =
        dry(app.bob(), json!({"scope": "payments-deploy", "purpose": "bad\u{7}", "ttl": "90d", "dry_run": true})).await;
    assert_eq!(denied["allowed"], false);
    let rules: Vec<&str> = denied["reasons"].as_array().unwrap().iter().map(|r| r["rule"].as_str().unwrap()).collect();
    assert_eq!(rules, ["teams", "purpose", "expiry"], "{denied}");

    assert_eq!(app.sim.request_count("POST /api/users/{id}/apikeys"), 0);
    assert_eq!(app.sim.api_keys().len(), octopus_keys);
    let listed: Value = app.get("/v1/keys", &app.admin()).await.json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty(), "{listed}");
    let runs: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "policy.dry_run").collect();
    assert_eq!(runs.len(), 2);
    assert_eq!((runs[0].outcome.as_str(), runs[1].outcome.as_str()), ("success", "denied"));
}

#[tokio::test]
async fn admins_can_see_why_a_binding_does_or_does_not_match() {
    let (app, _) = app_with_callers().await;
    let explain = |body: Value| {
        let app = &app;
        async move {
            let res = app
                .http
                .post(format!("{}/v1/admin/explain", app.url))
                .bearer_auth(app.admin())
                .json(&body)
                .send()
                .await
                .unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = explain(
        json!({"issuer": "github", "claims": github_claims("4410", "refs/heads/main"), "scope": "payments-deploy"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["bindings"][0]["matched"], true);
    assert_eq!(strings(&body["principal"]["teams"]), ["payments"]);
    assert_eq!(body["scope"]["allowed"], true);
    let (_, body) = explain(
        json!({"issuer": "github", "claims": github_claims("6666", "refs/heads/main"), "scope": "payments-deploy"}),
    )
    .await;
    assert_eq!(body["bindings"][0]["matched"], false);
    assert_eq!(body["bindings"][0]["failed"]["entry"], "claims.repository_owner_id");
    assert!(body["bindings"][0]["failed"]["detail"].as_str().unwrap().contains("\"6666\""), "{body}");
    assert_eq!(body["scope"]["allowed"], false);
    assert_eq!(body["scope"]["reasons"][0]["rule"], "teams");
    let (_, body) = explain(json!({"issuer": "bots", "claims": {"sub": "root", "groups": ["payments"]}})).await;
    assert!(body["principal"].is_null() && body["refused"].as_str().unwrap().contains("subject"), "{body}");
    let (status, _) = explain(json!({"issuer": "nope", "claims": {}})).await;
    assert_eq!(status, 422);
    let res = app
        .http
        .post(format!("{}/v1/admin/explain", app.url))
        .bearer_auth(app.alice())
        .json(&json!({"issuer": "github", "claims": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
}

// ---------------------------------------------------------------------------------------------
// External Secrets Operator.

#[tokio::test]
async fn an_external_secrets_refresh_loop_holds_one_key() {
    let (app, _) = app_with_callers().await;
    // What ESO's webhook generator sends on every refresh (README: "Kubernetes consumers"):
    // POST, the body template, the two headers, Go's user agent; it reads `$.api_key`.
    let token = kubernetes("payments", "external-secrets");
    let mut secrets = Vec::new();
    for _ in 0..4 {
        let res = app
            .http
            .post(format!("{}/v1/keys", app.url))
            .header("Content-Type", "application/json")
            .header("Authorization", format!("Bearer {token}"))
            .header("User-Agent", "Go-http-client/1.1")
            .body(r#"{"scope": "payments-deploy", "purpose": "eso:payments/octopus-deploy-key", "ttl": "2h", "replace_previous": true}"#)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{}", res.status());
        let answer: Value = res.json().await.unwrap();
        let secret = answer.pointer("/api_key").and_then(Value::as_str).expect("$.api_key").to_owned();
        secrets.push(secret);
        // The replaced key is revoked right after the answer, in the background.
        let mut active = usize::MAX;
        for _ in 0..100 {
            let listed: Value = app.get("/v1/keys?state=active", &token).await.json().await.unwrap();
            active = listed["items"].as_array().unwrap().len();
            if active == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(active, 1, "one active key after each refresh");
    }
    for old in &secrets[..3] {
        assert_eq!(app.octopus_me(old).await.status(), 401, "a superseded key still works");
    }
    assert_eq!(app.octopus_me(&secrets[3]).await.status(), 200);
    let superseded = app
        .audit_events()
        .await
        .into_iter()
        .filter(|e| e.action == "key.revoked" && e.detail["reason"] == "superseded")
        .count();
    assert_eq!(superseded, 3);
    // Another purpose is another consumer: it is not replaced.
    app.issue_ok(
        &token,
        json!({"scope": "payments-deploy", "purpose": "eso:payments/other", "replace_previous": true}),
    )
    .await;
    let listed: Value = app.get("/v1/keys?state=active", &token).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
}
