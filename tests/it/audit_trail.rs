//! The audit trail against someone with access to the database: deleting the newest events,
//! rewriting events, and (on PostgreSQL) a runtime role that cannot change the trail at all.

use serde_json::{Value, json};
use sqlx::Connection;

use keybroker::store::Store;

use crate::helpers::{TestApp, TestOptions, keybroker_command, postgres_store, postgres_url};

const CHAIN_KEY: &str = "chain-key-for-tests-0123456789abcdef0123456789";

async fn verify(app: &TestApp) -> Value {
    let res = app.get("/v1/audit/verify", &app.auditor()).await;
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn publish(app: &TestApp) -> i64 {
    let keys = &app.state.keys;
    let head = app.state.audit.publish(keys.store().as_ref(), keys.metrics(), &[], keys.now()).await.unwrap();
    head.unwrap().seq
}

/// A connection to the app's SQLite file that behaves like an intruder: the append-only
/// triggers dropped first.
async fn intruder(app: &TestApp) -> sqlx::SqliteConnection {
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", app.db_path().display())).await.unwrap();
    for sql in ["DROP TRIGGER audit_events_no_update", "DROP TRIGGER audit_events_no_delete"] {
        sqlx::query(sql).execute(&mut db).await.unwrap();
    }
    db
}

async fn some_events(app: &TestApp) {
    for i in 0..3 {
        app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": format!("trail {i}")})).await;
    }
}

#[tokio::test]
async fn deleting_the_newest_events_is_reported_once_their_head_was_published() {
    let app = TestApp::spawn().await;
    some_events(&app).await;
    let published = publish(&app).await;
    let first = verify(&app).await;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!((first["keyed"].as_bool(), first["published_seq"].as_i64()), (Some(false), Some(published)));
    let metrics = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(&format!("keybroker_audit_head_seq {published}")), "the head is a metric");

    // Incremental: the next call checks only what is new.
    app.issue_ok(&app.alice(), json!({"scope": "reporting-readonly", "purpose": "one more"})).await;
    let second = verify(&app).await;
    assert_eq!(second["ok"], true, "{second}");
    assert_eq!(second["from_seq"], first["last_seq"]);
    assert!(second["events_checked"].as_u64().unwrap() < first["events_checked"].as_u64().unwrap());

    // Behind keybroker's back: the newest events go. What is left is a valid chain.
    let mut db = intruder(&app).await;
    sqlx::query("DELETE FROM audit_events WHERE seq > ?").bind(published - 3).execute(&mut db).await.unwrap();
    let report = verify(&app).await;
    assert_eq!(report["ok"], false, "{report}");
    let reason = report["first_break"]["reason"].as_str().unwrap();
    assert!(reason.contains("deleted"), "{reason}");
    // It stays reported, and the head published before is not replaced by the shorter one.
    assert_eq!(verify(&app).await["ok"], false, "a break is never forgotten");
    assert_eq!(publish(&app).await, published, "the published head does not go back");
}

#[tokio::test]
async fn a_head_that_went_back_before_anyone_verified_is_not_published() {
    let app = TestApp::spawn().await;
    some_events(&app).await;
    let published = publish(&app).await;
    let mut db = intruder(&app).await;
    sqlx::query("DELETE FROM audit_events WHERE seq > ?").bind(published - 2).execute(&mut db).await.unwrap();
    assert_eq!(publish(&app).await, published, "the earlier head stands");
    let report = verify(&app).await;
    assert_eq!(report["ok"], false, "{report}");
}

#[tokio::test]
async fn a_keyed_chain_cannot_be_rewritten_without_its_key() {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("chain-key");
    std::fs::write(&key_file, CHAIN_KEY).unwrap();
    let app = TestApp::spawn_with(TestOptions {
        configure: Box::new(move |f| f.audit.chain_key_file = Some(key_file)),
        ..Default::default()
    })
    .await;
    some_events(&app).await;
    let events = app.audit_events().await;
    assert!(events.iter().all(|e| e.hash.starts_with("hmac:")), "every event is keyed");
    let report = verify(&app).await;
    assert_eq!((report["ok"].as_bool(), report["keyed"].as_bool()), (Some(true), Some(true)), "{report}");

    // An intruder edits an event and recomputes its hash and the next one's link the only way
    // they can: with plain SHA-256.
    let mut db = intruder(&app).await;
    let target = &events[events.len() - 2];
    let mut forged = target.clone();
    forged.actor = "mallory".to_owned();
    forged.hash = "unkeyed".to_owned();
    let plain = forged.recompute_hash(None).unwrap();
    sqlx::query("UPDATE audit_events SET actor = 'mallory', hash = ? WHERE seq = ?")
        .bind(&plain)
        .bind(target.seq)
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_events SET prev_hash = ? WHERE seq = ?")
        .bind(&plain)
        .bind(target.seq + 1)
        .execute(&mut db)
        .await
        .unwrap();
    // A fresh process verifies from the start.
    let watch = keybroker::services::audit_watch::AuditWatch::new(Some(keybroker::domain::audit::ChainKey::new(
        CHAIN_KEY.to_owned().into(),
    )));
    let v = watch.verify(app.state.keys.store().as_ref(), 1_000_000).await.unwrap();
    let brk = v.first_break.expect("the rewrite is found");
    assert_eq!(brk.seq, target.seq);
    assert!(brk.reason.contains("unkeyed event follows keyed ones"), "{}", brk.reason);

    // The command line walks everything too, and exits 1.
    let out =
        keybroker_command(&["audit", "verify", "--config", app.dir.path().join("keybroker.toml").to_str().unwrap()])
            .output()
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("BROKEN at event #"), "{stdout}");
}

#[tokio::test]
async fn the_command_line_verifies_every_event_with_progress() {
    let app = TestApp::spawn().await;
    some_events(&app).await;
    let out =
        keybroker_command(&["audit", "verify", "--config", app.dir.path().join("keybroker.toml").to_str().unwrap()])
            .output()
            .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("OK: "), "{stdout}");
    assert!(stderr.contains("verified ") && stderr.contains("audit.chain_key_file is not set"), "{stderr}");
}

#[tokio::test]
async fn on_postgresql_a_runtime_role_serves_but_cannot_change_the_trail() {
    let Some(url) = postgres_url() else { return };
    let (_owner_store, guard) = postgres_store().await.unwrap();
    let schema = guard.schema.clone();
    let role = format!("kb_rt_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    for sql in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {role}"),
        format!("REVOKE UPDATE ON {schema}.audit_events FROM {role}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}"),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.unwrap();
    }
    let mut runtime_url = url::Url::parse(&url).unwrap();
    runtime_url.set_username(&role).unwrap();
    runtime_url.set_password(None).unwrap();
    let runtime = keybroker::store::PgStore::connect_in_schema(runtime_url.as_str(), Some(&schema)).await.unwrap();
    runtime.check_migrated().await.expect("the owner's migrations are all there");

    // keybroker works as that role...
    let app =
        TestApp::spawn_with(TestOptions { store: Some(std::sync::Arc::new(runtime)), ..Default::default() }).await;
    app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "as the runtime role"})).await;
    assert_eq!(verify(&app).await["ok"], true);

    // ...and that role cannot change the trail, nor switch its protections off.
    let mut as_runtime = sqlx::PgConnection::connect(runtime_url.as_str()).await.unwrap();
    sqlx::query(&format!("SET search_path = {schema}")).execute(&mut as_runtime).await.unwrap();
    for sql in [
        "DELETE FROM audit_events",
        "UPDATE audit_events SET actor = 'mallory'",
        "TRUNCATE audit_events",
        "ALTER TABLE audit_events DISABLE TRIGGER ALL",
        "DROP TRIGGER audit_events_no_update_or_delete ON audit_events",
    ] {
        let err = sqlx::query(sql).execute(&mut as_runtime).await.expect_err(sql).to_string();
        assert!(err.contains("permission denied") || err.contains("must be owner"), "{sql}: {err}");
    }
    drop(as_runtime);
    app.stop().await;
    drop(guard);
    for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        let _ = sqlx::query(&sql).execute(&mut admin).await;
    }
}

#[tokio::test]
async fn removing_the_keyed_events_leaves_plain_history_that_is_reported() {
    // Events from before the key, then the key set (as a restart with audit.chain_key_file does).
    let app = TestApp::spawn().await;
    some_events(&app).await;
    let key = keybroker::domain::audit::ChainKey::new(CHAIN_KEY.to_owned().into());
    app.state.keys.store().set_chain_key(key.clone());
    app.issue_ok(&app.alice(), json!({"scope": "reporting-readonly", "purpose": "keyed"})).await;
    let watch = keybroker::services::audit_watch::AuditWatch::new(Some(key.clone()));
    assert_eq!(watch.verify(app.state.keys.store().as_ref(), 1_000_000).await.unwrap().first_break, None);

    // The keyed events go; what is left is a valid plain chain.
    let mut db = intruder(&app).await;
    sqlx::query("DELETE FROM audit_events WHERE hash LIKE 'hmac:%'").execute(&mut db).await.unwrap();
    let fresh = keybroker::services::audit_watch::AuditWatch::new(Some(key));
    let v = fresh.verify(app.state.keys.store().as_ref(), 1_000_000).await.unwrap();
    let reason = v.first_break.expect("reported").reason;
    assert!(reason.contains("newest event is not keyed"), "{reason}");
}
