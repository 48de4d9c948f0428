//! `keybroker doctor`: what a platform engineer runs against their real Octopus Server before
//! going live. Every check is a row with a status, what was found and, for a problem, how to fix
//! it; with `--probe-create` each scope's account also gets a real key (10 minutes, deleted at
//! once) that is checked to authenticate as that account.

use std::fmt::Write as _;

use chrono::Utc;
use secrecy::ExposeSecret;

use crate::config::{Config, OctopusConfig, OctopusCredential};
use crate::domain::policy::Scope;
use crate::octopus::{BrokerKeyExpiry, OctopusClient, OctopusError, OctopusUser};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub status: Status,
    pub check: String,
    pub detail: String,
    /// For a warning or failure: what to do.
    pub fix: Option<String>,
}

impl Row {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { status: Status::Ok, check: check.into(), detail: detail.into(), fix: None }
    }

    fn warn(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { status: Status::Warn, check: check.into(), detail: detail.into(), fix: Some(fix.into()) }
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { status: Status::Fail, check: check.into(), detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// Runs every check against the configured Octopus Server.
pub async fn run(config: &Config, probe_create: bool) -> Result<Vec<Row>, reqwest::Error> {
    let octopus = OctopusClient::new(&config.octopus)?;
    let mut rows = Vec::new();
    let info = match octopus.server_info().await {
        Ok(info) => info,
        Err(e) => {
            rows.push(Row::fail("server", e.to_string(), "check octopus.url: keybroker must reach the server's /api"));
            return Ok(rows);
        }
    };
    rows.push(Row::ok(
        "server",
        format!("Octopus {} at {}", info.version.as_deref().unwrap_or("(version not shown)"), config.octopus.url),
    ));
    rows.push(rate_limit_row(&info, config.octopus.max_requests_per_minute));
    let me = match octopus.current_user().await {
        Ok(me) => me,
        Err(e) => {
            rows.push(Row::fail(
                "credential",
                e.to_string(),
                "check octopus.api_key_file (or username and password_file): the key must be valid and its user active",
            ));
            return Ok(rows);
        }
    };
    rows.push(if me.is_service {
        Row::ok("credential", format!("signed in as {} ({}), a service account", me.username, me.id))
    } else {
        Row::warn(
            "credential",
            format!("signed in as {} ({}), a person's account", me.username, me.id),
            "give keybroker a service account of its own, so that no person's departure breaks it",
        )
    });
    rows.push(expiry_row(&octopus, &config.octopus).await);
    rows.push(limits_row(&octopus).await);
    for scope in config.policy.scopes() {
        let account = scope_rows(&octopus, scope, &mut rows).await;
        if let (true, Some(account)) = (probe_create, account) {
            rows.push(probe_create_row(&octopus, &config.octopus, scope, &account).await);
        }
    }
    Ok(rows)
}

/// The server's rate-limit policy (from the same `GET /api`), against keybroker's own pace.
fn rate_limit_row(info: &crate::octopus::ServerInfo, ours: u32) -> Row {
    match &info.rate_limit_policy {
        Some(policy) => {
            let rpm = policy.split(';').find_map(|p| p.trim().strip_prefix("rpm=")).and_then(|n| n.parse::<u32>().ok());
            let detail = format!(
                "the server rate-limits ({policy}{}); keybroker paces itself at {ours}/min",
                info.rate_limit.as_ref().map(|r| format!(", now {r}")).unwrap_or_default()
            );
            match rpm {
                Some(rpm) if ours == 0 || ours > rpm => Row::warn(
                    "rate limits",
                    detail,
                    format!("set octopus.max_requests_per_minute below the server's {rpm}"),
                ),
                _ => Row::ok("rate limits", detail),
            }
        }
        None => Row::ok(
            "rate limits",
            format!(
                "no Octopus-RateLimit headers (a server before 2026.3, or policies off); keybroker paces itself at {ours}/min"
            ),
        ),
    }
}

async fn expiry_row(octopus: &OctopusClient, config: &OctopusConfig) -> Row {
    let hint = match &config.credential {
        OctopusCredential::ApiKey(key) => key.expose_secret().chars().take(7).collect::<String>(),
        OctopusCredential::Login { .. } => String::new(),
    };
    match octopus.broker_key_expiry().await {
        Ok(BrokerKeyExpiry::Session) => Row::ok("credential expiry", "a login session: no API key to expire"),
        Ok(BrokerKeyExpiry::Found(Some(at))) => {
            let days = (at - Utc::now()).num_days();
            let detail = format!(
                "keybroker's key ({hint}…) expires at {} ({days} days), found by its hint among its user's keys",
                at.to_rfc3339()
            );
            if days < 20 {
                Row::warn(
                    "credential expiry",
                    detail,
                    "create a new key for keybroker's account and swap octopus.api_key_file",
                )
            } else {
                Row::ok("credential expiry", detail)
            }
        }
        Ok(BrokerKeyExpiry::Found(None)) => Row::warn(
            "credential expiry",
            format!("keybroker's key ({hint}…) never expires"),
            "give keybroker's key an expiry and a rotation date: it can mint keys for every scope",
        ),
        Ok(BrokerKeyExpiry::NotFound { listed }) => Row::warn(
            "credential expiry",
            format!(
                "keybroker's own key was not found among the {listed} keys of its user (hints are matched as prefixes)"
            ),
            "the expiry stays unknown, so keys are issued without that bound; on servers that keep no hint (before \
             November 2020) this is expected",
        ),
        Err(e) => {
            Row::fail("credential expiry", e.to_string(), "keybroker's account must be able to list its own keys")
        }
    }
}

async fn limits_row(octopus: &OctopusClient) -> Row {
    match octopus.key_settings().await {
        Ok(s) => Row::ok(
            "server key limits",
            format!(
                "default lifetime {}, maximum {}",
                s.default_expiry_days.map_or_else(|| "not set".to_owned(), |d| format!("{d} days")),
                s.max_expiry_days
                    .map_or_else(|| "not set (no maximum before 2025.4)".to_owned(), |d| format!("{d} days")),
            ),
        ),
        Err(e) => Row::fail("server key limits", e.to_string(), "keybroker reads GET /api/authentication at start"),
    }
}

/// The account checks of one scope; the account when every one passed.
async fn scope_rows(octopus: &OctopusClient, scope: &Scope, rows: &mut Vec<Row>) -> Option<OctopusUser> {
    let check = format!("scope {}", scope.name);
    let user = match octopus.find_user(&scope.octopus_user).await {
        Ok(Some(user)) => user,
        Ok(None) => {
            rows.push(Row::fail(
                &check,
                format!("no Octopus user is named exactly `{}`", scope.octopus_user),
                "create the service account, or fix the scope's octopus_user",
            ));
            return None;
        }
        Err(e) => {
            rows.push(Row::fail(&check, e.to_string(), "keybroker's account needs UserView to find users"));
            return None;
        }
    };
    if !user.is_service {
        rows.push(Row::fail(
            &check,
            format!("`{}` ({}) is a person's account", user.username, user.id),
            "Octopus never lets keybroker manage a person's keys: name a service account",
        ));
        return None;
    }
    if !user.is_active {
        rows.push(Row::fail(
            &check,
            format!("`{}` ({}) is disabled", user.username, user.id),
            "enable the account in Octopus",
        ));
        return None;
    }
    match octopus.probe_keys(&user.id).await {
        Ok(()) => {
            rows.push(Row::ok(
                &check,
                format!("`{}` ({}): an active service account whose keys keybroker may manage", user.username, user.id),
            ));
            Some(user)
        }
        Err(OctopusError::Credential { status: 403, message }) => {
            rows.push(Row::fail(
                &check,
                format!("Octopus refuses keybroker the keys of `{}` ({}): {message}", user.username, user.id),
                format!(
                    "Octopus's privilege rule: keybroker's account needs UserEdit and every permission `{}` has \
                     (AdministerSystem for an administrator); or name a less privileged service account",
                    user.username
                ),
            ));
            None
        }
        Err(e) => {
            rows.push(Row::fail(
                &check,
                format!("cannot list the keys of `{}`: {e}", user.username),
                "check keybroker's permissions",
            ));
            None
        }
    }
}

/// Creates a 10-minute key for the scope's account, checks that Octopus honoured its expiry and
/// that it authenticates as that account, deletes it and checks that it is gone. A probe key is
/// never left behind knowingly: when the create's outcome is unknown, keys with the probe's
/// purpose are looked for and deleted.
async fn probe_create_row(
    octopus: &OctopusClient,
    config: &OctopusConfig,
    scope: &Scope,
    account: &OctopusUser,
) -> Row {
    let check = format!("probe-create {}", scope.name);
    let purpose =
        format!("keybroker:doctor {} probe of scope {}", Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"), scope.name);
    let expires = Utc::now() + chrono::Duration::minutes(10);
    let created = match octopus.create_api_key(&account.id, &purpose, expires).await {
        Ok(created) => created,
        Err(e) => {
            let cleaned =
                if e.outcome_unknown() { clean_up(octopus, &account.id, &purpose).await } else { String::new() };
            return Row::fail(
                &check,
                format!("creating a key failed: {e}{cleaned}"),
                "see the scope's row; keybroker's account needs UserEdit on this account",
            );
        }
    };
    let honoured = created.expires.is_some_and(|at| (at - expires).num_seconds().abs() <= 60);
    let as_key = OctopusConfig { credential: OctopusCredential::ApiKey(created.secret.clone()), ..config.clone() };
    let authenticated = match OctopusClient::new(&as_key) {
        Ok(client) => client.current_user().await.map(|u| u.id),
        Err(e) => Err(OctopusError::Unavailable { detail: e.to_string() }),
    };
    let deleted = octopus.delete_api_key(&account.id, &created.id).await;
    let gone = octopus.get_api_key(&account.id, &created.id).await;
    // Whatever else went wrong, a probe key left behind is said first.
    let left_behind = match (&deleted, &gone) {
        (Err(e), _) => Some(format!("deleting probe key {} failed: {e}", created.id)),
        (_, Ok(Some(_))) => Some(format!("probe key {} still exists after its delete", created.id)),
        (_, Err(e)) => Some(format!("cannot check that probe key {} is gone: {e}", created.id)),
        _ => None,
    };
    if let Some(problem) = left_behind {
        return Row::fail(
            &check,
            problem,
            format!("delete key {} of {} in Octopus by hand", created.id, account.username),
        );
    }
    if !honoured {
        return Row::fail(
            &check,
            format!(
                "Octopus made the key with expiry {:?} instead of {}",
                created.expires.map(|t| t.to_rfc3339()),
                expires.to_rfc3339()
            ),
            "this server ignores Expires (before 2020.6): keybroker refuses to issue keys that never expire",
        );
    }
    match authenticated {
        Ok(id) if id == account.id => Row::ok(
            &check,
            format!(
                "made key {} for {}, it authenticated as {id}, deleted it, and it is gone",
                created.id, account.username
            ),
        ),
        Ok(id) => Row::fail(
            &check,
            format!("the new key authenticated as {id}, not {}", account.id),
            "report this: Octopus made a key for another user",
        ),
        Err(e) => Row::fail(
            &check,
            format!("the new key did not authenticate: {e}"),
            "check the account is active and API keys are enabled",
        ),
    }
}

/// Deletes any key of `user_id` carrying exactly `purpose` (a probe whose create answer was
/// lost); says what it did.
async fn clean_up(octopus: &OctopusClient, user_id: &str, purpose: &str) -> String {
    match octopus.list_api_keys(user_id, Some(purpose)).await {
        Ok(keys) => {
            let mut deleted = Vec::new();
            for key in keys.iter().filter(|k| k.purpose == purpose) {
                if octopus.delete_api_key(user_id, &key.id).await.is_ok() {
                    deleted.push(key.id.clone());
                }
            }
            if deleted.is_empty() {
                String::new()
            } else {
                format!(" (the key it made anyway, {}, was deleted)", deleted.join(", "))
            }
        }
        Err(e) => format!(" (and keys with its purpose could not be looked for: {e}; look for `{purpose}` by hand)"),
    }
}

/// The rows as a table, with fix lines under problems.
pub fn render(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.check.len()).max().unwrap_or(0);
    let mut out = String::new();
    for row in rows {
        let status = match row.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(out, "{status}  {:<width$}  {}", row.check, row.detail);
        if let Some(fix) = &row.fix {
            let _ = writeln!(out, "      {:<width$}  fix: {fix}", "");
        }
    }
    out
}

/// Whether any check failed (`doctor` then exits 1).
pub fn failed(rows: &[Row]) -> bool {
    rows.iter().any(|r| r.status == Status::Fail)
}
