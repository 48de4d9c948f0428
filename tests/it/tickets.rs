//! Pickup tickets over HTTP: a bot asks on a person's behalf, only that person claims, once, and
//! no secret ever reaches the bot's answers, the webhooks or the audit trail.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::post;
use chrono::Duration;
use keybroker::config::Config;
use keybroker::services::webhooks::{Webhook, deliver_due};
use serde_json::{Value, json};

use keybroker::config::{ConfigFile, RawUi, RawWebhook, UiToken};

use crate::helpers::{ManualClock, TestApp, TestOptions, backends};

const BOT: &str = "chatops-bot";

/// The demo configuration with `chatops` as a delegate team, a public URL, the page, and
/// `webhooks`.
fn options(webhooks: Vec<RawWebhook>) -> TestOptions {
    TestOptions {
        configure: Box::new(move |f| {
            with_page(f);
            crate::helpers::auth(f).delegate_teams = vec!["chatops".to_owned()];
            f.server.public_url = Some("https://keybroker.example.com".to_owned());
            f.webhooks.extend(webhooks);
        }),
        ..Default::default()
    }
}

/// `[ui]` signing in at the demo's own issuer.
fn with_page(f: &mut ConfigFile) {
    f.ui = Some(page("https://keybroker-dev.local/", "keybroker"));
}

fn page(issuer: &str, client_id: &str) -> RawUi {
    RawUi { issuer: Some(issuer.to_owned()), client_id: Some(client_id.to_owned()), ..Default::default() }
}

async fn app() -> TestApp {
    TestApp::spawn_with(options(Vec::new())).await
}

fn bot(app: &TestApp) -> String {
    app.token(BOT, &["chatops"])
}

async fn create(app: &TestApp, token: &str, body: Value) -> (u16, Value) {
    let res = app.http.post(format!("{}/v1/tickets", app.url)).bearer_auth(token).json(&body).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn ticket_for_alice(app: &TestApp, scope: &str) -> Value {
    let (status, body) =
        create(app, &bot(app), json!({"for": "alice@example.com", "scope": scope, "purpose": "hotfix"})).await;
    assert_eq!(status, 201, "{body}");
    body
}

async fn claim(app: &TestApp, id: &str, token: &str) -> (u16, Value) {
    let res = app.http.post(format!("{}/v1/tickets/{id}/claim", app.url)).bearer_auth(token).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn read(app: &TestApp, id: &str, token: &str) -> (u16, Value) {
    let res = app.get(&format!("/v1/tickets/{id}"), token).await;
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Value>>>);

impl Sink {
    async fn serve(&self) -> String {
        let sink = self.clone();
        let router = Router::new().route(
            "/hooks",
            post(move |axum::Json(body): axum::Json<Value>| {
                let sink = sink.clone();
                async move {
                    sink.0.lock().unwrap().push(body);
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }
}

#[tokio::test]
async fn a_bot_asks_alice_claims_once_and_the_secret_reaches_only_her_on_both_backends() {
    for (name, store, _guard) in backends().await {
        eprintln!("backend: {name}");
        the_ticket_flow(store).await;
    }
}

async fn the_ticket_flow(store: Arc<dyn keybroker::store::Store>) {
    let sink = Sink::default();
    let hook = RawWebhook {
        name: Some("chat".to_owned()),
        url: sink.serve().await,
        events: vec!["ticket.claimed".to_owned()],
        secret_file: Some("audit-hmac".into()),
        ..Default::default()
    };
    let mut options = options(vec![hook]);
    options.store = Some(store);
    let app = TestApp::spawn_with(options).await;
    let before = app.keybroker_keys_in_octopus().len();

    let ticket = ticket_for_alice(&app, "payments-deploy").await;
    let id = ticket["id"].as_str().unwrap().to_owned();
    assert_eq!(ticket["state"], "waiting");
    assert_eq!(ticket["for"], "alice@example.com");
    assert_eq!(ticket["requested_by"], BOT);
    assert_eq!(ticket["pickup_url"], format!("https://keybroker.example.com/tickets/{id}"));
    assert_eq!(app.keybroker_keys_in_octopus().len(), before, "a ticket creates nothing in Octopus");

    // Who may see it, who may claim it.
    assert_eq!(read(&app, &id, &app.alice()).await.0, 200);
    assert_eq!(read(&app, &id, &app.auditor()).await.0, 200);
    assert_eq!(read(&app, &id, &app.bob()).await.0, 403);
    let (status, refused) = claim(&app, &id, &bot(&app)).await;
    assert_eq!(status, 403, "the bot cannot claim: {refused}");
    assert_eq!(claim(&app, &id, &app.bob()).await.0, 403, "bob cannot claim alice's ticket");
    assert_eq!(claim(&app, &id, &app.admin()).await.0, 403, "nor can an admin");

    // Alice claims: her key, with the bot on the record.
    let (status, key) = claim(&app, &id, &app.alice()).await;
    assert_eq!(status, 201, "{key}");
    let secret = key["api_key"].as_str().unwrap().to_owned();
    assert_eq!(key["requester"], "alice@example.com");
    assert_eq!(key["requested_by"], BOT);
    assert_eq!(app.octopus_me(&secret).await.status(), 200);
    let record: Value =
        app.get(&format!("/v1/keys/{}", key["id"].as_str().unwrap()), &app.alice()).await.json().await.unwrap();
    assert_eq!(record["requested_by"], BOT);
    assert!(record.get("api_key").is_none());

    // Once.
    let (status, again) = claim(&app, &id, &app.alice()).await;
    assert_eq!(status, 409, "{again}");
    let (_, seen) = read(&app, &id, &bot(&app)).await;
    assert_eq!(seen["state"], "claimed");
    assert_eq!(seen["key_id"], key["id"]);
    assert!(!seen.to_string().contains(&secret), "the bot's view holds no secret");

    // Every event of the claim names both; the ticket's own events are there; no secret anywhere.
    let events = app.audit_events().await;
    let of_key: Vec<_> =
        events.iter().filter(|e| e.key_id.map(|k| k.to_string()).as_deref() == key["id"].as_str()).collect();
    assert!(of_key.iter().any(|e| e.action == "key.issued"));
    for event in &of_key {
        assert_eq!(event.actor, "alice@example.com", "{}", event.action);
        assert_eq!(event.detail["requested_by"], BOT, "{}", event.action);
        assert_eq!(event.detail["ticket"], id, "{}", event.action);
    }
    let created = events.iter().find(|e| e.action == "ticket.created").unwrap();
    assert_eq!((created.actor.as_str(), created.detail["for"].as_str()), (BOT, Some("alice@example.com")));
    assert!(events.iter().any(|e| e.action == "ticket.claimed"));
    let refused = |route: &str| {
        events.iter().any(|e| e.action == "authz.denied" && e.actor == "bob@example.com" && e.detail["route"] == route)
    };
    assert!(refused("/v1/tickets/{id}") && refused("/v1/tickets/{id}/claim"), "bob's attempts are on record");
    let trail = serde_json::to_string(&events).unwrap();
    assert!(!trail.contains(&secret), "the audit trail holds no secret");

    // The bot hears of the claim by webhook, without the secret.
    let webhooks = Config::load(&app.dir.path().join("keybroker.toml")).unwrap().webhooks;
    deliver_due(&app.state.keys, &Webhook::all(&webhooks).unwrap()).await.unwrap();
    let received = sink.0.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["event"], "ticket.claimed");
    assert_eq!(received[0]["ticket"]["id"], id);
    assert_eq!(received[0]["ticket"]["requested_by"], BOT);
    assert_eq!(received[0]["key"]["id"], key["id"]);
    assert!(!received[0].to_string().contains(&secret));
}

#[tokio::test]
async fn a_ticket_for_a_scope_the_person_may_not_use_is_made_but_its_claim_says_why_not() {
    let app = app().await;
    let ticket = ticket_for_alice(&app, "web-deploy").await;
    let id = ticket["id"].as_str().unwrap();
    let (status, problem) = claim(&app, id, &app.alice()).await;
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["reasons"][0]["rule"], "teams", "{problem}");
    // Nothing was issued, and the ticket still waits (her teams may change); the bot cancels it.
    assert_eq!(read(&app, id, &app.alice()).await.1["state"], "waiting");
    let res = app.delete(&format!("/v1/tickets/{id}"), &app.bob()).await;
    assert_eq!(res.status(), 403, "bob may not cancel alice's ticket");
    let res = app.delete(&format!("/v1/tickets/{id}"), &bot(&app)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["state"], "cancelled");
    assert_eq!(claim(&app, id, &app.alice()).await.0, 409, "a cancelled ticket cannot be claimed");
    assert_eq!(app.delete(&format!("/v1/tickets/{id}"), &bot(&app)).await.status(), 409);
    let events = app.audit_events().await;
    assert!(events.iter().any(|e| e.action == "ticket.cancelled" && e.actor == BOT));
    assert!(events.iter().any(|e| e.action == "policy.denied" && e.detail["requested_by"] == BOT));
}

#[tokio::test]
async fn bad_ticket_requests_get_clear_problems_and_change_nothing() {
    let app = app().await;
    let bot = bot(&app);
    let cases: Vec<(&str, Value, u16)> = vec![
        ("not a delegate", json!({"for": "bob@example.com", "scope": "payments-deploy", "purpose": "p"}), 403),
        ("unknown scope", json!({"for": "alice@example.com", "scope": "nope", "purpose": "p"}), 422),
        (
            "ttl beyond the scope's maximum",
            json!({"for": "alice@example.com", "scope": "payments-deploy", "purpose": "p", "ttl": "90d"}),
            422,
        ),
        (
            "not a ttl",
            json!({"for": "alice@example.com", "scope": "payments-deploy", "purpose": "p", "ttl": "forever"}),
            400,
        ),
        ("empty for", json!({"for": " ", "scope": "payments-deploy", "purpose": "p"}), 400),
        ("for oneself", json!({"for": BOT, "scope": "payments-deploy", "purpose": "p"}), 400),
        ("control characters", json!({"for": "alice\u{0007}", "scope": "payments-deploy", "purpose": "p"}), 400),
        ("bad purpose", json!({"for": "alice@example.com", "scope": "payments-deploy", "purpose": ""}), 400),
        ("unknown field", json!({"for": "alice@example.com", "scope": "payments-deploy", "purpose": "p", "x": 1}), 400),
        ("wrong type", json!({"for": 7, "scope": "payments-deploy", "purpose": "p"}), 400),
    ];
    for (name, body, expected) in cases {
        let token = if name == "not a delegate" { app.alice() } else { bot.clone() };
        let (status, problem) = create(&app, &token, body).await;
        assert_eq!(status, expected, "{name}: {problem}");
        assert!(problem["detail"].is_string(), "{name}: {problem}");
    }
    for (path, expected) in
        [("tkt_nope", 400), ("tkt_aaaaaaaaaaaaaaaaaaaaaaaaaa", 404), ("tkt_AAAAAAAAAAAAAAAAAAAAAAAAAA", 400)]
    {
        let res = app.get(&format!("/v1/tickets/{path}"), &bot).await;
        assert_eq!(res.status().as_u16(), expected, "{path}");
        assert_eq!(claim(&app, path, &app.alice()).await.0, if expected == 400 { 400 } else { 404 }, "{path}");
    }
    assert_eq!(app.get("/v1/tickets/tkt_aaaaaaaaaaaaaaaaaaaaaaaaaa", "").await.status(), 401);
    assert!(app.audit_events().await.iter().all(|e| e.action != "ticket.created"), "nothing was created");
}

#[tokio::test]
async fn an_unclaimed_ticket_expires_and_its_expiry_is_audited_once() {
    let clock = ManualClock::starting_now();
    let mut options = options(Vec::new());
    options.clock = Some(clock.clone());
    let app = TestApp::spawn_with(options).await;
    let ticket = ticket_for_alice(&app, "payments-deploy").await;
    let id = ticket["id"].as_str().unwrap();
    clock.advance(Duration::minutes(16));
    assert_eq!(read(&app, id, &app.alice()).await.1["state"], "expired", "expired as soon as its time is up");
    let (status, problem) = claim(&app, id, &app.alice()).await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(app.state.tickets.expire_due().await.unwrap(), 1);
    assert_eq!(app.state.tickets.expire_due().await.unwrap(), 0);
    let expired: Vec<_> = app.audit_events().await.into_iter().filter(|e| e.action == "ticket.expired").collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].detail["ticket"], id);
    assert!(app.keybroker_keys_in_octopus().is_empty(), "nothing was ever created in Octopus");
}

#[tokio::test]
async fn a_claim_holds_its_ticket_and_only_its_own_token_ends_or_releases_it_on_both_backends() {
    use keybroker::domain::audit::{Action, NewAuditEvent, Outcome, RequestContext};
    use keybroker::domain::tickets::{Hold, Ticket, TicketEnd, TicketId, TicketState};
    for (name, store, _guard) in backends().await {
        let now = keybroker::domain::audit::store_precision(chrono::Utc::now());
        let ticket = Ticket {
            id: TicketId::generate(),
            for_subject: "alice".to_owned(),
            scope: keybroker::domain::policy::ScopeName::parse("payments-deploy").unwrap(),
            purpose: keybroker::domain::policy::Purpose::parse("p").unwrap(),
            ttl: Some("1d".to_owned()),
            requested_by: BOT.to_owned(),
            requested_by_name: "Bot".to_owned(),
            state: TicketState::Waiting,
            key_id: None,
            created_at: now,
            expires_at: now + Duration::minutes(15),
            claim_started_at: None,
            ended_at: None,
        };
        let event = |action| NewAuditEvent::new(now, BOT, action, Outcome::Success, &RequestContext::default());
        store.insert_ticket(&ticket, &event(Action::TicketCreated)).await.unwrap();
        assert_eq!(store.get_ticket(&ticket.id).await.unwrap().as_ref(), Some(&ticket), "{name}");
        let hold = Duration::minutes(6);
        let nobody = Hold::Nobody { stale_before: now - hold };
        assert!(store.begin_ticket_claim(&ticket.id, "a", now, now - hold).await.unwrap(), "{name}");
        assert!(!store.begin_ticket_claim(&ticket.id, "b", now, now - hold).await.unwrap(), "{name}: b waits");
        let cancelled = event(Action::TicketCancelled);
        let cancel = store.end_ticket(&ticket.id, TicketEnd::Cancelled, now, nobody, &cancelled).await.unwrap();
        assert!(!cancel, "{name}: a held ticket is not cancelled");
        store.release_ticket_claim(&ticket.id, "b").await.unwrap();
        assert!(
            !store.begin_ticket_claim(&ticket.id, "b", now, now - hold).await.unwrap(),
            "{name}: b cannot release a's"
        );

        // a outlives its hold; b takes over. a can then neither end nor release the ticket.
        let later = now + hold + Duration::seconds(1);
        assert!(store.begin_ticket_claim(&ticket.id, "b", later, later - hold).await.unwrap(), "{name}: takeover");
        let claimed_event = event(Action::TicketClaimed);
        let key_a = uuid::Uuid::new_v4();
        let stale = store.end_ticket(&ticket.id, TicketEnd::Claimed(key_a), later, Hold::Claim("a"), &claimed_event);
        assert!(!stale.await.unwrap(), "{name}: a stale claim does not end the ticket");
        store.release_ticket_claim(&ticket.id, "a").await.unwrap();
        assert!(
            store.get_ticket(&ticket.id).await.unwrap().unwrap().claim_started_at.is_some(),
            "{name}: b still holds"
        );
        let key_b = uuid::Uuid::new_v4();
        let claimed = store.end_ticket(&ticket.id, TicketEnd::Claimed(key_b), later, Hold::Claim("b"), &claimed_event);
        assert!(claimed.await.unwrap(), "{name}");
        let stored = store.get_ticket(&ticket.id).await.unwrap().unwrap();
        assert_eq!((stored.state, stored.key_id, stored.claim_started_at), (TicketState::Claimed, Some(key_b), None));
        let expired = event(Action::TicketExpired);
        let again = store.end_ticket(&ticket.id, TicketEnd::Expired, later, nobody, &expired).await.unwrap();
        assert!(!again, "{name}: a claimed ticket stays claimed");
        assert!(store.tickets_due_for_expiry(now + Duration::hours(1), now, 10).await.unwrap().is_empty());
        let actions: Vec<String> = store.audit_chain(0, 100).await.unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(actions, ["ticket.created", "ticket.claimed"], "{name}: one event per change that happened");

        // A key issued through a ticket (its claim's answer lost) is found, and blocks a new claim.
        let lost = Ticket { id: TicketId::generate(), ..ticket.clone() };
        store.insert_ticket(&lost, &event(Action::TicketCreated)).await.unwrap();
        let key = keybroker::domain::keys::NewKey {
            id: uuid::Uuid::new_v4(),
            scope: lost.scope.clone(),
            requester: "alice".to_owned(),
            purpose: keybroker::domain::policy::Purpose::parse("p").unwrap(),
            octopus_user_id: "Users-2".to_owned(),
            created_at: now,
            expires_at: now + Duration::days(1),
            max_active: 5,
            idempotency: None,
            requester_teams: Vec::new(),
            requested_by: Some(BOT.to_owned()),
            ticket: Some(lost.id.to_string()),
            deadline: None,
        };
        store.insert_pending(&key, &event(Action::KeyRequested), now).await.unwrap();
        let found = store.ticket_key(&lost.id).await.unwrap().unwrap();
        assert_eq!((found.id, found.requested_by.as_deref()), (key.id, Some(BOT)), "{name}");
        assert!(!store.begin_ticket_claim(&lost.id, "c", now, now - hold).await.unwrap(), "{name}: already issued");
        assert_eq!(store.ticket_key(&ticket.id).await.unwrap(), None, "{name}");
    }
}

#[tokio::test]
async fn without_ui_there_is_no_page_and_nobody_may_create_tickets() {
    let app = TestApp::spawn().await;
    for path in ["/", "/tickets/tkt_aaaaaaaaaaaaaaaaaaaaaaaaaa", "/ui/app.js", "/ui/config.json"] {
        let res = app.http.get(format!("{}{path}", app.url)).send().await.unwrap();
        assert_eq!(res.status(), 404, "{path}");
    }
    let body = json!({"for": "alice@example.com", "scope": "payments-deploy", "purpose": "p"});
    assert_eq!(create(&app, &bot(&app), body).await.0, 403, "no delegate teams without the page");
}

#[test]
fn the_page_and_tickets_are_refused_at_start_when_their_links_could_not_work() {
    let load = |configure: fn(&mut ConfigFile)| {
        let (_dir, path) = crate::helpers::config_file("http://127.0.0.1:9", configure);
        Config::load(&path).map(|_| ()).map_err(|e| e.to_string())
    };
    let err = load(|f| crate::helpers::auth(f).delegate_teams = vec!["chatops".to_owned()]).unwrap_err();
    assert!(err.starts_with("auth.delegate_teams"), "{err}");
    let err = load(|f| {
        f.server.listen = "0.0.0.0:8080".to_owned();
        with_page(f);
    })
    .unwrap_err();
    assert!(err.starts_with("server.public_url"), "{err}");
    let err = load(|f| f.ui = Some(page("https://other.example/", "keybroker"))).unwrap_err();
    assert!(err.starts_with("ui.issuer") && err.contains("not a trusted issuer"), "{err}");
    let err = load(|f| f.ui = Some(RawUi { token: UiToken::IdToken, ..page("https://keybroker-dev.local/", "page") }))
        .unwrap_err();
    assert!(err.starts_with("ui.token"), "{err}");
    assert_eq!(load(with_page), Ok(()));
}
