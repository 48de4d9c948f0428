//! An Octopus Server simulator, faithful to `shared/octopus-api.md` for everything keybroker
//! touches: users and service accounts, API keys stored only as hashes, paged collections, the
//! cookie login flow, Octopus's error shapes and its key-expiry rules.
//!
//! Tests and dev mode drive it through a [`Simulator`] handle (counters, fault injection,
//! inspection, a movable clock), also reachable over HTTP under `/_sim/`, outside `/api` so it
//! cannot be mistaken for Octopus:
//!
//! | Route | Does |
//! |---|---|
//! | `GET /_sim/counters`, `DELETE /_sim/counters` | requests per `METHOD /route/{template}`; reset |
//! | `GET /_sim/faults`, `POST /_sim/faults`, `DELETE /_sim/faults` | list, inject ([`Fault`] JSON), clear |
//! | `GET /_sim/keys` | every stored key as [`SimApiKey`], never a secret |
//! | `POST /_sim/clock` | `{"advance_secs": N}` moves the simulator's clock |
//!
//! The `/_sim/` routes need no credential: the simulator holds nothing real.

mod error;
mod faults;
mod handlers;
mod seed;
mod state;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use faults::{Fault, FaultKind};
pub use seed::{DEMO_BROKER_API_KEY, Seed, SeedApiKey, SeedError, SeedSyntax, SeedUser, ServerSettings};

use state::{Shared, SimState};

/// A simulated Octopus Server. Cheap to clone: clones share one server.
#[derive(Debug, Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
}

/// A stored API key as tests see it: everything but the secret, which the simulator never keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SimApiKey {
    /// `apikeys-...`.
    pub id: String,
    /// `Users-N` of the owner.
    pub user_id: String,
    pub username: String,
    pub purpose: String,
    pub created: DateTime<Utc>,
    /// `None` for a key that never expires.
    pub expires: Option<DateTime<Utc>>,
    /// The first 8 characters of the key, e.g. `API-ABCD`.
    pub hint: String,
    /// `User` or `AiAgent`.
    pub actor_type: String,
    /// When the key last authenticated a request.
    pub last_used: Option<DateTime<Utc>>,
}

/// A user as tests and the standalone summary see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SimUser {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub is_service: bool,
    pub is_active: bool,
    pub can_edit_users: bool,
    pub has_password: bool,
    /// Made by `extra_users` rather than listed in the seed.
    pub generated: bool,
}

impl Simulator {
    /// Builds a simulator from a seed, hashing its passwords and keys.
    pub fn new(seed: Seed) -> Result<Simulator, SeedError> {
        Ok(Self { shared: Arc::new(Shared::new(&seed)?) })
    }

    /// The simulator's routes, for `tower::ServiceExt::oneshot` or a server of your own.
    pub fn router(&self) -> axum::Router {
        handlers::router(self.shared.clone())
    }

    /// Serves on `addr` (port 0 picks a free port) until the returned handle is dropped or shut
    /// down.
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<RunningSimulator> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(async move {
            // A dropped sender also means stop.
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move { server.await });
        tracing::info!(%addr, "octopus-sim listening");
        Ok(RunningSimulator { simulator: self.clone(), addr, stop: Some(stop), task: Some(task) })
    }

    /// The installation id, which suffixes the login cookie names.
    pub fn installation_id(&self) -> &str {
        &self.shared.installation_id
    }

    /// The settings the simulator runs with.
    pub fn settings(&self) -> &ServerSettings {
        &self.shared.settings
    }

    /// Requests served for one `METHOD /route/{template}`, e.g. `"POST /api/users/{id}/apikeys"`.
    pub fn request_count(&self, key: &str) -> u64 {
        self.shared.lock().counters.get(key).copied().unwrap_or(0)
    }

    /// Every counter.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.shared.lock().counters.clone()
    }

    /// Sets every counter back to zero.
    pub fn reset_counters(&self) {
        self.shared.lock().counters.clear();
    }

    /// Adds a fault; the first matching fault applies to a request.
    pub fn inject(&self, fault: Fault) {
        self.shared.lock().faults.push(faults::ActiveFault::new(fault));
    }

    /// Removes every fault, used up or not.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Every stored key, oldest first.
    pub fn api_keys(&self) -> Vec<SimApiKey> {
        snapshot_keys(&self.shared.lock())
    }

    /// Every user, sorted by username.
    pub fn users(&self) -> Vec<SimUser> {
        let state = self.shared.lock();
        state
            .users()
            .iter()
            .map(|u| SimUser {
                id: u.id.clone(),
                username: u.username.clone(),
                display_name: u.display_name.clone(),
                is_service: u.is_service,
                is_active: u.is_active,
                can_edit_users: u.can_edit_users,
                has_password: u.has_password(),
                generated: u.generated,
            })
            .collect()
    }

    /// The `Users-N` id of a username (case-insensitive).
    pub fn user_id(&self, username: &str) -> Option<String> {
        self.shared.lock().user_by_name(username).map(|u| u.id.clone())
    }

    /// Enables or disables a user; a disabled user's keys and sessions answer 401 at once.
    /// Returns false when there is no such user.
    pub fn set_user_active(&self, username: &str, active: bool) -> bool {
        self.shared.lock().set_user_active(username, active)
    }

    /// Deletes a key as someone in the Octopus portal would; false if it did not exist.
    pub fn delete_api_key_behind_the_back(&self, key_id: &str) -> bool {
        self.shared.lock().remove_key(key_id)
    }

    /// Moves the simulator's clock (real time plus an offset), for expiry tests.
    pub fn advance_clock(&self, by: chrono::Duration) {
        self.shared.lock().advance_clock(by);
    }

    /// The simulator's notion of now.
    pub fn now(&self) -> DateTime<Utc> {
        self.shared.lock().now()
    }
}

fn snapshot_keys(state: &SimState) -> Vec<SimApiKey> {
    state
        .all_keys()
        .into_iter()
        .map(|k| SimApiKey {
            id: k.id.clone(),
            user_id: k.user_id.clone(),
            username: state.user(&k.user_id).map(|u| u.username.clone()).unwrap_or_default(),
            purpose: k.purpose.clone(),
            created: k.created,
            expires: k.expires,
            hint: k.hint.clone(),
            actor_type: k.actor_type.clone(),
            last_used: k.last_used,
        })
        .collect()
}

/// A simulator serving on a local port. Dropping it stops the server.
#[derive(Debug)]
pub struct RunningSimulator {
    simulator: Simulator,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningSimulator {
    /// `http://127.0.0.1:PORT`, without a trailing slash. A wildcard bind address is reported as
    /// loopback, which is where local clients reach it.
    pub fn url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            match self.addr {
                SocketAddr::V4(_) => std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
                SocketAddr::V6(_) => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            }
        } else {
            self.addr.ip()
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The simulator behind the server.
    pub fn simulator(&self) -> &Simulator {
        &self.simulator
    }

    /// Stops accepting, lets open connections finish (at most 5 seconds), and waits.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// `keybroker octopus-sim --port N [--seed FILE]`: serves on all interfaces (so that a container
/// can be reached) until Ctrl-C, with the seed file or the demo seed. Prints the URL and the
/// users and keys, never a secret: the operator has the seed file (and the demo key is
/// [`DEMO_BROKER_API_KEY`]).
pub async fn run_standalone(port: u16, seed_path: Option<&Path>) -> anyhow::Result<()> {
    let seed = match seed_path {
        Some(path) => Seed::from_file(path)?,
        None => Seed::demo(),
    };
    let simulator = Simulator::new(seed)?;
    let running = simulator.spawn(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await?;
    println!("{}", summary(&simulator, &running.url(), seed_path));
    tokio::signal::ctrl_c().await?;
    println!("Stopping the Octopus simulator.");
    running.shutdown().await;
    Ok(())
}

/// The standalone banner: URL, settings, seeded users (generated ones only counted) and keys.
fn summary(simulator: &Simulator, url: &str, seed_path: Option<&Path>) -> String {
    use std::fmt::Write as _;
    let settings = simulator.settings();
    let days = |d: Option<u32>| d.map_or_else(|| "unset".to_owned(), |d| format!("{d} days"));
    let mut out = String::new();
    let source = seed_path.map_or_else(|| "the demo seed".to_owned(), |p| p.display().to_string());
    let _ = writeln!(out, "Octopus simulator {} at {url} (from {source})", settings.version);
    let _ = writeln!(
        out,
        "  key expiry: default {}, max {}; user API keys {}",
        days(settings.api_key_default_expiry_days),
        days(settings.api_key_max_expiry_days),
        if settings.user_api_keys_enabled { "enabled" } else { "disabled" }
    );
    let users = simulator.users();
    let generated = users.iter().filter(|u| u.generated).count();
    let _ = writeln!(out, "  users ({} seeded, {generated} generated):", users.len() - generated);
    for user in users.iter().filter(|u| !u.generated) {
        let mut traits = vec![if user.is_service { "service account" } else { "user" }];
        if !user.is_active {
            traits.push("inactive");
        }
        if user.can_edit_users {
            traits.push("UserEdit");
        }
        if user.has_password {
            traits.push("password");
        }
        let _ = writeln!(out, "    {:<10} {:<28} {}", user.id, user.username, traits.join(", "));
    }
    let keys = simulator.api_keys();
    let _ = writeln!(out, "  API keys ({}):", keys.len());
    for key in keys {
        let expires = key.expires.map_or_else(|| "never".to_owned(), wire::format_date);
        let _ = writeln!(out, "    {}•••• {:<28} expires {expires}: {}", key.hint, key.username, key.purpose);
    }
    let _ = write!(out, "  test hooks: {url}/_sim/counters, /_sim/faults, /_sim/keys, /_sim/clock");
    out
}
