//! The issuance protocol (SPEC "Issuance must be crash-safe and audit must be fail-closed") and
//! revocation: the domain service that ties policy, storage and Octopus together.
//!
//! 1. policy check; one transaction writes the record `pending` and the "requested" event
//!    (if that fails, Octopus is never called);
//! 2. the key is created in Octopus with an explicit expiry;
//! 3. one transaction marks the record `active` and writes the "issued" event; if that fails
//!    the new Octopus key is revoked at once.
//!
//! A pending record left behind by a crash between 1 and 3 is found by its purpose marker and
//! cleaned up by the reconciler.

use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sha2::Sha256;
use uuid::Uuid;

use crate::domain::audit::{Action, NewAuditEvent, Outcome, RequestContext};
use crate::domain::clock::Clock;
use crate::domain::keys::{Activation, Idempotency, KeyRecord, KeyState, NewKey};
use crate::domain::policy::{
    self, ExpiryClamp, ExpiryDecision, ExpiryRequest, Policy, PolicyError, Purpose, Scope, UpstreamLimits, authz,
    octopus_purpose, purpose_marker,
};
use crate::domain::principal::Principal;
use crate::metrics::Metrics;
use crate::octopus::{CreatedKey, OctopusClient, OctopusError, OctopusUser, Revoked, key_hint};
use crate::store::{KeyFilter, PageRequest, Pending, Store, StoreError};

/// What a caller asked for.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub scope: String,
    pub purpose: Purpose,
    pub expiry: ExpiryRequest,
    /// The caller's `Idempotency-Key` with a hash of the request body.
    pub idempotency: Option<Idempotency>,
    /// Once the new key is active, revoke the requester's other active keys in the scope with
    /// the same purpose (a refresh loop, such as External Secrets Operator's, holds one key).
    pub replace_previous: bool,
    /// Set when the caller is gone (hung up, or its request timed out): a key Octopus makes then
    /// is deleted at once instead of activated, since nobody would receive its secret.
    pub caller_gone: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// One issuance between its checks and its answer: what its steps share.
struct InFlight<'a> {
    principal: &'a Principal,
    ctx: &'a RequestContext,
    scope: &'a Scope,
    /// The scope's Octopus account.
    account: OctopusUser,
    /// The record's id.
    id: Uuid,
    started: tokio::time::Instant,
    /// A second short of the caller's timeout: the answer must be out by then.
    ends_at: Option<tokio::time::Instant>,
}

/// What a dry run found: whether the request would be issued, when the key would expire, and
/// every rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    pub allowed: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub clamped: Option<ExpiryClamp>,
    pub reasons: Vec<policy::Reason>,
}

/// What an issuance request led to.
pub enum IssueOutcome {
    Issued(Issued),
    /// A retry with an `Idempotency-Key` already used for the same request: the first
    /// request's record, without the secret.
    Replayed(KeyRecord),
}

/// A newly issued key: the record and the secret, which exists nowhere else.
pub struct Issued {
    pub record: KeyRecord,
    pub secret: SecretString,
    pub clamped: Option<ExpiryClamp>,
    /// With `replace_previous`: the records this key supersedes, which [`KeyService::issue`]
    /// revokes in the background ([`KeyService::revoke_superseded`]) while the answer goes out.
    pub replaced: Vec<Uuid>,
}

/// Why an issuance or revocation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("key record not found")]
    NotFound,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("this Idempotency-Key was used with a different request body; use a new key for a new request")]
    IdempotencyMismatch,
    /// The scope's Octopus account is missing, inactive or not a service account.
    #[error("{0}")]
    ScopeMisconfigured(String),
    /// The database failed (a read, a write or the audit trail's append), so nothing was done.
    /// Callers see only that; the text, with its cause, is for the logs.
    #[error("the database failed, so nothing was done: {0}")]
    Store(#[source] StoreError),
    #[error(transparent)]
    Octopus(#[from] OctopusError),
    /// The issuance's deadline passed before Octopus was asked to create the key: nothing was
    /// created.
    #[error("keybroker ran out of time before asking Octopus for the key ({0}); nothing was created, so retry")]
    OutOfTime(String),
    /// The issuance was given up after Octopus made its key, for the reason `why` says: the
    /// reconciler had finished its record (it took longer than `jobs.pending_grace`), or its
    /// caller was gone. The key was deleted (or, if `deleted` is false, is left to a background
    /// pass: the reconciler while the record is pending, otherwise the drift check, which
    /// revokes a marked key whose record failed), nothing issued.
    #[error(
        "the issuance was abandoned ({why}): Octopus's key {octopus_key_id} was {}; nothing was issued, so retry",
        if *deleted { "deleted" } else { "not deleted yet (a background pass will)" }
    )]
    Abandoned { octopus_key_id: String, deleted: bool, why: &'static str },
    /// Octopus could not delete the key now; the revocation is recorded and retried, and the key
    /// keeps working until it succeeds.
    #[error("Octopus could not revoke the key now ({0}); keybroker recorded the revocation and retries it")]
    RevocationDeferred(OctopusError),
}

/// A service's answer to an authorization check ([`authz::check`]): 403 with its message, or
/// 404 where the caller may not learn that the thing exists.
pub fn authorized(principal: &Principal, what: authz::Check<'_>) -> Result<(), ServiceError> {
    match authz::check(principal, what) {
        authz::Decision::Allow => Ok(()),
        authz::Decision::Deny(message) => Err(ServiceError::Forbidden(message)),
        authz::Decision::Hide => Err(ServiceError::NotFound),
    }
}

/// The operator's account of a 403 on a scope account's keys.
fn privilege_refusal(scope: &Scope, account: &OctopusUser, message: &str) -> String {
    format!(
        "scope `{}`: Octopus refused keybroker access to the API keys of `{}` ({}): {message} Octopus lets an \
         account with UserEdit manage the keys only of service accounts no more privileged than itself (an \
         administrator's only with AdministerSystem): give keybroker's account every permission `{}` has, or \
         name a less privileged service account",
        scope.name, account.username, account.id, account.username
    )
}

/// Issues and revokes keys.
pub struct KeyService {
    store: Arc<dyn Store>,
    octopus: Arc<OctopusClient>,
    clock: Arc<dyn Clock>,
    policy: RwLock<Arc<Policy>>,
    /// `[lifecycle] on_scope_removed`, as the policy in force says.
    scope_removal: RwLock<crate::config::ScopeRemoval>,
    upstream: RwLock<UpstreamLimits>,
    hmac_secret: SecretString,
    metrics: Arc<Metrics>,
    /// `server.request_timeout`: each issuance's deadline, counted from its start.
    request_timeout: Option<std::time::Duration>,
    /// `octopus.timeout`: how long the create may take, so it is sent only while it can still
    /// finish within the deadline.
    octopus_timeout: std::time::Duration,
}

impl KeyService {
    /// Gives issuances a deadline: `request_timeout` from their start, with the create sent only
    /// while `octopus_timeout` (and a second) still fits before it.
    pub fn with_deadlines(
        mut self,
        request_timeout: std::time::Duration,
        octopus_timeout: std::time::Duration,
    ) -> Self {
        self.request_timeout = Some(request_timeout);
        self.octopus_timeout = octopus_timeout;
        self
    }

    /// How long a handler waits for an issuance before it answers 503: a second short of
    /// `server.request_timeout`, so the caller hears what happened rather than a bare 408.
    pub fn answer_within(&self) -> Option<std::time::Duration> {
        self.request_timeout.map(|t| t.saturating_sub(std::time::Duration::from_secs(1)))
    }

    pub fn new(
        store: Arc<dyn Store>,
        octopus: Arc<OctopusClient>,
        clock: Arc<dyn Clock>,
        policy: Policy,
        hmac_secret: SecretString,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            store,
            octopus,
            clock,
            policy: RwLock::new(Arc::new(policy)),
            scope_removal: RwLock::new(crate::config::ScopeRemoval::default()),
            upstream: RwLock::new(UpstreamLimits::default()),
            hmac_secret,
            request_timeout: None,
            octopus_timeout: std::time::Duration::from_secs(10),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn octopus(&self) -> &Arc<OctopusClient> {
        &self.octopus
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Counts a failed write of the audit trail (every such failure refuses the action).
    fn audit_failed(&self, e: &StoreError) {
        if !matches!(e, StoreError::LimitReached { .. }) {
            self.metrics.audit_append_failures.inc();
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().map(|p| Arc::clone(&p)).unwrap_or_default()
    }

    pub fn upstream_limits(&self) -> UpstreamLimits {
        self.upstream.read().map(|u| *u).unwrap_or_default()
    }

    /// Reads Octopus's key limits: the server maximum and the broker key's own expiry.
    pub async fn refresh_upstream_limits(&self) -> Result<UpstreamLimits, OctopusError> {
        let settings = self.octopus.key_settings().await?;
        let (broker_key_expires, broker_key_missing_among) = match self.octopus.broker_key_expiry().await? {
            crate::octopus::BrokerKeyExpiry::Session => (None, None),
            crate::octopus::BrokerKeyExpiry::Found(expires) => (expires, None),
            crate::octopus::BrokerKeyExpiry::NotFound { listed } => {
                tracing::warn!(listed, "keybroker's own key is not among its user's keys; its expiry is unknown");
                (None, Some(listed))
            }
        };
        let limits =
            UpstreamLimits { server_max_days: settings.max_expiry_days, broker_key_expires, broker_key_missing_among };
        if let Ok(mut current) = self.upstream.write() {
            *current = limits;
        }
        Ok(limits)
    }

    /// The keyed hash kept instead of a secret.
    pub fn secret_hmac(&self, secret: &str) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.hmac_secret.expose_secret().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(secret.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Writes an event outside any key change (denials, configuration). Errors are returned so
    /// callers decide whether to fail closed.
    pub async fn audit(&self, event: NewAuditEvent) -> Result<(), StoreError> {
        let result = self.store.append_audit(&event).await;
        if let Err(e) = &result {
            self.audit_failed(e);
        }
        result
    }

    async fn deny(&self, principal: &Principal, ctx: &RequestContext, scope: &str, err: PolicyError) -> ServiceError {
        let mut event = NewAuditEvent::new(self.now(), &principal.subject, Action::PolicyDenied, Outcome::Denied, ctx)
            .detail(json!({ "reason": err.to_string() }));
        // Only a scope that exists is recorded as such; any other text is in the reason, escaped.
        if self.policy().get(scope).is_some() {
            event = event.scope(scope);
        }
        if let Err(e) = self.store.append_audit(&event).await {
            self.audit_failed(&e);
            // Fail closed: nothing was done anyway, but say the trail is down.
            return ServiceError::Store(e);
        }
        ServiceError::Policy(err)
    }

    /// The Octopus account behind a scope, checked to be an active service account. The
    /// username-to-id resolution is cached; `fresh` asks Octopus again, replacing the cached
    /// entry only with what Octopus answered (a failed look-up keeps it).
    pub async fn scope_account(&self, scope: &Scope, fresh: bool) -> Result<OctopusUser, ServiceError> {
        let found = if fresh {
            self.octopus.refresh_user(&scope.octopus_user).await?
        } else {
            self.octopus.find_user(&scope.octopus_user).await?
        };
        let user = found.ok_or_else(|| {
            ServiceError::ScopeMisconfigured(format!(
                "scope `{}` names the Octopus user `{}`, which does not exist",
                scope.name, scope.octopus_user
            ))
        })?;
        if !user.is_service {
            return Err(ServiceError::ScopeMisconfigured(format!(
                "scope `{}` names `{}` ({}), which is not an Octopus service account",
                scope.name, user.username, user.id
            )));
        }
        if !user.is_active {
            return Err(ServiceError::ScopeMisconfigured(format!(
                "scope `{}` names `{}` ({}), which is disabled in Octopus",
                scope.name, user.username, user.id
            )));
        }
        Ok(user)
    }

    /// Runs every check of an issuance (teams, purpose, expiry and its clamping, the active-key
    /// limit) and reports them all, creating nothing in Octopus or the database but the
    /// `policy.dry_run` event.
    pub async fn dry_run(
        &self,
        principal: &Principal,
        scope_name: &str,
        purpose: Result<Purpose, policy::InvalidPurpose>,
        expiry: ExpiryRequest,
        ctx: &RequestContext,
    ) -> Result<DryRun, ServiceError> {
        let policy = self.policy();
        let mut reasons = Vec::new();
        let scope = match policy.authorize(principal, scope_name) {
            Ok(scope) => Some(scope),
            Err(e) => {
                reasons.push(e.reason());
                policy.get(scope_name)
            }
        };
        if let Err(message) = &purpose {
            reasons.push(policy::Reason::new("purpose", message.to_string()));
        }
        let (mut expires_at, mut clamped) = (None, None);
        if let Some(scope) = scope {
            match policy::resolve_expiry(expiry, scope, self.now(), self.upstream_limits()) {
                Ok(decision) => (expires_at, clamped) = (Some(decision.expires_at), decision.clamped),
                Err(e) => reasons.push(e.reason()),
            }
            let held = self.held_keys(&principal.subject, scope).await.map_err(ServiceError::Store)?;
            if let Err(e) = policy::check_active_limit(scope, held) {
                reasons.push(e.reason());
            }
        }
        let result = DryRun { allowed: reasons.is_empty(), expires_at, clamped, reasons };
        let outcome = if result.allowed { Outcome::Success } else { Outcome::Denied };
        let mut event = NewAuditEvent::new(self.now(), &principal.subject, Action::PolicyDryRun, outcome, ctx)
            .detail(json!({ "allowed": result.allowed, "expires_at": result.expires_at, "reasons": result.reasons }));
        if let Some(scope) = scope {
            event = event.scope(scope.name.as_str());
        }
        self.audit(event).await.map_err(ServiceError::Store)?;
        Ok(result)
    }

    /// The requester's pending and unexpired active keys in the scope, counted up to the limit.
    async fn held_keys(&self, requester: &str, scope: &Scope) -> Result<u64, StoreError> {
        let mut held = 0;
        for state in [KeyState::Active, KeyState::Pending] {
            let filter = KeyFilter {
                requester: Some(requester.to_owned()),
                scope: Some(scope.name.to_string()),
                state: Some(state),
                now: Some(self.now()),
                team: None,
            };
            let page = PageRequest { before_seq: None, limit: scope.max_active_keys_per_requester.saturating_add(1) };
            held += self.store.list_keys(&filter, page).await?.len() as u64;
        }
        Ok(held)
    }

    /// The requester's other active keys in `new`'s scope with the same purpose, older than
    /// `new` (so that two refreshes at once never replace each other): what `replace_previous`
    /// revokes.
    async fn superseded_by(&self, new: &KeyRecord) -> Vec<Uuid> {
        let filter = KeyFilter {
            requester: Some(new.requester.clone()),
            scope: Some(new.scope.to_string()),
            state: Some(KeyState::Active),
            now: Some(self.now()),
            team: None,
        };
        let mut older = Vec::new();
        let mut before_seq = Some(new.seq);
        while let Some(before) = before_seq {
            let page = match self.store.list_keys(&filter, PageRequest { before_seq: Some(before), limit: 200 }).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the keys a new one replaces; they stay active");
                    break;
                }
            };
            before_seq = page.last().map(|r| r.seq);
            older.extend(page.into_iter().filter(|r| r.id != new.id && r.purpose == new.purpose).map(|r| r.id));
        }
        older
    }

    /// Revokes keys that `new_id` superseded, each audited as such. A revocation that fails
    /// stays requested and is retried by the reconciler. Runs after the new key's answer has
    /// gone out, so that slow revocations never hold up (or time out) the secret.
    pub async fn revoke_superseded(&self, principal: &Principal, ids: &[Uuid], new_id: Uuid, ctx: &RequestContext) {
        for id in ids {
            let why = json!({ "reason": "superseded", "superseded_by": new_id });
            if let Err(e) = self.revoke_with(principal, *id, ctx, Some(why)).await {
                tracing::warn!(key_id = %id, error = %e, "could not revoke a superseded key");
            }
        }
    }

    /// The readiness job's check of a scope: a fresh look-up of its account, and whether
    /// keybroker's credential may manage its keys (Octopus's privilege rule).
    pub async fn check_scope_account(&self, scope: &Scope) -> Result<OctopusUser, ServiceError> {
        let user = self.scope_account(scope, true).await?;
        match self.octopus.probe_keys(&user.id).await {
            Ok(()) => Ok(user),
            Err(OctopusError::Credential { status: 403, message }) => {
                Err(ServiceError::ScopeMisconfigured(privilege_refusal(scope, &user, &message)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Issues a key (see the module documentation for the protocol).
    pub async fn issue(
        self: &Arc<Self>,
        principal: &Principal,
        request: IssueRequest,
        ctx: &RequestContext,
    ) -> Result<IssueOutcome, ServiceError> {
        let scope_label = self.scope_label(&request.scope);
        let result = self.issue_inner(principal, request, ctx).await;
        if let Ok(IssueOutcome::Issued(issued)) = &result {
            if !issued.replaced.is_empty() {
                // In the background: the secret's answer must not wait for Octopus's deletes.
                let (keys, principal, ctx) = (self.clone(), principal.clone(), ctx.clone());
                let (ids, new_id) = (issued.replaced.clone(), issued.record.id);
                tokio::spawn(async move { keys.revoke_superseded(&principal, &ids, new_id, &ctx).await });
            }
        }
        let outcome = match &result {
            Ok(IssueOutcome::Issued(_)) => "issued",
            Ok(IssueOutcome::Replayed(_)) => "replayed",
            Err(ServiceError::Policy(_)) => "denied",
            Err(ServiceError::IdempotencyMismatch | ServiceError::Conflict(_)) => "invalid",
            Err(_) => "failed",
        };
        self.metrics.issuance(&scope_label, outcome);
        result
    }

    /// Counts an issuance request that could not be read (its body or headers), which never
    /// reaches [`KeyService::issue`].
    pub fn refuse_unreadable(&self, scope: &str) {
        self.metrics.issuance(&self.scope_label(scope), "invalid");
    }

    /// A metrics label for a requested scope: its name if it exists, else `unknown` (callers
    /// choose the text, so it must not become a label as is).
    pub fn scope_label(&self, scope: &str) -> String {
        if self.policy().get(scope).is_some() { scope.to_owned() } else { "unknown".to_owned() }
    }

    #[tracing::instrument(skip_all, fields(scope = %request.scope, requester = %principal.subject, key_id))]
    async fn issue_inner(
        &self,
        principal: &Principal,
        request: IssueRequest,
        ctx: &RequestContext,
    ) -> Result<IssueOutcome, ServiceError> {
        let policy = self.policy();
        let scope = match policy.authorize(principal, &request.scope) {
            Ok(scope) => scope,
            Err(e) => return Err(self.deny(principal, ctx, &request.scope, e).await),
        };
        let now = self.now();
        let expiry = match policy::resolve_expiry(request.expiry, scope, now, self.upstream_limits()) {
            Ok(expiry) => expiry,
            Err(e) => return Err(self.deny(principal, ctx, &request.scope, e).await),
        };
        // The deadline: the create is sent only while it can still finish before the caller's
        // request times out; what comes before it (the account look-up) is bounded by that.
        let started = tokio::time::Instant::now();
        let create_by = self
            .request_timeout
            .map(|t| started + t.saturating_sub(self.octopus_timeout + std::time::Duration::from_secs(1)));
        let account = match create_by {
            Some(by) => tokio::time::timeout_at(by, self.scope_account(scope, false)).await.map_err(|_| {
                ServiceError::OutOfTime("looking up the scope's Octopus account took too long".to_owned())
            })??,
            None => self.scope_account(scope, false).await?,
        };
        // Time-ordered (v7): consecutive records land on the same pages of the id index.
        let id = Uuid::now_v7();
        tracing::Span::current().record("key_id", tracing::field::display(id));
        // A second short of the caller's timeout (counted from the request's arrival, a little
        // before `started`): the answer, a 5xx that says what happened, must reach the caller
        // before its request is cut off with 408.
        let ends_at = self.request_timeout.map(|t| started + t.saturating_sub(std::time::Duration::from_secs(1)));
        let flight = InFlight { principal, ctx, scope, account, id, started, ends_at };

        // Step 1: the pending record and the "requested" event, or nothing at all.
        if let Some(replayed) = self.write_pending(&flight, &request, &expiry, now).await? {
            return replayed;
        }
        // Step 2: Octopus, while there is time; otherwise nothing is created.
        if create_by.is_some_and(|by| tokio::time::Instant::now() >= by) {
            let event = self
                .flight_event(&flight, Action::KeyIssueFailed, Outcome::Failure)
                .detail(json!({ "reason": "out of time before Octopus was asked; nothing was created" }));
            if let Err(e) = self.store.mark_failed(id, &event).await {
                tracing::warn!(error = %e, "could not fail a record that ran out of time; the reconciler will");
            }
            return Err(ServiceError::OutOfTime("writing the pending record took too long".to_owned()));
        }
        let created = self.create_in_octopus(&flight, &request, &expiry).await?;
        self.refuse_unusable(&flight, &request, &expiry, &created).await?;
        // Step 3: active record and "issued" event; otherwise the key must not survive.
        self.record_issued(&flight, &request, &expiry, created).await
    }

    /// Step 1 of an issuance: writes the pending record and its "requested" event. `Some` is the
    /// answer to give instead of going on: the first attempt's outcome for a retry with the
    /// same `Idempotency-Key`.
    async fn write_pending(
        &self,
        f: &InFlight<'_>,
        request: &IssueRequest,
        expiry: &ExpiryDecision,
        now: DateTime<Utc>,
    ) -> Result<Option<Result<IssueOutcome, ServiceError>>, ServiceError> {
        let new_key = NewKey {
            id: f.id,
            scope: f.scope.name.clone(),
            requester: f.principal.subject.clone(),
            purpose: request.purpose.clone(),
            octopus_user_id: f.account.id.clone(),
            // Taken after the look-up, as the record is written: its age is the record's own,
            // not the request's (the reconciler goes by the deadline anyway).
            created_at: self.now(),
            expires_at: expiry.expires_at,
            max_active: f.scope.max_active_keys_per_requester,
            idempotency: request.idempotency.clone(),
            requester_teams: f.principal.teams.iter().cloned().collect(),
            requested_by: f.ctx.on_behalf.as_ref().map(|b| b.requested_by.clone()),
            ticket: f.ctx.on_behalf.as_ref().map(|b| b.ticket.clone()),
            // The issuance gives up by then; a second more for the record's own writes.
            deadline: self
                .request_timeout
                .and_then(|t| chrono::Duration::from_std(t + std::time::Duration::from_secs(1)).ok())
                .map(|t| now + t),
        };
        let requested = self.flight_event(f, Action::KeyRequested, Outcome::Success).detail(json!({
            "purpose": request.purpose.as_str(),
            "expires_at": expiry.expires_at,
            "octopus_user_id": f.account.id,
            "clamped": expiry.clamped,
        }));
        match self.store.insert_pending(&new_key, &requested, now).await {
            Ok(Pending::Inserted) => Ok(None),
            Ok(Pending::Existing { same_request: false, .. }) => Err(ServiceError::IdempotencyMismatch),
            Ok(Pending::Existing { record, same_request: true }) => {
                // As long as the caller would wait (10 s at most), a second short of its timeout.
                let wait = self
                    .request_timeout
                    .map_or(std::time::Duration::from_secs(10), |t| t.saturating_sub(std::time::Duration::from_secs(2)))
                    .min(std::time::Duration::from_secs(10));
                Ok(Some(self.replay(*record, f.started + wait).await))
            }
            Err(StoreError::LimitReached { .. }) => {
                let err = PolicyError::TooManyActiveKeys {
                    scope: f.scope.name.clone(),
                    limit: f.scope.max_active_keys_per_requester,
                };
                Err(self.deny(f.principal, f.ctx, &request.scope, err).await)
            }
            Err(e) => {
                self.audit_failed(&e);
                Err(ServiceError::Store(e))
            }
        }
    }

    /// Step 2 of an issuance: asks Octopus for the key. A refusal or a failure fails the
    /// pending record (or leaves it to the reconciler when the answer may have been lost).
    async fn create_in_octopus(
        &self,
        f: &InFlight<'_>,
        request: &IssueRequest,
        expiry: &ExpiryDecision,
    ) -> Result<CreatedKey, ServiceError> {
        let octopus_purpose = octopus_purpose(f.id, &f.principal.subject, &request.purpose);
        match self.octopus.create_api_key_within(&f.account.id, &octopus_purpose, expiry.expires_at, f.ends_at).await {
            Ok(created) => Ok(created),
            Err(e) => {
                if matches!(e, OctopusError::NotFound { .. }) {
                    // The account was deleted (and maybe re-created with another id).
                    self.octopus.forget_user(&f.scope.octopus_user);
                }
                self.fail_pending(f.principal, f.ctx, f.scope, f.id, &f.account.id, &e, f.ends_at).await;
                // The credential works (it found the account); a 403 on this account's keys is
                // this scope's misconfiguration, and other scopes keep working.
                if let OctopusError::Credential { status: 403, message } = &e {
                    return Err(ServiceError::ScopeMisconfigured(privilege_refusal(f.scope, &f.account, message)));
                }
                Err(ServiceError::Octopus(e))
            }
        }
    }

    /// Between steps 2 and 3: a key that must not be handed out is deleted at once, and an
    /// event names it. That is a key Octopus made with another expiry than the one sent (an old
    /// server that ignores `Expires` makes keys that never expire), or one whose caller is gone.
    async fn refuse_unusable(
        &self,
        f: &InFlight<'_>,
        request: &IssueRequest,
        expiry: &ExpiryDecision,
        created: &CreatedKey,
    ) -> Result<(), ServiceError> {
        let honoured = created.expires.is_some_and(|at| (at - expiry.expires_at).num_seconds().abs() <= 60);
        if !honoured {
            let detail = format!(
                "Octopus created the key with expiry {:?} instead of {}; it was revoked",
                created.expires.map(|t| t.to_rfc3339()),
                expiry.expires_at.to_rfc3339()
            );
            let _ = self.octopus.delete_api_key(&f.account.id, &created.id).await;
            let error = OctopusError::Unavailable { detail };
            self.fail_pending(f.principal, f.ctx, f.scope, f.id, &f.account.id, &error, f.ends_at).await;
            return Err(ServiceError::Octopus(error));
        }
        if !request.caller_gone.as_ref().is_some_and(|gone| gone.load(std::sync::atomic::Ordering::SeqCst)) {
            return Ok(());
        }
        let deleted = self.octopus.delete_api_key(&f.account.id, &created.id).await;
        let event = self
            .flight_event(f, Action::KeyIssueAbandoned, Outcome::Failure)
            .octopus_key(Some(&created.id))
            .detail(json!({
                "reason": "the caller was gone when Octopus made the key",
                "octopus_key_deleted": deleted.is_ok(),
            }));
        match &deleted {
            // Deleted: the record fails. Not deleted: it stays pending, and the reconciler
            // revokes the key it finds by its marker.
            Ok(_) => {
                if let Err(e) = self.store.mark_failed(f.id, &event).await {
                    tracing::warn!(error = %e, "could not fail an abandoned issuance; the reconciler will");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, octopus_key_id = %created.id, "could not delete an abandoned key");
                let _ = self.store.append_audit(&event).await;
            }
        }
        Err(ServiceError::Abandoned {
            octopus_key_id: created.id.clone(),
            deleted: deleted.is_ok(),
            why: "its caller was gone when Octopus made the key",
        })
    }

    /// Step 3 of an issuance: the record becomes active with the "issued" event. Otherwise the
    /// key must not survive: it is deleted, and the record fails (or the reconciler finishes it).
    async fn record_issued(
        &self,
        f: &InFlight<'_>,
        request: &IssueRequest,
        expiry: &ExpiryDecision,
        created: CreatedKey,
    ) -> Result<IssueOutcome, ServiceError> {
        let expires_at = created.expires.unwrap_or(expiry.expires_at);
        let activation = Activation {
            id: f.id,
            octopus_key_id: created.id.clone(),
            key_hint: key_hint(created.secret.expose_secret()),
            secret_hmac: self.secret_hmac(created.secret.expose_secret()),
            expires_at,
        };
        let issued_event = self
            .flight_event(f, Action::KeyIssued, Outcome::Success)
            .octopus_key(Some(&created.id))
            .detail(json!({ "expires_at": expires_at, "key_hint": activation.key_hint }));
        match self.activate_or_read_back(&activation, &issued_event).await {
            Ok(record)
                if self.policy().get(record.scope.as_str()).is_none()
                    && self.scope_removal() == crate::domain::policy::ScopeRemoval::Revoke =>
            {
                // A reload removed the scope while the key was being made, and says to revoke
                // that scope's keys: this one too, before anyone receives it.
                let why =
                    json!({ "reason": "its scope was removed while it was being issued (on_scope_removed = revoke)" });
                if let Err(e) = self.revoke_with(&Self::system_principal(), record.id, f.ctx, Some(why)).await {
                    tracing::warn!(error = %e, "could not revoke a key of a removed scope; the reconciler retries");
                }
                Err(ServiceError::Policy(PolicyError::UnknownScope(record.scope.to_string())))
            }
            Ok(record) => {
                tracing::info!(octopus_key_id = %created.id, "issued key");
                let replaced = if request.replace_previous { self.superseded_by(&record).await } else { Vec::new() };
                Ok(IssueOutcome::Issued(Issued { record, secret: created.secret, clamped: expiry.clamped, replaced }))
            }
            // The reconciler finished the record while Octopus was making the key (the issuance
            // outlived `jobs.pending_grace`): the key must go, an event must name it, and the
            // caller must hear what happened, not that the database is down.
            Err(StoreError::WrongState { actual, .. }) => Err(self.abandon_late_key(f, &created, actual).await),
            Err(e) => Err(self.undo_unrecorded_key(f, &created, e).await),
        }
    }

    /// Activates a record. An activation whose COMMIT's answer was lost, retried by the store
    /// and then found "not pending", or an error after a commit that did happen, is read back
    /// before anything is undone: a key whose activation committed is never deleted.
    async fn activate_or_read_back(
        &self,
        activation: &Activation,
        event: &NewAuditEvent,
    ) -> Result<KeyRecord, StoreError> {
        match self.store.activate(activation, event).await {
            Err(e) => match self.store.get_key(activation.id).await {
                Ok(Some(record))
                    if record.state == KeyState::Active
                        && record.octopus_key_id.as_deref() == Some(activation.octopus_key_id.as_str()) =>
                {
                    tracing::warn!(error = %e, "the activation's answer was lost, but it committed");
                    Ok(record)
                }
                _ => Err(e),
            },
            ok => ok,
        }
    }

    /// The record was already `actual` when Octopus's key arrived: the key is deleted.
    async fn abandon_late_key(&self, f: &InFlight<'_>, created: &CreatedKey, actual: KeyState) -> ServiceError {
        let deleted = self.octopus.delete_api_key(&f.account.id, &created.id).await;
        let event = self
            .flight_event(f, Action::KeyIssueFailed, Outcome::Failure)
            .octopus_key(Some(&created.id))
            .detail(json!({
                "reason": format!("the record was already {actual} when Octopus's key arrived"),
                "octopus_key_deleted": deleted.is_ok(),
            }));
        if let Err(e) = self.store.append_audit(&event).await {
            tracing::error!(error = %e, octopus_key_id = %created.id, "could not audit an abandoned issuance");
        }
        if let Err(e) = &deleted {
            tracing::error!(error = %e, octopus_key_id = %created.id, "could not delete the key of an abandoned issuance");
        }
        ServiceError::Abandoned {
            octopus_key_id: created.id.clone(),
            deleted: deleted.is_ok(),
            why: "it took longer than jobs.pending_grace, and its record was finished without it",
        }
    }

    /// The issued key could not be recorded: it is deleted, and the record fails (if the store
    /// is still down, it stays pending and the reconciler finishes the job).
    async fn undo_unrecorded_key(&self, f: &InFlight<'_>, created: &CreatedKey, e: StoreError) -> ServiceError {
        self.audit_failed(&e);
        // The error itself is the caller's (logged once, where it is answered).
        tracing::warn!(octopus_key_id = %created.id, "the issued key could not be recorded; revoking it");
        match self.octopus.delete_api_key(&f.account.id, &created.id).await {
            Ok(_) => {
                let failed = self
                    .flight_event(f, Action::KeyIssueFailed, Outcome::Failure)
                    .octopus_key(Some(&created.id))
                    .detail(json!({ "reason": "the issued key could not be recorded; it was revoked" }));
                let _ = self.store.mark_failed(f.id, &failed).await;
            }
            Err(revoke_err) => {
                tracing::error!(error = %revoke_err, "could not revoke the unrecorded key; the reconciler will");
            }
        }
        ServiceError::Store(e)
    }

    fn flight_event(&self, f: &InFlight<'_>, action: Action, outcome: Outcome) -> NewAuditEvent {
        self.event(f.principal, action, outcome, f.ctx, f.scope, f.id)
    }

    /// A retry of a request that already has a record. While the first request is still in
    /// flight, wait a little for it to finish, so that racing retries get the same answer.
    /// A retry's answer: the first attempt's record once it is no longer pending, waiting for it
    /// until `until` (the retry's own deadline: a first attempt that died pending waits for the
    /// reconciler, and the retry must answer 409 before it is cut off with 408).
    async fn replay(&self, mut record: KeyRecord, until: tokio::time::Instant) -> Result<IssueOutcome, ServiceError> {
        loop {
            if record.state != KeyState::Pending
                || tokio::time::Instant::now() + std::time::Duration::from_millis(100) > until
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            match self.store.get_key(record.id).await {
                Ok(Some(current)) => record = current,
                Ok(None) => break,
                Err(e) => return Err(ServiceError::Store(e)),
            }
        }
        match record.state {
            KeyState::Pending => Err(ServiceError::Conflict(
                "the first request with this Idempotency-Key is still in progress; retry later".to_owned(),
            )),
            KeyState::Failed => Err(ServiceError::Conflict(format!(
                "the first request with this Idempotency-Key failed (record {}); use a new key to try again",
                record.id
            ))),
            _ => Ok(IssueOutcome::Replayed(record)),
        }
    }

    /// After a failed create: when the outcome is unknown (timeout, lost answer), look for a key
    /// carrying our marker and revoke it, within the issuance's deadline (`ends_at`); then mark
    /// the record failed. If any of that fails or runs out of time the record stays pending for
    /// the reconciler, which searches again after `jobs.pending_grace`.
    #[allow(clippy::too_many_arguments)]
    async fn fail_pending(
        &self,
        principal: &Principal,
        ctx: &RequestContext,
        scope: &Scope,
        id: Uuid,
        octopus_user_id: &str,
        error: &OctopusError,
        ends_at: Option<tokio::time::Instant>,
    ) {
        let mut detail = json!({ "reason": error.to_string() });
        if error.outcome_unknown() {
            let search = self.revoke_by_marker(octopus_user_id, id);
            let searched = match ends_at {
                Some(at) => tokio::time::timeout_at(at, search).await.ok(),
                None => Some(search.await),
            };
            match searched {
                Some(Ok(found)) => detail["revoked_orphans"] = json!(found),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "could not look for an orphan key; leaving the record pending");
                    return;
                }
                None => {
                    tracing::warn!("out of time looking for an orphan key; leaving the record pending");
                    return;
                }
            }
        }
        let event = self.event(principal, Action::KeyIssueFailed, Outcome::Failure, ctx, scope, id).detail(detail);
        if let Err(e) = self.store.mark_failed(id, &event).await {
            tracing::error!(error = %e, "could not mark the record failed; the reconciler will");
        }
    }

    /// Revokes every key of the user whose purpose carries this record's marker. Returns their ids.
    pub async fn revoke_by_marker(&self, octopus_user_id: &str, id: Uuid) -> Result<Vec<String>, OctopusError> {
        let marker = purpose_marker(id);
        let keys = self.octopus.list_api_keys(octopus_user_id, Some(&marker)).await?;
        let mut revoked = Vec::new();
        // The server may ignore partialPurpose; only an exact prefix match counts.
        for key in keys.iter().filter(|k| k.purpose == marker || k.purpose.starts_with(&format!("{marker} "))) {
            self.octopus.delete_api_key(octopus_user_id, &key.id).await?;
            revoked.push(key.id.clone());
        }
        Ok(revoked)
    }

    /// Revokes a key in Octopus and marks it revoked. Owners and admins may; revoking a revoked
    /// key returns it unchanged.
    #[tracing::instrument(skip_all, fields(key_id = %id, actor = %principal.subject))]
    pub async fn revoke(
        &self,
        principal: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<KeyRecord, ServiceError> {
        self.revoke_with(principal, id, ctx, None).await
    }

    /// [`KeyService::revoke`], with more to say in the `key.revoked` event (why it went).
    async fn revoke_with(
        &self,
        principal: &Principal,
        id: Uuid,
        ctx: &RequestContext,
        why: Option<serde_json::Value>,
    ) -> Result<KeyRecord, ServiceError> {
        let record = self.store.get_key(id).await.map_err(ServiceError::Store)?.ok_or(ServiceError::NotFound)?;
        authorized(principal, authz::Check::RevokeKey(&record))?;
        let owner = record.requester == principal.subject;
        match record.state {
            // Already revoked: the answer is the record, and who asked again is on record too.
            KeyState::Revoked => {
                self.audit_already_revoked(principal, &record, owner, ctx).await?;
                return Ok(record);
            }
            KeyState::Pending => {
                return Err(ServiceError::Conflict("the key is still being issued; try again in a moment".to_owned()));
            }
            KeyState::Failed => return Err(ServiceError::Conflict("the key was never issued".to_owned())),
            KeyState::Active | KeyState::Expired => {}
        }
        let Some(octopus_key_id) = record.octopus_key_id.clone() else {
            return Err(ServiceError::Conflict("the record has no Octopus key".to_owned()));
        };
        let scope_name = record.scope.clone();
        // Drift, seeing the key gone from Octopus in a moment, leaves the record to this revoker.
        if let Err(e) = self.store.begin_revocation(id, self.now()).await {
            tracing::warn!(error = %e, "could not mark a revocation as started");
        }
        let outcome = match self.octopus.delete_api_key(&record.octopus_user_id, &octopus_key_id).await {
            Ok(outcome) => outcome,
            Err(e) => {
                // Never fail open: the record stays active, its revocation is on record, and the
                // reconciler retries it until Octopus confirms.
                let requested = self.store.request_revocation(id, self.now()).await;
                let event =
                    NewAuditEvent::new(self.now(), &principal.subject, Action::KeyRevokeFailed, Outcome::Failure, ctx)
                        .scope(&scope_name)
                        .key(id)
                        .octopus_key(Some(&octopus_key_id))
                        .detail(json!({ "reason": e.to_string(), "retried": requested.is_ok() }));
                if let Err(store_err) = self.store.append_audit(&event).await {
                    tracing::error!(error = %store_err, "could not audit a failed revocation");
                }
                return Err(match requested {
                    Ok(()) => ServiceError::RevocationDeferred(e),
                    Err(store_err) => ServiceError::Store(store_err),
                });
            }
        };
        let now = self.now();
        let event = NewAuditEvent::new(now, &principal.subject, Action::KeyRevoked, Outcome::Success, ctx)
            .scope(&scope_name)
            .key(id)
            .octopus_key(Some(&octopus_key_id))
            .detail({
                let mut detail = json!({
                    "octopus": match outcome { Revoked::Deleted => "deleted", Revoked::AlreadyGone => "already_gone" },
                    "by_owner": owner,
                });
                if let (Some(why), Some(map)) = (why.as_ref().and_then(|w| w.as_object()), detail.as_object_mut()) {
                    map.extend(why.clone());
                }
                detail
            });
        let revoked = self.store.mark_revoked(id, now, &event).await.map_err(ServiceError::Store)?;
        // A concurrent revocation got there first (the store leaves a revoked record as it is and
        // writes no event): this caller's revocation still goes on record.
        if revoked.revoked_at != Some(crate::domain::audit::store_precision(now)) {
            self.audit_already_revoked(principal, &revoked, owner, ctx).await?;
        }
        Ok(revoked)
    }

    /// A `key.revoked` event with `"result": "already_revoked"`: a revocation of a key that was
    /// revoked already, by this caller earlier or by someone else at the same moment.
    async fn audit_already_revoked(
        &self,
        principal: &Principal,
        record: &KeyRecord,
        owner: bool,
        ctx: &RequestContext,
    ) -> Result<(), ServiceError> {
        let event = NewAuditEvent::new(self.now(), &principal.subject, Action::KeyRevoked, Outcome::Success, ctx)
            .scope(&record.scope)
            .key(record.id)
            .octopus_key(record.octopus_key_id.as_deref())
            .detail(json!({ "result": "already_revoked", "revoked_at": record.revoked_at, "by_owner": owner }));
        self.audit(event).await.map_err(ServiceError::Store)
    }

    /// keybroker acting on its own (jobs, retries): an admin named `keybroker`.
    pub fn system_principal() -> Principal {
        Principal {
            subject: "keybroker".to_owned(),
            issuer: "keybroker".to_owned(),
            display_name: "keybroker".to_owned(),
            teams: std::collections::BTreeSet::new(),
            roles: [crate::domain::principal::Role::Requester, crate::domain::principal::Role::Admin].into(),
        }
    }

    /// Marks a record whose key must go (offboarding, a removed scope), then revokes it. If the
    /// revocation fails the mark stays and the reconciler retries it.
    pub async fn revoke_requested(
        &self,
        principal: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<KeyRecord, ServiceError> {
        self.store.request_revocation(id, self.now()).await.map_err(ServiceError::Store)?;
        self.revoke(principal, id, ctx).await
    }

    /// Replaces the policy (a reload). Returns the previous one.
    /// What a removed scope's keys become (`[lifecycle] on_scope_removed`).
    pub fn scope_removal(&self) -> crate::config::ScopeRemoval {
        self.scope_removal.read().map(|r| *r).unwrap_or_default()
    }

    pub fn set_scope_removal(&self, rule: crate::config::ScopeRemoval) {
        if let Ok(mut r) = self.scope_removal.write() {
            *r = rule;
        }
    }

    pub fn replace_policy(&self, policy: Policy) -> Arc<Policy> {
        let new = Arc::new(policy);
        match self.policy.write() {
            Ok(mut current) => std::mem::replace(&mut *current, new),
            Err(_) => new,
        }
    }

    /// How long a started revocation keeps drift away from its record: its Octopus calls (a
    /// delete and, for a 404, a confirming read), with room to spare.
    pub fn revocation_window(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.octopus_timeout * 4).unwrap_or(chrono::Duration::minutes(1))
    }

    /// The record a leaked secret belongs to, via its keyed hash. Who looked for a leaked key,
    /// and what they found, is itself audited; the look-up fails if that cannot be.
    pub async fn identify(
        &self,
        principal: &Principal,
        secret: &str,
        ctx: &RequestContext,
    ) -> Result<Option<KeyRecord>, ServiceError> {
        let found = self.store.find_by_secret_hmac(&self.secret_hmac(secret)).await.map_err(ServiceError::Store)?;
        let outcome = if found.is_some() { Outcome::Success } else { Outcome::Failure };
        let mut event = NewAuditEvent::new(self.now(), &principal.subject, Action::KeyIdentified, outcome, ctx);
        if let Some(record) = &found {
            event = event.scope(&record.scope).key(record.id).octopus_key(record.octopus_key_id.as_deref());
        }
        self.audit(event).await.map_err(ServiceError::Store)?;
        Ok(found)
    }

    fn event(
        &self,
        principal: &Principal,
        action: Action,
        outcome: Outcome,
        ctx: &RequestContext,
        scope: &Scope,
        id: Uuid,
    ) -> NewAuditEvent {
        NewAuditEvent::new(self.now(), &principal.subject, action, outcome, ctx).scope(scope.name.as_str()).key(id)
    }
}
