//! The security sign-off: the broker credential never leaves for another host, revocation never
//! fails open, anonymous traffic never reaches Octopus or the audit trail, outbound transport is
//! https (or loopback, or explicitly allowed) with internal CAs, and the HTTP server cannot be
//! held by slow clients.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use keybroker::config::{OctopusConfig, OctopusCredential};
use keybroker::octopus::{OctopusClient, OctopusError};
use octopus_sim::{DEMO_BROKER_API_KEY, Fault, FaultKind};
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TestApp, TestOptions};

/// A second host (127.0.0.2, still loopback) that records every request it gets.
#[derive(Clone, Default)]
struct Recorder {
    requests: Arc<Mutex<Vec<(String, HeaderMap, String)>>>,
}

impl Recorder {
    async fn start() -> (Self, SocketAddr) {
        let recorder = Self::default();
        let seen = recorder.clone();
        let app = Router::new().fallback(move |req: Request| {
            let seen = seen.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
                seen.requests.lock().unwrap().push((
                    format!("{} {}", parts.method, parts.uri),
                    parts.headers,
                    String::from_utf8_lossy(&body).into_owned(),
                ));
                (StatusCode::OK, "{}")
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (recorder, addr)
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

/// A front that answers every request with a 307 to `location`, keeping the method and body.
async fn redirecting_front(location: String) -> String {
    let app = Router::new().fallback(move || {
        let location = location.clone();
        async move { (StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, location)], "").into_response() }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn client(url: &str, credential: OctopusCredential) -> Arc<OctopusClient> {
    OctopusClient::new(&OctopusConfig {
        url: url.parse().unwrap(),
        credential,
        timeout: Duration::from_secs(5),
        ca_certificates: Vec::new(),
        max_requests_per_minute: 0,
    })
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. No redirects, anywhere outbound.

#[tokio::test]
async fn a_redirect_from_octopus_is_never_followed_and_the_api_key_stays_home() {
    let (recorder, addr) = Recorder::start().await;
    let front = redirecting_front(format!("http://{addr}/secret-path/api/users/me?token=abc")).await;
    let octopus = client(&front, OctopusCredential::ApiKey(SecretString::from(DEMO_BROKER_API_KEY.to_owned())));
    let expires = chrono::Utc::now() + chrono::Duration::days(1);
    let results = [
        octopus.current_user().await.map(|_| ()),
        octopus.create_api_key("Users-2", "p", expires).await.map(|_| ()),
        octopus.delete_api_key("Users-2", "apikeys-1").await.map(|_| ()),
        octopus.list_api_keys("Users-2", None).await.map(|_| ()),
    ];
    for result in results {
        let err = result.unwrap_err();
        assert!(
            matches!(&err, OctopusError::Redirected { status: 307, location_host: Some(h) } if h == "127.0.0.2"),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("127.0.0.2") && !text.contains("secret-path") && !text.contains("token"), "{text}");
    }
    assert_eq!(recorder.count(), 0, "the other host received {:?}", recorder.requests.lock().unwrap());
}

#[tokio::test]
async fn a_redirected_login_never_sends_the_password_elsewhere() {
    let (recorder, addr) = Recorder::start().await;
    let front = redirecting_front(format!("http://{addr}/api/users/login")).await;
    let octopus = client(
        &front,
        OctopusCredential::Login {
            username: "broker-human".to_owned(),
            password: SecretString::from("correct horse battery staple".to_owned()),
        },
    );
    let err = octopus.current_user().await.unwrap_err();
    assert!(matches!(err, OctopusError::Redirected { .. }), "{err:?}");
    assert_eq!(recorder.count(), 0, "the password went to another host");
}

#[tokio::test]
async fn callers_get_503_naming_only_the_redirect_host() {
    let (recorder, addr) = Recorder::start().await;
    let front = redirecting_front(format!("http://{addr}/elsewhere/api?session=s3cr3t")).await;
    let configure = move |f: &mut keybroker::config::ConfigFile| crate::helpers::octopus(f).url = Some(front);
    let app = TestApp::spawn_with(TestOptions { configure: Box::new(configure), ..Default::default() }).await;
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "redirected"})).await;
    assert_eq!(res.status(), 503);
    let problem: Value = res.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("127.0.0.2") && detail.contains("octopus.url"), "{detail}");
    assert!(!detail.contains("elsewhere") && !detail.contains("s3cr3t"), "{detail}");
    let ready: Value = app.readyz_now().await.json().await.unwrap();
    let octopus = ready["checks"].as_array().unwrap().iter().find(|c| c["name"] == "octopus").unwrap().clone();
    assert_eq!(octopus["ok"], false, "{ready}");
    assert_eq!(recorder.count(), 0, "the API key went to another host");
}

// ---------------------------------------------------------------------------------------------
// 2. Revocation never fails open.

fn foreign(status: u16, content_type: &str, body: &str) -> FaultKind {
    FaultKind::Foreign { status, content_type: content_type.to_owned(), body: body.to_owned(), location: None }
}

const INGRESS_404: &str = "<html><head><title>404 Not Found</title></head><body>nginx ingress</body></html>";

#[tokio::test]
async fn a_404_that_is_not_octopus_speaking_never_marks_a_key_revoked() {
    for fault in [foreign(404, "text/html", INGRESS_404), foreign(404, "text/plain", "")] {
        let app = TestApp::spawn().await;
        let issued = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "to revoke"})).await;
        let path = format!("/v1/keys/{}", issued["id"].as_str().unwrap());
        let secret = issued["api_key"].as_str().unwrap().to_owned();
        app.sim.inject(Fault::on(Method::DELETE, "/api/users/{id}/apikeys/{keyId}", fault.clone()));

        let res = app.delete(&path, &app.alice()).await;
        assert_eq!(res.status(), 503, "{fault:?}");
        let problem: Value = res.json().await.unwrap();
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("non-JSON body") && !detail.contains("nginx"), "{detail}");
        let record: Value = app.get(&path, &app.alice()).await.json().await.unwrap();
        assert_eq!(record["state"], "active", "the record must stay active while the key works");
        assert_eq!(app.octopus_me(&secret).await.status(), 200, "the key still works in Octopus");
        let events = app.audit_events().await;
        let failed = events.iter().rev().find(|e| e.action == "key.revoke_failed").expect("key.revoke_failed");
        assert!(!failed.detail.to_string().contains("nginx"), "{:?}", failed.detail);
        assert!(!events.iter().any(|e| e.action == "key.revoked"));

        // The reconciler retries the revocation it was asked for, and it goes through.
        app.sim.clear_faults();
        let report =
            keybroker::services::jobs::reconcile_once(&app.state.keys, Duration::from_secs(120)).await.unwrap();
        assert_eq!(report.revocations_retried, 1, "{report:?}");
        let record: Value = app.get(&path, &app.alice()).await.json().await.unwrap();
        assert_eq!(record["state"], "revoked");
        assert_eq!(app.octopus_me(&secret).await.status(), 401);
    }
}

#[tokio::test]
async fn octopus_saying_404_about_a_key_it_still_has_is_not_believed() {
    let app = TestApp::spawn().await;
    let issued = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "to revoke"})).await;
    let path = format!("/v1/keys/{}", issued["id"].as_str().unwrap());
    let message = format!("The resource '{}' was not found.", issued["octopus_key_id"].as_str().unwrap());
    app.sim.inject(
        Fault::on(
            Method::DELETE,
            "/api/users/{id}/apikeys/{keyId}",
            FaultKind::Status { status: 404, error_message: message },
        )
        .times(1),
    );
    let res = app.delete(&path, &app.alice()).await;
    assert_eq!(res.status(), 503, "the confirming GET still finds the key");
    let record: Value = app.get(&path, &app.alice()).await.json().await.unwrap();
    assert_eq!(record["state"], "active");
    assert_eq!(app.octopus_me(issued["api_key"].as_str().unwrap()).await.status(), 200);
}

#[tokio::test]
async fn drift_does_not_take_a_foreign_404_for_a_deleted_key() {
    let app = TestApp::spawn().await;
    let issued = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "drift"})).await;
    let path = format!("/v1/keys/{}", issued["id"].as_str().unwrap());
    assert!(app.sim.delete_api_key_behind_the_back(issued["octopus_key_id"].as_str().unwrap()));
    app.sim.inject(Fault::on(Method::GET, "/api/users/{id}/apikeys/{keyId}", foreign(404, "text/html", INGRESS_404)));
    let state = keybroker::services::drift::DriftState::default();
    assert!(keybroker::services::drift::scan(&app.state.keys, &state).await.is_err());
    let record: Value = app.get(&path, &app.alice()).await.json().await.unwrap();
    assert_eq!(record["state"], "active", "a proxy's 404 is no proof");
    // Octopus's own 404 is.
    app.sim.clear_faults();
    keybroker::services::drift::scan(&app.state.keys, &state).await.unwrap();
    let record: Value = app.get(&path, &app.alice()).await.json().await.unwrap();
    assert_eq!(record["state"], "revoked");
}

// ---------------------------------------------------------------------------------------------
// 9. Octopus's text stays with operators.

#[tokio::test]
async fn a_non_json_error_body_from_octopus_reaches_no_caller_and_no_audit_detail() {
    let app = TestApp::spawn().await;
    let page = "<html><body>502 Bad Gateway: upstream octopus-7f9c internal.corp:10933</body></html>";
    app.sim.inject(Fault::on(Method::POST, "/api/users/{id}/apikeys", foreign(502, "text/html", page)).times(1));
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "through a proxy"})).await;
    assert_eq!(res.status(), 502);
    let problem: Value = res.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("Octopus answered 502 with a non-JSON body"), "{detail}");
    assert!(!detail.contains("internal.corp"), "{detail}");
    for event in app.audit_events().await {
        assert!(!event.detail.to_string().contains("internal.corp"), "{:?}", event.detail);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Readiness and metrics cost Octopus nothing per probe.

#[tokio::test]
async fn readiness_probes_cost_octopus_and_the_database_nothing() {
    let app = TestApp::spawn().await;
    app.sim.reset_counters();
    let events_before = app.audit_events().await.len();
    let url = format!("{}/readyz", app.url);
    for i in 0..60 {
        let mut request = app.http.get(&url);
        match i % 3 {
            0 => {}
            1 => request = request.bearer_auth("not-a-token"),
            _ => request = request.bearer_auth(app.alice()),
        }
        let res = request.send().await.unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["status"], "ready");
        for check in body["checks"].as_array().unwrap() {
            assert!(check.get("detail").is_none(), "details are for admins: {body}");
            assert!(check["name"].is_string() && check["ok"].is_boolean());
        }
    }
    let admin: Value = app.http.get(&url).bearer_auth(app.admin()).send().await.unwrap().json().await.unwrap();
    let octopus = admin["checks"].as_array().unwrap().iter().find(|c| c["name"] == "octopus").unwrap().clone();
    assert!(octopus["detail"].as_str().unwrap().contains("signed in as"), "{admin}");

    let calls: u64 = app.sim.counters().values().sum();
    assert_eq!(calls, 0, "probes reached Octopus: {:?}", app.sim.counters());
    assert_eq!(app.audit_events().await.len(), events_before, "probes wrote to the audit trail");
    // The user cache is intact: an issuance needs no user look-up.
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "after the flood"})).await;
    assert_eq!(app.sim.request_count("GET /api/users"), 0, "{:?}", app.sim.counters());
}

#[tokio::test]
async fn metrics_scrapes_show_the_gauges_the_readiness_job_keeps() {
    let app = TestApp::spawn().await;
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "counted"})).await;
    let scrape = || async {
        let text = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("keybroker_active_keys{scope=\"payments-deploy\"} "))
            .map(str::to_owned)
    };
    assert_eq!(scrape().await, None, "a scrape ran a query");
    app.state.readiness.refresh(&app.state.keys).await;
    assert_eq!(scrape().await.as_deref(), Some("1"));
}

// ---------------------------------------------------------------------------------------------
// 4. Anonymous noise stays out of the audit trail.

#[tokio::test]
async fn requests_without_a_credential_leave_no_audit_rows() {
    let app = TestApp::spawn().await;
    let before = app.audit_events().await.len();
    for i in 0..90 {
        let res = match i % 3 {
            0 => app.http.get(format!("{}/v1/keys", app.url)).send().await.unwrap(),
            1 => app.http.post(format!("{}/v1/keys", app.url)).json(&json!({})).send().await.unwrap(),
            _ => app.http.get(format!("{}/v1/audit", app.url)).send().await.unwrap(),
        };
        assert_eq!(res.status(), 401);
    }
    assert_eq!(app.audit_events().await.len(), before);
    let metrics = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "keybroker_auth_missing_credential_total 90"), "{metrics}");
}

#[tokio::test]
async fn failed_authentications_are_limited_and_aggregated_per_ipv6_slash_64() {
    let app = TestApp::spawn_with(TestOptions {
        configure: Box::new(|f| {
            f.server.rate_limit_per_minute = 3;
            f.server.trusted_proxies = vec!["127.0.0.1/32".to_owned()];
        }),
        ..Default::default()
    })
    .await;
    let from = |addr: &str| {
        app.http.get(format!("{}/v1/me", app.url)).bearer_auth("not-a-token").header("X-Forwarded-For", addr).send()
    };
    for host in ["2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:1:ffff::3"] {
        assert_eq!(from(host).await.unwrap().status(), 401);
    }
    assert_eq!(from("2001:db8:0:1::99").await.unwrap().status(), 429, "the /64 shares one budget");
    assert_eq!(from("2001:db8:0:2::1").await.unwrap().status(), 401, "another /64 has its own");
    let denied: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "auth.denied").collect();
    assert_eq!(denied.len(), 2, "one event per /64 and reason: {denied:?}");
    assert_eq!(denied[0].client_addr.as_deref(), Some("2001:db8:0:1::1"));
    assert_eq!(denied[1].client_addr.as_deref(), Some("2001:db8:0:2::1"));
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let app = TestApp::spawn().await;
    let res = app
        .http
        .get(format!("{}/v1/me", app.url))
        .bearer_auth("not-a-token")
        .header("X-Forwarded-For", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let denied = app.audit_events().await.into_iter().find(|e| e.action == "auth.denied").unwrap();
    assert_eq!(denied.client_addr.as_deref(), Some("127.0.0.1"));

    let behind_proxy = TestApp::spawn_with(TestOptions {
        configure: Box::new(|f| f.server.trusted_proxies = vec!["127.0.0.0/8".to_owned()]),
        ..Default::default()
    })
    .await;
    // The client wrote the leftmost address itself; the proxy appended the one it saw.
    let res = behind_proxy
        .http
        .get(format!("{}/v1/me", behind_proxy.url))
        .bearer_auth("not-a-token")
        .header("X-Forwarded-For", "198.51.100.1, 203.0.113.9, 127.0.0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let denied = behind_proxy.audit_events().await.into_iter().find(|e| e.action == "auth.denied").unwrap();
    assert_eq!(denied.client_addr.as_deref(), Some("203.0.113.9"));
}

#[tokio::test]
async fn role_refusals_are_audited_as_authz_denied_once_a_minute() {
    let app = TestApp::spawn().await;
    for _ in 0..3 {
        assert_eq!(app.get("/v1/audit", &app.alice()).await.status(), 403);
    }
    let res = app
        .http
        .post(format!("{}/v1/keys/identify", app.url))
        .bearer_auth(app.alice())
        .json(&json!({"api_key": "API-XXXXXXXXXXXXXXXXXXXXXXXXXX"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = app.http.post(format!("{}/v1/admin/reload", app.url)).bearer_auth(app.alice()).send().await.unwrap();
    assert_eq!(res.status(), 403);
    let denied: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "authz.denied").collect();
    let routes: Vec<&str> = denied.iter().map(|e| e.detail["route"].as_str().unwrap()).collect();
    assert_eq!(routes, ["/v1/audit", "/v1/keys/identify", "/v1/admin/reload"], "{denied:?}");
    for event in &denied {
        assert_eq!(event.actor, "alice@example.com");
        assert_eq!(event.outcome, "denied");
        assert_eq!(event.detail["count"], 1);
    }
}

// ---------------------------------------------------------------------------------------------
// 8. The HTTP server.

fn server_options(configure: fn(&mut keybroker::config::RawServer)) -> TestOptions {
    TestOptions { configure: Box::new(move |f| configure(&mut f.server)), ..Default::default() }
}

/// A connection that sends half a request's headers and then nothing.
async fn slow_client(app: &TestApp) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(app.url.trim_start_matches("http://")).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: keybroker\r\n").await.unwrap();
    stream
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let app = TestApp::spawn_with(server_options(|s| s.header_read_timeout = crate::helpers::secs(1))).await;
    let mut stream = slow_client(&app).await;
    let mut buf = [0u8; 256];
    // The server closes the connection; without the timeout this read would wait for ever.
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await;
    assert!(read.is_ok(), "the connection was held open");
    if let Ok(Ok(n)) = read {
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let app = TestApp::spawn_with(server_options(|s| {
        s.max_connections = 2;
        s.header_read_timeout = crate::helpers::secs(60);
    }))
    .await;
    let first = slow_client(&app).await;
    let _second = slow_client(&app).await;
    let quick = reqwest::Client::builder().timeout(Duration::from_millis(800)).build().unwrap();
    let url = format!("{}/healthz", app.url);
    assert!(quick.get(&url).send().await.is_err(), "a third connection was served beyond the cap");
    drop(first);
    let res = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn only_well_formed_request_ids_are_kept() {
    let app = TestApp::spawn().await;
    let id_for = |id: String| {
        let request = app.http.get(format!("{}/healthz", app.url)).header("x-request-id", id);
        async move { request.send().await.unwrap().headers()["x-request-id"].to_str().unwrap().to_owned() }
    };
    assert_eq!(id_for("build-42:step.7_a".to_owned()).await, "build-42:step.7_a");
    for bad in ["<script>alert(1)</script>".to_owned(), "a b".to_owned(), "x".repeat(129), String::new()] {
        let got = id_for(bad.clone()).await;
        assert_ne!(got, bad);
        assert!(uuid::Uuid::parse_str(&got).is_ok(), "{got}");
    }
}
