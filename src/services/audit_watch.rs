//! Watching the audit trail from outside the database: the chain's head is published on an
//! interval (a log line, the `keybroker_audit_head_seq` metric, and an `audit.checkpoint`
//! webhook for webhooks that list it), and verification walks the chain incrementally, from
//! where this process last verified it, comparing the trail's end with the last head this
//! process published. Deleting the newest events, which leaves a valid chain, is then reported,
//! and so is rewriting them (with `audit.chain_key_file`, a rewrite cannot be made to verify).

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::config::WebhookConfig;
use crate::domain::audit::{AuditRecord, ChainBreak, ChainKey, GENESIS_HASH, verify_chain};
use crate::store::{AuditFilter, NewDelivery, PageRequest, Store, StoreError};

/// Events read per query while verifying.
const BATCH: u32 = 1000;

/// The chain's last event: its position and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: String,
    pub at: DateTime<Utc>,
}

/// What one verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Events checked by this call.
    pub events_checked: u64,
    /// Where it started: after this event (0: from the first).
    pub from_seq: i64,
    /// The last event checked (or the start, when none was new).
    pub last_seq: i64,
    /// The hash of the last event that checked out.
    pub head_hash: String,
    /// False when the call stopped at its bound; the next call goes on from `last_seq`.
    pub complete: bool,
    pub first_break: Option<ChainBreak>,
    /// Whether new events are keyed (`audit.chain_key_file`).
    pub keyed: bool,
    /// The last head this process published, which the trail must still hold.
    pub published: Option<Head>,
}

/// The trail as this process has seen it.
pub struct AuditWatch {
    key: Option<ChainKey>,
    /// Where the last verification ended: every event up to it checked out.
    verified: Mutex<Option<(i64, String)>>,
    published: Mutex<Option<Head>>,
    /// The first break found: reported by every verification after it, until a restart (the
    /// trail is append-only; nothing can mend it, and a later walk must not forget it).
    broken: Mutex<Option<ChainBreak>>,
}

impl AuditWatch {
    pub fn new(key: Option<ChainKey>) -> Self {
        Self { key, verified: Mutex::new(None), published: Mutex::new(None), broken: Mutex::new(None) }
    }

    pub fn keyed(&self) -> bool {
        self.key.is_some()
    }

    pub fn published(&self) -> Option<Head> {
        self.published.lock().ok().and_then(|p| p.clone())
    }

    /// Verifies the events after the last verified one, at most `max_events` of them, then
    /// checks that the events this process verified and published are still there, unchanged.
    pub async fn verify(&self, store: &dyn Store, max_events: u64) -> Result<Verification, StoreError> {
        let report = self.walk(store, max_events).await?;
        let mut broken = self.broken.lock().map_err(|_| StoreError::Unavailable("poisoned".to_owned()))?;
        match (&*broken, &report.first_break) {
            (Some(earlier), _) => Ok(Verification { first_break: Some(earlier.clone()), ..report }),
            (None, Some(brk)) => {
                tracing::error!(seq = brk.seq, reason = %brk.reason, "the audit trail is broken");
                *broken = Some(brk.clone());
                Ok(report)
            }
            (None, None) => Ok(report),
        }
    }

    fn note_break(&self, brk: ChainBreak) {
        if let Ok(mut broken) = self.broken.lock() {
            if broken.is_none() {
                tracing::error!(seq = brk.seq, reason = %brk.reason, "the audit trail is broken");
                *broken = Some(brk);
            }
        }
    }

    async fn walk(&self, store: &dyn Store, max_events: u64) -> Result<Verification, StoreError> {
        let start = self.verified.lock().ok().and_then(|v| v.clone());
        let (from_seq, from_hash) = start.clone().unwrap_or((0, GENESIS_HASH.to_owned()));
        let mut report = Verification {
            events_checked: 0,
            from_seq,
            last_seq: from_seq,
            head_hash: from_hash.clone(),
            complete: true,
            first_break: None,
            keyed: self.keyed(),
            published: self.published(),
        };
        // What was verified before must still be there: a rewrite of older events, or a
        // truncation below the last verified event, shows here.
        if let Some((seq, hash)) = &start {
            if let Some(reason) = missing_or_changed(store, *seq, hash, "verified").await? {
                report.first_break = Some(ChainBreak { seq: *seq, event_id: uuid::Uuid::nil(), reason });
                return Ok(report);
            }
        }
        let mut after = from_seq;
        let mut head = from_hash;
        loop {
            if report.events_checked >= max_events {
                report.complete = false;
                break;
            }
            let batch = store.audit_chain(after, BATCH).await?;
            let Some(last) = batch.last() else { break };
            let last_seq = last.seq;
            match verify_chain(head.clone(), &batch, self.key.as_ref()) {
                Ok(h) => {
                    head = h;
                    after = last_seq;
                    report.events_checked += batch.len() as u64;
                }
                Err(brk) => {
                    report.events_checked += batch.iter().take_while(|e| e.seq < brk.seq).count() as u64;
                    report.last_seq = batch.iter().take_while(|e| e.seq < brk.seq).last().map_or(after, |e| e.seq);
                    report.head_hash = head;
                    report.first_break = Some(brk);
                    return Ok(report);
                }
            }
            if batch.len() < BATCH as usize {
                break;
            }
        }
        report.last_seq = after;
        report.head_hash = head.clone();
        // With a chain key, the newest event is keyed: every start appends `config.loaded` with
        // the key. A trail that ends in plain hashes was rebuilt, or cut back to the events from
        // before the key, by someone without it.
        if self.key.is_some() && report.complete && after > 0 && !head.starts_with(crate::domain::audit::KEYED_PREFIX) {
            report.first_break = Some(ChainBreak {
                seq: after,
                event_id: uuid::Uuid::nil(),
                reason: "the trail's newest event is not keyed although audit.chain_key_file is set: its keyed \
                         events were removed or rewritten without the key"
                    .to_owned(),
            });
            return Ok(report);
        }
        if after > 0 {
            if let Ok(mut v) = self.verified.lock() {
                *v = Some((after, head));
            }
        }
        if let Some(published) = &report.published {
            if let Some(reason) = missing_or_changed(store, published.seq, &published.hash, "published").await? {
                report.first_break = Some(ChainBreak { seq: published.seq, event_id: uuid::Uuid::nil(), reason });
            }
        }
        Ok(report)
    }

    /// Reads the head and publishes it: a log line, the metric, and `audit.checkpoint` for the
    /// webhooks that list it. Returns it (`None` for an empty trail).
    pub async fn publish(
        &self,
        store: &dyn Store,
        metrics: &crate::metrics::Metrics,
        webhooks: &[WebhookConfig],
        now: DateTime<Utc>,
    ) -> Result<Option<Head>, StoreError> {
        let newest = store.list_audit(&AuditFilter::default(), PageRequest { before_seq: None, limit: 1 }).await?;
        let Some(event) = newest.into_iter().next() else { return Ok(None) };
        let head = Head { seq: event.seq, hash: event.hash.clone(), at: now };
        // A head that went back (the newest events deleted) or changed is never published: the
        // one published before stands, and the break is reported.
        if let Some(previous) = self.published() {
            if let Some(reason) = missing_or_changed(store, previous.seq, &previous.hash, "published").await? {
                self.note_break(ChainBreak { seq: previous.seq, event_id: uuid::Uuid::nil(), reason });
                return Ok(Some(previous));
            }
        }
        let moved = self.published().is_none_or(|p| p.seq != head.seq || p.hash != head.hash);
        metrics.audit_head_seq.set(head.seq);
        if !moved {
            return Ok(Some(head));
        }
        tracing::info!(seq = head.seq, hash = %head.hash, keyed = self.keyed(), "audit head");
        for hook in webhooks.iter().filter(|h| h.events.iter().any(|e| e == "audit.checkpoint")) {
            let delivery = NewDelivery {
                webhook: hook.name.clone(),
                event: "audit.checkpoint".to_owned(),
                key_id: uuid::Uuid::nil(),
                threshold: format!("{}:{}", head.seq, head.hash),
                payload: json!({
                    "event": "audit.checkpoint",
                    "occurred_at": now,
                    "seq": head.seq,
                    "hash": head.hash,
                    "keyed": self.keyed(),
                }),
                created_at: now,
            };
            if let Err(e) = store.enqueue_delivery(&delivery).await {
                tracing::warn!(webhook = %hook.name, error = %e, "could not queue audit.checkpoint");
            }
        }
        if let Ok(mut p) = self.published.lock() {
            *p = Some(head.clone());
        }
        Ok(Some(head))
    }
}

/// `None` when event `seq` is there with `hash`; otherwise what happened to it.
async fn missing_or_changed(store: &dyn Store, seq: i64, hash: &str, what: &str) -> Result<Option<String>, StoreError> {
    let found: Vec<AuditRecord> = store.audit_chain(seq - 1, 1).await?;
    Ok(match found.first() {
        Some(e) if e.seq == seq && e.hash == hash => None,
        Some(e) if e.seq == seq => Some(format!(
            "event #{seq}, which this process {what} with hash {hash}, now has hash {}: the trail was rewritten",
            e.hash
        )),
        _ => Some(format!(
            "event #{seq}, which this process {what} with hash {hash}, is gone: the newest events were deleted"
        )),
    })
}
