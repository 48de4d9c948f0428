//! Malformed requests: each one gets a clear 4xx problem document and changes nothing, neither
//! in keybroker's records nor in Octopus (SPEC "Bad input").

use std::io::{Read as _, Write as _};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// Everything a malformed request must leave untouched.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// Every key record as (id, state).
    records: Vec<(String, &'static str)>,
    /// Every key stored in the simulated Octopus.
    octopus_keys: Vec<String>,
    /// Every Octopus call that is not a read, by route.
    octopus_writes: Vec<(String, u64)>,
    /// Audit events about keys (`key.*`); denials of bad requests are audited on purpose and
    /// do not count as a change.
    key_events: usize,
}

async fn snapshot(app: &TestApp) -> Snapshot {
    let page = keybroker::store::PageRequest { before_seq: None, limit: 10_000 };
    let records = app.state.keys.store().list_keys(&keybroker::store::KeyFilter::default(), page).await.unwrap();
    Snapshot {
        records: records.into_iter().map(|r| (r.id.to_string(), r.state.as_str())).collect(),
        octopus_keys: app.sim.api_keys().into_iter().map(|k| k.id).collect(),
        octopus_writes: app.sim.counters().into_iter().filter(|(route, _)| !route.starts_with("GET ")).collect(),
        key_events: app.audit_events().await.iter().filter(|e| e.action.starts_with("key.")).count(),
    }
}

/// One malformed request and the status it must get.
struct Case {
    name: String,
    method: Method,
    path: String,
    token: String,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
    status: u16,
}

impl Case {
    fn new(name: impl Into<String>, method: Method, path: impl Into<String>, token: &str, status: u16) -> Self {
        Self {
            name: name.into(),
            method,
            path: path.into(),
            token: token.to_owned(),
            content_type: None,
            body: None,
            status,
        }
    }

    fn get(name: impl Into<String>, path: impl Into<String>, token: &str, status: u16) -> Self {
        Self::new(name, Method::GET, path, token, status)
    }

    fn body(mut self, content_type: Option<&'static str>, body: impl Into<Vec<u8>>) -> Self {
        self.content_type = content_type;
        self.body = Some(body.into());
        self
    }

    fn json(self, body: Value) -> Self {
        self.body(Some("application/json"), body.to_string())
    }
}

/// An issuance request with this body, as alice (team payments, who may use `payments-deploy`).
fn issue(app: &TestApp, name: &str, body: Value, status: u16) -> Case {
    Case::new(name, Method::POST, "/v1/keys", &app.alice(), status).json(body)
}

fn issue_raw(app: &TestApp, name: &str, content_type: Option<&'static str>, body: &[u8], status: u16) -> Case {
    Case::new(name, Method::POST, "/v1/keys", &app.alice(), status).body(content_type, body)
}

fn with_purpose(purpose: &str) -> Value {
    json!({"scope": "payments-deploy", "purpose": purpose})
}

fn with_expiry(field: &str, value: Value) -> Value {
    json!({"scope": "payments-deploy", "purpose": "bad expiry", field: value})
}

async fn send(app: &TestApp, case: &Case) -> reqwest::Response {
    let mut request =
        app.http.request(case.method.clone(), format!("{}{}", app.url, case.path)).bearer_auth(&case.token);
    if let Some(content_type) = case.content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(body) = &case.body {
        request = request.body(body.clone());
    }
    request.send().await.unwrap()
}

/// Generous: room for a sentence and a quoted value, not for an echo of kilobytes of input.
const MAX_DETAIL_CHARS: usize = 1000;

/// Checks one answer is the expected problem document; returns what is wrong, if anything.
async fn check_problem(res: reqwest::Response, status: u16) -> Result<(), String> {
    let got = res.status().as_u16();
    let request_id = res.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = res.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let allow = res.headers().get("allow").is_some();
    let text = res.text().await.map_err(|e| format!("unreadable body: {e}"))?;
    if got != status {
        return Err(format!("status {got}, wanted {status}; body {text:.500}"));
    }
    if content_type.as_deref() != Some("application/problem+json") {
        return Err(format!("content-type {content_type:?}; body {text:.500}"));
    }
    let body: Value = serde_json::from_str(&text).map_err(|e| format!("body is not JSON ({e}): {text}"))?;
    let well_formed = body["status"] == status
        && body["type"].as_str().is_some_and(|t| t.starts_with("urn:keybroker:problem:"))
        && body["title"].as_str().is_some_and(|t| !t.is_empty())
        && body["detail"].as_str().is_some_and(|d| !d.is_empty());
    if !well_formed {
        return Err(format!("not a complete problem document: {body}"));
    }
    // A clear message quotes bad input at most in part, however much of it was sent.
    let detail_chars = body["detail"].as_str().map_or(0, |d| d.chars().count());
    if detail_chars > MAX_DETAIL_CHARS {
        let start: String = body["detail"].as_str().unwrap_or_default().chars().take(120).collect();
        return Err(format!("a detail of {detail_chars} characters: {start}..."));
    }
    if request_id.is_none() || body["request_id"].as_str() != request_id.as_deref() {
        return Err(format!("request_id {} does not match x-request-id {request_id:?}", body["request_id"]));
    }
    if status == 405 && !allow {
        return Err("405 without an Allow header".to_owned());
    }
    Ok(())
}

/// Runs every case, then checks nothing changed; reports every failing case at once.
async fn run_cases(app: &TestApp, cases: Vec<Case>) {
    let before = snapshot(app).await;
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(why) = check_problem(send(app, case).await, case.status).await {
            failures.push(format!("{} ({} {:.80}): {why}", case.name, case.method, case.path));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert_eq!(snapshot(app).await, before, "a malformed request changed something");
}

#[tokio::test]
async fn malformed_issuance_bodies_are_refused_and_create_nothing() {
    let app = TestApp::spawn().await;
    let json = Some("application/json");
    let nested = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let cases = vec![
        issue_raw(&app, "invalid JSON", json, br#"{"scope": "payments-deploy", "purpose": "#, 400),
        issue_raw(&app, "trailing garbage", json, br#"{"scope": "payments-deploy", "purpose": "p"} x"#, 400),
        issue_raw(&app, "empty body", json, b"", 400),
        issue_raw(&app, "whitespace body", json, b"  \n ", 400),
        issue_raw(
            &app,
            "byte order mark",
            json,
            b"\xEF\xBB\xBF{\"scope\": \"payments-deploy\", \"purpose\": \"p\"}",
            400,
        ),
        issue_raw(
            &app,
            "invalid UTF-8 in a string",
            json,
            b"{\"scope\": \"payments-deploy\", \"purpose\": \"\xFF\xFE\"}",
            400,
        ),
        issue_raw(&app, "deeply nested arrays", json, nested.as_bytes(), 400),
        issue(&app, "an array", json!([{"scope": "payments-deploy", "purpose": "p"}]), 400),
        // serde reads a struct from an array of its fields, in order, unless told otherwise.
        issue(&app, "the fields as an array", json!(["payments-deploy", "array body"]), 400),
        issue(&app, "the fields as an array with a ttl", json!(["payments-deploy", "array body", null, "1h"]), 400),
        issue(&app, "a string", json!("payments-deploy"), 400),
        issue(&app, "a number", json!(42), 400),
        issue(&app, "null", Value::Null, 400),
        issue(&app, "an empty object", json!({}), 400),
        issue(&app, "unknown field", json!({"scope": "payments-deploy", "purpose": "p", "owner": "mallory"}), 400),
        issue(
            &app,
            "unknown field api_key",
            json!({"scope": "payments-deploy", "purpose": "p", "api_key": "API-X"}),
            400,
        ),
        issue_raw(
            &app,
            "duplicate field",
            json,
            br#"{"scope": "payments-deploy", "scope": "web-deploy", "purpose": "p"}"#,
            400,
        ),
        issue(&app, "purpose is a number", json!({"scope": "payments-deploy", "purpose": 42}), 400),
        issue(&app, "purpose is null", json!({"scope": "payments-deploy", "purpose": null}), 400),
        issue(&app, "scope is an array", json!({"scope": ["payments-deploy"], "purpose": "p"}), 400),
        issue(&app, "scope is an object", json!({"scope": {"name": "payments-deploy"}, "purpose": "p"}), 400),
        issue(&app, "ttl is a number", json!({"scope": "payments-deploy", "purpose": "p", "ttl": 3600}), 400),
        issue(&app, "expires_at is a number", with_expiry("expires_at", json!(1_900_000_000)), 400),
        issue(&app, "missing scope", json!({"purpose": "p"}), 400),
        issue(&app, "missing purpose", json!({"scope": "payments-deploy"}), 400),
        issue(&app, "unknown scope", json!({"scope": "no-such-scope", "purpose": "p"}), 422),
        issue(&app, "scope with a path in it", json!({"scope": "../payments-deploy", "purpose": "p"}), 422),
        issue(&app, "scope in upper case", json!({"scope": "PAYMENTS-DEPLOY", "purpose": "p"}), 422),
        issue(&app, "scope with NUL", json!({"scope": "payments-deploy\u{0}", "purpose": "p"}), 422),
        issue(&app, "empty scope", json!({"scope": "", "purpose": "p"}), 422),
        issue(&app, "purpose empty", with_purpose(""), 400),
        issue(&app, "purpose whitespace", with_purpose(" \t \n "), 400),
        issue(&app, "purpose 201 characters", with_purpose(&"p".repeat(201)), 400),
        issue(&app, "purpose 201 multibyte characters", with_purpose(&"é".repeat(201)), 400),
        issue(&app, "purpose with NUL", with_purpose("deploy\u{0}payments"), 400),
        issue(&app, "purpose with newline", with_purpose("deploy\npayments"), 400),
        issue(&app, "purpose with ESC", with_purpose("deploy \u{1b}[31mred"), 400),
        issue(&app, "purpose with DEL", with_purpose("deploy\u{7f}"), 400),
        issue(&app, "purpose with U+202E", with_purpose("deploy \u{202e}stnemyap"), 400),
        issue(&app, "purpose with a zero-width space", with_purpose("deploy\u{200b}payments"), 400),
        issue(&app, "expires_at unparseable", with_expiry("expires_at", json!("tomorrow")), 400),
        issue(&app, "expires_at empty", with_expiry("expires_at", json!("")), 400),
        issue(&app, "expires_at a date only", with_expiry("expires_at", json!("2030-01-01")), 400),
        issue(&app, "expires_at without offset", with_expiry("expires_at", json!("2030-01-01T10:00:00")), 400),
        issue(&app, "expires_at with a space", with_expiry("expires_at", json!("2030-01-01 10:00:00")), 400),
        issue(&app, "expires_at impossible date", with_expiry("expires_at", json!("2030-02-30T10:00:00Z")), 400),
        issue(&app, "expires_at month 13", with_expiry("expires_at", json!("2030-13-01T10:00:00Z")), 400),
        issue(&app, "expires_at ten-digit year", with_expiry("expires_at", json!("9999999999-01-01T00:00:00Z")), 400),
        issue(&app, "expires_at in the past", with_expiry("expires_at", json!("2000-01-01T00:00:00Z")), 422),
        issue(&app, "expires_at far in the future", with_expiry("expires_at", json!("9999-12-31T23:59:59Z")), 422),
        issue(
            &app,
            "both expires_at and ttl",
            json!({"scope": "payments-deploy", "purpose": "p", "ttl": "1d", "expires_at": "2030-01-01T00:00:00Z"}),
            400,
        ),
        issue(&app, "ttl negative", with_expiry("ttl", json!("-1h")), 400),
        issue(&app, "ttl zero", with_expiry("ttl", json!("0s")), 400),
        issue(&app, "ttl zero days", with_expiry("ttl", json!("0d")), 400),
        issue(&app, "ttl under a minute", with_expiry("ttl", json!("30s")), 400),
        issue(&app, "ttl garbage", with_expiry("ttl", json!("soon")), 400),
        issue(&app, "ttl empty", with_expiry("ttl", json!("")), 400),
        issue(&app, "ttl without unit", with_expiry("ttl", json!("3600")), 400),
        issue(&app, "ttl 1000000000d", with_expiry("ttl", json!("1000000000d")), 422),
        issue(&app, "ttl overflowing u64", with_expiry("ttl", json!("99999999999999999999999s")), 400),
        issue(&app, "ttl beyond the scope maximum", with_expiry("ttl", json!("100000000d")), 422),
        issue_raw(&app, "text/plain", Some("text/plain"), with_purpose("p").to_string().as_bytes(), 415),
        issue_raw(&app, "no content type", None, with_purpose("p").to_string().as_bytes(), 415),
        issue_raw(
            &app,
            "form encoded",
            Some("application/x-www-form-urlencoded"),
            b"scope=payments-deploy&purpose=p",
            415,
        ),
        issue_raw(&app, "text/json", Some("text/json"), with_purpose("p").to_string().as_bytes(), 415),
        issue_raw(&app, "garbage content type", Some("json"), with_purpose("p").to_string().as_bytes(), 415),
    ];
    run_cases(&app, cases).await;
    assert_eq!(app.sim.request_count("POST /api/users/{id}/apikeys"), 0);

    // The same harness sees a change when there is one: a valid request does create a key.
    let before = snapshot(&app).await;
    app.issue_ok(&app.alice(), with_purpose(&"p".repeat(200))).await;
    assert_ne!(snapshot(&app).await, before);
}

#[tokio::test]
async fn oversize_bodies_are_413_and_create_nothing() {
    let app = TestApp::spawn().await;
    let limit = 65_536;
    let json = Some("application/json");
    let valid_shape = with_purpose(&"p".repeat(limit)).to_string();
    let cases = vec![
        issue_raw(&app, "random bytes above the limit", json, &vec![b'x'; limit + 1], 413),
        issue_raw(&app, "a valid JSON shape above the limit", json, valid_shape.as_bytes(), 413),
        issue_raw(&app, "a megabyte", json, &vec![b' '; 1 << 20], 413),
        issue_raw(&app, "above the limit and not JSON", Some("text/plain"), &vec![b'x'; limit + 1], 413),
        Case::new("identify above the limit", Method::POST, "/v1/keys/identify", &app.auditor(), 413)
            .json(json!({"api_key": "A".repeat(limit)})),
    ];
    run_cases(&app, cases).await;

    // A chunked body has no Content-Length to refuse up front: the limit applies while reading.
    let before = snapshot(&app).await;
    let (status, head, body) = raw_chunked_post(&app, "/v1/keys", &app.alice(), valid_shape.as_bytes()).await;
    assert_eq!(status, 413, "{head}\n{body}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/problem+json"), "{head}");
    assert!(body.contains("urn:keybroker:problem:payload-too-large"), "{body}");
    // The detail must not claim a limit that is not the configured one.
    assert!(!body.contains("larger than 0 bytes"), "{body}");
    assert_eq!(snapshot(&app).await, before);

    // Just under the limit is still parsed (and refused for its purpose, not its size).
    let under = with_purpose(&"p".repeat(limit - 100)).to_string();
    assert!(under.len() < limit);
    let case = issue_raw(&app, "just under the limit", json, under.as_bytes(), 400);
    run_cases(&app, vec![case]).await;
}

/// Sends a chunked POST over a plain socket (reqwest always knows the length of a byte body).
async fn raw_chunked_post(app: &TestApp, path: &str, token: &str, body: &[u8]) -> (u16, String, String) {
    let addr = app.url.trim_start_matches("http://");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let mut request = head.into_bytes();
    for chunk in body.chunks(8192) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    raw_request(app, request).await
}

/// Sends raw bytes to the app and returns the status, the head and the body of the answer, for
/// requests an HTTP client library refuses to build.
async fn raw_request(app: &TestApp, request: Vec<u8>) -> (u16, String, String) {
    let addr = app.url.trim_start_matches("http://").to_owned();
    // Blocking I/O on its own thread keeps the test runtime free to serve the request.
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        // The server may answer and close before reading everything; that is its right.
        let _ = stream.write_all(&request);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, head.to_owned(), body.to_owned())
    })
    .await
    .unwrap()
}

/// hyper refuses a request line longer than the `http` crate's URI limit (64 KiB) itself, with
/// a bare 414, before keybroker's router sees it: no problem document is possible there, but it
/// is still a 4xx and nothing changes.
#[tokio::test]
async fn a_uri_beyond_64_kib_is_refused_before_routing() {
    let app = TestApp::spawn().await;
    let before = snapshot(&app).await;
    let path = format!("/v1/keys/{}", "a".repeat(70_000));
    let request = format!("DELETE {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n", app.alice());
    let (status, head, _) = raw_request(&app, request.into_bytes()).await;
    assert_eq!(status, 414, "{head}");
    assert_eq!(snapshot(&app).await, before);
    // The server is unharmed.
    assert_eq!(app.get("/v1/me", &app.alice()).await.status(), 200);
}

#[tokio::test]
async fn malformed_ids_queries_and_routes_are_refused() {
    let app = TestApp::spawn().await;
    let alice = app.alice();
    let auditor = app.auditor();
    let nil = "00000000-0000-0000-0000-000000000000";
    let long = "a".repeat(4096);
    let long_hex = "f".repeat(20_000);
    let forged = base64_url("seq:-5");
    let mut cases = Vec::new();
    for method in [Method::GET, Method::DELETE] {
        for (name, id, status) in [
            ("not a UUID", "not-a-uuid", 400),
            ("NUL", "%00", 400),
            ("invalid UTF-8", "%FF%FE", 400),
            ("an encoded slash", "a%2Fb", 400),
            ("a 4096-character id", long.as_str(), 400),
            ("a 20000-character id", long_hex.as_str(), 400),
            ("a UUID with a trailing NUL", &format!("{nil}%00"), 400),
            ("a UUID nobody has", nil, 404),
        ] {
            cases.push(Case::new(
                format!("{method} key: {name}"),
                method.clone(),
                format!("/v1/keys/{id}"),
                &alice,
                status,
            ));
        }
    }
    for (query, status) in [
        ("limit=0", 400),
        ("limit=201", 400),
        ("limit=100000", 400),
        ("limit=99999999999999999999", 400),
        ("limit=-1", 400),
        ("limit=abc", 400),
        ("limit=", 400),
        ("limit=1&limit=2", 400),
        ("state=bogus", 400),
        ("state=ACTIVE", 400),
        ("state=%00", 400),
        ("colour=blue", 400),
        ("cursor=forged", 400),
        ("cursor=%00", 400),
        (&format!("cursor={forged}"), 400),
        (&format!("cursor={}", base64_url("seq:abc")), 400),
        (&format!("cursor={}", base64_url("seq:99999999999999999999")), 400),
        ("requester=bob%40example.com", 403),
    ] {
        cases.push(Case::get(format!("list keys ?{query}"), format!("/v1/keys?{query}"), &alice, status));
    }
    for (query, status) in [
        ("from=yesterday", 400),
        ("from=2024-01-01", 400),
        ("from=1700000000", 400),
        ("to=2024-13-01T00:00:00Z", 400),
        ("to=2024-01-01T10:00:00", 400),
        ("from=%00", 400),
        ("key_id=not-a-uuid", 400),
        ("limit=0", 400),
        ("limit=100000", 400),
        ("limit=abc", 400),
        ("cursor=forged", 400),
        (&format!("cursor={forged}"), 400),
        ("verbose=true", 400),
    ] {
        cases.push(Case::get(format!("audit ?{query}"), format!("/v1/audit?{query}"), &auditor, status));
    }
    for (name, path) in [
        ("unknown route", "/v1/nope"),
        ("unknown version", "/v2/keys"),
        ("the root", "/"),
        ("below a key", &format!("/v1/keys/{nil}/revoke")),
        ("below identify", "/v1/keys/identify/extra"),
        ("NUL in a route", "/v1/%00"),
        ("a long route", &format!("/{long}")),
    ] {
        cases.push(Case::get(format!("404: {name}"), path, &alice, 404));
    }
    for (method, path) in [
        (Method::PUT, "/v1/keys".to_owned()),
        (Method::DELETE, "/v1/keys".to_owned()),
        (Method::PATCH, format!("/v1/keys/{nil}")),
        (Method::POST, format!("/v1/keys/{nil}")),
        (Method::GET, "/v1/keys/identify".to_owned()),
        (Method::POST, "/v1/scopes".to_owned()),
        (Method::DELETE, "/v1/me".to_owned()),
        (Method::POST, "/v1/audit".to_owned()),
        (Method::DELETE, "/v1/audit/verify".to_owned()),
        (Method::POST, "/healthz".to_owned()),
        (Method::PUT, "/openapi.json".to_owned()),
    ] {
        cases.push(Case::new(format!("405: {method} {path}"), method, path, &alice, 405));
    }
    let identify = |name: &str, body: Value, status: u16| {
        Case::new(format!("identify: {name}"), Method::POST, "/v1/keys/identify", &auditor, status).json(body)
    };
    cases.extend([
        identify("empty api_key", json!({"api_key": ""}), 400),
        identify("blank api_key", json!({"api_key": "  \t "}), 400),
        identify("huge api_key", json!({"api_key": "API-".repeat(5000)}), 400),
        identify("api_key a number", json!({"api_key": 42}), 400),
        identify("api_key null", json!({"api_key": null}), 400),
        identify("no api_key", json!({}), 400),
        identify("an unknown field", json!({"api_key": "API-ABCDEFGH", "key": "x"}), 400),
        identify("an array", json!(["API-ABCDEFGH"]), 400),
        identify("a secret nobody issued", json!({"api_key": "API-NOBODYISSUEDTHIS0000000"}), 404),
        Case::new("identify: invalid JSON", Method::POST, "/v1/keys/identify", &auditor, 400)
            .body(Some("application/json"), "{\"api_key\": "),
        Case::new("identify: text/plain", Method::POST, "/v1/keys/identify", &auditor, 415)
            .body(Some("text/plain"), "API-ABCDEFGH"),
    ]);

    // An existing key must survive every one of these untouched, revocations included.
    let issued = app.issue_ok(&alice, json!({"scope": "payments-deploy", "purpose": "bystander"})).await;
    let id = issued["id"].as_str().unwrap().to_owned();
    cases.push(Case::new("DELETE key with a trailing slash", Method::DELETE, format!("/v1/keys/{id}/"), &alice, 404));
    cases.push(Case::new("DELETE key with a suffix", Method::DELETE, format!("/v1/keys/{id}x"), &alice, 400));
    cases.push(Case::new("DELETE key with a query", Method::DELETE, format!("/v1/keys/{id}?force=1"), &app.bob(), 404));
    run_cases(&app, cases).await;
    let record: Value = app.get(&format!("/v1/keys/{id}"), &alice).await.json().await.unwrap();
    assert_eq!(record["state"], "active");
}

fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

// ---------------------------------------------------------------------------------------------
// Randomized: a fixed seed, a bounded number of requests, the same two promises.

const FUZZ_SEED: u64 = 0x6b65_7962_726f_6b72;
const FUZZ_REQUESTS: usize = 400;

fn random_string(rng: &mut StdRng, max_len: usize) -> String {
    const POOL: &[char] = &[
        'a', 'Z', '0', '-', '.', '/', '%', '?', '&', '=', '#', ' ', '"', '\\', '\u{0}', '\n', '\u{1b}', '\u{7f}',
        '\u{202e}', '\u{200b}', '\u{feff}', 'é', '🔑', 'd', 'h', 's',
    ];
    let len = rng.gen_range(0..=max_len);
    (0..len).map(|_| POOL[rng.gen_range(0..POOL.len())]).collect()
}

fn random_bytes(rng: &mut StdRng, max_len: usize) -> Vec<u8> {
    let mut bytes = vec![0; rng.gen_range(0..=max_len)];
    rng.fill_bytes(&mut bytes);
    bytes
}

fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    let leaf_only = depth == 0;
    match rng.gen_range(0..if leaf_only { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.gen_bool(0.5)),
        2 => json!(rng.gen_range(-1_000_000_000_000i64..1_000_000_000_000)),
        3 => json!(rng.gen_range(-1e300..1e300)),
        4 => json!(random_string(rng, 40)),
        5 => Value::Array((0..rng.gen_range(0..4)).map(|_| random_json(rng, depth - 1)).collect()),
        _ => Value::Object(
            (0..rng.gen_range(0..4)).map(|_| (random_string(rng, 8), random_json(rng, depth - 1))).collect(),
        ),
    }
}

/// A value for one field of an issuance: mostly plausible (so that later checks are reached),
/// sometimes anything.
fn random_field(rng: &mut StdRng, plausible: &[&str]) -> Value {
    match rng.gen_range(0..6) {
        0..=2 => json!(plausible[rng.gen_range(0..plausible.len())]),
        3 => json!(random_string(rng, 30)),
        4 => {
            let base = plausible[rng.gen_range(0..plausible.len())];
            json!(format!("{base}{}", random_string(rng, 3)))
        }
        _ => random_json(rng, 1),
    }
}

/// An issuance body shaped like the real thing, with random values and random extra fields.
fn random_issuance(rng: &mut StdRng) -> Value {
    // Not `reporting-readonly`: alice may use it and her quota there is not full.
    const SCOPES: &[&str] = &["payments-deploy", "payments-deploy", "web-deploy", "PAYMENTS-DEPLOY", "nope"];
    const PURPOSES: &[&str] = &["deploy", "release 1.2", "nightly", "", " "];
    const TIMES: &[&str] = &["2030-01-01T00:00:00Z", "2000-01-01T00:00:00Z", "2026-02-30T00:00:00Z", "now"];
    const TTLS: &[&str] = &["1h", "7d", "31d", "0s", "-1h", "1000000000d"];
    let mut body = serde_json::Map::new();
    if rng.gen_bool(0.9) {
        body.insert("scope".to_owned(), random_field(rng, SCOPES));
    }
    if rng.gen_bool(0.9) {
        body.insert("purpose".to_owned(), random_field(rng, PURPOSES));
    }
    let (expires_at, ttl) =
        [(false, false), (false, false), (true, false), (false, true), (true, true)][rng.gen_range(0..5)];
    if expires_at {
        body.insert("expires_at".to_owned(), random_field(rng, TIMES));
    }
    if ttl {
        body.insert("ttl".to_owned(), random_field(rng, TTLS));
    }
    if rng.gen_bool(0.1) {
        body.insert(random_string(rng, 10), random_json(rng, 1));
    }
    Value::Object(body)
}

fn percent_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| if b.is_ascii_alphanumeric() || *b == b'-' { (*b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn random_query(rng: &mut StdRng) -> String {
    const NAMES: &[&str] =
        &["limit", "cursor", "state", "scope", "requester", "actor", "action", "key_id", "from", "to", "x"];
    (0..rng.gen_range(0..4))
        .map(|_| {
            let name = if rng.gen_bool(0.8) {
                NAMES[rng.gen_range(0..NAMES.len())].to_owned()
            } else {
                percent_encode(random_string(rng, 6).as_bytes())
            };
            let value = match rng.gen_range(0..3) {
                0 => rng.gen_range(-5i64..100_000).to_string(),
                1 => percent_encode(&random_bytes(rng, 20)),
                _ => percent_encode(random_string(rng, 20).as_bytes()),
            };
            format!("{name}={value}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn random_request(rng: &mut StdRng, tokens: &[String]) -> Case {
    let token = &tokens[rng.gen_range(0..tokens.len())];
    let json_type = Some("application/json");
    match rng.gen_range(0..10) {
        0 => Case::new("random bytes", Method::POST, "/v1/keys", token, 0).body(json_type, random_bytes(rng, 300)),
        1 => Case::new("random JSON", Method::POST, "/v1/keys", token, 0).json(random_json(rng, 3)),
        2..=5 => Case::new("random issuance", Method::POST, "/v1/keys", token, 0).json(random_issuance(rng)),
        6 => {
            let body = if rng.gen_bool(0.5) { json!({"api_key": random_json(rng, 1)}) } else { random_json(rng, 2) };
            Case::new("random identify", Method::POST, "/v1/keys/identify", token, 0).json(body)
        }
        7 => {
            let method = if rng.gen_bool(0.5) { Method::GET } else { Method::DELETE };
            let segment = percent_encode(&random_bytes(rng, 60));
            Case::new("random key id", method, format!("/v1/keys/{segment}"), token, 0)
        }
        8 => {
            let base = ["/v1/keys", "/v1/audit", "/v1/scopes", "/v1/me", "/v1/audit/verify"][rng.gen_range(0..5)];
            Case::get("random query", format!("{base}?{}", random_query(rng)), token, 0)
        }
        _ => {
            let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS];
            let method = methods[rng.gen_range(0..methods.len())].clone();
            let segments: Vec<String> =
                (0..rng.gen_range(1..4)).map(|_| percent_encode(&random_bytes(rng, 12))).collect();
            let prefix = ["", "/v1", "/v1/keys"][rng.gen_range(0..3)];
            Case::new("random path", method, format!("{prefix}/{}", segments.join("/")), token, 0)
                .body(json_type, random_bytes(rng, 40))
        }
    }
}

#[tokio::test]
async fn random_requests_never_get_a_5xx_or_change_anything() {
    let app = TestApp::spawn().await;
    // alice holds her scope's maximum of active keys, so even a random body that happens to be
    // valid for `payments-deploy` cannot issue one, yet it still reaches the expiry checks. bob
    // and an outsider cannot use that scope at all.
    for i in 0..3 {
        app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": format!("quota {i}")})).await;
    }
    let tokens = [app.alice(), app.alice(), app.token("mallory@example.com", &[]), app.auditor()];
    let before = snapshot(&app).await;
    let creates_before = app.sim.request_count("POST /api/users/{id}/apikeys");

    let mut rng = StdRng::seed_from_u64(FUZZ_SEED);
    let mut failures = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for i in 0..FUZZ_REQUESTS {
        let case = random_request(&mut rng, &tokens);
        let res = send(&app, &case).await;
        let status = res.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        let describe = || format!("#{i} {} {} {:.120}", case.name, case.method, case.path);
        if status >= 500 || status == 201 {
            let body = res.text().await.unwrap_or_default();
            failures.push(format!("{}: {status} {body:.300}", describe()));
        } else if status >= 400 {
            if let Err(why) = check_problem(res, status).await {
                failures.push(format!("{}: {why}", describe()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {FUZZ_REQUESTS} random requests failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The generator reaches past the parser: some requests were refused by policy, not syntax.
    assert!(statuses.contains_key(&400), "{statuses:?}");
    for refused_by_policy in [403, 404, 422] {
        assert!(statuses.contains_key(&refused_by_policy), "{statuses:?}");
    }
    assert_eq!(snapshot(&app).await, before, "a random request changed something");
    assert_eq!(app.sim.request_count("POST /api/users/{id}/apikeys"), creates_before);
}
