//! Caller authentication: Bearer JWTs verified with pinned algorithms, and the principal they
//! describe (subject, name, teams, roles).

mod jwks;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::config::{AuthConfig, ConfigError, JwtAlgorithm};
pub use jwks::JwksCache;

/// Roles derived from the caller's teams. Everyone is a requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Requester,
    Auditor,
    Admin,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`: the requester recorded on keys and audit events.
    pub subject: String,
    pub display_name: String,
    pub teams: BTreeSet<String>,
    pub roles: BTreeSet<Role>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    pub fn is_auditor(&self) -> bool {
        self.roles.contains(&Role::Auditor)
    }

    /// Auditors and admins see every key record and the audit trail.
    pub fn sees_everything(&self) -> bool {
        self.is_admin() || self.is_auditor()
    }

    #[cfg(test)]
    pub fn for_tests(subject: &str, teams: &[&str], admin: bool, auditor: bool) -> Self {
        let mut roles = BTreeSet::from([Role::Requester]);
        if admin {
            roles.insert(Role::Admin);
        }
        if auditor {
            roles.insert(Role::Auditor);
        }
        Self {
            subject: subject.to_owned(),
            display_name: subject.to_owned(),
            teams: teams.iter().map(|t| (*t).to_owned()).collect(),
            roles,
        }
    }
}

/// Why a token was refused. Every variant answers 401; the message tells the caller what to fix
/// and never echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an Authorization: Bearer token is required")]
    Missing,
    #[error("the Authorization header is not a Bearer token")]
    NotBearer,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm {0} is not accepted")]
    AlgorithmNotAllowed(String),
    #[error("the token was signed with a key keybroker does not know")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued by another issuer")]
    WrongIssuer,
    #[error("the token is meant for another audience")]
    WrongAudience,
    #[error("the token lacks the claim `{0}`")]
    MissingClaim(String),
    #[error("the token's `{0}` claim is not a number of seconds")]
    BadTimeClaim(&'static str),
}

/// The most clock skew `auth.leeway` may forgive. A large leeway quietly extends every token's
/// life, and one beyond the Unix epoch's age underflows jsonwebtoken's `now - leeway`: a panic,
/// hence a 500, on every request.
const MAX_LEEWAY: Duration = Duration::from_secs(5 * 60);

/// Subjects a caller may not have: keybroker's own actors in the audit trail.
const RESERVED_SUBJECTS: [&str; 2] = ["keybroker", "anonymous"];

/// Verifies Bearer tokens according to the `[auth]` configuration.
pub struct Authenticator {
    issuer: String,
    audience: String,
    algorithms: BTreeSet<JwtAlgorithm>,
    hs256: Option<DecodingKey>,
    pem_keys: Vec<(JwtAlgorithm, DecodingKey)>,
    jwks: Option<Arc<JwksCache>>,
    teams_claim: String,
    admin_teams: BTreeSet<String>,
    auditor_teams: BTreeSet<String>,
    leeway_secs: u64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Reads the keys of `config`; the JWKS client, if any, follows no redirect and trusts
    /// `auth.ca_file`.
    pub fn new(config: &AuthConfig) -> Result<Self, ConfigError> {
        if config.leeway > MAX_LEEWAY {
            return Err(ConfigError::new(format!(
                "auth.leeway: {} is more clock skew than keybroker forgives; use at most {}",
                humantime::format_duration(config.leeway),
                humantime::format_duration(MAX_LEEWAY)
            )));
        }
        let hs256 = config.hs256_secret.as_ref().map(|s| DecodingKey::from_secret(s.expose_secret().as_bytes()));
        let mut pem_keys = Vec::new();
        for (path, pem) in &config.public_keys {
            let key = [
                (JwtAlgorithm::Rs256, DecodingKey::from_rsa_pem(pem)),
                (JwtAlgorithm::Es256, DecodingKey::from_ec_pem(pem)),
                (JwtAlgorithm::EdDsa, DecodingKey::from_ed_pem(pem)),
            ]
            .into_iter()
            .find_map(|(alg, key)| key.ok().map(|k| (alg, k)))
            .ok_or_else(|| {
                ConfigError::new(format!(
                    "auth.public_key_files: {} is not an RSA, EC (P-256) or Ed25519 public key in PEM form",
                    path.display()
                ))
            })?;
            if !config.algorithms.contains(&key.0) {
                return Err(ConfigError::new(format!(
                    "auth.public_key_files: {} is a {} key, but {} is not in auth.algorithms",
                    path.display(),
                    key.0.name(),
                    key.0.name()
                )));
            }
            pem_keys.push(key);
        }
        let jwks = match &config.jwks_url {
            Some(url) => {
                let http = crate::outbound::client_builder(&config.ca_certificates)
                    .build()
                    .map_err(|e| ConfigError::new(format!("auth: cannot build the JWKS client: {e}")))?;
                Some(Arc::new(JwksCache::new(url.clone(), http)))
            }
            None => None,
        };
        Ok(Self {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            algorithms: config.algorithms.clone(),
            hs256,
            pem_keys,
            jwks,
            teams_claim: config.teams_claim.clone(),
            admin_teams: config.admin_teams.clone(),
            auditor_teams: config.auditor_teams.clone(),
            leeway_secs: config.leeway.as_secs(),
        })
    }

    /// Verifies the value of an `Authorization` header and returns the principal.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = bearer_token(header)?;
        let jwt_header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let alg = pinned(jwt_header.alg)
            .filter(|a| self.algorithms.contains(a))
            .ok_or_else(|| AuthError::AlgorithmNotAllowed(format!("{:?}", jwt_header.alg)))?;

        let mut validation = Validation::new(jwt_header.alg);
        validation.algorithms = vec![jwt_header.alg];
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;

        let claims = match alg {
            JwtAlgorithm::Hs256 => {
                let key = self.hs256.as_ref().ok_or(AuthError::UnknownKey)?;
                decode(token, key, &validation)?
            }
            _ => self.decode_asymmetric(token, alg, jwt_header.kid.as_deref(), &validation).await?,
        };
        time_claims_are_numbers(&claims)?;
        self.principal(&claims)
    }

    async fn decode_asymmetric(
        &self,
        token: &str,
        alg: JwtAlgorithm,
        kid: Option<&str>,
        validation: &Validation,
    ) -> Result<serde_json::Map<String, Value>, AuthError> {
        let mut last = AuthError::UnknownKey;
        for (key_alg, key) in &self.pem_keys {
            if *key_alg == alg {
                match decode(token, key, validation) {
                    Err(AuthError::BadSignature) => last = AuthError::BadSignature,
                    other => return other,
                }
            }
        }
        if let Some(jwks) = &self.jwks {
            for key in jwks.keys_for(kid, alg).await {
                match decode(token, &key, validation) {
                    Err(AuthError::BadSignature) => last = AuthError::BadSignature,
                    other => return other,
                }
            }
        }
        Err(last)
    }

    fn principal(&self, claims: &serde_json::Map<String, Value>) -> Result<Principal, AuthError> {
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control))
            // Names keybroker uses for itself in the audit trail.
            .filter(|s| !RESERVED_SUBJECTS.contains(s))
            .ok_or_else(|| AuthError::MissingClaim("sub".to_owned()))?
            .to_owned();
        let display_name = ["name", "preferred_username", "email"]
            .iter()
            .find_map(|c| claims.get(*c).and_then(Value::as_str))
            .filter(|n| !n.chars().any(char::is_control))
            .map(|n| n.chars().take(200).collect())
            .unwrap_or_else(|| subject.clone());
        let teams = teams_from(claims, &self.teams_claim);
        let mut roles = BTreeSet::from([Role::Requester]);
        if teams.iter().any(|t| self.admin_teams.contains(t)) {
            roles.insert(Role::Admin);
        }
        if teams.iter().any(|t| self.auditor_teams.contains(t)) {
            roles.insert(Role::Auditor);
        }
        Ok(Principal { subject, display_name, teams, roles })
    }
}

/// jsonwebtoken before 10.3 (CVE-2026-25537) skips the check of an `exp`, `nbf` or `iat` that is
/// present but not a number, as if the claim were absent: a signed token with
/// `"nbf": "2036-01-01"` would be valid today. keybroker refuses such tokens itself, whatever
/// the library's version.
fn time_claims_are_numbers(claims: &serde_json::Map<String, Value>) -> Result<(), AuthError> {
    for name in ["exp", "nbf", "iat"] {
        if claims.get(name).is_some_and(|v| !v.is_number()) {
            return Err(AuthError::BadTimeClaim(name));
        }
    }
    Ok(())
}

fn bearer_token(header: &str) -> Result<&str, AuthError> {
    let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::NotBearer);
    }
    let token = token.trim();
    if token.is_empty() || token.len() > 16 * 1024 {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// Only algorithms keybroker knows how to pin; `none` cannot even be parsed by jsonwebtoken.
fn pinned(alg: Algorithm) -> Option<JwtAlgorithm> {
    match alg {
        Algorithm::HS256 => Some(JwtAlgorithm::Hs256),
        Algorithm::RS256 => Some(JwtAlgorithm::Rs256),
        Algorithm::ES256 => Some(JwtAlgorithm::Es256),
        Algorithm::EdDSA => Some(JwtAlgorithm::EdDsa),
        _ => None,
    }
}

fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<serde_json::Map<String, Value>, AuthError> {
    use jsonwebtoken::errors::ErrorKind;
    jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, validation).map(|data| data.claims).map_err(
        |e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
            ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed("of this key".to_owned()),
            _ => AuthError::Malformed,
        },
    )
}

/// Teams from the configured claim: an array of strings, or one string. A dotted name such as
/// `realm_access.roles` walks into nested objects (Keycloak puts roles there).
fn teams_from(claims: &serde_json::Map<String, Value>, claim: &str) -> BTreeSet<String> {
    let mut parts = claim.split('.');
    let mut value = parts.next().and_then(|first| claims.get(first));
    for part in parts {
        value = value.and_then(|v| v.get(part));
    }
    let clean = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)).then(|| s.to_owned())
    };
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).filter_map(clean).collect(),
        Some(Value::String(one)) => clean(one).into_iter().collect(),
        _ => BTreeSet::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn teams_come_from_arrays_strings_and_nested_claims() {
        let claims = json!({"groups": ["a", " b ", 3, ""], "one": "solo", "realm_access": {"roles": ["x"]}});
        let claims = claims.as_object().unwrap();
        assert_eq!(teams_from(claims, "groups"), BTreeSet::from(["a".to_owned(), "b".to_owned()]));
        assert_eq!(teams_from(claims, "one"), BTreeSet::from(["solo".to_owned()]));
        assert_eq!(teams_from(claims, "realm_access.roles"), BTreeSet::from(["x".to_owned()]));
        assert!(teams_from(claims, "missing").is_empty());
    }

    fn auth_config(leeway: Duration) -> AuthConfig {
        AuthConfig {
            issuer: "https://issuer.example/".to_owned(),
            audience: "keybroker".to_owned(),
            algorithms: BTreeSet::from([JwtAlgorithm::Hs256]),
            jwks_url: None,
            public_keys: Vec::new(),
            hs256_secret: Some("0123456789abcdef0123456789abcdef".to_owned().into()),
            teams_claim: "groups".to_owned(),
            admin_teams: BTreeSet::new(),
            auditor_teams: BTreeSet::new(),
            leeway,
            ca_certificates: Vec::new(),
        }
    }

    #[test]
    fn a_leeway_beyond_five_minutes_is_refused_at_start() {
        assert!(Authenticator::new(&auth_config(MAX_LEEWAY)).is_ok());
        let err = Authenticator::new(&auth_config(MAX_LEEWAY + Duration::from_secs(1))).unwrap_err().to_string();
        assert!(err.starts_with("auth.leeway: "), "{err}");
        // Large enough to underflow `now - leeway` if it were let through.
        let err = Authenticator::new(&auth_config(Duration::from_secs(100 * 365 * 86_400)));
        assert!(err.is_err());
    }

    #[test]
    fn time_claims_must_be_numbers_when_present() {
        let claims = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(time_claims_are_numbers(&claims(json!({"exp": 1, "nbf": 2.5, "iat": 3}))), Ok(()));
        assert_eq!(time_claims_are_numbers(&claims(json!({"exp": 1}))), Ok(()));
        assert_eq!(
            time_claims_are_numbers(&claims(json!({"exp": 1, "nbf": "2036-01-01T00:00:00Z"}))),
            Err(AuthError::BadTimeClaim("nbf"))
        );
        assert_eq!(time_claims_are_numbers(&claims(json!({"exp": "1"}))), Err(AuthError::BadTimeClaim("exp")));
        assert_eq!(
            time_claims_are_numbers(&claims(json!({"exp": 1, "iat": null}))),
            Err(AuthError::BadTimeClaim("iat"))
        );
    }

    #[test]
    fn only_bearer_headers_are_read() {
        assert_eq!(bearer_token("Bearer abc").unwrap(), "abc");
        assert_eq!(bearer_token("bearer  abc ").unwrap(), "abc");
        assert_eq!(bearer_token("Basic abc"), Err(AuthError::NotBearer));
        assert_eq!(bearer_token("Bearer"), Err(AuthError::NotBearer));
    }
}
