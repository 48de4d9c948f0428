//! keybroker's test kit, shared by the integration tests (`tests/it`) and the benchmark
//! (`benches`): the demo configuration, typed (tests change a field of it, never its text), the
//! secret files it names, tokens, a clock moved by hand, and an Octopus simulator with a
//! keybroker in front of it on ephemeral ports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod load;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keybroker::api::AppState;
use keybroker::app::App;
use keybroker::config::{Config, ConfigFile, HumanDuration, RawAuth, RawOctopus, RawScope};
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
    /// Changes the demo configuration, typed, before it is validated and loaded.
    pub configure: Box<dyn FnOnce(&mut ConfigFile) + Send>,
    /// A store to use instead of the SQLite file (fault-injecting wrappers).
    pub store: Option<Arc<dyn Store>>,
    /// A clock to use instead of the system's.
    pub clock: Option<Arc<dyn keybroker::domain::clock::Clock>>,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self { seed: Seed::demo(), configure: Box::new(|_| {}), store: None, clock: None }
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
        let mut file = demo_file(&sim_url, "127.0.0.1:0", &dir.path().join("keybroker.db"));
        // The app's own reconciler would race tests that stage pending records; tests run
        // `jobs::reconcile_once` themselves.
        let hour = Duration::from_secs(3600).into();
        file.jobs.reconcile_interval = hour;
        file.jobs.expiry_sweep_interval = hour;
        file.jobs.webhook_interval = hour;
        file.jobs.drift_interval = hour;
        file.jobs.credential_check_interval = hour;
        (options.configure)(&mut file);
        // Written out and loaded as `serve` would load it (and as a reload reads it again).
        let path = write_file(dir.path(), &file);
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
        token(subject, groups)
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

/// A token of the demo configuration's `[auth]` (HS256, an hour) for `subject` in `groups`.
pub fn token(subject: &str, groups: &[&str]) -> String {
    token_for(subject, groups, chrono::Duration::hours(1))
}

/// [`token`] with another lifetime.
pub fn token_for(subject: &str, groups: &[&str], ttl: chrono::Duration) -> String {
    mint_token(JWT_SECRET, DEV_ISSUER, DEV_AUDIENCE, subject, subject, groups, ttl).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The configuration, typed.

/// The demo configuration (`keybroker dev`'s, with HS256 test tokens), typed: tests change its
/// fields, never its text.
pub fn demo_file(octopus_url: &str, listen: &str, db: &Path) -> ConfigFile {
    ConfigFile::from_toml(&demo_config_toml(octopus_url, listen, db)).expect("the demo configuration parses")
}

/// Writes `file` as `keybroker.toml` in `dir`; returns its path.
pub fn write_file(dir: &Path, file: &ConfigFile) -> PathBuf {
    let path = dir.join("keybroker.toml");
    std::fs::write(&path, file.to_toml().unwrap()).unwrap();
    path
}

/// The demo's `[auth]`.
pub fn auth(file: &mut ConfigFile) -> &mut RawAuth {
    file.auth.as_mut().expect("the demo configuration has [auth]")
}

/// The demo's `[octopus]`.
pub fn octopus(file: &mut ConfigFile) -> &mut RawOctopus {
    file.octopus.as_mut().expect("the demo configuration has [octopus]")
}

/// The demo's scope `name`.
pub fn scope<'a>(file: &'a mut ConfigFile, name: &str) -> &'a mut RawScope {
    file.scopes.iter_mut().find(|s| s.name == name).unwrap_or_else(|| panic!("the demo has no scope {name}"))
}

/// New entries written as TOML in a test (`[[entries]]` tables), parsed into their type: a
/// misspelt key is an error, where an edit of the demo's text that matches nothing would pass.
pub fn entries<T: serde::de::DeserializeOwned>(toml_text: &str) -> Vec<T> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entries<T> {
        entries: Vec<T>,
    }
    let parsed: Entries<T> = toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}\n{toml_text}"));
    parsed.entries
}

/// A duration for a configuration field.
pub fn secs(n: u64) -> HumanDuration {
    Duration::from_secs(n).into()
}

/// For the tests of the file's own text (values a type cannot hold): replaces `from`, which must
/// occur exactly once, so that a change to the demo's text fails the test instead of making the
/// edit a silent no-op.
pub fn edit_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "expected exactly one {from:?} in:\n{text}");
    text.replacen(from, to, 1)
}

/// Writes the secret files the demo configuration names into `dir`.
pub fn write_secret_files(dir: &Path) {
    std::fs::write(dir.join("octopus-api-key"), DEMO_BROKER_API_KEY).unwrap();
    std::fs::write(dir.join("jwt-hs256"), JWT_SECRET).unwrap();
    std::fs::write(dir.join("audit-hmac"), HMAC_SECRET).unwrap();
}
