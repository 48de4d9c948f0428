//! The simulator's in-memory server: users, hashed API keys, login sessions, and the rules Octopus
//! applies to them. Plain functions over plain data, so the rules are testable without HTTP.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use axum::http::HeaderValue;

use chrono::{DateTime, Duration, DurationRound, Utc};
use rand::Rng;
use rand::distributions::Alphanumeric;
use sha2::{Digest, Sha256};

use super::error::{ApiError, KEY_NOT_OWNED};
use super::faults::ActiveFault;
use super::seed::{Seed, SeedError, ServerSettings, generated_display_name, generated_username};

/// A SHA-256 digest.
pub(crate) type Digest32 = [u8; 32];

/// One user or service account.
#[derive(Debug, Clone)]
pub(crate) struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub email: Option<String>,
    pub is_service: bool,
    pub is_active: bool,
    pub can_edit_users: bool,
    /// Its effective system permissions (`UserView` and `UserEdit` with `can_edit_users`).
    pub permissions: BTreeSet<String>,
    /// Made by `extra_users` rather than listed in the seed.
    pub generated: bool,
    password: Option<PasswordHash>,
    /// Lower-cased copies for `filter`, computed once: filtering 100,000 users per request must
    /// not allocate per user.
    username_lc: String,
    display_name_lc: String,
    email_lc: String,
}

impl User {
    pub(crate) fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// `filter`: a case-insensitive substring of the username, display name or email address.
    pub(crate) fn matches(&self, needle_lc: &str) -> bool {
        self.username_lc.contains(needle_lc)
            || self.display_name_lc.contains(needle_lc)
            || self.email_lc.contains(needle_lc)
    }
}

/// A salted SHA-256 of a password: enough for a simulator, which only needs to not hold it in
/// clear.
#[derive(Debug, Clone)]
struct PasswordHash {
    salt: [u8; 16],
    hash: Digest32,
}

impl PasswordHash {
    fn new(password: &str) -> Self {
        let salt: [u8; 16] = rand::thread_rng().r#gen();
        Self { salt, hash: salted(&salt, password) }
    }

    fn verify(&self, password: &str) -> bool {
        salted(&self.salt, password) == self.hash
    }
}

fn salted(salt: &[u8], password: &str) -> Digest32 {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    hasher.finalize().into()
}

/// SHA-256 of a secret. Octopus itself stores API keys with PBKDF2 (octopus-api.md §5); a fast
/// hash is enough here because the simulator must only never keep the secret itself.
pub(crate) fn digest(secret: &str) -> Digest32 {
    Sha256::digest(secret.as_bytes()).into()
}

/// A stored API key: everything but the secret.
#[derive(Debug, Clone)]
pub(crate) struct ApiKeyRecord {
    pub id: String,
    pub user_id: String,
    pub purpose: String,
    pub created: DateTime<Utc>,
    pub expires: Option<DateTime<Utc>>,
    /// The first 8 characters of the secret (`API-ABCD`), as Octopus shows them.
    pub hint: String,
    pub actor_type: String,
    pub last_used: Option<DateTime<Utc>>,
    hash: Digest32,
    /// Creation order, to break ties between keys created in the same millisecond.
    seq: u64,
}

/// A login session.
#[derive(Debug, Clone)]
struct Session {
    user_id: String,
    csrf: String,
    expires: DateTime<Utc>,
}

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    ApiKey { key_id: String, expires: Option<DateTime<Utc>> },
    Session { expires: DateTime<Utc> },
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub user_id: String,
    pub can_edit_users: bool,
    pub permissions: BTreeSet<String>,
    pub credential: Credential,
}

/// What a request presented as a credential.
#[derive(Debug, Clone)]
pub(crate) enum Presented {
    ApiKey(String),
    Session { token: String, csrf: Option<String> },
    Nothing,
}

/// The `Expires` of a create request; omitted and `null` mean different things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RequestedExpiry {
    /// Absent: the server's default lifetime.
    Omitted,
    /// `null`: the server's maximum lifetime [C: DOC-AK].
    Null,
    At(DateTime<Utc>),
    /// Present but not a date-time with an offset.
    Unparseable,
}

/// A parsed `POST /api/users/{id}/apikeys` body.
#[derive(Debug, Clone)]
pub(crate) struct CreateKeyRequest {
    pub purpose: Option<String>,
    pub expires: RequestedExpiry,
    pub user_id: Option<String>,
    pub actor_type: Option<String>,
}

/// A successful login.
#[derive(Debug, Clone)]
pub(crate) struct Login {
    pub user: User,
    pub token: String,
    pub csrf: String,
}

/// The simulator's shared core: settings fixed at start, state behind a mutex that is never held
/// across an `.await`.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<SimState>,
    pub settings: ServerSettings,
    /// Suffix of the login cookie names.
    pub installation_id: String,
    /// `Octopus-Node: name=SIM; version=<version>`, or `None` if the version is not header-safe.
    pub node_header: Option<HeaderValue>,
}

impl Shared {
    pub(crate) fn new(seed: &Seed) -> Result<Self, SeedError> {
        let state = SimState::from_seed(seed)?;
        let mut settings = seed.server.clone();
        if let Some(profile) = seed.server.profile.clone() {
            settings.apply_profile(&profile);
        }
        let installation_id = settings.installation_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let node_header = HeaderValue::from_str(&format!("name=SIM; version={}", settings.version)).ok();
        Ok(Self { state: Mutex::new(state), settings, installation_id, node_header })
    }

    /// Locks the state. A panic while holding the lock cannot leave it half-updated in a way
    /// that matters to a simulator, so a poisoned lock is simply reused.
    pub(crate) fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Octopus's lockout: 9 failed logins lock the account for 10 minutes, counted from the ninth.
const LOCKOUT_AFTER: usize = 9;

/// Failed logins of one username since its last success or lock.
#[derive(Debug, Default)]
struct FailedLogins {
    count: usize,
    locked_until: Option<DateTime<Utc>>,
}
const LOCKOUT_MINUTES: i64 = 10;

/// The permission an administrator holds and whose holders only another administrator may read.
const ADMINISTER_SYSTEM: &str = "AdministerSystem";

/// Slack on the maximum-lifetime rule, so that a client computing "now + max" a moment before the
/// server does is not refused.
const MAX_EXPIRY_SLACK_SECS: i64 = 60;

/// Everything behind the simulator's mutex.
#[derive(Debug)]
pub(crate) struct SimState {
    /// Sorted by lower-cased username: the order of `GET /api/users`.
    users: Vec<User>,
    user_by_id: HashMap<String, usize>,
    user_by_name: HashMap<String, usize>,
    keys: HashMap<String, ApiKeyRecord>,
    key_by_hash: HashMap<Digest32, String>,
    sessions: HashMap<Digest32, Session>,
    next_seq: u64,
    clock_offset: Duration,
    pub(crate) counters: BTreeMap<String, u64>,
    pub(crate) faults: Vec<ActiveFault>,
    /// Recent failed logins per lower-cased username (the lockout).
    failed_logins: HashMap<String, FailedLogins>,
    /// Token buckets of the rate-limit mode, per user id (or `anonymous`).
    pub(crate) rate_buckets: HashMap<String, (f64, std::time::Instant)>,
}

impl SimState {
    /// Builds the state from a validated seed.
    pub(crate) fn from_seed(seed: &Seed) -> Result<Self, SeedError> {
        seed.validate()?;
        let mut users = Vec::with_capacity(seed.users.len() + seed.extra_users);
        for (index, spec) in seed.users.iter().enumerate() {
            let display_name = spec.display_name.clone().unwrap_or_else(|| spec.username.clone());
            let mut user = new_user(
                index + 1,
                spec.username.trim().to_owned(),
                display_name,
                spec.email.clone(),
                spec.is_service,
                spec.is_active,
                spec.can_edit_users,
                spec.password.as_deref().map(PasswordHash::new),
                false,
            );
            user.permissions.extend(spec.permissions.iter().map(|p| p.trim().to_owned()));
            users.push(user);
        }
        for n in 1..=seed.extra_users {
            let username = generated_username(n, seed.extra_users);
            let email = format!("{username}@example.com");
            users.push(new_user(
                seed.users.len() + n,
                username,
                generated_display_name(n),
                Some(email),
                false,
                true,
                false,
                None,
                true,
            ));
        }
        users.sort_by(|a, b| a.username_lc.cmp(&b.username_lc).then_with(|| a.username.cmp(&b.username)));
        let user_by_id = users.iter().enumerate().map(|(i, u)| (u.id.clone(), i)).collect();
        let user_by_name = users.iter().enumerate().map(|(i, u)| (u.username_lc.clone(), i)).collect();
        let mut state = Self {
            users,
            user_by_id,
            user_by_name,
            keys: HashMap::new(),
            key_by_hash: HashMap::new(),
            sessions: HashMap::new(),
            next_seq: 0,
            clock_offset: Duration::zero(),
            counters: BTreeMap::new(),
            faults: Vec::new(),
            failed_logins: HashMap::new(),
            rate_buckets: HashMap::new(),
        };
        let now = state.now();
        for (index, spec) in seed.api_keys.iter().enumerate() {
            let user_id = state
                .user_by_name(&spec.username)
                .map(|u| u.id.clone())
                .ok_or_else(|| SeedError::UnknownKeyUser { index, username: spec.username.clone() })?;
            let expires = match (spec.expires, spec.expires_in_days) {
                (Some(at), _) => Some(at),
                (None, Some(days)) => Some(now + Duration::days(days)),
                (None, None) => None,
            };
            state.store_key(&user_id, spec.purpose.clone(), &spec.secret, expires, "User", now);
        }
        Ok(state)
    }

    /// The simulator's clock: real time plus the test offset, to the millisecond as Octopus
    /// stores it.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        let real = Utc::now();
        let now = real.checked_add_signed(self.clock_offset).unwrap_or(real);
        now.duration_trunc(Duration::milliseconds(1)).unwrap_or(now)
    }

    /// Moves the clock; a shift that would overflow is ignored.
    pub(crate) fn advance_clock(&mut self, by: Duration) {
        if let Some(offset) = self.clock_offset.checked_add(&by) {
            self.clock_offset = offset;
        }
    }

    pub(crate) fn users(&self) -> &[User] {
        &self.users
    }

    pub(crate) fn user(&self, id: &str) -> Option<&User> {
        self.user_by_id.get(id).and_then(|&i| self.users.get(i))
    }

    pub(crate) fn user_by_name(&self, username: &str) -> Option<&User> {
        self.user_by_name.get(&username.trim().to_lowercase()).and_then(|&i| self.users.get(i))
    }

    /// Returns false when there is no such user.
    pub(crate) fn set_user_active(&mut self, username: &str, active: bool) -> bool {
        match self.user_by_name.get(&username.trim().to_lowercase()) {
            Some(&i) => match self.users.get_mut(i) {
                Some(user) => {
                    user.is_active = active;
                    true
                }
                None => false,
            },
            None => false,
        }
    }

    /// Every key, oldest first.
    pub(crate) fn all_keys(&self) -> Vec<&ApiKeyRecord> {
        let mut keys: Vec<_> = self.keys.values().collect();
        keys.sort_by_key(|k| k.seq);
        keys
    }

    /// Removes a key without any request: a colleague revoking it in the Octopus portal.
    pub(crate) fn remove_key(&mut self, key_id: &str) -> bool {
        match self.keys.remove(key_id) {
            Some(key) => {
                self.key_by_hash.remove(&key.hash);
                true
            }
            None => false,
        }
    }

    fn store_key(
        &mut self,
        user_id: &str,
        purpose: String,
        secret: &str,
        expires: Option<DateTime<Utc>>,
        actor_type: &str,
        now: DateTime<Utc>,
    ) -> ApiKeyRecord {
        let record = ApiKeyRecord {
            id: new_key_id(),
            user_id: user_id.to_owned(),
            purpose,
            created: now,
            expires,
            hint: secret.chars().take(8).collect(),
            actor_type: actor_type.to_owned(),
            last_used: None,
            hash: digest(secret),
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.key_by_hash.insert(record.hash, record.id.clone());
        self.keys.insert(record.id.clone(), record.clone());
        record
    }

    /// Checks a credential. Every failure is the same 401, as Octopus does not say why.
    /// The user a credential belongs to, without using it (for rate limiting).
    pub(crate) fn user_of(&self, presented: &Presented) -> Option<String> {
        match presented {
            Presented::Nothing => None,
            Presented::ApiKey(secret) => {
                self.key_by_hash.get(&digest(secret.trim())).and_then(|id| self.keys.get(id)).map(|k| k.user_id.clone())
            }
            Presented::Session { token, .. } => self.sessions.get(&digest(token)).map(|s| s.user_id.clone()),
        }
    }

    pub(crate) fn authenticate(&mut self, presented: &Presented) -> Result<Caller, ApiError> {
        let now = self.now();
        let (user_id, credential) = match presented {
            Presented::Nothing => return Err(ApiError::Unauthorized),
            Presented::ApiKey(secret) => {
                let key_id = self.key_by_hash.get(&digest(secret.trim())).ok_or(ApiError::Unauthorized)?;
                let key = self.keys.get_mut(key_id).ok_or(ApiError::Unauthorized)?;
                if key.expires.is_some_and(|e| e <= now) {
                    return Err(ApiError::Unauthorized);
                }
                key.last_used = Some(now);
                let credential = Credential::ApiKey { key_id: key.id.clone(), expires: key.expires };
                (key.user_id.clone(), credential)
            }
            Presented::Session { token, csrf } => {
                let hash = digest(token);
                let session = self.sessions.get(&hash).ok_or(ApiError::Unauthorized)?;
                if session.expires <= now {
                    self.sessions.remove(&hash);
                    return Err(ApiError::Unauthorized);
                }
                // Cookie sessions must echo the CSRF cookie in `X-Octopus-Csrf-Token`. Whether
                // Octopus insists on GETs is unknown (octopus-api.md §12.6); its clients always
                // send it, so the simulator insists, to catch a client that forgets.
                if csrf.as_deref() != Some(session.csrf.as_str()) {
                    return Err(ApiError::Unauthorized);
                }
                let credential = Credential::Session { expires: session.expires };
                (session.user_id.clone(), credential)
            }
        };
        // A disabled user's keys and sessions stop working at once [C: DOC-UT].
        let user = self.user(&user_id).filter(|u| u.is_active).ok_or(ApiError::Unauthorized)?;
        Ok(Caller { user_id, can_edit_users: user.can_edit_users, permissions: user.permissions.clone(), credential })
    }

    /// `POST /api/users/login`. Service accounts and inactive users cannot sign in; every failure
    /// answers the same message.
    pub(crate) fn login(
        &mut self,
        settings: &ServerSettings,
        username: &str,
        password: &str,
    ) -> Result<Login, ApiError> {
        let invalid = || ApiError::BadRequest(super::error::INVALID_LOGIN.to_owned());
        let now = self.now();
        // "Accounts are locked for 10 minutes after 9 failed login attempts" (octopus-api.md §2),
        // counted here per username; a locked account refuses even the right password.
        let key = username.trim().to_lowercase();
        let failures = self.failed_logins.entry(key.clone()).or_default();
        match failures.locked_until {
            Some(until) if until > now => return Err(invalid()),
            // The lock is over: counting starts again.
            Some(_) => *failures = FailedLogins::default(),
            None => {}
        }
        let verified = self.user_by_name(username).is_some_and(|user| {
            user.password.as_ref().is_some_and(|hash| hash.verify(password)) && !user.is_service && user.is_active
        });
        if !verified {
            let failures = self.failed_logins.entry(key).or_default();
            failures.count += 1;
            if failures.count >= LOCKOUT_AFTER {
                failures.locked_until = Some(now + Duration::minutes(LOCKOUT_MINUTES));
            }
            return Err(invalid());
        }
        self.failed_logins.remove(&key);
        let user = self.user_by_name(username).ok_or_else(invalid)?.clone();
        let token = random_token();
        // Characters that need URL-encoding in a cookie, as Octopus's tokens have.
        let csrf = random_token();
        let timeout = i64::try_from(settings.session_timeout_secs).unwrap_or(i64::MAX);
        let expires = self.now() + Duration::seconds(timeout);
        self.sessions.insert(digest(&token), Session { user_id: user.id.clone(), csrf: csrf.clone(), expires });
        Ok(Login { user, token, csrf })
    }

    /// Ends the session the cookie names, when the CSRF header matches it.
    pub(crate) fn logout(&mut self, token: &str, csrf: Option<&str>) {
        let hash = digest(token);
        if self.sessions.get(&hash).is_some_and(|s| csrf == Some(s.csrf.as_str())) {
            self.sessions.remove(&hash);
        }
    }

    /// Reading another user, or their keys, needs `UserEdit`; one's own needs nothing.
    fn require_self_or_user_edit(caller: &Caller, user_id: &str) -> Result<(), ApiError> {
        if caller.user_id == user_id || caller.can_edit_users {
            Ok(())
        } else {
            Err(ApiError::MissingPermission("UserEdit"))
        }
    }

    /// `GET /api/users/{id}`. An administrator's document also needs `AdministerSystem`
    /// (Octopus issue 4355).
    pub(crate) fn get_user(&self, caller: &Caller, user_id: &str) -> Result<&User, ApiError> {
        Self::require_self_or_user_edit(caller, user_id)?;
        let user = self.user(user_id).ok_or_else(|| ApiError::NotFound(user_id.to_owned()))?;
        if caller.user_id != user_id
            && user.permissions.contains(ADMINISTER_SYSTEM)
            && !caller.permissions.contains(ADMINISTER_SYSTEM)
        {
            return Err(ApiError::MissingPermission(ADMINISTER_SYSTEM));
        }
        Ok(user)
    }

    /// The privilege rule (Octopus issue 5766): another user's keys are managed only for service
    /// accounts, never human users (not even by an administrator), and only for accounts no
    /// more privileged than the caller, i.e. whose permissions the caller holds too.
    fn require_may_manage_keys(caller: &Caller, target: &User) -> Result<(), ApiError> {
        Self::require_may_read_keys(caller, target)?;
        if caller.user_id != target.id && !target.is_service {
            return Err(ApiError::Forbidden);
        }
        Ok(())
    }

    /// Listing or reading another user's keys: `UserEdit`, and the privilege rule's "no more
    /// privileged than the caller" (octopus-api.md §5.6: the cheapest probe of the rule).
    fn require_may_read_keys(caller: &Caller, target: &User) -> Result<(), ApiError> {
        if caller.user_id == target.id {
            return Ok(());
        }
        if !caller.can_edit_users {
            return Err(ApiError::MissingPermission("UserEdit"));
        }
        if !target.permissions.is_subset(&caller.permissions) {
            return Err(ApiError::Forbidden);
        }
        Ok(())
    }

    /// `GET /api/users/{id}/apikeys`: most recent first, optionally filtered.
    pub(crate) fn list_keys(
        &self,
        caller: &Caller,
        user_id: &str,
        partial_purpose: Option<&str>,
        partial_keyword: Option<&str>,
    ) -> Result<Vec<&ApiKeyRecord>, ApiError> {
        let target = self.get_user(caller, user_id)?;
        Self::require_may_read_keys(caller, target)?;
        let purpose_lc = partial_purpose.map(str::to_lowercase);
        let keyword_lc = partial_keyword.map(str::to_lowercase);
        let mut keys: Vec<_> = self
            .keys
            .values()
            .filter(|k| k.user_id == user_id)
            .filter(|k| purpose_lc.as_deref().is_none_or(|p| k.purpose.to_lowercase().contains(p)))
            .filter(|k| {
                keyword_lc
                    .as_deref()
                    .is_none_or(|w| k.purpose.to_lowercase().contains(w) || k.hint.to_lowercase().contains(w))
            })
            .collect();
        keys.sort_by(|a, b| b.created.cmp(&a.created).then(b.seq.cmp(&a.seq)));
        Ok(keys)
    }

    /// Finds a key through the route `/api/users/{user_id}/apikeys/{key_id}`.
    fn owned_key(&self, caller: &Caller, user_id: &str, key_id: &str) -> Result<&ApiKeyRecord, ApiError> {
        let target = self.get_user(caller, user_id)?;
        Self::require_may_read_keys(caller, target)?;
        let key = self.keys.get(key_id).ok_or_else(|| ApiError::NotFound(key_id.to_owned()))?;
        if key.user_id != user_id {
            return Err(ApiError::BadRequest(KEY_NOT_OWNED.to_owned()));
        }
        Ok(key)
    }

    /// `GET /api/users/{id}/apikeys/{keyId}`.
    pub(crate) fn get_key(&self, caller: &Caller, user_id: &str, key_id: &str) -> Result<&ApiKeyRecord, ApiError> {
        self.owned_key(caller, user_id, key_id)
    }

    /// `DELETE /api/users/{id}/apikeys/{keyId}`: a hard delete; the key stops working at once.
    pub(crate) fn delete_key(&mut self, caller: &Caller, user_id: &str, key_id: &str) -> Result<(), ApiError> {
        self.owned_key(caller, user_id, key_id)?;
        if let Some(target) = self.user(user_id) {
            Self::require_may_manage_keys(caller, target)?;
        }
        self.remove_key(key_id);
        Ok(())
    }

    /// `POST /api/users/{id}/apikeys`: checks permission, the target, then the body, and stores
    /// the key. Returns the record and the secret, which is not kept.
    pub(crate) fn create_key(
        &mut self,
        settings: &ServerSettings,
        caller: &Caller,
        user_id: &str,
        request: Result<CreateKeyRequest, ApiError>,
    ) -> Result<(ApiKeyRecord, String), ApiError> {
        let for_self = caller.user_id == user_id;
        if !for_self && !caller.can_edit_users {
            return Err(ApiError::MissingPermission("UserEdit"));
        }
        let target = self.get_user(caller, user_id)?;
        // Even administrators cannot create keys for another human user, only for service
        // accounts [C: ISS-5987, ISS-5920], and never for a more privileged one [C: ISS-5766];
        // the exact 403 text is unknown beyond its prefix.
        Self::require_may_manage_keys(caller, target)?;
        if !target.is_active {
            return Err(ApiError::invalid(format!(
                "The user '{}' is not active, so API keys cannot be created for it.",
                target.username
            )));
        }
        // Assumption: when user API keys are disabled (2023.2+), a validation error; the real
        // status and text are unknown (octopus-api.md §5.2).
        if !settings.user_api_keys_enabled && !target.is_service {
            return Err(ApiError::invalid(
                "API keys are disabled for users; they can only be created for service accounts.",
            ));
        }
        let request = request?;
        let purpose = request
            .purpose
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ApiError::invalid("Please provide a purpose for this API key."))?
            .to_owned();
        if let Some(body_user) = request.user_id.as_deref() {
            if !body_user.is_empty() && body_user != user_id {
                return Err(ApiError::invalid("The UserId in the request body does not match the user in the URL."));
            }
        }
        let actor_type = match request.actor_type.as_deref() {
            None | Some("") => "User",
            Some(t) if t.eq_ignore_ascii_case("User") => "User",
            Some(t) if t.eq_ignore_ascii_case("AiAgent") => "AiAgent",
            Some(t) => {
                return Err(ApiError::invalid(format!("'{t}' is not a valid ActorType; use User or AiAgent.")));
            }
        };
        let now = self.now();
        let expires = resolve_expiry(settings, caller, &request.expires, now)?;
        let secret = new_secret();
        let record = self.store_key(user_id, purpose, &secret, expires, actor_type, now);
        Ok((record, secret))
    }
}

/// Octopus's expiry rules [C: DOC-KEY, DOC-AK]: omitted means the default lifetime, `null` the
/// maximum; an explicit date must be in the future and within the maximum; and no key may
/// outlive the API key that created it. Error texts are assumptions (octopus-api.md §12.1).
fn resolve_expiry(
    settings: &ServerSettings,
    caller: &Caller,
    requested: &RequestedExpiry,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    // Servers before 2020.6 have no key expiry: `Expires` is ignored and the key never expires.
    if !settings.api_key_expiry_supported {
        return Ok(None);
    }
    let days_from_now = |days: u32| now + Duration::days(i64::from(days));
    let expires = match requested {
        RequestedExpiry::Omitted => settings.api_key_default_expiry_days.map(days_from_now),
        RequestedExpiry::Null => settings.api_key_max_expiry_days.map(days_from_now),
        RequestedExpiry::Unparseable => {
            return Err(ApiError::invalid(
                "Expires must be a date and time with an offset, such as 2026-12-31T23:59:59.000+00:00.",
            ));
        }
        RequestedExpiry::At(at) => {
            if *at <= now {
                return Err(ApiError::invalid("The expiry date must be in the future."));
            }
            if let Some(max) = settings.api_key_max_expiry_days {
                if *at > days_from_now(max) + Duration::seconds(MAX_EXPIRY_SLACK_SECS) {
                    return Err(ApiError::invalid(format!(
                        "The expiry date cannot be more than {max} days in the future."
                    )));
                }
            }
            Some(at.duration_trunc(Duration::milliseconds(1)).unwrap_or(*at))
        }
    };
    let limit = match &caller.credential {
        Credential::ApiKey { expires, .. } => *expires,
        Credential::Session { expires } if settings.cookie_session_limits_key_expiry => Some(*expires),
        Credential::Session { .. } => None,
    };
    if let Some(limit) = limit {
        // A never-expiring key cannot be created by a caller that itself expires.
        if expires.is_none_or(|e| e > limit) {
            return Err(ApiError::invalid(format!(
                "The API key cannot expire after the credential used to create it, which expires at {}.",
                super::wire::format_date(limit)
            )));
        }
    }
    Ok(expires)
}

#[allow(clippy::too_many_arguments)]
fn new_user(
    number: usize,
    username: String,
    display_name: String,
    email: Option<String>,
    is_service: bool,
    is_active: bool,
    can_edit_users: bool,
    password: Option<PasswordHash>,
    generated: bool,
) -> User {
    User {
        id: format!("Users-{number}"),
        username_lc: username.to_lowercase(),
        display_name_lc: display_name.to_lowercase(),
        email_lc: email.as_deref().map(str::to_lowercase).unwrap_or_default(),
        username,
        display_name,
        email,
        is_service,
        is_active,
        can_edit_users,
        permissions: if can_edit_users {
            ["UserView", "UserEdit"].into_iter().map(str::to_owned).collect()
        } else {
            BTreeSet::new()
        },
        generated,
        password,
    }
}

/// `API-` + 26 uppercase letters and digits, the length gitleaks and leaked keys show.
fn new_secret() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    let body: String = (0..26).map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())])).collect();
    format!("API-{body}")
}

/// `apikeys-` + 26 mixed-case alphanumerics: opaque, like `apikeys-I6D74k9rh7eyoqXDlqJCvlsVgU`.
fn new_key_id() -> String {
    let body: String = rand::thread_rng().sample_iter(&Alphanumeric).take(26).map(char::from).collect();
    format!("apikeys-{body}")
}

/// A session token in standard base64, so that `+`, `/` and `=` make the URL-encoding of the
/// cookie value matter, as with Octopus's own tokens.
fn random_token() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::thread_rng().r#gen();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(expires: Option<DateTime<Utc>>) -> Caller {
        Caller {
            user_id: "Users-1".to_owned(),
            can_edit_users: true,
            permissions: BTreeSet::new(),
            credential: Credential::ApiKey { key_id: "apikeys-x".to_owned(), expires },
        }
    }

    #[test]
    fn omitted_expiry_is_the_default_and_null_the_maximum() {
        let settings = ServerSettings::default();
        let now = Utc::now();
        let c = caller(None);
        let omitted = resolve_expiry(&settings, &c, &RequestedExpiry::Omitted, now).unwrap();
        let null = resolve_expiry(&settings, &c, &RequestedExpiry::Null, now).unwrap();
        assert_eq!(omitted, Some(now + Duration::days(180)));
        assert_eq!(null, Some(now + Duration::days(366)));
    }

    #[test]
    fn servers_without_expiry_settings_create_never_expiring_keys() {
        let settings = ServerSettings {
            api_key_default_expiry_days: None,
            api_key_max_expiry_days: None,
            ..ServerSettings::default()
        };
        let now = Utc::now();
        let c = caller(None);
        assert_eq!(resolve_expiry(&settings, &c, &RequestedExpiry::Omitted, now).unwrap(), None);
        assert_eq!(resolve_expiry(&settings, &c, &RequestedExpiry::Null, now).unwrap(), None);
        // No maximum: ten years is fine.
        let far = RequestedExpiry::At(now + Duration::days(3650));
        assert!(resolve_expiry(&settings, &c, &far, now).is_ok());
    }

    #[test]
    fn an_expiring_caller_cannot_create_a_never_expiring_key() {
        let settings = ServerSettings {
            api_key_default_expiry_days: None,
            api_key_max_expiry_days: None,
            ..ServerSettings::default()
        };
        let now = Utc::now();
        let c = caller(Some(now + Duration::days(10)));
        assert!(resolve_expiry(&settings, &c, &RequestedExpiry::Omitted, now).is_err());
    }

    #[test]
    fn max_rule_allows_a_minute_of_slack() {
        let settings = ServerSettings::default();
        let now = Utc::now();
        let c = caller(None);
        let at = |secs| RequestedExpiry::At(now + Duration::days(366) + Duration::seconds(secs));
        assert!(resolve_expiry(&settings, &c, &at(30), now).is_ok());
        assert!(resolve_expiry(&settings, &c, &at(120), now).is_err());
    }

    #[test]
    fn secrets_and_ids_have_octopus_shapes() {
        let secret = new_secret();
        assert!(super::super::seed::is_api_key_format(&secret));
        assert_eq!(secret.len(), 30);
        let id = new_key_id();
        assert!(id.starts_with("apikeys-") && id.len() == 34);
    }
}
