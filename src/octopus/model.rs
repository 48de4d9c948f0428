//! Octopus's wire shapes (PascalCase), as far as keybroker reads them. Every field but the ids is
//! optional and unknown fields are ignored: new server versions add fields often.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

/// A page of a `ResourceCollection<T>` (octopus-api.md §3).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Page<T> {
    #[serde(default = "Vec::new")]
    pub items: Vec<T>,
    #[serde(default)]
    pub total_results: Option<u64>,
    #[serde(default)]
    pub links: std::collections::HashMap<String, String>,
}

impl<T> Page<T> {
    pub fn has_next(&self) -> bool {
        self.links.contains_key("Page.Next")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct UserResource {
    pub id: String,
    pub username: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub is_active: Option<bool>,
    #[serde(default)]
    pub is_service: Option<bool>,
}

/// The `ApiKey` field of a listed key is a SensitiveValue object, never the secret.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub(super) struct SensitiveValue {
    #[serde(default)]
    pub hint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ApiKeyResource {
    pub id: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub created: Option<DateTime<FixedOffset>>,
    #[serde(default)]
    pub expires: Option<DateTime<FixedOffset>>,
    #[serde(default, deserialize_with = "sensitive_or_null")]
    pub api_key: SensitiveValue,
    /// When the key last authenticated (`null`: never, or not known to this server).
    #[serde(default, rename = "LastUsedTimeStamp")]
    pub last_used: Option<DateTime<FixedOffset>>,
    /// Whether the server tracked this key's use (false or absent: older servers, and keys made
    /// before an upgrade), so that a `null` last use means "never" only when this is true.
    #[serde(default)]
    pub is_last_used_timestamp_known: Option<bool>,
}

fn sensitive_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SensitiveValue, D::Error> {
    // Old servers may send null or a bare string here; none of that is the secret we want.
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct CreateApiKey<'a> {
    pub purpose: &'a str,
    /// Always sent: omitted means the server default and `null` the server maximum on current
    /// servers, and "never" on old ones (octopus-api.md §5.2).
    pub expires: String,
    pub user_id: &'a str,
}

/// The create response: the only time Octopus shows the secret.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ApiKeyCreatedResource {
    pub id: String,
    pub api_key: String,
    #[serde(default)]
    pub expires: Option<DateTime<FixedOffset>>,
    #[serde(default)]
    pub created: Option<DateTime<FixedOffset>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct AuthenticationResource {
    #[serde(default)]
    pub api_key_default_expiry_days: Option<u32>,
    #[serde(default)]
    pub api_key_max_expiry_days: Option<u32>,
    #[serde(default)]
    pub user_api_keys_enabled: Option<bool>,
}

/// Octopus's error body (octopus-api.md §4). Only `ErrorMessage` is reliably present.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub errors: Option<Vec<String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct LoginCommand<'a> {
    pub username: &'a str,
    pub password: &'a str,
    pub remember_me: bool,
}

/// `GET /api`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RootResource {
    #[serde(default)]
    pub version: Option<String>,
}
