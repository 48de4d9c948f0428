//! Outbound transport: `https://` unless loopback or explicitly allowed, `ca_file` for internal
//! CAs (a self-signed CA on a loopback TLS server: accepted with it, refused without), and webhook
//! URLs that never reach the database.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use keybroker::auth::Authenticator;
use keybroker::config::{
    AuthConfig, Config, ConfigFile, IssuerConfig, JwtAlgorithm, OctopusConfig, OctopusCredential, RawWebhook,
};
use keybroker::octopus::OctopusClient;
use keybroker::services::webhooks::{Webhook, deliver_due, enqueue_notices};
use octopus_sim::{DEMO_BROKER_API_KEY, Seed, Simulator};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_rustls::rustls;

use crate::helpers::{TestApp, TestOptions, config_file, keybroker_command};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn test_ca() -> Vec<reqwest::Certificate> {
    reqwest::Certificate::from_pem_bundle(&std::fs::read(fixture("test-ca.pem")).unwrap()).unwrap()
}

/// Serves `router` over TLS on 127.0.0.1 with a certificate signed by the test CA.
async fn tls_server(router: Router) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(fixture("tls-server.pem")).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(fixture("tls-server-key.pem")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: nothing to serve.
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = TowerToHyperService::new(router);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn octopus_behind_an_internal_ca_is_trusted_with_ca_file_and_refused_without() {
    let sim = Simulator::new(Seed::demo()).unwrap();
    let url = tls_server(sim.router()).await;
    let client = |ca_certificates: Vec<reqwest::Certificate>| {
        OctopusClient::new(&OctopusConfig {
            url: url.parse().unwrap(),
            credential: OctopusCredential::ApiKey(SecretString::from(DEMO_BROKER_API_KEY.to_owned())),
            timeout: Duration::from_secs(5),
            ca_certificates,
            max_requests_per_minute: 0,
        })
        .unwrap()
    };
    let me = client(test_ca()).current_user().await.unwrap();
    assert_eq!(me.username, "keybroker");
    let refused = client(Vec::new()).current_user().await;
    assert!(refused.is_err(), "a certificate from an unknown CA was accepted");
}

#[tokio::test]
async fn a_jwks_behind_an_internal_ca_is_trusted_with_ca_file_and_refused_without() {
    let jwks: Value = serde_json::from_str(&std::fs::read_to_string(fixture("jwks-k1.json")).unwrap()).unwrap();
    let url = tls_server(Router::new().route("/jwks", get(move || async move { axum::Json(jwks) }))).await;
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": "https://idp.example/", "aud": "keybroker", "sub": "ci", "exp": now + 600, "iat": now});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("k1".to_owned());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa-private.pem")).unwrap()).unwrap();
    let token = format!("Bearer {}", jsonwebtoken::encode(&header, &claims, &key).unwrap());
    let authenticator = |ca_certificates: Vec<reqwest::Certificate>| {
        Authenticator::new(&AuthConfig {
            issuers: vec![IssuerConfig {
                name: "idp".to_owned(),
                issuer: "https://idp.example/".to_owned(),
                audiences: vec!["keybroker".to_owned()],
                algorithms: BTreeSet::from([JwtAlgorithm::Rs256]),
                jwks_url: Some(format!("{url}/jwks").parse().unwrap()),
                public_keys: Vec::new(),
                hs256_secret: None,
                teams_claim: Some("groups".to_owned()),
                teams_separator: None,
                ca_certificates,
                jwks_bearer_token_file: None,
                subjects: Vec::new(),
                allowed_teams: None,
                privileged: false,
            }],
            bindings: Vec::new(),
            admin_teams: BTreeSet::new(),
            auditor_teams: BTreeSet::new(),
            delegate_teams: BTreeSet::new(),
            leeway: Duration::from_secs(30),
        })
        .unwrap()
    };
    assert_eq!(authenticator(test_ca()).authenticate(Some(&token)).await.unwrap().subject, "idp:ci");
    assert!(authenticator(Vec::new()).authenticate(Some(&token)).await.is_err());
}

/// A webhook receiver: what it got, answering `status`.
#[derive(Clone)]
struct Sink {
    received: Arc<Mutex<Vec<Value>>>,
    status: Arc<Mutex<u16>>,
}

impl Sink {
    fn new() -> Self {
        Self { received: Arc::default(), status: Arc::new(Mutex::new(200)) }
    }

    fn router(&self) -> Router {
        let sink = self.clone();
        Router::new().route(
            "/hooks/{token}",
            post(move |axum::Json(body): axum::Json<Value>| {
                let sink = sink.clone();
                async move {
                    sink.received.lock().unwrap().push(body);
                    axum::http::StatusCode::from_u16(*sink.status.lock().unwrap()).unwrap()
                }
            }),
        )
    }
}

async fn app_with_webhook(url: String, ca_file: Option<std::path::PathBuf>) -> TestApp {
    // The test harness's HMAC secret file is long enough to sign with.
    let hook = RawWebhook {
        name: Some("team-chat".to_owned()),
        url,
        secret_file: Some("audit-hmac".into()),
        ca_file,
        ..Default::default()
    };
    TestApp::spawn_with(TestOptions { configure: Box::new(move |f| f.webhooks.push(hook)), ..Default::default() }).await
}

async fn notices(app: &TestApp) {
    let webhooks = Config::load(&app.dir.path().join("keybroker.toml")).unwrap().webhooks;
    enqueue_notices(&app.state.keys, &webhooks).await.unwrap();
    deliver_due(&app.state.keys, &Webhook::all(&webhooks).unwrap()).await.unwrap();
}

#[tokio::test]
async fn a_webhook_behind_an_internal_ca_is_trusted_with_ca_file_and_refused_without() {
    let sink = Sink::new();
    let url = format!("{}/hooks/T0K3N", tls_server(sink.router()).await);
    let trusted = app_with_webhook(url.clone(), Some(fixture("test-ca.pem"))).await;
    trusted.issue_ok(&trusted.alice(), json!({"scope": "payments-deploy", "purpose": "announced"})).await;
    notices(&trusted).await;
    assert_eq!(sink.received.lock().unwrap().len(), 1);

    let untrusted = app_with_webhook(url, None).await;
    untrusted.issue_ok(&untrusted.alice(), json!({"scope": "payments-deploy", "purpose": "not announced"})).await;
    notices(&untrusted).await;
    assert_eq!(sink.received.lock().unwrap().len(), 1, "a certificate from an unknown CA was accepted");
    let attempt = untrusted.audit_events().await.into_iter().find(|e| e.action == "webhook.delivery").unwrap();
    assert_eq!(attempt.detail["result"], "retry");
    assert_eq!(attempt.detail["webhook"], "team-chat");
}

#[tokio::test]
async fn webhook_urls_never_reach_the_database_or_the_audit_trail() {
    let sink = Sink::new();
    *sink.status.lock().unwrap() = 500;
    let app_router = sink.router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://user:pa55word@{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app_router).await });
    let app = app_with_webhook(format!("{base}/hooks/T0K3N-in-path?token=Q5ecret"), None).await;
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "announced"})).await;
    notices(&app).await;
    assert_eq!(sink.received.lock().unwrap().len(), 1, "the webhook was called");

    let events = app.audit_events().await;
    let attempt = events.iter().find(|e| e.action == "webhook.delivery").unwrap();
    assert_eq!(
        (attempt.detail["webhook"].as_str(), attempt.detail["result"].as_str()),
        (Some("team-chat"), Some("retry"))
    );
    for event in events {
        let text = serde_json::to_string(&event).unwrap();
        assert!(!text.contains("T0K3N") && !text.contains("Q5ecret") && !text.contains("pa55word"), "{text}");
    }
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", app.db_path().display());
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let text = String::from_utf8_lossy(&bytes);
        for secret in ["T0K3N-in-path", "Q5ecret", "pa55word"] {
            assert!(!text.contains(secret), "{path} holds {secret}");
        }
    }
}

#[test]
fn plain_http_to_another_host_is_refused_by_check_config_and_serve() {
    type Configure = fn(&mut ConfigFile);
    let cases: [(&str, Configure); 3] = [
        ("octopus.url", |f| crate::helpers::octopus(f).url = Some("http://octopus.example.com".to_owned())),
        ("auth.jwks_url", |f| {
            let auth = crate::helpers::auth(f);
            auth.algorithms = vec!["RS256".to_owned()];
            auth.hs256_secret_file = None;
            auth.jwks_url = Some("http://idp.example.com/jwks".to_owned());
        }),
        ("webhooks[0].url", |f| {
            // The harness's HMAC secret file is long enough to sign with.
            f.webhooks.push(RawWebhook {
                name: Some("chat".to_owned()),
                url: "http://chat.example.com/hook".to_owned(),
                secret_file: Some("audit-hmac".into()),
                ..Default::default()
            });
        }),
    ];
    for (key, edit) in cases {
        let (_dir, path) = config_file("https://octopus.example.com", edit);
        for command in ["check-config", "serve"] {
            let out = keybroker_command(&[command, "--config", path.to_str().unwrap()]).output().unwrap();
            assert!(!out.status.success(), "{command} accepted plain http for {key}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(&format!("{key}: must be an https:// URL")), "{command}: {stderr}");
            assert!(stderr.contains("allow_insecure_http"), "{command}: {stderr}");
        }
    }
    // Allowed explicitly, the same file is valid.
    let (_dir, path) = config_file("https://octopus.example.com", |f| {
        let octopus = crate::helpers::octopus(f);
        octopus.url = Some("http://octopus.example.com".to_owned());
        octopus.allow_insecure_http = true;
    });
    let loaded = Config::load(&path);
    assert!(loaded.is_ok(), "{:?}", loaded.err());
}

#[test]
fn webhooks_need_a_name_and_a_secret_unless_they_say_unsigned() {
    // The text of one webhook entry, as a person would write it.
    let load = |hook: &str| {
        let hook: Vec<RawWebhook> =
            crate::helpers::entries(&format!("[[entries]]\nurl = \"https://chat.example.com/h\"\n{hook}\n"));
        let (_dir, path) = config_file("https://octopus.example.com", |f| f.webhooks.extend(hook));
        Config::load(&path).map(|c| c.webhooks.len()).map_err(|e| e.to_string())
    };
    assert!(load("secret_file = \"audit-hmac\"").unwrap_err().starts_with("webhooks[0].name: required"));
    let err = load("name = \"chat\"").unwrap_err();
    assert!(err.starts_with("webhooks[0].secret_file: required") && err.contains("unsigned = true"), "{err}");
    assert_eq!(load("name = \"chat\"\nunsigned = true"), Ok(1));
    assert_eq!(load("name = \"chat\"\nsecret_file = \"audit-hmac\""), Ok(1));
    let err = load("name = \"chat\"\nsecret_file = \"octopus-api-key\"").unwrap_err();
    assert!(err.contains("at least 32 bytes"), "{err}");
    let err = load("name = \"a chat\"\nunsigned = true").unwrap_err();
    assert!(err.starts_with("webhooks[0].name"), "{err}");
    let err = load("name = \"removed-1\"\nunsigned = true").unwrap_err();
    assert!(err.starts_with("webhooks[0].name"), "{err}");
}
