//! The Octopus client: one privileged credential, user resolution by username, and the API-key
//! calls keybroker makes (octopus-api.md is the reference for every shape and status used here).

mod model;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;
use url::Url;

use crate::config::{OctopusConfig, OctopusCredential};
use crate::metrics::Metrics;
use model::{
    ApiKeyCreatedResource, ApiKeyResource, AuthenticationResource, CreateApiKey, ErrorBody, LoginCommand, Page,
    RootResource, UserResource,
};

pub use crate::domain::keys::looks_like_api_key;

/// The first 8 characters of a key (`API-ABCD`), which Octopus shows as its hint.
pub fn key_hint(secret: &str) -> String {
    secret.chars().take(8).collect()
}

/// An Octopus user as keybroker needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OctopusUser {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub is_active: bool,
    pub is_service: bool,
}

/// A key as listed by Octopus (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: String,
    pub user_id: Option<String>,
    pub purpose: String,
    pub created: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub hint: Option<String>,
    /// `LastUsedTimeStamp`: when the key last authenticated.
    pub last_used: Option<DateTime<Utc>>,
    /// `IsLastUsedTimestampKnown`: whether `last_used` can be believed (a `None` then means
    /// "never used").
    pub last_used_known: bool,
}

/// A freshly created key, with the secret Octopus shows this once.
pub struct CreatedKey {
    pub id: String,
    pub secret: SecretString,
    pub expires: Option<DateTime<Utc>>,
    pub created: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey").field("id", &self.id).field("expires", &self.expires).finish_non_exhaustive()
    }
}

/// The server's API-key settings from `GET /api/authentication` (absent before 2025.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerKeySettings {
    pub default_expiry_days: Option<u32>,
    pub max_expiry_days: Option<u32>,
    pub user_api_keys_enabled: Option<bool>,
}

/// What `GET /api` says about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: Option<String>,
    /// `Octopus-RateLimit-Policy`, when the server rate-limits.
    pub rate_limit_policy: Option<String>,
    /// `Octopus-RateLimit` (`r=<tokens left>;t=<seconds to full>`).
    pub rate_limit: Option<String>,
}

/// What keybroker found out about its own key's expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKeyExpiry {
    /// The credential is a login session: no key.
    Session,
    /// Found among its user's keys; `None`: it never expires.
    Found(Option<DateTime<Utc>>),
    /// None of the `listed` keys of its user has a hint the credential starts with.
    NotFound { listed: usize },
}

/// Whether a listed key's hint (its first 7 or 8 characters, `API-` included) is a prefix of
/// `secret`. Servers before November 2020 keep no hint; a hint shorter than `API-` and one
/// character identifies nothing.
pub fn hint_matches(hint: Option<&str>, secret: &str) -> bool {
    hint.map(|h| h.trim_end_matches(['•', '*', '.'])).is_some_and(|h| h.len() >= 5 && secret.starts_with(h))
}

/// What the outcome of a revocation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    Deleted,
    /// Octopus answered 404: the key was already gone, which is what we wanted.
    AlreadyGone,
}

/// An Octopus failure, sorted by whose fault it is (SPEC "Octopus integration").
#[derive(Debug, Clone, thiserror::Error)]
pub enum OctopusError {
    /// A 4xx that the request itself caused: shown to the caller (422).
    #[error("Octopus refused the request: {message}")]
    Rejected { status: u16, message: String },
    #[error("Octopus says: {message}")]
    NotFound { message: String },
    /// 401/403: keybroker's own credential is missing, expired or lacks a permission (503).
    #[error("keybroker's Octopus credential was refused ({status}): {message}")]
    Credential { status: u16, message: String },
    #[error("Octopus is rate limiting keybroker")]
    RateLimited { retry_after: Option<Duration> },
    #[error("Octopus did not answer in time")]
    Timeout,
    /// A 3xx: keybroker follows no redirect, so the credential never reaches another host. Only
    /// the `Location`'s host is kept (its path or query could carry anything).
    #[error(
        "Octopus answered {status} redirecting to {}; keybroker follows no redirects: \
         set octopus.url to the server's real address",
        location_host.as_deref().unwrap_or("no Location")
    )]
    Redirected { status: u16, location_host: Option<String> },
    /// Connection failures, 5xx, and answers keybroker cannot read (502).
    #[error("Octopus failed: {detail}")]
    Unavailable { detail: String },
}

impl OctopusError {
    /// For a key creation: whether Octopus may have made the key even though we got no answer.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Self::Timeout | Self::Unavailable { .. })
    }
}

/// Username lookups found more than one account.
#[derive(Debug, Clone, thiserror::Error)]
#[error("more than one Octopus user is named `{0}`")]
pub struct AmbiguousUser(pub String);

#[derive(Clone)]
struct Session {
    cookie: String,
    csrf: String,
}

tokio::task_local! {
    /// Set around background jobs: their calls also pass the background limiter, so that drift,
    /// offboarding and readiness pace themselves and never take issuance's share.
    pub static BACKGROUND: ();
}

/// The longest keybroker waits inside a call for Octopus's `Retry-After`; a longer one is
/// answered at once (a 503 that says when to retry) rather than holding a caller's request.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

/// How long a call in a caller's request waits for keybroker's own outbound rate limit.
const MAX_PACE_WAIT: Duration = Duration::from_secs(2);

/// After consecutive failed logins keybroker waits 2, 10, 20, 40 and then 60 minutes before the
/// next attempt: Octopus locks an account for 10 minutes after 9 failures from one address
/// (octopus-api.md §2), and several replicas behind one address share that count.
fn login_backoff_after(failures: u32) -> Duration {
    let minutes = match failures {
        0 => 0,
        1 => 2,
        n => (10u64 << (n - 2).min(3)).min(60),
    };
    Duration::from_secs(minutes * 60)
}

/// The Octopus client. Cheap to share behind an `Arc`.
pub struct OctopusClient {
    http: reqwest::Client,
    base: Url,
    credential: OctopusCredential,
    session: Mutex<Option<Session>>,
    /// Consecutive failed logins and when the last one was, so that keybroker never locks its
    /// own account out.
    failed_logins: std::sync::Mutex<(u32, Option<std::time::Instant>)>,
    users: RwLock<HashMap<String, OctopusUser>>,
    retries: u32,
    metrics: Arc<Metrics>,
    /// `octopus.timeout`: how long one call may take.
    timeout: Duration,
    /// keybroker's own pace towards Octopus (`octopus.max_requests_per_minute`), and the half
    /// of it background jobs may use.
    pace: Option<governor::DefaultDirectRateLimiter>,
    background_pace: Option<governor::DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for OctopusClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OctopusClient").field("base", &self.base.as_str()).finish_non_exhaustive()
    }
}

/// Page size for user and key listings; Octopus's default is 30 and it documents no maximum.
const PAGE_SIZE: usize = 100;
/// A bound on paging, so a misbehaving server cannot keep us looping.
const MAX_PAGES: usize = 1000;

impl OctopusClient {
    pub fn new(config: &OctopusConfig) -> Result<Arc<Self>, reqwest::Error> {
        Self::with_metrics(config, Metrics::new())
    }

    /// Like [`OctopusClient::new`], recording call latency and outcomes in `metrics`.
    pub fn with_metrics(config: &OctopusConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, reqwest::Error> {
        // No redirects: a 3xx from a proxy or a moved server would otherwise carry the API key,
        // the login body or the session cookie to whatever host it names.
        let http = crate::outbound::client_builder(&config.ca_certificates)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .timeout(config.timeout)
            .user_agent(concat!("keybroker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut base = config.url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let quota = |per_minute: u32| {
            std::num::NonZeroU32::new(per_minute).map(|n| governor::RateLimiter::direct(governor::Quota::per_minute(n)))
        };
        Ok(Arc::new(Self {
            http,
            base,
            credential: config.credential.clone(),
            session: Mutex::new(None),
            failed_logins: std::sync::Mutex::new((0, None)),
            users: RwLock::new(HashMap::new()),
            retries: 3,
            metrics,
            timeout: config.timeout,
            pace: quota(config.max_requests_per_minute),
            background_pace: quota(config.max_requests_per_minute.div_ceil(2)),
        }))
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// `GET /api/authentication`: the server's default and maximum key lifetimes.
    pub async fn key_settings(&self) -> Result<ServerKeySettings, OctopusError> {
        let res: AuthenticationResource = self.get_json("get_authentication", "api/authentication", &[]).await?;
        // 0 (or absent) means "not set", never "no lifetime allowed" (octopus-api.md §8).
        Ok(ServerKeySettings {
            default_expiry_days: res.api_key_default_expiry_days.filter(|d| *d > 0),
            max_expiry_days: res.api_key_max_expiry_days.filter(|d| *d > 0),
            user_api_keys_enabled: res.user_api_keys_enabled,
        })
    }

    /// `GET /api`: the server's version, and its rate-limit policy when it advertises one
    /// (`Octopus-RateLimit-Policy: l=200;rpm=600`, 2026.3+).
    pub async fn server_info(&self) -> Result<ServerInfo, OctopusError> {
        let response = self.send_idempotent("get_root", Method::GET, "api", &[]).await?;
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let rate_limit_policy = header("Octopus-RateLimit-Policy");
        let rate_limit = header("Octopus-RateLimit");
        let root: RootResource = read_json(response).await?;
        Ok(ServerInfo { version: root.version, rate_limit_policy, rate_limit })
    }

    /// `GET /api/users/me`: the cheapest check that the credential works.
    pub async fn current_user(&self) -> Result<OctopusUser, OctopusError> {
        let me: UserResource = self.get_json("get_current_user", "api/users/me", &[]).await?;
        Ok(user_from(me))
    }

    /// The broker credential's own expiry, from its user's keys. A key's hint is matched as a
    /// prefix of the credential (servers show 7 or 8 characters; octopus-api.md §5.5). When
    /// several keys match, the earliest expiry wins (the safe side).
    pub async fn broker_key_expiry(&self) -> Result<BrokerKeyExpiry, OctopusError> {
        let OctopusCredential::ApiKey(key) = &self.credential else { return Ok(BrokerKeyExpiry::Session) };
        let me = self.current_user().await?;
        let keys = self.list_api_keys(&me.id, None).await?;
        let matching: Vec<&ApiKeyInfo> =
            keys.iter().filter(|k| hint_matches(k.hint.as_deref(), key.expose_secret())).collect();
        if matching.is_empty() {
            return Ok(BrokerKeyExpiry::NotFound { listed: keys.len() });
        }
        // A matching key that never expires only counts when no matching key does expire.
        Ok(BrokerKeyExpiry::Found(matching.iter().filter_map(|k| k.expires).min()))
    }

    /// Resolves a username to its user, from the cache when possible. Octopus's `filter` is a
    /// substring match on username, display name and e-mail, so every page is read and only an
    /// exact username match counts (case-insensitive, as Octopus treats usernames, but an exact
    /// case match wins).
    pub async fn find_user(&self, username: &str) -> Result<Option<OctopusUser>, OctopusError> {
        if let Some(user) = self.cached_user(username) {
            return Ok(Some(user));
        }
        let found = self.lookup_user(username).await?;
        if let Some(user) = &found {
            if let Ok(mut cache) = self.users.write() {
                cache.insert(username.to_owned(), user.clone());
            }
        }
        Ok(found)
    }

    /// Looks a username up in Octopus again. The cache entry is replaced by what Octopus
    /// answered, removed only when Octopus says the user does not exist, and kept on errors.
    pub async fn refresh_user(&self, username: &str) -> Result<Option<OctopusUser>, OctopusError> {
        let found = self.lookup_user(username).await?;
        if let Ok(mut cache) = self.users.write() {
            match &found {
                Some(user) => cache.insert(username.to_owned(), user.clone()),
                None => cache.remove(username),
            };
        }
        Ok(found)
    }

    fn cached_user(&self, username: &str) -> Option<OctopusUser> {
        self.users.read().ok().and_then(|cache| cache.get(username).cloned())
    }

    /// Forgets a cached user (after Octopus said it no longer exists).
    pub fn forget_user(&self, username: &str) {
        if let Ok(mut cache) = self.users.write() {
            cache.remove(username);
        }
    }

    async fn lookup_user(&self, username: &str) -> Result<Option<OctopusUser>, OctopusError> {
        let mut exact = None;
        let mut folded = Vec::new();
        let lower = username.to_lowercase();
        let mut skip = 0usize;
        for _ in 0..MAX_PAGES {
            let page: Page<UserResource> = self
                .get_json(
                    "find_user",
                    "api/users",
                    &[("filter", username.to_owned()), ("skip", skip.to_string()), ("take", PAGE_SIZE.to_string())],
                )
                .await?;
            let count = page.items.len();
            let more = page.has_next();
            for user in page.items {
                if user.username == username {
                    exact = Some(user_from(user));
                } else if user.username.to_lowercase() == lower {
                    folded.push(user_from(user));
                }
            }
            skip += count;
            let total_reached = page.total_results.is_some_and(|t| skip as u64 >= t);
            if exact.is_some() || count == 0 || !more || total_reached {
                break;
            }
        }
        if exact.is_some() {
            return Ok(exact);
        }
        match folded.len() {
            0 => Ok(None),
            1 => Ok(folded.pop()),
            _ => Err(OctopusError::Rejected { status: 409, message: AmbiguousUser(username.to_owned()).to_string() }),
        }
    }

    /// `POST /api/users/{id}/apikeys` with an explicit `Expires`. Never retried: a retry after a
    /// lost answer could make a second key.
    pub async fn create_api_key(
        &self,
        user_id: &str,
        purpose: &str,
        expires: DateTime<Utc>,
    ) -> Result<CreatedKey, OctopusError> {
        self.create_api_key_within(user_id, purpose, expires, None).await
    }

    /// [`OctopusClient::create_api_key`] for a caller that must have its answer by `ends_at`:
    /// a rate-limited create is sent again only if it can still finish by then.
    pub async fn create_api_key_within(
        &self,
        user_id: &str,
        purpose: &str,
        expires: DateTime<Utc>,
        ends_at: Option<tokio::time::Instant>,
    ) -> Result<CreatedKey, OctopusError> {
        let path = format!("api/users/{}/apikeys", seg(user_id));
        let body = CreateApiKey { purpose, expires: format_octopus_time(expires), user_id };
        // Never a blind retry, with one exception: Octopus does not process a request it rate
        // limits (octopus-api.md §10), so a 429 made no key and is sent once more after its
        // `Retry-After`, when that is short.
        let response = match self.send_once("create_api_key", Method::POST, &path, &[], Some(&body)).await {
            Err(OctopusError::RateLimited { retry_after })
                if retry_after.unwrap_or(Duration::from_secs(1)) <= MAX_RETRY_WAIT
                    && ends_at.is_none_or(|end| {
                        tokio::time::Instant::now() + retry_after.unwrap_or(Duration::from_secs(1)) + self.timeout < end
                    }) =>
            {
                tokio::time::sleep(retry_after.unwrap_or(Duration::from_secs(1))).await;
                self.send_once("create_api_key", Method::POST, &path, &[], Some(&body)).await?
            }
            other => other?,
        };
        let created: ApiKeyCreatedResource = read_json(response).await?;
        if !looks_like_api_key(&created.api_key) {
            return Err(OctopusError::Unavailable {
                detail: format!("Octopus created key {} but its secret has an unexpected form", created.id),
            });
        }
        Ok(CreatedKey {
            id: created.id,
            secret: SecretString::from(created.api_key),
            expires: created.expires.map(|t| t.with_timezone(&Utc)),
            created: created.created.map(|t| t.with_timezone(&Utc)),
        })
    }

    /// Every key of a user, optionally filtered by `partialPurpose` (the server may ignore it, so
    /// callers check the purpose themselves too).
    pub async fn list_api_keys(
        &self,
        user_id: &str,
        partial_purpose: Option<&str>,
    ) -> Result<Vec<ApiKeyInfo>, OctopusError> {
        let path = format!("api/users/{}/apikeys", seg(user_id));
        let mut out = Vec::new();
        let mut skip = 0usize;
        for _ in 0..MAX_PAGES {
            let mut query = vec![("skip", skip.to_string()), ("take", PAGE_SIZE.to_string())];
            if let Some(p) = partial_purpose {
                query.push(("partialPurpose", p.to_owned()));
            }
            let page: Page<ApiKeyResource> = self.get_json("list_api_keys", &path, &query).await?;
            let count = page.items.len();
            let more = page.has_next();
            out.extend(page.items.into_iter().map(key_from));
            skip += count;
            if count == 0 || !more {
                break;
            }
        }
        Ok(out)
    }

    /// `GET /api/users/{id}/apikeys?take=1`: whether keybroker's credential may manage that
    /// account's keys, the cheapest probe of Octopus's privilege rule short of a create.
    pub async fn probe_keys(&self, user_id: &str) -> Result<(), OctopusError> {
        let path = format!("api/users/{}/apikeys", seg(user_id));
        let _: Page<ApiKeyResource> = self.get_json("probe_api_keys", &path, &[("take", "1".to_owned())]).await?;
        Ok(())
    }

    /// `GET /api/users/{id}/apikeys/{keyId}`; `None` when Octopus answers 404.
    pub async fn get_api_key(&self, user_id: &str, key_id: &str) -> Result<Option<ApiKeyInfo>, OctopusError> {
        let path = format!("api/users/{}/apikeys/{}", seg(user_id), seg(key_id));
        match self.get_json::<ApiKeyResource>("get_api_key", &path, &[]).await {
            Ok(key) => Ok(Some(key_from(key))),
            Err(OctopusError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `DELETE /api/users/{id}/apikeys/{keyId}`. A 404 means "already gone" only when it is
    /// Octopus's own error body (any other 404 is [`OctopusError::Unavailable`]) and a `GET` of
    /// the key confirms it: a revocation never fails open on a proxy's or a wrong path's 404.
    pub async fn delete_api_key(&self, user_id: &str, key_id: &str) -> Result<Revoked, OctopusError> {
        let path = format!("api/users/{}/apikeys/{}", seg(user_id), seg(key_id));
        match self.send_idempotent("delete_api_key", Method::DELETE, &path, &[]).await {
            Ok(_) => Ok(Revoked::Deleted),
            Err(OctopusError::NotFound { .. }) => match self.get_api_key(user_id, key_id).await? {
                None => Ok(Revoked::AlreadyGone),
                Some(_) => Err(OctopusError::Unavailable {
                    detail: format!("Octopus answered 404 to deleting key {key_id} but still lists it"),
                }),
            },
            Err(e) => Err(e),
        }
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, OctopusError> {
        let response = self.send_idempotent(op, Method::GET, path, query).await?;
        read_json(response).await
    }

    /// GET and DELETE: retried with exponential backoff and jitter on 429, 5xx and connection
    /// failures.
    async fn send_idempotent(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Response, OctopusError> {
        let mut attempt = 0;
        loop {
            let result = self.send_once::<()>(op, method.clone(), path, query, None).await;
            let retry_after = match &result {
                Err(OctopusError::RateLimited { retry_after }) => Some(retry_after.unwrap_or(Duration::from_secs(1))),
                Err(OctopusError::Unavailable { .. } | OctopusError::Timeout) => Some(Duration::ZERO),
                _ => None,
            };
            match retry_after {
                // Never sooner than Octopus's Retry-After; one too long for a caller's request
                // is reported instead of waited for.
                Some(hint) if attempt < self.retries && hint <= MAX_RETRY_WAIT => {
                    attempt += 1;
                    let backoff = Duration::from_millis(100 * 2u64.pow(attempt));
                    let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..100));
                    let wait = hint.max((backoff + jitter).min(MAX_RETRY_WAIT));
                    tracing::debug!(%method, path, attempt, ?wait, "retrying Octopus call");
                    tokio::time::sleep(wait).await;
                }
                _ => return result,
            }
        }
    }

    /// One request with the credential; with the login flow, a lapsed session (401) is renewed
    /// once and the request repeated, which is safe because Octopus did not process it.
    async fn send_once<B: serde::Serialize>(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<Response, OctopusError> {
        let url = self.base.join(path).map_err(|e| OctopusError::Unavailable { detail: e.to_string() })?;
        let mut relogged = false;
        loop {
            self.pace().await?;
            let mut request = self.http.request(method.clone(), url.clone()).query(query);
            if let Some(body) = body {
                request = request.json(body);
            }
            let request = self.authenticate(request, relogged).await?;
            let started = std::time::Instant::now();
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) => {
                    let err = transport_error(e);
                    self.metrics.observe_octopus(op, outcome_label(&err), started.elapsed());
                    return Err(err);
                }
            };
            let status = response.status();
            tracing::debug!(op, %method, status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "octopus call");
            if status.is_success() {
                self.metrics.observe_octopus(op, "ok", started.elapsed());
                return Ok(response);
            }
            if status.is_redirection() {
                let err = redirected(&response);
                self.metrics.observe_octopus(op, outcome_label(&err), started.elapsed());
                return Err(err);
            }
            if status == StatusCode::UNAUTHORIZED
                && !relogged
                && matches!(self.credential, OctopusCredential::Login { .. })
            {
                self.metrics.observe_octopus(op, "session_expired", started.elapsed());
                relogged = true;
                *self.session.lock().await = None;
                continue;
            }
            let err = error_from(response).await;
            self.metrics.observe_octopus(op, outcome_label(&err), started.elapsed());
            return Err(err);
        }
    }

    /// Waits for a slot of keybroker's own rate limit (and, in a background job, of the
    /// background half of it).
    async fn pace(&self) -> Result<(), OctopusError> {
        let background = BACKGROUND.try_with(|()| ()).is_ok();
        let limiters = [self.background_pace.as_ref().filter(|_| background), self.pace.as_ref()];
        for limiter in limiters.into_iter().flatten() {
            while let Err(not_until) = limiter.check() {
                let wait =
                    not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
                self.metrics.octopus_paced.inc();
                // A call in a caller's request waits at most MAX_PACE_WAIT, then fails as rate
                // limited (503 with the wait) instead of outlasting the request.
                if !background && wait > MAX_PACE_WAIT {
                    return Err(OctopusError::RateLimited { retry_after: Some(wait) });
                }
                tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
            }
        }
        Ok(())
    }

    async fn authenticate(&self, request: RequestBuilder, fresh: bool) -> Result<RequestBuilder, OctopusError> {
        match &self.credential {
            OctopusCredential::ApiKey(key) => Ok(request.header("X-Octopus-ApiKey", key.expose_secret())),
            OctopusCredential::Login { username, password } => {
                let mut session = self.session.lock().await;
                if session.is_none() || fresh {
                    *session = Some(self.login(username, password).await?);
                }
                let Some(s) = session.as_ref() else {
                    return Err(OctopusError::Unavailable { detail: "no Octopus session".to_owned() });
                };
                Ok(request.header(reqwest::header::COOKIE, &s.cookie).header("X-Octopus-Csrf-Token", &s.csrf))
            }
        }
    }

    /// The login flow (octopus-api.md §2): the cookies' names carry a suffix, so they are found
    /// by prefix, and the CSRF cookie's value goes back as a header on every request.
    async fn login(&self, username: &str, password: &SecretString) -> Result<Session, OctopusError> {
        if let Some((failures, until)) = self.login_backoff() {
            return Err(OctopusError::Credential {
                status: 401,
                message: format!(
                    "keybroker's last {failures} logins to Octopus failed; it tries again in {} s, not sooner \
                     (Octopus locks an account for 10 minutes after 9 failed logins): check octopus.username and \
                     octopus.password_file",
                    until.as_secs().max(1)
                ),
            });
        }
        let result = self.try_login(username, password).await;
        if let Ok(mut failed) = self.failed_logins.lock() {
            match &result {
                Ok(_) => *failed = (0, None),
                Err(OctopusError::Credential { .. }) => *failed = (failed.0 + 1, Some(std::time::Instant::now())),
                Err(_) => {}
            }
        }
        result
    }

    /// The consecutive failures and how long until keybroker may log in again, while it waits.
    fn login_backoff(&self) -> Option<(u32, Duration)> {
        let failed = self.failed_logins.lock().ok()?;
        let (failures, last) = (failed.0, failed.1?);
        let wait = login_backoff_after(failures).saturating_sub(last.elapsed());
        (!wait.is_zero()).then_some((failures, wait))
    }

    async fn try_login(&self, username: &str, password: &SecretString) -> Result<Session, OctopusError> {
        // Not paced: this runs under the session mutex, where a wait would hold up every
        // other call. Logins are rare (a session lasts 20 minutes).
        let url = self.base.join("api/users/login").map_err(|e| OctopusError::Unavailable { detail: e.to_string() })?;
        let body = LoginCommand { username, password: password.expose_secret(), remember_me: false };
        let response = self.http.post(url).json(&body).send().await.map_err(transport_error)?;
        if response.status().is_redirection() {
            let err = redirected(&response);
            return Err(err);
        }
        if !response.status().is_success() {
            return Err(match error_from(response).await {
                OctopusError::Rejected { status, message } => OctopusError::Credential { status, message },
                other => other,
            });
        }
        let mut identification = None;
        let mut csrf = None;
        for value in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let Ok(text) = value.to_str() else { continue };
            let pair = text.split(';').next().unwrap_or_default().trim();
            let Some((name, value)) = pair.split_once('=') else { continue };
            if name.starts_with("OctopusIdentificationToken") {
                identification = Some(pair.to_owned());
            } else if name.starts_with("Octopus-Csrf-Token") {
                // The cookie goes back as it came; the header carries its value URL-decoded
                // (octopus-api.md §2: the value is URL-encoded).
                let decoded = percent_decode(value);
                csrf = Some((pair.to_owned(), decoded));
            }
        }
        match (identification, csrf) {
            (Some(id_cookie), Some((csrf_cookie, csrf_value))) => {
                tracing::info!("logged in to Octopus");
                Ok(Session { cookie: format!("{id_cookie}; {csrf_cookie}"), csrf: csrf_value })
            }
            _ => Err(OctopusError::Unavailable {
                detail: "Octopus accepted the login but set no session cookies".to_owned(),
            }),
        }
    }
}

fn outcome_label(e: &OctopusError) -> &'static str {
    match e {
        OctopusError::Rejected { .. } => "rejected",
        OctopusError::NotFound { .. } => "not_found",
        OctopusError::Credential { .. } => "credential",
        OctopusError::RateLimited { .. } => "rate_limited",
        OctopusError::Timeout => "timeout",
        OctopusError::Redirected { .. } => "redirected",
        OctopusError::Unavailable { .. } => "unavailable",
    }
}

/// The error for a 3xx answer, naming only the host of its `Location`.
fn redirected(response: &Response) -> OctopusError {
    let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok());
    // A relative Location stays on Octopus's own host.
    let location_host = location.map(|l| match response.url().join(l) {
        Ok(url) => url.host_str().map_or_else(|| "an address without a host".to_owned(), str::to_owned),
        Err(_) => "an unreadable Location".to_owned(),
    });
    OctopusError::Redirected { status: response.status().as_u16(), location_host }
}

/// `%XX` sequences decoded (a cookie value is not form-encoded: `+` and `&` stay as they are);
/// a value that does not decode to UTF-8 is kept as it came.
fn percent_decode(value: &str) -> String {
    percent_encoding::percent_decode_str(value).decode_utf8().map_or_else(|_| value.to_owned(), |v| v.into_owned())
}

/// Octopus's time format: `2026-11-23T12:00:25.000+00:00` (octopus-api.md §1).
pub fn format_octopus_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3f+00:00").to_string()
}

/// Percent-encodes one path segment; ids are opaque (octopus-api.md §1).
fn seg(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>().replace('+', "%20")
}

fn user_from(u: UserResource) -> OctopusUser {
    OctopusUser {
        display_name: u.display_name.unwrap_or_else(|| u.username.clone()),
        id: u.id,
        username: u.username,
        is_active: u.is_active.unwrap_or(true),
        is_service: u.is_service.unwrap_or(false),
    }
}

fn key_from(k: ApiKeyResource) -> ApiKeyInfo {
    ApiKeyInfo {
        id: k.id,
        user_id: k.user_id,
        purpose: k.purpose.unwrap_or_default(),
        created: k.created.map(|t| t.with_timezone(&Utc)),
        expires: k.expires.map(|t| t.with_timezone(&Utc)),
        hint: k.api_key.hint,
        last_used: k.last_used.map(|t| t.with_timezone(&Utc)),
        last_used_known: k.is_last_used_timestamp_known == Some(true),
    }
}

fn transport_error(e: reqwest::Error) -> OctopusError {
    if e.is_timeout() {
        OctopusError::Timeout
    } else {
        // reqwest's message names the URL but never headers, so no credential leaks here.
        OctopusError::Unavailable { detail: e.without_url().to_string() }
    }
}

async fn read_json<T: DeserializeOwned>(response: Response) -> Result<T, OctopusError> {
    let bytes = response.bytes().await.map_err(transport_error)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| OctopusError::Unavailable { detail: format!("unexpected answer from Octopus: {e}") })
}

async fn error_from(response: Response) -> OctopusError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = response.bytes().await.unwrap_or_default();
    let message = match octopus_error_message(&bytes) {
        Some(message) => message,
        None => {
            // Not Octopus's error JSON: an HTML page from a proxy or an ingress, an empty body, a
            // wrong base path. Its text stays in the log, clipped; callers and the audit trail
            // get a fixed sentence.
            let clipped: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
            tracing::warn!(status = status.as_u16(), body = %clipped, "Octopus answered with a non-JSON body");
            let summary = format!("Octopus answered {} with a non-JSON body", status.as_u16());
            return match status.as_u16() {
                401 | 403 => OctopusError::Credential { status: status.as_u16(), message: summary },
                429 => OctopusError::RateLimited { retry_after },
                // A 404 that is not Octopus's cannot say a key is gone.
                _ => OctopusError::Unavailable { detail: summary },
            };
        }
    };
    match status.as_u16() {
        401 | 403 => OctopusError::Credential { status: status.as_u16(), message },
        404 => OctopusError::NotFound { message },
        429 => OctopusError::RateLimited { retry_after },
        s @ 400..=499 => OctopusError::Rejected { status: s, message },
        s => OctopusError::Unavailable { detail: format!("HTTP {s}: {message}") },
    }
}

/// The message of Octopus's own error body (`{"ErrorMessage": "...", "Errors": [...]}`,
/// octopus-api.md §4), or `None` when the body is anything else.
fn octopus_error_message(bytes: &[u8]) -> Option<String> {
    let body: ErrorBody = serde_json::from_slice(bytes).ok()?;
    let mut message = body.error_message?.chars().take(500).collect::<String>();
    if let Some(errors) = body.errors.filter(|e| !e.is_empty()) {
        let details = errors.join("; ");
        if !message.contains(&details) {
            message = format!("{message} {details}").trim().chars().take(1000).collect();
        }
    }
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_recognised_by_shape() {
        assert!(looks_like_api_key("API-JRIXL3O2GQBKWJE2FI1TKRFTGU"));
        assert!(!looks_like_api_key("API-lowercase0000000000000"));
        assert!(!looks_like_api_key("APIX-JRIXL3O2GQBKWJE2FI1TKRFTGU"));
        assert!(!looks_like_api_key("API-"));
    }

    #[test]
    fn octopus_times_have_milliseconds_and_an_offset() {
        let t = DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(format_octopus_time(t), "2026-11-30T10:00:00.000+00:00");
    }

    #[test]
    fn only_octopus_error_json_counts_as_octopus_speaking() {
        assert_eq!(
            octopus_error_message(br#"{"ErrorMessage":"The resource 'x' was not found."}"#).as_deref(),
            Some("The resource 'x' was not found.")
        );
        assert_eq!(
            octopus_error_message(br#"{"ErrorMessage":"Model validation failed.","Errors":["a","b"]}"#).as_deref(),
            Some("Model validation failed. a; b")
        );
        for foreign in [&b"<html><body>404 Not Found</body></html>"[..], b"", b"{}", br#"{"message":"nope"}"#, b"[]"] {
            assert_eq!(octopus_error_message(foreign), None, "{}", String::from_utf8_lossy(foreign));
        }
    }

    #[test]
    fn hints_of_seven_or_eight_characters_match_as_prefixes() {
        let secret = "API-FSXABCDEFGHIJKLMNOPQRSTUV";
        assert!(hint_matches(Some("API-FSXA"), secret));
        assert!(hint_matches(Some("API-FSX"), secret));
        assert!(hint_matches(Some("API-FSX•••••••"), secret));
        assert!(!hint_matches(Some("API-FSY"), secret));
        assert!(!hint_matches(Some("API-"), secret));
        assert!(!hint_matches(Some(""), secret));
        assert!(!hint_matches(None, secret));
    }

    #[test]
    fn logins_back_off_further_after_each_failure() {
        let minutes: Vec<u64> = (0..7).map(|n| login_backoff_after(n).as_secs() / 60).collect();
        assert_eq!(minutes, [0, 2, 10, 20, 40, 60, 60]);
    }

    #[test]
    fn csrf_cookie_values_are_percent_decoded_only() {
        assert_eq!(percent_decode("a%2Bb%2F%3D"), "a+b/=");
        assert_eq!(percent_decode("a+b&c=d"), "a+b&c=d");
        assert_eq!(percent_decode("%FF%FE"), "%FF%FE", "not UTF-8: kept as it came");
    }

    #[test]
    fn the_hint_is_the_first_eight_characters() {
        assert_eq!(key_hint("API-ABCDEFGHIJ"), "API-ABCD");
    }
}
