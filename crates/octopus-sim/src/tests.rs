//! End-to-end tests of the simulator: a real server on port 0, spoken to with reqwest.

use std::collections::HashSet;
use std::time::Duration as StdDuration;

use axum::http::Method;
use chrono::{DateTime, Duration, Utc};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use super::error::{FORBIDDEN, KEY_NOT_OWNED, UNAUTHORIZED, VALIDATION};
use super::*;

const BROKER_KEY: &str = "API-BROKERTESTKEY0000000000001";
const SHORT_ADMIN_KEY: &str = "API-SHORTLIVEDADMINKEY00000001";
const ALICE_KEY: &str = "API-ALICETESTKEY00000000000001";
const INSTALLATION: &str = "0c98f4bd-64bd-481d-8978-7a602232c95c";
const FORBIDDEN_USER_EDIT: &str = "You do not have permission to perform this action. Please contact your Octopus administrator. Missing permission: UserEdit";

/// 7 seeded users + 95 generated = 102: four pages of 30.
const SEED_TOML: &str = r#"
extra_users = 95

[server]
installation_id = "0c98f4bd-64bd-481d-8978-7a602232c95c"

[[users]]
username = "keybroker"
display_name = "Broker"
is_service = true
can_edit_users = true

[[users]]
username = "short-admin"
is_service = true
can_edit_users = true

[[users]]
username = "alice"
display_name = "Alice Example"
email = "alice@example.com"
password = "alice-password"

[[users]]
username = "svc-payments-deploy"
display_name = "Payments deployer"
is_service = true

[[users]]
username = "svc-payments-deploy-old"
is_service = true

[[users]]
username = "svc-payments-deployer"
display_name = "Payments Person"

[[users]]
username = "svc-retired"
is_service = true
is_active = false

[[api_keys]]
username = "keybroker"
secret = "API-BROKERTESTKEY0000000000001"
purpose = "broker"

[[api_keys]]
username = "short-admin"
secret = "API-SHORTLIVEDADMINKEY00000001"
expires_in_days = 10

[[api_keys]]
username = "alice"
secret = "API-ALICETESTKEY00000000000001"
expires_in_days = 30
"#;

fn test_seed() -> Seed {
    Seed::from_toml(SEED_TOML).unwrap()
}

struct Harness {
    sim: Simulator,
    server: RunningSimulator,
    http: reqwest::Client,
}

async fn start(seed: Seed) -> Harness {
    let sim = Simulator::new(seed).unwrap();
    let server = sim.spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    Harness { sim, server, http: reqwest::Client::new() }
}

impl Harness {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    fn id(&self, username: &str) -> String {
        self.sim.user_id(username).unwrap()
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value, HeaderMap) {
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body, headers)
    }

    async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        let (status, body, _) = self.send(self.http.get(self.url(path)).header("X-Octopus-ApiKey", key)).await;
        (status, body)
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        let (status, body, _) =
            self.send(self.http.post(self.url(path)).header("X-Octopus-ApiKey", key).json(&body)).await;
        (status, body)
    }

    async fn delete(&self, path: &str, key: &str) -> (StatusCode, Value) {
        let (status, body, _) = self.send(self.http.delete(self.url(path)).header("X-Octopus-ApiKey", key)).await;
        (status, body)
    }

    /// Creates a key for `username` as the broker, expiring in `days`.
    async fn create_for(&self, username: &str, purpose: &str, days: i64) -> Value {
        let expires = super::wire::format_date(self.sim.now() + Duration::days(days));
        let (status, body) = self
            .post(
                &format!("/api/users/{}/apikeys", self.id(username)),
                BROKER_KEY,
                json!({ "Purpose": purpose, "Expires": expires }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

fn date(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().unwrap()).unwrap().with_timezone(&Utc)
}

fn close_to(actual: DateTime<Utc>, expected: DateTime<Utc>) -> bool {
    (actual - expected).num_seconds().abs() < 30
}

fn usernames(page: &Value) -> Vec<String> {
    page["Items"].as_array().unwrap().iter().map(|u| u["Username"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn users_are_paged_thirty_at_a_time_with_octopus_links() {
    let h = start(test_seed()).await;
    let (status, page) = h.get("/api/users", BROKER_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["ItemType"], "User");
    assert_eq!(page["TotalResults"], 102);
    assert_eq!(page["ItemsPerPage"], 30);
    assert_eq!(page["NumberOfPages"], 4);
    assert_eq!(page["LastPageNumber"], 3);
    assert_eq!(page["Items"].as_array().unwrap().len(), 30);
    let links = &page["Links"];
    assert_eq!(links["Self"], "/api/users");
    assert_eq!(links["Page.Current"], "/api/users?skip=0&take=30");
    assert_eq!(links["Page.Next"], "/api/users?skip=30&take=30");
    assert_eq!(links["Page.Last"], "/api/users?skip=90&take=30");
    assert_eq!(links["Page.3"], "/api/users?skip=90&take=30");
    assert!(links["Template"].as_str().unwrap().contains("{?skip,take"));
    assert!(links["Page.All"].as_str().is_some());
    assert!(links.get("Page.Previous").is_none());
    assert!(links.get("Page.4").is_none());

    let (_, last) = h.get("/api/users?skip=90", BROKER_KEY).await;
    assert_eq!(last["Items"].as_array().unwrap().len(), 12);
    assert!(last["Links"].get("Page.Next").is_none());
    assert_eq!(last["Links"]["Page.Previous"], "/api/users?skip=60&take=30");

    // A client following Page.Next sees every user exactly once, in username order.
    let mut next = Some("/api/users?take=7".to_owned());
    let mut seen = Vec::new();
    while let Some(link) = next {
        let (status, page) = h.get(&link, BROKER_KEY).await;
        assert_eq!(status, StatusCode::OK);
        seen.extend(usernames(&page));
        next = page["Links"]["Page.Next"].as_str().map(str::to_owned);
    }
    assert_eq!(seen.len(), 102);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 102);
    let mut sorted = seen.clone();
    sorted.sort_by_key(|u| u.to_lowercase());
    assert_eq!(seen, sorted);

    let (status, all) = h.get("/api/users/all", BROKER_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all.as_array().unwrap().len(), 102);
    assert_eq!(all[0]["Username"], seen[0].as_str());
}

#[tokio::test]
async fn user_filter_is_a_case_insensitive_substring_of_name_display_name_or_email() {
    let h = start(test_seed()).await;
    let (_, page) = h.get("/api/users?filter=PAYMENTS-DEPLOY", BROKER_KEY).await;
    assert_eq!(page["TotalResults"], 3);
    assert_eq!(usernames(&page), ["svc-payments-deploy", "svc-payments-deploy-old", "svc-payments-deployer"]);
    assert!(page["Links"]["Page.Current"].as_str().unwrap().contains("filter=PAYMENTS-DEPLOY"));

    let (_, by_display) = h.get("/api/users?filter=alice%20exam", BROKER_KEY).await;
    assert_eq!(usernames(&by_display), ["alice"]);
    let (_, by_email) = h.get("/api/users?filter=ALICE@example", BROKER_KEY).await;
    assert_eq!(usernames(&by_email), ["alice"]);

    let (_, generated) = h.get("/api/users?filter=lovelace&take=100", BROKER_KEY).await;
    let items = generated["Items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(items.iter().all(|u| u["DisplayName"].as_str().unwrap().contains("Lovelace")));

    let ids = format!("/api/users?ids={},{}", h.id("alice"), h.id("keybroker"));
    let (_, by_ids) = h.get(&ids, BROKER_KEY).await;
    assert_eq!(usernames(&by_ids), ["alice", "keybroker"]);

    let (_, none) = h.get("/api/users?filter=no-such-user-anywhere", BROKER_KEY).await;
    assert_eq!(none["TotalResults"], 0);
    assert!(none["Links"].get("Page.Next").is_none());
}

#[tokio::test]
async fn a_created_key_is_returned_once_and_authenticates() {
    let h = start(test_seed()).await;
    let svc = h.id("svc-payments-deploy");
    let created = h.create_for("svc-payments-deploy", "deploy pipeline", 30).await;
    let secret = created["ApiKey"].as_str().unwrap().to_owned();
    assert!(seed::is_api_key_format(&secret) && secret.len() == 30, "{secret}");
    assert!(created["Id"].as_str().unwrap().starts_with("apikeys-"));
    assert_eq!(created["UserId"], svc.as_str());
    assert_eq!(created["Purpose"], "deploy pipeline");
    assert_eq!(created["ActorType"], "User");
    let created_at = created["Created"].as_str().unwrap();
    assert_eq!(created_at.len(), "2026-11-23T12:00:25.647+00:00".len());
    assert!(created_at.ends_with("+00:00"));
    assert!(created["Links"]["Self"].as_str().unwrap().ends_with(created["Id"].as_str().unwrap()));

    let (status, me) = h.get("/api/users/me", &secret).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["Username"], "svc-payments-deploy");
    assert_eq!(me["IsService"], true);
    assert_eq!(me["ServiceAccountType"], "Standard");
    assert_eq!(me["CanPasswordBeEdited"], false);
    assert_eq!(me["Links"]["ApiKeys"], format!("/api/users/{svc}/apikeys{{/id}}{{?skip,take}}"));

    let list_path = format!("/api/users/{svc}/apikeys");
    let response = h.http.get(h.url(&list_path)).header("X-Octopus-ApiKey", BROKER_KEY).send().await.unwrap();
    let text = response.text().await.unwrap();
    assert!(!text.contains(&secret), "a list must never show the secret");
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list["ItemType"], "ApiKey");
    let item = &list["Items"][0];
    assert_eq!(item["Id"], created["Id"]);
    assert_eq!(item["ApiKey"], json!({ "HasValue": true, "NewValue": null, "Hint": &secret[..8] }));
    assert_eq!(item["IsLastUsedTimestampKnown"], true);

    let (status, one) = h.get(&format!("{list_path}/{}", created["Id"].as_str().unwrap()), BROKER_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["ApiKey"]["Hint"], &secret[..8]);

    let stored = h.sim.api_keys();
    let key = stored.iter().find(|k| k.id == created["Id"]).unwrap();
    assert_eq!(key.username, "svc-payments-deploy");
    assert_eq!(key.hint, &secret[..8]);
}

#[tokio::test]
async fn omitted_expiry_is_the_default_and_null_is_the_maximum() {
    let h = start(test_seed()).await;
    let path = format!("/api/users/{}/apikeys", h.id("svc-payments-deploy"));
    let now = h.sim.now();
    let (status, omitted) = h.post(&path, BROKER_KEY, json!({ "Purpose": "omitted" })).await;
    assert_eq!(status, StatusCode::OK, "{omitted}");
    assert!(close_to(date(&omitted["Expires"]), now + Duration::days(180)));
    let (status, null) =
        h.post(&path, BROKER_KEY, json!({ "Purpose": "null", "Expires": null, "SomethingNew": 1 })).await;
    assert_eq!(status, StatusCode::OK, "{null}");
    assert!(close_to(date(&null["Expires"]), now + Duration::days(366)));

    let (_, auth) = h.get("/api/authentication", "").await;
    assert_eq!(auth["ApiKeyDefaultExpiryDays"], 180);
    assert_eq!(auth["ApiKeyMaxExpiryDays"], 366);
    assert_eq!(auth["UserApiKeysEnabled"], true);

    // A server before 2025.4: no default, no maximum, keys may never expire.
    let mut seed = test_seed();
    seed.server.api_key_default_expiry_days = None;
    seed.server.api_key_max_expiry_days = None;
    let old = start(seed).await;
    let path = format!("/api/users/{}/apikeys", old.id("svc-payments-deploy"));
    let (_, omitted) = old.post(&path, BROKER_KEY, json!({ "Purpose": "omitted" })).await;
    assert_eq!(omitted["Expires"], Value::Null);
    let (_, null) = old.post(&path, BROKER_KEY, json!({ "Purpose": "null", "Expires": null })).await;
    assert_eq!(null["Expires"], Value::Null);
    let (_, auth) = old.get("/api/authentication", "").await;
    assert!(auth.get("ApiKeyMaxExpiryDays").is_none());
    assert!(auth.get("ApiKeyDefaultExpiryDays").is_none());
}

#[tokio::test]
async fn each_expiry_rule_is_a_validation_error() {
    let h = start(test_seed()).await;
    let path = format!("/api/users/{}/apikeys", h.id("svc-payments-deploy"));
    let at = |d: Duration| super::wire::format_date(h.sim.now() + d);
    let refused = |body: &Value| {
        assert_eq!(body["ErrorMessage"], VALIDATION, "{body}");
        assert_eq!(body["Errors"].as_array().map(Vec::len), Some(1), "{body}");
    };

    for (expires, why) in [
        (json!("next tuesday"), "unparseable"),
        (json!(12345), "not a string"),
        (json!(at(-Duration::hours(1))), "in the past"),
        (json!(at(Duration::days(400))), "beyond the maximum"),
    ] {
        let (status, body) = h.post(&path, BROKER_KEY, json!({ "Purpose": why, "Expires": expires })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}");
        refused(&body);
    }
    for purpose in [json!(null), json!("   ")] {
        let (status, body) =
            h.post(&path, BROKER_KEY, json!({ "Purpose": purpose, "Expires": at(Duration::days(1)) })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        refused(&body);
    }
    let (status, _) = h
        .post(&path, BROKER_KEY, json!({ "Purpose": "max", "Expires": at(Duration::days(366) - Duration::seconds(5)) }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = h
        .post(
            &path,
            BROKER_KEY,
            json!({ "Purpose": "body user", "UserId": "Users-1234", "Expires": at(Duration::days(1)) }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    refused(&body);
    let no_body = h.http.post(h.url(&path)).header("X-Octopus-ApiKey", BROKER_KEY).send().await.unwrap();
    assert_eq!(no_body.status(), StatusCode::BAD_REQUEST);

    // The creating key expires in 10 days: nothing may outlive it, the default included.
    for expires in [Some(json!(at(Duration::days(20)))), Some(json!(null)), None] {
        let mut body = json!({ "Purpose": "beyond caller" });
        if let Some(expires) = expires {
            body["Expires"] = expires;
        }
        let (status, answer) = h.post(&path, SHORT_ADMIN_KEY, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        refused(&answer);
    }
    let (status, _) =
        h.post(&path, SHORT_ADMIN_KEY, json!({ "Purpose": "within caller", "Expires": at(Duration::days(5)) })).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn permissions_follow_octopus() {
    let h = start(test_seed()).await;
    let alice = h.id("alice");
    let svc = h.id("svc-payments-deploy");
    let expires = super::wire::format_date(h.sim.now() + Duration::days(5));
    let body = json!({ "Purpose": "p", "Expires": expires });

    // A normal user cannot create keys for someone else.
    let (status, answer) = h.post(&format!("/api/users/{svc}/apikeys"), ALICE_KEY, body.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(answer["ErrorMessage"], FORBIDDEN_USER_EDIT);
    // An admin cannot create keys for a human user.
    let (status, answer) = h.post(&format!("/api/users/{alice}/apikeys"), BROKER_KEY, body.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(answer["ErrorMessage"].as_str().unwrap().starts_with(FORBIDDEN));
    // Anyone may create their own.
    let (status, _) = h.post(&format!("/api/users/{alice}/apikeys"), ALICE_KEY, body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    // Inactive and unknown targets.
    let retired = h.id("svc-retired");
    let (status, answer) = h.post(&format!("/api/users/{retired}/apikeys"), BROKER_KEY, body.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, answer) = h.post("/api/users/Users-9999/apikeys", BROKER_KEY, body.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(answer, json!({ "ErrorMessage": "The resource 'Users-9999' was not found." }));

    // Reading: own keys and own user, or UserEdit.
    let (status, answer) = h.get(&format!("/api/users/{svc}/apikeys"), ALICE_KEY).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(answer["ErrorMessage"], FORBIDDEN_USER_EDIT);
    let (status, _) = h.get(&format!("/api/users/{alice}/apikeys"), ALICE_KEY).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h.get(&format!("/api/users/{alice}/apikeys"), BROKER_KEY).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h.get(&format!("/api/users/{svc}"), ALICE_KEY).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, user) = h.get(&format!("/api/users/{alice}"), BROKER_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(user["EmailAddress"], "alice@example.com");
    let (status, _) = h.get("/api/users/Users-9999", BROKER_KEY).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // With user API keys disabled, only service accounts get keys.
    let mut seed = test_seed();
    seed.server.user_api_keys_enabled = false;
    let off = start(seed).await;
    let (status, answer) = off.post(&format!("/api/users/{alice}/apikeys"), ALICE_KEY, body.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["ErrorMessage"], VALIDATION);
    let (status, _) = off.post(&format!("/api/users/{svc}/apikeys"), BROKER_KEY, body).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn deleting_a_key_answers_empty_then_404_and_the_key_stops_working() {
    let h = start(test_seed()).await;
    let svc = h.id("svc-payments-deploy");
    let created = h.create_for("svc-payments-deploy", "to delete", 5).await;
    let secret = created["ApiKey"].as_str().unwrap();
    let key_path = format!("/api/users/{svc}/apikeys/{}", created["Id"].as_str().unwrap());
    assert_eq!(h.get("/api/users/me", secret).await.0, StatusCode::OK);

    // The key id under another user's path is a mismatch, not a delete.
    let alice_path = format!("/api/users/{}/apikeys/{}", h.id("alice"), created["Id"].as_str().unwrap());
    let (status, answer) = h.delete(&alice_path, BROKER_KEY).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["ErrorMessage"], KEY_NOT_OWNED);
    let (status, _) = h.get(&alice_path, BROKER_KEY).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, answer) = h.delete(&key_path, BROKER_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({}));
    let (status, answer) = h.get("/api/users/me", secret).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["ErrorMessage"], UNAUTHORIZED);
    let (status, answer) = h.delete(&key_path, BROKER_KEY).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(answer["ErrorMessage"], format!("The resource '{}' was not found.", created["Id"].as_str().unwrap()));
    assert!(h.sim.api_keys().iter().all(|k| k.id != created["Id"]));

    // The .NET client's way: POST with X-HTTP-Method-Override: DELETE.
    let other = h.create_for("svc-payments-deploy", "override", 5).await;
    let other_path = format!("/api/users/{svc}/apikeys/{}", other["Id"].as_str().unwrap());
    let (status, answer, _) = h
        .send(
            h.http
                .post(h.url(&other_path))
                .header("X-Octopus-ApiKey", BROKER_KEY)
                .header("X-HTTP-Method-Override", "DELETE"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({}));
    // Three real DELETEs above plus this override.
    assert_eq!(h.sim.request_count("DELETE /api/users/{id}/apikeys/{keyId}"), 4);
    let (status, _) = h.post(&other_path, BROKER_KEY, json!({})).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // Revoked in the portal, behind the broker's back.
    let third = h.create_for("svc-payments-deploy", "portal", 5).await;
    assert!(h.sim.delete_api_key_behind_the_back(third["Id"].as_str().unwrap()));
    assert_eq!(h.get("/api/users/me", third["ApiKey"].as_str().unwrap()).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn key_lists_are_newest_first_and_filter_by_purpose_or_hint() {
    let h = start(test_seed()).await;
    let svc = h.id("svc-payments-deploy");
    let alpha = h.create_for("svc-payments-deploy", "Alpha deploy", 5).await;
    h.sim.advance_clock(Duration::seconds(1));
    let _beta = h.create_for("svc-payments-deploy", "Beta deploy", 5).await;
    h.sim.advance_clock(Duration::seconds(1));
    let gamma = h.create_for("svc-payments-deploy", "Gamma", 5).await;

    let (_, list) = h.get(&format!("/api/users/{svc}/apikeys"), BROKER_KEY).await;
    let purposes: Vec<_> = list["Items"].as_array().unwrap().iter().map(|k| k["Purpose"].clone()).collect();
    assert_eq!(purposes, ["Gamma", "Beta deploy", "Alpha deploy"]);
    assert_eq!(list["Items"][0]["Id"], gamma["Id"]);

    let (_, deploys) = h.get(&format!("/api/users/{svc}/apikeys?partialPurpose=DEPLOY"), BROKER_KEY).await;
    assert_eq!(deploys["TotalResults"], 2);
    let hint = &alpha["ApiKey"].as_str().unwrap()[..8];
    let (_, by_hint) = h.get(&format!("/api/users/{svc}/apikeys?partialKeyword={hint}"), BROKER_KEY).await;
    assert!(by_hint["Items"].as_array().unwrap().iter().any(|k| k["Id"] == alpha["Id"]));
    let (_, paged) = h.get(&format!("/api/users/{svc}/apikeys?take=2"), BROKER_KEY).await;
    assert_eq!(paged["NumberOfPages"], 2);
    assert_eq!(paged["Links"]["Page.Next"], format!("/api/users/{svc}/apikeys?skip=2&take=2"));
    let (status, _) = h.get(&format!("/api/users/{svc}/apikeys/apikeys-nope"), BROKER_KEY).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn login_sets_suffixed_cookies_and_requires_the_csrf_header() {
    let h = start(test_seed()).await;
    let login = json!({ "Username": "ALICE", "Password": "alice-password", "RememberMe": false,
                        "State": { "UsingSecureConnection": false } });
    let response = h.http.post(h.url("/api/users/login")).json(&login).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookies: Vec<String> =
        response.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    let user: Value = response.json().await.unwrap();
    assert_eq!(user["Username"], "alice");
    let identification =
        cookies.iter().find(|c| c.starts_with(&format!("OctopusIdentificationToken_{INSTALLATION}="))).unwrap();
    assert!(identification.contains("HttpOnly"));
    let csrf_cookie = cookies.iter().find(|c| c.starts_with(&format!("Octopus-Csrf-Token_{INSTALLATION}="))).unwrap();
    let pair = |c: &str| c.split(';').next().unwrap().to_owned();
    let cookie_header = format!("{}; {}", pair(identification), pair(csrf_cookie));
    // The cookie value is URL-encoded; the header carries it decoded.
    let csrf = super::wire::percent_decode(pair(csrf_cookie).split_once('=').unwrap().1);

    let me = |csrf: Option<&str>| {
        let mut request = h.http.get(h.url("/api/users/me")).header("Cookie", cookie_header.clone());
        if let Some(csrf) = csrf {
            request = request.header("X-Octopus-Csrf-Token", csrf);
        }
        request
    };
    let (status, body, _) = h.send(me(Some(&csrf))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["Id"], h.id("alice").as_str());
    let (status, body, _) = h.send(me(None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["ErrorMessage"], UNAUTHORIZED);
    assert_eq!(h.send(me(Some("wrong"))).await.0, StatusCode::UNAUTHORIZED);

    // A session has no key of its own, so it may create a key with the default expiry.
    let (status, created, _) = h
        .send(
            h.http
                .post(h.url(&format!("/api/users/{}/apikeys", h.id("alice"))))
                .header("Cookie", cookie_header.clone())
                .header("X-Octopus-Csrf-Token", csrf.clone())
                .json(&json!({ "Purpose": "from the portal" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");

    // Logout ends the session.
    let (status, _, _) = h
        .send(
            h.http
                .post(h.url("/api/users/logout"))
                .header("Cookie", cookie_header.clone())
                .header("X-Octopus-Csrf-Token", csrf.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.send(me(Some(&csrf))).await.0, StatusCode::UNAUTHORIZED);

    // Wrong password, unknown user and service accounts all fail the same way.
    for (username, password) in [("alice", "nope"), ("nobody", "x"), ("keybroker", "")] {
        let (status, body, _) = h
            .send(h.http.post(h.url("/api/users/login")).json(&json!({ "Username": username, "Password": password })))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            json!({ "ErrorMessage": "Invalid username or password.", "Errors": ["Invalid username or password."] })
        );
    }
}

#[tokio::test]
async fn sessions_expire_after_the_timeout() {
    let mut seed = test_seed();
    seed.server.session_timeout_secs = 60;
    let h = start(seed).await;
    let response = h
        .http
        .post(h.url("/api/users/login"))
        .json(&json!({ "Username": "alice", "Password": "alice-password" }))
        .send()
        .await
        .unwrap();
    let pairs: Vec<String> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect();
    let csrf = super::wire::percent_decode(pairs[1].split_once('=').unwrap().1);
    let me = || {
        h.http
            .get(h.url("/api/users/me"))
            .header("Cookie", pairs.join("; "))
            .header("X-Octopus-Csrf-Token", csrf.clone())
    };
    assert_eq!(h.send(me()).await.0, StatusCode::OK);
    h.sim.advance_clock(Duration::seconds(61));
    assert_eq!(h.send(me()).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_expired_and_disabled_credentials_get_401_and_public_routes_do_not() {
    let h = start(test_seed()).await;
    let (status, body, headers) = h.send(h.http.get(h.url("/api/users/me"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, json!({ "ErrorMessage": UNAUTHORIZED }));
    assert_eq!(headers["octopus-node"], "name=SIM; version=2026.3.0");
    assert_eq!(h.get("/api/users/me", "API-NOTAKEY000000000000000000").await.0, StatusCode::UNAUTHORIZED);

    // The query-string form, with the parameter name in any case.
    let (status, me, _) = h.send(h.http.get(h.url(&format!("/api/users/me?ApiKey={ALICE_KEY}")))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["Username"], "alice");

    let (status, root, _) = h.send(h.http.get(h.url("/api"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(root["Application"], "Octopus Deploy");
    assert_eq!(root["ApiVersion"], "3.0.0");
    assert_eq!(root["InstallationId"], INSTALLATION);
    assert_eq!(root["Links"]["Users"], "/api/users{/id}{?skip,take,ids,filter}");
    assert_eq!(root["Links"]["CurrentUser"], "/api/users/me");

    let (status, body, headers) = h.send(h.http.get(h.url("/api/nothing/here"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["ErrorMessage"].as_str().unwrap().contains("/api/nothing/here"));
    assert!(headers.contains_key("octopus-node"));

    // A disabled user's keys stop working, and work again when re-enabled.
    assert!(h.sim.set_user_active("alice", false));
    assert_eq!(h.get("/api/users/me", ALICE_KEY).await.0, StatusCode::UNAUTHORIZED);
    assert!(h.sim.set_user_active("alice", true));
    assert_eq!(h.get("/api/users/me", ALICE_KEY).await.0, StatusCode::OK);
    assert!(!h.sim.set_user_active("nobody", true));

    // Alice's key expires in 30 days.
    h.sim.advance_clock(Duration::days(31));
    assert_eq!(h.get("/api/users/me", ALICE_KEY).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(h.get("/api/users/me", BROKER_KEY).await.0, StatusCode::OK);
}

#[tokio::test]
async fn requests_are_counted_per_route_template() {
    let h = start(test_seed()).await;
    h.get("/api/users", BROKER_KEY).await;
    h.get("/api/users?skip=30", BROKER_KEY).await;
    let svc = h.id("svc-payments-deploy");
    h.create_for("svc-payments-deploy", "counted", 5).await;
    h.get(&format!("/api/users/{svc}/apikeys"), BROKER_KEY).await;
    assert_eq!(h.sim.request_count("GET /api/users"), 2);
    assert_eq!(h.sim.request_count("POST /api/users/{id}/apikeys"), 1);
    assert_eq!(h.sim.request_count("GET /api/users/{id}/apikeys"), 1);
    assert_eq!(h.sim.request_count("DELETE /api/users/{id}/apikeys/{keyId}"), 0);

    let (_, over_http) = h.get("/_sim/counters", "").await;
    assert_eq!(over_http, json!(h.sim.counters()));
    assert_eq!(over_http["GET /api/users"], 2);
    assert!(over_http.get("GET /_sim/counters").is_none());

    h.sim.reset_counters();
    assert!(h.sim.counters().is_empty());
    let (_, keys) = h.get("/_sim/keys", "").await;
    assert!(keys.as_array().unwrap().iter().any(|k| k["purpose"] == "counted"));
    assert!(!keys.to_string().contains("API-BROKER"));
}

#[tokio::test]
async fn status_rate_limit_and_latency_faults() {
    let h = start(test_seed()).await;
    h.sim.inject(
        Fault::on(
            Method::GET,
            "/api/users",
            FaultKind::Status { status: 503, error_message: "Octopus is restarting".to_owned() },
        )
        .times(1),
    );
    let (status, body) = h.get("/api/users", BROKER_KEY).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, json!({ "ErrorMessage": "Octopus is restarting" }));
    assert_eq!(h.get("/api/users", BROKER_KEY).await.0, StatusCode::OK);

    // A fault on GET leaves POST alone; "*" matches every route.
    h.sim.inject(Fault {
        method: Some(Method::GET),
        route: "*".to_owned(),
        kind: FaultKind::RateLimited { retry_after_secs: 7 },
        times: None,
        per_mille: None,
    });
    let (status, body, headers) =
        h.send(h.http.get(h.url("/api/users/me")).header("X-Octopus-ApiKey", BROKER_KEY)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "7");
    assert!(body["ErrorMessage"].is_string());
    h.create_for("svc-payments-deploy", "not rate limited", 5).await;
    assert_eq!(h.get("/api/users/me", BROKER_KEY).await.0, StatusCode::TOO_MANY_REQUESTS);
    h.sim.clear_faults();
    assert_eq!(h.get("/api/users/me", BROKER_KEY).await.0, StatusCode::OK);

    h.sim.inject(Fault::on(Method::GET, "/api/users/me", FaultKind::Latency(StdDuration::from_millis(300))).times(1));
    let started = std::time::Instant::now();
    assert_eq!(h.get("/api/users/me", BROKER_KEY).await.0, StatusCode::OK);
    assert!(started.elapsed() >= StdDuration::from_millis(300));

    // The same over HTTP.
    let fault = json!({ "method": "POST", "route": "POST /api/users/{id}/apikeys",
                        "kind": { "Status": { "status": 500, "error_message": "boom" } } });
    let (status, _) = h.post("/_sim/faults", "", fault).await;
    assert_eq!(status, StatusCode::OK);
    let (_, listed) = h.get("/_sim/faults", "").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let path = format!("/api/users/{}/apikeys", h.id("svc-payments-deploy"));
    let (status, body) = h.post(&path, BROKER_KEY, json!({ "Purpose": "x" })).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["ErrorMessage"], "boom");
    let (status, _) = h.delete("/_sim/faults", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h.post(&path, BROKER_KEY, json!({ "Purpose": "x" })).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h.post("/_sim/faults", "", json!({ "route": "*", "kind": "Explode" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_lost_create_response_still_creates_the_key() {
    let h = start(test_seed()).await;
    h.sim.inject(Fault::on(Method::POST, "/api/users/{id}/apikeys", FaultKind::LoseResponseAfterCreate).times(1));
    let path = format!("/api/users/{}/apikeys", h.id("svc-payments-deploy"));
    let expires = super::wire::format_date(h.sim.now() + Duration::days(5));
    let result = h
        .http
        .post(h.url(&path))
        .header("X-Octopus-ApiKey", BROKER_KEY)
        .json(&json!({ "Purpose": "lost in transit", "Expires": expires }))
        .send()
        .await;
    // Either the head never arrives, or the body breaks: never a readable answer.
    let outcome = match result {
        Err(e) => Err(e),
        Ok(response) => response.bytes().await.map(|b| b.to_vec()),
    };
    assert!(outcome.is_err(), "the client must see a transport error, got {outcome:?}");
    let keys = h.sim.api_keys();
    assert!(keys.iter().any(|k| k.purpose == "lost in transit"));
    assert_eq!(h.sim.request_count("POST /api/users/{id}/apikeys"), 1);

    // The fault was for one request only.
    let (status, _) = h.post(&path, BROKER_KEY, json!({ "Purpose": "fine", "Expires": expires })).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_hundred_thousand_generated_users_seed_and_page() {
    use tower::ServiceExt as _;
    let seed = Seed { extra_users: 100_000, ..test_seed() };
    let sim = Simulator::new(seed).unwrap();
    assert!(sim.user_id("user-100000").is_some());
    assert!(sim.user_id("user-000001").is_some());
    let request = axum::http::Request::get("/api/users?take=5&skip=99990&filter=user-")
        .header("X-Octopus-ApiKey", BROKER_KEY)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = sim.router().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let page: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(page["TotalResults"], 100_000);
    assert_eq!(usernames(&page), ["user-099991", "user-099992", "user-099993", "user-099994", "user-099995"]);
}

#[test]
fn seeds_with_mistakes_are_refused_with_clear_errors() {
    let user = |name: &str, service: bool, password: Option<&str>| SeedUser {
        username: name.to_owned(),
        display_name: None,
        email: None,
        is_service: service,
        is_active: true,
        can_edit_users: false,
        permissions: Vec::new(),
        password: password.map(str::to_owned),
    };
    let key = |name: &str, secret: &str| SeedApiKey {
        username: name.to_owned(),
        secret: secret.to_owned(),
        purpose: "p".to_owned(),
        expires: None,
        expires_in_days: None,
    };
    let with = |users: Vec<SeedUser>, keys: Vec<SeedApiKey>| Seed { users, api_keys: keys, ..Seed::default() };

    let dup = Simulator::new(with(vec![user("a", false, None), user("A", true, None)], vec![])).unwrap_err();
    assert!(matches!(dup, SeedError::DuplicateUsername(_)), "{dup}");
    let pw = Simulator::new(with(vec![user("svc", true, Some("x"))], vec![])).unwrap_err();
    assert!(matches!(pw, SeedError::PasswordOnServiceAccount(_)));
    assert!(pw.to_string().contains("svc"));
    let unknown = Simulator::new(with(vec![], vec![key("ghost", BROKER_KEY)])).unwrap_err();
    assert!(matches!(unknown, SeedError::UnknownKeyUser { .. }));
    for bad in ["API-short", "api-BROKERTESTKEY0000000000001", "API-brokertestkey0000000000001"] {
        let err = Simulator::new(with(vec![user("a", false, None)], vec![key("a", bad)])).unwrap_err();
        assert!(matches!(err, SeedError::BadKeyFormat { .. }));
        assert!(!err.to_string().contains(bad), "an error must not echo the secret");
    }
    let clash = Simulator::new(Seed { extra_users: 3, ..with(vec![user("user-000002", false, None)], vec![]) });
    assert!(matches!(clash, Err(SeedError::DuplicateUsername(_))));

    let unknown = Seed::from_toml("[server]\nnot_a_setting = 1\n").unwrap_err().to_string();
    assert!(unknown.contains("line 2") && unknown.contains("not_a_setting"), "{unknown}");
    let unquoted = Seed::from_toml("[[api_keys]]\nusername = \"a\"\nsecret = API-SECRETVALUE00000000000001\n")
        .unwrap_err()
        .to_string();
    assert!(!unquoted.contains("SECRETVALUE"), "a parse error must not quote the line: {unquoted}");
    assert!(Seed::from_toml("[[users]]\nusername = \"a\"\ncolour = \"red\"\n").is_err());
    let old = Seed::from_toml("[server]\napi_key_max_expiry_days = \"none\"\napi_key_default_expiry_days = \"none\"\n")
        .unwrap();
    assert_eq!(old.server.api_key_max_expiry_days, None);
    let json = Seed::from_json(r#"{"server": {"api_key_max_expiry_days": null}, "extra_users": 2}"#).unwrap();
    assert_eq!(json.server.api_key_max_expiry_days, None);
    assert_eq!(json.server.api_key_default_expiry_days, Some(180));
    let bad_default = Seed::from_toml("[server]\napi_key_default_expiry_days = 400\n").unwrap();
    assert!(matches!(Simulator::new(bad_default), Err(SeedError::BadSetting { .. })));
}

#[test]
fn seed_files_are_read_by_extension() {
    let dir = std::env::temp_dir().join(format!("octopus-sim-seed-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml_path = dir.join("seed.toml");
    std::fs::write(&toml_path, SEED_TOML).unwrap();
    let seed = Seed::from_file(&toml_path).unwrap();
    assert_eq!(seed.users.len(), 7);
    let json_path = dir.join("seed.json");
    std::fs::write(&json_path, r#"{"users": [{"username": "x", "is_service": true}]}"#).unwrap();
    assert_eq!(Seed::from_file(&json_path).unwrap().users[0].username, "x");
    let yaml_path = dir.join("seed.yaml");
    std::fs::write(&yaml_path, "users: []").unwrap();
    assert!(matches!(Seed::from_file(&yaml_path), Err(SeedError::UnsupportedFormat(_))));
    assert!(matches!(Seed::from_file(&dir.join("missing.toml")), Err(SeedError::Read { .. })));
    std::fs::write(&toml_path, "extra_users = \"many\"").unwrap();
    assert!(matches!(Seed::from_file(&toml_path), Err(SeedError::Parse { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_demo_seed_gives_the_broker_a_working_key() {
    let h = start(Seed::demo()).await;
    let (status, me) = h.get("/api/users/me", DEMO_BROKER_API_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["Username"], "keybroker");
    let broker_key = h.sim.api_keys().into_iter().find(|k| k.username == "keybroker").unwrap();
    let expires = broker_key.expires.unwrap();
    assert!(expires > h.sim.now() && expires <= h.sim.now() + Duration::days(366));
    for name in [
        "svc-payments-deploy",
        "svc-web-deploy",
        "svc-readonly-reporting",
        "alice",
        "svc-payments-deploy-old",
        "svc-payments-deployer",
        "svc-retired",
        "user-000200",
    ] {
        assert!(h.sim.user_id(name).is_some(), "{name}");
    }
    let users = h.sim.users();
    assert!(users.iter().any(|u| u.username == "svc-retired" && !u.is_active && u.is_service));
    assert!(users.iter().any(|u| u.username == "svc-payments-deployer" && !u.is_service));
    let text = summary(&h.sim, &h.server.url(), None);
    assert!(text.contains("keybroker") && !text.contains(DEMO_BROKER_API_KEY));
    let response = h
        .http
        .post(h.url("/api/users/login"))
        .json(&json!({ "Username": "alice", "Password": "alice-password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let url = h.server.url();
    assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with('/'));
    h.server.shutdown().await;
    assert!(reqwest::get(format!("{url}/api")).await.is_err());
}

#[test]
fn seed_key_expiry_may_be_a_string_or_a_toml_date_time() {
    let key =
        |expires: &str| format!("[[api_keys]]\nusername = \"a\"\nsecret = \"{BROKER_KEY}\"\nexpires = {expires}\n");
    let expected = DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
    for text in ["2027-01-01T00:00:00Z", "\"2027-01-01T02:00:00+02:00\""] {
        let seed = Seed::from_toml(&key(text)).unwrap();
        assert_eq!(seed.api_keys[0].expires, Some(expected), "{text}");
    }
    assert!(Seed::from_toml(&key("2027-01-01T00:00:00")).is_err(), "no offset");
    assert!(Seed::from_toml(&key("\"soon\"")).is_err());
}

#[tokio::test]
async fn keys_of_a_more_privileged_service_account_are_refused_even_to_user_edit() {
    let mut seed = test_seed();
    let svc = seed.users.iter().position(|u| u.username == "svc-payments-deploy").unwrap();
    seed.users[svc].permissions = vec!["AdministerSystem".to_owned()];
    let h = start(seed).await;
    let id = h.id("svc-payments-deploy");
    let expires = super::wire::format_date(h.sim.now() + Duration::days(5));
    let body = json!({ "Purpose": "p", "Expires": expires });
    let (status, answer) = h.post(&format!("/api/users/{id}/apikeys"), BROKER_KEY, body.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (status, answer) = h.get(&format!("/api/users/{id}/apikeys?take=1"), BROKER_KEY).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(
        answer["ErrorMessage"].as_str().unwrap().contains("AdministerSystem"),
        "reading an administrator: {answer}"
    );

    // A broker holding the same permissions may.
    let mut seed = test_seed();
    for user in seed.users.iter_mut().filter(|u| u.username == "svc-payments-deploy" || u.can_edit_users) {
        user.permissions = vec!["ProjectEdit".to_owned()];
    }
    let h = start(seed).await;
    let id = h.id("svc-payments-deploy");
    let (status, answer) = h.post(&format!("/api/users/{id}/apikeys"), BROKER_KEY, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}
