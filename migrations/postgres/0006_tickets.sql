-- Pickup tickets (mirrors migrations/sqlite/0006_tickets.sql with PostgreSQL's native types).
ALTER TABLE key_records ADD COLUMN requested_by TEXT;
-- The ticket a key was claimed through: a ticket whose claim lost its answer is still found claimed.
ALTER TABLE key_records ADD COLUMN ticket_id TEXT;
CREATE INDEX key_records_ticket ON key_records (ticket_id) WHERE ticket_id IS NOT NULL;

CREATE TABLE tickets (
    seq               BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT        NOT NULL UNIQUE,
    for_subject       TEXT        NOT NULL,
    scope             TEXT        NOT NULL,
    purpose           TEXT        NOT NULL,
    ttl               TEXT,
    requested_by      TEXT        NOT NULL,
    requested_by_name TEXT        NOT NULL,
    state             TEXT        NOT NULL CHECK (state IN ('waiting', 'claimed', 'expired', 'cancelled')),
    key_id            UUID,
    created_at        TIMESTAMPTZ NOT NULL,
    expires_at        TIMESTAMPTZ NOT NULL,
    claim_started_at  TIMESTAMPTZ,
    claim_token       TEXT,
    ended_at          TIMESTAMPTZ
);
CREATE INDEX tickets_due ON tickets (state, expires_at);
