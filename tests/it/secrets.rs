//! An issued key's secret exists in exactly one place: its issuing response. Not in any other
//! response, header, database byte, audit event or log line; and keybroker's own credentials
//! never reach the logs either.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use hmac::{Hmac, Mac};
use octopus_sim::DEMO_BROKER_API_KEY;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use tracing_subscriber::util::SubscriberInitExt;

use crate::helpers::{HMAC_SECRET, JWT_SECRET, TestApp};

// ---------------------------------------------------------------------------------------------
// Log capture. The app runs on tokio tasks and sqlx on its own threads, so a thread-local
// subscriber would miss most of it: one global subscriber, installed once for the whole test
// binary, records every event at TRACE (and `log` records) as JSON into memory. Other tests'
// logs land there too, which only widens what the assertions cover.

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        json_logs_into(&buffer)
            .try_init()
            .expect("no other global tracing subscriber may be installed in the test binary");
        buffer
    })
    .clone()
}

/// A subscriber that writes every event, at every level, as a JSON line into `buffer`, with its
/// spans.
fn json_logs_into(buffer: &Arc<Mutex<Vec<u8>>>) -> impl tracing::Subscriber + Send + Sync + 'static {
    let writer = Buffer(buffer.clone());
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish()
}

fn logs_text(logs: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&logs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())).into_owned()
}

// ---------------------------------------------------------------------------------------------

/// One answer, as text, with the request that produced it.
struct Answer {
    what: String,
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn contains(&self, needle: &str) -> bool {
        self.headers.contains(needle) || self.body.contains(needle)
    }
}

async fn call(app: &TestApp, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Answer {
    let mut request = app.http.request(method.clone(), format!("{}{path}", app.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let res = request.send().await.unwrap();
    let status = res.status().as_u16();
    let headers = res
        .headers()
        .iter()
        .map(|(name, value)| format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())))
        .collect();
    let body = res.text().await.unwrap();
    Answer { what: format!("{method} {path}"), status, headers, body }
}

fn hmac_hex(key: &str, message: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Every byte of the SQLite database: the main file and its WAL (where recent writes live until
/// a checkpoint) and shared-memory index.
fn database_bytes(app: &TestApp) -> Vec<u8> {
    let main = app.db_path();
    let mut bytes = std::fs::read(&main).unwrap();
    for suffix in ["-wal", "-shm"] {
        let mut path = main.clone().into_os_string();
        path.push(suffix);
        if let Ok(more) = std::fs::read(&path) {
            bytes.extend(more);
        }
    }
    bytes
}

fn find(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The forms a secret could take if someone stored or logged it carelessly.
fn forms_of(secret: &str) -> Vec<String> {
    let body = secret.strip_prefix("API-").unwrap_or(secret);
    vec![secret.to_owned(), body.to_owned(), hex::encode(secret), hex::encode(Sha256::digest(secret))]
}

/// Issues a key for a payments member and returns (record id, secret), checking the issuing
/// answer.
async fn issue_one(app: &TestApp, token: &str) -> (String, String) {
    let answer = call(
        app,
        Method::POST,
        "/v1/keys",
        Some(token),
        Some(json!({"scope": "payments-deploy", "purpose": "secrets test"})),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    let secret = body["api_key"].as_str().unwrap().to_owned();
    assert!(secret.len() > 20 && secret.starts_with("API-"), "{secret}");
    // In the body, once, and not in any header (Location and friends name the record only).
    assert_eq!(answer.body.matches(&secret).count(), 1);
    assert!(!answer.headers.contains(&secret), "{}", answer.headers);
    assert!(answer.headers.contains("cache-control: no-store"), "{}", answer.headers);
    (body["id"].as_str().unwrap().to_owned(), secret)
}

#[tokio::test]
async fn an_issued_secret_appears_only_in_its_issuing_response() {
    let logs = capture_logs();
    let app = TestApp::spawn().await;
    let (alice, bob, auditor, admin) = (app.alice(), app.bob(), app.auditor(), app.admin());
    let (id, secret) = issue_one(&app, &alice).await;
    let key = format!("/v1/keys/{id}");

    let mut answers = Vec::new();
    for (token, query) in [(&alice, ""), (&auditor, ""), (&admin, "?scope=payments-deploy&state=active&limit=1")] {
        answers.push(call(&app, Method::GET, &format!("/v1/keys{query}"), Some(token), None).await);
    }
    for token in [&alice, &auditor, &admin] {
        answers.push(call(&app, Method::GET, &key, Some(token), None).await);
    }
    // identify finds the record from the secret, and does not echo the secret back.
    let identify = json!({"api_key": secret});
    let identified = call(&app, Method::POST, "/v1/keys/identify", Some(&auditor), Some(identify.clone())).await;
    assert_eq!(identified.status, 200, "{}", identified.body);
    assert_eq!(serde_json::from_str::<Value>(&identified.body).unwrap()["id"], id.as_str());
    answers.push(identified);
    answers.push(call(&app, Method::POST, "/v1/keys/identify", Some(&admin), Some(identify.clone())).await);
    answers.push(call(&app, Method::POST, "/v1/keys/identify", Some(&alice), Some(identify.clone())).await);
    // Other requests, refused or not, while the key is active.
    let another = json!({"scope": "web-deploy", "purpose": "another key"});
    let second = call(&app, Method::POST, "/v1/keys", Some(&admin), Some(another)).await;
    assert_eq!(second.status, 201, "{}", second.body);
    answers.push(second);
    let refused = json!({"scope": "payments-deploy", "purpose": "not my team"});
    answers.push(call(&app, Method::POST, "/v1/keys", Some(&bob), Some(refused)).await);
    answers.push(call(&app, Method::GET, &key, Some(&bob), None).await);
    for path in ["/v1/me", "/v1/scopes"] {
        answers.push(call(&app, Method::GET, path, Some(&alice), None).await);
    }
    // Revocation, twice (idempotent), then everything an auditor can read.
    for _ in 0..2 {
        let revoked = call(&app, Method::DELETE, &key, Some(&alice), None).await;
        assert_eq!(revoked.status, 200, "{}", revoked.body);
        answers.push(revoked);
    }
    answers.push(call(&app, Method::GET, &key, Some(&alice), None).await);
    answers.push(call(&app, Method::POST, "/v1/keys/identify", Some(&auditor), Some(identify)).await);
    for path in [
        "/v1/audit".to_owned(),
        format!("/v1/audit?key_id={id}"),
        "/v1/audit?action=key.issued".to_owned(),
        "/v1/audit/verify".to_owned(),
    ] {
        let answer = call(&app, Method::GET, &path, Some(&auditor), None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        answers.push(answer);
    }
    for path in ["/readyz", "/healthz", "/openapi.json"] {
        answers.push(call(&app, Method::GET, path, None, None).await);
    }

    for answer in &answers {
        for form in forms_of(&secret) {
            assert!(
                !answer.contains(&form),
                "{} ({}) shows the secret:\n{}{}",
                answer.what,
                answer.status,
                answer.headers,
                answer.body
            );
        }
    }
    // The answers above are about this key: the check is not passing on empty bodies.
    let audit_of_key = answers.iter().find(|a| a.what.contains("key_id=")).unwrap();
    assert!(audit_of_key.body.contains("key.issued") && audit_of_key.body.contains("key.revoked"));

    assert_not_recorded(&app, &id, &secret).await;
    assert_logs_clean(&logs, &id, &secret, &[&alice, &bob, &auditor, &admin]);
}

/// A secret pasted where it does not belong (as a bearer token, in a path, in a query or as an
/// Octopus header) must not be copied into the audit trail, the database or the logs.
#[tokio::test]
async fn a_secret_sent_in_the_wrong_place_is_not_recorded() {
    let logs = capture_logs();
    let app = TestApp::spawn().await;
    let alice = app.alice();
    let (id, secret) = issue_one(&app, &alice).await;

    let as_bearer = call(&app, Method::GET, "/v1/keys", Some(&secret), None).await;
    assert_eq!(as_bearer.status, 401);
    assert!(!as_bearer.contains(&secret), "{}", as_bearer.body);
    // reqwest logs the URLs it fetches, which would put the secret into the logs from the test's
    // side; requests with the secret in the URL go over a plain socket instead.
    let in_path = format!("/v1/keys/{secret}");
    assert_eq!(raw_status(&app, "GET", &in_path, None).await, 401);
    // With a valid token the answers name the bad input back to its sender; that is the caller's
    // own text on the caller's own connection, so only storage and logs are checked for these.
    assert_eq!(raw_status(&app, "GET", &in_path, Some(&alice)).await, 400);
    assert_eq!(raw_status(&app, "DELETE", &in_path, Some(&alice)).await, 400);
    for query in [format!("scope={secret}"), format!("state={secret}"), format!("cursor={secret}")] {
        let status = raw_status(&app, "GET", &format!("/v1/keys?{query}"), Some(&alice)).await;
        assert!(status == 200 || status == 400, "{query}: {status}");
    }
    let res = app
        .http
        .get(format!("{}/v1/me", app.url))
        .bearer_auth(&alice)
        .header("X-Octopus-ApiKey", &secret)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The attempt with a bad token was audited, without the token or the path; the one without
    // any credential was only counted.
    let denials = app.audit_events().await.into_iter().filter(|e| e.action == "auth.denied").count();
    assert_eq!(denials, 1);

    assert_not_recorded(&app, &id, &secret).await;
    assert_logs_clean(&logs, &id, &secret, &[&alice]);
}

/// The status of one HTTP/1.1 request sent over a plain socket.
async fn raw_status(app: &TestApp, method: &str, path: &str, token: Option<&str>) -> u16 {
    use std::io::Read;
    let addr = app.url.trim_start_matches("http://").to_owned();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    // Blocking I/O on its own thread keeps the test's runtime free to serve the request.
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    })
    .await
    .unwrap()
}

/// The secret is in neither the audit trail nor the database file; the database holds its
/// HMAC keyed with the server secret, not a plain hash.
async fn assert_not_recorded(app: &TestApp, id: &str, secret: &str) {
    let events = app.audit_events().await;
    let trail = serde_json::to_string(&events).unwrap();
    assert!(events.iter().any(|e| e.action == "key.issued" && e.key_id.map(|k| k.to_string()).as_deref() == Some(id)));
    for form in forms_of(secret) {
        assert!(!trail.contains(&form), "the audit trail holds the secret");
    }

    let bytes = database_bytes(app);
    let expected_hmac = hmac_hex(HMAC_SECRET, secret);
    // The file really holds this key's record, so the search below can fail.
    assert!(find(&bytes, id), "the database files do not hold record {id}");
    assert!(find(&bytes, &expected_hmac), "the database files do not hold the record's keyed hash");
    for form in forms_of(secret) {
        assert!(!find(&bytes, &form), "the database file holds the secret (as {form:.12}...)");
    }

    // Read back through SQLite, read-only, as an operator inspecting the file would.
    let options = SqliteConnectOptions::new().filename(app.db_path()).read_only(true);
    let pool = SqlitePool::connect_with(options).await.unwrap();
    let stored: Option<String> =
        sqlx::query_scalar("SELECT secret_hmac FROM key_records WHERE id = ?").bind(id).fetch_one(&pool).await.unwrap();
    pool.close().await;
    let stored = stored.expect("an issued record keeps a keyed hash of its secret");
    assert_ne!(stored, hex::encode(Sha256::digest(secret)), "the stored hash is a plain SHA-256, not keyed");
    assert_ne!(stored, hmac_hex("", secret), "the stored hash is keyed with an empty key");
    assert_eq!(stored, expected_hmac, "the stored hash is not HMAC-SHA256 keyed with the server secret");
}

/// The captured logs mention this test's key (so the capture works) and hold none of the
/// secrets: the issued key, the broker's Octopus credential, the JWT and HMAC secrets, or the
/// callers' bearer tokens.
fn assert_logs_clean(logs: &Mutex<Vec<u8>>, id: &str, secret: &str, tokens: &[&str]) {
    let text = logs_text(logs);
    assert!(!text.is_empty(), "nothing was logged: the capture does not work");
    // The app's own line about this issuance, from inside its tokio task (the test client's
    // logs name the record too, so the id alone would not prove the app is heard).
    let issued_line = text.lines().any(|l| l.contains(id) && l.contains(r#""target":"keybroker::services::issuance""#));
    assert!(issued_line, "no log line of keybroker::services::issuance names key {id}: the capture misses the app");
    let mut forbidden: Vec<(String, String)> =
        forms_of(secret).into_iter().map(|f| ("the issued secret".to_owned(), f)).collect();
    forbidden.push(("the broker's Octopus API key".to_owned(), DEMO_BROKER_API_KEY.to_owned()));
    forbidden.push(("the JWT secret".to_owned(), JWT_SECRET.to_owned()));
    forbidden.push(("the HMAC secret".to_owned(), HMAC_SECRET.to_owned()));
    for (i, token) in tokens.iter().enumerate() {
        let signature = token.rsplit('.').next().unwrap_or_default();
        forbidden.push((format!("bearer token #{i}"), (*token).to_owned()));
        forbidden.push((format!("the signature of bearer token #{i}"), signature.to_owned()));
    }
    for (what, value) in forbidden {
        assert!(!text.contains(&value), "the logs hold {what}");
    }
}

#[tokio::test]
async fn every_request_gets_one_access_log_line_with_its_request_id_and_route() {
    let logs = capture_logs();
    let app = TestApp::spawn().await;
    let request_id = format!("trace-{}", uuid::Uuid::new_v4());
    let res = app
        .http
        .get(format!("{}/v1/keys/{}", app.url, uuid::Uuid::new_v4()))
        .bearer_auth(app.alice())
        .header("x-request-id", &request_id)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["x-request-id"], request_id.as_str(), "the caller's request id is echoed");
    let text = logs_text(&logs);
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.contains(&request_id))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "handled" || l["fields"]["message"] == "handled")
        .collect();
    assert_eq!(lines.len(), 1, "one access-log line per request: {text}");
    let line = lines[0].to_string();
    assert!(line.contains("/v1/keys/{id}"), "the route template is logged: {line}");
    assert!(line.contains("404"), "the status is logged: {line}");
    assert!(!line.contains(&app.alice()[..40]), "no token in the access log");
}

#[tokio::test]
async fn a_database_failure_is_logged_once_where_it_is_answered() {
    // This test's own subscriber, for this thread only: a current-thread runtime runs the app's
    // server and its tasks here, while other tests (some with the same injected failure) run on
    // other threads of the test binary.
    let logs = Arc::new(Mutex::new(Vec::new()));
    let _only_here = tracing::subscriber::set_default(json_logs_into(&logs));
    tracing::callsite::rebuild_interest_cache();
    let (app, flaky, _dir) = crate::reconcile::flaky_app().await;
    flaky.fail_pending.store(true, std::sync::atomic::Ordering::SeqCst);
    let request_id = format!("trace-{}", uuid::Uuid::new_v4());
    let res = app
        .http
        .post(format!("{}/v1/keys", app.url))
        .bearer_auth(app.alice())
        .header("x-request-id", &request_id)
        .json(&serde_json::json!({"scope": "payments-deploy", "purpose": "logged once"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert!(!body.to_string().contains("injected failure"), "the cause is for the logs only: {body}");
    let text = logs_text(&logs);
    let failures: Vec<&str> = text.lines().filter(|l| l.contains("injected failure")).collect();
    assert_eq!(failures.len(), 1, "one log line for one failure: {failures:#?}");
    assert!(failures[0].contains(&request_id), "with the request's id: {}", failures[0]);
    assert!(failures[0].contains("ERROR"), "at error level: {}", failures[0]);
}
