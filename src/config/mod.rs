//! Configuration: one TOML file, overridable from `KEYBROKER_<SECTION>__<KEY>` variables.
//!
//! Loading happens in two steps. [`ConfigFile`] is exactly the file's shape (unknown fields are
//! errors); [`Config::load`] then validates it, reads the secret files and builds the typed
//! settings the service runs on. Every error names the offending key.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::{Figment, Source};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::domain::duration::parse_duration;
use crate::domain::keys::looks_like_api_key;
pub use crate::domain::policy::ScopeRemoval;
use crate::domain::policy::{Policy, Scope, ScopeName};

mod auth;
mod transport;
mod ui;
pub use auth::{AuthConfig, BindingConfig, DEFAULT_ISSUER, IssuerConfig};
pub use auth::{OneOrMany, RawAuth, RawBinding, RawIssuer};
pub use ui::{RawTickets, RawUi, TicketsConfig, UiConfig, UiToken};

/// A configuration problem; the message names the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(message: String) -> Self {
        Self(message)
    }

    fn at(key: impl AsRef<str>, problem: impl AsRef<str>) -> Self {
        Self(format!("{}: {}", key.as_ref(), problem.as_ref()))
    }
}

/// A duration written the human way in the config file: `"30s"`, `"2m"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map(HumanDuration).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// The file's shape, typed: [`ConfigFile`] and its sections (`Raw*`) are the file as written,
// before validation. Tests and benchmarks configure keybroker by changing a field of one (never
// by editing TOML text), then validate it with [`Config::from_file`]; `to_toml` writes it out
// for a `keybroker serve` process.

/// The whole file, typed and not yet validated.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub database: RawDatabase,
    pub octopus: Option<RawOctopus>,
    pub auth: Option<RawAuth>,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub scopes: Vec<RawScope>,
    #[serde(default)]
    pub bindings: Vec<RawBinding>,
    #[serde(default)]
    pub jobs: RawJobs,
    #[serde(default)]
    pub webhooks: Vec<RawWebhook>,
    #[serde(default)]
    pub lifecycle: RawLifecycle,
    pub ui: Option<ui::RawUi>,
    #[serde(default)]
    pub tickets: ui::RawTickets,
}

impl ConfigFile {
    /// Parses TOML text (no environment overrides); nothing is validated or read yet.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Figment::new().merge(Toml::string(text)).extract().map_err(|e| ConfigError(figment_message(&e)))
    }

    /// The file as TOML text. Inline secrets are never written (the file may not hold them).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError(format!("cannot write this configuration as TOML: {e}")))
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLifecycle {
    #[serde(default)]
    pub on_scope_removed: ScopeRemoval,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub cors_allowed_origins: Vec<String>,
    #[serde(default = "default_body_limit")]
    pub request_body_limit_bytes: usize,
    #[serde(default = "default_request_timeout")]
    pub request_timeout: HumanDuration,
    #[serde(default = "default_rate_limit")]
    pub rate_limit_per_minute: u32,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: HumanDuration,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub public_url: Option<String>,
}

fn default_max_connections() -> usize {
    1024
}
fn default_header_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

fn default_rate_limit() -> u32 {
    1200
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            cors_allowed_origins: Vec::new(),
            request_body_limit_bytes: default_body_limit(),
            request_timeout: default_request_timeout(),
            rate_limit_per_minute: default_rate_limit(),
            max_connections: default_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            trusted_proxies: Vec::new(),
            public_url: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_body_limit() -> usize {
    65_536
}
fn default_request_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<String>,
    /// A file holding the URL, for URLs that carry a password.
    pub url_file: Option<PathBuf>,
    /// Whether `serve` applies the migrations (false: the runtime role may not; it checks the
    /// schema is current, and `keybroker migrate` runs as the owner).
    pub run_migrations: Option<bool>,
}

fn default_database_url() -> String {
    "sqlite://keybroker.db".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOctopus {
    pub url: Option<String>,
    pub api_key_file: Option<PathBuf>,
    #[serde(skip_serializing)]
    pub api_key: Option<SecretString>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    #[serde(default = "default_octopus_timeout")]
    pub timeout: HumanDuration,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_octopus_rate")]
    pub max_requests_per_minute: u32,
}

/// Under Octopus's default policy of 200 (octopus-api.md §10), leaving room for other clients.
fn default_octopus_rate() -> u32 {
    150
}

fn default_octopus_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub hmac_secret_file: Option<PathBuf>,
    #[serde(skip_serializing)]
    pub hmac_secret: Option<SecretString>,
    pub chain_key_file: Option<PathBuf>,
    #[serde(default = "default_head_interval")]
    pub head_interval: HumanDuration,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self { hmac_secret_file: None, hmac_secret: None, chain_key_file: None, head_interval: default_head_interval() }
    }
}

fn default_head_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawScope {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub octopus_user: String,
    pub teams: Vec<String>,
    pub default_ttl: HumanDuration,
    pub max_ttl: HumanDuration,
    #[serde(default = "default_max_active")]
    pub max_active_keys_per_requester: u32,
}

fn default_max_active() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobs {
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval: HumanDuration,
    #[serde(default = "default_pending_grace")]
    pub pending_grace: HumanDuration,
    #[serde(default = "default_expiry_sweep_interval")]
    pub expiry_sweep_interval: HumanDuration,
    #[serde(default = "default_webhook_interval")]
    pub webhook_interval: HumanDuration,
    #[serde(default = "default_expiry_sweep_interval")]
    pub drift_interval: HumanDuration,
    #[serde(default = "default_expiry_sweep_interval")]
    pub credential_check_interval: HumanDuration,
    #[serde(default = "default_readiness_interval")]
    pub readiness_interval: HumanDuration,
    #[serde(default = "default_policy_sync_interval")]
    pub policy_sync_interval: HumanDuration,
}

fn default_readiness_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_policy_sync_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

impl Default for RawJobs {
    fn default() -> Self {
        Self {
            reconcile_interval: default_reconcile_interval(),
            pending_grace: default_pending_grace(),
            expiry_sweep_interval: default_expiry_sweep_interval(),
            webhook_interval: default_webhook_interval(),
            drift_interval: default_expiry_sweep_interval(),
            credential_check_interval: default_expiry_sweep_interval(),
            readiness_interval: default_readiness_interval(),
            policy_sync_interval: default_policy_sync_interval(),
        }
    }
}

fn default_webhook_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_reconcile_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_pending_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_expiry_sweep_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub name: Option<String>,
    pub url: String,
    #[serde(default)]
    pub events: Vec<String>,
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub unsigned: bool,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub ca_file: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// The validated settings.

/// The whole, validated configuration. Secrets are already read and held in `secrecy` types.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub octopus: OctopusConfig,
    pub auth: AuthConfig,
    pub audit: AuditConfig,
    pub policy: Policy,
    pub jobs: JobsConfig,
    pub webhooks: Vec<WebhookConfig>,
    pub on_scope_removed: ScopeRemoval,
    /// The page at `/`; `None` without `[ui]`.
    pub ui: Option<UiConfig>,
    pub tickets: TicketsConfig,
    /// When the file was last changed (`None` for a configuration from text): at start, a
    /// policy published by another replica after it wins over this file's (see `policy_sync`).
    pub modified_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub cors_allowed_origins: Vec<String>,
    pub request_body_limit_bytes: usize,
    pub request_timeout: Duration,
    /// Requests per minute per principal, and per client address for requests that fail
    /// authentication; 0 turns the limit off.
    pub rate_limit_per_minute: u32,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The address people open (the page, pickup links); an origin ending in `/`.
    pub public_url: Url,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `sqlite://...` or `postgres://...`. May hold a password, so it is never logged whole.
    pub url: SecretString,
    /// `database.run_migrations` (`true`).
    pub run_migrations: bool,
}

/// How keybroker authenticates to Octopus.
#[derive(Debug, Clone)]
pub enum OctopusCredential {
    ApiKey(SecretString),
    /// The login flow: `POST /api/users/login`, then the session cookie and CSRF header.
    Login {
        username: String,
        password: SecretString,
    },
}

#[derive(Debug, Clone)]
pub struct OctopusConfig {
    pub url: Url,
    pub credential: OctopusCredential,
    pub timeout: Duration,
    /// Trusted in addition to the public roots (`octopus.ca_file`).
    pub ca_certificates: Vec<reqwest::Certificate>,
    /// keybroker's own pace towards Octopus, shared by every call; background jobs may use at
    /// most half of it, so they never starve issuance. 0: no limit.
    pub max_requests_per_minute: u32,
}

/// JWT algorithms keybroker accepts; anything else (including `none`) is refused at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Es256,
    EdDsa,
}

impl JwtAlgorithm {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "HS256" => Some(Self::Hs256),
            "RS256" => Some(Self::Rs256),
            "ES256" => Some(Self::Es256),
            "EdDSA" => Some(Self::EdDsa),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Keys the HMAC of issued secrets (for `/v1/keys/identify`).
    pub hmac_secret: SecretString,
    /// Keys the audit chain's hashes (`audit.chain_key_file`); `None`: plain SHA-256.
    pub chain_key: Option<SecretString>,
    /// How often the chain's head is published.
    pub head_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub reconcile_interval: Duration,
    pub pending_grace: Duration,
    pub expiry_sweep_interval: Duration,
    pub webhook_interval: Duration,
    pub drift_interval: Duration,
    pub credential_check_interval: Duration,
    pub readiness_interval: Duration,
    /// How often each replica checks the database for a newer policy (a reload elsewhere).
    pub policy_sync_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// What the outbox, the logs and the audit trail call it: its URL often carries a token.
    pub name: String,
    pub url: Url,
    pub events: Vec<String>,
    /// `None` only with `unsigned = true`.
    pub secret: Option<SecretString>,
    pub ca_certificates: Vec<reqwest::Certificate>,
}

const WEBHOOK_EVENTS: &[&str] =
    &["key.issued", "key.expiring", "key.expired", "key.revoked", "ticket.claimed", "audit.checkpoint"];

/// Shortest HMAC and HS256 secret accepted: 32 bytes, the output size of SHA-256.
const MIN_SECRET_BYTES: usize = 32;

impl Config {
    /// Loads `path`, applies `KEYBROKER_<SECTION>__<KEY>` overrides from the environment,
    /// validates everything and reads the secret files.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError(format!(
                "config file {} not found (pass --config PATH; keybroker.example.toml is a commented start)",
                path.display()
            )));
        }
        let figment = Figment::new().merge(Toml::file(path)).merge(
            // Only `SECTION__KEY` names: single-level names such as KEYBROKER_LOG_FORMAT
            // belong to the process, not to the file's shape.
            Env::prefixed("KEYBROKER_").filter(|key| key.as_str().contains("__")).split("__"),
        );
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let mut config = Self::from_figment(&figment, base)?;
        config.modified_at =
            std::fs::metadata(path).and_then(|m| m.modified()).ok().map(chrono::DateTime::<chrono::Utc>::from);
        Ok(config)
    }

    /// Checks only the shape of a configuration (TOML text plus `KEYBROKER_<SECTION>__<KEY>`
    /// pairs): every key known and of the right type. Secret files are not read. The deployment
    /// tests use it on the compose file's environment.
    pub fn check_shape(text: &str, env: &[(String, String)]) -> Result<(), ConfigError> {
        let mut figment = Figment::new().merge(Toml::string(text));
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("KEYBROKER_").filter(|r| r.contains("__")) else { continue };
            let key = rest.to_lowercase().replace("__", ".");
            // The environment provider parses values the same way.
            let parsed: figment::value::Value =
                value.parse().unwrap_or_else(|_| figment::value::Value::from(value.clone()));
            figment = figment.merge(figment::providers::Serialized::default(&key, parsed));
        }
        figment.extract::<ConfigFile>().map(|_| ()).map_err(|e| ConfigError(figment_message(&e)))
    }

    /// Validates a configuration given as TOML text, without environment overrides
    /// (tests and dev mode).
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        Self::from_figment(&Figment::new().merge(Toml::string(text)), base_dir)
    }

    fn from_figment(figment: &Figment, base_dir: &Path) -> Result<Self, ConfigError> {
        for key in ["octopus.api_key", "octopus.password", "auth.hs256_secret", "audit.hmac_secret"] {
            // TOML text, whether from the file or a string, is "the file"; the environment is not.
            let inline = figment
                .find_metadata(key)
                .is_some_and(|m| matches!(m.source, Some(Source::File(_))) || m.name.starts_with("TOML"));
            if inline {
                return Err(ConfigError::at(
                    key,
                    format!(
                        "secrets may not be written in the config file; use {key}_file or the \
                         environment variable KEYBROKER_{}",
                        key.to_uppercase().replace('.', "__")
                    ),
                ));
            }
        }
        let raw: ConfigFile = figment.extract().map_err(|e| ConfigError(figment_message(&e)))?;
        Self::validate(raw, base_dir)
    }

    /// Validates a typed file: reads the secret files (relative to `base_dir`) and checks every
    /// rule `load` checks, inline secrets refused included.
    pub fn from_file(file: ConfigFile, base_dir: &Path) -> Result<Self, ConfigError> {
        let inline = [
            ("octopus.api_key", file.octopus.as_ref().is_some_and(|o| o.api_key.is_some())),
            ("octopus.password", file.octopus.as_ref().is_some_and(|o| o.password.is_some())),
            ("auth.hs256_secret", file.auth.as_ref().is_some_and(|a| a.hs256_secret.is_some())),
            ("audit.hmac_secret", file.audit.hmac_secret.is_some()),
        ];
        if let Some((key, _)) = inline.iter().find(|(_, set)| *set) {
            return Err(ConfigError::at(
                *key,
                format!("secrets may not be written in the config file; use {key}_file"),
            ));
        }
        Self::validate(file, base_dir)
    }

    fn validate(raw: ConfigFile, base: &Path) -> Result<Self, ConfigError> {
        let server = validate_server(&raw.server)?;
        let database = validate_database(raw.database, base)?;
        let octopus = validate_octopus(raw.octopus, base)?;
        let auth = auth::validate(raw.auth, raw.bindings, base)?;
        let audit = validate_audit(raw.audit, base)?;
        let policy = validate_scopes(raw.scopes)?;
        let jobs = validate_jobs(&raw.jobs)?;
        check_timeouts(&server, &octopus, &jobs)?;
        let webhooks = validate_webhooks(raw.webhooks, base)?;
        let ui = ui::validate_ui(raw.ui, &auth)?;
        ui::check_page_settings(ui.as_ref(), &auth, raw.server.public_url.as_deref(), server.listen)?;
        let tickets = ui::validate_tickets(raw.tickets)?;
        Ok(Self {
            server,
            database,
            octopus,
            auth,
            audit,
            policy,
            jobs,
            webhooks,
            on_scope_removed: raw.lifecycle.on_scope_removed,
            ui,
            tickets,
            modified_at: None,
        })
    }
}

fn validate_server(raw: &RawServer) -> Result<ServerConfig, ConfigError> {
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        ConfigError::at("server.listen", format!("`{}` is not an address such as 127.0.0.1:8080", raw.listen))
    })?;
    Ok(ServerConfig {
        listen,
        cors_allowed_origins: validate_origins(raw.cors_allowed_origins.clone())?,
        request_body_limit_bytes: match raw.request_body_limit_bytes {
            0 => return Err(ConfigError::at("server.request_body_limit_bytes", "must be greater than 0")),
            n => n,
        },
        request_timeout: nonzero("server.request_timeout", raw.request_timeout)?,
        rate_limit_per_minute: raw.rate_limit_per_minute,
        max_connections: match raw.max_connections {
            0 => return Err(ConfigError::at("server.max_connections", "must be at least 1")),
            n => n,
        },
        header_read_timeout: nonzero("server.header_read_timeout", raw.header_read_timeout)?,
        trusted_proxies: transport::trusted_proxies(&raw.trusted_proxies)?,
        public_url: ui::public_url(raw.public_url.as_deref(), listen)?,
    })
}

fn validate_database(raw: RawDatabase, base: &Path) -> Result<DatabaseConfig, ConfigError> {
    let db_url = match (raw.url, raw.url_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::at(
                "database.url_file",
                "both database.url and database.url_file are set; keep one",
            ));
        }
        (Some(url), None) => url.trim().to_owned(),
        (None, Some(file)) => {
            let path = base.join(file);
            std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::at("database.url_file", format!("cannot read {}: {e}", path.display())))?
                .trim()
                .to_owned()
        }
        (None, None) => default_database_url(),
    };
    if !(db_url.starts_with("sqlite:") || db_url.starts_with("postgres://") || db_url.starts_with("postgresql://")) {
        return Err(ConfigError::at(
            "database.url",
            "must start with sqlite:// (embedded) or postgres:// (several replicas)",
        ));
    }
    Ok(DatabaseConfig { url: SecretString::from(db_url), run_migrations: raw.run_migrations.unwrap_or(true) })
}

fn validate_audit(raw: RawAudit, base: &Path) -> Result<AuditConfig, ConfigError> {
    let hmac_secret = read_secret("audit.hmac_secret", raw.hmac_secret_file.as_deref(), raw.hmac_secret, base)?
        .ok_or_else(|| {
            ConfigError::at(
                "audit.hmac_secret_file",
                "required (or KEYBROKER_AUDIT__HMAC_SECRET): it keys the hash kept of every issued key",
            )
        })?;
    if hmac_secret.expose_secret().len() < MIN_SECRET_BYTES {
        return Err(ConfigError::at(
            "audit.hmac_secret_file",
            format!("the secret must be at least {MIN_SECRET_BYTES} bytes long"),
        ));
    }
    Ok(AuditConfig {
        chain_key: chain_key(raw.chain_key_file.as_deref(), &hmac_secret, base)?,
        hmac_secret,
        head_interval: nonzero("audit.head_interval", raw.head_interval)?,
    })
}

fn validate_jobs(raw: &RawJobs) -> Result<JobsConfig, ConfigError> {
    Ok(JobsConfig {
        reconcile_interval: nonzero("jobs.reconcile_interval", raw.reconcile_interval)?,
        pending_grace: nonzero("jobs.pending_grace", raw.pending_grace)?,
        expiry_sweep_interval: nonzero("jobs.expiry_sweep_interval", raw.expiry_sweep_interval)?,
        webhook_interval: nonzero("jobs.webhook_interval", raw.webhook_interval)?,
        drift_interval: nonzero("jobs.drift_interval", raw.drift_interval)?,
        credential_check_interval: nonzero("jobs.credential_check_interval", raw.credential_check_interval)?,
        readiness_interval: nonzero("jobs.readiness_interval", raw.readiness_interval)?,
        policy_sync_interval: nonzero("jobs.policy_sync_interval", raw.policy_sync_interval)?,
    })
}

/// A request must outlive the Octopus calls it waits for, or callers would time out while their
/// key is being made (see [`issuance_worst_case`]). A pending record younger than an Octopus
/// call could still be in flight; should an issuance outlive the grace anyway, its issuer
/// deletes the key it got and says so (`ServiceError::Abandoned`).
fn check_timeouts(server: &ServerConfig, octopus: &OctopusConfig, jobs: &JobsConfig) -> Result<(), ConfigError> {
    let worst = issuance_worst_case(octopus.timeout);
    if server.request_timeout <= worst.total {
        return Err(ConfigError::at(
            "server.request_timeout",
            format!("must be longer than {} ({})", humantime::format_duration(worst.total), worst.derivation),
        ));
    }
    if jobs.pending_grace <= octopus.timeout * 2 {
        return Err(ConfigError::at(
            "jobs.pending_grace",
            format!("must be longer than twice octopus.timeout ({:?})", octopus.timeout),
        ));
    }
    Ok(())
}

/// The longest the Octopus calls an issuance must wait for can take, once its account is known:
/// the create (sent once, at most `octopus.timeout`), one wait for a short `Retry-After` (at most
/// 5 s) and the create sent again. The account look-up before it (GETs, each up to 4 attempts
/// with back-off, and cached) is not part of it: it is bounded by the issuance's deadline, and a
/// look-up that would leave too little time answers 503 before anything is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorstCase {
    pub total: Duration,
    pub derivation: String,
}

pub fn issuance_worst_case(octopus_timeout: Duration) -> WorstCase {
    let retry_wait = Duration::from_secs(5);
    let total = octopus_timeout * 2 + retry_wait;
    let t = humantime::format_duration(octopus_timeout);
    WorstCase {
        total,
        derivation: format!(
            "the create's 2 attempts × octopus.timeout {t} + one Retry-After wait of at most 5s; the account \
             look-up (up to 4 attempts × {t} per page, cached) is bounded by the issuance's deadline instead"
        ),
    }
}

/// `audit.chain_key_file`: at least 32 bytes, and not the identify secret (which keys what is
/// kept of every issued key: one key must not do both jobs).
fn chain_key(
    file: Option<&Path>,
    hmac_secret: &SecretString,
    base: &Path,
) -> Result<Option<SecretString>, ConfigError> {
    let Some(file) = file else { return Ok(None) };
    let key = "audit.chain_key_file";
    let path = base.join(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError::at(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = text.trim();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(ConfigError::at(key, format!("the key must be at least {MIN_SECRET_BYTES} bytes long")));
    }
    if secret == hmac_secret.expose_secret() {
        return Err(ConfigError::at(key, "must differ from audit.hmac_secret_file (the identify secret)"));
    }
    Ok(Some(SecretString::from(secret.to_owned())))
}

fn validate_webhooks(raw: Vec<RawWebhook>, base: &Path) -> Result<Vec<WebhookConfig>, ConfigError> {
    let mut names = HashSet::new();
    let mut webhooks = Vec::new();
    for (i, hook) in raw.into_iter().enumerate() {
        let key = format!("webhooks[{i}]");
        let name = match hook.name.as_deref().map(str::trim) {
            Some(n) if valid_webhook_name(n) => n.to_owned(),
            Some(_) => {
                return Err(ConfigError::at(format!("{key}.name"), "must be 1-64 letters, digits, '.', '_' or '-'"));
            }
            None => {
                return Err(ConfigError::at(
                    format!("{key}.name"),
                    "required: the outbox, the logs and the audit trail name a webhook by it, never by its URL",
                ));
            }
        };
        if !names.insert(name.clone()) {
            return Err(ConfigError::at(format!("{key}.name"), format!("duplicate webhook name `{name}`")));
        }
        let url = transport::outbound_url(&format!("{key}.url"), &hook.url, &key, hook.allow_insecure_http)?;
        for event in &hook.events {
            if !WEBHOOK_EVENTS.contains(&event.as_str()) {
                return Err(ConfigError::at(
                    format!("{key}.events"),
                    format!("unknown event `{event}`; known: {}", WEBHOOK_EVENTS.join(", ")),
                ));
            }
        }
        let secret = read_secret(&format!("{key}.secret"), hook.secret_file.as_deref(), None, base)?;
        match (&secret, hook.unsigned) {
            (None, false) => {
                return Err(ConfigError::at(
                    format!("{key}.secret_file"),
                    "required, so receivers can tell keybroker's deliveries from forgeries \
                     (or set unsigned = true for a receiver that cannot verify)",
                ));
            }
            (Some(_), true) => {
                return Err(ConfigError::at(format!("{key}.unsigned"), "is true but secret_file is set; keep one"));
            }
            (Some(s), false) if s.expose_secret().len() < MIN_SECRET_BYTES => {
                return Err(ConfigError::at(
                    format!("{key}.secret_file"),
                    format!("the secret must be at least {MIN_SECRET_BYTES} bytes long"),
                ));
            }
            _ => {}
        }
        let ca_certificates = transport::ca_certificates(&format!("{key}.ca_file"), hook.ca_file.as_deref(), base)?;
        webhooks.push(WebhookConfig { name, url, events: hook.events, secret, ca_certificates });
    }
    Ok(webhooks)
}

fn valid_webhook_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        // The outbox's name for rows of webhooks no longer configured.
        && !name.starts_with("removed-")
}

fn validate_octopus(raw: Option<RawOctopus>, base: &Path) -> Result<OctopusConfig, ConfigError> {
    let raw = raw.ok_or_else(|| {
        ConfigError::at("octopus", "section missing: keybroker needs the Octopus Server URL and its credential")
    })?;
    let url_text = raw.url.ok_or_else(|| ConfigError::at("octopus.url", "required"))?;
    let url = transport::outbound_url("octopus.url", &url_text, "octopus", raw.allow_insecure_http)?;
    let ca_certificates = transport::ca_certificates("octopus.ca_file", raw.ca_file.as_deref(), base)?;
    let api_key = read_secret("octopus.api_key", raw.api_key_file.as_deref(), raw.api_key, base)?;
    let password = read_secret("octopus.password", raw.password_file.as_deref(), raw.password, base)?;
    let credential = match (api_key, raw.username, password) {
        (Some(key), None, None) => {
            if !looks_like_api_key(key.expose_secret()) {
                return Err(ConfigError::at(
                    "octopus.api_key_file",
                    "does not hold an Octopus API key (API- followed by upper-case letters and digits)",
                ));
            }
            OctopusCredential::ApiKey(key)
        }
        (None, Some(username), Some(password)) if !username.trim().is_empty() => {
            OctopusCredential::Login { username: username.trim().to_owned(), password }
        }
        (None, Some(_), None) => {
            return Err(ConfigError::at("octopus.password_file", "required when octopus.username is set"));
        }
        (None, None, _) => {
            return Err(ConfigError::at(
                "octopus.api_key_file",
                "required (or KEYBROKER_OCTOPUS__API_KEY, or octopus.username with octopus.password_file)",
            ));
        }
        _ => {
            return Err(ConfigError::at("octopus", "give either an API key or a username and password, not both"));
        }
    };
    Ok(OctopusConfig {
        url,
        credential,
        timeout: nonzero("octopus.timeout", raw.timeout)?,
        ca_certificates,
        max_requests_per_minute: raw.max_requests_per_minute,
    })
}

fn validate_scopes(raw: Vec<RawScope>) -> Result<Policy, ConfigError> {
    let mut names = HashSet::new();
    let mut scopes = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("scopes[{i}].{field}");
        let name = ScopeName::parse(&s.name).map_err(|e| ConfigError::at(key("name"), e.to_string()))?;
        if !names.insert(name.clone()) {
            return Err(ConfigError::at(key("name"), format!("duplicate scope name `{name}`")));
        }
        let octopus_user = s.octopus_user.trim().to_owned();
        if octopus_user.is_empty() {
            return Err(ConfigError::at(key("octopus_user"), "must name an Octopus service account"));
        }
        let teams: BTreeSet<String> = s.teams.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect();
        if teams.is_empty() {
            return Err(ConfigError::at(key("teams"), "must list at least one team"));
        }
        let default_ttl = nonzero(&key("default_ttl"), s.default_ttl)?;
        let max_ttl = nonzero(&key("max_ttl"), s.max_ttl)?;
        if default_ttl > max_ttl {
            return Err(ConfigError::at(key("default_ttl"), "must not exceed max_ttl"));
        }
        if s.max_active_keys_per_requester == 0 {
            return Err(ConfigError::at(key("max_active_keys_per_requester"), "must be at least 1"));
        }
        let ttl = |d: Duration, field: &str| {
            chrono::Duration::from_std(d).map_err(|_| ConfigError::at(key(field), "is too long"))
        };
        scopes.push(Scope {
            name,
            description: s.description.trim().to_owned(),
            octopus_user,
            teams,
            default_ttl: ttl(default_ttl, "default_ttl")?,
            max_ttl: ttl(max_ttl, "max_ttl")?,
            max_active_keys_per_requester: s.max_active_keys_per_requester,
        });
    }
    Ok(Policy::new(scopes))
}

fn validate_origins(origins: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for (i, origin) in origins.iter().enumerate() {
        let ok = Url::parse(origin)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.path() == "/" && !origin.ends_with('/'))
            .is_some();
        if !ok {
            return Err(ConfigError::at(
                format!("server.cors_allowed_origins[{i}]"),
                format!("`{origin}` is not an origin such as https://portal.example.com"),
            ));
        }
    }
    Ok(origins)
}

fn nonzero(key: &str, d: HumanDuration) -> Result<Duration, ConfigError> {
    if d.0.is_zero() { Err(ConfigError::at(key, "must be longer than zero")) } else { Ok(d.0) }
}

/// A secret comes from `<name>_file` or from the environment (already merged by figment);
/// never both, so nobody wonders which one is in force.
fn read_secret(
    name: &str,
    file: Option<&Path>,
    from_env: Option<SecretString>,
    base: &Path,
) -> Result<Option<SecretString>, ConfigError> {
    match (file, from_env) {
        (Some(_), Some(_)) => Err(ConfigError::at(
            format!("{name}_file"),
            format!("both the file and KEYBROKER_{} are set; keep one", name.to_uppercase().replace('.', "__")),
        )),
        (Some(file), None) => {
            let path = base.join(file);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::at(format!("{name}_file"), format!("cannot read {}: {e}", path.display())))?;
            let trimmed = text.trim();
            if trimmed.is_empty() {
                return Err(ConfigError::at(format!("{name}_file"), format!("{} is empty", path.display())));
            }
            Ok(Some(SecretString::from(trimmed.to_owned())))
        }
        (None, Some(secret)) => {
            let trimmed = secret.expose_secret().trim();
            if trimmed.is_empty() {
                return Err(ConfigError::at(name, "is empty"));
            }
            Ok(Some(SecretString::from(trimmed.to_owned())))
        }
        (None, None) => Ok(None),
    }
}

/// Figment's messages name the key but also say "for key default.x"; keep it short.
fn figment_message(e: &figment::Error) -> String {
    let mut out = Vec::new();
    for err in e.clone() {
        let path = err.path.join(".");
        // Never print the value itself: it may be a secret from the environment.
        let kind = match &err.kind {
            figment::error::Kind::InvalidType(_, expected) => format!("invalid type: expected {expected}"),
            figment::error::Kind::InvalidValue(_, expected) => format!("invalid value: expected {expected}"),
            other => other.to_string(),
        };
        let source = err.metadata.as_ref().map(|m| m.name.to_string()).unwrap_or_default();
        out.push(if path.is_empty() { format!("{kind} ({source})") } else { format!("{path}: {kind} ({source})") });
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKER_KEY: &str = "API-KEYBROKERDEVBROKERKEY00001";

    /// A folder with the secret files the sample configuration names.
    fn secrets_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("octopus-api-key"), BROKER_KEY).unwrap();
        std::fs::write(dir.path().join("jwt"), "j".repeat(40)).unwrap();
        std::fs::write(dir.path().join("hmac"), "h".repeat(40)).unwrap();
        std::fs::write(dir.path().join("chain-key"), "c".repeat(40)).unwrap();
        dir
    }

    fn sample() -> String {
        r#"
[octopus]
url = "https://octopus.example.com"
api_key_file = "octopus-api-key"

[auth]
issuer = "https://idp.example.com/"
audience = "keybroker"
algorithms = ["HS256"]
hs256_secret_file = "jwt"

[audit]
hmac_secret_file = "hmac"

[[scopes]]
name = "payments-deploy"
octopus_user = "svc-payments-deploy"
teams = ["payments"]
default_ttl = "7d"
max_ttl = "30d"
"#
        .to_owned()
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = secrets_dir();
        Config::from_toml_str(text, dir.path())
    }

    fn error(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn the_sample_loads_with_defaults() {
        let config = load(&sample()).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.request_body_limit_bytes, 65_536);
        assert_eq!(config.octopus.timeout, Duration::from_secs(10));
        assert_eq!(config.auth.default_issuer().unwrap().teams_claim.as_deref(), Some("groups"));
        let scope = config.policy.get("payments-deploy").unwrap();
        assert_eq!(scope.default_ttl, chrono::Duration::days(7));
        assert_eq!(scope.max_active_keys_per_requester, 3);
        assert!(
            matches!(config.octopus.credential, OctopusCredential::ApiKey(ref k) if k.expose_secret() == BROKER_KEY)
        );
    }

    #[test]
    fn a_typed_file_writes_out_as_toml_that_reads_back_the_same() {
        // The test kit changes fields of a ConfigFile and writes it out for `serve`: nothing may
        // be lost on the way, for the example (every section) and for the demo.
        let demo = crate::dev::demo_config_toml("http://127.0.0.1:9", "127.0.0.1:0", Path::new("k.db"));
        for text in [include_str!("../../keybroker.example.toml"), demo.as_str()] {
            let file = ConfigFile::from_toml(text).unwrap();
            let written = file.to_toml().unwrap();
            let again = ConfigFile::from_toml(&written).unwrap();
            assert_eq!(format!("{again:?}"), format!("{file:?}"), "{written}");
        }
        // A duration keeps its value, whichever way humantime writes it.
        let mut file = ConfigFile::from_toml(&demo).unwrap();
        file.jobs.webhook_interval = Duration::from_millis(1500).into();
        let again = ConfigFile::from_toml(&file.to_toml().unwrap()).unwrap();
        assert_eq!(again.jobs.webhook_interval, HumanDuration(Duration::from_millis(1500)));
    }

    #[test]
    fn the_shipped_example_is_valid_once_its_secret_files_exist() {
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test-ca.pem");
        let example = include_str!("../../keybroker.example.toml")
            .replace("/run/secrets/octopus-api-key", "octopus-api-key")
            .replace("/run/secrets/keybroker-hmac", "hmac")
            .replace("/run/secrets/chatops-hs256", "hmac")
            .replace("/run/secrets/keybroker-chain-key", "chain-key")
            .replace("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt", ca);
        let config = load(&example).unwrap();
        assert_eq!(config.policy.scopes().len(), 1);
        assert!(config.auth.default_issuer().unwrap().jwks_url.is_some());
        let names: Vec<&str> = config.auth.issuers.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["default", "github", "gitlab", "k8s", "buildkite", "chatops"]);
        assert_eq!(config.auth.bindings.len(), 4);
        assert!(config.audit.chain_key.is_some() && config.ui.is_some());
    }

    #[test]
    fn the_chain_key_is_not_the_identify_secret() {
        let text = sample().replace("[audit]\n", "[audit]\nchain_key_file = \"hmac\"\n");
        assert!(error(&text).starts_with("audit.chain_key_file"), "{}", error(&text));
        let text = sample().replace("[audit]\n", "[audit]\nchain_key_file = \"chain-key\"\n");
        assert!(load(&text).unwrap().audit.chain_key.is_some());
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let text = sample().replace("[auth]", "[auth]\nissuerr = \"x\"");
        assert!(error(&text).contains("issuerr"), "{}", error(&text));
        let text = format!("{}\n[surprise]\nx = 1\n", sample());
        assert!(error(&text).contains("surprise"));
    }

    #[test]
    fn bad_durations_name_the_key() {
        let text = sample().replace("max_ttl = \"30d\"", "max_ttl = \"a month\"");
        let e = error(&text);
        assert!(e.contains("max_ttl") && e.contains("not a duration"), "{e}");
    }

    #[test]
    fn duplicate_scope_names_are_refused() {
        let scope = sample().split("[[scopes]]").nth(1).unwrap().to_owned();
        let text = format!("{}[[scopes]]{scope}", sample());
        let e = error(&text);
        assert!(e.contains("scopes[1].name") && e.contains("duplicate"), "{e}");
    }

    #[test]
    fn empty_team_lists_are_refused() {
        let e = error(&sample().replace("teams = [\"payments\"]", "teams = []"));
        assert!(e.contains("scopes[0].teams"), "{e}");
    }

    #[test]
    fn a_default_ttl_beyond_the_maximum_is_refused() {
        let e = error(&sample().replace("default_ttl = \"7d\"", "default_ttl = \"60d\""));
        assert!(e.contains("scopes[0].default_ttl"), "{e}");
    }

    #[test]
    fn algorithms_are_pinned_and_need_their_keys() {
        let e = error(&sample().replace("algorithms = [\"HS256\"]", "algorithms = [\"none\"]"));
        assert!(e.contains("auth.algorithms") && e.contains("none"), "{e}");
        let e = error(&sample().replace("algorithms = [\"HS256\"]", "algorithms = [\"HS256\", \"RS256\"]"));
        assert!(e.contains("auth.jwks_url"), "{e}");
        let e = error(&sample().replace("hs256_secret_file = \"jwt\"", ""));
        assert!(e.contains("auth.hs256_secret_file"), "{e}");
    }

    #[test]
    fn secrets_may_not_be_inline_in_the_file() {
        let text = sample().replace("api_key_file = \"octopus-api-key\"", &format!("api_key = \"{BROKER_KEY}\""));
        let e = error(&text);
        assert!(e.contains("octopus.api_key") && e.contains("KEYBROKER_OCTOPUS__API_KEY"), "{e}");
        assert!(!e.contains(BROKER_KEY), "the error must not echo the secret");
    }

    #[test]
    fn type_errors_never_echo_the_value() {
        let text = sample().replace("hmac_secret_file = \"hmac\"", "hmac_secret_file = 987654321987");
        let e = error(&text);
        assert!(e.contains("audit.hmac_secret_file") && e.contains("invalid type"), "{e}");
        assert!(!e.contains("987654321987"), "{e}");
    }

    #[test]
    fn a_missing_secret_file_names_the_key() {
        let e = error(&sample().replace("hmac_secret_file = \"hmac\"", "hmac_secret_file = \"nope\""));
        assert!(e.contains("audit.hmac_secret_file") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn short_hmac_secrets_are_refused() {
        let dir = secrets_dir();
        std::fs::write(dir.path().join("hmac"), "short").unwrap();
        let e = Config::from_toml_str(&sample(), dir.path()).unwrap_err().to_string();
        assert!(e.contains("at least 32 bytes"), "{e}");
    }

    #[test]
    fn the_login_flow_needs_a_password() {
        let text = sample().replace("api_key_file = \"octopus-api-key\"", "username = \"broker\"");
        assert!(error(&text).contains("octopus.password_file"));
    }

    #[test]
    fn a_request_timeout_shorter_than_the_octopus_calls_is_refused() {
        let text = sample().replace("[octopus]", "[server]\nrequest_timeout = \"15s\"\n\n[octopus]");
        let e = error(&text);
        assert!(e.contains("server.request_timeout"), "{e}");
    }

    #[test]
    fn database_urls_must_name_a_supported_backend() {
        let e = error(&format!("[database]\nurl = \"mysql://x\"\n{}", sample()));
        assert!(e.contains("database.url"), "{e}");
    }

    #[test]
    fn environment_overrides_win_over_the_file() {
        let dir = secrets_dir();
        let path = dir.path().join("keybroker.toml");
        // The key comes from the environment, so the file names no key file.
        std::fs::write(&path, sample().replace("api_key_file = \"octopus-api-key\"", "")).unwrap();
        let figment = Figment::new()
            .merge(Toml::file(&path))
            .merge(figment::providers::Serialized::default("server.listen", "0.0.0.0:9999"))
            .merge(figment::providers::Serialized::default("octopus.api_key", "API-FROMTHEENVIRONMENT00000001"));
        let config = Config::from_figment(&figment, dir.path()).map_err(|e| e.to_string()).unwrap();
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:9999");
        assert!(
            matches!(config.octopus.credential, OctopusCredential::ApiKey(ref k) if k.expose_secret() == "API-FROMTHEENVIRONMENT00000001")
        );
    }
}
