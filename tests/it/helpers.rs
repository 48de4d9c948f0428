//! The integration tests' own helpers; the harness itself (configuration, tokens, the app and
//! the simulator on ephemeral ports) is the shared test kit, `keybroker-testkit`.

pub use keybroker_testkit::*;

use std::path::PathBuf;
use std::sync::Arc;

use keybroker::config::ConfigFile;
use keybroker::store::Store;
use octopus_sim::DEMO_BROKER_API_KEY;
use serde_json::Value;

/// A PostgreSQL schema of its own for one test, dropped when the guard goes.
pub struct PgSchema {
    url: String,
    pub schema: String,
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let schema = self.schema.clone();
        // Drop runs outside async code: use a thread with its own small runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&url).await {
                    // Never hang a test run on a lock some leftover session still holds.
                    let sql = format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {schema} CASCADE");
                    let _ = sqlx::raw_sql(&sql).execute(&pool).await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// The PostgreSQL URL for tests, if any. With `CI` set, PostgreSQL tests may not be skipped.
pub fn postgres_url() -> Option<String> {
    match std::env::var("KEYBROKER_TEST_POSTGRES_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI is set but KEYBROKER_TEST_POSTGRES_URL is not: the PostgreSQL tests must run in CI")
        }
        _ => None,
    }
}

/// A migrated PostgreSQL store in a fresh schema, or `None` when no test database is configured.
pub async fn postgres_store() -> Option<(Arc<dyn Store>, PgSchema)> {
    let url = postgres_url()?;
    let schema = format!("kb_test_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&url).await.expect("KEYBROKER_TEST_POSTGRES_URL must be reachable");
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await.unwrap();
    admin.close().await;
    let guard = PgSchema { url: url.clone(), schema: schema.clone() };
    let store = keybroker::store::PgStore::connect_in_schema(&url, Some(&schema)).await.unwrap();
    store.migrate().await.unwrap();
    Some((Arc::new(store), guard))
}

/// A migrated SQLite store in a temporary folder.
pub async fn sqlite_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = keybroker::store::SqliteStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    (Arc::new(store), dir)
}

/// Keeps a backend's resources alive for a test.
#[allow(dead_code)]
pub enum BackendGuard {
    Sqlite(tempfile::TempDir),
    Postgres(PgSchema),
}

/// Every backend the storage contract runs against: SQLite always, PostgreSQL when configured.
pub async fn backends() -> Vec<(&'static str, Arc<dyn Store>, BackendGuard)> {
    let (sqlite, dir) = sqlite_store().await;
    let mut out = vec![("sqlite", sqlite, BackendGuard::Sqlite(dir))];
    if let Some((pg, guard)) = postgres_store().await {
        out.push(("postgres", pg, BackendGuard::Postgres(guard)));
    }
    out
}

/// A second store on the same database as a backend's first (another replica, or another
/// process on the same SQLite file).
pub async fn second_store(guard: &BackendGuard) -> Arc<dyn Store> {
    match guard {
        BackendGuard::Sqlite(dir) => {
            let url = format!("sqlite://{}", dir.path().join("store.db").display());
            Arc::new(keybroker::store::SqliteStore::connect(&url).await.unwrap())
        }
        BackendGuard::Postgres(pg) => {
            Arc::new(keybroker::store::PgStore::connect_in_schema(&pg.url, Some(&pg.schema)).await.unwrap())
        }
    }
}

/// The `keybroker` binary with `args`, without the test runner's KEYBROKER_* environment.
pub fn keybroker_command(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("KEYBROKER_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// The demo configuration for `octopus_url`, changed by `configure`, in a folder of its own
/// with its secret files.
pub fn config_file(octopus_url: &str, configure: impl FnOnce(&mut ConfigFile)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_secret_files(dir.path());
    let mut file = demo_file(octopus_url, "127.0.0.1:0", &dir.path().join("k.db"));
    configure(&mut file);
    let path = write_file(dir.path(), &file);
    (dir, path)
}

/// A pending record of alice's in payments-deploy, created at `created_at`: what an issuance in
/// flight, or a crash between the Octopus call and activation, leaves behind.
pub async fn stage_pending(app: &TestApp, created_at: chrono::DateTime<chrono::Utc>) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    let key = keybroker::domain::keys::NewKey {
        id,
        scope: keybroker::domain::policy::ScopeName::parse("payments-deploy").unwrap(),
        requester: "alice@example.com".to_owned(),
        purpose: keybroker::domain::policy::Purpose::parse("in flight").unwrap(),
        octopus_user_id: app.sim.user_id("svc-payments-deploy").unwrap(),
        created_at,
        expires_at: created_at + chrono::Duration::days(1),
        max_active: 3,
        idempotency: None,
        requester_teams: vec!["payments".to_owned()],
        requested_by: None,
        ticket: None,
        deadline: None,
    };
    let event = keybroker::domain::audit::NewAuditEvent::new(
        created_at,
        "alice@example.com",
        keybroker::domain::audit::Action::KeyRequested,
        keybroker::domain::audit::Outcome::Success,
        &Default::default(),
    )
    .key(id);
    app.state.keys.store().insert_pending(&key, &event, created_at).await.unwrap();
    id
}

/// An Octopus key carrying record `id`'s marker, made directly with the broker credential (as
/// keybroker would have). Returns its Octopus id.
pub async fn create_marked_key(app: &TestApp, id: uuid::Uuid) -> String {
    let user = app.sim.user_id("svc-payments-deploy").unwrap();
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%S.000+00:00").to_string();
    let res = app
        .http
        .post(format!("{}/api/users/{user}/apikeys", app.sim_url))
        .header("X-Octopus-ApiKey", DEMO_BROKER_API_KEY)
        .json(
            &serde_json::json!({"Purpose": format!("keybroker:{id} alice@example.com: in flight"), "Expires": expires}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    body["Id"].as_str().unwrap().to_owned()
}
