//! The test harness: a keybroker and an Octopus simulator, both on ephemeral ports.

use std::path::PathBuf;
use std::sync::Arc;

use keybroker::api::AppState;
use keybroker::app::App;
use keybroker::config::Config;
use keybroker::dev::{DEV_AUDIENCE, DEV_ISSUER, demo_config_toml, mint_token};
use keybroker::store::Store;
use octopus_sim::{DEMO_BROKER_API_KEY, RunningSimulator, Seed, Simulator};
use serde_json::Value;
use tokio::sync::oneshot;

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef0123456789abcdef";
pub const HMAC_SECRET: &str = "test-hmac-secret-0123456789abcdef0123456789abcdef";

/// Options for [`TestApp::spawn_with`].
pub struct TestOptions {
    pub seed: Seed,
    /// Edits the demo configuration text before it is loaded.
    pub edit_config: Box<dyn FnOnce(String) -> String + Send>,
    /// A store to use instead of the SQLite file (fault-injecting wrappers).
    pub store: Option<Arc<dyn Store>>,
    /// A clock to use instead of the system's.
    pub clock: Option<Arc<dyn keybroker::domain::clock::Clock>>,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self { seed: Seed::demo(), edit_config: Box::new(|c| c), store: None, clock: None }
    }
}

/// A clock that tests move by hand.
pub struct ManualClock(std::sync::Mutex<chrono::DateTime<chrono::Utc>>);

impl ManualClock {
    pub fn starting_now() -> Arc<Self> {
        Arc::new(Self(std::sync::Mutex::new(chrono::Utc::now())))
    }

    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self.0.lock().unwrap();
        *now += by;
    }
}

impl keybroker::domain::clock::Clock for ManualClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        *self.0.lock().unwrap()
    }
}

pub struct TestApp {
    pub url: String,
    pub sim: Simulator,
    pub sim_url: String,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    _running_sim: RunningSimulator,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(TestOptions::default()).await
    }

    pub async fn spawn_with(options: TestOptions) -> Self {
        let sim = Simulator::new(options.seed).expect("seed");
        let running = sim.spawn(([127, 0, 0, 1], 0).into()).await.expect("simulator");
        let sim_url = running.url();
        let dir = tempfile::tempdir().unwrap();
        write_secret_files(dir.path());
        let text = demo_config_toml(&sim_url, "127.0.0.1:0", &dir.path().join("keybroker.db"));
        // The app's own reconciler would race tests that stage pending records; tests run
        // `jobs::reconcile_once` themselves.
        let text = text.replace(
            "[auth]",
            "[jobs]\nreconcile_interval = \"1h\"\nexpiry_sweep_interval = \"1h\"\nwebhook_interval = \"1h\"\n\
             drift_interval = \"1h\"\ncredential_check_interval = \"1h\"\n\n[auth]",
        );
        let text = (options.edit_config)(text);
        let path = dir.path().join("keybroker.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).expect("config");
        let clock = options.clock.unwrap_or_else(|| Arc::new(keybroker::domain::clock::SystemClock));
        let app = App::build_with(config, clock, options.store).await.expect("app").with_config_path(&path);
        let state = app.state.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(app.serve(listener, async move {
            let _ = rx.await;
        }));
        Self {
            url,
            sim,
            sim_url,
            state,
            dir,
            http: reqwest::Client::new(),
            _running_sim: running,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("keybroker.db")
    }

    pub fn token(&self, subject: &str, groups: &[&str]) -> String {
        mint_token(JWT_SECRET, DEV_ISSUER, DEV_AUDIENCE, subject, subject, groups, chrono::Duration::hours(1)).unwrap()
    }

    /// alice, team payments.
    pub fn alice(&self) -> String {
        self.token("alice@example.com", &["payments"])
    }

    /// bob, team web.
    pub fn bob(&self) -> String {
        self.token("bob@example.com", &["web"])
    }

    pub fn auditor(&self) -> String {
        self.token("sam@example.com", &["security"])
    }

    pub fn admin(&self) -> String {
        self.token("root@example.com", &["platform-admins"])
    }

    pub async fn issue(&self, token: &str, body: Value) -> reqwest::Response {
        self.http.post(format!("{}/v1/keys", self.url)).bearer_auth(token).json(&body).send().await.unwrap()
    }

    /// Issues a key and returns the JSON answer, asserting a 201.
    pub async fn issue_ok(&self, token: &str, body: Value) -> Value {
        let res = self.issue(token, body).await;
        let status = res.status();
        let json: Value = res.json().await.unwrap();
        assert_eq!(status, 201, "issuance failed: {json}");
        json
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.url)).bearer_auth(token).send().await.unwrap()
    }

    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.http.delete(format!("{}{path}", self.url)).bearer_auth(token).send().await.unwrap()
    }

    /// Calls the simulator with an Octopus API key, as a pipeline would.
    pub async fn octopus_me(&self, api_key: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/api/users/me", self.sim_url))
            .header("X-Octopus-ApiKey", api_key)
            .send()
            .await
            .unwrap()
    }

    /// Runs the readiness job once (tests do not wait for its interval), then reads `/readyz`
    /// as an admin, who sees every check's detail.
    pub async fn readyz_now(&self) -> reqwest::Response {
        self.state.readiness.refresh(&self.state.keys).await;
        self.http.get(format!("{}/readyz", self.url)).bearer_auth(self.admin()).send().await.unwrap()
    }

    /// Every audit event, oldest first.
    pub async fn audit_events(&self) -> Vec<keybroker::domain::audit::AuditRecord> {
        self.state.keys.store().audit_chain(0, 100_000).await.unwrap()
    }

    /// Keys in the simulator that carry a keybroker marker.
    pub fn keybroker_keys_in_octopus(&self) -> Vec<octopus_sim::SimApiKey> {
        self.sim.api_keys().into_iter().filter(|k| k.purpose.starts_with("keybroker:")).collect()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

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

/// The demo configuration for `octopus_url`, edited, in a folder of its own with its secret files.
pub fn config_file(octopus_url: &str, edit: impl FnOnce(String) -> String) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_secret_files(dir.path());
    let text = demo_config_toml(octopus_url, "127.0.0.1:0", &dir.path().join("k.db"));
    let path = dir.path().join("keybroker.toml");
    std::fs::write(&path, edit(text)).unwrap();
    (dir, path)
}

/// Writes the secret files the demo configuration names into `dir`.
pub fn write_secret_files(dir: &std::path::Path) {
    std::fs::write(dir.join("octopus-api-key"), DEMO_BROKER_API_KEY).unwrap();
    std::fs::write(dir.join("jwt-hs256"), JWT_SECRET).unwrap();
    std::fs::write(dir.join("audit-hmac"), HMAC_SECRET).unwrap();
}

/// A pending record of alice's in payments-deploy, created at `created_at`: what an issuance in
/// flight, or a crash between the Octopus call and activation, leaves behind.
pub async fn stage_pending(app: &TestApp, created_at: chrono::DateTime<chrono::Utc>) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    let key = keybroker::domain::keys::NewKey {
        id,
        scope: "payments-deploy".to_owned(),
        requester: "alice@example.com".to_owned(),
        purpose: "in flight".to_owned(),
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
