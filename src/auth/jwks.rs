//! A cached JWKS: fetched on first use, refetched when a token names an unknown `kid`, but never
//! more than once a minute, so a stream of forged `kid`s cannot turn keybroker into a load
//! generator against the identity provider.

use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use tokio::sync::Mutex;
use url::Url;

use crate::config::JwtAlgorithm;

/// The smallest interval between two fetches of the JWKS document.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// A JWKS older than this is refetched at the next use, so rotated-out keys stop working.
const MAX_AGE: Duration = Duration::from_secs(3600);

pub struct JwksCache {
    url: Url,
    http: reqwest::Client,
    /// A file holding a Bearer token for the JWKS URL, read at each fetch.
    bearer_token_file: Option<std::path::PathBuf>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    keys: Option<JwkSet>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    fetches: u64,
}

impl JwksCache {
    pub fn new(url: Url, http: reqwest::Client, bearer_token_file: Option<std::path::PathBuf>) -> Self {
        Self { url, http, bearer_token_file, state: Mutex::new(State::default()) }
    }

    /// How many times the JWKS document was requested (for tests and metrics).
    pub async fn fetch_count(&self) -> u64 {
        self.state.lock().await.fetches
    }

    /// Keys that may have signed a token with this `kid` and algorithm.
    pub async fn keys_for(&self, kid: Option<&str>, alg: JwtAlgorithm) -> Vec<DecodingKey> {
        let mut state = self.state.lock().await;
        let stale = state.fetched_at.is_none_or(|t| t.elapsed() > MAX_AGE);
        let unknown_kid = kid.is_some_and(|k| state.keys.as_ref().is_none_or(|set| set.find(k).is_none()));
        if stale || unknown_kid {
            self.refresh(&mut state).await;
        }
        let Some(set) = &state.keys else { return Vec::new() };
        set.keys
            .iter()
            .filter(|jwk| match kid {
                Some(k) => jwk.common.key_id.as_deref() == Some(k),
                None => true,
            })
            .filter(|jwk| jwk_matches(jwk, alg))
            .filter_map(|jwk| DecodingKey::from_jwk(jwk).ok())
            .collect()
    }

    async fn refresh(&self, state: &mut State) {
        if state.last_attempt.is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL) {
            return;
        }
        state.last_attempt = Some(Instant::now());
        state.fetches += 1;
        match self.fetch().await {
            Ok(set) => {
                tracing::info!(url = %self.url, keys = set.keys.len(), "fetched JWKS");
                state.keys = Some(set);
                state.fetched_at = Some(Instant::now());
            }
            // Keep the keys we had: an IdP blip must not log everybody out.
            Err(e) => tracing::warn!(url = %self.url, error = %e, "could not fetch JWKS"),
        }
    }

    /// Fetches the document and keeps the keys jsonwebtoken understands: identity providers
    /// publish encryption keys and algorithms it does not know next to the signing keys, and one
    /// such key must not make the whole set unreadable.
    async fn fetch(&self) -> Result<JwkSet, FetchError> {
        let mut request = self.http.get(self.url.clone()).timeout(Duration::from_secs(5));
        if let Some(path) = &self.bearer_token_file {
            // Read each time: projected service-account tokens rotate.
            let token = tokio::fs::read_to_string(path)
                .await
                .map_err(|source| FetchError::BearerToken { path: path.clone(), source })?;
            request = request.bearer_auth(token.trim());
        }
        // reqwest's errors without the URL, which may carry a token.
        let response = request.send().await.map_err(|e| FetchError::Http(e.without_url()))?;
        let status = response.status();
        if status.is_redirection() {
            let to = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| response.url().join(l).ok())
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_else(|| "an unnamed host".to_owned());
            return Err(FetchError::Redirected { status, to });
        }
        if !status.is_success() {
            return Err(FetchError::Status(status));
        }
        let document: serde_json::Value = response.json().await.map_err(|e| FetchError::Http(e.without_url()))?;
        let keys = document
            .get("keys")
            .and_then(serde_json::Value::as_array)
            .ok_or(FetchError::NoKeys)?
            .iter()
            .filter(|k| k.get("use").and_then(serde_json::Value::as_str).is_none_or(|u| u == "sig"))
            .filter_map(|k| serde_json::from_value(k.clone()).ok())
            .collect();
        Ok(JwkSet { keys })
    }
}

/// Why a JWKS fetch failed (logged; the keys fetched before stay in use).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("cannot read jwks_bearer_token_file {}: {source}", path.display())]
    BearerToken { path: std::path::PathBuf, source: std::io::Error },
    #[error("{0}")]
    Http(reqwest::Error),
    #[error("answered {status} redirecting to {to}; keybroker follows no redirects")]
    Redirected { status: reqwest::StatusCode, to: String },
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    #[error("the document has no \"keys\" array")]
    NoKeys,
}

/// A JWK fits when its declared algorithm (if any) and its key type agree with the token's.
fn jwk_matches(jwk: &jsonwebtoken::jwk::Jwk, alg: JwtAlgorithm) -> bool {
    let declared_ok = match jwk.common.key_algorithm {
        None => true,
        Some(KeyAlgorithm::RS256) => alg == JwtAlgorithm::Rs256,
        Some(KeyAlgorithm::ES256) => alg == JwtAlgorithm::Es256,
        Some(KeyAlgorithm::EdDSA) => alg == JwtAlgorithm::EdDsa,
        Some(_) => false,
    };
    let type_ok = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), JwtAlgorithm::Rs256) => true,
        (AlgorithmParameters::EllipticCurve(p), JwtAlgorithm::Es256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::OctetKeyPair(_), JwtAlgorithm::EdDsa) => true,
        _ => false,
    };
    declared_ok && type_ok
}
