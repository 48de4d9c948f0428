-- keybroker on PostgreSQL with two roles: the owner applies the migrations, the runtime role
-- serves and may not change the audit trail (no UPDATE, DELETE or TRUNCATE on audit_events, and,
-- not owning it, no ALTER TABLE ... DISABLE TRIGGER or DROP TRIGGER on it either).
--
-- Part 1, once, as a superuser (edit the names first):
--     psql -v ON_ERROR_STOP=1 -f deploy/postgres-roles.sql   # runs part 1 only; part 2 is commented
-- Then, as the owner, at every upgrade:
--     KEYBROKER_DATABASE__URL=postgres://keybroker_owner@db/keybroker keybroker migrate
-- Then part 2, as the owner (again after an upgrade that adds tables), and serve as the runtime
-- role with [database] run_migrations = false.

-- Part 1: the roles and the database.
CREATE ROLE keybroker_owner LOGIN;
CREATE ROLE keybroker_app LOGIN;
CREATE DATABASE keybroker OWNER keybroker_owner;

-- Part 2: the runtime role's grants, after `keybroker migrate` (run these as keybroker_owner):
--   GRANT USAGE ON SCHEMA public TO keybroker_app;
--   GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO keybroker_app;
--   REVOKE UPDATE ON audit_events FROM keybroker_app;
--   GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO keybroker_app;
