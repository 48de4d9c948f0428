-- Policy reloads converge across replicas: each published policy (its version, a hash of its
-- content, and the document itself), newest last; and the version each replica last ran.
CREATE TABLE policy_versions (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version      TEXT NOT NULL,
    document     TEXT NOT NULL,
    published_at TIMESTAMPTZ NOT NULL,
    published_by TEXT NOT NULL
);

CREATE TABLE replica_policies (
    replica TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL
);
