//! Rows as the database holds them, decoded the same way on both backends: one `FromRow` type
//! per table, turned into its domain type by one `TryFrom`. Two column types differ between the
//! dialects and get a wrapper each, so that the row types need not: [`Time`] (fixed-width UTC
//! text in SQLite, `timestamptz` in PostgreSQL) and [`Id`] (text in SQLite, `uuid` in
//! PostgreSQL).

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::error::BoxDynError;
use sqlx::{Database, Decode, Encode, FromRow, Postgres, Sqlite, Type};
use uuid::Uuid;

use super::{Delivery, StoreError};
use crate::domain::audit::AuditRecord;
use crate::domain::keys::{KeyRecord, KeyState};
use crate::domain::policy::{Purpose, ScopeName};
use crate::domain::tickets::{Ticket, TicketId, TicketState};

/// A point in time as a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Time(pub DateTime<Utc>);

/// SQLite keeps times as fixed-width UTC text (`%Y-%m-%dT%H:%M:%S%.6fZ`), so that text order
/// is time order.
pub(super) fn sqlite_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(super) fn parse_sqlite_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("unreadable time `{text}` in the database: {e}")))
}

impl Type<Sqlite> for Time {
    fn type_info() -> <Sqlite as Database>::TypeInfo {
        <&str as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &<Sqlite as Database>::TypeInfo) -> bool {
        <&str as Type<Sqlite>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Sqlite> for Time {
    fn decode(value: <Sqlite as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Self(parse_sqlite_time(<&str as Decode<Sqlite>>::decode(value)?)?))
    }
}

impl<'q> Encode<'q, Sqlite> for Time {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as Database>::ArgumentBuffer<'q>,
    ) -> Result<sqlx::encode::IsNull, BoxDynError> {
        <String as Encode<'q, Sqlite>>::encode(sqlite_time(self.0), buf)
    }
}

impl Type<Postgres> for Time {
    fn type_info() -> <Postgres as Database>::TypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
}

impl<'r> Decode<'r, Postgres> for Time {
    fn decode(value: <Postgres as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Self(<DateTime<Utc> as Decode<Postgres>>::decode(value)?))
    }
}

impl<'q> Encode<'q, Postgres> for Time {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer<'q>,
    ) -> Result<sqlx::encode::IsNull, BoxDynError> {
        // Microseconds, what both databases keep (and what the audit hash covers).
        <DateTime<Utc> as Encode<'q, Postgres>>::encode_by_ref(&crate::domain::audit::store_precision(self.0), buf)
    }
}

/// A record's or an event's id as a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Id(pub Uuid);

impl Type<Sqlite> for Id {
    fn type_info() -> <Sqlite as Database>::TypeInfo {
        <&str as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &<Sqlite as Database>::TypeInfo) -> bool {
        <&str as Type<Sqlite>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Sqlite> for Id {
    fn decode(value: <Sqlite as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Self(Uuid::parse_str(<&str as Decode<Sqlite>>::decode(value)?)?))
    }
}

impl<'q> Encode<'q, Sqlite> for Id {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as Database>::ArgumentBuffer<'q>,
    ) -> Result<sqlx::encode::IsNull, BoxDynError> {
        <String as Encode<'q, Sqlite>>::encode(self.0.to_string(), buf)
    }
}

impl<'q> Encode<'q, Postgres> for Id {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer<'q>,
    ) -> Result<sqlx::encode::IsNull, BoxDynError> {
        <Uuid as Encode<'q, Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl Type<Postgres> for Id {
    fn type_info() -> <Postgres as Database>::TypeInfo {
        <Uuid as Type<Postgres>>::type_info()
    }
}

impl<'r> Decode<'r, Postgres> for Id {
    fn decode(value: <Postgres as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Self(<Uuid as Decode<Postgres>>::decode(value)?))
    }
}

/// The columns a [`KeyRow`] reads, in its order.
pub(super) const KEY_COLUMNS: &str = "seq, id, scope, requester, purpose, state, octopus_user_id, octopus_key_id, \
                                      key_hint, created_at, expires_at, revoked_at, requested_by";

/// The columns of an `audit_events` row, in [`AuditRow`]'s order.
pub(super) const AUDIT_COLUMNS: &str = "seq, id, occurred_at, actor, action, outcome, scope, key_id, octopus_key_id, \
                                        request_id, client_addr, user_agent, detail, prev_hash, hash";

/// A row of `key_records` ([`KEY_COLUMNS`]).
#[derive(sqlx::FromRow)]
pub(super) struct KeyRow {
    seq: i64,
    id: Id,
    scope: String,
    requester: String,
    purpose: String,
    state: String,
    octopus_user_id: String,
    octopus_key_id: Option<String>,
    key_hint: Option<String>,
    created_at: Time,
    expires_at: Time,
    revoked_at: Option<Time>,
    requested_by: Option<String>,
}

pub(super) fn key_state(text: &str) -> Result<KeyState, StoreError> {
    KeyState::parse(text).ok_or_else(|| StoreError::Corrupt(format!("unknown state {text}")))
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, StoreError> {
        Ok(KeyRecord {
            seq: row.seq,
            id: row.id.0,
            scope: ScopeName::stored(row.scope),
            requester: row.requester,
            purpose: Purpose::stored(row.purpose),
            state: key_state(&row.state)?,
            octopus_user_id: row.octopus_user_id,
            octopus_key_id: row.octopus_key_id,
            key_hint: row.key_hint,
            created_at: row.created_at.0,
            expires_at: row.expires_at.0,
            revoked_at: row.revoked_at.map(|t| t.0),
            requested_by: row.requested_by,
        })
    }
}

/// The columns a [`TicketRow`] reads.
pub(super) const TICKET_COLUMNS: &str = "id, for_subject, scope, purpose, ttl, requested_by, requested_by_name, state, \
                                         key_id, created_at, expires_at, claim_started_at, ended_at";

/// A row of `tickets`.
#[derive(sqlx::FromRow)]
pub(super) struct TicketRow {
    id: String,
    for_subject: String,
    scope: String,
    purpose: String,
    ttl: Option<String>,
    requested_by: String,
    requested_by_name: String,
    state: String,
    key_id: Option<Id>,
    created_at: Time,
    expires_at: Time,
    claim_started_at: Option<Time>,
    ended_at: Option<Time>,
}

impl TryFrom<TicketRow> for Ticket {
    type Error = StoreError;

    fn try_from(row: TicketRow) -> Result<Self, StoreError> {
        Ok(Ticket {
            id: TicketId::parse(&row.id)
                .ok_or_else(|| StoreError::Corrupt(format!("malformed ticket id {}", row.id)))?,
            for_subject: row.for_subject,
            scope: ScopeName::stored(row.scope),
            purpose: Purpose::stored(row.purpose),
            ttl: row.ttl,
            requested_by: row.requested_by,
            requested_by_name: row.requested_by_name,
            state: TicketState::parse(&row.state)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown ticket state {}", row.state)))?,
            key_id: row.key_id.map(|id| id.0),
            created_at: row.created_at.0,
            expires_at: row.expires_at.0,
            claim_started_at: row.claim_started_at.map(|t| t.0),
            ended_at: row.ended_at.map(|t| t.0),
        })
    }
}

/// A row of `audit_events`.
#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    seq: i64,
    id: Id,
    occurred_at: Time,
    actor: String,
    action: String,
    outcome: String,
    scope: Option<String>,
    key_id: Option<Id>,
    octopus_key_id: Option<String>,
    request_id: Option<String>,
    client_addr: Option<String>,
    user_agent: Option<String>,
    detail: sqlx::types::Json<serde_json::Value>,
    prev_hash: String,
    hash: String,
}

impl From<AuditRow> for AuditRecord {
    fn from(row: AuditRow) -> Self {
        AuditRecord {
            seq: row.seq,
            id: row.id.0,
            occurred_at: row.occurred_at.0,
            actor: row.actor,
            action: row.action,
            outcome: row.outcome,
            scope: row.scope,
            key_id: row.key_id.map(|id| id.0),
            octopus_key_id: row.octopus_key_id,
            request_id: row.request_id,
            client_addr: row.client_addr,
            user_agent: row.user_agent,
            detail: row.detail.0,
            prev_hash: row.prev_hash,
            hash: row.hash,
        }
    }
}

/// A row of `webhook_deliveries` as a worker claims it.
#[derive(sqlx::FromRow)]
pub(super) struct DeliveryRow {
    id: i64,
    webhook: String,
    event: String,
    key_id: Id,
    threshold: String,
    payload: sqlx::types::Json<serde_json::Value>,
    attempts: i32,
    created_at: Time,
    next_attempt_at: Time,
}

impl From<DeliveryRow> for Delivery {
    fn from(row: DeliveryRow) -> Self {
        Delivery {
            id: row.id,
            webhook: row.webhook,
            event: row.event,
            key_id: row.key_id.0,
            threshold: row.threshold,
            payload: row.payload.0,
            attempts: row.attempts,
            created_at: row.created_at.0,
            claimed_until: row.next_attempt_at.0,
        }
    }
}

/// A column that would not decode is a value keybroker cannot read ([`StoreError::Corrupt`]);
/// any other error is the database's.
fn decoded(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Database(other),
    }
}

/// Decodes a `key_records` row of either backend.
pub(super) fn key_from_row<'r, R: sqlx::Row>(row: &'r R) -> Result<KeyRecord, StoreError>
where
    KeyRow: sqlx::FromRow<'r, R>,
{
    KeyRow::from_row(row).map_err(decoded)?.try_into()
}

/// Decodes a `tickets` row of either backend.
pub(super) fn ticket_from_row<'r, R: sqlx::Row>(row: &'r R) -> Result<Ticket, StoreError>
where
    TicketRow: sqlx::FromRow<'r, R>,
{
    TicketRow::from_row(row).map_err(decoded)?.try_into()
}

/// Decodes an `audit_events` row of either backend.
pub(super) fn audit_from_row<'r, R: sqlx::Row>(row: &'r R) -> Result<AuditRecord, StoreError>
where
    AuditRow: sqlx::FromRow<'r, R>,
{
    Ok(AuditRow::from_row(row).map_err(decoded)?.into())
}

/// Decodes a claimed `webhook_deliveries` row of either backend.
pub(super) fn delivery_from_row<'r, R: sqlx::Row>(row: &'r R) -> Result<Delivery, StoreError>
where
    DeliveryRow: sqlx::FromRow<'r, R>,
{
    Ok(DeliveryRow::from_row(row).map_err(decoded)?.into())
}
