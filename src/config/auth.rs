//! `[auth]`, `[[auth.issuers]]` and `[[bindings]]`: who may call keybroker, and which teams a
//! token stands for.
//!
//! The single-issuer `[auth]` form of earlier releases is the issuer named `default`; every
//! `[[auth.issuers]]` entry is another. `[auth]` also holds what all issuers share (admin and
//! auditor teams, leeway). A binding grants teams to the tokens of one issuer whose subject and
//! claims match its globs.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, HumanDuration, JwtAlgorithm, MIN_SECRET_BYTES, read_secret, transport};

/// The issuer the single-issuer `[auth]` form defines. Its subjects are recorded as they are;
/// every other issuer's as `<name>:<sub>`.
pub use crate::domain::principal::DEFAULT_ISSUER;

/// One string or a list of them (`audience`, a binding's claim patterns).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    // The issuer `default` (the single-issuer form).
    pub issuer: Option<String>,
    pub audience: Option<OneOrMany>,
    #[serde(default)]
    pub algorithms: Vec<String>,
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub public_key_files: Vec<PathBuf>,
    pub hs256_secret_file: Option<PathBuf>,
    #[serde(skip_serializing)]
    pub hs256_secret: Option<SecretString>,
    pub teams_claim: Option<String>,
    pub teams_separator: Option<String>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub ca_file: Option<PathBuf>,
    pub jwks_bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    pub subjects: Vec<String>,
    pub allowed_teams: Option<Vec<String>>,
    pub privileged: Option<bool>,
    // Shared by every issuer.
    #[serde(default)]
    pub admin_teams: Vec<String>,
    #[serde(default)]
    pub auditor_teams: Vec<String>,
    /// Members of these teams (chat-ops bots) may create pickup tickets for someone else.
    #[serde(default)]
    pub delegate_teams: Vec<String>,
    #[serde(default = "default_leeway")]
    pub leeway: HumanDuration,
    #[serde(default)]
    pub issuers: Vec<RawIssuer>,
}

fn default_leeway() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    pub name: String,
    pub issuer: Option<String>,
    pub audience: Option<OneOrMany>,
    #[serde(default)]
    pub algorithms: Vec<String>,
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub public_key_files: Vec<PathBuf>,
    pub hs256_secret_file: Option<PathBuf>,
    pub teams_claim: Option<String>,
    pub teams_separator: Option<String>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub ca_file: Option<PathBuf>,
    pub jwks_bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    pub subjects: Vec<String>,
    pub allowed_teams: Option<Vec<String>>,
    #[serde(default)]
    pub privileged: bool,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBinding {
    pub issuer: String,
    pub subject: Option<String>,
    #[serde(default)]
    pub claims: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    pub teams: Vec<String>,
    #[serde(default)]
    pub privileged: bool,
}

/// A trusted token issuer, validated.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Shown in the audit trail; `default` for the single-issuer form.
    pub name: String,
    /// The `iss` its tokens carry (it selects this entry).
    pub issuer: String,
    /// Accepted `aud` values: a token must carry one of them.
    pub audiences: Vec<String>,
    pub algorithms: BTreeSet<JwtAlgorithm>,
    pub jwks_url: Option<Url>,
    /// PEM public keys, read at start.
    pub public_keys: Vec<(PathBuf, Vec<u8>)>,
    pub hs256_secret: Option<SecretString>,
    /// A claim name or a JSON pointer; `None`: teams come from bindings only.
    pub teams_claim: Option<String>,
    /// Splits a teams claim that is one string.
    pub teams_separator: Option<String>,
    /// For the JWKS client (`ca_file`).
    pub ca_certificates: Vec<reqwest::Certificate>,
    /// Sent as a Bearer token to the JWKS URL, read at each fetch (a Kubernetes API server does
    /// not serve its JWKS anonymously, and its tokens rotate).
    pub jwks_bearer_token_file: Option<PathBuf>,
    /// Globs; when given, a token's subject must match one.
    pub subjects: Vec<String>,
    /// When given, the teams a token claims must all be in it.
    pub allowed_teams: Option<BTreeSet<String>>,
    /// Whether its tokens may carry admin or auditor teams when verified with an HS256 secret.
    pub privileged: bool,
}

impl IssuerConfig {
    pub fn is_default(&self) -> bool {
        self.name == DEFAULT_ISSUER
    }
}

/// A binding: teams granted to the tokens of `issuer` whose subject and claims match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingConfig {
    pub issuer: String,
    /// A glob the subject must match.
    pub subject: Option<String>,
    /// Claim name or JSON pointer → globs, one of which the claim must match.
    pub claims: Vec<(String, Vec<String>)>,
    pub teams: BTreeSet<String>,
    pub privileged: bool,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub issuers: Vec<IssuerConfig>,
    pub bindings: Vec<BindingConfig>,
    pub admin_teams: BTreeSet<String>,
    pub auditor_teams: BTreeSet<String>,
    /// Members may create pickup tickets for someone else (`POST /v1/tickets`).
    pub delegate_teams: BTreeSet<String>,
    pub leeway: Duration,
}

impl AuthConfig {
    /// The issuer named `default`, if the single-issuer form is used.
    pub fn default_issuer(&self) -> Option<&IssuerConfig> {
        self.issuers.iter().find(|i| i.is_default())
    }
}

/// The fields an issuer has in either form.
struct IssuerFields {
    issuer: Option<String>,
    audience: Option<OneOrMany>,
    algorithms: Vec<String>,
    jwks_url: Option<String>,
    public_key_files: Vec<PathBuf>,
    hs256_secret_file: Option<PathBuf>,
    hs256_secret: Option<SecretString>,
    teams_claim: Option<String>,
    teams_separator: Option<String>,
    allow_insecure_http: bool,
    ca_file: Option<PathBuf>,
    jwks_bearer_token_file: Option<PathBuf>,
    subjects: Vec<String>,
    allowed_teams: Option<Vec<String>>,
    privileged: bool,
}

pub(super) fn validate(
    raw: Option<RawAuth>,
    bindings: Vec<RawBinding>,
    base: &Path,
) -> Result<AuthConfig, ConfigError> {
    let mut raw = raw.ok_or_else(|| {
        ConfigError::at("auth", "section missing: keybroker needs to know how to verify callers' tokens")
    })?;
    if raw.leeway.0 > Duration::from_secs(300) {
        return Err(ConfigError::at("auth.leeway", "must be at most 5m: tokens are meant to be short-lived"));
    }
    let admin_teams: BTreeSet<String> = raw.admin_teams.iter().map(|t| t.trim().to_owned()).collect();
    let auditor_teams: BTreeSet<String> = raw.auditor_teams.iter().map(|t| t.trim().to_owned()).collect();
    let mut issuers = Vec::new();
    if let Some(fields) = default_issuer_fields(&mut raw)? {
        issuers.push(validate_issuer("auth", DEFAULT_ISSUER.to_owned(), fields, base)?);
    }
    let mut names: HashSet<String> = issuers.iter().map(|i| i.name.clone()).collect();
    for (i, entry) in std::mem::take(&mut raw.issuers).into_iter().enumerate() {
        let key = format!("auth.issuers[{i}]");
        let name = entry.name.trim().to_owned();
        if name == DEFAULT_ISSUER || !valid_name(&name) {
            return Err(ConfigError::at(
                format!("{key}.name"),
                "must be 1-64 of a-z, 0-9, '-', '_', '.', and not `default` (the single-issuer [auth] form)",
            ));
        }
        if !names.insert(name.clone()) {
            return Err(ConfigError::at(format!("{key}.name"), format!("duplicate issuer name `{name}`")));
        }
        issuers.push(validate_issuer(&key, name, entry.into(), base)?);
    }
    check_issuers_distinct(&issuers)?;
    let privileged_teams: BTreeSet<&String> = admin_teams.iter().chain(&auditor_teams).collect();
    let bindings = validate_bindings(bindings, &issuers, &privileged_teams)?;
    let delegate_teams: BTreeSet<String> =
        raw.delegate_teams.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect();
    Ok(AuthConfig { issuers, bindings, admin_teams, auditor_teams, delegate_teams, leeway: raw.leeway.0 })
}

/// The `default` issuer's fields, when `[auth]` itself names an issuer (the single-issuer form)
/// or lists no `[[auth.issuers]]`.
fn default_issuer_fields(raw: &mut RawAuth) -> Result<Option<IssuerFields>, ConfigError> {
    let single_form = raw.issuer.is_some()
        || !raw.algorithms.is_empty()
        || raw.audience.is_some()
        || raw.jwks_url.is_some()
        || raw.hs256_secret_file.is_some()
        || raw.hs256_secret.is_some()
        || !raw.public_key_files.is_empty();
    if !single_form && !raw.issuers.is_empty() {
        if raw.teams_claim.is_some() || !raw.subjects.is_empty() || raw.privileged.is_some() {
            return Err(ConfigError::at(
                "auth.issuer",
                "required when [auth] sets issuer fields (teams_claim, subjects, privileged); or move them into \
                 an [[auth.issuers]] entry",
            ));
        }
        return Ok(None);
    }
    Ok(Some(IssuerFields {
        issuer: raw.issuer.take(),
        audience: raw.audience.take(),
        algorithms: std::mem::take(&mut raw.algorithms),
        jwks_url: raw.jwks_url.take(),
        public_key_files: std::mem::take(&mut raw.public_key_files),
        hs256_secret_file: raw.hs256_secret_file.take(),
        hs256_secret: raw.hs256_secret.take(),
        // The single-issuer form always read `groups` unless told otherwise.
        teams_claim: Some(raw.teams_claim.take().unwrap_or_else(|| "groups".to_owned())),
        teams_separator: raw.teams_separator.take(),
        allow_insecure_http: raw.allow_insecure_http,
        ca_file: raw.ca_file.take(),
        jwks_bearer_token_file: raw.jwks_bearer_token_file.take(),
        subjects: std::mem::take(&mut raw.subjects),
        allowed_teams: raw.allowed_teams.take(),
        // It could always carry admin teams; `privileged = false` narrows it.
        privileged: raw.privileged.unwrap_or(true),
    }))
}

impl From<RawIssuer> for IssuerFields {
    fn from(entry: RawIssuer) -> Self {
        IssuerFields {
            issuer: entry.issuer,
            audience: entry.audience,
            algorithms: entry.algorithms,
            jwks_url: entry.jwks_url,
            public_key_files: entry.public_key_files,
            hs256_secret_file: entry.hs256_secret_file,
            hs256_secret: None,
            teams_claim: entry.teams_claim,
            teams_separator: entry.teams_separator,
            allow_insecure_http: entry.allow_insecure_http,
            ca_file: entry.ca_file,
            jwks_bearer_token_file: entry.jwks_bearer_token_file,
            subjects: entry.subjects,
            allowed_teams: entry.allowed_teams,
            privileged: entry.privileged,
        }
    }
}

/// One entry per issuer: bindings, not a second entry, tell its tokens apart.
fn check_issuers_distinct(issuers: &[IssuerConfig]) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    let entries = usize::from(issuers.first().is_some_and(IssuerConfig::is_default));
    for (i, issuer) in issuers.iter().enumerate() {
        if !seen.insert(issuer.issuer.as_str()) {
            return Err(ConfigError::at(
                if issuer.is_default() {
                    "auth.issuer".to_owned()
                } else {
                    format!("auth.issuers[{}].issuer", i - entries)
                },
                format!("`{}` is trusted twice; one entry per issuer (bindings tell its tokens apart)", issuer.issuer),
            ));
        }
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

fn validate_issuer(key: &str, name: String, raw: IssuerFields, base: &Path) -> Result<IssuerConfig, ConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    let issuer = match raw.issuer.as_deref().map(str::trim) {
        Some(i) if !i.is_empty() => i.to_owned(),
        _ => return Err(ConfigError::at(at("issuer"), "required")),
    };
    let audiences: Vec<String> = raw
        .audience
        .map(OneOrMany::into_vec)
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    if audiences.is_empty() {
        return Err(ConfigError::at(at("audience"), "required"));
    }
    if raw.algorithms.is_empty() {
        return Err(ConfigError::at(at("algorithms"), "list at least one of HS256, RS256, ES256, EdDSA"));
    }
    let mut algorithms = BTreeSet::new();
    for alg in &raw.algorithms {
        algorithms.insert(JwtAlgorithm::parse(alg).ok_or_else(|| {
            ConfigError::at(at("algorithms"), format!("`{alg}` is not supported; use HS256, RS256, ES256 or EdDSA"))
        })?);
    }
    let hs256_secret = read_secret(&at("hs256_secret"), raw.hs256_secret_file.as_deref(), raw.hs256_secret, base)?;
    let jwks_url = raw
        .jwks_url
        .as_deref()
        .map(|u| transport::outbound_url(&at("jwks_url"), u, key, raw.allow_insecure_http))
        .transpose()?;
    let ca_certificates = transport::ca_certificates(&at("ca_file"), raw.ca_file.as_deref(), base)?;
    let mut public_keys = Vec::new();
    for (i, file) in raw.public_key_files.iter().enumerate() {
        let path = base.join(file);
        let pem = std::fs::read(&path).map_err(|e| {
            ConfigError::at(format!("{key}.public_key_files[{i}]"), format!("cannot read {}: {e}", path.display()))
        })?;
        public_keys.push((path, pem));
    }
    check_key_material(
        key,
        &algorithms,
        hs256_secret.as_ref(),
        jwks_url.as_ref(),
        &public_keys,
        raw.jwks_bearer_token_file.is_some(),
    )?;
    let teams_claim = match raw.teams_claim.map(|c| c.trim().to_owned()) {
        Some(c) if c.is_empty() || c == "/" => return Err(ConfigError::at(at("teams_claim"), "must not be empty")),
        other => other,
    };
    let allowed_teams =
        raw.allowed_teams.map(|teams| teams.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect());
    Ok(IssuerConfig {
        name,
        issuer,
        audiences,
        algorithms,
        jwks_url,
        public_keys,
        hs256_secret,
        teams_claim,
        teams_separator: raw.teams_separator.filter(|s| !s.is_empty()),
        ca_certificates,
        jwks_bearer_token_file: raw.jwks_bearer_token_file.map(|f| base.join(f)),
        subjects: raw.subjects.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
        allowed_teams,
        privileged: raw.privileged,
    })
}

/// Each algorithm has what verifies it, and nothing is configured that no algorithm uses.
fn check_key_material(
    key: &str,
    algorithms: &BTreeSet<JwtAlgorithm>,
    hs256_secret: Option<&SecretString>,
    jwks_url: Option<&Url>,
    public_keys: &[(PathBuf, Vec<u8>)],
    has_bearer_token_file: bool,
) -> Result<(), ConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    let has_asymmetric = algorithms.iter().any(|a| *a != JwtAlgorithm::Hs256);
    if algorithms.contains(&JwtAlgorithm::Hs256) {
        match hs256_secret {
            None => {
                return Err(ConfigError::at(
                    at("hs256_secret_file"),
                    if key == "auth" {
                        "required when auth.algorithms contains HS256 (or KEYBROKER_AUTH__HS256_SECRET)".to_owned()
                    } else {
                        format!("required when {key}.algorithms contains HS256")
                    },
                ));
            }
            Some(s) if s.expose_secret().len() < MIN_SECRET_BYTES => {
                return Err(ConfigError::at(
                    at("hs256_secret_file"),
                    format!("the secret must be at least {MIN_SECRET_BYTES} bytes long"),
                ));
            }
            Some(_) => {}
        }
    } else if hs256_secret.is_some() {
        return Err(ConfigError::at(at("hs256_secret_file"), format!("set, but HS256 is not in {key}.algorithms")));
    }
    if has_asymmetric && jwks_url.is_none() && public_keys.is_empty() {
        return Err(ConfigError::at(
            at("jwks_url"),
            format!("RS256, ES256 and EdDSA need {key}.jwks_url or {key}.public_key_files"),
        ));
    }
    if !has_asymmetric && (jwks_url.is_some() || !public_keys.is_empty()) {
        return Err(ConfigError::at(
            at("algorithms"),
            format!(
                "{key}.jwks_url or {key}.public_key_files is set, but no asymmetric algorithm (RS256, ES256, EdDSA) is allowed"
            ),
        ));
    }
    if has_bearer_token_file && jwks_url.is_none() {
        return Err(ConfigError::at(at("jwks_bearer_token_file"), format!("set, but {key}.jwks_url is not")));
    }
    Ok(())
}

fn validate_bindings(
    raw: Vec<RawBinding>,
    issuers: &[IssuerConfig],
    privileged_teams: &BTreeSet<&String>,
) -> Result<Vec<BindingConfig>, ConfigError> {
    let mut bindings = Vec::with_capacity(raw.len());
    for (i, b) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("bindings[{i}].{field}");
        let issuer = b.issuer.trim().to_owned();
        if !issuers.iter().any(|known| known.name == issuer) {
            let known: Vec<&str> = issuers.iter().map(|i| i.name.as_str()).collect();
            return Err(ConfigError::at(
                key("issuer"),
                format!("`{issuer}` names no issuer; known: {}", known.join(", ")),
            ));
        }
        let subject = b.subject.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        let claims: Vec<(String, Vec<String>)> =
            b.claims.into_iter().map(|(name, patterns)| (name.trim().to_owned(), patterns.into_vec())).collect();
        if let Some((name, _)) = claims.iter().find(|(name, patterns)| name.is_empty() || patterns.is_empty()) {
            return Err(ConfigError::at(
                key("claims"),
                format!("`{name}` needs a claim name and at least one pattern"),
            ));
        }
        if subject.is_none() && claims.is_empty() {
            return Err(ConfigError::at(
                key("subject"),
                "a binding needs a subject or a claim to match: without one it would grant its teams to every \
                 token of the issuer",
            ));
        }
        let teams: BTreeSet<String> = b.teams.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect();
        if teams.is_empty() {
            return Err(ConfigError::at(key("teams"), "must list at least one team"));
        }
        if !b.privileged {
            if let Some(team) = teams.iter().find(|t| privileged_teams.contains(t)) {
                return Err(ConfigError::at(
                    key("teams"),
                    format!("`{team}` is an admin or auditor team; a binding grants it only with privileged = true"),
                ));
            }
        }
        bindings.push(BindingConfig { issuer, subject, claims, teams, privileged: b.privileged });
    }
    Ok(bindings)
}
