//! The page in a real headless Chromium (Debian's `chromium`; `.ci/run` installs it), against
//! exactly what `keybroker dev` runs: the simulator, the development identity provider and
//! keybroker. Every request the page makes is watched.
//!
//! Set `KEYBROKER_SCREENSHOT_DIR` to keep screenshots (the README's comes from here).

use std::time::Duration;

use keybroker::dev::DevEnvironment;
use serde_json::{Value, json};

use crate::cdp::{Browser, Page};

const WAIT: Duration = Duration::from_secs(15);

struct Running {
    env_url: String,
    idp_url: String,
    bob_token: String,
    octopus_url: String,
    bot_token: String,
    alice_token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start() -> Self {
        let env = DevEnvironment::start(0).await.expect("keybroker dev starts");
        let (env_url, octopus_url) = (env.url.clone(), env.octopus_url.clone());
        let idp_url = env.idp.issuer().to_owned();
        let bob_token = env.token("bob@example.com").unwrap();
        let bot_token = env.token("chatops-bot").unwrap();
        let alice_token = env.token("alice@example.com").unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(env.serve(async move {
            let _ = stopped.await;
        }));
        Self { env_url, idp_url, bob_token, octopus_url, bot_token, alice_token, stop: Some(stop), task }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
    }

    async fn octopus_me(&self, api_key: &str) -> u16 {
        reqwest::Client::new()
            .get(format!("{}/api/users/me", self.octopus_url))
            .header("X-Octopus-ApiKey", api_key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn create_ticket(&self, purpose: &str) -> Value {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/tickets", self.env_url))
            .bearer_auth(&self.bot_token)
            .json(&json!({"for": "alice@example.com", "scope": "payments-deploy", "purpose": purpose, "ttl": "1d"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    async fn get_as(&self, path: &str, token: &str) -> (u16, String) {
        let response =
            reqwest::Client::new().get(format!("{}{path}", self.env_url)).bearer_auth(token).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

fn js(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

async fn screenshot(page: &Page, name: &str) {
    if let Some(dir) = std::env::var_os("KEYBROKER_SCREENSHOT_DIR") {
        let path = std::path::Path::new(&dir).join(name);
        page.screenshot(&path).await.unwrap();
    }
}

/// On the page's sign-in button: through the provider's "sign in as" page and back, signed in.
async fn sign_in_as(page: &Page, who: &str, subject: &str) {
    page.click("#signin").await.unwrap();
    page.wait_for(&format!("document.querySelector('#login-{who}')"), WAIT).await.unwrap();
    page.click(&format!("#login-{who}")).await.unwrap();
    page.wait_for(&format!("(document.querySelector('#whoami-subject')||{{}}).textContent === {}", js(subject)), WAIT)
        .await
        .unwrap();
}

async fn secret_shown(page: &Page) -> String {
    let value = page
        .wait_for(
            "(() => { const e = document.querySelector('#secret-value'); \
             const v = e && (e.value || e.textContent); return v && v.startsWith('API-') ? v : null; })()",
            WAIT,
        )
        .await
        .unwrap();
    value.as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_gets_a_key_once_revokes_it_and_claims_a_bots_ticket_bob_cannot() {
    let running = Running::start().await;
    let browser = Browser::launch().await.expect(
        "the browser tests need Chromium: apt-get install chromium (or set CHROMIUM to its path); .ci/run installs it",
    );
    let page = browser.new_page().await.unwrap();
    let base = format!("{}/", running.env_url);

    // Sign in: the page, the provider's authorize page, the code exchange with PKCE.
    page.goto(&base).await.unwrap();
    page.wait_for("document.querySelector('#signin') && !document.querySelector('#signin').closest('[hidden]')", WAIT)
        .await
        .unwrap();
    sign_in_as(&page, "alice", "alice@example.com").await;
    assert_eq!(page.eval("location.search").await.unwrap(), json!(""), "the authorization code leaves the address bar");
    let stored =
        page.eval("JSON.stringify([localStorage.length, sessionStorage.length, document.cookie])").await.unwrap();
    assert_eq!(stored, json!("[0,0,\"\"]"), "the token is in memory only");

    // My scopes, then a key: shown once, with its warning, and it works against Octopus.
    page.wait_for("document.querySelector('#scopes-body') && document.querySelector('#scopes-body').textContent.includes('payments-deploy')", WAIT)
        .await
        .unwrap();
    screenshot(&page, "scopes.png").await;
    page.click("#nav-request").await.unwrap();
    page.wait_for("document.querySelector('#request-scope option[value=\"payments-deploy\"]')", WAIT).await.unwrap();
    page.select("#request-scope", "payments-deploy").await.unwrap();
    page.type_text("#request-purpose", "trying the page").await.unwrap();
    page.type_text("#request-ttl", "2d").await.unwrap();
    page.click("#request-submit").await.unwrap();
    let secret = secret_shown(&page).await;
    let warning = page.text("#secret-warning").await.unwrap().unwrap_or_default();
    assert!(warning.contains("shown once"), "{warning}");
    assert_eq!(running.octopus_me(&secret).await, 200, "the page's key works against Octopus");
    screenshot(&page, "page.png").await;
    let key_id = page.text("#secret-key-id").await.unwrap().unwrap_or_default().trim().to_owned();
    assert!(uuid::Uuid::parse_str(&key_id).is_ok(), "the key's id is shown: {key_id}");

    // Leaving the view removes the secret from the page. By keyboard: focus and Enter.
    page.eval("document.querySelector('#nav-keys').focus()").await.unwrap();
    page.press("Enter").await.unwrap();
    let row = format!("tr[data-key-id={}]", js(&key_id));
    page.wait_for(&format!("document.querySelector({})", js(&row)), WAIT).await.unwrap();
    let leftover = page
        .eval(&format!(
            "document.documentElement.outerHTML.includes({s}) || [...document.querySelectorAll('input')].some(i => i.value.includes({s}))",
            s = js(&secret)
        ))
        .await
        .unwrap();
    assert_eq!(leftover, json!(false), "the secret is gone from the page once its view is left");

    // Revoke, with the confirmation.
    page.click(&format!("{row} .revoke")).await.unwrap();
    page.wait_for("document.querySelector('#confirm-dialog').open", WAIT).await.unwrap();
    page.click("#confirm-yes").await.unwrap();
    page.wait_for(&format!("(document.querySelector({})||{{}}).textContent.includes('revoked')", js(&row)), WAIT)
        .await
        .unwrap();
    assert_eq!(running.octopus_me(&secret).await, 401, "the revoked key no longer works");

    // A bot's ticket, opened from chat: the link alone changes nothing; alice signs in and claims.
    let ticket = running.create_ticket("hotfix, asked in #payments").await;
    let pickup = ticket["pickup_url"].as_str().unwrap().to_owned();
    assert!(pickup.starts_with(&base), "{pickup}");
    page.goto(&pickup).await.unwrap();
    sign_in_as(&page, "alice", "alice@example.com").await;
    assert_eq!(
        page.eval("location.pathname").await.unwrap(),
        json!(format!("/tickets/{}", ticket["id"].as_str().unwrap()))
    );
    page.wait_for("(document.querySelector('#ticket-state')||{}).textContent === 'waiting'", WAIT).await.unwrap();
    let asked = page.text("#ticket-requested-by").await.unwrap().unwrap_or_default();
    assert!(asked.contains("chatops-bot") || asked.contains("Deploy bot"), "who asked is shown: {asked}");
    page.click("#ticket-claim").await.unwrap();
    let claimed_secret = secret_shown(&page).await;
    assert_eq!(running.octopus_me(&claimed_secret).await, 200);
    let (status, bot_view) =
        running.get_as(&format!("/v1/tickets/{}", ticket["id"].as_str().unwrap()), &running.bot_token).await;
    assert_eq!(status, 200);
    let bot_view: Value = serde_json::from_str(&bot_view).unwrap();
    assert_eq!(bot_view["state"], "claimed");
    assert!(!bot_view.to_string().contains(&claimed_secret), "the bot never sees the secret");

    // Bob opens a ticket that is alice's: he sees whose it is and cannot claim it.
    let second = running.create_ticket("another one for alice").await;
    let bob_page = browser.new_page().await.unwrap();
    bob_page.goto(second["pickup_url"].as_str().unwrap()).await.unwrap();
    sign_in_as(&bob_page, "bob", "bob@example.com").await;
    bob_page
        .wait_for("(document.querySelector('#problem')||{textContent: ''}).textContent.includes('someone else')", WAIT)
        .await
        .unwrap();
    let claim_visible = bob_page
        .eval("(() => { const b = document.querySelector('#ticket-claim'); return !!b && !b.hidden && !b.closest('[hidden]'); })()")
        .await
        .unwrap();
    assert_eq!(claim_visible, json!(false), "bob gets no claim button");
    let (status, _) =
        running.get_as(&format!("/v1/tickets/{}", second["id"].as_str().unwrap()), &running.alice_token).await;
    assert_eq!(status, 200);
    let bob_claim = reqwest::Client::new()
        .post(format!("{}/v1/tickets/{}/claim", running.env_url, second["id"].as_str().unwrap()))
        .bearer_auth(&running.bob_token)
        .send()
        .await
        .unwrap();
    assert_eq!(bob_claim.status(), 403, "bob's own claim is refused by the API too");

    // An auditor: the trail with its verification, and a leaked secret identified.
    let sam_page = browser.new_page().await.unwrap();
    sam_page.goto(&base).await.unwrap();
    sign_in_as(&sam_page, "sam", "sam@example.com").await;
    sam_page.click("#nav-audit").await.unwrap();
    sam_page
        .wait_for(
            "(document.querySelector('#audit-body')||{textContent: ''}).textContent.includes('ticket.claimed')",
            WAIT,
        )
        .await
        .unwrap();
    sam_page.click("#audit-verify").await.unwrap();
    sam_page
        .wait_for("(document.querySelector('#verify-result')||{textContent: ''}).textContent.includes('intact')", WAIT)
        .await
        .unwrap();
    // Sam may read alice's waiting ticket: whose it is is shown, and neither claim nor cancel is offered.
    sam_page.goto(second["pickup_url"].as_str().unwrap()).await.unwrap();
    sign_in_as(&sam_page, "sam", "sam@example.com").await;
    sam_page.wait_for("(document.querySelector('#ticket-state')||{}).textContent === 'waiting'", WAIT).await.unwrap();
    let mismatch = sam_page.text("#ticket-mismatch").await.unwrap().unwrap_or_default();
    assert!(mismatch.contains("alice@example.com") && mismatch.contains("sam@example.com"), "{mismatch}");
    let offered = sam_page
        .eval("['#ticket-claim', '#ticket-cancel'].map(s => { const b = document.querySelector(s); return !!b && !b.hidden && !b.closest('[hidden]'); })")
        .await
        .unwrap();
    assert_eq!(offered, json!([false, false]), "an auditor may neither claim nor cancel");
    sam_page.goto(&base).await.unwrap();
    sign_in_as(&sam_page, "sam", "sam@example.com").await;
    sam_page.click("#nav-identify").await.unwrap();
    sam_page.type_text("#identify-secret", &claimed_secret).await.unwrap();
    sam_page.click("#identify-submit").await.unwrap();
    sam_page
        .wait_for(
            "(document.querySelector('#identify-result')||{textContent: ''}).textContent.includes('alice@example.com')",
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(sam_page.eval("document.querySelector('#identify-secret').value").await.unwrap(), json!(""));

    // At phone width nothing is wider than the screen.
    page.set_viewport(360, 740, true).await.unwrap();
    page.click("#nav-keys").await.unwrap();
    let overflow = page.eval("document.documentElement.scrollWidth").await.unwrap();
    assert!(overflow.as_u64().unwrap() <= 360, "the page scrolls sideways at 360 px: {overflow}");
    screenshot(&page, "phone.png").await;

    // Every request stayed on loopback, and the CSP refused nothing.
    for (who, p) in [("alice", &page), ("bob", &bob_page), ("sam", &sam_page)] {
        let requests = p.requests();
        assert!(requests.len() > 10, "{who}'s page made {} requests", requests.len());
        // keybroker's and the identity provider's origins, exactly: nothing else, not even
        // another service on loopback.
        let allowed = [running.env_url.as_str(), running.idp_url.as_str()];
        for url in &requests {
            let origin = url::Url::parse(url).map(|u| u.origin().ascii_serialization()).unwrap_or_default();
            assert!(
                url.starts_with("data:") || url == "about:blank" || allowed.contains(&origin.as_str()),
                "{who}'s page requested {url}"
            );
        }
        // Answers of 4xx are expected (bob's 403) and logged by Chromium; nothing else may be: no
        // exception, no CSP violation.
        let errors: Vec<String> =
            p.errors().into_iter().filter(|e| !e.contains("the server responded with a status of 40")).collect();
        assert!(errors.is_empty(), "{who}'s page logged errors: {errors:?}");
    }
    // The page's own responses carry the CSP.
    let csp = page
        .responses()
        .into_iter()
        .find(|(url, _, _)| url.ends_with("/") && url.starts_with(&base))
        .and_then(|(_, _, headers)| headers.get("content-security-policy").cloned())
        .unwrap_or_default();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");

    drop(browser);
    running.stop().await;
}
