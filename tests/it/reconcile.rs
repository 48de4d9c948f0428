//! Crash safety: store failures around the Octopus call, and the reconciler that cleans up
//! issuances a crash left pending.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keybroker::domain::audit::{AuditRecord, NewAuditEvent};
use keybroker::domain::keys::{Activation, KeyChange, KeyRecord, NewKey};
use keybroker::domain::tickets::{Hold, Ticket, TicketEnd, TicketId};
use keybroker::store::{
    AuditFilter, Delivery, DeliveryResult, KeyFilter, NewDelivery, PageRequest, Pending, SqliteStore, Store, StoreError,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, TestOptions, create_marked_key, stage_pending};

/// A store that fails on demand, around a real SQLite store.
pub(crate) struct FlakyStore {
    inner: Arc<dyn Store>,
    pub(crate) fail_pending: AtomicBool,
    fail_activate: AtomicBool,
    /// Commits the activation, then answers as if the connection died during COMMIT.
    lose_activate_answer: AtomicBool,
}

fn down() -> StoreError {
    StoreError::Unavailable("injected failure".to_owned())
}

#[async_trait]
impl Store for FlakyStore {
    fn backend(&self) -> keybroker::store::Backend<'_> {
        self.inner.backend()
    }
    async fn close(&self) {
        self.inner.close().await;
    }
    async fn insert_pending(
        &self,
        key: &NewKey,
        event: &NewAuditEvent,
        now: DateTime<Utc>,
    ) -> Result<Pending, StoreError> {
        if self.fail_pending.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.insert_pending(key, event, now).await
    }
    async fn activate(&self, activation: &Activation, event: &NewAuditEvent) -> Result<KeyRecord, StoreError> {
        if self.fail_activate.load(Ordering::SeqCst) {
            return Err(down());
        }
        let result = self.inner.activate(activation, event).await;
        if self.lose_activate_answer.load(Ordering::SeqCst) {
            return Err(down());
        }
        result
    }
    async fn change_state(
        &self,
        id: Uuid,
        change: KeyChange,
        at: DateTime<Utc>,
        event: &NewAuditEvent,
    ) -> Result<(KeyRecord, bool), StoreError> {
        self.inner.change_state(id, change, at, event).await
    }
    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list_keys(filter, page).await
    }
    async fn enqueue_delivery(&self, delivery: &NewDelivery) -> Result<bool, StoreError> {
        self.inner.enqueue_delivery(delivery).await
    }
    async fn due_deliveries(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        self.inner.due_deliveries(now, limit).await
    }
    async fn finish_delivery(&self, delivery: &Delivery, result: &DeliveryResult) -> Result<bool, StoreError> {
        self.inner.finish_delivery(delivery, result).await
    }
    async fn append_audit(&self, event: &NewAuditEvent) -> Result<(), StoreError> {
        self.inner.append_audit(event).await
    }
    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.list_audit(filter, page).await
    }
    async fn audit_chain(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.audit_chain(after_seq, limit).await
    }
    fn set_chain_key(&self, key: keybroker::domain::audit::ChainKey) {
        self.inner.set_chain_key(key)
    }
    async fn insert_ticket(&self, ticket: &Ticket, event: &NewAuditEvent) -> Result<(), StoreError> {
        self.inner.insert_ticket(ticket, event).await
    }
    async fn end_ticket(
        &self,
        id: &TicketId,
        end: TicketEnd,
        at: DateTime<Utc>,
        hold: Hold<'_>,
        event: &NewAuditEvent,
    ) -> Result<bool, StoreError> {
        self.inner.end_ticket(id, end, at, hold, event).await
    }
    async fn publish_policy(&self, v: &str, d: &str, at: DateTime<Utc>, by: &str) -> Result<i64, StoreError> {
        self.inner.publish_policy(v, d, at, by).await
    }
}

pub(crate) async fn flaky_app() -> (TestApp, Arc<FlakyStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("flaky.db").display());
    let inner: Arc<dyn Store> = Arc::new(SqliteStore::connect(&url).await.unwrap());
    inner.migrate().await.unwrap();
    let flaky = Arc::new(FlakyStore {
        inner,
        fail_pending: AtomicBool::new(false),
        fail_activate: AtomicBool::new(false),
        lose_activate_answer: AtomicBool::new(false),
    });
    let store: Arc<dyn Store> = flaky.clone();
    let app = TestApp::spawn_with(TestOptions { store: Some(store), ..Default::default() }).await;
    (app, flaky, dir)
}

#[tokio::test]
async fn a_store_failure_before_the_octopus_call_creates_nothing() {
    let (app, flaky, _dir) = flaky_app().await;
    flaky.fail_pending.store(true, Ordering::SeqCst);
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p"})).await;
    assert_eq!(res.status(), 503);
    assert_eq!(app.sim.request_count("POST /api/users/{id}/apikeys"), 0);
    assert!(app.keybroker_keys_in_octopus().is_empty());
    assert_chain_verifies(&app).await;
}

async fn assert_chain_verifies(app: &TestApp) {
    let verify: Value = app.get("/v1/audit/verify", &app.auditor()).await.json().await.unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
}

#[tokio::test]
async fn a_store_failure_after_the_octopus_call_revokes_the_new_key() {
    let (app, flaky, _dir) = flaky_app().await;
    flaky.fail_activate.store(true, Ordering::SeqCst);
    let res = app.issue(&app.alice(), json!({"scope": "payments-deploy", "purpose": "p"})).await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert!(body.get("api_key").is_none());
    assert_eq!(app.sim.request_count("POST /api/users/{id}/apikeys"), 1);
    assert!(app.keybroker_keys_in_octopus().is_empty(), "the unrecorded key must be revoked at once");
    let failed: Value = app.get("/v1/keys?state=failed", &app.alice()).await.json().await.unwrap();
    assert_eq!(failed["items"].as_array().unwrap().len(), 1);
    assert_chain_verifies(&app).await;
}

/// What a crash between "pending" and "active" leaves: a pending record and an Octopus key that
/// carries its marker.
async fn leave_an_orphan(app: &TestApp) -> (Uuid, String) {
    let id = stage_pending(app, Utc::now() - chrono::Duration::minutes(10)).await;
    let octopus_key = create_marked_key(app, id).await;
    (id, octopus_key)
}

#[tokio::test]
async fn the_reconciler_revokes_orphans_of_a_crash_and_fails_their_records() {
    let app = TestApp::spawn().await;
    let (id, octopus_key) = leave_an_orphan(&app).await;
    // A key of another record with a similar marker prefix must survive.
    let keeper = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "keep me"})).await;
    assert_eq!(app.keybroker_keys_in_octopus().len(), 2);

    let report = keybroker::services::jobs::reconcile_once(&app.state.keys, Duration::from_secs(60)).await.unwrap();
    assert_eq!(report.failed, 1);
    assert_eq!(report.revoked_keys, 1);
    let left = app.keybroker_keys_in_octopus();
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].id, octopus_key);
    assert_eq!(left[0].id, keeper["octopus_key_id"].as_str().unwrap());
    let record = app.state.keys.store().get_key(id).await.unwrap().unwrap();
    assert_eq!(record.state, keybroker::domain::keys::KeyState::Failed);
    let event = app.audit_events().await.into_iter().find(|e| e.action == "key.reconciled").unwrap();
    assert_eq!(event.detail["revoked_octopus_keys"], json!([octopus_key]));

    // A second pass finds nothing to do.
    let again = keybroker::services::jobs::reconcile_once(&app.state.keys, Duration::from_secs(60)).await.unwrap();
    assert_eq!(again, keybroker::services::jobs::ReconcileReport::default());
}

#[tokio::test]
async fn the_reconciler_leaves_young_pending_records_alone() {
    let app = TestApp::spawn().await;
    let (id, _) = leave_an_orphan(&app).await;
    let report = keybroker::services::jobs::reconcile_once(&app.state.keys, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(report.failed, 0);
    assert_eq!(app.keybroker_keys_in_octopus().len(), 1);
    let record = app.state.keys.store().get_key(id).await.unwrap().unwrap();
    assert_eq!(record.state, keybroker::domain::keys::KeyState::Pending);
}

#[tokio::test]
async fn an_issuance_the_reconciler_finished_meanwhile_deletes_its_key_and_says_so() {
    use octopus_sim::{Fault, FaultKind};
    let app = TestApp::spawn().await;
    app.sim.inject(Fault::on(
        reqwest::Method::POST,
        "/api/users/{id}/apikeys",
        FaultKind::Latency(std::time::Duration::from_millis(1500)),
    ));
    let alice = app.alice();
    let slow = app.issue(&alice, serde_json::json!({"scope": "payments-deploy", "purpose": "slow"}));
    let store = app.state.keys.store().clone();
    let reconciler = async {
        // While Octopus is slow, the record is pending; the reconciler (as after a crash) fails it.
        for _ in 0..100 {
            let pending = store
                .pending_before(
                    chrono::Utc::now() + chrono::Duration::hours(1),
                    chrono::Utc::now() + chrono::Duration::hours(1),
                    10,
                )
                .await
                .unwrap();
            if let Some(record) = pending.first() {
                let event = keybroker::domain::audit::NewAuditEvent::new(
                    chrono::Utc::now(),
                    "keybroker",
                    keybroker::domain::audit::Action::KeyReconciled,
                    keybroker::domain::audit::Outcome::Failure,
                    &Default::default(),
                )
                .key(record.id);
                store.mark_failed(record.id, &event).await.unwrap();
                return record.id;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the issuance never left a pending record");
    };
    let (res, id) = tokio::join!(slow, reconciler);
    assert_eq!(res.status(), 503);
    let problem: serde_json::Value = res.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("abandoned") && detail.contains("was deleted"), "{detail}");
    assert!(!detail.contains("database"), "{detail}");
    assert!(app.keybroker_keys_in_octopus().is_empty(), "the abandoned key survived");
    let events = app.audit_events().await;
    let failed = events.iter().find(|e| e.action == "key.issue_failed" && e.key_id == Some(id)).expect("an event");
    assert!(failed.octopus_key_id.is_some(), "the event names the Octopus key: {failed:?}");
}

#[tokio::test]
async fn an_activation_that_committed_but_lost_its_answer_keeps_its_key() {
    let (app, flaky, _dir) = flaky_app().await;
    flaky.lose_activate_answer.store(true, Ordering::SeqCst);
    // The record is read back before anything is undone: the activation committed, so the key
    // stays and the caller gets it.
    let issued = app.issue_ok(&app.alice(), json!({"scope": "payments-deploy", "purpose": "ambiguous commit"})).await;
    flaky.lose_activate_answer.store(false, Ordering::SeqCst);
    assert_eq!(app.octopus_me(issued["api_key"].as_str().unwrap()).await.status(), 200);
    assert_eq!(app.keybroker_keys_in_octopus().len(), 1);
    let record: Value =
        app.get(&format!("/v1/keys/{}", issued["id"].as_str().unwrap()), &app.alice()).await.json().await.unwrap();
    assert_eq!(record["state"], "active");
    assert_chain_verifies(&app).await;
}
