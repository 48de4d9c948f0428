//! The page at `/`: plain HTML, CSS and JavaScript from `ui/`, compiled into the binary, with a
//! strict Content-Security-Policy. It signs people in with OpenID Connect (authorization code
//! flow with PKCE, as a public client of `[ui] issuer`), keeps the token in memory, and calls
//! the same REST API as every other client. `/tickets/{id}` is the same page, opened on a
//! pickup ticket.
//!
//! keybroker reads the provider's discovery document itself, so the page's CSP can name the
//! token endpoint's origin (it may differ from the issuer's) and nothing else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use url::Url;

use crate::config::UiConfig;

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");

/// A discovery document is read again after this long.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// The page's settings and the provider's endpoints, once read.
pub struct Ui {
    config: UiConfig,
    redirect_uri: String,
    http: reqwest::Client,
    cache: std::sync::Mutex<Cache>,
    /// One fetch at a time; others serve what is cached meanwhile.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Cache {
    endpoints: Option<(Instant, Endpoints)>,
    failed_at: Option<Instant>,
}

/// After a failed fetch, the next one waits this long (page loads meanwhile get what is cached).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Endpoints {
    authorization_endpoint: Url,
    token_endpoint: Url,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
}

impl Ui {
    pub fn new(config: UiConfig, public_url: &Url, ca_certificates: &[reqwest::Certificate]) -> anyhow::Result<Self> {
        let http = crate::outbound::client_builder(ca_certificates).timeout(Duration::from_secs(3)).build()?;
        Ok(Self {
            config,
            redirect_uri: public_url.to_string(),
            http,
            cache: std::sync::Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The provider's endpoints, read from its discovery document (cached for an hour). `None`
    /// when it cannot be read: the page then reads it itself, and says so if it fails. A page
    /// load waits for at most one fetch, never for a provider that is down (a failure is
    /// retried after 30 s).
    async fn endpoints(&self) -> Option<Endpoints> {
        let cached = |fresh_only: bool| {
            let cache = self.cache.lock().ok()?;
            let (at, endpoints) = cache.endpoints.as_ref()?;
            (!fresh_only || at.elapsed() < DISCOVERY_TTL).then(|| endpoints.clone())
        };
        if let Some(fresh) = cached(true) {
            return Some(fresh);
        }
        let recently_failed =
            self.cache.lock().ok().and_then(|c| c.failed_at).is_some_and(|at| at.elapsed() < RETRY_AFTER_FAILURE);
        if recently_failed {
            return cached(false);
        }
        let Ok(_one_fetch) = self.fetching.try_lock() else { return cached(false) };
        let fetched = self.fetch().await;
        if let Ok(mut cache) = self.cache.lock() {
            match &fetched {
                Some(endpoints) => {
                    cache.endpoints = Some((Instant::now(), endpoints.clone()));
                    cache.failed_at = None;
                }
                None => cache.failed_at = Some(Instant::now()),
            }
        }
        fetched.or_else(|| cached(false))
    }

    async fn fetch(&self) -> Option<Endpoints> {
        let issuer = self.config.issuer.as_str().trim_end_matches('/');
        let url = format!("{issuer}/.well-known/openid-configuration");
        let fetched = async {
            let response = self.http.get(&url).send().await.ok()?.error_for_status().ok()?;
            let doc: Discovery = response.json().await.ok()?;
            // The document must be this issuer's, and its endpoints as secure as the issuer.
            if doc.issuer.trim_end_matches('/') != issuer {
                tracing::warn!(issuer, named = %doc.issuer, "the discovery document names another issuer");
                return None;
            }
            let endpoints = Endpoints {
                authorization_endpoint: Url::parse(&doc.authorization_endpoint).ok()?,
                token_endpoint: Url::parse(&doc.token_endpoint).ok()?,
            };
            let scheme = self.config.issuer.scheme();
            [&endpoints.authorization_endpoint, &endpoints.token_endpoint]
                .iter()
                .all(|u| u.scheme() == scheme || u.scheme() == "https")
                .then_some(endpoints)
        }
        .await;
        if fetched.is_none() {
            tracing::warn!(issuer = %self.config.issuer, "cannot read the identity provider's discovery document");
        }
        fetched
    }

    fn content_security_policy(&self, endpoints: Option<&Endpoints>) -> String {
        let mut connect = vec!["'self'".to_owned(), origin(&self.config.issuer)];
        if let Some(e) = endpoints {
            connect.push(origin(&e.token_endpoint));
        }
        connect.dedup();
        format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src {}; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            connect.join(" ")
        )
    }
}

fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The page's routes (none without `[ui]`).
pub fn router<S: Clone + Send + Sync + 'static>(ui: Arc<Ui>) -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/tickets/{id}", get(index))
        .route("/ui/config.json", get(config_json))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/ui/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .with_state(ui)
}

async fn index(State(ui): State<Arc<Ui>>) -> Response {
    let endpoints = ui.endpoints().await;
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML).into_response();
    let headers = response.headers_mut();
    if let Ok(csp) = HeaderValue::from_str(&ui.content_security_policy(endpoints.as_ref())) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    hardening(headers);
    response
}

async fn config_json(State(ui): State<Arc<Ui>>) -> Response {
    let endpoints = ui.endpoints().await;
    let body = json!({
        "title": "keybroker",
        "issuer": ui.config.issuer.as_str(),
        "client_id": ui.config.client_id,
        "scopes": ui.config.scopes.join(" "),
        "redirect_uri": ui.redirect_uri,
        "token": ui.config.token.as_str(),
        "authorization_endpoint": endpoints.as_ref().map(|e| e.authorization_endpoint.as_str()),
        "token_endpoint": endpoints.as_ref().map(|e| e.token_endpoint.as_str()),
    });
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    hardening(response.headers_mut());
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    hardening(response.headers_mut());
    response
}

fn hardening(headers: &mut axum::http::HeaderMap) {
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_has_no_inline_script_or_style_and_names_no_other_host() {
        for (name, text) in [("index.html", super::INDEX_HTML), ("app.js", super::APP_JS), ("app.css", super::APP_CSS)]
        {
            assert!(!text.contains("localStorage.") && !text.contains("document.cookie"), "{name}: no storage");
            assert!(!text.contains(".innerHTML") && !text.contains("insertAdjacentHTML"), "{name}: DOM from text");
            assert!(!text.contains("eval(") && !text.contains("new Function"), "{name}: no eval");
            // Every address the page uses is relative (keybroker) or comes from /ui/config.json.
            assert!(!text.contains("://"), "{name} names an absolute URL");
        }
        let html = super::INDEX_HTML;
        assert!(!html.contains("<style"), "no <style> block");
        assert!(!html.contains("style="), "no style attribute");
        let handler = html.split(char::is_whitespace).find(|w| {
            w.strip_prefix("on").is_some_and(|rest| {
                rest.split_once('=').is_some_and(|(n, _)| n.bytes().all(|b| b.is_ascii_lowercase()))
            })
        });
        assert_eq!(handler, None, "no inline event handlers");
        let inline_scripts = html.matches("<script").count() - html.matches("<script src=").count();
        assert_eq!(inline_scripts, 0, "every script is a file");
    }
}
