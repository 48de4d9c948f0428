//! `keybroker dev`'s OpenID provider: discovery, an authorize page with a "sign in as" choice of
//! the demo people, a token endpoint that checks PKCE (S256 only), and a JWKS with a fresh
//! Ed25519 key per run. It exists so that `cargo run -- dev` lets a newcomer sign in to the page
//! with nothing else to set up; it is as strict as a real provider where the page depends on it
//! (registered client id and redirect URI, single-use codes that live 60 seconds, CORS on the
//! token endpoint for keybroker's origin only), and it has no passwords, so it must never be
//! trusted outside development.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use rand::RngCore;
use ring::signature::KeyPair;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// How long an authorization code may wait for its exchange.
const CODE_LIFETIME: Duration = Duration::from_secs(60);

/// Someone the provider can sign in as.
#[derive(Debug, Clone)]
pub struct DevUser {
    pub subject: String,
    pub name: String,
    pub email: String,
    pub groups: Vec<String>,
    /// Shown on the authorize page: what this person can do.
    pub role: String,
}

impl DevUser {
    pub fn new(subject: &str, name: &str, groups: &[&str], role: &str) -> Self {
        Self {
            subject: subject.to_owned(),
            name: name.to_owned(),
            email: subject.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            role: role.to_owned(),
        }
    }
}

/// The provider's settings: who it is, the one client it knows, and its people.
#[derive(Debug, Clone)]
pub struct DevIdpSettings {
    /// `http://127.0.0.1:<port>` (no trailing slash): the `iss` of its tokens.
    pub issuer: String,
    /// The access token's audience (keybroker's `auth.audience`).
    pub audience: String,
    pub client_id: String,
    /// The page's redirect URI (keybroker's `server.public_url`), the only one accepted.
    pub redirect_uri: String,
    pub users: Vec<DevUser>,
}

struct Code {
    user: DevUser,
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    scope: String,
    issued: Instant,
}

pub struct DevIdp {
    settings: DevIdpSettings,
    /// The `Origin` allowed to call the token endpoint: the redirect URI's.
    page_origin: String,
    signing: EncodingKey,
    public_x: String,
    kid: String,
    codes: Mutex<HashMap<String, Code>>,
}

impl DevIdp {
    pub fn new(settings: DevIdpSettings) -> anyhow::Result<Arc<Self>> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| anyhow::anyhow!("cannot generate the development provider's key"))?;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| anyhow::anyhow!("cannot read the development provider's key"))?;
        let public_x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        let kid = hex::encode(&Sha256::digest(pair.public_key().as_ref())[..8]);
        let page_origin = url::Url::parse(&settings.redirect_uri)?.origin().ascii_serialization();
        Ok(Arc::new(Self {
            settings,
            page_origin,
            signing: EncodingKey::from_ed_der(pkcs8.as_ref()),
            public_x,
            kid,
            codes: Mutex::new(HashMap::new()),
        }))
    }

    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    pub fn user(&self, subject: &str) -> Option<&DevUser> {
        self.settings.users.iter().find(|u| u.subject == subject)
    }

    /// An access token for `user` (what the page sends to keybroker; also the banner's tokens
    /// and the bot's, which a real provider would issue by the client-credentials grant).
    pub fn access_token(&self, user: &DevUser, ttl: Duration) -> anyhow::Result<String> {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": self.settings.issuer,
            "aud": self.settings.audience,
            "sub": user.subject,
            "name": user.name,
            "email": user.email,
            "groups": user.groups,
            "client_id": self.settings.client_id,
            "scope": "openid profile email",
            "iat": now,
            "nbf": now - 5,
            "exp": now + ttl.as_secs() as i64,
        });
        self.sign(&claims)
    }

    fn id_token(&self, user: &DevUser, nonce: Option<&str>, ttl: Duration) -> anyhow::Result<String> {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": self.settings.issuer,
            "aud": self.settings.client_id,
            "sub": user.subject,
            "name": user.name,
            "email": user.email,
            "groups": user.groups,
            "nonce": nonce,
            "auth_time": now,
            "iat": now,
            "exp": now + ttl.as_secs() as i64,
        });
        self.sign(&claims)
    }

    fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let mut header = Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.signing)?)
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize_page).post(authorize_submit))
            .route("/token", axum::routing::post(token).options(token_preflight))
            .with_state(self)
    }

    /// Serves on `listener` until the returned task is aborted.
    pub fn spawn(self: Arc<Self>, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let router = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "the development identity provider stopped");
            }
        })
    }
}

fn public_json(body: Value) -> Response {
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    response
}

async fn discovery(State(idp): State<Arc<DevIdp>>) -> Response {
    let issuer = &idp.settings.issuer;
    public_json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "jwks_uri": format!("{issuer}/jwks"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": ["openid", "profile", "email"],
        "claims_supported": ["sub", "name", "email", "groups"],
    }))
}

async fn jwks(State(idp): State<Arc<DevIdp>>) -> Response {
    public_json(json!({ "keys": [{
        "kty": "OKP", "crv": "Ed25519", "x": idp.public_x, "kid": idp.kid, "alg": "EdDSA", "use": "sig",
    }]}))
}

/// The authorize request's parameters, checked. `Err` for a request whose client or redirect
/// URI is wrong: it gets an error page, never a redirect (to a URI nobody registered).
struct AuthorizeRequest {
    redirect_uri: String,
    state: Option<String>,
    challenge: String,
    nonce: Option<String>,
    scope: String,
}

enum Refusal {
    /// Shown on the provider's own page.
    Page(String),
    /// Sent back to the (registered) redirect URI as `error=...`.
    Redirect { redirect_uri: String, state: Option<String>, error: &'static str, description: String },
}

fn parse_authorize(idp: &DevIdp, params: &HashMap<String, String>) -> Result<AuthorizeRequest, Refusal> {
    let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());
    if get("client_id") != Some(idp.settings.client_id.as_str()) {
        return Err(Refusal::Page("unknown client_id".to_owned()));
    }
    let redirect_uri = match get("redirect_uri") {
        Some(uri) if uri == idp.settings.redirect_uri => uri.to_owned(),
        _ => return Err(Refusal::Page("redirect_uri is not the registered one".to_owned())),
    };
    let state = get("state").map(str::to_owned);
    let refuse = |error, description: &str| Refusal::Redirect {
        redirect_uri: redirect_uri.clone(),
        state: state.clone(),
        error,
        description: description.to_owned(),
    };
    if get("response_type") != Some("code") {
        return Err(refuse("unsupported_response_type", "only response_type=code"));
    }
    let scope = get("scope").unwrap_or_default().to_owned();
    if !scope.split(' ').any(|s| s == "openid") {
        return Err(refuse("invalid_scope", "scope must include openid"));
    }
    if get("code_challenge_method") != Some("S256") {
        return Err(refuse("invalid_request", "PKCE is required, with code_challenge_method=S256"));
    }
    let challenge = match get("code_challenge") {
        Some(c) if c.len() == 43 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => c,
        _ => return Err(refuse("invalid_request", "code_challenge must be a base64url SHA-256")),
    };
    Ok(AuthorizeRequest {
        redirect_uri,
        state,
        challenge: challenge.to_owned(),
        nonce: get("nonce").map(str::to_owned),
        scope,
    })
}

fn form_params(bytes: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(bytes).into_owned().collect()
}

fn refusal_response(refusal: Refusal) -> Response {
    match refusal {
        Refusal::Page(message) => (StatusCode::BAD_REQUEST, page("Sign-in refused", &escape(&message))).into_response(),
        Refusal::Redirect { redirect_uri, state, error, description } => {
            let Ok(mut url) = url::Url::parse(&redirect_uri) else {
                return (StatusCode::BAD_REQUEST, page("Sign-in refused", "bad redirect_uri")).into_response();
            };
            url.query_pairs_mut().append_pair("error", error).append_pair("error_description", &description);
            if let Some(state) = state {
                url.query_pairs_mut().append_pair("state", &state);
            }
            Redirect::to(url.as_str()).into_response()
        }
    }
}

async fn authorize_page(State(idp): State<Arc<DevIdp>>, RawQuery(query): RawQuery) -> Response {
    let params = form_params(query.unwrap_or_default().as_bytes());
    if let Err(refusal) = parse_authorize(&idp, &params) {
        return refusal_response(refusal);
    }
    let hidden: String = [
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
    ]
    .iter()
    .filter_map(|k| params.get(*k).map(|v| format!(r#"<input type="hidden" name="{k}" value="{}">"#, escape(v))))
    .collect();
    let people: String = idp
        .settings
        .users
        .iter()
        .map(|u| {
            format!(
                r#"<li><button type="submit" name="login" value="{sub}" id="login-{id}"><strong>{name}</strong><br><small>{sub} · {role}</small></button></li>"#,
                sub = escape(&u.subject),
                id = escape(u.subject.split('@').next().unwrap_or_default()),
                name = escape(&u.name),
                role = escape(&u.role),
            )
        })
        .collect();
    let body = format!(
        r#"<p>This is <code>keybroker dev</code>'s identity provider: it has no passwords. Choose who to be.</p>
<form method="post" action="/authorize">{hidden}<ul class="people">{people}</ul></form>"#
    );
    let mut response = page("Sign in as", &body).into_response();
    let csp = format!(
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' {}; frame-ancestors 'none'; base-uri 'none'",
        idp.page_origin
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    response
}

async fn authorize_submit(State(idp): State<Arc<DevIdp>>, body: Bytes) -> Response {
    let params = form_params(&body);
    let request = match parse_authorize(&idp, &params) {
        Ok(r) => r,
        Err(refusal) => return refusal_response(refusal),
    };
    let Some(user) = params.get("login").and_then(|s| idp.user(s)).cloned() else {
        return (StatusCode::BAD_REQUEST, page("Sign-in refused", "no such person")).into_response();
    };
    let code = random_token();
    let mut url = match url::Url::parse(&request.redirect_uri) {
        Ok(u) => u,
        Err(_) => return (StatusCode::BAD_REQUEST, page("Sign-in refused", "bad redirect_uri")).into_response(),
    };
    url.query_pairs_mut().append_pair("code", &code);
    if let Some(state) = &request.state {
        url.query_pairs_mut().append_pair("state", state);
    }
    if let Ok(mut codes) = idp.codes.lock() {
        codes.retain(|_, c| c.issued.elapsed() < CODE_LIFETIME);
        codes.insert(
            code,
            Code {
                user,
                redirect_uri: request.redirect_uri,
                challenge: request.challenge,
                nonce: request.nonce,
                scope: request.scope,
                issued: Instant::now(),
            },
        );
    }
    Redirect::to(url.as_str()).into_response()
}

fn with_cors(idp: &DevIdp, headers: &HeaderMap, mut response: Response) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if origin == Some(idp.page_origin.as_str()) {
        if let Ok(v) = HeaderValue::from_str(&idp.page_origin) {
            response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
    }
    response.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
    response
}

async fn token_preflight(State(idp): State<Arc<DevIdp>>, headers: HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("content-type"));
    with_cors(&idp, &headers, response)
}

async fn token(State(idp): State<Arc<DevIdp>>, headers: HeaderMap, body: Bytes) -> Response {
    let response = match exchange(&idp, &form_params(&body)) {
        Ok(tokens) => {
            let mut r = axum::Json(tokens).into_response();
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err((error, description)) => {
            (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": error, "error_description": description })))
                .into_response()
        }
    };
    with_cors(&idp, &headers, response)
}

/// The authorization-code grant (RFC 6749 §4.1.3) with PKCE (RFC 7636 §4.6).
fn exchange(idp: &DevIdp, params: &HashMap<String, String>) -> Result<Value, (&'static str, String)> {
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
    if get("grant_type") != "authorization_code" {
        return Err(("unsupported_grant_type", "only authorization_code".to_owned()));
    }
    if get("client_id") != idp.settings.client_id {
        return Err(("invalid_client", "unknown client_id".to_owned()));
    }
    // Single use: the code is gone whatever happens next.
    let code = idp.codes.lock().ok().and_then(|mut codes| codes.remove(get("code")));
    let Some(code) = code.filter(|c| c.issued.elapsed() < CODE_LIFETIME) else {
        return Err(("invalid_grant", "the code is unknown, used or expired".to_owned()));
    };
    if get("redirect_uri") != code.redirect_uri {
        return Err(("invalid_grant", "redirect_uri differs from the authorize request's".to_owned()));
    }
    let verifier = get("code_verifier");
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    if !well_formed || URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != code.challenge {
        return Err(("invalid_grant", "code_verifier does not match the code_challenge".to_owned()));
    }
    let ttl = Duration::from_secs(3600);
    let failed = |e: anyhow::Error| ("server_error", e.to_string());
    Ok(json!({
        "access_token": idp.access_token(&code.user, ttl).map_err(failed)?,
        "id_token": idp.id_token(&code.user, code.nonce.as_deref(), ttl).map_err(failed)?,
        "token_type": "Bearer",
        "expires_in": ttl.as_secs(),
        "scope": code.scope,
    }))
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · keybroker dev</title><style>
body{{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem;color:#1b1f24}}
.people{{list-style:none;padding:0}} .people li{{margin:.5rem 0}}
.people button{{width:100%;text-align:left;padding:.75rem 1rem;border:1px solid #8c959f;border-radius:.5rem;background:#f6f8fa;font:inherit;cursor:pointer}}
.people button:focus-visible,.people button:hover{{outline:3px solid #0969da;outline-offset:2px}}
</style></head><body><h1>{title}</h1>{body}</body></html>"#
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idp() -> Arc<DevIdp> {
        DevIdp::new(DevIdpSettings {
            issuer: "http://127.0.0.1:1".to_owned(),
            audience: "keybroker".to_owned(),
            client_id: "page".to_owned(),
            redirect_uri: "http://127.0.0.1:2/".to_owned(),
            users: vec![DevUser::new("alice@example.com", "Alice", &["payments"], "requester")],
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn code_for(idp: &DevIdp, verifier: &str) -> String {
        let code = random_token();
        let user = idp.settings.users[0].clone();
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let entry = Code {
            user,
            redirect_uri: "http://127.0.0.1:2/".to_owned(),
            challenge,
            nonce: None,
            scope: "openid".to_owned(),
            issued: Instant::now(),
        };
        idp.codes.lock().unwrap_or_else(|e| e.into_inner()).insert(code.clone(), entry);
        code
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn the_token_endpoint_checks_pkce_and_uses_a_code_once() {
        let idp = idp();
        let verifier = "v".repeat(43);
        let code = code_for(&idp, &verifier);
        let mut request = params(&[
            ("grant_type", "authorization_code"),
            ("client_id", "page"),
            ("redirect_uri", "http://127.0.0.1:2/"),
            ("code", &code),
            ("code_verifier", &"w".repeat(43)),
        ]);
        assert_eq!(exchange(&idp, &request).err().map(|e| e.0), Some("invalid_grant"), "wrong verifier");
        // The failed attempt used the code up.
        request.insert("code_verifier".to_owned(), verifier.clone());
        assert!(exchange(&idp, &request).is_err());
        let code = code_for(&idp, &verifier);
        request.insert("code".to_owned(), code);
        let tokens = exchange(&idp, &request).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(tokens["access_token"].as_str().is_some_and(|t| t.split('.').count() == 3));
        assert!(exchange(&idp, &request).is_err(), "a code is single-use");
    }

    #[test]
    fn authorize_refuses_other_clients_and_redirect_uris_on_its_own_page() {
        let idp = idp();
        let ok = params(&[
            ("client_id", "page"),
            ("redirect_uri", "http://127.0.0.1:2/"),
            ("response_type", "code"),
            ("scope", "openid"),
            ("code_challenge", &"a".repeat(43)),
            ("code_challenge_method", "S256"),
        ]);
        assert!(parse_authorize(&idp, &ok).is_ok());
        let mut other = ok.clone();
        other.insert("redirect_uri".to_owned(), "https://evil.example/".to_owned());
        assert!(matches!(parse_authorize(&idp, &other), Err(Refusal::Page(_))));
        let mut plain = ok.clone();
        plain.insert("code_challenge_method".to_owned(), "plain".to_owned());
        assert!(matches!(parse_authorize(&idp, &plain), Err(Refusal::Redirect { .. })));
    }
}
