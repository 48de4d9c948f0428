-- A pending record carries its issuance's deadline: the reconciler takes only records past it,
-- so it never finishes an issuance that is still running.
ALTER TABLE key_records ADD COLUMN deadline TEXT;

-- Set when a revocation starts (before Octopus is asked to delete the key): drift leaves such a
-- record to its revoker, so the person who revoked is the one on record.
ALTER TABLE key_records ADD COLUMN revoking_since TEXT;
