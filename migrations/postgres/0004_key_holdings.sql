-- Each requester's pending and active records per scope, kept by a trigger, so that the limit
-- check on the issuance path reads one row instead of counting the requester's records. It is an
-- upper bound of what the limit counts (a record past its expiry stays here until the expiry
-- job marks it expired); the check counts exactly when the bound comes near the limit.
CREATE TABLE key_holdings (
    requester TEXT   NOT NULL,
    scope     TEXT   NOT NULL,
    held      BIGINT NOT NULL,
    PRIMARY KEY (requester, scope)
);

INSERT INTO key_holdings (requester, scope, held)
    SELECT requester, scope, COUNT(*) FROM key_records WHERE state IN ('pending', 'active')
    GROUP BY requester, scope;

CREATE FUNCTION key_holdings_track() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    change BIGINT := 0;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state IN ('pending', 'active') THEN
            change := 1;
        END IF;
    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW.requester IS DISTINCT FROM OLD.requester OR NEW.scope IS DISTINCT FROM OLD.scope THEN
            RAISE EXCEPTION 'a key record keeps its requester and scope';
        END IF;
        IF (OLD.state IN ('pending', 'active')) <> (NEW.state IN ('pending', 'active')) THEN
            change := CASE WHEN NEW.state IN ('pending', 'active') THEN 1 ELSE -1 END;
        END IF;
    ELSE
        RAISE EXCEPTION 'key_records are never deleted';
    END IF;
    IF change <> 0 THEN
        INSERT INTO key_holdings (requester, scope, held) VALUES (NEW.requester, NEW.scope, change)
            ON CONFLICT (requester, scope) DO UPDATE SET held = key_holdings.held + EXCLUDED.held;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER key_holdings_track AFTER INSERT OR UPDATE OF state, requester, scope OR DELETE ON key_records
    FOR EACH ROW EXECUTE FUNCTION key_holdings_track();
