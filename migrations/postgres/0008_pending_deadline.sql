-- A pending record carries its issuance's deadline (mirrors migrations/sqlite/0008).
ALTER TABLE key_records ADD COLUMN deadline TIMESTAMPTZ;

-- Set when a revocation starts (before Octopus is asked to delete the key): drift leaves such a
-- record to its revoker, so the person who revoked is the one on record.
ALTER TABLE key_records ADD COLUMN revoking_since TIMESTAMPTZ;
