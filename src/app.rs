//! Wiring: from a validated [`Config`] to a running service.

use std::sync::Arc;

use anyhow::Context;
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::domain::audit::{Action, NewAuditEvent, Outcome, RequestContext};
use crate::domain::clock::{Clock, SystemClock};
use crate::metrics::Metrics;
use crate::octopus::OctopusClient;
use crate::services::issuance::KeyService;
use crate::services::reload::ReloadError;
use crate::store::{self, Store};

/// Everything a running keybroker holds.
pub struct App {
    pub state: AppState,
    pub config: Config,
}

impl App {
    /// Connects the store (applying migrations), builds the Octopus client and the
    /// authenticator, and reads Octopus's key limits (a failure there is logged; `/readyz`
    /// reports it and the limits are retried in the background).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with(config, Arc::new(SystemClock), None).await
    }

    /// Like [`App::build`], with a chosen clock and, optionally, a store (tests use both).
    pub async fn build_with(
        config: Config,
        clock: Arc<dyn Clock>,
        store: Option<Arc<dyn Store>>,
    ) -> anyhow::Result<Self> {
        let store = match store {
            Some(store) => store,
            None => open_store(&config).await?,
        };
        // Before the first append (config.loaded below): every new event is keyed from here.
        let chain_key = key_the_chain(&config, store.as_ref()).await?;
        let audit = Arc::new(crate::services::audit_watch::AuditWatch::new(chain_key));
        let metrics = Metrics::new();
        let octopus = OctopusClient::with_metrics(&config.octopus, metrics.clone())
            .context("cannot build the Octopus HTTP client")?;
        let auth = Authenticator::new(&config.auth).map_err(|e| anyhow::anyhow!(e))?;
        let keys = Arc::new(
            KeyService::new(store, octopus, clock, config.policy.clone(), config.audit.hmac_secret.clone(), metrics)
                .with_deadlines(config.server.request_timeout, config.octopus.timeout),
        );
        read_upstream_limits(&keys).await;
        // The first readiness verdict, so /readyz answers truthfully from the start; it also
        // resolves every scope's account into the cache.
        let readiness = Arc::new(crate::services::readiness::Readiness::new(config.jobs.readiness_interval));
        readiness.refresh(&keys).await;
        crate::services::webhooks::adopt_names(&keys, &config.webhooks)
            .await
            .context("cannot name the webhook outbox's rows")?;
        audit_config_loaded(&keys, &config).await?;
        keys.set_scope_removal(config.on_scope_removed);
        // The policy in force across replicas wins over this file (see PolicySync::start).
        let policy_sync = Arc::new(crate::services::policy_sync::PolicySync::new());
        policy_sync.start(&keys, config.modified_at).await.context("cannot read or publish the policy in force")?;
        let rate_limits = Arc::new(crate::api::ratelimit::RateLimits::new(config.server.rate_limit_per_minute));
        let denials = Arc::new(crate::services::denials::DenialAudit::new(keys.clone()));
        let tickets = Arc::new(crate::services::tickets::TicketService::new(
            keys.clone(),
            crate::services::tickets::TicketSettings {
                delegate_teams: config.auth.delegate_teams.clone(),
                lifetime: config.tickets.lifetime,
                request_timeout: config.server.request_timeout,
                public_url: config.server.public_url.clone(),
                webhooks: config.webhooks.clone(),
            },
            denials.clone(),
        ));
        let state = AppState::new(crate::api::Shared {
            keys,
            auth: Arc::new(auth),
            reloader: None,
            rate_limits,
            denials,
            readiness,
            tickets,
            ui: page(&config)?,
            audit,
            policy_sync,
            policy_sync_interval: config.jobs.policy_sync_interval,
        });
        Ok(Self { state, config })
    }

    /// Remembers where the configuration came from, so it can be reloaded (SIGHUP,
    /// `POST /v1/admin/reload`).
    pub fn with_config_path(mut self, path: &std::path::Path) -> Self {
        self.state.shared_mut().reloader =
            Some(Arc::new(crate::services::reload::Reloader::new(path, self.state.policy_sync.clone())));
        self
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone(), &self.config.server)
    }

    /// Serves on `listener` until `shutdown` completes, then lets in-flight requests finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let mut jobs = crate::services::jobs::spawn_all(
            self.state.keys.clone(),
            &self.config.jobs,
            &self.config.webhooks,
            self.state.readiness.clone(),
        )?;
        if let Some(reloader) = self.state.reloader.clone() {
            jobs.push(spawn_sighup_reload(self.state.keys.clone(), reloader));
        }
        let (sync, keys, interval) =
            (self.state.policy_sync.clone(), self.state.keys.clone(), self.config.jobs.policy_sync_interval);
        jobs.push(tokio::spawn(async move {
            // Every replica: a reload through another one reaches this one within the interval.
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                if let Err(e) = sync.sync_once(&keys).await {
                    tracing::warn!(error = %e, "cannot check the database for a newer policy");
                }
            }
        }));
        let (audit, keys) = (self.state.audit.clone(), self.state.keys.clone());
        let (head_interval, webhooks) = (self.config.audit.head_interval, self.config.webhooks.clone());
        jobs.push(tokio::spawn(async move {
            // Every replica publishes what it sees: the head leaves the database on an interval.
            let mut tick = tokio::time::interval(head_interval);
            loop {
                tick.tick().await;
                if let Err(e) = audit.publish(keys.store().as_ref(), keys.metrics(), &webhooks, keys.now()).await {
                    tracing::warn!(error = %e, "cannot read the audit trail's head");
                }
            }
        }));
        let tickets = self.state.tickets.clone();
        let sweep = self.config.jobs.expiry_sweep_interval;
        jobs.push(tokio::spawn(async move {
            // Unleased: ending a ticket is conditional on its state, so replicas cannot do it twice.
            let mut tick = tokio::time::interval(sweep);
            loop {
                tick.tick().await;
                match tickets.expire_due().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(expired = n, "tickets expired"),
                    Err(e) => tracing::warn!(error = %e, "cannot expire tickets"),
                }
            }
        }));
        let state = self.state.clone();
        jobs.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::services::denials::WINDOW);
            loop {
                tick.tick().await;
                state.rate_limits.forget_idle();
                state.denials.flush().await;
            }
        }));
        let limits = crate::server::Limits {
            max_connections: self.config.server.max_connections,
            header_read_timeout: self.config.server.header_read_timeout,
            write_stall_timeout: self.config.server.request_timeout,
            // Requests in flight (an issuance included) get their own timeout to finish.
            shutdown_grace: self.config.server.request_timeout + std::time::Duration::from_secs(5),
        };
        let result = crate::server::serve(listener, self.router(), limits, shutdown).await;
        for job in jobs {
            job.abort();
        }
        self.state.keys.store().close().await;
        tracing::info!("stopped: requests finished, jobs stopped, database closed");
        result.context("the HTTP server failed")
    }
}

/// Reloads the policy on SIGHUP.
fn spawn_sighup_reload(
    keys: Arc<KeyService>,
    reloader: Arc<crate::services::reload::Reloader>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the policy");
                // A reload logs its own outcome and a refused file; what it cannot audit is logged here.
                if let Err(e @ ReloadError::Audit(_)) =
                    reloader.reload(&keys, "keybroker (SIGHUP)", &RequestContext::default()).await
                {
                    tracing::error!(error = %e, "SIGHUP: the policy was not reloaded");
                }
            }
        }
        #[cfg(not(unix))]
        let _ = (keys, reloader);
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

/// Opens the database and applies the migrations (or, for a runtime role that may not, checks
/// they were applied).
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store =
        store::connect(config.database.url.expose_secret()).await.context("cannot open the database (database.url)")?;
    if config.database.run_migrations {
        store.migrate().await.context("cannot apply the database migrations")?;
    } else {
        store.check_migrated().await.context("the database schema is not current")?;
    }
    Ok(store)
}

/// Keys the audit chain with `audit.chain_key_file`, or says what a plain chain protects
/// against; a keyless process refuses a database whose chain is keyed.
async fn key_the_chain(config: &Config, store: &dyn Store) -> anyhow::Result<Option<crate::domain::audit::ChainKey>> {
    let chain_key = config.audit.chain_key.clone().map(crate::domain::audit::ChainKey::new);
    if let Some(key) = &chain_key {
        store.set_chain_key(key.clone());
        tracing::info!("audit chain: new events are keyed with HMAC-SHA256 under audit.chain_key_file");
        return Ok(chain_key);
    }
    let newest = store
        .list_audit(&Default::default(), crate::store::PageRequest { before_seq: None, limit: 1 })
        .await
        .context("cannot read the audit trail")?;
    if newest.first().is_some_and(crate::domain::audit::AuditRecord::is_keyed) {
        anyhow::bail!(
            "audit.chain_key_file: required: this database's audit chain is keyed, and a replica without the key \
             could append nothing to it"
        );
    }
    tracing::warn!(
        "audit chain: audit.chain_key_file is not set, so events are chained with plain SHA-256. That detects \
         edits by anyone who does not recompute the hashes, not by someone who can write the database; the \
         published head (log, metric, webhook) still shows deleted newest events. Set audit.chain_key_file (32+ \
         bytes, not the identify secret) to key the chain"
    );
    Ok(None)
}

/// Reads Octopus's key limits; a failure is logged, `/readyz` reports it and it is retried.
async fn read_upstream_limits(keys: &KeyService) {
    match keys.refresh_upstream_limits().await {
        Ok(limits) => {
            keys.metrics().credential_expiry.set(limits.broker_key_expires.map_or(0, |t| t.timestamp()));
            tracing::info!(
                server_max_days = ?limits.server_max_days,
                broker_key_expires = ?limits.broker_key_expires,
                "read Octopus's API key limits"
            );
        }
        Err(e) => tracing::warn!(error = %e, "could not read Octopus's API key limits; will retry"),
    }
}

async fn audit_config_loaded(keys: &KeyService, config: &Config) -> anyhow::Result<()> {
    let loaded =
        NewAuditEvent::new(keys.now(), "keybroker", Action::ConfigLoaded, Outcome::Success, &RequestContext::default())
            .detail(json!({
                "scopes": keys.policy().scopes().iter().map(|s| s.name.to_string()).collect::<Vec<_>>(),
                "octopus_url": config.octopus.url.as_str(),
            }));
    keys.audit(loaded).await.context("cannot write the audit trail")
}

/// The page, with `[ui]`. Its provider is one of the trusted issuers (checked at load), whose
/// `ca_file` serves for the discovery fetch.
fn page(config: &Config) -> anyhow::Result<Option<Arc<crate::ui::Ui>>> {
    let Some(ui) = &config.ui else { return Ok(None) };
    let same =
        |i: &&crate::config::IssuerConfig| i.issuer.trim_end_matches('/') == ui.issuer.as_str().trim_end_matches('/');
    let ca = config.auth.issuers.iter().find(same).map(|i| i.ca_certificates.clone()).unwrap_or_default();
    Ok(Some(Arc::new(crate::ui::Ui::new(ui.clone(), &config.server.public_url, &ca)?)))
}
