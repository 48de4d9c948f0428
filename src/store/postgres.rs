//! The PostgreSQL store, for several replicas. Concurrency rules:
//! - the per-requester limit and the `Idempotency-Key` are checked under a transaction-scoped
//!   advisory lock on the requester, so simultaneous requests of one requester cannot overshoot
//!   the limit or issue twice;
//! - audit appends take one transaction-scoped advisory lock for the chain, so the chain never
//!   forks;
//! - the issuance path's writes are committed in batches ([`super::batch`]): one transaction
//!   takes the requester locks of all its writes in one statement, in hash order, so two batches
//!   cannot deadlock on them.
//!
//! Lock order is always requester locks, then row locks, then the chain lock, which is taken
//! last, just before the commit, and held as briefly as possible.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Acquire, PgConnection, Postgres};
use uuid::Uuid;

use super::batch::{self, Committer, Found, Outcome, Write, WriteQueue};
use super::chain::ChainTx;
use super::rows::{AUDIT_COLUMNS, KEY_COLUMNS, audit_from_row, key_from_row};
use super::shared::{self, Backend};
use super::{Activation, AuditFilter, KeyFilter, KeyRecord, NewKey, PageRequest, Store, StoreError};
use crate::domain::audit::{AuditRecord, ChainKey, GENESIS_HASH, NewAuditEvent, store_precision};

/// Advisory lock namespaces (the first key of `pg_advisory_xact_lock(int, int)`).
const LIMIT_LOCK: i32 = 0x6b62_0001;
const CHAIN_LOCK: i32 = 0x6b62_0002;
const POLICY_LOCK: i32 = 0x6b62_0003;

pub struct PgStore {
    pool: PgPool,
    /// The audit chain's last hash as this process last appended it. Only a hint: every append
    /// checks it against the table inside its INSERT and reads the head afresh when it is stale
    /// (another replica appended, or the transaction that appended it rolled back).
    head: Arc<Mutex<Option<String>>>,
    /// `audit.chain_key_file`'s key, once set: appended events are keyed with it.
    chain_key: Arc<std::sync::OnceLock<ChainKey>>,
    /// The issuance path's writes, committed in batches.
    writes: WriteQueue,
    /// The connection the batches run on.
    committing: HeldConnection,
}

impl PgStore {
    /// The queue of the issuance path's writes (group commit, `batch.rs`).
    pub(super) fn write_queue(&self) -> &WriteQueue {
        &self.writes
    }

    /// The migrations of this dialect.
    pub(super) fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");
        &MIGRATOR
    }

    /// The pool.
    pub(super) fn reader(&self) -> &PgPool {
        &self.pool
    }

    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_in_schema(url, None).await
    }

    /// Connects with `search_path` set to `schema` (tests give each run its own schema).
    pub async fn connect_in_schema(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        let mut options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL URL: {e}")))?;
        if let Some(schema) = schema {
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(options)
            .await?;
        let head: Arc<Mutex<Option<String>>> = Arc::default();
        let committing = HeldConnection::default();
        let chain_key = Arc::<std::sync::OnceLock<ChainKey>>::default();
        let writes = WriteQueue::start(PgCommitter {
            pool: pool.clone(),
            head: head.clone(),
            chain_key: chain_key.clone(),
            conn: committing.clone(),
        });
        Ok(Self { pool, head, chain_key, writes, committing })
    }

    /// The audit chain's cached head (see the field).
    pub(super) fn head(&self) -> &Mutex<Option<String>> {
        &self.head
    }

    /// `audit.chain_key_file`'s key, once set.
    pub(super) fn chain_key(&self) -> &std::sync::OnceLock<ChainKey> {
        &self.chain_key
    }
}

/// Inserts `events` chained after `prev`, in one statement, if `prev` is the chain's last hash:
/// the new last hash, or `None` (nothing written) if `prev` is not the last hash.
pub(super) async fn insert_events(
    connection: &mut sqlx::PgConnection,
    events: &[&NewAuditEvent],
    links: &[shared::Link],
    prev: &str,
) -> Result<u64, StoreError> {
    let prevs: Vec<&str> = links.iter().map(|l| l.prev.as_str()).collect();
    let hashes: Vec<&str> = links.iter().map(|l| l.hash.as_str()).collect();
    let column = |f: fn(&NewAuditEvent) -> Option<&str>| events.iter().map(|e| f(e)).collect::<Vec<_>>();
    // One row per array element, inserted in array order (`ord`), so `seq` follows the chain.
    let inserted = sqlx::query(
        "INSERT INTO audit_events (id, occurred_at, actor, action, outcome, scope, key_id, octopus_key_id, \
         request_id, client_addr, user_agent, detail, prev_hash, hash) \
         SELECT e.id, e.occurred_at, e.actor, e.action, e.outcome, e.scope, e.key_id, e.octopus_key_id, \
                e.request_id, e.client_addr, e.user_agent, e.detail::jsonb, e.prev_hash, e.hash \
         FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], $7::uuid[], \
                     $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[]) \
              WITH ORDINALITY AS e(id, occurred_at, actor, action, outcome, scope, key_id, octopus_key_id, \
                                   request_id, client_addr, user_agent, detail, prev_hash, hash, ord) \
         WHERE COALESCE((SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1), $15) = $16 \
         ORDER BY e.ord",
    )
    .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| store_precision(e.occurred_at)).collect::<Vec<_>>())
    .bind(column(|e| Some(&e.actor)))
    .bind(column(|e| Some(e.action.as_str())))
    .bind(column(|e| Some(e.outcome.as_str())))
    .bind(column(|e| e.scope.as_deref()))
    .bind(events.iter().map(|e| e.key_id).collect::<Vec<_>>())
    .bind(column(|e| e.octopus_key_id.as_deref()))
    .bind(column(|e| e.context.request_id.as_deref()))
    .bind(column(|e| e.context.client_addr.as_deref()))
    .bind(column(|e| e.context.user_agent.as_deref()))
    .bind(events.iter().map(|e| e.detail.to_string()).collect::<Vec<_>>())
    .bind(prevs)
    .bind(hashes)
    .bind(GENESIS_HASH)
    .bind(prev)
    .execute(connection)
    .await?
    .rows_affected();
    Ok(inserted)
}

/// The issuance path's writes, committed in batches (see [`batch`](super::batch)).
struct PgCommitter {
    pool: PgPool,
    head: Arc<Mutex<Option<String>>>,
    chain_key: Arc<std::sync::OnceLock<ChainKey>>,
    /// The connection batches run on, kept from one batch to the next: taking one from the pool
    /// costs a round trip (the pool pings it first). After any failure it is closed, so the
    /// next batch (or the retry of each write alone) starts on a fresh, pinged connection.
    conn: HeldConnection,
}

/// The committer's connection between batches; the store closes it before the pool, whose
/// `close` waits for every connection to come back.
type HeldConnection = Arc<tokio::sync::Mutex<Option<PoolConnection<Postgres>>>>;

impl PgCommitter {
    /// Runs the batch on `conn`. `Err((false, _))` means the transaction did not even begin, so
    /// nothing was sent that could have taken effect.
    async fn run(
        &self,
        conn: &mut PoolConnection<Postgres>,
        writes: &[&Write],
    ) -> Result<Vec<Outcome>, (bool, StoreError)> {
        let mut tx = conn.begin().await.map_err(|e| (false, StoreError::from(e)))?;
        let mut chain = ChainTx::Postgres { conn: &mut tx, head: &self.head, key: self.chain_key.get() };
        match batch::apply(&mut chain, writes).await {
            Ok(outcomes) => {
                tx.commit().await.map_err(|e| (true, StoreError::from(e)))?;
                Ok(outcomes)
            }
            Err(e) => {
                chain.forget_head();
                tx.rollback().await.map_err(|e| (true, StoreError::from(e)))?;
                Err((true, e))
            }
        }
    }
}

#[async_trait]
impl Committer for PgCommitter {
    async fn event_committed(&self, id: Uuid) -> Result<bool, StoreError> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM audit_events WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(found.is_some())
    }

    async fn commit_batch(&self, writes: &[&Write]) -> Result<Vec<Outcome>, StoreError> {
        let mut held = self.conn.lock().await;
        let (mut conn, kept) = match held.take() {
            Some(conn) => (conn, true),
            None => (self.pool.acquire().await?, false),
        };
        let mut result = self.run(&mut conn, writes).await;
        if kept && matches!(result, Err((false, _))) {
            // The kept connection died since the last batch (a restart, an idle timeout) and
            // nothing was done: the batch runs again on a fresh connection from the pool.
            conn.close_on_drop();
            conn = self.pool.acquire().await?;
            result = self.run(&mut conn, writes).await;
        }
        match result {
            Ok(outcomes) => {
                *held = Some(conn);
                Ok(outcomes)
            }
            Err((_, e)) => {
                conn.close_on_drop();
                Err(e)
            }
        }
    }
}

// The group commit's statements and the locks in PostgreSQL's dialect: each statement takes
// its rows as arrays (`UNNEST`), so a batch of any size is one statement. `chain::ChainTx`
// calls them. A batch's lock order is the rows it activates, requester locks (all at once, in
// one order, so two batches cannot deadlock on them), the `key_holdings` rows its inserts
// update, then the chain lock; other writers take key rows, holdings, chain.

/// Takes the requesters' locks: one per requester covers both the limit and the idempotency
/// key; the statements after it take their snapshots once it is granted.
pub(super) async fn lock_requesters(conn: &mut PgConnection, requesters: &[&str]) -> Result<(), StoreError> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock($1, l.h) \
         FROM (SELECT DISTINCT hashtext(r) AS h FROM UNNEST($2::text[]) AS r ORDER BY 1) AS l",
    )
    .bind(LIMIT_LOCK)
    .bind(requesters)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes the audit chain's lock, in a statement of its own: the INSERT's snapshot must be taken
/// after the lock is granted.
pub(super) async fn lock_chain(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, 0)").bind(CHAIN_LOCK).execute(conn).await?;
    Ok(())
}

/// One policy publisher at a time.
pub(super) async fn lock_policy(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, 0)").bind(POLICY_LOCK).execute(conn).await?;
    Ok(())
}

pub(super) async fn find_idempotent(conn: &mut PgConnection, keys: &[&NewKey]) -> Result<Vec<Found>, StoreError> {
    let (requesters, idems): (Vec<&str>, Vec<&str>) =
        keys.iter().filter_map(|k| k.idempotency.as_ref().map(|i| (k.requester.as_str(), i.key.as_str()))).unzip();
    let rows = sqlx::query(&format!(
        "SELECT {KEY_COLUMNS}, request_hash, idempotency_key FROM key_records \
         WHERE (requester, idempotency_key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))"
    ))
    .bind(requesters)
    .bind(idems)
    .fetch_all(conn)
    .await?;
    rows.iter().map(batch::found_from_row).collect()
}

pub(super) async fn limit_counts(
    conn: &mut PgConnection,
    inserts: &[(&NewKey, DateTime<Utc>)],
) -> Result<Vec<i64>, StoreError> {
    let below = batch::exact_below(inserts);
    let query = |rows: &str| {
        format!(
            "SELECT CASE WHEN COALESCE(h.held, 0) BETWEEN 0 AND c.below - 1 THEN COALESCE(h.held, 0) \
                    ELSE (SELECT COUNT(*) FROM key_records k WHERE k.requester = c.r AND k.scope = c.s \
                          AND k.state IN ('pending', 'active') AND k.expires_at > c.n) END \
             FROM {rows} AS c(r, s, n, below, ord) \
             LEFT JOIN key_holdings h ON h.requester = c.r AND h.scope = c.s \
             ORDER BY c.ord"
        )
    };
    let counts = if let ([(key, now)], [below]) = (inserts, below.as_slice()) {
        sqlx::query_scalar(&query(ONE_COUNT))
            .bind(key.requester.as_str())
            .bind(key.scope.as_str())
            .bind(*now)
            .bind(*below)
            .fetch_all(conn)
            .await?
    } else {
        sqlx::query_scalar(&query(COUNTS))
            .bind(inserts.iter().map(|(k, _)| k.requester.as_str()).collect::<Vec<_>>())
            .bind(inserts.iter().map(|(k, _)| k.scope.as_str()).collect::<Vec<_>>())
            .bind(inserts.iter().map(|(_, now)| *now).collect::<Vec<_>>())
            .bind(below)
            .fetch_all(conn)
            .await?
    };
    Ok(counts)
}

// A batch of one write (every batch at one caller) binds its row as a `VALUES` row, not as
// arrays: PostgreSQL plans an `UNNEST` of bound arrays for their real length and of parameters
// for 10 rows, so it never kept a generic plan of the array statements and planned them again
// at every execution (0.17 ms for the limit count, 0.11 ms for the activation, at one caller;
// BENCHMARKS.md, issue 20). A `VALUES` row is one row either way.
const ONE_COUNT: &str = "(VALUES ($1::text, $2::text, $3::timestamptz, $4::bigint, 1::bigint))";
const COUNTS: &str = "UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) WITH ORDINALITY";

/// Writes the records `pending`, in order; how many rows were written.
pub(super) async fn insert_keys(conn: &mut PgConnection, keys: &[&NewKey]) -> Result<u64, StoreError> {
    let text = |f: fn(&NewKey) -> Option<&str>| keys.iter().map(|k| f(k)).collect::<Vec<_>>();
    let teams = keys
        .iter()
        .map(|k| serde_json::to_string(&k.requester_teams).map_err(|e| StoreError::Unavailable(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let inserted = sqlx::query(
        "INSERT INTO key_records (id, scope, requester, purpose, state, octopus_user_id, created_at, \
         expires_at, updated_at, idempotency_key, request_hash, requester_teams, requested_by, ticket_id, \
         deadline) \
         SELECT k.id, k.scope, k.requester, k.purpose, 'pending', k.uid, k.created, k.expires, k.created, \
                k.idem, k.rhash, k.teams::jsonb, k.by, k.ticket, k.deadline \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], \
                     $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], \
                     $13::timestamptz[]) \
              WITH ORDINALITY AS k(id, scope, requester, purpose, uid, created, expires, idem, rhash, teams, by, \
                                   ticket, deadline, ord) \
         ORDER BY k.ord",
    )
    .bind(keys.iter().map(|k| k.id).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.scope.as_str()).collect::<Vec<_>>())
    .bind(text(|k| Some(&k.requester)))
    .bind(keys.iter().map(|k| k.purpose.as_str()).collect::<Vec<_>>())
    .bind(text(|k| Some(&k.octopus_user_id)))
    .bind(keys.iter().map(|k| store_precision(k.created_at)).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| store_precision(k.expires_at)).collect::<Vec<_>>())
    .bind(text(|k| k.idempotency.as_ref().map(|i| i.key.as_str())))
    .bind(text(|k| k.idempotency.as_ref().map(|i| i.request_hash.as_str())))
    .bind(teams)
    .bind(text(|k| k.requested_by.as_deref()))
    .bind(text(|k| k.ticket.as_deref()))
    .bind(keys.iter().map(|k| k.deadline.map(store_precision)).collect::<Vec<_>>())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted)
}

pub(super) async fn activate_keys(
    conn: &mut PgConnection,
    activations: &[(&Activation, DateTime<Utc>)],
) -> Result<Vec<KeyRecord>, StoreError> {
    let query = |rows: &str| {
        format!(
            "UPDATE key_records SET state = 'active', octopus_key_id = a.okid, key_hint = a.hint, \
             secret_hmac = a.hmac, expires_at = a.exp, updated_at = a.at \
             FROM {rows} AS a(kid, okid, hint, hmac, exp, at) \
             WHERE key_records.id = a.kid AND key_records.state = 'pending' RETURNING {KEY_COLUMNS}"
        )
    };
    let rows = if let [(a, at)] = activations {
        // One row as `VALUES`, for the reason given at `ONE_COUNT`.
        sqlx::query(&query(ONE_ACTIVATION))
            .bind(a.id)
            .bind(a.octopus_key_id.as_str())
            .bind(a.key_hint.as_str())
            .bind(a.secret_hmac.as_str())
            .bind(store_precision(a.expires_at))
            .bind(store_precision(*at))
            .fetch_all(conn)
            .await?
    } else {
        let text = |f: fn(&Activation) -> &str| activations.iter().map(|(a, _)| f(a)).collect::<Vec<_>>();
        sqlx::query(&query(ACTIVATIONS))
            .bind(activations.iter().map(|(a, _)| a.id).collect::<Vec<_>>())
            .bind(text(|a| &a.octopus_key_id))
            .bind(text(|a| &a.key_hint))
            .bind(text(|a| &a.secret_hmac))
            .bind(activations.iter().map(|(a, _)| store_precision(a.expires_at)).collect::<Vec<_>>())
            .bind(activations.iter().map(|(_, at)| store_precision(*at)).collect::<Vec<_>>())
            .fetch_all(conn)
            .await?
    };
    rows.iter().map(key_from_row).collect()
}

const ONE_ACTIVATION: &str = "(VALUES ($1::uuid, $2::text, $3::text, $4::text, $5::timestamptz, $6::timestamptz))";
const ACTIVATIONS: &str =
    "UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[])";

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> Backend<'_> {
        Backend::Postgres(self)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn close(&self) {
        drop(self.committing.lock().await.take());
        self.pool.close().await;
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest) -> Result<Vec<KeyRecord>, StoreError> {
        let mut qb = sqlx::QueryBuilder::<Postgres>::new("");
        shared::push_key_page(&mut qb, filter, page);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(key_from_row).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest) -> Result<Vec<AuditRecord>, StoreError> {
        let mut qb = sqlx::QueryBuilder::<Postgres>::new("");
        shared::push_audit_page(&mut qb, filter, page);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(audit_from_row).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn audit_chain(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let rows =
            sqlx::query(&format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq ASC LIMIT $2"))
                .bind(after_seq)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(audit_from_row).collect()
    }
}
