//! Octopus's wire shapes: dates, resources, paged collections, query strings.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::state::{ApiKeyRecord, User};

/// `take` when the query has none [C: DOC-AK "Defaults to 30"].
pub(crate) const DEFAULT_TAKE: usize = 30;

/// What `Page.All` asks for, like the official clients' "everything" (`int.MaxValue`).
const TAKE_ALL: usize = 2_147_483_647;

/// At most this many `Page.N` links. Octopus's behaviour for huge page counts is unknown; without a
/// cap, `take=1` over 100,000 users would answer megabytes of links.
const MAX_PAGE_LINKS: usize = 1000;

/// `yyyy-MM-ddTHH:mm:ss.fffK` as Octopus writes `DateTimeOffset`: `2026-11-23T12:00:25.647+00:00`.
pub(crate) fn format_date(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string()
}

/// A user as `UserResource`.
pub(crate) fn user_json(user: &User) -> Value {
    let id = &user.id;
    json!({
        "Id": id,
        "Username": user.username,
        "DisplayName": user.display_name,
        "IsActive": user.is_active,
        "IsService": user.is_service,
        "ServiceAccountType": if user.is_service { Some("Standard") } else { None },
        "EmailAddress": user.email,
        "IsRequestor": false,
        "CanPasswordBeEdited": !user.is_service,
        "Identities": [],
        "Links": {
            "Self": format!("/api/users/{id}"),
            "Permissions": format!("/api/users/{id}/permissions"),
            "PermissionsConfiguration": format!("/api/users/{id}/permissions/configuration"),
            "Spaces": format!("/api/users/{id}/spaces"),
            "Teams": format!("/api/users/{id}/teams{{?spaces,includeSystem}}"),
            "ApiKeys": format!("/api/users/{id}/apikeys{{/id}}{{?skip,take}}"),
            "RevokeSessions": format!("/api/users/{id}/revoke-sessions"),
        }
    })
}

/// A key as `ApiKeyResource` (lists and single gets): the secret is a `SensitiveValue` that only
/// says it exists and gives the hint.
/// `hint_length` is the server's (8, 7 on some versions, 0 before November 2020: no hint).
/// `tracks_use`: whether the server records `LastUsedTimeStamp` (older servers send neither it
/// nor `IsLastUsedTimestampKnown`).
pub(crate) fn api_key_json(key: &ApiKeyRecord, hint_length: usize, tracks_use: bool) -> Value {
    let hint: Option<String> = (hint_length > 0).then(|| key.hint.chars().take(hint_length).collect());
    let mut value = json!({
        "Id": key.id,
        "UserId": key.user_id,
        "Purpose": key.purpose,
        "ApiKey": { "HasValue": true, "NewValue": null, "Hint": hint },
        "Created": format_date(key.created),
        "Expires": key.expires.map(format_date),
        "AccessLevel": "FullAccess",
        "ActorType": key.actor_type,
        "Links": { "Self": key_self_link(key) },
    });
    if tracks_use {
        value["LastUsedTimeStamp"] = json!(key.last_used.map(format_date));
        // The server has tracked this key's use since its creation: a null means never used.
        value["IsLastUsedTimestampKnown"] = json!(true);
    }
    value
}

/// The create answer, `ApiKeyCreatedResource`: the only place the secret ever appears.
pub(crate) fn created_key_json(key: &ApiKeyRecord, secret: &str) -> Value {
    json!({
        "Id": key.id,
        "UserId": key.user_id,
        "Purpose": key.purpose,
        "ApiKey": secret,
        "Created": format_date(key.created),
        "Expires": key.expires.map(format_date),
        "ActorType": key.actor_type,
        "Links": { "Self": key_self_link(key) },
    })
}

fn key_self_link(key: &ApiKeyRecord) -> String {
    format!("/api/users/{}/apikeys/{}", key.user_id, key.id)
}

/// Where a page sits in a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Paging {
    pub skip: usize,
    pub take: usize,
}

impl Paging {
    /// Reads `skip` and `take` (defaults 0 and 30); negative or non-numeric values are a 400.
    pub(crate) fn from_query(query: &Query) -> Result<Self, ApiError> {
        let number = |name: &str, default: usize| -> Result<usize, ApiError> {
            match query.get(name) {
                None => Ok(default),
                Some(text) if text.trim().is_empty() => Ok(default),
                Some(text) => {
                    text.trim().parse::<u64>().map(|n| usize::try_from(n).unwrap_or(usize::MAX)).map_err(|_| {
                        ApiError::invalid(format!(
                            "The value '{text}' is not valid for {name}; it must be a whole number of 0 or more."
                        ))
                    })
                }
            }
        };
        Ok(Self { skip: number("skip", 0)?, take: number("take", DEFAULT_TAKE)? })
    }

    /// The items of this page.
    pub(crate) fn slice<'a, T>(&self, all: &'a [T]) -> &'a [T] {
        let start = self.skip.min(all.len());
        let end = start.saturating_add(self.take).min(all.len());
        &all[start..end]
    }
}

/// The request's own parameters echoed into the page links, e.g. `filter`.
pub(crate) type LinkParams<'a> = &'a [(&'a str, Option<&'a str>)];

/// A `ResourceCollection`: counts, items and the `Page.*` links.
pub(crate) fn collection(
    item_type: &str,
    path: &str,
    template: &str,
    params: LinkParams<'_>,
    total: usize,
    paging: Paging,
    items: Vec<Value>,
) -> Value {
    let Paging { skip, take } = paging;
    // Assumption: an empty collection has 0 pages and LastPageNumber 0 (never negative).
    let pages = if take == 0 { 0 } else { total.div_ceil(take) };
    let last_page = pages.saturating_sub(1);
    let link = |skip: usize, take: usize| -> String {
        let mut href = format!("{path}?skip={skip}&take={take}");
        for (name, value) in params {
            if let Some(value) = value {
                href.push('&');
                href.push_str(name);
                href.push('=');
                href.push_str(&percent_encode(value));
            }
        }
        href
    };
    let mut links = Map::new();
    links.insert("Self".to_owned(), Value::from(path));
    links.insert("Template".to_owned(), Value::from(template));
    links.insert("Page.All".to_owned(), Value::from(link(0, TAKE_ALL)));
    links.insert("Page.Current".to_owned(), Value::from(link(skip, take)));
    if skip > 0 {
        links.insert("Page.Previous".to_owned(), Value::from(link(skip.saturating_sub(take), take)));
    }
    if take > 0 && skip.saturating_add(take) < total {
        links.insert("Page.Next".to_owned(), Value::from(link(skip + take, take)));
    }
    links.insert("Page.Last".to_owned(), Value::from(link(last_page.saturating_mul(take), take)));
    for page in 0..pages.min(MAX_PAGE_LINKS) {
        links.insert(format!("Page.{page}"), Value::from(link(page * take, take)));
    }
    json!({
        "ItemType": item_type,
        "TotalResults": total,
        "ItemsPerPage": take,
        "NumberOfPages": pages,
        "LastPageNumber": last_page,
        "Items": items,
        "Links": links,
    })
}

/// A decoded query string. Parameter names are matched case-insensitively, as ASP.NET does.
#[derive(Debug, Default, Clone)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    /// Parses `a=1&b=x%20y` (`+` is a space).
    pub(crate) fn parse(raw: Option<&str>) -> Self {
        let pairs = raw
            .unwrap_or_default()
            .split('&')
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (name, value) = part.split_once('=').unwrap_or((part, ""));
                (form_decode(name), form_decode(value))
            })
            .collect();
        Self(pairs)
    }

    /// The first value of `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, comma-separated lists flattened (`ids=a,b&ids=c`).
    pub(crate) fn list(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect()
    }

    /// A `true`/`false` parameter; anything else is a 400.
    pub(crate) fn flag(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name).map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(ApiError::invalid(format!("The value '{v}' is not valid for {name}; use true or false."))),
        }
    }
}

/// Decodes `application/x-www-form-urlencoded` text; bad escapes are kept as they are.
fn form_decode(text: &str) -> String {
    percent_decode(&text.replace('+', " "))
}

/// Decodes `%XX` escapes only (a cookie value may hold a literal `+`).
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A body field looked up case-insensitively, as ASP.NET model binding does.
pub(crate) fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_have_three_fraction_digits_and_a_numeric_offset() {
        let at = DateTime::parse_from_rfc3339("2026-11-23T12:00:25.647123Z").unwrap().with_timezone(&Utc);
        assert_eq!(format_date(at), "2026-11-23T12:00:25.647+00:00");
    }

    #[test]
    fn query_names_are_case_insensitive_and_values_decoded() {
        let q = Query::parse(Some("ApiKey=API-X&filter=a+b%2Fc&ids=Users-1,Users-2&IDS=Users-3"));
        assert_eq!(q.get("apikey"), Some("API-X"));
        assert_eq!(q.get("FILTER"), Some("a b/c"));
        assert_eq!(q.list("ids"), ["Users-1", "Users-2", "Users-3"]);
        assert_eq!(percent_decode("a%2Bb%3D%3D%zz"), "a+b==%zz");
        assert_eq!(percent_encode("a+b/c="), "a%2Bb%2Fc%3D");
    }

    #[test]
    fn empty_collection_has_no_pages_and_no_next_link() {
        let page = collection("User", "/api/users", "t", &[], 0, Paging { skip: 0, take: 30 }, vec![]);
        assert_eq!(page["NumberOfPages"], 0);
        assert_eq!(page["LastPageNumber"], 0);
        assert!(page["Links"].get("Page.Next").is_none());
    }
}
