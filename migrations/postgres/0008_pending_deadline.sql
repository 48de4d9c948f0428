-- A pending record carries its issuance's deadline (mirrors migrations/sqlite/0008).
ALTER TABLE key_records ADD COLUMN deadline TIMESTAMPTZ;
