//! Webhook notices: which notices a key needs (pure), the outbox they go through, and their
//! delivery (signed, retried with backoff for a bounded time, every outcome audited).
//!
//! Each delivery is signed as `X-Keybroker-Signature: t=<unix seconds>,id=<delivery id>,v1=<hex
//! HMAC-SHA256 of "<t>.<id>.<body>">`: the time lets receivers refuse replays older than a few
//! minutes, the id lets them drop a delivery they have already processed. Webhooks are named in
//! the outbox, logs and the audit trail by their configured `name`, never by their URL.
//!
//! Notices are derived from the key records by a job and written to the `webhook_deliveries`
//! outbox, whose unique (webhook, event, key, threshold) makes each notice happen once, across
//! restarts and replicas. Deliveries never happen in a request's path, so a webhook that is down
//! cannot slow an issuance.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::json;
use sha2::Sha256;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::config::WebhookConfig;
use crate::domain::audit::{Action, NewAuditEvent, Outcome, RequestContext};
use crate::domain::keys::{KeyRecord, KeyState};
use crate::services::PassError;
use crate::services::issuance::KeyService;
use crate::store::{Delivery, DeliveryResult, NewDelivery};

/// Days before expiry at which `key.expiring` is sent (Octopus's own warning thresholds).
pub const WARNING_DAYS: [i64; 2] = [20, 10];

/// How far back issued, revoked and expired keys are still announced (a job that was down for
/// less than this catches up).
pub const LOOKBACK: chrono::Duration = chrono::Duration::days(2);

/// A delivery is retried until it is this old, then given up.
pub const GIVE_UP_AFTER: chrono::Duration = chrono::Duration::hours(24);

/// The notices a key needs at `now`: (event, threshold). Pure, for unit tests.
pub fn notices_for(record: &KeyRecord, now: DateTime<Utc>) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if matches!(record.state, KeyState::Pending | KeyState::Failed) {
        return out;
    }
    if record.created_at > now - LOOKBACK {
        out.push(("key.issued", ""));
    }
    if record.state == KeyState::Revoked {
        if record.revoked_at.is_some_and(|at| at > now - LOOKBACK) {
            out.push(("key.revoked", ""));
        }
        return out;
    }
    let remaining = record.expires_at - now;
    // A key that never lived longer than a threshold gets no warning for it: a 7-day key is
    // not "expiring in 10 days" news on the day it is issued.
    let lifetime = record.expires_at - record.created_at;
    let warn = |days: i64| remaining <= chrono::Duration::days(days) && lifetime > chrono::Duration::days(days);
    if remaining <= chrono::Duration::zero() {
        if record.expires_at > now - LOOKBACK {
            out.push(("key.expired", ""));
        }
    } else if warn(WARNING_DAYS[1]) {
        out.push(("key.expiring", "10d"));
    } else if warn(WARNING_DAYS[0]) {
        out.push(("key.expiring", "20d"));
    }
    out
}

/// The body of every webhook delivery (a stable schema; the secret is never part of it).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WebhookPayload {
    /// `key.issued`, `key.expiring`, `key.expired`, `key.revoked` or `ticket.claimed`.
    pub event: String,
    /// For `key.expiring`: the warning threshold in days (20 or 10).
    pub threshold_days: Option<i64>,
    /// When keybroker noticed the event.
    pub occurred_at: DateTime<Utc>,
    pub scope: String,
    pub requester: String,
    pub key: WebhookKey,
    /// For `ticket.claimed`: the pickup ticket the requester claimed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket: Option<WebhookTicket>,
}

/// The pickup ticket in a `ticket.claimed` payload.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WebhookTicket {
    pub id: String,
    /// The person who claimed it (the key's requester).
    #[serde(rename = "for")]
    pub for_subject: String,
    /// The bot that asked.
    pub requested_by: String,
    pub pickup_url: String,
}

/// The key record in a webhook payload, without any secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WebhookKey {
    pub id: Uuid,
    pub purpose: String,
    pub state: KeyState,
    pub octopus_user_id: String,
    pub octopus_key_id: Option<String>,
    pub key_hint: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

fn payload(record: &KeyRecord, event: &str, threshold: &str, now: DateTime<Utc>) -> serde_json::Value {
    serde_json::to_value(payload_of(record, event, threshold, now)).unwrap_or_default()
}

/// The `ticket.claimed` payload: the new key's record (never its secret) and the ticket.
pub fn ticket_payload(
    record: &KeyRecord,
    ticket: &crate::domain::tickets::Ticket,
    pickup_url: &str,
    now: DateTime<Utc>,
) -> serde_json::Value {
    let mut body = payload_of(record, "ticket.claimed", "", now);
    body.ticket = Some(WebhookTicket {
        id: ticket.id.to_string(),
        for_subject: ticket.for_subject.clone(),
        requested_by: ticket.requested_by.clone(),
        pickup_url: pickup_url.to_owned(),
    });
    serde_json::to_value(body).unwrap_or_default()
}

fn payload_of(record: &KeyRecord, event: &str, threshold: &str, now: DateTime<Utc>) -> WebhookPayload {
    WebhookPayload {
        event: event.to_owned(),
        threshold_days: threshold.trim_end_matches('d').parse().ok(),
        occurred_at: now,
        scope: record.scope.to_string(),
        requester: record.requester.clone(),
        key: WebhookKey {
            id: record.id,
            purpose: record.purpose.to_string(),
            state: record.effective_state(now),
            octopus_user_id: record.octopus_user_id.clone(),
            octopus_key_id: record.octopus_key_id.clone(),
            key_hint: record.key_hint.clone(),
            created_at: record.created_at,
            expires_at: record.expires_at,
            revoked_at: record.revoked_at,
        },
        ticket: None,
    }
}

/// A configured webhook with its own HTTP client (no redirects, its `ca_file`).
#[derive(Debug, Clone)]
pub struct Webhook {
    pub config: WebhookConfig,
    http: reqwest::Client,
}

impl Webhook {
    pub fn new(config: WebhookConfig) -> Result<Self, reqwest::Error> {
        tracing::info!(webhook = %config.name, target = %redact_url(config.url.as_str()), "webhook configured");
        let http = crate::outbound::client_builder(&config.ca_certificates).timeout(Duration::from_secs(5)).build()?;
        Ok(Self { config, http })
    }

    /// One client per webhook, for [`deliver_due`].
    pub fn all(configs: &[WebhookConfig]) -> Result<Vec<Self>, reqwest::Error> {
        configs.iter().cloned().map(Self::new).collect()
    }
}

/// Gives outbox rows written before webhooks had names their webhook's name (see
/// [`crate::store::Store::name_webhook_deliveries`]).
pub async fn adopt_names(keys: &KeyService, webhooks: &[WebhookConfig]) -> Result<u64, crate::store::StoreError> {
    let names: Vec<(String, String)> = webhooks.iter().map(|h| (h.url.to_string(), h.name.clone())).collect();
    keys.store().name_webhook_deliveries(&names).await
}

/// Writes the notices that are due into the outbox. Returns how many were new.
pub async fn enqueue_notices(keys: &KeyService, webhooks: &[WebhookConfig]) -> Result<usize, PassError> {
    if webhooks.is_empty() {
        return Ok(0);
    }
    let now = keys.now();
    let horizon = chrono::Duration::days(WARNING_DAYS[0]);
    let records = keys.store().keys_for_notices(now, LOOKBACK, horizon).await?;
    let mut added = 0;
    for record in &records {
        for (event, threshold) in notices_for(record, now) {
            for hook in webhooks.iter().filter(|h| h.events.is_empty() || h.events.iter().any(|e| e == event)) {
                let delivery = NewDelivery {
                    webhook: hook.name.clone(),
                    event: event.to_owned(),
                    key_id: record.id,
                    threshold: threshold.to_owned(),
                    payload: payload(record, event, threshold, now),
                    created_at: now,
                };
                if keys.store().enqueue_delivery(&delivery).await? {
                    added += 1;
                }
            }
        }
    }
    Ok(added)
}

/// `https://user:pw@chat.example.com/hooks/T0K3N?x=1` → `https://chat.example.com/…`: the
/// scheme and host only, for error texts.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!("{}://{}/…", u.scheme(), u.host_str().unwrap_or("?")),
        Err(_) => "(unparseable URL)".to_owned(),
    }
}

/// The value of the `X-Keybroker-Signature` header: `t=<unix seconds>,id=<delivery id>,v1=<hex
/// HMAC-SHA256 of "<t>.<id>.<body>">`.
pub fn signature(secret: &str, timestamp: i64, delivery_id: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(format!("{timestamp}.{delivery_id}.").as_bytes());
    mac.update(body);
    format!("t={timestamp},id={delivery_id},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a delivery pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    pub retried: usize,
    pub gave_up: usize,
}

/// Delivers the due notices once each.
/// A delivery that fails is retried later; an outbox that cannot be read fails the pass.
pub async fn deliver_due(keys: &KeyService, webhooks: &[Webhook]) -> Result<DeliveryReport, PassError> {
    let mut report = DeliveryReport::default();
    // One claim per delivery, just before it is sent: a claim (DELIVERY_CLAIM) always outlives
    // its one send (5 s at most), so another worker never sends it too, however slow the
    // receivers; a batch claimed up front could outlive its claim behind slow receivers.
    for _ in 0..100 {
        if !super::lease::lease_held() {
            break;
        }
        let Some(delivery) = keys.store().due_deliveries(keys.now(), 1).await?.pop() else { break };
        let hook = webhooks.iter().find(|h| h.config.name == delivery.webhook);
        let attempt = match hook {
            None => Err(DeliveryFailure::Unconfigured),
            Some(hook) => send(keys, hook, &delivery).await,
        };
        let now = keys.now();
        let (result, outcome, label) = settle(attempt, hook.is_none(), &delivery, now);
        keys.metrics().webhook(&delivery.event, label);
        match label {
            "delivered" => report.delivered += 1,
            "retry" => report.retried += 1,
            _ => report.gave_up += 1,
        }
        match keys.store().finish_delivery(&delivery, &result).await {
            Ok(true) => audit_delivery(keys, &delivery, &result, outcome, label, now).await,
            Ok(false) => {
                tracing::warn!(delivery = delivery.id, webhook = %delivery.webhook, "a delivery's claim lapsed; its new claimer records it");
            }
            Err(e) => {
                tracing::warn!(error = %e, delivery = delivery.id, webhook = %delivery.webhook, "cannot record a webhook delivery");
            }
        }
    }
    Ok(report)
}

/// Sends one delivery, signed with its webhook's secret; `Err` says why it did not arrive.
async fn send(keys: &KeyService, hook: &Webhook, delivery: &Delivery) -> Result<(), DeliveryFailure> {
    let body = delivery.payload.to_string();
    let mut request = hook
        .http
        .post(hook.config.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Keybroker-Event", &delivery.event)
        .header("X-Keybroker-Delivery", delivery.id.to_string());
    if let Some(secret) = &hook.config.secret {
        let signed = signature(secret.expose_secret(), keys.now().timestamp(), delivery.id, body.as_bytes());
        request = request.header("X-Keybroker-Signature", signed);
    }
    match request.body(body).send().await {
        Ok(res) if res.status().is_redirection() => Err(DeliveryFailure::Redirected(res.status())),
        Ok(res) if res.status().is_success() => Ok(()),
        Ok(res) => Err(DeliveryFailure::Status(res.status())),
        // reqwest's message without the URL: it may carry a token.
        Err(e) => Err(DeliveryFailure::Http(e.without_url())),
    }
}

/// Why a delivery did not arrive; its text is what the outbox and the audit trail record.
#[derive(Debug, thiserror::Error)]
enum DeliveryFailure {
    #[error("the webhook is no longer configured")]
    Unconfigured,
    #[error("answered {0}; keybroker follows no redirects")]
    Redirected(reqwest::StatusCode),
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    #[error("{0}")]
    Http(reqwest::Error),
}

/// What an attempt makes of its delivery: delivered, retried with back-off (5 s doubling, at
/// most an hour), or given up (its webhook is gone, or it is older than `GIVE_UP_AFTER`).
fn settle(
    attempt: Result<(), DeliveryFailure>,
    hook_gone: bool,
    delivery: &Delivery,
    now: DateTime<Utc>,
) -> (DeliveryResult, Outcome, &'static str) {
    match attempt {
        Ok(()) => (DeliveryResult::Delivered { at: now }, Outcome::Success, "delivered"),
        Err(failure) if hook_gone || now - delivery.created_at >= GIVE_UP_AFTER => {
            (DeliveryResult::GaveUp { error: failure.to_string() }, Outcome::Failure, "gave_up")
        }
        Err(failure) => {
            let error = failure.to_string();
            let backoff =
                chrono::Duration::seconds(5 * 2i64.pow(u32::try_from(delivery.attempts.clamp(0, 10)).unwrap_or(10)))
                    .min(chrono::Duration::hours(1));
            (DeliveryResult::Retry { next_attempt_at: now + backoff, error }, Outcome::Failure, "retry")
        }
    }
}

/// Audits a recorded delivery. A checkpoint's delivery is logged, not audited: its event would
/// move the head it reports, and each checkpoint would cause the next.
async fn audit_delivery(
    keys: &KeyService,
    delivery: &Delivery,
    result: &DeliveryResult,
    outcome: Outcome,
    label: &str,
    now: DateTime<Utc>,
) {
    if delivery.event == "audit.checkpoint" {
        tracing::info!(delivery = delivery.id, webhook = %delivery.webhook, result = label, "audit checkpoint delivery");
        return;
    }
    let error = match result {
        DeliveryResult::Retry { error, .. } | DeliveryResult::GaveUp { error } => Some(error.clone()),
        DeliveryResult::Delivered { .. } => None,
    };
    let event = NewAuditEvent::new(now, "keybroker", Action::WebhookDelivery, outcome, &RequestContext::default())
        .key(delivery.key_id)
        .detail(json!({
            "delivery_id": delivery.id,
            // The name: webhook URLs often carry a token.
            "webhook": delivery.webhook,
            "event": delivery.event,
            "threshold": delivery.threshold,
            "attempt": delivery.attempts + 1,
            "result": label,
            "error": error,
        }));
    if let Err(e) = keys.audit(event).await {
        tracing::warn!(error = %e, "cannot audit a webhook delivery");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: KeyState, created_days_ago: i64, expires_in_days: i64, now: DateTime<Utc>) -> KeyRecord {
        KeyRecord {
            seq: 1,
            id: Uuid::new_v4(),
            scope: crate::domain::policy::ScopeName::parse("s").unwrap(),
            requester: "alice".to_owned(),
            purpose: crate::domain::policy::Purpose::parse("p").unwrap(),
            state,
            octopus_user_id: "Users-2".to_owned(),
            octopus_key_id: Some("apikeys-x".to_owned()),
            key_hint: Some("API-ABCD".to_owned()),
            created_at: now - chrono::Duration::days(created_days_ago),
            expires_at: now + chrono::Duration::days(expires_in_days),
            revoked_at: None,
            requested_by: None,
        }
    }

    #[test]
    fn a_key_twenty_five_days_from_expiry_gets_one_notice_per_threshold_as_time_passes() {
        let start = Utc::now();
        let key = record(KeyState::Active, 0, 25, start);
        let mut seen = std::collections::BTreeSet::new();
        for hour in 0..(27 * 24) {
            let now = start + chrono::Duration::hours(hour);
            for notice in notices_for(&key, now) {
                seen.insert(notice);
            }
        }
        let expected: std::collections::BTreeSet<_> =
            [("key.issued", ""), ("key.expiring", "20d"), ("key.expiring", "10d"), ("key.expired", "")].into();
        assert_eq!(seen, expected);
    }

    #[test]
    fn short_lived_keys_get_no_warnings_they_never_outlived() {
        let now = Utc::now();
        let key = record(KeyState::Active, 0, 7, now);
        let mut seen = std::collections::BTreeSet::new();
        for hour in 0..(8 * 24) {
            seen.extend(notices_for(&key, now + chrono::Duration::hours(hour)));
        }
        assert_eq!(seen, [("key.issued", ""), ("key.expired", "")].into());
        let key = record(KeyState::Active, 0, 15, now);
        let mut seen = std::collections::BTreeSet::new();
        for hour in 0..(16 * 24) {
            seen.extend(notices_for(&key, now + chrono::Duration::hours(hour)));
        }
        assert!(seen.contains(&("key.expiring", "10d")) && !seen.contains(&("key.expiring", "20d")));
    }

    #[test]
    fn the_twenty_day_notice_starts_exactly_at_twenty_days() {
        let now = Utc::now();
        let mut key = record(KeyState::Active, 10, 0, now);
        key.expires_at = now + chrono::Duration::days(20) + chrono::Duration::seconds(1);
        assert!(notices_for(&key, now).is_empty());
        key.expires_at = now + chrono::Duration::days(20);
        assert_eq!(notices_for(&key, now), vec![("key.expiring", "20d")]);
        key.expires_at = now + chrono::Duration::days(10);
        assert_eq!(notices_for(&key, now), vec![("key.expiring", "10d")]);
    }

    #[test]
    fn revoked_keys_are_announced_and_never_warned_about() {
        let now = Utc::now();
        let mut key = record(KeyState::Revoked, 10, 5, now);
        key.revoked_at = Some(now - chrono::Duration::hours(1));
        assert_eq!(notices_for(&key, now), vec![("key.revoked", "")]);
        assert!(notices_for(&record(KeyState::Failed, 0, 5, now), now).is_empty());
        assert!(notices_for(&record(KeyState::Pending, 0, 5, now), now).is_empty());
    }

    #[test]
    fn signatures_are_hmac_sha256_of_time_id_and_body() {
        assert_eq!(
            signature("Jefe", 1, 2, b"want for nothing?"),
            format!("t=1,id=2,v1={}", {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
                mac.update(b"1.2.want for nothing?");
                hex::encode(mac.finalize().into_bytes())
            })
        );
        // A receiver that ignores the time or the id computes another value.
        assert_ne!(signature("Jefe", 1, 2, b"x"), signature("Jefe", 1, 3, b"x"));
        assert_ne!(signature("Jefe", 1, 2, b"x"), signature("Jefe", 2, 2, b"x"));
        let sig = signature("Jefe", 0, 0, b"");
        assert!(sig.starts_with("t=0,id=0,v1=") && sig.len() == "t=0,id=0,v1=".len() + 64, "{sig}");
    }

    #[test]
    fn redacted_urls_keep_only_scheme_and_host() {
        assert_eq!(redact_url("https://u:pw@chat.example.com/hooks/T0K3N?token=x#f"), "https://chat.example.com/…");
    }
}
