//! The embedded SQLite store: WAL, a busy timeout, and write transactions that take the write
//! lock up front (`BEGIN IMMEDIATE`), so concurrent issuance never sees "database is locked".

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, Transaction};
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use super::batch::{self, BatchTx, Committer, Found, Outcome, Write, WriteQueue};
use super::rows::{
    KEY_COLUMNS, delivery_from_row, key_from_row, key_state, parse_sqlite_time as parse_time, sqlite_time as fmt_time,
};
use super::shared::{self, Backend, Connection};
use super::{
    Activation, AuditFilter, DELIVERY_CLAIM, Delivery, DeliveryResult, KeyFilter, KeyRecord, KeyState, NewDelivery,
    NewKey, PageRequest, Store, StoreError,
};
use crate::domain::audit::{AuditRecord, ChainKey, GENESIS_HASH, NewAuditEvent, store_precision};
use crate::domain::keys::KeyChange;
use crate::domain::policy::{Purpose, ScopeName};
use crate::domain::tickets::{Hold, Ticket, TicketEnd, TicketId};

pub struct SqliteStore {
    /// Readers.
    pool: SqlitePool,
    /// The one connection that writes, so its page cache stays valid between write transactions
    /// (a pool of writers re-read every page another connection had changed).
    writer: SqlitePool,
    /// SQLite has one writer at a time. Writers queue here, in the process, instead of sleeping
    /// in SQLite's busy handler (whose back-off dominated issuance latency under load). The lock
    /// guards the audit chain's head as this process last wrote it; see [`append_in`].
    write_lock: Arc<tokio::sync::Mutex<ChainHead>>,
    /// `audit.chain_key_file`'s key, once set: appended events are keyed with it.
    chain_key: Arc<std::sync::OnceLock<ChainKey>>,
    /// The issuance path's writes, committed in batches on `writer` under `write_lock`.
    writes: WriteQueue,
    /// The background checkpoint task; stopped when the store goes.
    checkpointer: tokio::task::AbortHandle,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.checkpointer.abort();
    }
}

/// The audit chain's last hash as this process last appended it. Only a hint: every append
/// checks it against the table inside its INSERT, and reads the head afresh when it is stale
/// (another process appended, or the transaction that appended it rolled back).
type ChainHead = Option<String>;

impl SqliteStore {
    /// The queue of the issuance path's writes (group commit, `batch.rs`).
    pub(super) fn write_queue(&self) -> &WriteQueue {
        &self.writes
    }

    /// The migrations of this dialect.
    pub(super) fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
        &MIGRATOR
    }

    /// The read pool.
    pub(super) fn reader(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(options.clone())
            .await?;
        // The writer never checkpoints: a checkpoint copies the WAL into the database file and
        // syncs both, and on the writer it ran inside whichever write transaction crossed the
        // threshold, while every other writer queued behind it. A task does it in the background.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(options.pragma("wal_autocheckpoint", "0"))
            .await?;
        let checkpointer = tokio::spawn(checkpoint_in_background(pool.clone())).abort_handle();
        let write_lock = Arc::new(tokio::sync::Mutex::new(None));
        let chain_key = Arc::<std::sync::OnceLock<ChainKey>>::default();
        let writes = WriteQueue::start(SqliteCommitter {
            writer: writer.clone(),
            write_lock: write_lock.clone(),
            chain_key: chain_key.clone(),
        });
        Ok(Self { pool, writer, write_lock, writes, checkpointer, chain_key })
    }

    /// A write transaction that holds the write lock from its start; the guard must live until
    /// the commit.
    pub(super) async fn write_tx(
        &self,
    ) -> Result<(OwnedMutexGuard<ChainHead>, Transaction<'static, Sqlite>), StoreError> {
        let guard = self.write_lock.clone().lock_owned().await;
        let tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        Ok((guard, tx))
    }
}

/// Copies the WAL into the database file every 200 ms, without waiting for writers or readers
/// (`PASSIVE`), until the pool is closed or the store dropped.
async fn checkpoint_in_background(pool: SqlitePool) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !pool.is_closed() {
        tick.tick().await;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
            if pool.is_closed() {
                break;
            }
            tracing::warn!(error = %e, "SQLite checkpoint failed; retrying");
        }
    }
}

/// Appends `events`, in order, to the chain. The INSERT itself checks that `head` is still the
/// chain's last hash, so the usual append is one statement however many events there are; a
/// stale hint costs one read and a second try.
async fn append_in(
    tx: &mut Transaction<'static, Sqlite>,
    head: &mut ChainHead,
    key: Option<&ChainKey>,
    events: &[&NewAuditEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    *head = Some(shared::append(Connection::Sqlite(tx), head.take(), events, key).await?);
    Ok(())
}

/// One event as a row of [`insert_events`]'s JSON array; `detail` is its JSON text, stored as
/// written.
type EventRow<'a> = (
    String,
    String,
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<String>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    String,
    &'a str,
    &'a str,
);

/// Inserts `events` chained after `prev`, in one statement, if `prev` is the chain's last hash:
/// the new last hash, or `None` (nothing written) if `prev` is not the last hash.
pub(super) async fn insert_events(
    connection: &mut sqlx::SqliteConnection,
    events: &[&NewAuditEvent],
    links: &[shared::Link],
    prev: &str,
) -> Result<u64, StoreError> {
    let rows: Vec<EventRow<'_>> = events
        .iter()
        .zip(links)
        .map(|(event, link)| {
            (
                event.id.to_string(),
                fmt_time(store_precision(event.occurred_at)),
                event.actor.as_str(),
                event.action.as_str(),
                event.outcome.as_str(),
                event.scope.as_deref(),
                event.key_id.map(|k| k.to_string()),
                event.octopus_key_id.as_deref(),
                event.context.request_id.as_deref(),
                event.context.client_addr.as_deref(),
                event.context.user_agent.as_deref(),
                event.detail.to_string(),
                link.prev.as_str(),
                link.hash.as_str(),
            )
        })
        .collect();
    let rows = serde_json::to_string(&rows).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    // Rows are inserted in array order, so `seq` follows the chain.
    let inserted = sqlx::query(
        "INSERT INTO audit_events (id, occurred_at, actor, action, outcome, scope, key_id, octopus_key_id, \
         request_id, client_addr, user_agent, detail, prev_hash, hash) \
         SELECT e.value ->> '$[0]', e.value ->> '$[1]', e.value ->> '$[2]', e.value ->> '$[3]', \
                e.value ->> '$[4]', e.value ->> '$[5]', e.value ->> '$[6]', e.value ->> '$[7]', \
                e.value ->> '$[8]', e.value ->> '$[9]', e.value ->> '$[10]', e.value ->> '$[11]', \
                e.value ->> '$[12]', e.value ->> '$[13]' \
         FROM json_each(?) AS e \
         WHERE COALESCE((SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1), ?) = ? \
         ORDER BY e.key",
    )
    .bind(rows)
    .bind(GENESIS_HASH)
    .bind(prev)
    .execute(connection)
    .await?
    .rows_affected();
    Ok(inserted)
}

/// A page of rows as one JSON array built by SQLite (`json_group_array(json_array(...))`):
/// sqlx copies every column value of every row it hands over, which cost more than the query
/// itself for a 50-row page; one text value per page does not.
type KeyJsonRow = (
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
);

fn keys_from_json(text: &str) -> Result<Vec<KeyRecord>, StoreError> {
    let rows: Vec<KeyJsonRow> = serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    rows.into_iter()
        .map(|(seq, id, scope, requester, purpose, state, octopus_user_id, octopus_key_id, key_hint, c, e, r, by)| {
            Ok(KeyRecord {
                seq,
                id: Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                scope: ScopeName::stored(scope),
                requester,
                purpose: Purpose::stored(purpose),
                state: key_state(&state)?,
                octopus_user_id,
                octopus_key_id,
                key_hint,
                created_at: parse_time(&c)?,
                expires_at: parse_time(&e)?,
                revoked_at: r.as_deref().map(parse_time).transpose()?,
                requested_by: by,
            })
        })
        .collect()
}

const AUDIT_COLUMNS: &str = "seq, id, occurred_at, actor, action, outcome, scope, key_id, octopus_key_id, \
                             request_id, client_addr, user_agent, detail, prev_hash, hash";

type AuditJsonRow = (
    i64,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    String,
    String,
);

fn audit_from_json(text: &str) -> Result<Vec<AuditRecord>, StoreError> {
    let bad = |e: String| StoreError::Corrupt(e);
    let rows: Vec<AuditJsonRow> = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    rows.into_iter()
        .map(|(seq, id, occurred_at, actor, action, outcome, scope, key_id, octopus_key_id, rid, addr, ua, d, p, h)| {
            Ok(AuditRecord {
                seq,
                id: Uuid::parse_str(&id).map_err(|e| bad(e.to_string()))?,
                occurred_at: parse_time(&occurred_at)?,
                actor,
                action,
                outcome,
                scope,
                key_id: key_id.as_deref().map(Uuid::parse_str).transpose().map_err(|e| bad(e.to_string()))?,
                octopus_key_id,
                request_id: rid,
                client_addr: addr,
                user_agent: ua,
                // Stored as text and parsed here, exactly as it was written, for the hash.
                detail: serde_json::from_str(&d).map_err(|e| bad(e.to_string()))?,
                prev_hash: p,
                hash: h,
            })
        })
        .collect()
}

async fn key_in(tx: &mut Transaction<'static, Sqlite>, id: Uuid) -> Result<KeyRecord, StoreError> {
    let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM key_records WHERE id = ?"))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound(id))?;
    key_from_row(&row)
}

/// Commits a write transaction whose work changed something, and rolls back any other.
async fn finish<T>(tx: Transaction<'static, Sqlite>, result: &Result<(T, bool), StoreError>) -> Result<(), StoreError> {
    match result {
        Ok((_, true)) => tx.commit().await?,
        _ => tx.rollback().await?,
    }
    Ok(())
}

/// The issuance path's writes, committed in batches (see [`batch`](super::batch)) on the writer
/// connection, under the write lock.
struct SqliteCommitter {
    writer: SqlitePool,
    write_lock: Arc<tokio::sync::Mutex<ChainHead>>,
    chain_key: Arc<std::sync::OnceLock<ChainKey>>,
}

#[async_trait]
impl Committer for SqliteCommitter {
    async fn event_committed(&self, id: Uuid) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM audit_events WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.writer)
            .await?;
        Ok(found.is_some())
    }

    async fn commit_batch(&self, writes: &[&Write]) -> Result<Vec<Outcome>, StoreError> {
        let mut head = self.write_lock.lock().await;
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        match batch::apply(&mut SqliteBatch { tx: &mut tx, head: &mut head, key: self.chain_key.get() }, writes).await {
            Ok(outcomes) => {
                tx.commit().await?;
                Ok(outcomes)
            }
            Err(e) => {
                // The head may name an event that is being rolled back.
                *head = None;
                tx.rollback().await?;
                Err(e)
            }
        }
    }
}

/// A batch transaction on SQLite; the write lock stands in for requester locks.
struct SqliteBatch<'a> {
    tx: &'a mut Transaction<'static, Sqlite>,
    head: &'a mut ChainHead,
    key: Option<&'a ChainKey>,
}

fn to_json<T: serde::Serialize>(rows: &T) -> Result<String, StoreError> {
    serde_json::to_string(rows).map_err(|e| StoreError::Unavailable(e.to_string()))
}

#[async_trait]
impl BatchTx for SqliteBatch<'_> {
    async fn set_state(
        &mut self,
        id: Uuid,
        from: KeyState,
        to: KeyState,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        shared::set_state(Connection::Sqlite(self.tx), id, from, to, at).await
    }

    async fn lock_requesters(&mut self, _requesters: &[&str]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn find_idempotent(&mut self, keys: &[&NewKey]) -> Result<Vec<Found>, StoreError> {
        let pairs: Vec<(&str, &str)> = keys
            .iter()
            .filter_map(|k| k.idempotency.as_ref().map(|i| (k.requester.as_str(), i.key.as_str())))
            .collect();
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS}, request_hash, idempotency_key FROM key_records \
             WHERE (requester, idempotency_key) IN (SELECT value ->> '$[0]', value ->> '$[1]' FROM json_each(?))"
        ))
        .bind(to_json(&pairs)?)
        .fetch_all(&mut **self.tx)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Found {
                    record: key_from_row(row)?,
                    idempotency_key: row.try_get("idempotency_key")?,
                    request_hash: row.try_get("request_hash")?,
                })
            })
            .collect()
    }

    async fn limit_counts(&mut self, inserts: &[(&NewKey, DateTime<Utc>)]) -> Result<Vec<u64>, StoreError> {
        let rows: Vec<(&str, &str, String, i64)> = inserts
            .iter()
            .zip(batch::exact_below(inserts))
            .map(|((k, now), below)| (k.requester.as_str(), k.scope.as_str(), fmt_time(*now), below))
            .collect();
        let counts: Vec<i64> = sqlx::query_scalar(
            "SELECT CASE WHEN c.held >= 0 AND c.held < c.below THEN c.held \
                    ELSE (SELECT COUNT(*) FROM key_records WHERE requester = c.r AND scope = c.s \
                          AND state IN ('pending', 'active') AND expires_at > c.n) END \
             FROM (SELECT j.key AS ord, j.value ->> '$[0]' AS r, j.value ->> '$[1]' AS s, \
                          j.value ->> '$[2]' AS n, j.value ->> '$[3]' AS below, \
                          COALESCE((SELECT held FROM key_holdings \
                                    WHERE requester = j.value ->> '$[0]' AND scope = j.value ->> '$[1]'), 0) AS held \
                   FROM json_each(?) AS j) AS c \
             ORDER BY c.ord",
        )
        .bind(to_json(&rows)?)
        .fetch_all(&mut **self.tx)
        .await?;
        Ok(counts.into_iter().map(|n| u64::try_from(n).unwrap_or_default()).collect())
    }

    async fn insert_keys(&mut self, keys: &[&NewKey]) -> Result<(), StoreError> {
        let mut rows = Vec::with_capacity(keys.len());
        for k in keys {
            rows.push((
                k.id.to_string(),
                &k.scope,
                &k.requester,
                &k.purpose,
                &k.octopus_user_id,
                fmt_time(k.created_at),
                fmt_time(k.expires_at),
                k.idempotency.as_ref().map(|i| &i.key),
                k.idempotency.as_ref().map(|i| &i.request_hash),
                to_json(&k.requester_teams)?,
                k.requested_by.as_deref(),
                k.ticket.as_deref(),
                k.deadline.map(fmt_time),
            ));
        }
        let inserted = sqlx::query(
            "INSERT INTO key_records (id, scope, requester, purpose, state, octopus_user_id, created_at, \
             expires_at, updated_at, idempotency_key, request_hash, requester_teams, requested_by, ticket_id, \
             deadline) \
             SELECT k.value ->> '$[0]', k.value ->> '$[1]', k.value ->> '$[2]', k.value ->> '$[3]', 'pending', \
                    k.value ->> '$[4]', k.value ->> '$[5]', k.value ->> '$[6]', k.value ->> '$[5]', \
                    k.value ->> '$[7]', k.value ->> '$[8]', k.value ->> '$[9]', k.value ->> '$[10]', \
                    k.value ->> '$[11]', k.value ->> '$[12]' \
             FROM json_each(?) AS k ORDER BY k.key",
        )
        .bind(to_json(&rows)?)
        .execute(&mut **self.tx)
        .await?
        .rows_affected();
        if inserted != keys.len() as u64 {
            return Err(StoreError::Unavailable(format!("{inserted} of {} key records were written", keys.len())));
        }
        Ok(())
    }

    async fn activate_keys(
        &mut self,
        activations: &[(&Activation, DateTime<Utc>)],
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let rows: Vec<_> = activations
            .iter()
            .map(|(a, at)| {
                (
                    a.id.to_string(),
                    &a.octopus_key_id,
                    &a.key_hint,
                    &a.secret_hmac,
                    fmt_time(a.expires_at),
                    fmt_time(*at),
                )
            })
            .collect();
        let rows = sqlx::query(&format!(
            "UPDATE key_records SET state = 'active', octopus_key_id = a.okid, key_hint = a.hint, \
             secret_hmac = a.hmac, expires_at = a.exp, updated_at = a.at \
             FROM (SELECT value ->> '$[0]' AS kid, value ->> '$[1]' AS okid, value ->> '$[2]' AS hint, \
                          value ->> '$[3]' AS hmac, value ->> '$[4]' AS exp, value ->> '$[5]' AS at \
                   FROM json_each(?)) AS a \
             WHERE key_records.id = a.kid AND key_records.state = 'pending' RETURNING {KEY_COLUMNS}"
        ))
        .bind(to_json(&rows)?)
        .fetch_all(&mut **self.tx)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn free_idempotency_key(&mut self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("UPDATE key_records SET idempotency_key = NULL WHERE id = ?")
            .bind(id.to_string())
            .execute(&mut **self.tx)
            .await?;
        Ok(())
    }

    async fn key(&mut self, id: Uuid) -> Result<KeyRecord, StoreError> {
        key_in(self.tx, id).await
    }

    async fn append(&mut self, events: &[&NewAuditEvent]) -> Result<(), StoreError> {
        append_in(self.tx, self.head, self.key, events).await
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend<'_> {
        Backend::Sqlite(self)
    }

    fn set_chain_key(&self, key: ChainKey) {
        let _ = self.chain_key.set(key);
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest) -> Result<Vec<KeyRecord>, StoreError> {
        let mut qb = sqlx::QueryBuilder::<Sqlite>::new("");
        push_list_keys(&mut qb, filter, page);
        let page: String = qb.build_query_scalar().fetch_one(&self.pool).await?;
        keys_from_json(&page)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest) -> Result<Vec<AuditRecord>, StoreError> {
        let mut qb = sqlx::QueryBuilder::<Sqlite>::new("");
        push_list_audit(&mut qb, filter, page);
        let page: String = qb.build_query_scalar().fetch_one(&self.pool).await?;
        audit_from_json(&page)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn audit_chain(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let page: String = sqlx::query_scalar(&format!(
            "SELECT json_group_array(json_array({AUDIT_COLUMNS}) ORDER BY seq ASC) \
             FROM (SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq > ? ORDER BY seq ASC LIMIT ?)"
        ))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_one(&self.pool)
        .await?;
        audit_from_json(&page)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn change_state(
        &self,
        id: Uuid,
        change: KeyChange,
        at: DateTime<Utc>,
        event: &NewAuditEvent,
    ) -> Result<(KeyRecord, bool), StoreError> {
        let (mut head, mut tx) = self.write_tx().await?;
        let mut batch = SqliteBatch { tx: &mut tx, head: &mut head, key: self.chain_key.get() };
        let result = batch::apply_change(&mut batch, id, change, at, event).await;
        finish(tx, &result).await?;
        result
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn enqueue_delivery(&self, d: &NewDelivery) -> Result<bool, StoreError> {
        let (_write, mut tx) = self.write_tx().await?;
        let added = sqlx::query(
            "INSERT INTO webhook_deliveries (webhook, event, key_id, threshold, payload, status, created_at, \
             next_attempt_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?) \
             ON CONFLICT (webhook, event, key_id, threshold) DO NOTHING",
        )
        .bind(&d.webhook)
        .bind(&d.event)
        .bind(d.key_id.to_string())
        .bind(&d.threshold)
        .bind(d.payload.to_string())
        .bind(fmt_time(d.created_at))
        .bind(fmt_time(d.created_at))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(added)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn due_deliveries(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        let (_write, mut tx) = self.write_tx().await?;
        let rows = sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = ?1 WHERE id IN (SELECT id FROM webhook_deliveries \
             WHERE status = 'pending' AND next_attempt_at <= ?2 ORDER BY id LIMIT ?3) \
             RETURNING id, webhook, event, key_id, threshold, payload, attempts, created_at, next_attempt_at",
        )
        .bind(fmt_time(store_precision(now + DELIVERY_CLAIM)))
        .bind(fmt_time(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut out = rows.iter().map(delivery_from_row).collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn finish_delivery(&self, delivery: &Delivery, result: &DeliveryResult) -> Result<bool, StoreError> {
        let (_write, mut tx) = self.write_tx().await?;
        let query = match result {
            DeliveryResult::Delivered { at } => sqlx::query(
                "UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts + 1, delivered_at = ?, \
                 last_error = NULL WHERE id = ? AND status = 'pending' AND next_attempt_at = ?",
            )
            .bind(fmt_time(*at)),
            DeliveryResult::Retry { next_attempt_at, error } => sqlx::query(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? \
                 WHERE id = ? AND status = 'pending' AND next_attempt_at = ?",
            )
            .bind(fmt_time(*next_attempt_at))
            .bind(error.clone()),
            DeliveryResult::GaveUp { error } => sqlx::query(
                "UPDATE webhook_deliveries SET status = 'failed', attempts = attempts + 1, last_error = ? \
                 WHERE id = ? AND status = 'pending' AND next_attempt_at = ?",
            )
            .bind(error.clone()),
        };
        let done = query
            .bind(delivery.id)
            .bind(fmt_time(store_precision(delivery.claimed_until)))
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(done)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn insert_ticket(&self, t: &Ticket, event: &NewAuditEvent) -> Result<(), StoreError> {
        let (mut head, mut tx) = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO tickets (id, for_subject, scope, purpose, ttl, requested_by, requested_by_name, state, \
             created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'waiting', ?, ?)",
        )
        .bind(t.id.as_str())
        .bind(&t.for_subject)
        .bind(t.scope.as_str())
        .bind(t.purpose.as_str())
        .bind(t.ttl.as_deref())
        .bind(&t.requested_by)
        .bind(&t.requested_by_name)
        .bind(fmt_time(t.created_at))
        .bind(fmt_time(t.expires_at))
        .execute(&mut *tx)
        .await?;
        append_in(&mut tx, &mut head, self.chain_key.get(), &[event]).await?;
        tx.commit().await.map_err(StoreError::from)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn end_ticket(
        &self,
        id: &TicketId,
        end: TicketEnd,
        at: DateTime<Utc>,
        hold: Hold<'_>,
        event: &NewAuditEvent,
    ) -> Result<bool, StoreError> {
        let (mut head, mut tx) = self.write_tx().await?;
        let (holder, bound) = match hold {
            Hold::Claim(token) => ("claim_token = ?5", token.to_owned()),
            Hold::Nobody { stale_before } => {
                ("(claim_started_at IS NULL OR claim_started_at < ?5)", fmt_time(stale_before))
            }
        };
        let done = sqlx::query(&format!(
            "UPDATE tickets SET state = ?1, key_id = ?2, ended_at = ?3, claim_started_at = NULL, claim_token = NULL \
             WHERE id = ?4 AND state = 'waiting' AND {holder}"
        ))
        .bind(end.state().as_str())
        .bind(end.key_id().map(|k| k.to_string()))
        .bind(fmt_time(at))
        .bind(id.as_str())
        .bind(bound)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !done {
            tx.rollback().await?;
            return Ok(false);
        }
        append_in(&mut tx, &mut head, self.chain_key.get(), &[event]).await?;
        tx.commit().await?;
        Ok(true)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn publish_policy(
        &self,
        version: &str,
        document: &str,
        at: DateTime<Utc>,
        by: &str,
    ) -> Result<i64, StoreError> {
        let (_write, mut tx) = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO policy_versions (version, document, published_at, published_by) SELECT ?1, ?2, ?3, ?4 \
             WHERE COALESCE((SELECT version FROM policy_versions ORDER BY seq DESC LIMIT 1), '') <> ?1",
        )
        .bind(version)
        .bind(document)
        .bind(fmt_time(at))
        .bind(by)
        .execute(&mut *tx)
        .await?;
        let seq: i64 = sqlx::query_scalar("SELECT MAX(seq) FROM policy_versions").fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(seq)
    }
}

/// A page of key records as one JSON array. Without statistics (keybroker never runs `ANALYZE`)
/// SQLite would serve a state filter from the state or expiry index, reading every requester's
/// records in that state; when the page is one requester's or one scope's, the state and expiry
/// terms are marked with unary `+` so that the `(requester, seq)` or `(scope, seq)` index serves
/// the filter and the order, and a page reads about as many rows as it returns.
fn push_list_keys(qb: &mut sqlx::QueryBuilder<'static, Sqlite>, filter: &KeyFilter, page: PageRequest) {
    let plus = if filter.requester.is_some() || filter.scope.is_some() { "+" } else { "" };
    qb.push(format!(
        "SELECT json_group_array(json_array({KEY_COLUMNS}) ORDER BY seq DESC) \
         FROM (SELECT {KEY_COLUMNS} FROM key_records WHERE 1 = 1"
    ));
    if let Some(r) = &filter.requester {
        qb.push(" AND requester = ").push_bind(r.clone());
    }
    if let Some(s) = &filter.scope {
        qb.push(" AND scope = ").push_bind(s.clone());
    }
    if let Some(team) = &filter.team {
        qb.push(" AND EXISTS (SELECT 1 FROM json_each(requester_teams) WHERE value = ")
            .push_bind(team.clone())
            .push(")");
    }
    match (filter.state, filter.now) {
        (Some(KeyState::Active), Some(now)) => {
            qb.push(format!(" AND {plus}state = 'active' AND {plus}expires_at > ")).push_bind(fmt_time(now));
        }
        (Some(KeyState::Expired), Some(now)) => {
            qb.push(format!(" AND ({plus}state = 'expired' OR ({plus}state = 'active' AND {plus}expires_at <= "))
                .push_bind(fmt_time(now))
                .push("))");
        }
        (Some(s), _) => {
            qb.push(format!(" AND {plus}state = ")).push_bind(s.as_str());
        }
        (None, _) => {}
    }
    if let Some(before) = page.before_seq {
        qb.push(" AND seq < ").push_bind(before);
    }
    qb.push(" ORDER BY seq DESC LIMIT ").push_bind(i64::from(page.limit)).push(")");
}

/// A page of audit events as one JSON array. As for keys (`push_list_keys`), without statistics
/// SQLite could serve `actor = ? AND action = ?` from the action index and read every event of
/// that action; the most selective filter given (a key, else an actor) gets the index, and the
/// other terms carry unary `+`.
fn push_list_audit(qb: &mut sqlx::QueryBuilder<'static, Sqlite>, filter: &AuditFilter, page: PageRequest) {
    let (plus_actor, plus) = match (&filter.key_id, &filter.actor) {
        (Some(_), _) => ("+", "+"),
        (None, Some(_)) => ("", "+"),
        (None, None) => ("", ""),
    };
    qb.push(format!(
        "SELECT json_group_array(json_array({AUDIT_COLUMNS}) ORDER BY seq DESC) \
         FROM (SELECT {AUDIT_COLUMNS} FROM audit_events WHERE 1 = 1"
    ));
    if let Some(a) = &filter.actor {
        qb.push(format!(" AND {plus_actor}actor = ")).push_bind(a.clone());
    }
    if let Some(a) = &filter.action {
        qb.push(format!(" AND {plus}action = ")).push_bind(a.clone());
    }
    if let Some(s) = &filter.scope {
        qb.push(format!(" AND {plus}scope = ")).push_bind(s.clone());
    }
    if let Some(k) = filter.key_id {
        qb.push(" AND key_id = ").push_bind(k.to_string());
    }
    if let Some(from) = filter.from {
        qb.push(format!(" AND {plus}occurred_at >= ")).push_bind(fmt_time(from));
    }
    if let Some(to) = filter.to {
        qb.push(format!(" AND {plus}occurred_at < ")).push_bind(fmt_time(to));
    }
    if let Some(before) = page.before_seq {
        qb.push(" AND seq < ").push_bind(before);
    }
    qb.push(" ORDER BY seq DESC LIMIT ").push_bind(i64::from(page.limit)).push(")");
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

    const PAGE: PageRequest = PageRequest { before_seq: Some(100), limit: 50 };

    /// SQLite's plan for the query `push` builds, one step per `; `.
    async fn plan(store: &SqliteStore, push: impl FnOnce(&mut sqlx::QueryBuilder<'static, Sqlite>)) -> String {
        let mut qb = sqlx::QueryBuilder::<Sqlite>::new("EXPLAIN QUERY PLAN ");
        push(&mut qb);
        let rows = qb.build().fetch_all(&store.pool).await.unwrap();
        rows.iter().map(|row| row.get::<String, _>("detail")).collect::<Vec<_>>().join("; ")
    }

    /// keybroker runs no `ANALYZE`, so these plans are what every database gets: one requester's
    /// or one scope's page, whatever its state filter, is read through that requester's or
    /// scope's index, in order, and not through every record in the state.
    #[tokio::test]
    async fn a_page_of_one_requester_or_scope_is_read_through_its_own_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(&format!("sqlite://{}", dir.path().join("plans.db").display())).await.unwrap();
        store.migrate().await.unwrap();
        let states = [None, Some(KeyState::Active), Some(KeyState::Expired), Some(KeyState::Revoked)];
        for state in states {
            for (requester, scope, index) in
                [(Some("alice"), None, "key_records_requester"), (None, Some("s"), "key_records_scope")]
            {
                let filter = KeyFilter {
                    requester: requester.map(str::to_owned),
                    scope: scope.map(str::to_owned),
                    state,
                    now: Some(Utc::now()),
                    team: None,
                };
                let plan = plan(&store, |qb| push_list_keys(qb, &filter, PAGE)).await;
                assert!(plan.contains(&format!("USING INDEX {index} ")), "{state:?} {requester:?} {scope:?}: {plan}");
                assert!(!plan.contains("TEMP B-TREE FOR ORDER BY"), "{state:?} {requester:?} {scope:?}: {plan}");
            }
        }
    }

    #[tokio::test]
    async fn an_audit_page_is_read_through_its_key_or_actor_index_when_it_has_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(&format!("sqlite://{}", dir.path().join("plans.db").display())).await.unwrap();
        store.migrate().await.unwrap();
        let actor = || Some("alice@example.com".to_owned());
        let filters = [
            (
                AuditFilter { actor: actor(), action: Some("key.issued".to_owned()), ..Default::default() },
                "audit_events_actor",
            ),
            (AuditFilter { actor: actor(), scope: Some("s".to_owned()), ..Default::default() }, "audit_events_actor"),
            (AuditFilter { actor: actor(), from: Some(Utc::now()), ..Default::default() }, "audit_events_actor"),
            (
                AuditFilter {
                    actor: actor(),
                    key_id: Some(Uuid::new_v4()),
                    action: Some("key.issued".to_owned()),
                    ..Default::default()
                },
                "audit_events_key",
            ),
        ];
        for (filter, index) in filters {
            let plan = plan(&store, |qb| push_list_audit(qb, &filter, PAGE)).await;
            assert!(plan.contains(&format!("USING INDEX {index} ")), "{filter:?}: {plan}");
        }
    }

    #[test]
    fn stored_times_are_fixed_width_utc_text_that_round_trips() {
        for text in ["2026-01-01T00:00:00.000000Z", "2026-11-23T21:05:09.123456Z", "1999-12-31T23:59:59.999999Z"] {
            let t = parse_time(text).unwrap();
            assert_eq!(fmt_time(t), text);
            assert_eq!(fmt_time(t), t.format(TIME_FORMAT).to_string());
        }
        let nanos = parse_time("2026-01-01T00:00:00.123456Z").unwrap() + chrono::Duration::nanoseconds(789);
        assert_eq!(fmt_time(nanos), "2026-01-01T00:00:00.123456Z");
        assert!(parse_time("yesterday").is_err());
    }
}
