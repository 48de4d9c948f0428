-- Each requester's pending and active records per scope, kept by triggers, so that the limit
-- check on the issuance path reads one row instead of counting the requester's records. It is an
-- upper bound of what the limit counts (a record past its expiry stays here until the expiry
-- job marks it expired); the check counts exactly when the bound comes near the limit.
CREATE TABLE key_holdings (
    requester TEXT    NOT NULL,
    scope     TEXT    NOT NULL,
    held      INTEGER NOT NULL,
    PRIMARY KEY (requester, scope)
) WITHOUT ROWID;

INSERT INTO key_holdings (requester, scope, held)
    SELECT requester, scope, COUNT(*) FROM key_records WHERE state IN ('pending', 'active')
    GROUP BY requester, scope;

CREATE TRIGGER key_holdings_on_insert AFTER INSERT ON key_records
WHEN NEW.state IN ('pending', 'active')
BEGIN
    INSERT INTO key_holdings (requester, scope, held) VALUES (NEW.requester, NEW.scope, 1)
        ON CONFLICT (requester, scope) DO UPDATE SET held = held + 1;
END;

CREATE TRIGGER key_holdings_on_state AFTER UPDATE OF state ON key_records
WHEN (OLD.state IN ('pending', 'active')) <> (NEW.state IN ('pending', 'active'))
BEGIN
    INSERT INTO key_holdings (requester, scope, held)
        VALUES (NEW.requester, NEW.scope, CASE WHEN NEW.state IN ('pending', 'active') THEN 1 ELSE -1 END)
        ON CONFLICT (requester, scope) DO UPDATE SET held = held + excluded.held;
END;

-- Records are never deleted and never change requester or scope; refuse it rather than let the
-- holdings drift.
CREATE TRIGGER key_records_no_delete BEFORE DELETE ON key_records
BEGIN
    SELECT RAISE(ABORT, 'key_records are never deleted');
END;

CREATE TRIGGER key_records_owner_fixed BEFORE UPDATE OF requester, scope ON key_records
WHEN NEW.requester IS NOT OLD.requester OR NEW.scope IS NOT OLD.scope
BEGIN
    SELECT RAISE(ABORT, 'a key record keeps its requester and scope');
END;
