//! The command line: `serve`, `dev`, `check-config`, `migrate`, `openapi`, `octopus-sim`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::app::{App, shutdown_signal};
use crate::config::Config;
use crate::telemetry::{self, LogFormat};

/// keybroker: scoped, expiring Octopus Deploy API keys behind one audited door.
#[derive(Debug, Parser)]
#[command(name = "keybroker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk the whole hash chain from its first event (keyed events with audit.chain_key_file),
    /// printing progress; exit 1 at the first broken link.
    Verify {
        #[arg(long, env = "KEYBROKER_CONFIG", default_value = "keybroker.toml")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (secrets come from files or the environment, never from arguments).
    Serve {
        #[arg(long, env = "KEYBROKER_CONFIG", default_value = "keybroker.toml")]
        config: PathBuf,
    },
    /// Run everything locally: an Octopus simulator, a temporary SQLite database, a demo policy
    /// and keybroker; prints tokens and curl commands to try it.
    Dev {
        /// Port for keybroker (an ephemeral one is used if it is taken).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Validate a configuration file and check every scope's Octopus account, then exit.
    CheckConfig {
        #[arg(long, env = "KEYBROKER_CONFIG", default_value = "keybroker.toml")]
        config: PathBuf,
    },
    /// Check a real Octopus Server before going live: version, credential and its expiry, key
    /// limits, rate limits, and every scope's account; exit 1 when a check fails.
    Doctor {
        #[arg(long, env = "KEYBROKER_CONFIG", default_value = "keybroker.toml")]
        config: PathBuf,
        /// Also create a 10-minute key for each scope's account, check that it authenticates as
        /// that account, and delete it.
        #[arg(long)]
        probe_create: bool,
    },
    /// Apply the database migrations, then exit.
    Migrate {
        #[arg(long, env = "KEYBROKER_CONFIG", default_value = "keybroker.toml")]
        config: PathBuf,
    },
    /// The audit trail: `keybroker audit verify` re-verifies every event, with progress.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Print an HS256 token for this configuration's [auth] (bots, docker compose, trials).
    MintToken {
        #[arg(long, env = "KEYBROKER_CONFIG", default_value = "keybroker.toml")]
        config: PathBuf,
        /// The HS256 issuer whose secret signs it (`default`: the single-issuer [auth] form).
        #[arg(long, default_value = "default")]
        issuer: String,
        /// The token's subject (recorded as the requester).
        #[arg(long)]
        sub: String,
        /// A team (repeatable), written to the configured teams claim.
        #[arg(long = "team")]
        teams: Vec<String>,
        /// Lifetime, such as "1h".
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Exit 0 when URL answers 2xx (a container health check for images without curl).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
    /// Run the Octopus Server simulator alone.
    OctopusSim {
        #[arg(long, default_value_t = 8065)]
        port: u16,
        /// A seed file (TOML or JSON); the demo seed when absent.
        #[arg(long)]
        seed: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Openapi = cli.command {
        println!("{}", crate::api::openapi_json());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => serve(&config).await,
        Command::Dev { port } => {
            telemetry::init(LogFormat::from_env(LogFormat::Pretty));
            crate::dev::run(port).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => check_config(&config).await,
        Command::Doctor { config, probe_create } => {
            let config = Config::load(&config)?;
            let rows = crate::doctor::run(&config, probe_create).await?;
            print!("{}", crate::doctor::render(&rows));
            Ok(if crate::doctor::failed(&rows) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Audit { command: AuditCommand::Verify { config } } => audit_verify(&config).await,
        Command::Migrate { config } => migrate(&config).await,
        Command::OctopusSim { port, seed } => {
            telemetry::init(LogFormat::from_env(LogFormat::Pretty));
            octopus_sim::run_standalone(port, seed.as_deref()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::MintToken { config, issuer, sub, teams, ttl } => mint_token(&config, &issuer, &sub, &teams, &ttl),
        Command::Healthcheck { url } => healthcheck(&url).await,
        Command::Openapi => Ok(ExitCode::SUCCESS),
    }
}

async fn serve(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    telemetry::init(LogFormat::from_env(LogFormat::Json));
    let config = Config::load(path)?;
    let listen = config.server.listen;
    let app = App::build(config).await?.with_config_path(path);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    tracing::info!(%listen, "keybroker serving");
    app.serve(listener, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn migrate(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    telemetry::init(LogFormat::from_env(LogFormat::Pretty));
    let config = Config::load(path)?;
    let store = crate::store::connect(config.database.url.expose_secret())
        .await
        .context("cannot open the database (database.url)")?;
    store.migrate().await.context("cannot apply the database migrations")?;
    println!("migrations applied");
    Ok(ExitCode::SUCCESS)
}

/// Mints a token for an HS256 issuer of the configuration (development and tests).
fn mint_token(
    path: &std::path::Path,
    issuer: &str,
    sub: &str,
    teams: &[String],
    ttl: &str,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let entry = config
        .auth
        .issuers
        .iter()
        .find(|i| i.name == issuer)
        .ok_or_else(|| anyhow::anyhow!("no issuer is named `{issuer}` in [auth] or [[auth.issuers]]"))?;
    let secret = entry
        .hs256_secret
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("issuer `{issuer}` has no hs256_secret_file: its tokens come from elsewhere"))?;
    let ttl = crate::domain::policy::parse_ttl(ttl).map_err(anyhow::Error::msg)?;
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "iss": entry.issuer, "aud": entry.audiences[0], "sub": sub, "name": sub,
        "iat": now, "nbf": now - 5, "exp": now + ttl.num_seconds(),
    });
    // A JSON-pointer teams claim names a nested claim only an identity provider writes.
    if let Some(claim) = entry.teams_claim.as_deref().filter(|c| !c.starts_with('/')) {
        claims[claim] = serde_json::json!(teams);
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

async fn healthcheck(url: &str) -> anyhow::Result<ExitCode> {
    let client = crate::outbound::client_builder(&[]).timeout(std::time::Duration::from_secs(3)).build()?;
    match client.get(url).send().await {
        Ok(res) if res.status().is_success() => Ok(ExitCode::SUCCESS),
        Ok(res) => {
            eprintln!("{url} answered {}", res.status());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Validates the file, then asks Octopus about the credential and every scope's account.
async fn check_config(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    // Builds the token verifier too: PEM keys must parse and match the pinned algorithms.
    crate::auth::Authenticator::new(&config.auth)?;
    println!("{}: configuration is valid ({} scopes)", path.display(), config.policy.scopes().len());
    let worst = crate::config::issuance_worst_case(config.octopus.timeout);
    println!(
        "ok    an issuance waits for Octopus at most {} ({}); server.request_timeout is {}",
        humantime::format_duration(worst.total),
        worst.derivation,
        humantime::format_duration(config.server.request_timeout)
    );
    let octopus = crate::octopus::OctopusClient::new(&config.octopus)?;
    let mut problems = 0;
    match octopus.current_user().await {
        Ok(me) => {
            println!("ok    Octopus at {} accepts the credential (signed in as {})", config.octopus.url, me.username)
        }
        Err(e) => {
            println!("FAIL  Octopus at {}: {e}", config.octopus.url);
            return Ok(ExitCode::FAILURE);
        }
    }
    for scope in config.policy.scopes() {
        match octopus.find_user(&scope.octopus_user).await {
            Ok(Some(user)) if user.is_service && user.is_active => match octopus.probe_keys(&user.id).await {
                Ok(()) => println!(
                    "ok    scope {}: {} is {} (an active service account whose keys keybroker may manage)",
                    scope.name, scope.octopus_user, user.id
                ),
                Err(crate::octopus::OctopusError::Credential { status: 403, message }) => {
                    problems += 1;
                    println!(
                        "FAIL  scope {}: Octopus refuses keybroker the keys of {} ({}): {message}\n      \
                         fix: give keybroker's account every permission {} has (Octopus's privilege rule), \
                         or name a less privileged service account",
                        scope.name, scope.octopus_user, user.id, scope.octopus_user
                    );
                }
                Err(e) => {
                    problems += 1;
                    println!(
                        "FAIL  scope {}: cannot list the keys of {} ({}): {e}",
                        scope.name, scope.octopus_user, user.id
                    );
                }
            },
            Ok(Some(user)) if !user.is_service => {
                problems += 1;
                println!("FAIL  scope {}: {} ({}) is not a service account", scope.name, scope.octopus_user, user.id);
            }
            Ok(Some(user)) => {
                problems += 1;
                println!("FAIL  scope {}: {} ({}) is disabled", scope.name, scope.octopus_user, user.id);
            }
            Ok(None) => {
                problems += 1;
                println!("FAIL  scope {}: no Octopus user is named {}", scope.name, scope.octopus_user);
            }
            Err(e) => {
                problems += 1;
                println!("FAIL  scope {}: {e}", scope.name);
            }
        }
    }
    Ok(if problems == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `keybroker audit verify`: every event, in chunks, with a progress line per chunk.
async fn audit_verify(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let store = crate::store::connect(config.database.url.expose_secret())
        .await
        .context("cannot open the database (database.url)")?;
    let key = config.audit.chain_key.clone().map(crate::domain::audit::ChainKey::new);
    if key.is_none() {
        eprintln!("note: audit.chain_key_file is not set; keyed events cannot be checked, plain ones are");
    }
    let watch = crate::services::audit_watch::AuditWatch::new(key);
    let started = std::time::Instant::now();
    let mut checked = 0u64;
    loop {
        let v = watch.verify(store.as_ref(), 50_000).await?;
        checked += v.events_checked;
        if let Some(brk) = &v.first_break {
            println!("BROKEN at event #{} ({}): {}", brk.seq, brk.event_id, brk.reason);
            println!("{checked} events checked before it, in {:.1} s", started.elapsed().as_secs_f64());
            return Ok(ExitCode::FAILURE);
        }
        eprintln!("verified {checked} events (through #{}), {:.1} s", v.last_seq, started.elapsed().as_secs_f64());
        if v.complete {
            println!(
                "OK: {checked} events, head #{} {} ({})",
                v.last_seq,
                v.head_hash,
                if v.keyed { "new events keyed" } else { "not keyed" }
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
}
