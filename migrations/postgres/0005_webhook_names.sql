-- The outbox names a webhook by its configured `name`, never by its URL (which often carries a
-- token). keybroker rewrites the URLs of existing rows to their webhook's name at start.
ALTER TABLE webhook_deliveries RENAME COLUMN webhook_url TO webhook;
