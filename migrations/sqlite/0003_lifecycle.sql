-- Key lifecycle: the requester's teams (offboarding by team), revocations still to be retried,
-- the webhook outbox, and job leases (one replica runs each job at a time).
ALTER TABLE key_records ADD COLUMN requester_teams TEXT NOT NULL DEFAULT '[]';
ALTER TABLE key_records ADD COLUMN revoke_requested_at TEXT;
CREATE INDEX key_records_expiry ON key_records (state, expires_at);

CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_url     TEXT    NOT NULL,
    event           TEXT    NOT NULL,
    key_id          TEXT    NOT NULL,
    -- '20d' or '10d' for key.expiring, '' otherwise: each (webhook, event, key, threshold) once.
    threshold       TEXT    NOT NULL DEFAULT '',
    payload         TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT    NOT NULL,
    next_attempt_at TEXT    NOT NULL,
    delivered_at    TEXT,
    last_error      TEXT,
    UNIQUE (webhook_url, event, key_id, threshold)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);

CREATE TABLE job_leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
