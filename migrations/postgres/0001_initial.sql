-- Key records and the hash-chained audit trail (mirrors migrations/sqlite/0001_initial.sql with
-- PostgreSQL's native types).

CREATE TABLE key_records (
    seq             BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              UUID        NOT NULL UNIQUE,
    scope           TEXT        NOT NULL,
    requester       TEXT        NOT NULL,
    purpose         TEXT        NOT NULL,
    state           TEXT        NOT NULL CHECK (state IN ('pending', 'active', 'revoked', 'expired', 'failed')),
    octopus_user_id TEXT        NOT NULL,
    octopus_key_id  TEXT,
    key_hint        TEXT,
    -- HMAC-SHA256 of the secret, keyed with audit.hmac_secret; never the secret itself.
    secret_hmac     TEXT        UNIQUE,
    created_at      TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL,
    revoked_at      TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL
);

CREATE INDEX key_records_requester ON key_records (requester, seq);
CREATE INDEX key_records_scope ON key_records (scope, seq);
CREATE INDEX key_records_state ON key_records (state, seq);
CREATE INDEX key_records_limit ON key_records (requester, scope, state, expires_at);

CREATE TABLE audit_events (
    seq            BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             UUID        NOT NULL UNIQUE,
    occurred_at    TIMESTAMPTZ NOT NULL,
    actor          TEXT        NOT NULL,
    action         TEXT        NOT NULL,
    outcome        TEXT        NOT NULL,
    scope          TEXT,
    key_id         UUID,
    octopus_key_id TEXT,
    request_id     TEXT,
    client_addr    TEXT,
    user_agent     TEXT,
    detail         JSONB       NOT NULL,
    prev_hash      TEXT        NOT NULL,
    hash           TEXT        NOT NULL UNIQUE
);

CREATE INDEX audit_events_occurred ON audit_events (occurred_at, seq);
CREATE INDEX audit_events_actor ON audit_events (actor, seq);
CREATE INDEX audit_events_action ON audit_events (action, seq);
CREATE INDEX audit_events_scope ON audit_events (scope, seq);
CREATE INDEX audit_events_key ON audit_events (key_id);

-- Append-only: the chain is only as good as the table's refusal to change.
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END;
$$;

CREATE TRIGGER audit_events_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();

CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
