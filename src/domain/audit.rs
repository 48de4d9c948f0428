//! Audit events and their hash chain. Each stored event carries the hash of the one before it,
//! computed over a canonical encoding, so removing or editing any event breaks the chain.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The hash the first event of the chain points back to.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The prefix of a keyed hash: `hmac:` and the hex HMAC-SHA256, under `audit.chain_key_file`,
/// of the same input a plain hash covers (the previous hash and the event's canonical form).
/// Without the key nobody can compute one, so whoever can write the database can delete or
/// change keyed events but cannot make the chain verify again.
pub const KEYED_PREFIX: &str = "hmac:";

/// The chain's key (`audit.chain_key_file`); never the identify secret.
#[derive(Clone)]
pub struct ChainKey(std::sync::Arc<secrecy::SecretString>);

impl ChainKey {
    pub fn new(secret: secrecy::SecretString) -> Self {
        Self(std::sync::Arc::new(secret))
    }

    fn mac(&self, input: &[&[u8]]) -> String {
        use hmac::Mac;
        use secrecy::ExposeSecret;
        let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(self.0.expose_secret().as_bytes()) else {
            return String::new();
        };
        for part in input {
            mac.update(part);
        }
        format!("{KEYED_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
    }
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKey(..)")
    }
}

/// What happened. The string forms are stable: auditors query by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Action {
    #[serde(rename = "key.requested")]
    KeyRequested,
    #[serde(rename = "key.issued")]
    KeyIssued,
    #[serde(rename = "key.issue_failed")]
    KeyIssueFailed,
    /// The caller was gone when Octopus made the key: it was deleted, nobody got its secret.
    #[serde(rename = "key.issue_abandoned")]
    KeyIssueAbandoned,
    #[serde(rename = "key.revoked")]
    KeyRevoked,
    #[serde(rename = "key.revoke_failed")]
    KeyRevokeFailed,
    #[serde(rename = "key.expired")]
    KeyExpired,
    #[serde(rename = "key.reconciled")]
    KeyReconciled,
    #[serde(rename = "secret.identified")]
    KeyIdentified,
    #[serde(rename = "auth.denied")]
    AuthDenied,
    /// An authenticated caller lacked the role a route needs (auditor, admin).
    #[serde(rename = "authz.denied")]
    AuthzDenied,
    #[serde(rename = "policy.denied")]
    PolicyDenied,
    /// `POST /v1/keys` with `dry_run`: every check ran, nothing was created.
    #[serde(rename = "policy.dry_run")]
    PolicyDryRun,
    #[serde(rename = "config.loaded")]
    ConfigLoaded,
    #[serde(rename = "config.reloaded")]
    ConfigReloaded,
    #[serde(rename = "config.reload_refused")]
    ConfigReloadRefused,
    #[serde(rename = "webhook.delivery")]
    WebhookDelivery,
    #[serde(rename = "drift.unmanaged")]
    DriftUnmanaged,
    #[serde(rename = "credential.expiring")]
    CredentialExpiring,
    /// A bot asked for a key on someone's behalf (a pickup ticket); nothing exists in Octopus yet.
    #[serde(rename = "ticket.created")]
    TicketCreated,
    /// The named person claimed the ticket: a key was issued to them.
    #[serde(rename = "ticket.claimed")]
    TicketClaimed,
    #[serde(rename = "ticket.expired")]
    TicketExpired,
    #[serde(rename = "ticket.cancelled")]
    TicketCancelled,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyRequested => "key.requested",
            Self::KeyIssued => "key.issued",
            Self::KeyIssueFailed => "key.issue_failed",
            Self::KeyIssueAbandoned => "key.issue_abandoned",
            Self::KeyRevoked => "key.revoked",
            Self::KeyRevokeFailed => "key.revoke_failed",
            Self::KeyExpired => "key.expired",
            Self::KeyReconciled => "key.reconciled",
            Self::KeyIdentified => "secret.identified",
            Self::AuthDenied => "auth.denied",
            Self::AuthzDenied => "authz.denied",
            Self::PolicyDenied => "policy.denied",
            Self::PolicyDryRun => "policy.dry_run",
            Self::ConfigLoaded => "config.loaded",
            Self::ConfigReloaded => "config.reloaded",
            Self::ConfigReloadRefused => "config.reload_refused",
            Self::WebhookDelivery => "webhook.delivery",
            Self::DriftUnmanaged => "drift.unmanaged",
            Self::CredentialExpiring => "credential.expiring",
            Self::TicketCreated => "ticket.created",
            Self::TicketClaimed => "ticket.claimed",
            Self::TicketExpired => "ticket.expired",
            Self::TicketCancelled => "ticket.cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Denied => "denied",
        }
    }
}

/// Where a request came from, copied onto every event it causes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    pub request_id: Option<String>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    /// Set when the caller is claiming a pickup ticket: every event then names the bot too.
    pub on_behalf: Option<OnBehalf>,
    /// The route template the request came through, never the raw path (a path could carry
    /// anything); it names the route of an aggregated denial.
    pub route: Option<String>,
}

/// The pickup ticket a request claims, and the bot that created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnBehalf {
    pub ticket: String,
    /// The bot's principal.
    pub requested_by: String,
}

/// An event to append. Never put a secret in any field.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEvent {
    pub id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub actor: String,
    pub action: Action,
    pub outcome: Outcome,
    pub scope: Option<String>,
    pub key_id: Option<Uuid>,
    pub octopus_key_id: Option<String>,
    pub context: RequestContext,
    pub detail: serde_json::Value,
}

impl NewAuditEvent {
    pub fn new(
        occurred_at: DateTime<Utc>,
        actor: &str,
        action: Action,
        outcome: Outcome,
        context: &RequestContext,
    ) -> Self {
        let mut detail = serde_json::Map::new();
        if let Some(on_behalf) = &context.on_behalf {
            detail.insert("requested_by".to_owned(), on_behalf.requested_by.clone().into());
            detail.insert("ticket".to_owned(), on_behalf.ticket.clone().into());
        }
        Self {
            // Time-ordered (v7): consecutive events land on the same pages of the id index.
            id: Uuid::now_v7(),
            occurred_at,
            actor: actor.to_owned(),
            action,
            outcome,
            scope: None,
            key_id: None,
            octopus_key_id: None,
            context: context.clone(),
            detail: serde_json::Value::Object(detail),
        }
    }

    pub fn scope(mut self, scope: impl AsRef<str>) -> Self {
        self.scope = Some(scope.as_ref().to_owned());
        self
    }

    pub fn key(mut self, key_id: Uuid) -> Self {
        self.key_id = Some(key_id);
        self
    }

    pub fn octopus_key(mut self, id: Option<&str>) -> Self {
        self.octopus_key_id = id.map(str::to_owned);
        self
    }

    /// Adds `detail`'s members to the event's detail (which names the ticket and its bot when
    /// the request claims one); a detail that is not an object replaces it.
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        match (&mut self.detail, detail) {
            (serde_json::Value::Object(into), serde_json::Value::Object(from)) => into.extend(from),
            (into, other) => *into = other,
        }
        self
    }
}

/// A stored event, as read back.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub seq: i64,
    pub id: Uuid,
    #[serde(serialize_with = "super::rfc3339::serialize")]
    pub occurred_at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub outcome: String,
    pub scope: Option<String>,
    pub key_id: Option<Uuid>,
    pub octopus_key_id: Option<String>,
    pub request_id: Option<String>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    pub detail: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// The fields covered by the hash, in a fixed order. Times are written with microseconds, the
/// precision both databases keep.
#[derive(Serialize)]
struct Canonical<'a> {
    id: String,
    occurred_at: String,
    actor: &'a str,
    action: &'a str,
    outcome: &'a str,
    scope: Option<&'a str>,
    key_id: Option<String>,
    octopus_key_id: Option<&'a str>,
    request_id: Option<&'a str>,
    client_addr: Option<&'a str>,
    user_agent: Option<&'a str>,
    detail: String,
}

/// JSON with object keys sorted at every level, whatever order the value was built or stored
/// in (PostgreSQL's jsonb reorders keys; serde_json may preserve insertion order).
pub fn canonical_json(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&map[k.as_str()])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical_json).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// Truncates to the microsecond precision the stores keep, so hashes computed before writing
/// match the ones computed after reading back.
pub fn store_precision(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::DurationRound;
    t.duration_trunc(chrono::Duration::microseconds(1)).unwrap_or(t)
}

#[allow(clippy::too_many_arguments)]
fn canonical_hash(
    prev_hash: &str,
    id: Uuid,
    occurred_at: DateTime<Utc>,
    actor: &str,
    action: &str,
    outcome: &str,
    scope: Option<&str>,
    key_id: Option<Uuid>,
    octopus_key_id: Option<&str>,
    request_id: Option<&str>,
    client_addr: Option<&str>,
    user_agent: Option<&str>,
    detail: &serde_json::Value,
    key: Option<&ChainKey>,
) -> String {
    let canonical = Canonical {
        id: id.to_string(),
        occurred_at: occurred_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        actor,
        action,
        outcome,
        scope,
        key_id: key_id.map(|k| k.to_string()),
        octopus_key_id,
        request_id,
        client_addr,
        user_agent,
        detail: canonical_json(detail),
    };
    // serde_json writes struct fields in declaration order; `detail` is canonical on its own.
    let encoded = serde_json::to_vec(&canonical).unwrap_or_default();
    if let Some(key) = key {
        return key.mac(&[prev_hash.as_bytes(), b"\n", &encoded]);
    }
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(b"\n");
    hasher.update(&encoded);
    hex::encode(hasher.finalize())
}

impl NewAuditEvent {
    /// The hash of this event chained after `prev_hash`: keyed with `key` when there is one.
    pub fn chain_hash(&self, prev_hash: &str, key: Option<&ChainKey>) -> String {
        canonical_hash(
            prev_hash,
            self.id,
            store_precision(self.occurred_at),
            &self.actor,
            self.action.as_str(),
            self.outcome.as_str(),
            self.scope.as_deref(),
            self.key_id,
            self.octopus_key_id.as_deref(),
            self.context.request_id.as_deref(),
            self.context.client_addr.as_deref(),
            self.context.user_agent.as_deref(),
            &self.detail,
            key,
        )
    }
}

impl AuditRecord {
    /// Whether its hash is keyed (see [`KEYED_PREFIX`]).
    pub fn is_keyed(&self) -> bool {
        self.hash.starts_with(KEYED_PREFIX)
    }

    /// Recomputes this record's hash from its fields, keyed when its stored hash is (with `key`;
    /// `None` when it is keyed and there is no key to check it with).
    pub fn recompute_hash(&self, key: Option<&ChainKey>) -> Option<String> {
        let key = match (self.is_keyed(), key) {
            (true, None) => return None,
            (true, Some(key)) => Some(key),
            (false, _) => None,
        };
        Some(canonical_hash(
            &self.prev_hash,
            self.id,
            self.occurred_at,
            &self.actor,
            &self.action,
            &self.outcome,
            self.scope.as_deref(),
            self.key_id,
            self.octopus_key_id.as_deref(),
            self.request_id.as_deref(),
            self.client_addr.as_deref(),
            self.user_agent.as_deref(),
            &self.detail,
            key,
        ))
    }
}

/// The first problem found while walking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ChainBreak {
    pub seq: i64,
    pub event_id: Uuid,
    pub reason: String,
}

/// Checks records given in chain order, starting after `prev_hash`. Returns the last hash.
///
/// A keyed event needs `key` to be checked. Once the chain is keyed it stays keyed: an unkeyed
/// event after a keyed one was written by someone without the key (an edit of the newest
/// events, recomputed with plain hashes).
pub fn verify_chain<'a>(
    mut prev_hash: String,
    records: impl IntoIterator<Item = &'a AuditRecord>,
    key: Option<&ChainKey>,
) -> Result<String, ChainBreak> {
    for record in records {
        let broken = |reason: &str| ChainBreak { seq: record.seq, event_id: record.id, reason: reason.to_owned() };
        if record.prev_hash != prev_hash {
            return Err(broken(
                "prev_hash does not match the previous event's hash (an event was removed or reordered)",
            ));
        }
        if prev_hash.starts_with(KEYED_PREFIX) && !record.is_keyed() {
            return Err(broken(
                "an unkeyed event follows keyed ones: it was written without the chain key (the trail was rewritten)",
            ));
        }
        match record.recompute_hash(key) {
            None => {
                return Err(broken("the event is keyed, and no audit.chain_key_file is configured here to check it"));
            }
            Some(hash) if hash != record.hash => {
                return Err(broken(if record.is_keyed() {
                    "the event's content does not match its keyed hash (it was changed, or keyed with another key)"
                } else {
                    "the event's content does not match its hash (it was changed)"
                }));
            }
            Some(_) => {}
        }
        prev_hash = record.hash.clone();
    }
    Ok(prev_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed_record_from(event: &NewAuditEvent, seq: i64, prev: &str, key: Option<&ChainKey>) -> AuditRecord {
        AuditRecord {
            seq,
            id: event.id,
            occurred_at: store_precision(event.occurred_at),
            actor: event.actor.clone(),
            action: event.action.as_str().to_owned(),
            outcome: event.outcome.as_str().to_owned(),
            scope: event.scope.clone(),
            key_id: event.key_id,
            octopus_key_id: event.octopus_key_id.clone(),
            request_id: event.context.request_id.clone(),
            client_addr: event.context.client_addr.clone(),
            user_agent: event.context.user_agent.clone(),
            detail: event.detail.clone(),
            prev_hash: prev.to_owned(),
            hash: event.chain_hash(prev, key),
        }
    }

    fn chain(n: usize) -> Vec<AuditRecord> {
        keyed_chain(n, None, GENESIS_HASH, 1)
    }

    fn keyed_chain(n: usize, key: Option<&ChainKey>, after: &str, first_seq: i64) -> Vec<AuditRecord> {
        let mut prev = after.to_owned();
        (0..n)
            .map(|i| {
                let e = NewAuditEvent::new(
                    Utc::now(),
                    "alice",
                    Action::KeyRequested,
                    Outcome::Success,
                    &RequestContext::default(),
                )
                .scope("payments")
                .detail(serde_json::json!({"n": i}));
                let r = keyed_record_from(&e, i as i64 + first_seq, &prev, key);
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    #[test]
    fn the_canonical_encoding_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"d":2,"c":3}],"x":null}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}"#);
    }

    #[test]
    fn an_intact_chain_verifies() {
        let records = chain(5);
        assert_eq!(verify_chain(GENESIS_HASH.to_owned(), &records, None).unwrap(), records[4].hash);
    }

    #[test]
    fn a_changed_event_breaks_the_chain_at_that_event() {
        let mut records = chain(5);
        records[2].actor = "mallory".to_owned();
        let err = verify_chain(GENESIS_HASH.to_owned(), &records, None).unwrap_err();
        assert_eq!(err.seq, 3);
        assert!(err.reason.contains("changed"));
    }

    #[test]
    fn a_removed_event_breaks_the_chain_after_the_gap() {
        let mut records = chain(5);
        records.remove(1);
        let err = verify_chain(GENESIS_HASH.to_owned(), &records, None).unwrap_err();
        assert_eq!(err.seq, 3);
        assert!(err.reason.contains("removed"));
    }

    fn key(text: &str) -> ChainKey {
        ChainKey::new(secrecy::SecretString::from(text.to_owned()))
    }

    #[test]
    fn a_keyed_chain_verifies_only_with_its_key_and_cannot_be_rewritten_without_it() {
        let k = key("chain-key-0123456789abcdef0123456789abcdef");
        // History from before the key, then keyed events.
        let mut records = chain(2);
        records.extend(keyed_chain(3, Some(&k), &records[1].hash.clone(), 3));
        assert!(records[2].hash.starts_with(KEYED_PREFIX));
        assert_eq!(verify_chain(GENESIS_HASH.to_owned(), &records, Some(&k)).unwrap(), records[4].hash);

        let err = verify_chain(GENESIS_HASH.to_owned(), &records, None).unwrap_err();
        assert_eq!(err.seq, 3, "a keyed event cannot be checked without the key");
        let err = verify_chain(GENESIS_HASH.to_owned(), &records, Some(&key("another-key-0123456789abcdef0123456789")))
            .unwrap_err();
        assert_eq!(err.seq, 3);

        // Whoever edits the newest events without the key can only recompute plain hashes.
        let mut rewritten = records[..3].to_vec();
        rewritten.extend(keyed_chain(2, None, &records[2].hash.clone(), 4));
        let err = verify_chain(GENESIS_HASH.to_owned(), &rewritten, Some(&k)).unwrap_err();
        assert_eq!(err.seq, 4);
        assert!(err.reason.contains("unkeyed event follows keyed ones"), "{}", err.reason);

        let mut changed = records.clone();
        changed[3].actor = "mallory".to_owned();
        let err = verify_chain(GENESIS_HASH.to_owned(), &changed, Some(&k)).unwrap_err();
        assert_eq!((err.seq, err.reason.contains("keyed hash")), (4, true));
    }
}
