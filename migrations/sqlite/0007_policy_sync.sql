-- Policy reloads converge across replicas: each published policy (its version, a hash of its
-- content, and the document itself), newest last; and the version each replica last ran.
CREATE TABLE policy_versions (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    version      TEXT NOT NULL,
    document     TEXT NOT NULL,
    published_at TEXT NOT NULL,
    published_by TEXT NOT NULL
);

CREATE TABLE replica_policies (
    replica TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    seen_at TEXT NOT NULL
);
