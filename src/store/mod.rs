//! Storage: a narrow, domain-level trait with one implementation per backend, chosen from the
//! database URL. HTTP code never sees `sqlx::Error`.

mod batch;
mod chain;
mod postgres;
mod rows;
mod shared;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::audit::{AuditRecord, NewAuditEvent};
use crate::domain::keys::{Activation, Idempotency, KeyChange, KeyRecord, KeyState, NewKey};
use crate::domain::tickets::{Hold, Ticket, TicketEnd, TicketId};
pub use postgres::PgStore;
pub use shared::Backend;
pub use sqlite::SqliteStore;

/// How long a claimed webhook delivery stays with the worker that claimed it.
pub const DELIVERY_CLAIM: chrono::Duration = chrono::Duration::minutes(5);

/// The outcome of [`Store::insert_pending`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    Inserted,
    /// The requester used this `Idempotency-Key` within the window: nothing was written.
    Existing {
        record: Box<KeyRecord>,
        same_request: bool,
    },
}

/// Filters for listing key records; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub requester: Option<String>,
    pub scope: Option<String>,
    /// Matched against the state callers see at `now` (see [`KeyRecord::effective_state`]).
    pub state: Option<KeyState>,
    pub now: Option<DateTime<Utc>>,
    /// Only keys whose requester was in this team when the key was issued.
    pub team: Option<String>,
}

/// Filters for querying the audit trail.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub scope: Option<String>,
    pub key_id: Option<Uuid>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// Keyset pagination: newest first, items strictly older than `before_seq`.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub before_seq: Option<i64>,
    pub limit: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the caller already holds {active} active keys in this scope")]
    LimitReached { active: u64 },
    #[error("key record {0} not found")]
    NotFound(Uuid),
    #[error("key record {id} is {actual}, not {expected}")]
    WrongState { id: Uuid, expected: KeyState, actual: KeyState },
    /// The database did not answer, or refused a statement; the driver's error is the source.
    #[error("database unavailable: {0}")]
    Database(#[from] sqlx::Error),
    /// A value keybroker cannot read (a hand edit, or a schema newer than this build).
    #[error("unreadable value in the database: {0}")]
    Corrupt(String),
    /// The store cannot be used: its write queue stopped, its schema is not migrated, a batch
    /// was half written.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// A refusal of one write (the limit, a missing or finished record), as opposed to the
    /// database failing: a refusal is that write's answer, a failure fails its whole batch.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::LimitReached { .. } | Self::NotFound(_) | Self::WrongState { .. })
    }
}

/// The storage contract both backends implement. Methods with a body run the SQL both
/// backends share (`shared.rs`) on [`Store::backend`]; the others are each backend's own.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend the shared SQL runs on.
    fn backend(&self) -> Backend<'_>;

    /// Keys every event appended from now on with `key` (`audit.chain_key_file`; set once, at
    /// start, before the first append).
    fn set_chain_key(&self, key: crate::domain::audit::ChainKey) {
        shared::set_chain_key(self.backend(), key);
    }

    /// Applies the migrations.
    async fn migrate(&self) -> Result<(), StoreError> {
        shared::migrate(self.backend()).await
    }

    /// Checks, without changing anything, that every migration has been applied (for a runtime
    /// role that may not apply them).
    async fn check_migrated(&self) -> Result<(), StoreError> {
        shared::check_migrated(self.backend()).await
    }

    /// Checks the database answers.
    async fn ping(&self) -> Result<(), StoreError> {
        shared::ping(self.backend()).await
    }

    /// Closes the connection pool (at shutdown, after the last request).
    async fn close(&self) {}

    /// The issuance path's writes (`insert_pending`, `activate`, `append_audit`) are group
    /// committed (see `batch.rs`): the transaction below may hold other callers' writes too, and
    /// each stays all-or-nothing.
    ///
    /// In one transaction: looks up the requester's `Idempotency-Key` (a use within
    /// [`IDEMPOTENCY_WINDOW`](crate::domain::keys::IDEMPOTENCY_WINDOW) returns that record and writes nothing), checks the requester's
    /// limit (active or pending, unexpired keys in the scope), writes the record as `pending` and
    /// appends `event`.
    async fn insert_pending(
        &self,
        key: &NewKey,
        event: &NewAuditEvent,
        now: DateTime<Utc>,
    ) -> Result<Pending, StoreError> {
        shared::insert_pending(self.backend(), key, event, now).await
    }

    /// In one transaction: a pending record becomes active, and `event` is appended.
    async fn activate(&self, activation: &Activation, event: &NewAuditEvent) -> Result<KeyRecord, StoreError> {
        shared::activate(self.backend(), activation, event).await
    }

    /// In one transaction: applies `change` to record `id` at `at` as the key's state machine
    /// ([`KeyState::on`]) allows, and appends `event` if the record moved. Returns the record
    /// afterwards and whether it moved; a change from the wrong state is `WrongState`.
    async fn change_state(
        &self,
        id: Uuid,
        change: KeyChange,
        at: DateTime<Utc>,
        event: &NewAuditEvent,
    ) -> Result<(KeyRecord, bool), StoreError> {
        shared::change_state(self.backend(), id, change, at, event).await
    }

    /// A pending record becomes failed (see [`Store::change_state`]).
    async fn mark_failed(&self, id: Uuid, event: &NewAuditEvent) -> Result<(), StoreError> {
        self.change_state(id, KeyChange::Fail, event.occurred_at, event).await.map(|_| ())
    }

    /// An active (or expired) record becomes revoked at `at`. Revoking a revoked record is a
    /// no-op that returns it.
    async fn mark_revoked(&self, id: Uuid, at: DateTime<Utc>, event: &NewAuditEvent) -> Result<KeyRecord, StoreError> {
        self.change_state(id, KeyChange::Revoke, at, event).await.map(|(record, _)| record)
    }

    async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        shared::get_key(self.backend(), id).await
    }

    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest) -> Result<Vec<KeyRecord>, StoreError>;

    /// Every record matching `filter`, newest first, read page by page (jobs and admin
    /// operations that act on all of them).
    async fn list_all_keys(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = self.list_keys(filter, PageRequest { before_seq: before, limit: 200 }).await?;
            let Some(last) = page.last() else { break };
            before = Some(last.seq);
            all.extend(page);
        }
        Ok(all)
    }

    /// Pending records created before `cutoff` whose issuance's deadline has passed at `now`,
    /// oldest first: orphan candidates for the reconciler.
    async fn pending_before(
        &self,
        cutoff: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        shared::pending_before(self.backend(), cutoff, now, limit).await
    }

    /// Active records whose expiry has passed at `now`, oldest expiry first.
    async fn due_for_expiry(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        shared::due_for_expiry(self.backend(), now, limit).await
    }

    /// An active record becomes expired. False (and nothing written) when it was no longer
    /// active, or is gone.
    async fn mark_expired(&self, id: Uuid, event: &NewAuditEvent) -> Result<bool, StoreError> {
        match self.change_state(id, KeyChange::Expire, event.occurred_at, event).await {
            Ok((_, moved)) => Ok(moved),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Records that a revocation of `id` started at `at` (before Octopus is asked).
    async fn begin_revocation(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        shared::begin_revocation(self.backend(), id, at).await
    }

    /// Whether a revocation of `id` started after `since` (and the record is not revoked yet).
    async fn revocation_in_progress(&self, id: Uuid, since: DateTime<Utc>) -> Result<bool, StoreError> {
        shared::revocation_in_progress(self.backend(), id, since).await
    }

    /// Records that a revocation was asked for, so a failed one is retried.
    async fn request_revocation(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        shared::request_revocation(self.backend(), id, at).await
    }

    /// Active records whose revocation was asked for but did not happen.
    async fn revocations_to_retry(&self, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        shared::revocations_to_retry(self.backend(), limit).await
    }

    /// Records that may need a webhook notice at `now`: created, revoked or expired within
    /// `lookback`, or expiring within `horizon`.
    async fn keys_for_notices(
        &self,
        now: DateTime<Utc>,
        lookback: chrono::Duration,
        horizon: chrono::Duration,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        shared::keys_for_notices(self.backend(), now, lookback, horizon).await
    }

    /// Adds a notice to the outbox unless the same (webhook, event, key, threshold) is there
    /// already. Returns whether it was added.
    async fn enqueue_delivery(&self, delivery: &NewDelivery) -> Result<bool, StoreError> {
        shared::enqueue_delivery(self.backend(), delivery).await
    }

    /// Outbox rows written before webhooks had names hold the webhook's URL: each `(url, name)`
    /// pair gives them their webhook's name, and rows of URLs no longer configured get
    /// `removed-<id>`, so that no URL stays in the database.
    async fn name_webhook_deliveries(&self, names: &[(String, String)]) -> Result<u64, StoreError> {
        shared::name_webhook_deliveries(self.backend(), names).await
    }

    /// Claims the pending deliveries due at `now`: they are not due again for
    /// [`DELIVERY_CLAIM`], so a second worker cannot send them too. A worker that dies before
    /// finishing them lets them fall due again after the claim.
    async fn due_deliveries(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        shared::due_deliveries(self.backend(), now, limit).await
    }

    /// Records what became of a delivery, if `delivery`'s claim still holds it (its claim did not
    /// lapse and go to another worker, which then owns the outcome). Returns whether it did.
    async fn finish_delivery(&self, delivery: &Delivery, result: &DeliveryResult) -> Result<bool, StoreError> {
        shared::finish_delivery(self.backend(), delivery, result).await
    }

    /// Takes or renews the lease of a job for `holder` until `now + ttl`. False when another
    /// holder's lease is still running.
    async fn try_lease(
        &self,
        job: &str,
        holder: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Result<bool, StoreError> {
        shared::try_lease(self.backend(), job, holder, now, ttl).await
    }

    /// Active, unexpired records per scope at `now` (for the `active_keys` gauge).
    async fn active_counts(&self, now: DateTime<Utc>) -> Result<Vec<(String, u64)>, StoreError> {
        shared::active_counts(self.backend(), now).await
    }

    /// The record whose secret has this keyed hash.
    async fn find_by_secret_hmac(&self, hmac: &str) -> Result<Option<KeyRecord>, StoreError> {
        shared::find_by_secret_hmac(self.backend(), hmac).await
    }

    async fn append_audit(&self, event: &NewAuditEvent) -> Result<(), StoreError> {
        shared::append_audit(self.backend(), event).await
    }

    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest) -> Result<Vec<AuditRecord>, StoreError>;

    /// Events in chain order (oldest first), strictly after `after_seq`, at most `limit`.
    async fn audit_chain(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError>;

    /// In one transaction: writes a `waiting` ticket and appends `event`.
    async fn insert_ticket(&self, ticket: &Ticket, event: &NewAuditEvent) -> Result<(), StoreError> {
        shared::insert_ticket(self.backend(), ticket, event).await
    }

    async fn get_ticket(&self, id: &TicketId) -> Result<Option<Ticket>, StoreError> {
        shared::get_ticket(self.backend(), id).await
    }

    /// Marks a claim holding `token` as started on a waiting, unexpired ticket that no other
    /// claim holds (a claim started before `stale_before` no longer counts) and through which no
    /// key was issued yet. False, and nothing written, otherwise.
    async fn begin_ticket_claim(
        &self,
        id: &TicketId,
        token: &str,
        now: DateTime<Utc>,
        stale_before: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        shared::begin_ticket_claim(self.backend(), id, token, now, stale_before).await
    }

    /// Lets go of the claim holding `token`, whose issuance did not happen.
    async fn release_ticket_claim(&self, id: &TicketId, token: &str) -> Result<(), StoreError> {
        shared::release_ticket_claim(self.backend(), id, token).await
    }

    /// In one transaction: a waiting ticket ends as `end` says at `at`, and `event` is appended,
    /// if `hold` holds. False, and nothing written, otherwise.
    async fn end_ticket(
        &self,
        id: &TicketId,
        end: TicketEnd,
        at: DateTime<Utc>,
        hold: Hold<'_>,
        event: &NewAuditEvent,
    ) -> Result<bool, StoreError> {
        shared::end_ticket(self.backend(), id, end, at, hold, event).await
    }

    /// Publishes a policy document for every replica, unless the newest published one already has
    /// this `version`. Returns the newest one's position afterwards.
    async fn publish_policy(
        &self,
        version: &str,
        document: &str,
        at: DateTime<Utc>,
        by: &str,
    ) -> Result<i64, StoreError> {
        shared::publish_policy(self.backend(), version, document, at, by).await
    }

    /// The newest published policy: (position, version, document, when it was published).
    async fn latest_policy(&self) -> Result<Option<(i64, String, String, DateTime<Utc>)>, StoreError> {
        shared::latest_policy(self.backend()).await
    }

    /// Records the policy version `replica` runs, at `at`.
    async fn report_replica_policy(&self, replica: &str, version: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        shared::report_replica_policy(self.backend(), replica, version, at).await
    }

    /// Every replica's last report: (replica, version, when), newest first.
    async fn replica_policies(&self) -> Result<Vec<(String, String, DateTime<Utc>)>, StoreError> {
        shared::replica_policies(self.backend()).await
    }

    /// The key issued through a ticket (any state but `failed`), if any.
    async fn ticket_key(&self, id: &TicketId) -> Result<Option<KeyRecord>, StoreError> {
        shared::ticket_key(self.backend(), id).await
    }

    /// Waiting tickets past their expiry at `now` that no claim holds, oldest first.
    async fn tickets_due_for_expiry(
        &self,
        now: DateTime<Utc>,
        stale_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Ticket>, StoreError> {
        shared::tickets_due_for_expiry(self.backend(), now, stale_before, limit).await
    }
}

/// A webhook notice to deliver (the outbox row).
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    /// The webhook's configured name (never its URL).
    pub webhook: String,
    pub event: String,
    pub key_id: Uuid,
    /// `20d`/`10d` for `key.expiring`, empty otherwise.
    pub threshold: String,
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: i64,
    pub webhook: String,
    pub event: String,
    pub key_id: Uuid,
    pub threshold: String,
    pub payload: serde_json::Value,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    /// Until when this worker's claim holds it: the claim's token (its `next_attempt_at`).
    pub claimed_until: DateTime<Utc>,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryResult {
    Delivered { at: DateTime<Utc> },
    Retry { next_attempt_at: DateTime<Utc>, error: String },
    GaveUp { error: String },
}

/// Opens the store named by the database URL.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url).await?))
    } else {
        Err(StoreError::Unavailable("database.url must start with sqlite:// or postgres://".to_owned()))
    }
}

/// How many of `migrator`'s migrations are applied, per `_sqlx_migrations`, against how many it has.
pub(crate) fn migration_gap(migrator: &sqlx::migrate::Migrator, applied: i64) -> Result<(), StoreError> {
    let needed = migrator.iter().filter(|m| m.migration_type.is_up_migration()).count() as i64;
    if applied < needed {
        return Err(StoreError::Unavailable(format!(
            "the database has {applied} of keybroker's {needed} migrations: run `keybroker migrate` as the schema's \
             owner (database.run_migrations = false here)"
        )));
    }
    Ok(())
}
