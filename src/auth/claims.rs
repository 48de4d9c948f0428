//! Reading claims the way bindings and `teams_claim` name them, and matching bindings against a
//! token's subject and claims (Vault's `bound_subject` and `bound_claims`, octo-sts's subject and
//! claim patterns).

use std::collections::BTreeSet;

use serde_json::Value;

use super::glob;
use crate::config::BindingConfig;

/// The claim `name`: a JSON pointer when it starts with `/` (`/kubernetes.io/namespace`),
/// otherwise the claim of that exact name (CircleCI's `oidc.circleci.com/context-ids` has dots
/// in it), and failing that a dotted path into nested objects (`realm_access.roles`).
pub fn claim<'a>(claims: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    // RFC 6901: only the first `/` is the pointer's start (`//x` is the key "" then "x").
    if let Some(rest) = name.strip_prefix('/') {
        let mut value: Option<&Value> = None;
        // `Map` has no `pointer`; the first segment is looked up by hand, the rest by serde_json.
        let (first, tail) = rest.split_once('/').map_or((rest, ""), |(f, t)| (f, t));
        let first = first.replace("~1", "/").replace("~0", "~");
        if let Some(top) = claims.get(&first) {
            value = if tail.is_empty() { Some(top) } else { top.pointer(&format!("/{tail}")) };
        }
        return value;
    }
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    let mut parts = name.split('.');
    let mut value = parts.next().and_then(|first| claims.get(first));
    for part in parts {
        value = value.and_then(|v| v.get(part));
    }
    value
}

/// The strings a claim value stands for: a string, or each string of an array; numbers and
/// booleans in their JSON form (GitHub's ids are strings, other issuers send numbers).
pub fn claim_strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Number(n) => vec![n.to_string()],
        Value::Bool(b) => vec![b.to_string()],
        Value::Array(items) => items.iter().flat_map(claim_strings).collect(),
        _ => Vec::new(),
    }
}

/// Teams from `teams_claim`: an array of strings, or one string (split by `separator` when
/// one is configured). Blank, over-long and control-character entries are dropped.
pub fn teams_from(claims: &serde_json::Map<String, Value>, name: &str, separator: Option<&str>) -> BTreeSet<String> {
    let clean = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)).then(|| s.to_owned())
    };
    match claim(claims, name) {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).filter_map(clean).collect(),
        Some(Value::String(one)) => match separator {
            Some(sep) if !sep.is_empty() => one.split(sep).filter_map(clean).collect(),
            _ => clean(one).into_iter().collect(),
        },
        _ => BTreeSet::new(),
    }
}

/// Why a binding did not match: the first entry that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// `subject`, or `claims.<name>`.
    pub entry: String,
    pub detail: String,
}

/// Whether `binding` matches a token of its issuer with this subject and these claims; every
/// entry must match, and a claim that is a list matches when one element does.
pub fn check_binding(
    binding: &BindingConfig,
    subject: &str,
    claims: &serde_json::Map<String, Value>,
) -> Result<(), Mismatch> {
    if let Some(pattern) = &binding.subject {
        if !glob::matches(pattern, subject) {
            return Err(Mismatch {
                entry: "subject".to_owned(),
                detail: format!("the subject {} does not match {pattern:?}", quote(subject)),
            });
        }
    }
    for (name, patterns) in &binding.claims {
        let entry = format!("claims.{name}");
        let Some(value) = claim(claims, name) else {
            return Err(Mismatch { entry, detail: "the token has no such claim".to_owned() });
        };
        let values = claim_strings(value);
        if !values.iter().any(|v| patterns.iter().any(|p| glob::matches(p, v))) {
            let shown: Vec<String> = values.iter().take(5).map(|v| quote(v)).collect();
            return Err(Mismatch { entry, detail: format!("[{}] matches none of {patterns:?}", shown.join(", ")) });
        }
    }
    Ok(())
}

/// Caller text in a message: quoted, escaped and clipped.
fn quote(text: &str) -> String {
    let clipped: String = text.chars().take(120).collect();
    format!("{clipped:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn binding(subject: Option<&str>, claims: &[(&str, &[&str])]) -> BindingConfig {
        BindingConfig {
            issuer: "ci".to_owned(),
            subject: subject.map(str::to_owned),
            claims: claims
                .iter()
                .map(|(n, p)| ((*n).to_owned(), p.iter().map(|s| (*s).to_owned()).collect()))
                .collect(),
            teams: BTreeSet::from(["payments".to_owned()]),
            privileged: false,
        }
    }

    #[test]
    fn claims_are_read_by_name_pointer_or_dotted_path() {
        let claims = map(json!({
            "kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "deployer"}},
            "oidc.circleci.com/context-ids": ["c1", "c2"],
            "realm_access": {"roles": ["x"]},
            "a/b": 1,
        }));
        assert_eq!(claim(&claims, "/kubernetes.io/namespace"), Some(&json!("payments")));
        assert_eq!(claim(&claims, "/kubernetes.io/serviceaccount/name"), Some(&json!("deployer")));
        assert_eq!(claim(&claims, "/a~1b"), Some(&json!(1)));
        assert_eq!(claim(&claims, "oidc.circleci.com/context-ids"), Some(&json!(["c1", "c2"])));
        assert_eq!(claim(&claims, "realm_access.roles"), Some(&json!(["x"])));
        assert_eq!(claim(&claims, "/nope/x"), None);
        assert_eq!(claim(&claims, "nope"), None);
    }

    #[test]
    fn teams_come_from_arrays_strings_and_separated_strings() {
        let claims =
            map(json!({"groups": ["a", " b ", 3, ""], "one": "solo", "csv": "a, b,,c", "k": {"ns": "payments"}}));
        let set = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        assert_eq!(teams_from(&claims, "groups", None), set(&["a", "b"]));
        assert_eq!(teams_from(&claims, "one", None), set(&["solo"]));
        assert_eq!(teams_from(&claims, "csv", Some(",")), set(&["a", "b", "c"]));
        assert_eq!(teams_from(&claims, "csv", None), set(&["a, b,,c"]));
        assert_eq!(teams_from(&claims, "/k/ns", None), set(&["payments"]));
        assert!(teams_from(&claims, "missing", None).is_empty());
    }

    #[test]
    fn a_github_binding_pins_ids_and_refs() {
        let b = binding(
            None,
            &[
                ("repository_id", &["892764"]),
                ("repository_owner_id", &["4410"]),
                ("ref", &["refs/heads/main", "refs/tags/v*"]),
            ],
        );
        let token = |repo_id: Value, r: &str| {
            map(
                json!({"repository": "acme/payments", "repository_id": repo_id, "repository_owner_id": "4410", "ref": r}),
            )
        };
        assert_eq!(
            check_binding(&b, "repo:acme/payments:ref:refs/heads/main", &token(json!("892764"), "refs/heads/main")),
            Ok(())
        );
        assert_eq!(check_binding(&b, "s", &token(json!(892764), "refs/tags/v1.2.0")), Ok(()));
        let miss = check_binding(&b, "s", &token(json!("1"), "refs/heads/main")).unwrap_err();
        assert_eq!(miss.entry, "claims.repository_id");
        assert!(miss.detail.contains("\"1\"") && miss.detail.contains("892764"), "{}", miss.detail);
        let miss = check_binding(&b, "s", &token(json!("892764"), "refs/heads/feature")).unwrap_err();
        assert_eq!(miss.entry, "claims.ref");
        let miss = check_binding(&b, "s", &map(json!({"repository_owner_id": "4410"}))).unwrap_err();
        assert_eq!(
            (miss.entry.as_str(), miss.detail.as_str()),
            ("claims.repository_id", "the token has no such claim")
        );
    }

    #[test]
    fn subjects_and_list_claims_match_by_glob() {
        let b = binding(Some("system:serviceaccount:payments:*"), &[("/kubernetes.io/namespace", &["payments"])]);
        let claims = map(json!({"kubernetes.io": {"namespace": "payments"}}));
        assert_eq!(check_binding(&b, "system:serviceaccount:payments:deployer", &claims), Ok(()));
        let miss = check_binding(&b, "system:serviceaccount:web:deployer", &claims).unwrap_err();
        assert_eq!(miss.entry, "subject");
        let b = binding(None, &[("groups", &["team-*"])]);
        assert_eq!(check_binding(&b, "s", &map(json!({"groups": ["other", "team-payments"]}))), Ok(()));
        assert!(check_binding(&b, "s", &map(json!({"groups": ["other"]}))).is_err());
        // A protected-ref pin on a boolean claim (GitLab's ref_protected is a string "true").
        let b = binding(None, &[("ref_protected", &["true"])]);
        assert_eq!(check_binding(&b, "s", &map(json!({"ref_protected": "true"}))), Ok(()));
        assert_eq!(check_binding(&b, "s", &map(json!({"ref_protected": true}))), Ok(()));
        assert!(check_binding(&b, "s", &map(json!({"ref_protected": "false"}))).is_err());
    }
}
