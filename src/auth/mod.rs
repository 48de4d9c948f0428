//! Caller authentication: Bearer JWTs from one of several trusted issuers, verified with pinned
//! algorithms, and the principal they describe (issuer, subject, name, teams, roles).
//!
//! The token's `iss` selects the issuer entry; its keys, audiences and algorithms verify the
//! token. A principal's teams are those of the issuer's `teams_claim` plus those of every
//! binding of that issuer whose subject and claim globs match, so CI and Kubernetes tokens,
//! which carry no `groups`, get teams too. Issuer entries may pin the subjects and teams their
//! tokens may claim (bots), and tokens verified with an HS256 secret carry admin or auditor
//! teams only when their issuer is `privileged`. A token that passed is taken on trust again
//! for at most a minute, and never past its `exp` and the leeway (`cache`).

mod cache;
mod claims;
pub mod glob;
mod jwks;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::config::{AuthConfig, BindingConfig, ConfigError, IssuerConfig, JwtAlgorithm};
pub use claims::{Mismatch, check_binding, claim, claim_strings, teams_from};
pub use jwks::JwksCache;

pub use crate::domain::principal::{Principal, Role};

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
    #[error("the token's issuer (`iss`) is not one keybroker trusts")]
    UnknownIssuer,
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
    #[error("issuer `{0}` does not allow this token's subject")]
    SubjectNotAllowed(String),
    #[error("issuer `{issuer}` does not allow the team {team}")]
    TeamNotAllowed { issuer: String, team: String },
    #[error("tokens of issuer `{0}` may not carry admin or auditor teams (its entry is not privileged)")]
    PrivilegedTeams(String),
}

/// The most clock skew `auth.leeway` may forgive. A large leeway quietly extends every token's
/// life, and one beyond the Unix epoch's age underflows jsonwebtoken's `now - leeway`: a panic,
/// hence a 500, on every request.
const MAX_LEEWAY: Duration = Duration::from_secs(5 * 60);

/// Subjects a caller may not have: keybroker's own actors in the audit trail.
const RESERVED_SUBJECTS: [&str; 2] = ["keybroker", "anonymous"];

/// One trusted issuer with its keys.
struct Verifier {
    config: IssuerConfig,
    hs256: Option<DecodingKey>,
    pem_keys: Vec<(JwtAlgorithm, DecodingKey)>,
    jwks: Option<Arc<JwksCache>>,
}

/// Verifies Bearer tokens according to the `[auth]` configuration.
pub struct Authenticator {
    verifiers: Vec<Verifier>,
    bindings: Vec<BindingConfig>,
    admin_teams: BTreeSet<String>,
    auditor_teams: BTreeSet<String>,
    leeway_secs: u64,
    verified: cache::VerifiedTokens,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let issuers: Vec<&str> = self.verifiers.iter().map(|v| v.config.name.as_str()).collect();
        f.debug_struct("Authenticator").field("issuers", &issuers).finish_non_exhaustive()
    }
}

/// What an admin's `POST /v1/admin/explain` shows: how a set of claims would be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub principal: Option<Principal>,
    /// Why a token with these claims would be refused, if it would.
    pub refused: Option<String>,
    pub bindings: Vec<BindingOutcome>,
}

/// One binding of the issuer, and whether it matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingOutcome {
    /// Its position among `[[bindings]]`.
    pub index: usize,
    pub teams: BTreeSet<String>,
    /// `None` when it matched; otherwise the first entry that failed.
    pub mismatch: Option<Mismatch>,
}

impl Authenticator {
    /// Reads the keys of every issuer; JWKS clients follow no redirect and trust their `ca_file`.
    pub fn new(config: &AuthConfig) -> Result<Self, ConfigError> {
        if config.leeway > MAX_LEEWAY {
            return Err(ConfigError::new(format!(
                "auth.leeway: {} is more clock skew than keybroker forgives; use at most {}",
                humantime::format_duration(config.leeway),
                humantime::format_duration(MAX_LEEWAY)
            )));
        }
        let verifiers = config.issuers.iter().map(verifier).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            verifiers,
            bindings: config.bindings.clone(),
            admin_teams: config.admin_teams.clone(),
            auditor_teams: config.auditor_teams.clone(),
            leeway_secs: config.leeway.as_secs(),
            verified: cache::VerifiedTokens::default(),
        })
    }

    /// Verifies the value of an `Authorization` header and returns the principal.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = bearer_token(header)?;
        // The clock jsonwebtoken's own checks of `exp` and `nbf` read.
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(principal) = self.verified.get(token, now) {
            return Ok(principal);
        }
        let jwt_header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        // The unverified `iss` only chooses which keys to verify with; the verification below
        // checks it again.
        let iss = unverified_issuer(token)?;
        let verifier = self.verifiers.iter().find(|v| v.config.issuer == iss).ok_or(AuthError::UnknownIssuer)?;
        let alg = pinned(jwt_header.alg)
            .filter(|a| verifier.config.algorithms.contains(a))
            .ok_or_else(|| AuthError::AlgorithmNotAllowed(format!("{:?}", jwt_header.alg)))?;

        let mut validation = Validation::new(jwt_header.alg);
        validation.algorithms = vec![jwt_header.alg];
        validation.set_issuer(&[&verifier.config.issuer]);
        validation.set_audience(&verifier.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;

        let claims = match alg {
            JwtAlgorithm::Hs256 => {
                let key = verifier.hs256.as_ref().ok_or(AuthError::UnknownKey)?;
                decode(token, key, &validation)?
            }
            _ => verifier.decode_asymmetric(token, alg, jwt_header.kid.as_deref(), &validation).await?,
        };
        time_claims_are_numbers(&claims)?;
        let principal = self.principal(verifier, alg == JwtAlgorithm::Hs256, &claims)?;
        // `exp` is required and was checked; usable while verification would still pass.
        if let Some(exp) = claims.get("exp").and_then(Value::as_u64) {
            self.verified.insert(token, &principal, now, exp.saturating_add(self.leeway_secs));
        }
        Ok(principal)
    }

    /// How a token of issuer `issuer` (a name) with `claims` would be read, without verifying
    /// anything: for operators writing bindings. `None` when no issuer has that name.
    pub fn explain(&self, issuer: &str, claims: &serde_json::Map<String, Value>) -> Option<Explanation> {
        let verifier = self.verifiers.iter().find(|v| v.config.name == issuer)?;
        // As strict as the strictest token the issuer may sign.
        let hs256 = verifier.config.algorithms.contains(&JwtAlgorithm::Hs256);
        let bindings = self.outcomes(verifier, claims);
        let (principal, refused) = match self.principal(verifier, hs256, claims) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Some(Explanation { principal, refused, bindings })
    }

    /// The names of the configured issuers.
    pub fn issuer_names(&self) -> impl Iterator<Item = &str> {
        self.verifiers.iter().map(|v| v.config.name.as_str())
    }

    fn is_privileged_team(&self, team: &str) -> bool {
        self.admin_teams.contains(team) || self.auditor_teams.contains(team)
    }

    fn outcomes(&self, verifier: &Verifier, claims: &serde_json::Map<String, Value>) -> Vec<BindingOutcome> {
        // The subject as the principal gets it (trimmed), so bindings and pins see the same text.
        let subject = claims.get("sub").and_then(Value::as_str).map(str::trim).unwrap_or_default();
        self.bindings
            .iter()
            .enumerate()
            .filter(|(_, b)| b.issuer == verifier.config.name)
            .map(|(index, b)| BindingOutcome {
                index,
                teams: b.teams.clone(),
                mismatch: check_binding(b, subject, claims).err(),
            })
            .collect()
    }

    fn principal(
        &self,
        verifier: &Verifier,
        hs256: bool,
        claims: &serde_json::Map<String, Value>,
    ) -> Result<Principal, AuthError> {
        let issuer = &verifier.config;
        let raw_subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control))
            // Names keybroker uses for itself in the audit trail.
            .filter(|s| !RESERVED_SUBJECTS.contains(s))
            // A default subject that looks like another issuer's principal would own its keys.
            .filter(|s| !issuer.is_default() || !self.issuer_names().any(|n| s.starts_with(&format!("{n}:"))))
            .ok_or_else(|| AuthError::MissingClaim("sub".to_owned()))?;
        if !issuer.subjects.is_empty() && !issuer.subjects.iter().any(|p| glob::matches(p, raw_subject)) {
            return Err(AuthError::SubjectNotAllowed(issuer.name.clone()));
        }
        let mut teams = match &issuer.teams_claim {
            Some(name) => teams_from(claims, name, issuer.teams_separator.as_deref()),
            None => BTreeSet::new(),
        };
        // Whoever controls a claim (a Kubernetes namespace, a CI variable) must not name
        // themselves admin: claimed admin or auditor teams need a privileged issuer. Bindings
        // that grant them say `privileged = true` themselves.
        if !issuer.privileged && teams.iter().any(|t| self.is_privileged_team(t)) {
            return Err(AuthError::PrivilegedTeams(issuer.name.clone()));
        }
        if let Some(allowed) = &issuer.allowed_teams {
            if let Some(team) = teams.iter().find(|t| !allowed.contains(*t)) {
                let shown: String = team.chars().take(64).collect();
                return Err(AuthError::TeamNotAllowed { issuer: issuer.name.clone(), team: format!("{shown:?}") });
            }
        }
        for outcome in self.outcomes(verifier, claims) {
            if outcome.mismatch.is_none() {
                teams.extend(outcome.teams);
            }
        }
        // A shared HS256 secret may mint anything: its tokens never carry admin or auditor teams
        // unless the issuer entry is privileged, whatever a binding grants.
        if hs256 && !issuer.privileged && teams.iter().any(|t| self.is_privileged_team(t)) {
            return Err(AuthError::PrivilegedTeams(issuer.name.clone()));
        }
        let display_name = ["name", "preferred_username", "email"]
            .iter()
            .find_map(|c| claims.get(*c).and_then(Value::as_str))
            .filter(|n| !n.chars().any(char::is_control))
            .map(|n| n.chars().take(200).collect())
            .unwrap_or_else(|| raw_subject.to_owned());
        let mut roles = BTreeSet::from([Role::Requester]);
        if teams.iter().any(|t| self.admin_teams.contains(t)) {
            roles.insert(Role::Admin);
        }
        if teams.iter().any(|t| self.auditor_teams.contains(t)) {
            roles.insert(Role::Auditor);
        }
        let subject =
            if issuer.is_default() { raw_subject.to_owned() } else { format!("{}:{raw_subject}", issuer.name) };
        Ok(Principal { subject, issuer: issuer.name.clone(), display_name, teams, roles })
    }
}

fn verifier(config: &IssuerConfig) -> Result<Verifier, ConfigError> {
    let key = if config.is_default() { "auth".to_owned() } else { format!("auth.issuers `{}`", config.name) };
    let hs256 = config.hs256_secret.as_ref().map(|s| DecodingKey::from_secret(s.expose_secret().as_bytes()));
    let mut pem_keys = Vec::new();
    for (path, pem) in &config.public_keys {
        let found = [
            (JwtAlgorithm::Rs256, DecodingKey::from_rsa_pem(pem)),
            (JwtAlgorithm::Es256, DecodingKey::from_ec_pem(pem)),
            (JwtAlgorithm::EdDsa, DecodingKey::from_ed_pem(pem)),
        ]
        .into_iter()
        .find_map(|(alg, key)| key.ok().map(|k| (alg, k)))
        .ok_or_else(|| {
            ConfigError::new(format!(
                "{key}.public_key_files: {} is not an RSA, EC (P-256) or Ed25519 public key in PEM form",
                path.display()
            ))
        })?;
        if !config.algorithms.contains(&found.0) {
            return Err(ConfigError::new(format!(
                "{key}.public_key_files: {} is a {} key, but {} is not in {key}.algorithms",
                path.display(),
                found.0.name(),
                found.0.name()
            )));
        }
        pem_keys.push(found);
    }
    let jwks = match &config.jwks_url {
        Some(url) => {
            let http = crate::outbound::client_builder(&config.ca_certificates)
                .build()
                .map_err(|e| ConfigError::new(format!("{key}: cannot build the JWKS client: {e}")))?;
            Some(Arc::new(JwksCache::new(url.clone(), http, config.jwks_bearer_token_file.clone())))
        }
        None => None,
    };
    Ok(Verifier { config: config.clone(), hs256, pem_keys, jwks })
}

impl Verifier {
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
}

/// The `iss` of a token, read before its signature is checked (to pick the keys that check it).
fn unverified_issuer(token: &str) -> Result<String, AuthError> {
    let payload = token.split('.').nth(1).ok_or(AuthError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    let claims: serde_json::Map<String, Value> = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    match claims.get("iss") {
        Some(Value::String(iss)) => Ok(iss.clone()),
        Some(_) => Err(AuthError::Malformed),
        None => Err(AuthError::MissingClaim("iss".to_owned())),
    }
}

/// jsonwebtoken before 10.3 (CVE-2026-25537) skips the check of an `exp`, `nbf` or `iat` it
/// cannot read as a whole number of seconds, as if the claim were absent: a signed token with
/// `"nbf": "2036-01-01"`, `"nbf": 1e20` or `"nbf": -1` would be valid today. keybroker accepts
/// these claims only as non-negative integers that fit in 64 bits, whatever the library's
/// version.
fn time_claims_are_numbers(claims: &serde_json::Map<String, Value>) -> Result<(), AuthError> {
    for name in ["exp", "nbf", "iat"] {
        if claims.get(name).is_some_and(|v| v.as_u64().is_none()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn issuer(name: &str, privileged: bool) -> IssuerConfig {
        IssuerConfig {
            name: name.to_owned(),
            issuer: format!("https://{name}.example/"),
            audiences: vec!["keybroker".to_owned()],
            algorithms: BTreeSet::from([JwtAlgorithm::Hs256]),
            jwks_url: None,
            public_keys: Vec::new(),
            hs256_secret: Some("0123456789abcdef0123456789abcdef".to_owned().into()),
            teams_claim: Some("groups".to_owned()),
            teams_separator: None,
            ca_certificates: Vec::new(),
            jwks_bearer_token_file: None,
            subjects: Vec::new(),
            allowed_teams: None,
            privileged,
        }
    }

    fn auth_config(leeway: Duration) -> AuthConfig {
        AuthConfig {
            issuers: vec![issuer("default", true), issuer("bots", false)],
            bindings: Vec::new(),
            admin_teams: BTreeSet::from(["admins".to_owned()]),
            auditor_teams: BTreeSet::new(),
            delegate_teams: BTreeSet::new(),
            leeway,
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
    fn principals_of_other_issuers_are_qualified_by_the_issuer_name() {
        let auth = Authenticator::new(&auth_config(MAX_LEEWAY)).unwrap();
        let claims = json!({"sub": "deploy-bot", "groups": ["payments"]});
        let claims = claims.as_object().unwrap();
        let default = auth.principal(&auth.verifiers[0], true, claims).unwrap();
        assert_eq!((default.subject.as_str(), default.issuer.as_str()), ("deploy-bot", "default"));
        let bot = auth.principal(&auth.verifiers[1], true, claims).unwrap();
        assert_eq!((bot.subject.as_str(), bot.issuer.as_str()), ("bots:deploy-bot", "bots"));
        // A default subject may not pose as another issuer's principal.
        let posing = json!({"sub": "bots:deploy-bot"});
        assert_eq!(
            auth.principal(&auth.verifiers[0], true, posing.as_object().unwrap()),
            Err(AuthError::MissingClaim("sub".to_owned()))
        );
    }

    #[test]
    fn hs256_tokens_of_unprivileged_issuers_never_carry_admin_teams() {
        let auth = Authenticator::new(&auth_config(MAX_LEEWAY)).unwrap();
        let claims = json!({"sub": "bot", "groups": ["payments", "admins"]});
        let claims = claims.as_object().unwrap();
        assert_eq!(
            auth.principal(&auth.verifiers[1], true, claims),
            Err(AuthError::PrivilegedTeams("bots".to_owned()))
        );
        // Nor do the claims of any unprivileged issuer (a namespace named like the admin team).
        assert_eq!(
            auth.principal(&auth.verifiers[1], false, claims),
            Err(AuthError::PrivilegedTeams("bots".to_owned()))
        );
        assert!(auth.principal(&auth.verifiers[0], true, claims).unwrap().is_admin(), "a privileged issuer may");
    }

    #[test]
    fn pinned_subjects_and_teams_bound_a_bot() {
        let mut config = auth_config(MAX_LEEWAY);
        config.issuers[1].subjects = vec!["chatops-*".to_owned()];
        config.issuers[1].allowed_teams = Some(BTreeSet::from(["payments".to_owned()]));
        let auth = Authenticator::new(&config).unwrap();
        let principal = |v: Value| auth.principal(&auth.verifiers[1], true, v.as_object().unwrap());
        assert!(principal(json!({"sub": "chatops-slack", "groups": ["payments"]})).is_ok());
        assert_eq!(
            principal(json!({"sub": "root", "groups": ["payments"]})),
            Err(AuthError::SubjectNotAllowed("bots".to_owned()))
        );
        assert_eq!(
            principal(json!({"sub": "chatops-slack", "groups": ["payments", "web"]})),
            Err(AuthError::TeamNotAllowed { issuer: "bots".to_owned(), team: "\"web\"".to_owned() })
        );
    }

    #[test]
    fn bindings_add_teams_to_tokens_without_groups() {
        let mut config = auth_config(MAX_LEEWAY);
        config.bindings = vec![BindingConfig {
            issuer: "bots".to_owned(),
            subject: Some("repo:acme/payments:*".to_owned()),
            claims: vec![("repository_id".to_owned(), vec!["42".to_owned()])],
            teams: BTreeSet::from(["payments".to_owned()]),
            privileged: false,
        }];
        let auth = Authenticator::new(&config).unwrap();
        let claims = json!({"sub": "repo:acme/payments:ref:refs/heads/main", "repository_id": "42"});
        let principal = auth.principal(&auth.verifiers[1], false, claims.as_object().unwrap()).unwrap();
        assert_eq!(principal.teams, BTreeSet::from(["payments".to_owned()]));
        let other = json!({"sub": "repo:acme/payments:ref:refs/heads/main", "repository_id": "43"});
        let explained = auth.explain("bots", other.as_object().unwrap()).unwrap();
        assert!(explained.principal.unwrap().teams.is_empty());
        assert_eq!(explained.bindings[0].mismatch.as_ref().unwrap().entry, "claims.repository_id");
        assert!(auth.explain("nope", other.as_object().unwrap()).is_none());
    }

    #[test]
    fn time_claims_must_be_numbers_when_present() {
        let claims = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(time_claims_are_numbers(&claims(json!({"exp": 1, "nbf": 2, "iat": 3}))), Ok(()));
        for odd in [json!(2.5), json!(1e20), json!(-1)] {
            assert_eq!(
                time_claims_are_numbers(&claims(json!({"exp": 1, "nbf": odd}))),
                Err(AuthError::BadTimeClaim("nbf")),
                "{odd}"
            );
        }
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
    fn the_unverified_issuer_is_read_from_the_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"iss":"https://a.example/"}"#);
        assert_eq!(unverified_issuer(&format!("h.{payload}.s")).unwrap(), "https://a.example/");
        assert_eq!(unverified_issuer("nodots"), Err(AuthError::Malformed));
        let no_iss = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"x"}"#);
        assert_eq!(unverified_issuer(&format!("h.{no_iss}.s")), Err(AuthError::MissingClaim("iss".to_owned())));
    }

    fn hs256_token(claims: &Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).unwrap()
    }

    #[tokio::test]
    async fn a_token_taken_on_trust_again_still_expires_on_time_and_a_forged_one_is_verified() {
        let auth = Authenticator::new(&auth_config(Duration::ZERO)).unwrap();
        let exp = jsonwebtoken::get_current_timestamp() + 2;
        let claims = json!({"iss": "https://default.example/", "aud": "keybroker", "sub": "ci-bot", "groups": ["payments"], "exp": exp});
        let header = format!("Bearer {}", hs256_token(&claims));
        let first = auth.authenticate(Some(&header)).await.unwrap();
        assert_eq!(auth.authenticate(Some(&header)).await.unwrap(), first, "the same principal from the cache");
        // One character of the signature changed: not the token that was verified.
        let at = header.rfind('.').unwrap() + 5;
        let swapped = if &header[at..=at] == "A" { "B" } else { "A" };
        let forged = format!("{}{swapped}{}", &header[..at], &header[at + 1..]);
        assert_eq!(auth.authenticate(Some(&forged)).await, Err(AuthError::BadSignature));
        while jsonwebtoken::get_current_timestamp() <= exp {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(auth.authenticate(Some(&header)).await, Err(AuthError::Expired));
    }

    #[test]
    fn only_bearer_headers_are_read() {
        assert_eq!(bearer_token("Bearer abc").unwrap(), "abc");
        assert_eq!(bearer_token("bearer  abc ").unwrap(), "abc");
        assert_eq!(bearer_token("Basic abc"), Err(AuthError::NotBearer));
        assert_eq!(bearer_token("Bearer"), Err(AuthError::NotBearer));
    }
}
