//! A write transaction that may append to the audit chain, written once for both backends:
//! [`ChainTx`] is what the group commit (`batch.rs`), a state change, a ticket's writes and a
//! policy publication run in. It holds the transaction's connection, the chain's cached head
//! and the chain key; the statements each dialect writes its own way (the group commit's
//! JSON or `UNNEST` arrays, PostgreSQL's advisory locks) are the backend's functions it calls.

use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, SqliteConnection};
use uuid::Uuid;

use super::batch::{BatchTx, Found};
use super::rows::{Id, KEY_COLUMNS, key_from_row};
use super::shared::{self, Connection, on_backend};
use super::{Activation, NewKey, StoreError, postgres, sqlite};
use crate::domain::audit::{ChainKey, NewAuditEvent};
use crate::domain::keys::{KeyRecord, KeyState};

/// A write transaction of either backend, with what it needs to append to the chain.
pub(super) enum ChainTx<'a> {
    /// On SQLite the transaction holds the one writer's lock, which guards the cached head.
    Sqlite { conn: &'a mut SqliteConnection, head: &'a mut Option<String>, key: Option<&'a ChainKey> },
    /// On PostgreSQL an append takes the chain's advisory lock; the cached head is shared by the
    /// process's transactions.
    Postgres { conn: &'a mut PgConnection, head: &'a Mutex<Option<String>>, key: Option<&'a ChainKey> },
}

impl ChainTx<'_> {
    /// The transaction's connection, for the SQL both dialects share.
    pub(super) fn connection(&mut self) -> Connection<'_> {
        match self {
            Self::Sqlite { conn, .. } => Connection::Sqlite(conn),
            Self::Postgres { conn, .. } => Connection::Postgres(conn),
        }
    }

    /// Serialises policy publications, so that "unless it is the newest already" holds: the
    /// policy's advisory lock on PostgreSQL; on SQLite the writer's lock is held already.
    pub(super) async fn lock_policy(&mut self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite { .. } => Ok(()),
            Self::Postgres { conn, .. } => postgres::lock_policy(conn).await,
        }
    }

    /// Drops the cached head: after a rollback it may name an event that was never committed.
    /// It is only a hint (every append checks it), so this saves a failed first try.
    pub(super) fn forget_head(&mut self) {
        match self {
            Self::Sqlite { head, .. } => **head = None,
            Self::Postgres { head, .. } => set_head(head, None),
        }
    }
}

fn set_head(head: &Mutex<Option<String>>, value: Option<String>) {
    if let Ok(mut h) = head.lock() {
        *h = value;
    }
}

#[async_trait]
impl BatchTx for ChainTx<'_> {
    async fn lock_requesters(&mut self, requesters: &[&str]) -> Result<(), StoreError> {
        match self {
            // The writer's lock already serialises every write.
            Self::Sqlite { .. } => Ok(()),
            Self::Postgres { conn, .. } => postgres::lock_requesters(conn, requesters).await,
        }
    }

    async fn find_idempotent(&mut self, keys: &[&NewKey]) -> Result<Vec<Found>, StoreError> {
        match self {
            Self::Sqlite { conn, .. } => sqlite::find_idempotent(conn, keys).await,
            Self::Postgres { conn, .. } => postgres::find_idempotent(conn, keys).await,
        }
    }

    async fn limit_counts(&mut self, inserts: &[(&NewKey, DateTime<Utc>)]) -> Result<Vec<u64>, StoreError> {
        let counts = match self {
            Self::Sqlite { conn, .. } => sqlite::limit_counts(conn, inserts).await?,
            Self::Postgres { conn, .. } => postgres::limit_counts(conn, inserts).await?,
        };
        Ok(counts.into_iter().map(|n| u64::try_from(n).unwrap_or_default()).collect())
    }

    async fn insert_keys(&mut self, keys: &[&NewKey]) -> Result<(), StoreError> {
        let inserted = match self {
            Self::Sqlite { conn, .. } => sqlite::insert_keys(conn, keys).await?,
            Self::Postgres { conn, .. } => postgres::insert_keys(conn, keys).await?,
        };
        if inserted != keys.len() as u64 {
            return Err(StoreError::Unavailable(format!("{inserted} of {} key records were written", keys.len())));
        }
        Ok(())
    }

    async fn activate_keys(
        &mut self,
        activations: &[(&Activation, DateTime<Utc>)],
    ) -> Result<Vec<KeyRecord>, StoreError> {
        match self {
            Self::Sqlite { conn, .. } => sqlite::activate_keys(conn, activations).await,
            Self::Postgres { conn, .. } => postgres::activate_keys(conn, activations).await,
        }
    }

    async fn free_idempotency_key(&mut self, id: Uuid) -> Result<(), StoreError> {
        let sql = "UPDATE key_records SET idempotency_key = NULL WHERE id = $1";
        on_backend!(connection self.connection(), |ex| sqlx::query(sql).bind(Id(id)).execute(ex).await?.rows_affected());
        Ok(())
    }

    async fn key(&mut self, id: Uuid) -> Result<KeyRecord, StoreError> {
        // SQLite's writer lock already keeps the row still; PostgreSQL locks it.
        let lock = if matches!(self, Self::Postgres { .. }) { " FOR UPDATE" } else { "" };
        let sql = format!("SELECT {KEY_COLUMNS} FROM key_records WHERE id = $1{lock}");
        let row = on_backend!(connection self.connection(), |ex| {
            sqlx::query(&sql).bind(Id(id)).fetch_optional(ex).await?.as_ref().map(key_from_row).transpose()?
        });
        row.ok_or(StoreError::NotFound(id))
    }

    async fn append(&mut self, events: &[&NewAuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        match self {
            Self::Sqlite { conn, head, key } => {
                **head = Some(shared::append(Connection::Sqlite(conn), head.take(), events, *key).await?);
            }
            Self::Postgres { conn, head, key } => {
                postgres::lock_chain(conn).await?;
                let cached = head.lock().map(|mut h| h.take()).unwrap_or_default();
                let last = shared::append(Connection::Postgres(conn), cached, events, *key).await?;
                set_head(head, Some(last));
            }
        }
        Ok(())
    }

    async fn set_state(
        &mut self,
        id: Uuid,
        from: KeyState,
        to: KeyState,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        shared::set_state(self.connection(), id, from, to, at).await
    }
}

/// Ends a chain transaction whose work returned `result`: commits it when the work succeeded
/// and changed something (`Ok((_, true))`), and rolls it back otherwise.
pub(super) async fn settle<DB: sqlx::Database, T>(
    tx: sqlx::Transaction<'_, DB>,
    result: Result<(T, bool), StoreError>,
) -> Result<(T, bool), StoreError> {
    match &result {
        Ok((_, true)) => tx.commit().await?,
        Ok(_) => tx.rollback().await?,
        // The work's error is the one to report; a failed rollback (a broken connection,
        // typically) ends the transaction all the same.
        Err(_) => {
            let _ = tx.rollback().await;
        }
    }
    result
}
