//! The SQL both backends run alike, written once. Each function here is a provided method of
//! [`Store`](super::Store) behind [`Store::backend`](super::Store::backend); its statement uses
//! `$N` placeholders (which SQLite reads too), binds times and ids through the column wrappers
//! of `rows.rs`, and is type-checked once per backend by [`on_backend!`]. Writes that append to
//! the audit chain run in a [`ChainTx`] (`chain.rs`). What the dialects do differently (the
//! group commit's array statements, the chain's one INSERT, JSON-aggregated pages on SQLite,
//! advisory locks on PostgreSQL) stays in `sqlite.rs` and `postgres.rs`.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::batch::{self, BatchTx, WriteQueue};
use super::chain::{ChainTx, settle};
use super::rows::{
    AUDIT_COLUMNS, Id, KEY_COLUMNS, TICKET_COLUMNS, Time, delivery_from_row, key_from_row, ticket_from_row,
};
use super::{
    Activation, AuditFilter, DELIVERY_CLAIM, Delivery, DeliveryResult, KeyFilter, NewDelivery, NewKey, PageRequest,
    Pending, PgStore, SqliteStore, StoreError,
};
use crate::domain::audit::{ChainKey, GENESIS_HASH, KEYED_PREFIX, NewAuditEvent};
use crate::domain::keys::{KeyChange, KeyRecord, KeyState};
use crate::domain::tickets::{Hold, Ticket, TicketEnd, TicketId};

/// The backend a store runs on, for the shared SQL.
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    Sqlite(&'a SqliteStore),
    Postgres(&'a PgStore),
}

/// A connection inside one of a backend's transactions (the group commit's, a state change's).
pub(super) enum Connection<'a> {
    Sqlite(&'a mut sqlx::SqliteConnection),
    Postgres(&'a mut sqlx::PgConnection),
}

/// Runs `$body` with `$ex` an executor of the store's backend; the body is written once and
/// compiled once per backend. `read` runs on the read pool. `write` runs, on SQLite, in a
/// transaction that holds the one writer's lock (every SQLite write queues there), and on
/// PostgreSQL on the pool (one statement commits on its own).
macro_rules! on_backend {
    (read $backend:expr, |$ex:ident| $body:expr) => {
        match $backend {
            Backend::Sqlite(store) => {
                let $ex = store.reader();
                $body
            }
            Backend::Postgres(store) => {
                let $ex = store.reader();
                $body
            }
        }
    };
    (transaction $backend:expr, |$ex:ident| $body:expr) => {
        match $backend {
            Backend::Sqlite(store) => {
                let mut writer = store.writer().await;
                let (tx, _) = writer.begin().await?;
                on_backend!(@commit tx, |$ex| $body)
            }
            Backend::Postgres(store) => on_backend!(@commit store.reader().begin().await?, |$ex| $body),
        }
    };
    // Runs `$body` in transaction `$tx` and commits it (a `?` in the body rolls it back).
    (@commit $tx:expr, |$ex:ident| $body:expr) => {{
        let mut tx = $tx;
        let done = {
            let $ex = &mut *tx;
            $body
        };
        tx.commit().await?;
        done
    }};
    (connection $conn:expr, |$ex:ident| $body:expr) => {
        match $conn {
            Connection::Sqlite($ex) => $body,
            Connection::Postgres($ex) => $body,
        }
    };
    // Runs `$body` with `$tx` a [`ChainTx`] of the backend's: a write transaction that may
    // append to the audit chain. `$body` returns `(value, changed)`; the transaction commits
    // when it succeeded and changed something, and rolls back otherwise (see `chain::settle`).
    (chained $backend:expr, |$tx:ident| $body:expr) => {
        match $backend {
            Backend::Sqlite(store) => {
                let mut writer = store.writer().await;
                let (mut tx, head) = writer.begin().await?;
                let key = store.chain_key().get();
                on_backend!(@settle tx, ChainTx::Sqlite { conn: &mut *tx, head, key }, |$tx| $body)
            }
            Backend::Postgres(store) => {
                let mut tx = store.reader().begin().await?;
                let key = store.chain_key().get();
                on_backend!(@settle tx, ChainTx::Postgres { conn: &mut *tx, head: store.head(), key }, |$tx| $body)
            }
        }
    };
    (@settle $txn:ident, $chain:expr, |$tx:ident| $body:expr) => {{
        let result = {
            let mut $tx = $chain;
            let result = $body;
            if result.is_err() {
                $tx.forget_head();
            }
            result
        };
        settle($txn, result).await
    }};
    (write $backend:expr, |$ex:ident| $body:expr) => {
        match $backend {
            Backend::Sqlite(store) => {
                let mut writer = store.writer().await;
                let (tx, _) = writer.begin().await?;
                on_backend!(@commit tx, |$ex| $body)
            }
            Backend::Postgres(store) => {
                let $ex = store.reader();
                $body
            }
        }
    };
}

pub(super) use on_backend;

/// The newest published policy: (position, version, document, when it was published).
type LatestPolicy = (i64, String, String, DateTime<Utc>);

/// Keys every event appended from now on with `key` (set once; a second key is ignored).
pub(super) fn set_chain_key(backend: Backend<'_>, key: ChainKey) {
    let cell = match backend {
        Backend::Sqlite(store) => store.chain_key(),
        Backend::Postgres(store) => store.chain_key(),
    };
    let _ = cell.set(key);
}

/// The backend's group-commit queue (`batch.rs`), which every issuance-path write goes through.
fn queue(backend: Backend<'_>) -> &WriteQueue {
    match backend {
        Backend::Sqlite(store) => store.write_queue(),
        Backend::Postgres(store) => store.write_queue(),
    }
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn insert_pending(
    backend: Backend<'_>,
    key: &NewKey,
    event: &NewAuditEvent,
    now: DateTime<Utc>,
) -> Result<Pending, StoreError> {
    queue(backend).insert_pending(key, event, now).await
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn activate(
    backend: Backend<'_>,
    activation: &Activation,
    event: &NewAuditEvent,
) -> Result<KeyRecord, StoreError> {
    queue(backend).activate(activation, event).await
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn append_audit(backend: Backend<'_>, event: &NewAuditEvent) -> Result<(), StoreError> {
    queue(backend).append(event).await
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn ping(backend: Backend<'_>) -> Result<(), StoreError> {
    on_backend!(read backend, |ex| sqlx::query("SELECT 1").execute(ex).await?.rows_affected());
    Ok(())
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn get_key(backend: Backend<'_>, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM key_records WHERE id = $1");
    on_backend!(read backend, |ex| {
        sqlx::query(&sql).bind(Id(id)).fetch_optional(ex).await?.as_ref().map(key_from_row).transpose()
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn find_by_secret_hmac(backend: Backend<'_>, hmac: &str) -> Result<Option<KeyRecord>, StoreError> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM key_records WHERE secret_hmac = $1");
    on_backend!(read backend, |ex| {
        sqlx::query(&sql).bind(hmac).fetch_optional(ex).await?.as_ref().map(key_from_row).transpose()
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn pending_before(
    backend: Backend<'_>,
    cutoff: DateTime<Utc>,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM key_records WHERE state = 'pending' AND created_at < $1 \
         AND (deadline IS NULL OR deadline < $2) ORDER BY seq ASC LIMIT $3"
    );
    on_backend!(read backend, |ex| {
        let rows =
            sqlx::query(&sql).bind(Time(cutoff)).bind(Time(now)).bind(i64::from(limit)).fetch_all(ex).await?;
        rows.iter().map(key_from_row).collect()
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn due_for_expiry(
    backend: Backend<'_>,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM key_records WHERE state = 'active' AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
    );
    on_backend!(read backend, |ex| {
        let rows = sqlx::query(&sql).bind(Time(now)).bind(i64::from(limit)).fetch_all(ex).await?;
        rows.iter().map(key_from_row).collect()
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn revocations_to_retry(backend: Backend<'_>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM key_records WHERE state IN ('active', 'expired') \
         AND revoke_requested_at IS NOT NULL ORDER BY revoke_requested_at LIMIT $1"
    );
    on_backend!(read backend, |ex| {
        let rows = sqlx::query(&sql).bind(i64::from(limit)).fetch_all(ex).await?;
        rows.iter().map(key_from_row).collect()
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn keys_for_notices(
    backend: Backend<'_>,
    now: DateTime<Utc>,
    lookback: chrono::Duration,
    horizon: chrono::Duration,
) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM key_records WHERE state IN ('active', 'revoked', 'expired') \
         AND (created_at > $1 OR revoked_at > $1 OR (expires_at > $1 AND expires_at <= $2)) ORDER BY seq"
    );
    on_backend!(read backend, |ex| {
        let rows = sqlx::query(&sql).bind(Time(now - lookback)).bind(Time(now + horizon)).fetch_all(ex).await?;
        rows.iter().map(key_from_row).collect()
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn active_counts(backend: Backend<'_>, now: DateTime<Utc>) -> Result<Vec<(String, u64)>, StoreError> {
    let sql = "SELECT scope, COUNT(*) FROM key_records WHERE state = 'active' AND expires_at > $1 \
               GROUP BY scope ORDER BY scope";
    let rows: Vec<(String, i64)> =
        on_backend!(read backend, |ex| sqlx::query_as(sql).bind(Time(now)).fetch_all(ex).await?);
    Ok(rows.into_iter().map(|(scope, n)| (scope, u64::try_from(n).unwrap_or_default())).collect())
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn revocation_in_progress(
    backend: Backend<'_>,
    id: Uuid,
    since: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let sql = "SELECT 1 FROM key_records WHERE id = $1 AND state <> 'revoked' AND revoking_since > $2";
    Ok(on_backend!(read backend, |ex| {
        sqlx::query(sql).bind(Id(id)).bind(Time(since)).fetch_optional(ex).await?.is_some()
    }))
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn begin_revocation(backend: Backend<'_>, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
    let sql = "UPDATE key_records SET revoking_since = $1 WHERE id = $2";
    on_backend!(write backend, |ex| sqlx::query(sql).bind(Time(at)).bind(Id(id)).execute(ex).await?.rows_affected());
    Ok(())
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn request_revocation(backend: Backend<'_>, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
    let sql = "UPDATE key_records SET revoke_requested_at = COALESCE(revoke_requested_at, $1) WHERE id = $2";
    on_backend!(write backend, |ex| sqlx::query(sql).bind(Time(at)).bind(Id(id)).execute(ex).await?.rows_affected());
    Ok(())
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn get_ticket(backend: Backend<'_>, id: &TicketId) -> Result<Option<Ticket>, StoreError> {
    let sql = format!("SELECT {TICKET_COLUMNS} FROM tickets WHERE id = $1");
    on_backend!(read backend, |ex| {
        sqlx::query(&sql).bind(id.as_str()).fetch_optional(ex).await?.as_ref().map(ticket_from_row).transpose()
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn release_ticket_claim(backend: Backend<'_>, id: &TicketId, token: &str) -> Result<(), StoreError> {
    let sql = "UPDATE tickets SET claim_started_at = NULL, claim_token = NULL \
               WHERE id = $1 AND state = 'waiting' AND claim_token = $2";
    on_backend!(write backend, |ex| sqlx::query(sql).bind(id.as_str()).bind(token).execute(ex).await?.rows_affected());
    Ok(())
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn ticket_key(backend: Backend<'_>, id: &TicketId) -> Result<Option<KeyRecord>, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM key_records WHERE ticket_id = $1 AND state <> 'failed' ORDER BY seq LIMIT 1"
    );
    on_backend!(read backend, |ex| {
        sqlx::query(&sql).bind(id.as_str()).fetch_optional(ex).await?.as_ref().map(key_from_row).transpose()
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn tickets_due_for_expiry(
    backend: Backend<'_>,
    now: DateTime<Utc>,
    stale_before: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<Ticket>, StoreError> {
    let sql = format!(
        "SELECT {TICKET_COLUMNS} FROM tickets WHERE state = 'waiting' AND expires_at <= $1 \
         AND (claim_started_at IS NULL OR claim_started_at < $2) ORDER BY expires_at LIMIT $3"
    );
    on_backend!(read backend, |ex| {
        let rows =
            sqlx::query(&sql).bind(Time(now)).bind(Time(stale_before)).bind(i64::from(limit)).fetch_all(ex).await?;
        rows.iter().map(ticket_from_row).collect()
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn latest_policy(backend: Backend<'_>) -> Result<Option<LatestPolicy>, StoreError> {
    let sql = "SELECT seq, version, document, published_at FROM policy_versions ORDER BY seq DESC LIMIT 1";
    let row: Option<(i64, String, String, Time)> =
        on_backend!(read backend, |ex| sqlx::query_as(sql).fetch_optional(ex).await?);
    Ok(row.map(|(seq, version, document, at)| (seq, version, document, at.0)))
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn report_replica_policy(
    backend: Backend<'_>,
    replica: &str,
    version: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let sql = "INSERT INTO replica_policies (replica, version, seen_at) VALUES ($1, $2, $3) \
               ON CONFLICT (replica) DO UPDATE SET version = $2, seen_at = $3";
    on_backend!(write backend, |ex| sqlx::query(sql).bind(replica).bind(version).bind(Time(at)).execute(ex).await?.rows_affected());
    Ok(())
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn replica_policies(backend: Backend<'_>) -> Result<Vec<(String, String, DateTime<Utc>)>, StoreError> {
    let sql = "SELECT replica, version, seen_at FROM replica_policies ORDER BY seen_at DESC LIMIT 100";
    let rows: Vec<(String, String, Time)> = on_backend!(read backend, |ex| sqlx::query_as(sql).fetch_all(ex).await?);
    Ok(rows.into_iter().map(|(replica, version, at)| (replica, version, at.0)).collect())
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn migrate(backend: Backend<'_>) -> Result<(), StoreError> {
    let run = match backend {
        Backend::Sqlite(store) => store.migrator().run(store.reader()).await,
        Backend::Postgres(store) => store.migrator().run(store.reader()).await,
    };
    run.map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))
}

/// Checks, without changing anything, that every migration has been applied.
#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn check_migrated(backend: Backend<'_>) -> Result<(), StoreError> {
    let sql = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success";
    let (applied, migrator) = match backend {
        Backend::Sqlite(store) => (sqlx::query_scalar(sql).fetch_one(store.reader()).await, store.migrator()),
        Backend::Postgres(store) => (sqlx::query_scalar(sql).fetch_one(store.reader()).await, store.migrator()),
    };
    let applied: i64 =
        applied.map_err(|e| StoreError::Unavailable(format!("cannot read the applied migrations: {e}")))?;
    super::migration_gap(migrator, applied)
}

/// Moves a record from `from` to `to` at `at`, stamping `revoked_at` when `to` is revoked; false
/// when it was not in `from` (see `batch::apply_change`).
#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn set_state(
    connection: Connection<'_>,
    id: Uuid,
    from: KeyState,
    to: KeyState,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let sql = "UPDATE key_records SET state = $1, updated_at = $2, revoked_at = COALESCE($3, revoked_at) \
               WHERE id = $4 AND state = $5";
    let revoked_at = (to == KeyState::Revoked).then_some(Time(at));
    let changed = on_backend!(connection connection, |ex| {
        let query = sqlx::query(sql).bind(to.as_str()).bind(Time(at)).bind(revoked_at).bind(Id(id)).bind(from.as_str());
        query.execute(ex).await?.rows_affected()
    });
    Ok(changed == 1)
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn begin_ticket_claim(
    backend: Backend<'_>,
    id: &TicketId,
    token: &str,
    now: DateTime<Utc>,
    stale_before: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let sql = "UPDATE tickets SET claim_started_at = $1, claim_token = $4 \
               WHERE id = $2 AND state = 'waiting' AND expires_at > $1 \
               AND (claim_started_at IS NULL OR claim_started_at < $3) \
               AND NOT EXISTS (SELECT 1 FROM key_records WHERE ticket_id = $2 AND state <> 'failed')";
    let changed = on_backend!(write backend, |ex| {
        let query = sqlx::query(sql).bind(Time(now)).bind(id.as_str()).bind(Time(stale_before)).bind(token);
        query.execute(ex).await?.rows_affected()
    });
    Ok(changed == 1)
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn try_lease(
    backend: Backend<'_>,
    job: &str,
    holder: &str,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Result<bool, StoreError> {
    let sql = "INSERT INTO job_leases (name, holder, expires_at) VALUES ($1, $2, $3) \
               ON CONFLICT (name) DO UPDATE SET holder = $2, expires_at = $3 \
               WHERE job_leases.holder = $2 OR job_leases.expires_at <= $4";
    let taken = on_backend!(write backend, |ex| {
        let query = sqlx::query(sql).bind(job).bind(holder).bind(Time(now + ttl)).bind(Time(now));
        query.execute(ex).await?.rows_affected()
    });
    Ok(taken == 1)
}

/// Outbox rows written before webhooks had names hold the webhook's URL: each `(url, name)`
/// pair names them, and rows of URLs no longer configured become `removed-<id>`. One
/// transaction.
#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn name_webhook_deliveries(
    backend: Backend<'_>,
    names: &[(String, String)],
) -> Result<u64, StoreError> {
    Ok(on_backend!(transaction backend, |ex| {
        let mut renamed = 0;
        for (url, name) in names {
            let rename = sqlx::query("UPDATE webhook_deliveries SET webhook = $1 WHERE webhook = $2");
            renamed += rename.bind(name).bind(url).execute(&mut *ex).await?.rows_affected();
        }
        let removed = "UPDATE webhook_deliveries SET webhook = 'removed-' || id WHERE webhook LIKE '%://%'";
        renamed + sqlx::query(removed).execute(&mut *ex).await?.rows_affected()
    }))
}

/// One event's place in the audit chain: the hash before it and its own.
pub(super) struct Link {
    pub prev: String,
    pub hash: String,
}

/// The links of `events` appended after `prev`. A plain hash after a keyed one would break the
/// chain for good, so a process without the key appends nothing to a keyed chain.
fn links(events: &[&NewAuditEvent], prev: &str, key: Option<&ChainKey>) -> Result<Vec<Link>, StoreError> {
    if key.is_none() && prev.starts_with(KEYED_PREFIX) {
        return Err(StoreError::Unavailable(
            "the audit chain is keyed and this process has no audit.chain_key_file: nothing can be appended".to_owned(),
        ));
    }
    let mut last = prev.to_owned();
    Ok(events
        .iter()
        .map(|event| {
            let hash = event.chain_hash(&last, key);
            Link { prev: std::mem::replace(&mut last, hash.clone()), hash }
        })
        .collect())
}

/// Appends `events`, in order, to the audit chain: the one implementation for both backends,
/// under the chain's lock (SQLite's one writer; PostgreSQL's advisory lock), which the caller
/// holds. The backend's INSERT itself checks that `cached` (this process's last head) is still
/// the chain's last hash, so the usual append is one statement however many events there are;
/// a stale hint costs one read of the head and a second try. Returns the new head.
#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn append(
    mut connection: Connection<'_>,
    cached: Option<String>,
    events: &[&NewAuditEvent],
    key: Option<&ChainKey>,
) -> Result<String, StoreError> {
    if let Some(prev) = cached {
        if let Some(last) = insert_chained(&mut connection, events, &prev, key).await? {
            return Ok(last);
        }
    }
    let sql = "SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1";
    let head: Option<String> = match &mut connection {
        Connection::Sqlite(c) => sqlx::query_scalar(sql).fetch_optional(&mut **c).await?,
        Connection::Postgres(c) => sqlx::query_scalar(sql).fetch_optional(&mut **c).await?,
    };
    let prev = head.unwrap_or_else(|| GENESIS_HASH.to_owned());
    insert_chained(&mut connection, events, &prev, key).await?.ok_or_else(|| {
        // Impossible while this transaction holds the chain's lock.
        StoreError::Unavailable("the audit chain's head moved during an append".to_owned())
    })
}

/// Inserts `events` chained after `prev` with the backend's one statement, if `prev` is still
/// the chain's last hash: the new last hash, or `None` (nothing written).
async fn insert_chained(
    connection: &mut Connection<'_>,
    events: &[&NewAuditEvent],
    prev: &str,
    key: Option<&ChainKey>,
) -> Result<Option<String>, StoreError> {
    let links = links(events, prev, key)?;
    let inserted = match connection {
        Connection::Sqlite(c) => super::sqlite::insert_events(c, events, &links, prev).await?,
        Connection::Postgres(c) => super::postgres::insert_events(c, events, &links, prev).await?,
    };
    if inserted == 0 {
        return Ok(None);
    }
    if inserted != events.len() as u64 {
        return Err(StoreError::Unavailable(format!("{inserted} of {} audit events were written", events.len())));
    }
    Ok(links.last().map(|l| l.hash.clone()))
}

/// Applies a key's state change in a chain transaction (see `batch::apply_change`).
#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn change_state(
    backend: Backend<'_>,
    id: Uuid,
    change: KeyChange,
    at: DateTime<Utc>,
    event: &NewAuditEvent,
) -> Result<(KeyRecord, bool), StoreError> {
    on_backend!(chained backend, |tx| batch::apply_change(&mut tx, id, change, at, event).await)
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn insert_ticket(
    backend: Backend<'_>,
    ticket: &Ticket,
    event: &NewAuditEvent,
) -> Result<(), StoreError> {
    on_backend!(chained backend, |tx| write_ticket(&mut tx, ticket, event).await).map(|_| ())
}

async fn write_ticket(tx: &mut ChainTx<'_>, t: &Ticket, event: &NewAuditEvent) -> Result<((), bool), StoreError> {
    let sql = "INSERT INTO tickets (id, for_subject, scope, purpose, ttl, requested_by, requested_by_name, state, \
               created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'waiting', $8, $9)";
    on_backend!(connection tx.connection(), |ex| {
        let query = sqlx::query(sql).bind(t.id.as_str()).bind(&t.for_subject).bind(t.scope.as_str());
        let query = query.bind(t.purpose.as_str()).bind(t.ttl.as_deref()).bind(&t.requested_by);
        let query = query.bind(&t.requested_by_name).bind(Time(t.created_at)).bind(Time(t.expires_at));
        query.execute(ex).await?.rows_affected()
    });
    tx.append(&[event]).await?;
    Ok(((), true))
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn end_ticket(
    backend: Backend<'_>,
    id: &TicketId,
    end: TicketEnd,
    at: DateTime<Utc>,
    hold: Hold<'_>,
    event: &NewAuditEvent,
) -> Result<bool, StoreError> {
    let (ended, _) = on_backend!(chained backend, |tx| close_ticket(&mut tx, id, end, at, hold, event).await)?;
    Ok(ended)
}

/// Ends the ticket if `hold` holds, and appends `event` then: whether it did.
async fn close_ticket(
    tx: &mut ChainTx<'_>,
    id: &TicketId,
    end: TicketEnd,
    at: DateTime<Utc>,
    hold: Hold<'_>,
    event: &NewAuditEvent,
) -> Result<(bool, bool), StoreError> {
    let holder = match hold {
        Hold::Claim(_) => "claim_token = $5",
        Hold::Nobody { .. } => "(claim_started_at IS NULL OR claim_started_at < $5)",
    };
    let sql = format!(
        "UPDATE tickets SET state = $1, key_id = $2, ended_at = $3, claim_started_at = NULL, claim_token = NULL \
         WHERE id = $4 AND state = 'waiting' AND {holder}"
    );
    let ended = on_backend!(connection tx.connection(), |ex| {
        let query = sqlx::query(&sql).bind(end.state().as_str()).bind(end.key_id().map(Id)).bind(Time(at));
        let query = query.bind(id.as_str());
        let query = match hold {
            Hold::Claim(token) => query.bind(token.to_owned()),
            Hold::Nobody { stale_before } => query.bind(Time(stale_before)),
        };
        query.execute(ex).await?.rows_affected()
    }) == 1;
    if ended {
        tx.append(&[event]).await?;
    }
    Ok((ended, ended))
}

/// Publishes a policy version unless it is the newest already; the newest's sequence number.
#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn publish_policy(
    backend: Backend<'_>,
    version: &str,
    document: &str,
    at: DateTime<Utc>,
    by: &str,
) -> Result<i64, StoreError> {
    let (seq, _) = on_backend!(chained backend, |tx| write_policy(&mut tx, version, document, at, by).await)?;
    Ok(seq)
}

async fn write_policy(
    tx: &mut ChainTx<'_>,
    version: &str,
    document: &str,
    at: DateTime<Utc>,
    by: &str,
) -> Result<(i64, bool), StoreError> {
    tx.lock_policy().await?;
    let insert = "INSERT INTO policy_versions (version, document, published_at, published_by) SELECT $1, $2, $3, $4 \
                  WHERE COALESCE((SELECT version FROM policy_versions ORDER BY seq DESC LIMIT 1), '') <> $1";
    let newest = "SELECT MAX(seq) FROM policy_versions";
    let seq: i64 = on_backend!(connection tx.connection(), |ex| {
        sqlx::query(insert).bind(version).bind(document).bind(Time(at)).bind(by).execute(&mut *ex).await?;
        sqlx::query_scalar(newest).fetch_one(ex).await?
    });
    Ok((seq, true))
}

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn enqueue_delivery(backend: Backend<'_>, d: &NewDelivery) -> Result<bool, StoreError> {
    let sql = "INSERT INTO webhook_deliveries (webhook, event, key_id, threshold, payload, status, created_at, \
               next_attempt_at) VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6) \
               ON CONFLICT (webhook, event, key_id, threshold) DO NOTHING";
    let added = on_backend!(write backend, |ex| {
        let query = sqlx::query(sql).bind(&d.webhook).bind(&d.event).bind(Id(d.key_id)).bind(&d.threshold);
        let query = query.bind(sqlx::types::Json(&d.payload)).bind(Time(d.created_at));
        query.execute(ex).await?.rows_affected()
    });
    Ok(added == 1)
}

/// Claims the pending deliveries due at `now` (see `Store::due_deliveries`); on PostgreSQL a
/// row another replica is claiming is skipped rather than waited for.
#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn due_deliveries(
    backend: Backend<'_>,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<Delivery>, StoreError> {
    let skip_locked = if matches!(backend, Backend::Postgres(_)) { " FOR UPDATE SKIP LOCKED" } else { "" };
    let sql = format!(
        "UPDATE webhook_deliveries SET next_attempt_at = $1 WHERE id IN (SELECT id FROM webhook_deliveries \
         WHERE status = 'pending' AND next_attempt_at <= $2 ORDER BY id LIMIT $3{skip_locked}) \
         RETURNING id, webhook, event, key_id, threshold, payload, attempts, created_at, next_attempt_at"
    );
    let claim = Time(now + DELIVERY_CLAIM);
    let mut due = on_backend!(write backend, |ex| {
        let rows = sqlx::query(&sql).bind(claim).bind(Time(now)).bind(i64::from(limit)).fetch_all(ex).await?;
        rows.iter().map(delivery_from_row).collect::<Result<Vec<_>, StoreError>>()?
    });
    due.sort_by_key(|d| d.id);
    Ok(due)
}

/// Records what became of a delivery while this worker's claim holds it (`next_attempt_at` is
/// the claim's token).
#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn finish_delivery(
    backend: Backend<'_>,
    delivery: &Delivery,
    result: &DeliveryResult,
) -> Result<bool, StoreError> {
    let set = match result {
        DeliveryResult::Delivered { .. } => "status = 'delivered', delivered_at = $3, last_error = NULL",
        DeliveryResult::Retry { .. } => "next_attempt_at = $3, last_error = $4",
        DeliveryResult::GaveUp { .. } => "status = 'failed', last_error = $3",
    };
    let sql = format!(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, {set} \
         WHERE id = $1 AND status = 'pending' AND next_attempt_at = $2"
    );
    let claim = Time(delivery.claimed_until);
    let done = on_backend!(write backend, |ex| {
        let query = sqlx::query(&sql).bind(delivery.id).bind(claim);
        let query = match result {
            DeliveryResult::Delivered { at } => query.bind(Time(*at)),
            DeliveryResult::Retry { next_attempt_at, error } => query.bind(Time(*next_attempt_at)).bind(error.clone()),
            DeliveryResult::GaveUp { error } => query.bind(error.clone()),
        };
        query.execute(ex).await?.rows_affected()
    });
    Ok(done == 1)
}

/// What tells the two dialects apart in the list pages' SQL.
pub(super) trait Dialect: sqlx::Database {
    /// SQLite's planner, without statistics (keybroker never runs `ANALYZE`), would serve a
    /// state filter from the state or expiry index and read every requester's records in that
    /// state; a unary `+` on a term keeps an index from serving it, so that the most selective
    /// one does. PostgreSQL plans from statistics and has no unary `+` for text.
    const INDEX_HINTS: bool;
    /// The SQL that is true when a record's `requester_teams` holds the bound team.
    const HAS_TEAM: (&'static str, &'static str);
}

impl Dialect for sqlx::Sqlite {
    const INDEX_HINTS: bool = true;
    const HAS_TEAM: (&'static str, &'static str) =
        (" AND EXISTS (SELECT 1 FROM json_each(requester_teams) WHERE value = ", ")");
}

impl Dialect for sqlx::Postgres {
    const INDEX_HINTS: bool = false;
    // `?` is jsonb's "has this string element", served by the GIN index.
    const HAS_TEAM: (&'static str, &'static str) = (" AND requester_teams ? ", "");
}

/// A page of key records, newest first. When the page is one requester's or one scope's, the
/// state and expiry terms carry SQLite's `+` (see [`Dialect::INDEX_HINTS`]), so that the
/// `(requester, seq)` or `(scope, seq)` index serves the filter and the order, and a page reads
/// about as many rows as it returns.
pub(super) fn push_key_page<'q, DB>(qb: &mut sqlx::QueryBuilder<'q, DB>, filter: &KeyFilter, page: PageRequest)
where
    DB: Dialect,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Time: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let hinted = DB::INDEX_HINTS && (filter.requester.is_some() || filter.scope.is_some());
    let plus = if hinted { "+" } else { "" };
    qb.push(format!("SELECT {KEY_COLUMNS} FROM key_records WHERE 1 = 1"));
    if let Some(r) = &filter.requester {
        qb.push(" AND requester = ").push_bind(r.clone());
    }
    if let Some(s) = &filter.scope {
        qb.push(" AND scope = ").push_bind(s.clone());
    }
    if let Some(team) = &filter.team {
        let (before, after) = DB::HAS_TEAM;
        qb.push(before).push_bind(team.clone()).push(after);
    }
    match (filter.state, filter.now) {
        (Some(KeyState::Active), Some(now)) => {
            qb.push(format!(" AND {plus}state = 'active' AND {plus}expires_at > ")).push_bind(Time(now));
        }
        (Some(KeyState::Expired), Some(now)) => {
            qb.push(format!(" AND ({plus}state = 'expired' OR ({plus}state = 'active' AND {plus}expires_at <= "))
                .push_bind(Time(now))
                .push("))");
        }
        (Some(s), _) => {
            qb.push(format!(" AND {plus}state = ")).push_bind(s.as_str().to_owned());
        }
        (None, _) => {}
    }
    push_page(qb, page);
}

/// A page of audit events, newest first. On SQLite the most selective filter given (a key, else
/// an actor) gets the index and the other terms carry `+` (see [`Dialect::INDEX_HINTS`]): else
/// `actor = ? AND action = ?` could be served from the action index, reading every event of
/// that action.
pub(super) fn push_audit_page<'q, DB>(qb: &mut sqlx::QueryBuilder<'q, DB>, filter: &AuditFilter, page: PageRequest)
where
    DB: Dialect,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Time: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Id: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let (plus_actor, plus) = match (DB::INDEX_HINTS, &filter.key_id, &filter.actor) {
        (false, _, _) | (true, None, None) => ("", ""),
        (true, Some(_), _) => ("+", "+"),
        (true, None, Some(_)) => ("", "+"),
    };
    qb.push(format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE 1 = 1"));
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
        qb.push(" AND key_id = ").push_bind(Id(k));
    }
    if let Some(from) = filter.from {
        qb.push(format!(" AND {plus}occurred_at >= ")).push_bind(Time(from));
    }
    if let Some(to) = filter.to {
        qb.push(format!(" AND {plus}occurred_at < ")).push_bind(Time(to));
    }
    push_page(qb, page);
}

fn push_page<'q, DB: sqlx::Database>(qb: &mut sqlx::QueryBuilder<'q, DB>, page: PageRequest)
where
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    if let Some(before) = page.before_seq {
        qb.push(" AND seq < ").push_bind(before);
    }
    qb.push(" ORDER BY seq DESC LIMIT ").push_bind(i64::from(page.limit));
}
