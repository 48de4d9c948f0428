//! The published contract as clients meet it: every documented operation is served, real
//! responses validate against the documented schemas, Swagger UI comes from the binary, and
//! /metrics reports what happened.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::TestApp;

fn document() -> Value {
    serde_json::from_str(&keybroker::api::openapi_json()).unwrap()
}

/// The schema documented for a response, as a standalone JSON Schema whose `$ref`s resolve
/// against the document's components.
fn response_schema(doc: &Value, method: &str, path: &str, status: u16) -> Value {
    let response = &doc["paths"][path][method]["responses"][status.to_string()];
    assert!(response.is_object(), "{method} {path} does not document {status}");
    let content = response["content"].as_object().unwrap_or_else(|| panic!("{method} {path} {status} has no content"));
    let schema = content.values().next().unwrap()["schema"].clone();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc["components"],
        "allOf": [schema],
    })
}

/// Checks a real response against the document: its status must be documented for the
/// operation, and its JSON body must validate.
async fn check(doc: &Value, method: &str, template: &str, res: reqwest::Response) -> Value {
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    let schema = response_schema(doc, method, template, status);
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(&body).map(|e| format!("{e} at {}", e.instance_path)).collect();
    assert!(errors.is_empty(), "{method} {template} {status} does not match its schema: {errors:?}\n{body}");
    body
}

#[tokio::test]
async fn real_responses_validate_against_the_documented_schemas() {
    let doc = document();
    let app = TestApp::spawn().await;
    let url = |p: &str| format!("{}{p}", app.url);
    let http = &app.http;

    let issued = check(
        &doc,
        "post",
        "/v1/keys",
        http.post(url("/v1/keys"))
            .bearer_auth(app.alice())
            .json(&json!({"scope": "payments-deploy", "purpose": "schema"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = issued["id"].as_str().unwrap().to_owned();
    let secret = issued["api_key"].as_str().unwrap().to_owned();
    let replay_body = json!({"scope": "payments-deploy", "purpose": "replayed"});
    for _ in 0..2 {
        let res = http
            .post(url("/v1/keys"))
            .bearer_auth(app.alice())
            .header("Idempotency-Key", "x")
            .json(&replay_body)
            .send()
            .await
            .unwrap();
        check(&doc, "post", "/v1/keys", res).await;
    }
    let problems = [
        http.post(url("/v1/keys"))
            .bearer_auth(app.alice())
            .body("{")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap(),
        http.post(url("/v1/keys")).json(&json!({"scope": "x", "purpose": "y"})).send().await.unwrap(),
        http.post(url("/v1/keys"))
            .bearer_auth(app.bob())
            .json(&json!({"scope": "payments-deploy", "purpose": "y"}))
            .send()
            .await
            .unwrap(),
        http.post(url("/v1/keys"))
            .bearer_auth(app.alice())
            .json(&json!({"scope": "nope", "purpose": "y"}))
            .send()
            .await
            .unwrap(),
        http.post(url("/v1/keys"))
            .bearer_auth(app.alice())
            .json(&json!({"scope": "payments-deploy", "purpose": "y", "ttl": "90d"}))
            .send()
            .await
            .unwrap(),
        http.post(url("/v1/keys")).bearer_auth(app.alice()).body("x").send().await.unwrap(),
        http.post(url("/v1/keys"))
            .bearer_auth(app.alice())
            .header("content-type", "application/json")
            .body(vec![b' '; 70_000])
            .send()
            .await
            .unwrap(),
    ];
    for res in problems {
        check(&doc, "post", "/v1/keys", res).await;
    }

    check(&doc, "get", "/v1/keys", http.get(url("/v1/keys?limit=1")).bearer_auth(app.alice()).send().await.unwrap())
        .await;
    check(&doc, "get", "/v1/keys", http.get(url("/v1/keys?limit=0")).bearer_auth(app.alice()).send().await.unwrap())
        .await;
    check(
        &doc,
        "get",
        "/v1/keys",
        http.get(url("/v1/keys?requester=x")).bearer_auth(app.alice()).send().await.unwrap(),
    )
    .await;
    let one = format!("/v1/keys/{id}");
    check(&doc, "get", "/v1/keys/{id}", http.get(url(&one)).bearer_auth(app.auditor()).send().await.unwrap()).await;
    check(&doc, "get", "/v1/keys/{id}", http.get(url("/v1/keys/nope")).bearer_auth(app.alice()).send().await.unwrap())
        .await;
    check(
        &doc,
        "get",
        "/v1/keys/{id}",
        http.get(url(&format!("/v1/keys/{}", Uuid::new_v4()))).bearer_auth(app.alice()).send().await.unwrap(),
    )
    .await;
    check(&doc, "delete", "/v1/keys/{id}", http.delete(url(&one)).bearer_auth(app.auditor()).send().await.unwrap())
        .await;
    check(&doc, "delete", "/v1/keys/{id}", http.delete(url(&one)).bearer_auth(app.alice()).send().await.unwrap()).await;
    let identify = |token: String, key: &str| {
        http.post(url("/v1/keys/identify")).bearer_auth(token).json(&json!({"api_key": key})).send()
    };
    check(&doc, "post", "/v1/keys/identify", identify(app.auditor(), &secret).await.unwrap()).await;
    check(&doc, "post", "/v1/keys/identify", identify(app.auditor(), "API-NOPE0000000000000000000").await.unwrap())
        .await;
    check(&doc, "post", "/v1/keys/identify", identify(app.alice(), &secret).await.unwrap()).await;
    check(&doc, "get", "/v1/scopes", http.get(url("/v1/scopes")).bearer_auth(app.alice()).send().await.unwrap()).await;
    check(&doc, "get", "/v1/me", http.get(url("/v1/me")).bearer_auth(app.admin()).send().await.unwrap()).await;
    check(&doc, "get", "/v1/me", http.get(url("/v1/me")).send().await.unwrap()).await;
    check(
        &doc,
        "get",
        "/v1/audit",
        http.get(url("/v1/audit?limit=3")).bearer_auth(app.auditor()).send().await.unwrap(),
    )
    .await;
    check(&doc, "get", "/v1/audit", http.get(url("/v1/audit")).bearer_auth(app.alice()).send().await.unwrap()).await;
    check(
        &doc,
        "get",
        "/v1/audit/verify",
        http.get(url("/v1/audit/verify")).bearer_auth(app.auditor()).send().await.unwrap(),
    )
    .await;
    check(&doc, "get", "/healthz", http.get(url("/healthz")).send().await.unwrap()).await;
    check(&doc, "get", "/readyz", http.get(url("/readyz")).send().await.unwrap()).await;
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    let doc = document();
    let app = TestApp::spawn().await;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{id}", &Uuid::new_v4().to_string());
            let req = app
                .http
                .request(method.to_uppercase().parse().unwrap(), format!("{}{concrete}", app.url))
                .bearer_auth(app.admin());
            let req = if method == "post" { req.json(&json!({})) } else { req };
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            assert_ne!(status, 405, "{method} {path} is documented but not served");
            let body = res.text().await.unwrap();
            assert!(!body.contains("no such route"), "{method} {path} is documented but not served");
            assert!(
                doc["paths"][path][method]["responses"].get(status.to_string()).is_some(),
                "{method} {path} answered {status}, which it does not document"
            );
        }
    }
}

#[tokio::test]
async fn swagger_ui_is_served_from_the_binary_and_reads_the_local_document() {
    let app = TestApp::spawn().await;
    let res = app.http.get(format!("{}/docs/", app.url)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = res.text().await.unwrap();
    // Every script and stylesheet is relative: nothing is fetched from another host.
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let target = part.split('"').next().unwrap();
            assert!(!target.contains("://"), "the page loads {target} from another host");
        }
    }
    let init = app.http.get(format!("{}/docs/swagger-initializer.js", app.url)).send().await.unwrap();
    assert_eq!(init.status(), 200);
    assert!(init.text().await.unwrap().contains("/openapi.json"));
    let bundle = app.http.get(format!("{}/docs/swagger-ui-bundle.js", app.url)).send().await.unwrap();
    assert_eq!(bundle.status(), 200);
    assert!(bundle.bytes().await.unwrap().len() > 100_000);
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_report_requests_issuances_octopus_calls_and_active_keys() {
    let app = TestApp::spawn().await;
    let issued = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "metrics"})).await;
    let secret = issued["api_key"].as_str().unwrap().to_owned();
    let res = app.issue(&app.bob(), json!({"scope": "payments-deploy", "purpose": "denied"})).await;
    assert_eq!(res.status(), 403);
    let res = app.issue(&app.bob(), json!({"scope": "made-up-scope-name", "purpose": "unknown"})).await;
    assert_eq!(res.status(), 422);

    // The active-key gauges come from the readiness job, not from a query per scrape.
    app.state.readiness.refresh(&app.state.keys).await;
    let res = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert_eq!(
        metric(&text, r#"keybroker_http_requests_total{method="POST",route="/v1/keys",status="201"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, r#"keybroker_issuances_total{scope="payments-deploy",outcome="issued"}"#), Some(1.0));
    assert_eq!(metric(&text, r#"keybroker_issuances_total{scope="payments-deploy",outcome="denied"}"#), Some(1.0));
    assert_eq!(metric(&text, r#"keybroker_issuances_total{scope="unknown",outcome="denied"}"#), Some(1.0));
    assert!(!text.contains("made-up-scope-name"), "caller text must not become a label");
    assert_eq!(metric(&text, r#"keybroker_octopus_calls_total{operation="create_api_key",outcome="ok"}"#), Some(1.0));
    assert!(metric(&text, r#"keybroker_octopus_call_duration_seconds_count{operation="create_api_key"}"#).is_some());
    assert_eq!(
        metric(&text, r#"keybroker_http_request_duration_seconds_count{method="POST",route="/v1/keys"}"#),
        Some(3.0)
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("keybroker_http_request_duration_seconds_bucket{") && l.contains("le=\"+Inf\""))
    );
    assert_eq!(metric(&text, r#"keybroker_active_keys{scope="payments-deploy"}"#), Some(1.0));
    assert_eq!(metric(&text, "keybroker_audit_append_failures_total"), Some(0.0));
    assert!(!text.contains(&secret));

    app.delete(&format!("/v1/keys/{}", issued["id"].as_str().unwrap()), &app.alice()).await;
    app.state.readiness.refresh(&app.state.keys).await;
    let text = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, r#"keybroker_active_keys{scope="payments-deploy"}"#), None);
    assert_eq!(metric(&text, r#"keybroker_octopus_calls_total{operation="delete_api_key",outcome="ok"}"#), Some(1.0));
}

#[tokio::test]
async fn portals_on_the_allow_list_may_call_the_api_from_a_browser() {
    let app = TestApp::spawn().await;
    // The demo configuration allows http://localhost:3000.
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, format!("{}/v1/keys", app.url))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization, content-type, idempotency-key")
            .send()
    };
    let allowed = preflight("http://localhost:3000").await.unwrap();
    assert!(allowed.status().is_success());
    assert_eq!(allowed.headers()["access-control-allow-origin"], "http://localhost:3000");
    let methods = allowed.headers()["access-control-allow-methods"].to_str().unwrap().to_owned();
    assert!(methods.contains("POST") && methods.contains("DELETE"), "{methods}");
    let headers = allowed.headers()["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(headers.contains("authorization") && headers.contains("idempotency-key"), "{headers}");

    let denied = preflight("https://evil.example.com").await.unwrap();
    assert!(denied.headers().get("access-control-allow-origin").is_none());

    let res = app
        .http
        .get(format!("{}/v1/me", app.url))
        .bearer_auth(app.alice())
        .header("Origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "http://localhost:3000");
    let exposed = res.headers()["access-control-expose-headers"].to_str().unwrap().to_lowercase();
    assert!(exposed.contains("location") && exposed.contains("x-request-id"), "{exposed}");

    // An error the edge turns into a problem keeps CORS's headers, `Vary` included, so that the
    // portal can read it and no cache hands it to another origin.
    let res = app
        .http
        .post(format!("{}/v1/keys", app.url))
        .bearer_auth(app.alice())
        .header("Origin", "http://localhost:3000")
        .header("Content-Type", "application/json")
        .body(vec![b' '; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert_eq!(res.headers()["access-control-allow-origin"], "http://localhost:3000");
    let vary: Vec<String> = res.headers().get_all("vary").iter().map(|v| v.to_str().unwrap().to_lowercase()).collect();
    assert!(vary.iter().any(|v| v.contains("origin")), "{vary:?}");
}

#[tokio::test]
async fn each_principal_is_rate_limited_and_failed_logins_cannot_flood_the_audit_trail() {
    let app = TestApp::spawn_with(crate::helpers::TestOptions {
        configure: Box::new(|f| f.server.rate_limit_per_minute = 5),
        ..Default::default()
    })
    .await;
    for _ in 0..5 {
        assert_eq!(app.get("/v1/me", &app.alice()).await.status(), 200);
    }
    let limited = app.get("/v1/me", &app.alice()).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    assert_eq!(limited.headers()["content-type"], "application/problem+json");
    // Another principal has its own budget.
    assert_eq!(app.get("/v1/me", &app.bob()).await.status(), 200);

    // Bad tokens from one address: one audit event for the minute (the repeats are counted into
    // the next one), then refused without a trace once over the limit.
    for _ in 0..5 {
        assert_eq!(app.get("/v1/me", "not-a-token").await.status(), 401);
    }
    for _ in 0..20 {
        assert_eq!(app.get("/v1/me", "not-a-token").await.status(), 429);
    }
    let denials: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "auth.denied").collect();
    assert_eq!(denials.len(), 1, "{denials:?}");
    assert_eq!(denials[0].detail["count"], 1);
}
