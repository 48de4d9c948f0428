-- Pickup tickets (chat-ops): a bot asks for a key on someone's behalf; that person claims it in
-- their own browser. A key record issued through a ticket names the bot as `requested_by`.
ALTER TABLE key_records ADD COLUMN requested_by TEXT;
-- The ticket a key was claimed through: a ticket whose claim lost its answer is still found claimed.
ALTER TABLE key_records ADD COLUMN ticket_id TEXT;
CREATE INDEX key_records_ticket ON key_records (ticket_id) WHERE ticket_id IS NOT NULL;

CREATE TABLE tickets (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    -- The principal who may claim it (a person's subject, as GET /v1/me shows it).
    for_subject       TEXT    NOT NULL,
    scope             TEXT    NOT NULL,
    purpose           TEXT    NOT NULL,
    ttl               TEXT,
    requested_by      TEXT    NOT NULL,
    requested_by_name TEXT    NOT NULL,
    state             TEXT    NOT NULL CHECK (state IN ('waiting', 'claimed', 'expired', 'cancelled')),
    key_id            TEXT,
    created_at        TEXT    NOT NULL,
    expires_at        TEXT    NOT NULL,
    -- Set while a claim's issuance runs, so that a second claim (or a cancel) waits its turn; only
    -- the claim holding `claim_token` may end or release it.
    claim_started_at  TEXT,
    claim_token       TEXT,
    ended_at          TEXT
);
CREATE INDEX tickets_due ON tickets (state, expires_at);
