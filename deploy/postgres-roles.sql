-- keybroker on PostgreSQL with two roles: the owner applies the migrations, the runtime role
-- serves and may not change the audit trail (no UPDATE, DELETE or TRUNCATE on audit_events, and,
-- not owning it, no ALTER TABLE ... DISABLE TRIGGER or DROP TRIGGER on it either).
--
--   1. As a superuser, once:                psql -f deploy/postgres-roles.sql  (edit the names first)
--   2. As the owner, at every upgrade:       KEYBROKER_DATABASE__URL=postgres://keybroker_owner@db/keybroker keybroker migrate
--   3. Then, as the owner, the grants below (again after an upgrade adds tables).
--   4. Serve as the runtime role, with [database] run_migrations = false.

CREATE ROLE keybroker_owner LOGIN;
CREATE ROLE keybroker_app LOGIN;
-- CREATE DATABASE keybroker OWNER keybroker_owner;

-- As keybroker_owner, after `keybroker migrate`:
GRANT USAGE ON SCHEMA public TO keybroker_app;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO keybroker_app;
REVOKE UPDATE ON audit_events FROM keybroker_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO keybroker_app;
