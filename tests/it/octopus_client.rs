//! The Octopus client against the simulator: the login flow, retries on idempotent calls only,
//! and how Octopus's answers are mapped.

use std::time::Duration;

use keybroker::config::{OctopusConfig, OctopusCredential};
use keybroker::octopus::{BrokerKeyExpiry, OctopusClient, OctopusError, Revoked};
use octopus_sim::{DEMO_BROKER_API_KEY, Fault, FaultKind, Seed, SeedUser, Simulator};
use reqwest::Method;
use secrecy::SecretString;
use serde_json::json;

use crate::helpers::{TestApp, TestOptions};

fn human_broker() -> SeedUser {
    SeedUser {
        username: "broker-human".to_owned(),
        display_name: Some("Broker (login flow)".to_owned()),
        email: None,
        is_service: false,
        is_active: true,
        can_edit_users: true,
        permissions: Vec::new(),
        password: Some("correct horse battery staple".to_owned()),
    }
}

async fn client_for(
    sim: &octopus_sim::RunningSimulator,
    credential: OctopusCredential,
) -> std::sync::Arc<OctopusClient> {
    let config = OctopusConfig {
        url: sim.url().parse().unwrap(),
        credential,
        timeout: Duration::from_secs(5),
        ca_certificates: Vec::new(),
        max_requests_per_minute: 0,
    };
    OctopusClient::new(&config).unwrap()
}

fn api_key() -> OctopusCredential {
    OctopusCredential::ApiKey(SecretString::from(DEMO_BROKER_API_KEY.to_owned()))
}

#[tokio::test]
async fn keys_are_issued_through_the_login_flow_and_a_lapsed_session_is_renewed() {
    let mut seed = Seed::demo();
    seed.users.push(human_broker());
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("octopus-password");
    std::fs::write(&password_file, "correct horse battery staple").unwrap();
    let configure = move |f: &mut keybroker::config::ConfigFile| {
        let octopus = crate::helpers::octopus(f);
        octopus.api_key_file = None;
        octopus.username = Some("broker-human".to_owned());
        octopus.password_file = Some(password_file);
    };
    let app = TestApp::spawn_with(TestOptions { seed, configure: Box::new(configure), ..Default::default() }).await;
    let logins_at_start = app.sim.request_count("POST /api/users/login");
    assert!(logins_at_start >= 1);

    let body = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "via session"})).await;
    assert_eq!(app.octopus_me(body["api_key"].as_str().unwrap()).await.status(), 200);
    assert_eq!(app.sim.request_count("POST /api/users/login"), logins_at_start);

    // The session lapses (sessions last 20 minutes by default); the next call logs in again.
    app.sim.advance_clock(chrono::Duration::hours(2));
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "after expiry"})).await;
    assert_eq!(app.sim.request_count("POST /api/users/login"), logins_at_start + 1);
    drop(secrets);
}

#[tokio::test]
async fn a_wrong_password_is_a_credential_failure() {
    let mut seed = Seed::demo();
    seed.users.push(human_broker());
    let sim = Simulator::new(seed).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = client_for(
        &sim,
        OctopusCredential::Login {
            username: "broker-human".to_owned(),
            password: SecretString::from("wrong".to_owned()),
        },
    )
    .await;
    let err = client.current_user().await.unwrap_err();
    assert!(matches!(err, OctopusError::Credential { status: 400, .. }), "{err:?}");
}

#[tokio::test]
async fn reads_are_retried_on_server_errors_and_rate_limits() {
    let sim = Simulator::new(Seed::demo()).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = client_for(&sim, api_key()).await;
    sim.simulator().inject(
        Fault::on(Method::GET, "/api/users/me", FaultKind::Status { status: 503, error_message: "busy".to_owned() })
            .times(2),
    );
    let me = client.current_user().await.unwrap();
    assert_eq!(me.username, "keybroker");
    assert_eq!(sim.simulator().request_count("GET /api/users/me"), 3);

    sim.simulator().reset_counters();
    sim.simulator()
        .inject(Fault::on(Method::GET, "/api/users/me", FaultKind::RateLimited { retry_after_secs: 1 }).times(1));
    client.current_user().await.unwrap();
    assert_eq!(sim.simulator().request_count("GET /api/users/me"), 2);
}

#[tokio::test]
async fn retries_give_up_and_report_the_failure() {
    let sim = Simulator::new(Seed::demo()).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = client_for(&sim, api_key()).await;
    sim.simulator().inject(Fault::on(
        Method::GET,
        "/api/users/me",
        FaultKind::Status {
            status: 500,
            error_message: "Object reference not set to an instance of an object.".to_owned(),
        },
    ));
    let err = client.current_user().await.unwrap_err();
    assert!(
        matches!(&err, OctopusError::Unavailable { detail } if detail.contains("Object reference not set")),
        "{err:?}"
    );
    assert_eq!(sim.simulator().request_count("GET /api/users/me"), 4);
}

#[tokio::test]
async fn creates_are_never_retried() {
    let sim = Simulator::new(Seed::demo()).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = client_for(&sim, api_key()).await;
    let user = client.find_user("svc-payments-deploy").await.unwrap().unwrap();
    sim.simulator().inject(Fault::on(
        Method::POST,
        "/api/users/{id}/apikeys",
        FaultKind::Status { status: 503, error_message: "busy".to_owned() },
    ));
    let expires = chrono::Utc::now() + chrono::Duration::days(1);
    assert!(client.create_api_key(&user.id, "keybroker:test", expires).await.is_err());
    assert_eq!(sim.simulator().request_count("POST /api/users/{id}/apikeys"), 1);
}

#[tokio::test]
async fn users_are_resolved_by_exact_username_and_cached() {
    let sim = Simulator::new(Seed::demo()).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = client_for(&sim, api_key()).await;
    // `filter` also matches svc-payments-deploy-old and svc-payments-deployer.
    let user = client.find_user("svc-payments-deploy").await.unwrap().unwrap();
    assert_eq!(user.username, "svc-payments-deploy");
    assert!(user.is_service && user.is_active);
    let lookups = sim.simulator().request_count("GET /api/users");
    assert!(lookups >= 1);
    client.find_user("svc-payments-deploy").await.unwrap();
    assert_eq!(sim.simulator().request_count("GET /api/users"), lookups);
    // A name that only appears as a substring is not a match.
    assert!(client.find_user("svc-payments").await.unwrap().is_none());
    // Usernames are case-insensitive in Octopus.
    assert_eq!(client.find_user("SVC-Payments-Deploy").await.unwrap().unwrap().id, user.id);
}

#[tokio::test]
async fn the_broker_key_expiry_and_server_limits_are_read() {
    let sim = Simulator::new(Seed::demo()).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = client_for(&sim, api_key()).await;
    let settings = client.key_settings().await.unwrap();
    assert_eq!(settings.max_expiry_days, Some(366));
    assert_eq!(settings.default_expiry_days, Some(180));
    let BrokerKeyExpiry::Found(Some(expiry)) = client.broker_key_expiry().await.unwrap() else {
        panic!("the demo broker key expires");
    };
    let days = (expiry - chrono::Utc::now()).num_days();
    assert!((360..=366).contains(&days), "{days}");
}

#[tokio::test]
async fn the_broker_key_is_found_by_a_seven_character_hint_and_reported_when_missing() {
    for (hint_length, found) in [(7, true), (8, true), (0, false)] {
        let mut seed = Seed::demo();
        seed.server.api_key_hint_length = hint_length;
        let sim = Simulator::new(seed).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
        let client = client_for(&sim, api_key()).await;
        match client.broker_key_expiry().await.unwrap() {
            BrokerKeyExpiry::Found(Some(_)) => assert!(found, "hint length {hint_length}"),
            BrokerKeyExpiry::NotFound { listed } => {
                assert!(!found, "hint length {hint_length}");
                assert!(listed >= 1);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn a_server_maximum_of_zero_days_means_unknown_not_no_lifetime() {
    // The simulator refuses such a seed; a stand-in answers /api/authentication as a server
    // without the setting configured might.
    let app = axum::Router::new().route(
        "/api/authentication",
        axum::routing::get(|| async {
            axum::Json(json!({"ApiKeyDefaultExpiryDays": 0, "ApiKeyMaxExpiryDays": 0, "UserApiKeysEnabled": true}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = OctopusConfig {
        url: url.parse().unwrap(),
        credential: api_key(),
        timeout: Duration::from_secs(5),
        ca_certificates: Vec::new(),
        max_requests_per_minute: 0,
    };
    let settings = OctopusClient::new(&config).unwrap().key_settings().await.unwrap();
    assert_eq!((settings.max_expiry_days, settings.default_expiry_days), (None, None));
}

#[tokio::test]
async fn deleting_a_missing_key_counts_as_already_gone() {
    let sim = Simulator::new(Seed::demo()).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = client_for(&sim, api_key()).await;
    let user = client.find_user("svc-payments-deploy").await.unwrap().unwrap();
    let expires = chrono::Utc::now() + chrono::Duration::days(1);
    let created = client.create_api_key(&user.id, "keybroker:delete-twice", expires).await.unwrap();
    assert_eq!(client.delete_api_key(&user.id, &created.id).await.unwrap(), Revoked::Deleted);
    assert_eq!(client.delete_api_key(&user.id, &created.id).await.unwrap(), Revoked::AlreadyGone);
    assert!(client.get_api_key(&user.id, &created.id).await.unwrap().is_none());
}
