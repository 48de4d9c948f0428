//! The embedded SQLite store: WAL, a busy timeout, and write transactions that take the write
//! lock up front (`BEGIN IMMEDIATE`), so concurrent issuance never sees "database is locked".

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Sqlite, SqliteConnection, Transaction};
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use super::batch::{self, Committer, Found, Outcome, Write, WriteQueue};
use super::chain::ChainTx;
use super::rows::{
    AUDIT_COLUMNS, KEY_COLUMNS, key_from_row, key_state, parse_sqlite_time as parse_time, sqlite_time as fmt_time,
};
use super::shared::{self, Backend};
use super::{Activation, AuditFilter, KeyFilter, KeyRecord, NewKey, PageRequest, Store, StoreError};
use crate::domain::audit::{AuditRecord, ChainKey, GENESIS_HASH, NewAuditEvent, store_precision};
use crate::domain::policy::{Purpose, ScopeName};

pub struct SqliteStore {
    /// Readers.
    pool: SqlitePool,
    /// Readers of the list pages, lent without a ping (see [`PageReaders`]).
    pages: PageReaders,
    /// SQLite has one writer at a time. Writers queue here, in the process, instead of sleeping
    /// in SQLite's busy handler (whose back-off dominated issuance latency under load). The lock
    /// guards the one writing connection and the audit chain's head as this process last wrote
    /// it; see [`append_in`].
    write_lock: Arc<tokio::sync::Mutex<Writer>>,
    /// `audit.chain_key_file`'s key, once set: appended events are keyed with it.
    chain_key: Arc<std::sync::OnceLock<ChainKey>>,
    /// The issuance path's writes, committed in batches on the [`Writer`] behind `write_lock`.
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

/// Connections for the list pages (`list_keys`, `list_audit`), outside sqlx's pool: that pool
/// pings every connection that comes back to it, a round trip to the connection's thread after
/// every page, about an eighth of a page's cost (BENCHMARKS.md, issue 20, fourth pass). A
/// connection goes back to the idle list only after its query has finished; one whose query
/// failed, or whose caller went away mid-query, is closed instead, so that nothing half-read is
/// lent again.
struct PageReaders {
    idle: std::sync::Mutex<Vec<SqliteConnection>>,
    /// At most this many open at once ([`PAGE_READERS`]).
    permits: tokio::sync::Semaphore,
    options: SqliteConnectOptions,
}

/// The page readers' connections. A page is CPU work on its connection's thread, so more
/// connections than cores only queue; four cover a small host and pages that wait on the disk.
/// The other reads keep sqlx's pool of 8.
const PAGE_READERS: usize = 4;

impl PageReaders {
    fn new(options: SqliteConnectOptions) -> Self {
        Self { idle: std::sync::Mutex::default(), permits: tokio::sync::Semaphore::new(PAGE_READERS), options }
    }

    /// One JSON-aggregated page (the query's one text value).
    async fn page(&self, mut query: sqlx::QueryBuilder<'_, Sqlite>) -> Result<String, StoreError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("the SQLite store is closed".to_owned()))?;
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut conn = match idle {
            Some(conn) => conn,
            None => self.options.connect().await?,
        };
        // Dropped with its connection, unless the query finishes.
        let page: String = query.build_query_scalar().fetch_one(&mut conn).await?;
        // A page that was still being read when the store closed drops its connection.
        if !self.permits.is_closed() {
            if let Ok(mut idle) = self.idle.lock() {
                idle.push(conn);
            }
        }
        Ok(page)
    }

    /// Closes the idle connections; no page is read after this.
    async fn close(&self) {
        self.permits.close();
        let idle = self.idle.lock().map(|mut idle| std::mem::take(&mut *idle)).unwrap_or_default();
        for conn in idle {
            let _ = conn.close().await;
        }
    }
}

/// The one connection that writes, so that its page cache stays valid between write
/// transactions (a pool of writers re-read every page another connection had changed), with
/// the chain's head; behind [`SqliteStore::write_lock`]. It is held here, not in a pool of one:
/// sqlx pings every connection that comes back to its pool, a round trip to the connection's
/// thread after every write transaction (BENCHMARKS.md, issue 20, fourth pass).
pub(super) struct Writer {
    conn: Option<SqliteConnection>,
    head: ChainHead,
    options: SqliteConnectOptions,
    /// Set when a transaction could not begin: the connection is opened again for the next.
    broken: bool,
    closed: bool,
    /// Write transactions begun, so the checkpoint task can tell when nothing has been written
    /// since its last copy.
    begun: Arc<AtomicU64>,
}

impl Writer {
    /// Begins a write transaction (`BEGIN IMMEDIATE`); the chain's cached head comes with it.
    pub(super) async fn begin(&mut self) -> Result<(Transaction<'_, Sqlite>, &mut ChainHead), StoreError> {
        if self.closed {
            return Err(StoreError::Unavailable("the SQLite store is closed".to_owned()));
        }
        let conn = match self.conn.take() {
            Some(conn) if !self.broken => conn,
            old => {
                if let Some(old) = old {
                    let _ = old.close_hard().await;
                }
                self.broken = false;
                self.options.connect().await?
            }
        };
        let conn = self.conn.insert(conn);
        self.begun.fetch_add(1, Ordering::Relaxed);
        match conn.begin_with("BEGIN IMMEDIATE").await {
            Ok(tx) => Ok((tx, &mut self.head)),
            Err(e) => {
                // A pool would have replaced a connection whose thread had gone; this one is
                // replaced before the next transaction.
                self.broken = true;
                Err(e.into())
            }
        }
    }

    async fn close(&mut self) {
        self.closed = true;
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}

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
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // Statement journals (and sorts) in memory: a batch's statement journal outgrew
            // SQLite's 64 KiB spill threshold, and each one was then a temporary file, created,
            // written and closed inside the write transaction. They are for rolling back one
            // statement, never for durability.
            .pragma("temp_store", "memory")
            // After a restart of the WAL, a WAL file larger than this is cut back to it.
            .pragma("journal_size_limit", (RESTART_FRAMES * 4096).to_string());
        // Neither pool pings a connection before lending it (sqlx's default): an embedded
        // connection cannot go stale, and each ping was a round trip to its thread. (sqlx still
        // pings one when it comes back.)
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(15))
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let options_for_pages = options.clone();
        // The writer never checkpoints: a checkpoint copies the WAL into the database file and
        // syncs both, and on the writer it ran inside whichever write transaction crossed the
        // threshold, while every other writer queued behind it. A task does it in the background.
        let options = options.pragma("wal_autocheckpoint", "0");
        let writes_begun = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            conn: Some(options.connect().await?),
            head: None,
            options,
            broken: false,
            closed: false,
            begun: writes_begun.clone(),
        };
        let write_lock = Arc::new(tokio::sync::Mutex::new(writer));
        let checkpointer =
            tokio::spawn(checkpoint_in_background(pool.clone(), write_lock.clone(), writes_begun)).abort_handle();
        let chain_key = Arc::<std::sync::OnceLock<ChainKey>>::default();
        let writes = WriteQueue::start(SqliteCommitter {
            reader: pool.clone(),
            write_lock: write_lock.clone(),
            chain_key: chain_key.clone(),
        });
        let pages = PageReaders::new(options_for_pages);
        Ok(Self { pool, pages, write_lock, writes, checkpointer, chain_key })
    }

    /// `audit.chain_key_file`'s key, once set.
    pub(super) fn chain_key(&self) -> &std::sync::OnceLock<ChainKey> {
        &self.chain_key
    }

    /// The writer, once it is this caller's turn: a write transaction begins on it
    /// ([`Writer::begin`]), and the guard must live until the commit.
    pub(super) async fn writer(&self) -> OwnedMutexGuard<Writer> {
        self.write_lock.clone().lock_owned().await
    }
}

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`] while write transactions
/// come in, less often (at most every [`IDLE_CHECKPOINT_EVERY`]) while none does, until the pool
/// is closed or the store dropped. With `synchronous = NORMAL` a commit is safe from a power
/// failure once a copy has synced the WAL after it, so that interval is, as a rule, what a power
/// failure can lose (a copy held back by a reader on an old snapshot syncs nothing).
///
/// The copy runs on a reader and waits for nobody (`PASSIVE`). But a writer starts the WAL
/// again from its beginning only when every frame in it has been copied and no reader is
/// reading from it, which under a steady load never happened: the WAL grew without end (400 MB
/// after a minute of the benchmark), every commit appending to a new part of the file. So once
/// the WAL holds more than [`RESTART_FRAMES`], the next checkpoint runs under the write lock as
/// `RESTART`: it copies what committed since the last copy and waits briefly for the readers to
/// leave the WAL, and the next write transaction starts it again from its beginning.
async fn checkpoint_in_background(
    pool: SqlitePool,
    write_lock: Arc<tokio::sync::Mutex<Writer>>,
    writes_begun: Arc<AtomicU64>,
) {
    let mut pause = CHECKPOINT_EVERY;
    let mut last_begun = None;
    while !pool.is_closed() {
        tokio::time::sleep(pause).await;
        let begun = writes_begun.load(Ordering::Relaxed);
        let passive = match pool.acquire().await {
            Ok(mut conn) => checkpoint(&mut conn, "PASSIVE").await,
            Err(e) => Err(e),
        };
        let done = match passive {
            Ok(in_wal) if in_wal > RESTART_FRAMES => restart_wal(&pool, &write_lock, in_wal).await,
            done => done,
        };
        // Slower while nothing is written, and while the copies fail (one warning each).
        let idle = last_begun == Some(begun) || done.is_err();
        pause = if idle { (pause * 2).min(IDLE_CHECKPOINT_EVERY) } else { CHECKPOINT_EVERY };
        last_begun = Some(begun);
        if let Err(e) = done {
            if pool.is_closed() {
                break;
            }
            tracing::warn!(error = %e, "SQLite checkpoint failed; retrying");
        }
    }
}

/// How often the WAL is copied while writes come in. Each copy syncs what committed since the
/// last, and the smaller that is the less it stalls the writers' own writes: at 500 issuances a
/// second on a database of 40,000 issued keys, the p99 was 19-20 ms with a copy every 200 ms,
/// 12-14 ms every 50 ms, and 25 ms every second, at the same CPU per issuance (BENCHMARKS.md,
/// "third pass").
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// How often at most while nothing commits: the interval before this pass, so that the commits
/// a power failure could lose are never more than they were.
const IDLE_CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// Restarts the WAL: a `RESTART` checkpoint under the write lock, which holds the writers while
/// it copies what committed since the last checkpoint, syncs, and waits (at most 50 ms, a busy
/// timeout set for it alone) for SQLite's read locks. Measured on this project's 2-core machine
/// in a slow hour: 4-30 ms at 100 issuances a second, 30-78 ms at 32 callers flat out, most of it
/// the `fsync` of what committed since the last checkpoint (a 10 ms wait for readers, or two more
/// copies beforehand without the lock, changed little). So it comes only every 64 MB.
async fn restart_wal(
    pool: &SqlitePool,
    write_lock: &tokio::sync::Mutex<Writer>,
    in_wal: i64,
) -> Result<i64, sqlx::Error> {
    // The connection and its timeout first: the writers are not held while it waits for a busy
    // reader pool.
    let mut conn = pool.acquire().await?;
    sqlx::query("PRAGMA busy_timeout = 50").execute(&mut *conn).await?;
    let queued = std::time::Instant::now();
    let no_writer = write_lock.lock().await;
    let locked = std::time::Instant::now();
    let done = checkpoint(&mut conn, "RESTART").await;
    let held = locked.elapsed();
    drop(no_writer);
    let restore = format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis());
    if sqlx::query(&restore).execute(&mut *conn).await.is_err() {
        // Not lent again with the short timeout.
        conn.close_on_drop();
    }
    tracing::debug!(
        in_wal,
        waited_us = (locked - queued).as_micros() as u64,
        held_us = held.as_micros() as u64,
        "SQLite checkpoint that restarts the WAL"
    );
    done
}

/// How long a connection waits for SQLite's locks.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The WAL's size in frames (a 4 kB page each, plus its 24-byte header) above which a checkpoint
/// restarts it (about 64 MB, also the `journal_size_limit`): every few seconds under a heavy
/// load, since a restart holds the writers (see [`restart_wal`]).
const RESTART_FRAMES: i64 = 16 * 1024;

/// One checkpoint in `mode` (`PASSIVE` or `RESTART`) on `conn`: the frames in the WAL.
async fn checkpoint(conn: &mut SqliteConnection, mode: &str) -> Result<i64, sqlx::Error> {
    let (_busy, in_wal, _copied): (i64, i64, i64) =
        sqlx::query_as(&format!("PRAGMA wal_checkpoint({mode})")).fetch_one(conn).await?;
    Ok(in_wal)
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
/// itself for a 50-row page; one text value per page does not. The aggregate is not told the
/// order (`ORDER BY` inside it sorts the rows again, in a temporary B-tree); the decoded page
/// is sorted instead, by [`newest_first`] or by `seq`.
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

/// Sorts a page by `seq`, highest first.
fn newest_first<T>(page: &mut [T], seq: impl Fn(&T) -> i64) {
    page.sort_unstable_by_key(|row| std::cmp::Reverse(seq(row)));
}

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

/// The issuance path's writes, committed in batches (see [`batch`](super::batch)) on the writer
/// connection, under the write lock.
struct SqliteCommitter {
    reader: SqlitePool,
    write_lock: Arc<tokio::sync::Mutex<Writer>>,
    chain_key: Arc<std::sync::OnceLock<ChainKey>>,
}

#[async_trait]
impl Committer for SqliteCommitter {
    async fn event_committed(&self, id: Uuid) -> Result<bool, StoreError> {
        // A reader sees every committed transaction (each statement reads the newest snapshot),
        // and the failed batch has been rolled back by now.
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM audit_events WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        Ok(found.is_some())
    }

    async fn commit_batch(&self, writes: &[&Write]) -> Result<Vec<Outcome>, StoreError> {
        let mut writer = self.write_lock.lock().await;
        let (mut tx, head) = writer.begin().await?;
        let mut chain = ChainTx::Sqlite { conn: &mut tx, head, key: self.chain_key.get() };
        match batch::apply(&mut chain, writes).await {
            Ok(outcomes) => {
                tx.commit().await?;
                Ok(outcomes)
            }
            Err(e) => {
                // The head may name an event that is being rolled back.
                chain.forget_head();
                tx.rollback().await?;
                Err(e)
            }
        }
    }
}

fn to_json<T: serde::Serialize>(rows: &T) -> Result<String, StoreError> {
    serde_json::to_string(rows).map_err(|e| StoreError::Unavailable(e.to_string()))
}

// The group commit's statements in SQLite's dialect: each takes its rows as one JSON array
// (`json_each`), so a batch of any size is one statement. `chain::ChainTx` calls them.

pub(super) async fn find_idempotent(conn: &mut SqliteConnection, keys: &[&NewKey]) -> Result<Vec<Found>, StoreError> {
    let pairs: Vec<(&str, &str)> =
        keys.iter().filter_map(|k| k.idempotency.as_ref().map(|i| (k.requester.as_str(), i.key.as_str()))).collect();
    let rows = sqlx::query(&format!(
        "SELECT {KEY_COLUMNS}, request_hash, idempotency_key FROM key_records \
         WHERE (requester, idempotency_key) IN (SELECT value ->> '$[0]', value ->> '$[1]' FROM json_each(?))"
    ))
    .bind(to_json(&pairs)?)
    .fetch_all(conn)
    .await?;
    rows.iter().map(batch::found_from_row).collect()
}

pub(super) async fn limit_counts(
    conn: &mut SqliteConnection,
    inserts: &[(&NewKey, DateTime<Utc>)],
) -> Result<Vec<i64>, StoreError> {
    let rows: Vec<(&str, &str, String, i64)> = inserts
        .iter()
        .zip(batch::exact_below(inserts))
        .map(|((k, now), below)| (k.requester.as_str(), k.scope.as_str(), fmt_time(*now), below))
        .collect();
    let counts = sqlx::query_scalar(
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
    .fetch_all(conn)
    .await?;
    Ok(counts)
}

/// Writes the records `pending`, in order; how many rows were written.
pub(super) async fn insert_keys(conn: &mut SqliteConnection, keys: &[&NewKey]) -> Result<u64, StoreError> {
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
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted)
}

pub(super) async fn activate_keys(
    conn: &mut SqliteConnection,
    activations: &[(&Activation, DateTime<Utc>)],
) -> Result<Vec<KeyRecord>, StoreError> {
    let rows: Vec<_> = activations
        .iter()
        .map(|(a, at)| {
            (a.id.to_string(), &a.octopus_key_id, &a.key_hint, &a.secret_hmac, fmt_time(a.expires_at), fmt_time(*at))
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
    .fetch_all(conn)
    .await?;
    rows.iter().map(key_from_row).collect()
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend<'_> {
        Backend::Sqlite(self)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn close(&self) {
        self.write_lock.lock().await.close().await;
        self.pages.close().await;
        self.pool.close().await;
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest) -> Result<Vec<KeyRecord>, StoreError> {
        let mut qb = sqlx::QueryBuilder::<Sqlite>::new("");
        push_list_keys(&mut qb, filter, page);
        let page = self.pages.page(qb).await?;
        let mut keys = keys_from_json(&page)?;
        newest_first(&mut keys, |k| k.seq);
        Ok(keys)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest) -> Result<Vec<AuditRecord>, StoreError> {
        let mut qb = sqlx::QueryBuilder::<Sqlite>::new("");
        push_list_audit(&mut qb, filter, page);
        let page = self.pages.page(qb).await?;
        let mut events = audit_from_json(&page)?;
        newest_first(&mut events, |e| e.seq);
        Ok(events)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn audit_chain(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let page: String = sqlx::query_scalar(&format!(
            "SELECT json_group_array(json_array({AUDIT_COLUMNS})) \
             FROM (SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq > ? ORDER BY seq ASC LIMIT ?)"
        ))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_one(&self.pool)
        .await?;
        let mut events = audit_from_json(&page)?;
        events.sort_unstable_by_key(|e| e.seq);
        Ok(events)
    }
}

/// A page of key records as one JSON array (see [`shared::push_key_page`] for its filter).
fn push_list_keys(qb: &mut sqlx::QueryBuilder<'static, Sqlite>, filter: &KeyFilter, page: PageRequest) {
    qb.push(format!("SELECT json_group_array(json_array({KEY_COLUMNS})) FROM ("));
    shared::push_key_page(qb, filter, page);
    qb.push(")");
}

/// A page of audit events as one JSON array (see [`shared::push_audit_page`]).
fn push_list_audit(qb: &mut sqlx::QueryBuilder<'static, Sqlite>, filter: &AuditFilter, page: PageRequest) {
    qb.push(format!("SELECT json_group_array(json_array({AUDIT_COLUMNS})) FROM ("));
    shared::push_audit_page(qb, filter, page);
    qb.push(")");
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    use crate::domain::keys::KeyState;

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

    /// The page readers lend a connection again only after its query finished: one whose caller
    /// went away mid-query is closed. They never open more than `PAGE_READERS`, and a closed
    /// store reads no page.
    #[tokio::test]
    async fn a_page_reader_whose_caller_went_away_mid_query_is_not_lent_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(&format!("sqlite://{}", dir.path().join("pages.db").display())).await.unwrap();
        store.migrate().await.unwrap();
        let idle = || store.pages.idle.lock().unwrap().len();
        let all = AuditFilter::default();
        let page = || store.list_audit(&all, PAGE);
        page().await.unwrap();
        assert_eq!(idle(), 1, "a finished page gives its connection back");
        page().await.unwrap();
        assert_eq!(idle(), 1, "and the next page reuses it");

        // Polled once (the query is sent to the connection's thread), then dropped.
        {
            let mut cancelled = std::pin::pin!(page());
            let first = std::future::poll_fn(|cx| std::task::Poll::Ready(cancelled.as_mut().poll(cx))).await;
            assert!(first.is_pending(), "the page was read within one poll");
        }
        assert_eq!(idle(), 0, "a connection whose caller went away mid-query is not lent again");
        page().await.unwrap();
        assert_eq!(idle(), 1);

        let pages: Vec<_> = (0..3 * PAGE_READERS).map(|_| page()).collect();
        for result in futures_util::future::join_all(pages).await {
            result.unwrap();
        }
        assert!((1..=PAGE_READERS).contains(&idle()), "{} connections", idle());

        store.close().await;
        assert_eq!(idle(), 0);
        assert!(matches!(page().await, Err(StoreError::Unavailable(_))));
    }

    /// The writer holds its connection outside any pool, so nothing replaces it for us: a
    /// transaction that cannot begin marks it, the next one begins on a new connection, and
    /// once the store is closed no transaction begins at all.
    #[tokio::test]
    async fn the_writer_reconnects_after_a_transaction_that_could_not_begin_and_stops_when_closed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("writer.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let mut writer = store.writer().await;
        // A short busy timeout, on the connection opened at the next begin.
        writer.options = writer.options.clone().busy_timeout(Duration::from_millis(50));
        writer.broken = true;
        let (tx, _) = writer.begin().await.unwrap();
        tx.commit().await.unwrap();
        assert!(!writer.broken);

        // Another connection holds SQLite's write lock: the begin fails, and says so.
        let mut other = SqliteConnectOptions::from_str(&url).unwrap().connect().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await.unwrap();
        assert!(writer.begin().await.is_err(), "the write lock is another connection's");
        assert!(writer.broken);
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
        let (mut tx, _) = writer.begin().await.unwrap();
        sqlx::query("UPDATE key_records SET state = state WHERE 0").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        assert!(!writer.broken);
        drop(writer);

        store.close().await;
        let mut writer = store.writer().await;
        assert!(matches!(writer.begin().await, Err(StoreError::Unavailable(_))));
    }

    /// `.cargo/config.toml` builds the bundled SQLite without its two process-wide mutexes
    /// (memory statistics, and one group of page caches for every connection), on which the
    /// connections' threads queued: this fails if a build loses those flags.
    #[tokio::test]
    async fn the_bundled_sqlite_takes_no_process_wide_lock_per_allocation_or_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(&format!("sqlite://{}", dir.path().join("opts.db").display())).await.unwrap();
        let options: Vec<String> = sqlx::query_scalar("SELECT compile_options FROM pragma_compile_options")
            .fetch_all(&store.pool)
            .await
            .unwrap();
        assert!(options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"), "{options:?}");
        assert!(!options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"), "{options:?}");
        assert!(options.iter().any(|o| o == "THREADSAFE=1"), "{options:?}");
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
