//! Caller authentication over HTTP: which Bearer tokens keybroker accepts, which it refuses with a
//! 401 challenge, and what every refusal leaves in the audit trail. Keys and JWKS documents are
//! fixtures in `tests/fixtures/` (see its README).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keybroker::config::RawAuth;
use keybroker::dev::{DEV_AUDIENCE, DEV_ISSUER};
use serde_json::{Map, Value, json};

use crate::helpers::{JWT_SECRET, TestApp, TestOptions};

const RSA_PRIVATE: &str = include_str!("../fixtures/rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("../fixtures/rsa-public.pem");
/// A second RSA key: never configured as a PEM key, served as JWKS `k2` after a "rotation".
const RSA2_PRIVATE: &str = include_str!("../fixtures/rsa2-private.pem");
const EC_PRIVATE: &str = include_str!("../fixtures/ec-private.pem");
/// The public half of `rsa-private.pem` as kid `k1`.
const JWKS_K1: &str = include_str!("../fixtures/jwks-k1.json");
/// The public half of `rsa2-private.pem` as kid `k2`.
const JWKS_K2: &str = include_str!("../fixtures/jwks-k2.json");

/// The endpoints behind the `Caller` extractor that these tests probe.
const PROTECTED: [&str; 2] = ["/v1/me", "/v1/keys"];

// ---------------------------------------------------------------------------------------------
// Tokens.

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Claims keybroker accepts: its issuer and audience, valid for the next hour.
fn claims(subject: &str, groups: &[&str]) -> Value {
    let now = now();
    json!({
        "iss": DEV_ISSUER,
        "aud": DEV_AUDIENCE,
        "sub": subject,
        "name": subject,
        "groups": groups,
        "iat": now,
        "nbf": now - 5,
        "exp": now + 3600,
    })
}

/// Valid claims for alice (team payments), changed by `edit`.
fn claims_with(edit: impl FnOnce(&mut Map<String, Value>)) -> Value {
    let mut value = claims("alice@example.com", &["payments"]);
    edit(value.as_object_mut().unwrap());
    value
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(Algorithm::HS256, None, claims, &EncodingKey::from_secret(JWT_SECRET.as_bytes()))
}

fn rs256(kid: Option<&str>, private_pem: &str, claims: &Value) -> String {
    sign(Algorithm::RS256, kid, claims, &EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap())
}

fn es256(claims: &Value) -> String {
    sign(Algorithm::ES256, None, claims, &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// Configurations.

fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The demo configuration with its `[auth]` verifying with `algorithms` and what `keys` sets
/// instead of the HS256 secret.
fn verifying_with(algorithms: &[&str], keys: impl FnOnce(&mut RawAuth) + Send + 'static) -> TestOptions {
    let algorithms: Vec<String> = algorithms.iter().map(|a| (*a).to_owned()).collect();
    TestOptions {
        configure: Box::new(move |f| {
            let auth = crate::helpers::auth(f);
            assert_eq!(auth.algorithms, ["HS256"], "the demo's [auth] no longer verifies with HS256");
            auth.algorithms = algorithms;
            auth.hs256_secret_file = None;
            keys(auth);
        }),
        ..Default::default()
    }
}

/// RS256 and ES256 with `rsa-public.pem` and `ec-public.pem`; no HS256.
async fn pem_app() -> TestApp {
    let files = [fixture_path("rsa-public.pem"), fixture_path("ec-public.pem")].map(PathBuf::from).to_vec();
    TestApp::spawn_with(verifying_with(&["RS256", "ES256"], move |a| a.public_key_files = files)).await
}

/// Only RS256, with `rsa-public.pem`.
async fn rs256_only_app() -> TestApp {
    let file = PathBuf::from(fixture_path("rsa-public.pem"));
    TestApp::spawn_with(verifying_with(&["RS256"], move |a| a.public_key_files = vec![file])).await
}

/// Only RS256, with keys from `jwks`.
async fn jwks_app(jwks: &JwksServer) -> TestApp {
    let url = jwks.url.clone();
    TestApp::spawn_with(verifying_with(&["RS256"], move |a| a.jwks_url = Some(url))).await
}

/// A JWKS endpoint on an ephemeral port that counts its requests and can switch documents.
struct JwksServer {
    url: String,
    fetches: Arc<AtomicUsize>,
    document: Arc<Mutex<&'static str>>,
}

impl JwksServer {
    async fn start(document: &'static str) -> Self {
        let fetches = Arc::new(AtomicUsize::new(0));
        let current = Arc::new(Mutex::new(document));
        let handler = {
            let (fetches, current) = (fetches.clone(), current.clone());
            move || async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                let body = *current.lock().unwrap();
                ([(axum::http::header::CONTENT_TYPE, "application/json")], body)
            }
        };
        let router = axum::Router::new().route("/jwks.json", axum::routing::get(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { url, fetches, document: current }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn serve(&self, document: &'static str) {
        *self.document.lock().unwrap() = document;
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and assertions.

async fn get(app: &TestApp, path: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut request = app.http.get(format!("{}{path}", app.url));
    if let Some(value) = authorization {
        request = request.header(reqwest::header::AUTHORIZATION, value);
    }
    request.send().await.unwrap()
}

/// `GET /v1/me` with a token that must be accepted.
async fn me(app: &TestApp, token: &str) -> Value {
    let res = get(app, "/v1/me", Some(&bearer(token))).await;
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "the token was refused: {body}");
    body
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect()
}

/// Asserts that every protected endpoint answers 401 with a Bearer challenge and a problem body
/// whose detail contains `reason`, and that each refusal is audited once as `auth.denied` with
/// that reason and the route, without the credential (or any long piece of it) anywhere. A
/// request without any credential is anonymous noise: refused the same way, never audited.
async fn assert_refused(app: &TestApp, authorization: Option<&str>, reason: &str) {
    let credential = authorization.and_then(|a| a.split_once(' ')).map_or("", |(_, c)| c);
    let secrets: Vec<&str> =
        std::iter::once(credential).chain(credential.split('.')).filter(|s| s.len() >= 12).collect();
    for (i, path) in PROTECTED.iter().enumerate() {
        let before = app.audit_events().await.len();
        let res = get(app, path, authorization).await;
        assert_eq!(res.status(), 401, "GET {path} did not refuse {authorization:?}");
        let challenge = res.headers().get("www-authenticate").expect("a WWW-Authenticate header");
        let challenge = challenge.to_str().unwrap().to_owned();
        assert!(challenge.starts_with("Bearer"), "challenge: {challenge}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["status"], 401);
        assert_eq!(body["type"], "urn:keybroker:problem:unauthenticated");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(reason), "GET {path}: expected a refusal because {reason:?}, got {detail:?}");

        let events = app.audit_events().await;
        let new = &events[before..];
        let denied: Vec<_> = new.iter().filter(|e| e.action == "auth.denied").collect();
        if authorization.is_none() {
            assert!(denied.is_empty(), "GET {path}: a request without a credential was audited: {new:?}");
            continue;
        }
        if i > 0 {
            // The same refusal from the same address within the minute: counted, not written again.
            assert!(denied.is_empty(), "GET {path}: a repeated refusal was written again: {new:?}");
            continue;
        }
        assert_eq!(denied.len(), 1, "GET {path}: one auth.denied event expected, got {new:?}");
        assert_eq!(denied[0].detail["count"], 1);
        assert_eq!(denied[0].outcome, "denied");
        assert_eq!(denied[0].actor, "anonymous");
        assert_eq!(denied[0].detail["reason"], detail);
        assert_eq!(denied[0].detail["route"], *path);
        for secret in &secrets {
            for event in new {
                assert!(!serde_json::to_string(event).unwrap().contains(secret), "the audit trail holds the token");
            }
            assert!(!body.to_string().contains(secret), "the problem body echoes the token");
            assert!(!challenge.contains(secret), "the challenge echoes the token");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accepted tokens.

#[tokio::test]
async fn a_valid_hs256_token_shows_the_subject_teams_and_requester_role() {
    let app = TestApp::spawn().await;
    let body = me(&app, &app.token("alice@example.com", &["payments", "data"])).await;
    assert_eq!(body["subject"], "alice@example.com");
    assert_eq!(body["name"], "alice@example.com");
    assert_eq!(strings(&body["teams"]), ["data", "payments"]);
    assert_eq!(strings(&body["roles"]), ["requester"]);
}

#[tokio::test]
async fn a_valid_hs256_token_opens_the_key_list() {
    let app = TestApp::spawn().await;
    let res = app.get("/v1/keys", &app.alice()).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn admin_teams_grant_the_admin_role() {
    let app = TestApp::spawn().await;
    let body = me(&app, &app.admin()).await;
    assert_eq!(body["subject"], "root@example.com");
    assert_eq!(strings(&body["roles"]), ["requester", "admin"]);
}

#[tokio::test]
async fn auditor_teams_grant_the_auditor_role() {
    let app = TestApp::spawn().await;
    let body = me(&app, &app.auditor()).await;
    assert_eq!(body["subject"], "sam@example.com");
    assert_eq!(strings(&body["roles"]), ["requester", "auditor"]);
}

#[tokio::test]
async fn a_token_expired_within_the_leeway_is_still_accepted() {
    // The demo config keeps the default leeway of 30 s.
    let app = TestApp::spawn().await;
    let token = hs256(&claims_with(|c| {
        c.insert("exp".to_owned(), json!(now() - 5));
    }));
    assert_eq!(me(&app, &token).await["subject"], "alice@example.com");
}

#[tokio::test]
async fn teams_from_a_nested_claim_map_to_roles() {
    let app = TestApp::spawn_with(TestOptions {
        configure: Box::new(|f| crate::helpers::auth(f).teams_claim = Some("realm_access.roles".to_owned())),
        ..Default::default()
    })
    .await;
    let token = hs256(&claims_with(|c| {
        c.insert("realm_access".to_owned(), json!({"roles": ["payments", "platform-admins"]}));
        // The flat claim is no longer read: this would make alice an auditor.
        c.insert("groups".to_owned(), json!(["security"]));
    }));
    let body = me(&app, &token).await;
    assert_eq!(strings(&body["teams"]), ["payments", "platform-admins"]);
    assert_eq!(strings(&body["roles"]), ["requester", "admin"]);
}

// ---------------------------------------------------------------------------------------------
// Refused requests: each is a 401 with a Bearer challenge, audited.

#[tokio::test]
async fn a_request_without_authorization_is_refused_and_only_counted() {
    let app = TestApp::spawn().await;
    assert_refused(&app, None, "token is required").await;
    let metrics = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keybroker_auth_missing_credential_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(counted, Some(PROTECTED.len() as f64), "{metrics}");
    // RFC 6750 §3.1: no error code when the request carried no credentials at all.
    let res = get(&app, "/v1/me", None).await;
    assert_eq!(res.headers()["www-authenticate"], "Bearer realm=\"keybroker\"");
}

#[tokio::test]
async fn a_basic_authorization_is_refused() {
    let app = TestApp::spawn().await;
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:hunter2-password"));
    assert_refused(&app, Some(&basic), "not a Bearer token").await;
}

#[tokio::test]
async fn a_garbage_token_is_refused() {
    let app = TestApp::spawn().await;
    assert_refused(&app, Some("Bearer this-is-not-a-jwt-at-all"), "malformed").await;
}

#[tokio::test]
async fn a_token_expired_beyond_the_leeway_is_refused() {
    let app = TestApp::spawn().await;
    let token = hs256(&claims_with(|c| {
        c.insert("nbf".to_owned(), json!(now() - 7200));
        c.insert("exp".to_owned(), json!(now() - 3600));
    }));
    assert_refused(&app, Some(&bearer(&token)), "expired").await;
}

#[tokio::test]
async fn a_token_without_exp_is_refused() {
    let app = TestApp::spawn().await;
    let token = hs256(&claims_with(|c| {
        c.remove("exp");
    }));
    assert_refused(&app, Some(&bearer(&token)), "`exp`").await;
}

#[tokio::test]
async fn a_token_not_valid_before_a_future_time_is_refused() {
    let app = TestApp::spawn().await;
    let token = hs256(&claims_with(|c| {
        c.insert("nbf".to_owned(), json!(now() + 3600));
        c.insert("exp".to_owned(), json!(now() + 7200));
    }));
    assert_refused(&app, Some(&bearer(&token)), "not valid yet").await;
}

#[tokio::test]
async fn time_claims_written_as_strings_are_refused() {
    // CVE-2026-25537: jsonwebtoken before 10.3 skipped the check of a non-numeric `nbf`, so a
    // validly signed token "not valid for ten years" was valid now.
    let in_ten_years = (chrono::Utc::now() + chrono::Duration::days(3650)).to_rfc3339();
    for (claim, value) in [
        ("nbf", json!(in_ten_years)),
        ("nbf", json!((now() + 10 * 365 * 86_400).to_string())),
        ("iat", json!("yesterday")),
        ("exp", json!((now() + 60).to_string())),
    ] {
        let app = TestApp::spawn().await;
        let token = hs256(&claims_with(|c| {
            c.insert(claim.to_owned(), value.clone());
        }));
        let reason = if claim == "exp" { "`exp`" } else { "is not a number of seconds" };
        assert_refused(&app, Some(&bearer(&token)), reason).await;
    }
}

#[tokio::test]
async fn a_token_from_another_issuer_is_refused() {
    let app = TestApp::spawn().await;
    let token = hs256(&claims_with(|c| {
        c.insert("iss".to_owned(), json!("https://evil.example/"));
    }));
    assert_refused(&app, Some(&bearer(&token)), "not one keybroker trusts").await;
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let app = TestApp::spawn().await;
    let token = hs256(&claims_with(|c| {
        c.insert("aud".to_owned(), json!("some-other-service"));
    }));
    assert_refused(&app, Some(&bearer(&token)), "another audience").await;
}

#[tokio::test]
async fn a_token_without_sub_is_refused() {
    let app = TestApp::spawn().await;
    let token = hs256(&claims_with(|c| {
        c.remove("sub");
    }));
    assert_refused(&app, Some(&bearer(&token)), "`sub`").await;
}

#[tokio::test]
async fn a_token_with_a_blank_sub_is_refused() {
    let app = TestApp::spawn().await;
    let token = hs256(&claims_with(|c| {
        c.insert("sub".to_owned(), json!("   "));
    }));
    assert_refused(&app, Some(&bearer(&token)), "`sub`").await;
}

#[tokio::test]
async fn a_token_signed_with_another_secret_is_refused() {
    let app = TestApp::spawn().await;
    let key = EncodingKey::from_secret(b"another-secret-0123456789abcdef0123456789abcdef");
    let token = sign(Algorithm::HS256, None, &claims("alice@example.com", &["payments"]), &key);
    assert_refused(&app, Some(&bearer(&token)), "signature is invalid").await;
}

#[tokio::test]
async fn an_unsigned_alg_none_token_is_refused() {
    let app = TestApp::spawn().await;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims("root@example.com", &["platform-admins"]).to_string());
    assert_refused(&app, Some(&bearer(&format!("{header}.{payload}."))), "malformed").await;
}

#[tokio::test]
async fn an_hs256_token_keyed_with_the_rsa_public_key_is_refused_when_only_rs256_is_pinned() {
    let app = rs256_only_app().await;
    let admin = claims("root@example.com", &["platform-admins"]);
    // The app does verify RS256 tokens against this public key ...
    assert_eq!(me(&app, &rs256(None, RSA_PRIVATE, &admin)).await["subject"], "root@example.com");
    // ... but must not let a token pick HMAC and use that public key as the shared secret.
    let forged = sign(Algorithm::HS256, None, &admin, &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()));
    assert_refused(&app, Some(&bearer(&forged)), "algorithm HS256 is not accepted").await;
}

#[tokio::test]
async fn an_rs256_token_is_refused_when_only_hs256_is_allowed() {
    let app = TestApp::spawn().await;
    let token = rs256(None, RSA_PRIVATE, &claims("alice@example.com", &["payments"]));
    assert_refused(&app, Some(&bearer(&token)), "algorithm RS256 is not accepted").await;
}

#[tokio::test]
async fn the_audit_trail_never_holds_a_refused_token() {
    let app = TestApp::spawn().await;
    let expired = hs256(&claims_with(|c| {
        c.insert("exp".to_owned(), json!(now() - 3600));
    }));
    let forged = sign(Algorithm::HS256, None, &claims("root@example.com", &[]), &EncodingKey::from_secret(b"guess"));
    for token in [&expired, &forged] {
        assert_eq!(get(&app, "/v1/keys", Some(&bearer(token))).await.status(), 401);
    }
    let events = app.audit_events().await;
    assert_eq!(events.iter().filter(|e| e.action == "auth.denied").count(), 2);
    let trail = serde_json::to_string(&events).unwrap();
    for token in [&expired, &forged] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!trail.contains(token.as_str()) && !trail.contains(signature), "the audit trail holds a token");
    }
}

// ---------------------------------------------------------------------------------------------
// Public keys from PEM files.

#[tokio::test]
async fn an_rs256_token_verifies_against_a_public_key_file() {
    let app = pem_app().await;
    let body = me(&app, &rs256(None, RSA_PRIVATE, &claims("alice@example.com", &["payments"]))).await;
    assert_eq!(body["subject"], "alice@example.com");
    assert_eq!(strings(&body["teams"]), ["payments"]);
}

#[tokio::test]
async fn an_es256_token_verifies_against_a_public_key_file() {
    let app = pem_app().await;
    let body = me(&app, &es256(&claims("sam@example.com", &["security"]))).await;
    assert_eq!(body["subject"], "sam@example.com");
    assert_eq!(strings(&body["roles"]), ["requester", "auditor"]);
}

#[tokio::test]
async fn an_rs256_token_signed_with_an_unconfigured_key_is_refused() {
    let app = pem_app().await;
    let token = rs256(None, RSA2_PRIVATE, &claims("alice@example.com", &["payments"]));
    assert_refused(&app, Some(&bearer(&token)), "signature is invalid").await;
}

#[tokio::test]
async fn hs256_is_refused_once_the_config_pins_only_public_key_algorithms() {
    let app = pem_app().await;
    let token = hs256(&claims("alice@example.com", &["payments"]));
    assert_refused(&app, Some(&bearer(&token)), "algorithm HS256 is not accepted").await;
}

// ---------------------------------------------------------------------------------------------
// Keys from a JWKS URL. The cache refetches on an unknown `kid` at most once a minute, counted
// from the last fetch; the tests never wait that long, so they cover the first fetch and the rate
// limit, not a refetch after the interval.

#[tokio::test]
async fn a_token_whose_kid_is_in_the_jwks_is_accepted() {
    let jwks = JwksServer::start(JWKS_K1).await;
    let app = jwks_app(&jwks).await;
    assert_eq!(jwks.fetches(), 0, "the JWKS is fetched on first use, not at start");
    let body = me(&app, &rs256(Some("k1"), RSA_PRIVATE, &claims("alice@example.com", &["payments"]))).await;
    assert_eq!(body["subject"], "alice@example.com");
    assert_eq!(jwks.fetches(), 1);
}

#[tokio::test]
async fn the_jwks_is_cached_between_tokens_with_a_known_kid() {
    let jwks = JwksServer::start(JWKS_K1).await;
    let app = jwks_app(&jwks).await;
    for subject in ["alice@example.com", "bob@example.com", "sam@example.com"] {
        me(&app, &rs256(Some("k1"), RSA_PRIVATE, &claims(subject, &[]))).await;
    }
    assert_eq!(jwks.fetches(), 1);
}

#[tokio::test]
async fn an_unknown_kid_fetches_the_jwks_and_is_refused() {
    let jwks = JwksServer::start(JWKS_K1).await;
    let app = jwks_app(&jwks).await;
    let token = rs256(Some("not-k1"), RSA_PRIVATE, &claims("alice@example.com", &["payments"]));
    assert_refused(&app, Some(&bearer(&token)), "a key keybroker does not know").await;
    assert_eq!(jwks.fetches(), 1);
    // The refusal left the fetched keys in place.
    me(&app, &rs256(Some("k1"), RSA_PRIVATE, &claims("alice@example.com", &["payments"]))).await;
    assert_eq!(jwks.fetches(), 1);
}

#[tokio::test]
async fn many_unknown_kids_within_a_minute_cause_at_most_one_extra_fetch() {
    let jwks = JwksServer::start(JWKS_K1).await;
    let app = Arc::new(jwks_app(&jwks).await);
    me(&app, &rs256(Some("k1"), RSA_PRIVATE, &claims("alice@example.com", &[]))).await;
    assert_eq!(jwks.fetches(), 1);

    // A burst of forged kids, concurrently, as an attacker would send them.
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..25 {
        let app = app.clone();
        let kid = uuid::Uuid::new_v4().to_string();
        burst.spawn(async move {
            let token = rs256(Some(&kid), RSA_PRIVATE, &claims("mallory@example.com", &["platform-admins"]));
            get(&app, "/v1/me", Some(&bearer(&token))).await.status()
        });
    }
    while let Some(status) = burst.join_next().await {
        assert_eq!(status.unwrap(), 401);
    }
    assert!(jwks.fetches() <= 2, "{} JWKS fetches for one minute of unknown kids", jwks.fetches());
    // Another token (alice's would be taken on trust, unverified), so k1 itself is used again.
    me(&app, &rs256(Some("k1"), RSA_PRIVATE, &claims("bob@example.com", &[]))).await;
}

#[tokio::test]
async fn a_rotated_in_key_is_not_fetched_again_within_the_refresh_interval() {
    let jwks = JwksServer::start(JWKS_K1).await;
    let app = jwks_app(&jwks).await;
    me(&app, &rs256(Some("k1"), RSA_PRIVATE, &claims("alice@example.com", &[]))).await;

    jwks.serve(JWKS_K2);
    let rotated = rs256(Some("k2"), RSA2_PRIVATE, &claims("alice@example.com", &[]));
    // The last fetch was under a minute ago, so k2 stays unknown until the interval has passed.
    assert_eq!(get(&app, "/v1/me", Some(&bearer(&rotated))).await.status(), 401);
    assert_eq!(jwks.fetches(), 1);
    // Meanwhile the cached k1 keeps working, for a token it has not verified yet.
    me(&app, &rs256(Some("k1"), RSA_PRIVATE, &claims("bob@example.com", &[]))).await;
}

#[tokio::test]
async fn keys_the_verifier_cannot_use_do_not_spoil_the_rest_of_the_jwks() {
    let mut document: Value = serde_json::from_str(JWKS_K1).unwrap();
    let keys = document["keys"].as_array_mut().unwrap();
    let signing = keys[0].clone();
    let mut encryption = signing.clone();
    encryption["kid"] = json!("enc-1");
    encryption["use"] = json!("enc");
    encryption["alg"] = json!("RSA-OAEP-256");
    keys.insert(0, encryption);
    keys.insert(0, json!({"kty": "unknown-type", "kid": "odd"}));
    let mut strange_alg = signing;
    strange_alg["kid"] = json!("odd-alg");
    strange_alg["alg"] = json!("PS999");
    keys.push(strange_alg);
    let leaked: &'static str = Box::leak(document.to_string().into_boxed_str());
    let jwks = JwksServer::start(leaked).await;
    let app = jwks_app(&jwks).await;
    let token = rs256(Some("k1"), RSA_PRIVATE, &claims("alice@example.com", &["payments"]));
    assert_eq!(me(&app, &token).await["subject"], "alice@example.com");
}

#[tokio::test]
async fn subjects_keybroker_uses_for_itself_are_refused() {
    for reserved in ["keybroker", "anonymous"] {
        // An app each: the same refusal twice within a minute is one audit event.
        let app = TestApp::spawn().await;
        let token = hs256(&claims(reserved, &["platform-admins"]));
        assert_refused(&app, Some(&bearer(&token)), "sub").await;
    }
}
