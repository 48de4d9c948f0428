//! `[ui]` (the page at `/` and its OpenID Connect sign-in), `[tickets]` (chat-ops pickup
//! tickets) and `server.public_url` (the address people open, which pickup links are built on).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{AuthConfig, ConfigError, HumanDuration, transport};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUi {
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub token: UiToken,
    #[serde(default)]
    pub allow_insecure_http: bool,
}

impl Default for RawUi {
    fn default() -> Self {
        Self {
            issuer: None,
            client_id: None,
            scopes: default_scopes(),
            token: UiToken::default(),
            allow_insecure_http: false,
        }
    }
}

fn default_scopes() -> Vec<String> {
    ["openid", "profile", "email"].map(str::to_owned).to_vec()
}

/// Which token of the provider's answer the page sends to keybroker's API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UiToken {
    /// The access token (a JWT whose audience is keybroker): what an API should be sent.
    #[default]
    AccessToken,
    /// The ID token (audience: the page's `client_id`), for providers whose access tokens are
    /// opaque; the trusted issuer's `audience` must then list the `client_id`.
    IdToken,
}

impl UiToken {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AccessToken => "access_token",
            Self::IdToken => "id_token",
        }
    }
}

/// The page's sign-in: an OpenID Connect public client (authorization code flow with PKCE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiConfig {
    /// The provider's issuer; its discovery document is `<issuer>/.well-known/openid-configuration`.
    pub issuer: Url,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub token: UiToken,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTickets {
    #[serde(default = "default_ticket_lifetime")]
    pub lifetime: HumanDuration,
}

impl Default for RawTickets {
    fn default() -> Self {
        Self { lifetime: default_ticket_lifetime() }
    }
}

fn default_ticket_lifetime() -> HumanDuration {
    HumanDuration(Duration::from_secs(15 * 60))
}

/// Pickup tickets (`/v1/tickets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketsConfig {
    /// How long a ticket waits for its person to claim it.
    pub lifetime: Duration,
}

pub(super) fn validate_ui(raw: Option<RawUi>, auth: &AuthConfig) -> Result<Option<UiConfig>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let issuer_text = raw.issuer.as_deref().map(str::trim).filter(|i| !i.is_empty()).ok_or_else(|| {
        ConfigError::at("ui.issuer", "required: the OpenID provider people sign in with (leave [ui] out for no page)")
    })?;
    let issuer = transport::outbound_url("ui.issuer", issuer_text, "ui", raw.allow_insecure_http)?;
    let client_id = raw
        .client_id
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ConfigError::at("ui.client_id", "required: the page's client id at the provider"))?
        .to_owned();
    let scopes: Vec<String> = raw.scopes.iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    if !scopes.iter().any(|s| s == "openid") {
        return Err(ConfigError::at("ui.scopes", "must include `openid`"));
    }
    if let Some(bad) = scopes.iter().find(|s| !s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')) {
        return Err(ConfigError::at("ui.scopes", format!("`{}` is not a scope token", bad.escape_debug())));
    }
    // The page's tokens must be ones the API accepts.
    let same = |a: &str| a.trim_end_matches('/') == issuer_text.trim_end_matches('/');
    let trusted = auth.issuers.iter().find(|i| same(&i.issuer)).ok_or_else(|| {
        ConfigError::at(
            "ui.issuer",
            format!(
                "`{issuer_text}` is not a trusted issuer: add it to [auth] or [[auth.issuers]] (its audience and \
                 keys), or the API would refuse every token the page signs in with"
            ),
        )
    })?;
    if raw.token == UiToken::IdToken && !trusted.audiences.iter().any(|a| a == &client_id) {
        return Err(ConfigError::at(
            "ui.token",
            format!(
                "\"id_token\" is addressed to the client id `{client_id}`, which issuer `{}`'s audience does not list",
                trusted.name
            ),
        ));
    }
    Ok(Some(UiConfig { issuer, client_id, scopes, token: raw.token }))
}

/// Tickets' links open the page, so delegating needs `[ui]`; and the page's sign-in comes back
/// to `server.public_url`, which cannot be guessed from a wildcard listen address.
pub(super) fn check_page_settings(
    ui: Option<&UiConfig>,
    auth: &AuthConfig,
    public_url: Option<&str>,
    listen: std::net::SocketAddr,
) -> Result<(), ConfigError> {
    if ui.is_none() && !auth.delegate_teams.is_empty() {
        return Err(ConfigError::at(
            "auth.delegate_teams",
            "pickup tickets' links open the page: set [ui] too (or leave delegate_teams empty)",
        ));
    }
    if ui.is_some() && public_url.is_none_or(|u| u.trim().is_empty()) && listen.ip().is_unspecified() {
        return Err(ConfigError::at(
            "server.public_url",
            format!(
                "required with [ui] when server.listen is {listen}: the address people open (and the provider \
                 sends them back to), such as https://keybroker.example.com"
            ),
        ));
    }
    Ok(())
}

pub(super) fn validate_tickets(raw: RawTickets) -> Result<TicketsConfig, ConfigError> {
    let lifetime = raw.lifetime.0;
    if lifetime < Duration::from_secs(60) || lifetime > Duration::from_secs(24 * 3600) {
        return Err(ConfigError::at("tickets.lifetime", "must be between 1m and 24h"));
    }
    Ok(TicketsConfig { lifetime })
}

/// `server.public_url`: an origin (`https://keybroker.example.com`), no path; by default the
/// listen address over http.
pub(super) fn public_url(raw: Option<&str>, listen: std::net::SocketAddr) -> Result<Url, ConfigError> {
    let key = "server.public_url";
    let Some(text) = raw.map(str::trim).filter(|t| !t.is_empty()) else {
        let host = match listen.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        return Url::parse(&format!("http://{host}:{}/", listen.port()))
            .map_err(|_| ConfigError::at(key, "cannot be derived from server.listen; set it"));
    };
    let url = Url::parse(text).map_err(|_| ConfigError::at(key, "is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ConfigError::at(key, "must be an http:// or https:// URL with a host"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(ConfigError::at(key, "must be an origin such as https://keybroker.example.com, without a path"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_url_defaults_to_the_listen_address_and_is_an_origin() {
        let listen = "0.0.0.0:8080".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(public_url(None, listen).ok().map(String::from).as_deref(), Some("http://127.0.0.1:8080/"));
        assert!(public_url(Some("https://kb.example.com"), listen).is_ok());
        assert!(public_url(Some("https://kb.example.com/keybroker"), listen).is_err());
        assert!(public_url(Some("ftp://kb.example.com"), listen).is_err());
        assert!(public_url(Some("kb.example.com"), listen).is_err());
    }

    #[test]
    fn a_ticket_lifetime_is_between_a_minute_and_a_day() {
        let of = |secs| validate_tickets(RawTickets { lifetime: HumanDuration(Duration::from_secs(secs)) });
        assert!(of(30).is_err());
        assert!(of(900).is_ok());
        assert!(of(2 * 86400).is_err());
    }
}
