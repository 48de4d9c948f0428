-- A pending record carries its issuance's deadline: the reconciler takes only records past it,
-- so it never finishes an issuance that is still running.
ALTER TABLE key_records ADD COLUMN deadline TEXT;
