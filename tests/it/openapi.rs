//! The published contract: `openapi/keybroker.json` is what the code generates, and the service
//! serves the same document.

use serde_json::Value;

use crate::helpers::TestApp;

const PUBLISHED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/keybroker.json");

#[test]
fn the_published_openapi_document_matches_the_code() {
    let generated = keybroker::api::openapi_json();
    let published = std::fs::read_to_string(PUBLISHED).unwrap_or_default();
    assert!(
        published.trim_end() == generated.trim_end(),
        "openapi/keybroker.json differs from the code; regenerate it with\n  cargo run -- openapi > openapi/keybroker.json"
    );
}

#[tokio::test]
async fn the_service_serves_the_document_as_openapi_3_1_with_bearer_security() {
    let app = TestApp::spawn().await;
    let res = app.http.get(format!("{}/openapi.json", app.url)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let served: Value = res.json().await.unwrap();
    let generated: Value = serde_json::from_str(&keybroker::api::openapi_json()).unwrap();
    assert_eq!(served, generated);
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(served["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    for path in [
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/keys/identify",
        "/v1/scopes",
        "/v1/me",
        "/v1/audit",
        "/v1/audit/verify",
        "/healthz",
        "/readyz",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path} is not documented");
    }
    let issue = &served["paths"]["/v1/keys"]["post"];
    for status in ["200", "201", "400", "401", "403", "413", "422", "502", "503", "504"] {
        assert!(issue["responses"].get(status).is_some(), "POST /v1/keys does not document {status}");
    }
    assert!(issue["responses"].get("404").is_none(), "an unknown scope is 422, never 404");
}
