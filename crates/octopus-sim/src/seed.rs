//! The simulator's starting data: server settings, users, service accounts and API keys.
//!
//! A [`Seed`] is plain data (TOML or JSON); [`Seed::validate`] and the simulator's loader turn it
//! into state, hashing every password and API key on the way in.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};

/// The API key the demo seed gives the broker's own service account (`keybroker`).
///
/// Only ever valid against a simulator started from [`Seed::demo`]; dev mode hands it to keybroker.
pub const DEMO_BROKER_API_KEY: &str = "API-KEYBROKERDEVBROKERKEY00001";

/// A legacy key the demo seed gives `svc-web-deploy`, so that its key list is not empty.
const DEMO_WEB_DEPLOY_API_KEY: &str = "API-SVCWEBDEPLOYLEGACYKEY00001";

/// Everything the simulator starts with.
///
/// TOML example:
///
/// ```toml
/// extra_users = 200
///
/// [server]
/// version = "2026.3.0"
/// api_key_default_expiry_days = 180
/// api_key_max_expiry_days = 366      # "none" models a server before 2025.4
///
/// [[users]]
/// username = "keybroker"
/// display_name = "keybroker broker account"
/// is_service = true
/// can_edit_users = true
///
/// [[api_keys]]
/// username = "keybroker"
/// secret = "API-KEYBROKERDEVBROKERKEY00001"
/// purpose = "keybroker broker credential"
/// expires_in_days = 300
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Server-wide settings (`[server]`).
    #[serde(default)]
    pub server: ServerSettings,
    /// Users and service accounts, ids `Users-1`, `Users-2`, ... in this order.
    #[serde(default)]
    pub users: Vec<SeedUser>,
    /// API keys that exist at start, given in plain text here and hashed on load.
    #[serde(default)]
    pub api_keys: Vec<SeedApiKey>,
    /// How many generated normal users (`user-000001`, ...) to add, so paging matters.
    #[serde(default)]
    pub extra_users: usize,
}

/// Server-wide settings, mirroring `/api` and `/api/authentication`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Reported in `/api` and the `Octopus-Node` header.
    #[serde(default = "default_version")]
    pub version: String,
    /// Suffix of the login cookie names; a random GUID when not given.
    #[serde(default)]
    pub installation_id: Option<String>,
    /// Lifetime of a key created without `Expires`; `None` (`"none"` in TOML, `null` in JSON)
    /// means never, as on servers before 2025.4.
    #[serde(default = "default_default_expiry", deserialize_with = "days_or_none")]
    pub api_key_default_expiry_days: Option<u32>,
    /// Longest allowed key lifetime, also the lifetime of `"Expires": null`; `None` means no
    /// maximum (servers before 2025.4).
    #[serde(default = "default_max_expiry", deserialize_with = "days_or_none")]
    pub api_key_max_expiry_days: Option<u32>,
    /// When false, keys can be created only for service accounts (Octopus 2023.2+ setting).
    #[serde(default = "yes")]
    pub user_api_keys_enabled: bool,
    /// Lifetime of a login session, counted from the login (not sliding).
    #[serde(default = "default_session_timeout")]
    pub session_timeout_secs: u64,
    /// When true, a key created through a cookie session cannot outlive that session, the way a
    /// key created with an API key cannot outlive the creating key. Octopus's behaviour here is
    /// unknown (octopus-api.md §12.3), so it is off by default.
    #[serde(default)]
    pub cookie_session_limits_key_expiry: bool,
    /// How many characters of a key its hint shows: 8 on current servers, 7 on some (Octopus
    /// issue 10067), 0 for servers before November 2020, which keep no hint.
    #[serde(default = "default_hint_length")]
    pub api_key_hint_length: usize,
    /// False for servers before 2020.6, which ignore `Expires`: their keys never expire.
    #[serde(default = "yes")]
    pub api_key_expiry_supported: bool,
    /// Whether key lists carry `LastUsedTimeStamp` and `IsLastUsedTimestampKnown` (false on the
    /// profiles before 2025.4, whose version of this is unknown to us: the safe assumption).
    #[serde(default = "yes")]
    pub api_key_last_use_tracked: bool,
    /// Octopus 2026.3+ rate limiting: a token bucket per user of this many requests a minute
    /// (`None`: off), answering 429 with `Retry-After` and the `Octopus-RateLimit` headers.
    #[serde(default)]
    pub rate_limit_per_minute: Option<u32>,
    /// The bucket's size; defaults to the per-minute rate.
    #[serde(default)]
    pub rate_limit_burst: Option<u32>,
    /// A version profile applied over the other settings: `2020.5` (no `Expires` on keys, no
    /// hints, no limits), `2023.3` (no server maximum), `2025.4` (a 366-day maximum, no keys
    /// without expiry), `2026.3` (as 2025.4, with rate limiting on).
    #[serde(default)]
    pub profile: Option<String>,
}

impl ServerSettings {
    /// Checks the server settings of a seed.
    fn validate(&self) -> Result<(), SeedError> {
        let settings = self;
        if let Some(profile) = &settings.profile {
            if ServerSettings::for_profile(profile).is_none() {
                return Err(SeedError::BadSetting {
                    key: "profile",
                    problem: format!("`{profile}` is not one of 2020.5, 2023.3, 2025.4, 2026.3"),
                });
            }
        }
        if let (Some(default), Some(max)) = (settings.api_key_default_expiry_days, settings.api_key_max_expiry_days) {
            if default > max {
                return Err(SeedError::BadSetting {
                    key: "api_key_default_expiry_days",
                    problem: format!("{default} is more than api_key_max_expiry_days ({max})"),
                });
            }
        }
        for (key, days) in [
            ("api_key_default_expiry_days", settings.api_key_default_expiry_days),
            ("api_key_max_expiry_days", settings.api_key_max_expiry_days),
        ] {
            // Octopus lets admins go up to 1096 days; far larger values would overflow dates.
            if days == Some(0) || days.is_some_and(|d| d > 36_500) {
                return Err(SeedError::BadSetting { key, problem: "must be between 1 and 36500 days".to_owned() });
            }
        }
        if settings.session_timeout_secs == 0 || settings.session_timeout_secs > 366 * 86_400 {
            return Err(SeedError::BadSetting {
                key: "session_timeout_secs",
                problem: "must be between 1 second and 366 days".to_owned(),
            });
        }
        if settings.version.trim().is_empty() {
            return Err(SeedError::BadSetting { key: "version", problem: "must not be empty".to_owned() });
        }
        if let Some(id) = &settings.installation_id {
            // It becomes part of cookie names, so keep it to cookie-name-safe characters.
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(SeedError::BadSetting {
                    key: "installation_id",
                    problem: "must be a GUID (letters, digits and dashes)".to_owned(),
                });
            }
        }
        Ok(())
    }
}

impl ServerSettings {
    /// The settings of a version profile (see [`ServerSettings::profile`]).
    pub fn for_profile(profile: &str) -> Option<Self> {
        let mut settings = Self::default();
        settings.apply_profile(profile).then_some(settings)
    }

    /// Sets the fields a version profile decides, keeping the others; false for an unknown one.
    pub fn apply_profile(&mut self, profile: &str) -> bool {
        match profile {
            "2020.5" => {
                self.version = "2020.5.0".to_owned();
                self.api_key_default_expiry_days = None;
                self.api_key_max_expiry_days = None;
                self.api_key_hint_length = 0;
                self.api_key_expiry_supported = false;
                self.api_key_last_use_tracked = false;
            }
            "2023.3" => {
                self.version = "2023.3.13026".to_owned();
                self.api_key_default_expiry_days = None;
                self.api_key_max_expiry_days = None;
                self.api_key_last_use_tracked = false;
            }
            "2025.4" => self.version = "2025.4.10333".to_owned(),
            "2026.3" => {
                self.version = "2026.3.1402".to_owned();
                self.rate_limit_per_minute = Some(600);
                self.rate_limit_burst = Some(200);
            }
            _ => return false,
        }
        self.profile = Some(profile.to_owned());
        true
    }
}

fn default_hint_length() -> usize {
    8
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            version: default_version(),
            installation_id: None,
            api_key_default_expiry_days: default_default_expiry(),
            api_key_max_expiry_days: default_max_expiry(),
            user_api_keys_enabled: true,
            session_timeout_secs: default_session_timeout(),
            cookie_session_limits_key_expiry: false,
            api_key_hint_length: default_hint_length(),
            api_key_expiry_supported: true,
            api_key_last_use_tracked: true,
            rate_limit_per_minute: None,
            rate_limit_burst: None,
            profile: None,
        }
    }
}

/// One user or service account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedUser {
    /// Unique, compared case-insensitively as Octopus does.
    pub username: String,
    /// Defaults to the username.
    #[serde(default)]
    pub display_name: Option<String>,
    /// `EmailAddress`; null when not given.
    #[serde(default)]
    pub email: Option<String>,
    /// A service account (API-only, no password).
    #[serde(default)]
    pub is_service: bool,
    /// Inactive users cannot sign in and their keys answer 401.
    #[serde(default = "yes")]
    pub is_active: bool,
    /// Our simplification of the `UserEdit` permission (with `UserView`): may read other users and
    /// manage the keys of service accounts no more privileged than itself.
    #[serde(default)]
    pub can_edit_users: bool,
    /// Further system permissions, e.g. `AdministerSystem` for an administrator, `ProjectEdit`:
    /// what the privilege rule compares (octopus-api.md §5.6).
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Enables `POST /api/users/login`; stored only as a salted hash.
    #[serde(default)]
    pub password: Option<String>,
}

/// An API key that exists at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedApiKey {
    /// The owner.
    pub username: String,
    /// The key itself (`API-` + uppercase letters and digits); hashed on load.
    pub secret: String,
    /// Free text, shown in key lists.
    #[serde(default = "default_seed_purpose")]
    pub purpose: String,
    /// Absolute expiry: an RFC 3339 string, or in TOML also a bare offset date-time
    /// (`expires = 2027-01-01T00:00:00Z`).
    #[serde(default, deserialize_with = "date_time")]
    pub expires: Option<DateTime<Utc>>,
    /// Expiry relative to the simulator's start; negative values seed an expired key.
    #[serde(default)]
    pub expires_in_days: Option<i64>,
}

/// Why a seed's text did not parse. Never a quote of the offending line, which could hold a
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedSyntax {
    #[error("line {line}, column {column}: {message}")]
    At { line: usize, column: usize, message: String },
    #[error("{0}")]
    Whole(String),
}

/// Why a seed was refused. Messages never contain a secret or a password.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The seed file could not be read.
    #[error("cannot read the seed file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The seed file is not valid TOML/JSON or has unknown fields.
    #[error("the seed file {path} is invalid: {syntax}")]
    Parse { path: PathBuf, syntax: SeedSyntax },
    /// Only `.toml` and `.json` seed files are understood.
    #[error("the seed file {0} must end in .toml or .json")]
    UnsupportedFormat(PathBuf),
    /// A username is empty or used twice (case-insensitively, generated users included).
    #[error("users: the username '{0}' is used more than once")]
    DuplicateUsername(String),
    /// A username is empty.
    #[error("users[{0}]: the username is empty")]
    EmptyUsername(usize),
    /// Service accounts are API-only in Octopus.
    #[error("users: '{0}' is a service account and cannot have a password")]
    PasswordOnServiceAccount(String),
    /// An API key names a user the seed does not define.
    #[error("api_keys[{index}]: no user named '{username}'")]
    UnknownKeyUser { index: usize, username: String },
    /// An API key is not `API-` followed by 20 to 40 uppercase letters or digits.
    #[error(
        "api_keys[{index}] (user '{username}'): the secret must be 'API-' followed by 20 to 40 \
         uppercase letters or digits"
    )]
    BadKeyFormat { index: usize, username: String },
    /// The same secret appears twice.
    #[error("api_keys[{index}] (user '{username}'): this secret is already used by another key")]
    DuplicateKey { index: usize, username: String },
    /// `expires` and `expires_in_days` are exclusive.
    #[error("api_keys[{index}] (user '{username}'): give either expires or expires_in_days, not both")]
    ConflictingExpiry { index: usize, username: String },
    /// `expires_in_days` beyond a century either way.
    #[error("api_keys[{index}] (user '{username}'): expires_in_days must be between -36500 and 36500")]
    BadExpiry { index: usize, username: String },
    /// A server setting is out of range.
    #[error("server.{key}: {problem}")]
    BadSetting { key: &'static str, problem: String },
}

impl Seed {
    /// Reads a seed from a `.toml` or `.json` file.
    pub fn from_file(path: &Path) -> Result<Seed, SeedError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| SeedError::Read { path: path.to_path_buf(), source })?;
        let parse_error = |syntax: SeedSyntax| SeedError::Parse { path: path.to_path_buf(), syntax };
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase) {
            Some(ext) if ext == "toml" => Self::from_toml(&text).map_err(parse_error),
            Some(ext) if ext == "json" => Self::from_json(&text).map_err(parse_error),
            _ => Err(SeedError::UnsupportedFormat(path.to_path_buf())),
        }
    }

    /// Parses a TOML seed. The error gives the line and column but not the parser's quote of the
    /// offending line, which could be a `secret = ...` or `password = ...` line.
    pub fn from_toml(text: &str) -> Result<Seed, SeedSyntax> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let message = e.message().trim_end().to_owned();
            match e.span() {
                Some(span) => {
                    let before = text.get(..span.start).unwrap_or_default();
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    SeedSyntax::At { line, column, message }
                }
                None => SeedSyntax::Whole(message),
            }
        })
    }

    /// Parses a JSON seed.
    pub fn from_json(text: &str) -> Result<Seed, SeedSyntax> {
        serde_json::from_str(text).map_err(|e| SeedSyntax::Whole(e.to_string()))
    }

    /// The seed dev mode runs: the broker's service account with [`DEMO_BROKER_API_KEY`], a few
    /// deploy service accounts, a human user `alice` (password `alice-password`), confusable
    /// names, an inactive account and 200 generated users.
    pub fn demo() -> Seed {
        let service = |username: &str, display_name: &str| SeedUser {
            username: username.to_owned(),
            display_name: Some(display_name.to_owned()),
            email: None,
            is_service: true,
            is_active: true,
            can_edit_users: false,
            permissions: Vec::new(),
            password: None,
        };
        let mut broker = service("keybroker", "keybroker broker account");
        broker.can_edit_users = true;
        let mut retired = service("svc-retired", "Retired deploy account");
        retired.is_active = false;
        let human = |username: &str, display_name: &str, password: Option<&str>| SeedUser {
            username: username.to_owned(),
            display_name: Some(display_name.to_owned()),
            email: Some(format!("{username}@example.com")),
            is_service: false,
            is_active: true,
            can_edit_users: false,
            permissions: Vec::new(),
            password: password.map(str::to_owned),
        };
        Seed {
            server: ServerSettings::default(),
            users: vec![
                broker,
                service("svc-payments-deploy", "Payments deployer"),
                service("svc-web-deploy", "Web deployer"),
                service("svc-readonly-reporting", "Read-only reporting"),
                human("alice", "Alice Example", Some("alice-password")),
                service("svc-payments-deploy-old", "Payments deployer (old)"),
                human("svc-payments-deployer", "Payments deployer (a person)", None),
                retired,
            ],
            api_keys: vec![
                SeedApiKey {
                    username: "keybroker".to_owned(),
                    secret: DEMO_BROKER_API_KEY.to_owned(),
                    purpose: "keybroker broker credential (dev mode)".to_owned(),
                    expires: None,
                    // Inside the 366-day maximum a 2025.4+ server would enforce.
                    expires_in_days: Some(365),
                },
                SeedApiKey {
                    username: "svc-web-deploy".to_owned(),
                    secret: DEMO_WEB_DEPLOY_API_KEY.to_owned(),
                    purpose: "Legacy web deploy key".to_owned(),
                    expires: None,
                    expires_in_days: Some(90),
                },
            ],
            extra_users: 200,
        }
    }

    /// Checks the seed without building a simulator; [`super::Simulator::new`] calls it too.
    pub fn validate(&self) -> Result<(), SeedError> {
        self.server.validate()?;
        let mut names = HashSet::with_capacity(self.users.len());
        for (index, user) in self.users.iter().enumerate() {
            if user.username.trim().is_empty() {
                return Err(SeedError::EmptyUsername(index));
            }
            if !names.insert(user.username.to_lowercase()) {
                return Err(SeedError::DuplicateUsername(user.username.clone()));
            }
            if user.is_service && user.password.is_some() {
                return Err(SeedError::PasswordOnServiceAccount(user.username.clone()));
            }
        }
        // Generated names can collide with seeded ones; say so rather than silently skip.
        for n in 1..=self.extra_users {
            let name = generated_username(n, self.extra_users);
            if names.contains(&name) {
                return Err(SeedError::DuplicateUsername(name));
            }
        }

        let mut secrets = HashSet::with_capacity(self.api_keys.len());
        for (index, key) in self.api_keys.iter().enumerate() {
            let username = key.username.clone();
            if !names.contains(&key.username.to_lowercase()) {
                return Err(SeedError::UnknownKeyUser { index, username });
            }
            if !is_api_key_format(&key.secret) {
                return Err(SeedError::BadKeyFormat { index, username });
            }
            if !secrets.insert(key.secret.as_str()) {
                return Err(SeedError::DuplicateKey { index, username });
            }
            if key.expires.is_some() && key.expires_in_days.is_some() {
                return Err(SeedError::ConflictingExpiry { index, username });
            }
            if key.expires_in_days.is_some_and(|d| d.abs() > 36_500) {
                return Err(SeedError::BadExpiry { index, username });
            }
        }
        Ok(())
    }
}

/// `API-` followed by 20 to 40 uppercase letters or digits: the broad validator octopus-api.md
/// §5.5 recommends, since Octopus never fixed the length.
pub(crate) fn is_api_key_format(text: &str) -> bool {
    text.strip_prefix("API-").is_some_and(|rest| {
        (20..=40).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    })
}

/// `user-000001`, ...; zero-padded so that username order is numeric order.
pub(crate) fn generated_username(n: usize, total: usize) -> String {
    let width = total.to_string().len().max(6);
    format!("user-{n:0width$}")
}

/// A plausible display name for generated user `n`, so that `filter` has names to match.
pub(crate) fn generated_display_name(n: usize) -> String {
    const FIRST: [&str; 16] = [
        "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Dennis", "Radia", "Tony",
        "Hedy", "John", "Sophie", "Niklaus",
    ];
    const LAST: [&str; 16] = [
        "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Hamilton", "Ritchie",
        "Perlman", "Hoare", "Lamarr", "Backus", "Wilson", "Wirth",
    ];
    let first = FIRST[n % FIRST.len()];
    let last = LAST[(n / FIRST.len()) % LAST.len()];
    format!("{first} {last} {n}")
}

fn default_version() -> String {
    "2026.3.0".to_owned()
}

fn default_default_expiry() -> Option<u32> {
    Some(180)
}

fn default_max_expiry() -> Option<u32> {
    Some(366)
}

fn default_session_timeout() -> u64 {
    1200
}

fn default_seed_purpose() -> String {
    "Seeded key".to_owned()
}

fn yes() -> bool {
    true
}

/// A day count, or "not configured": JSON `null`, or the string `"none"` (TOML has no null).
fn days_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Days {
        Number(u32),
        Word(String),
    }
    match Option::<Days>::deserialize(d)? {
        None => Ok(None),
        Some(Days::Number(n)) => Ok(Some(n)),
        Some(Days::Word(w)) if w.eq_ignore_ascii_case("none") => Ok(None),
        Some(Days::Word(w)) => {
            Err(serde::de::Error::custom(format!("expected a number of days or \"none\", found \"{w}\"")))
        }
    }
}

/// An RFC 3339 date-time with an offset, given as a string or as a TOML date-time.
fn date_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        String(String),
        Toml(toml::value::Datetime),
    }
    let text = match Option::<Text>::deserialize(d)? {
        None => return Ok(None),
        Some(Text::String(s)) => s,
        Some(Text::Toml(t)) => t.to_string(),
    };
    DateTime::parse_from_rfc3339(text.trim()).map(|at| Some(at.with_timezone(&Utc))).map_err(|e| {
        serde::de::Error::custom(format!(
            "expected a date-time with an offset such as 2027-01-01T00:00:00Z, found \"{text}\" ({e})"
        ))
    })
}
