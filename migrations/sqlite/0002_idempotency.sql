-- Idempotency-Key on POST /v1/keys: a retry with the same key (per requester) and body returns
-- the first request's record instead of issuing a second key.
ALTER TABLE key_records ADD COLUMN idempotency_key TEXT;
ALTER TABLE key_records ADD COLUMN request_hash TEXT;
CREATE UNIQUE INDEX key_records_idempotency ON key_records (requester, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
