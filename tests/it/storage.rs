//! The storage contract: every test runs against SQLite and, when
//! `KEYBROKER_TEST_POSTGRES_URL` is set (always in CI), against PostgreSQL in a fresh schema.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use keybroker::domain::audit::{Action, GENESIS_HASH, NewAuditEvent, Outcome, RequestContext, verify_chain};
use keybroker::domain::keys::{Activation, Idempotency, KeyState, NewKey};
use keybroker::store::{AuditFilter, KeyFilter, PageRequest, Pending, Store, StoreError};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{backends, second_store};

fn new_key(requester: &str, scope: &str, now: DateTime<Utc>, max_active: u32) -> NewKey {
    NewKey {
        id: Uuid::new_v4(),
        scope: keybroker::domain::policy::ScopeName::parse(scope).unwrap(),
        requester: requester.to_owned(),
        purpose: keybroker::domain::policy::Purpose::parse("contract").unwrap(),
        octopus_user_id: "Users-2".to_owned(),
        created_at: now,
        expires_at: now + Duration::days(1),
        max_active,
        idempotency: None,
        requester_teams: vec!["team-a".to_owned(), "team-b".to_owned()],
        requested_by: Some("chatops-bot".to_owned()),
        ticket: None,
        deadline: None,
    }
}

fn event(actor: &str, action: Action, id: Option<Uuid>) -> NewAuditEvent {
    let mut e = NewAuditEvent::new(
        Utc::now(),
        actor,
        action,
        Outcome::Success,
        &RequestContext {
            request_id: Some("req-1".to_owned()),
            client_addr: Some("127.0.0.1".to_owned()),
            user_agent: Some("contract-test".to_owned()),
            ..Default::default()
        },
    )
    .scope("payments-deploy")
    .detail(json!({"z": 1, "a": {"nested": [1, 2, "three"]}, "note": "ünïcode"}));
    if let Some(id) = id {
        e = e.key(id);
    }
    e
}

fn activation(id: Uuid, n: u32) -> Activation {
    Activation {
        id,
        octopus_key_id: format!("apikeys-{n:026}"),
        key_hint: "API-ABCD".to_owned(),
        secret_hmac: format!("{n:064x}"),
        expires_at: Utc::now() + Duration::days(1),
    }
}

async fn verify(store: &Arc<dyn Store>) -> usize {
    let chain = store.audit_chain(0, 100_000).await.unwrap();
    verify_chain(GENESIS_HASH.to_owned(), &chain, None).unwrap();
    chain.len()
}

#[tokio::test]
async fn a_record_goes_from_pending_to_active_to_revoked() {
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let key = new_key("alice", "payments-deploy", now, 3);
        store.insert_pending(&key, &event("alice", Action::KeyRequested, Some(key.id)), now).await.unwrap();
        let pending = store.get_key(key.id).await.unwrap().unwrap();
        assert_eq!(pending.state, KeyState::Pending, "{name}");
        assert_eq!(pending.octopus_key_id, None, "{name}");

        let active =
            store.activate(&activation(key.id, 1), &event("alice", Action::KeyIssued, Some(key.id))).await.unwrap();
        assert_eq!(active.state, KeyState::Active, "{name}");
        assert_eq!(active.octopus_key_id.as_deref(), Some("apikeys-00000000000000000000000001"), "{name}");
        assert_eq!(active.key_hint.as_deref(), Some("API-ABCD"), "{name}");

        // Activating twice, or failing an active record, is refused.
        let again = store.activate(&activation(key.id, 2), &event("alice", Action::KeyIssued, Some(key.id))).await;
        assert!(matches!(again, Err(StoreError::WrongState { .. })), "{name}");
        let fail = store.mark_failed(key.id, &event("alice", Action::KeyIssueFailed, Some(key.id))).await;
        assert!(matches!(fail, Err(StoreError::WrongState { .. })), "{name}");

        let at = Utc::now();
        let revoked = store.mark_revoked(key.id, at, &event("alice", Action::KeyRevoked, Some(key.id))).await.unwrap();
        assert_eq!(revoked.state, KeyState::Revoked, "{name}");
        assert!(revoked.revoked_at.is_some(), "{name}");
        // Revoking again changes nothing and writes no event.
        let events = verify(&store).await;
        let twice =
            store.mark_revoked(key.id, Utc::now(), &event("alice", Action::KeyRevoked, Some(key.id))).await.unwrap();
        assert_eq!(twice.revoked_at, revoked.revoked_at, "{name}");
        assert_eq!(verify(&store).await, events, "{name}");
        assert_eq!(events, 3, "{name}");

        assert!(store.get_key(Uuid::new_v4()).await.unwrap().is_none(), "{name}");
    }
}

#[tokio::test]
async fn the_active_limit_counts_pending_and_active_unexpired_keys() {
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let a = new_key("alice", "s", now, 2);
        store.insert_pending(&a, &event("alice", Action::KeyRequested, Some(a.id)), now).await.unwrap();
        let b = new_key("alice", "s", now, 2);
        store.insert_pending(&b, &event("alice", Action::KeyRequested, Some(b.id)), now).await.unwrap();
        let c = new_key("alice", "s", now, 2);
        let third = store.insert_pending(&c, &event("alice", Action::KeyRequested, Some(c.id)), now).await;
        assert!(matches!(third, Err(StoreError::LimitReached { active: 2 })), "{name}");
        assert!(store.get_key(c.id).await.unwrap().is_none(), "{name}: a refused insert must write nothing");

        // Other requesters and scopes have their own count.
        let other = new_key("bob", "s", now, 2);
        store.insert_pending(&other, &event("bob", Action::KeyRequested, Some(other.id)), now).await.unwrap();
        let other_scope = new_key("alice", "t", now, 2);
        store.insert_pending(&other_scope, &event("alice", Action::KeyRequested, None), now).await.unwrap();

        // A failed record frees its slot; so does time passing beyond an expiry.
        store.mark_failed(a.id, &event("alice", Action::KeyIssueFailed, Some(a.id))).await.unwrap();
        let d = new_key("alice", "s", now, 2);
        store.insert_pending(&d, &event("alice", Action::KeyRequested, Some(d.id)), now).await.unwrap();
        let later = now + Duration::days(2);
        let e = new_key("alice", "s", later, 2);
        store.insert_pending(&e, &event("alice", Action::KeyRequested, Some(e.id)), later).await.unwrap();
    }
}

/// The limit check reads each requester's holding (kept by triggers) and counts exactly only near
/// the limit: every way out of `pending`/`active` frees a slot, and records past their expiry,
/// which the holding still counts, do not hold one.
#[tokio::test]
async fn the_limit_follows_every_state_change_and_time_past_expiry() {
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let insert = |key: NewKey, at: DateTime<Utc>| {
            let store = store.clone();
            async move {
                let requested = event("alice", Action::KeyRequested, Some(key.id));
                store.insert_pending(&key, &requested, at).await.map(|_| key.id)
            }
        };
        let refused = |result: Result<Uuid, StoreError>| matches!(result, Err(StoreError::LimitReached { active: 3 }));
        let a = insert(new_key("alice", "s", now, 3), now).await.unwrap();
        let b = insert(new_key("alice", "s", now, 3), now).await.unwrap();
        let c = insert(new_key("alice", "s", now, 3), now).await.unwrap();
        store.activate(&activation(a, 901), &event("alice", Action::KeyIssued, Some(a))).await.unwrap();
        store.activate(&activation(b, 902), &event("alice", Action::KeyIssued, Some(b))).await.unwrap();
        assert!(refused(insert(new_key("alice", "s", now, 3), now).await), "{name}: three held");

        store.mark_revoked(a, now, &event("alice", Action::KeyRevoked, Some(a))).await.unwrap();
        insert(new_key("alice", "s", now, 3), now).await.expect("a revocation frees a slot");
        assert!(refused(insert(new_key("alice", "s", now, 3), now).await), "{name}");
        assert!(store.mark_expired(b, &event("alice", Action::KeyExpired, Some(b))).await.unwrap(), "{name}");
        insert(new_key("alice", "s", now, 3), now).await.expect("an expiry frees a slot");
        assert!(refused(insert(new_key("alice", "s", now, 3), now).await), "{name}");
        store.mark_failed(c, &event("alice", Action::KeyIssueFailed, Some(c))).await.unwrap();
        insert(new_key("alice", "s", now, 3), now).await.expect("a failure frees a slot");
        assert!(refused(insert(new_key("alice", "s", now, 3), now).await), "{name}");

        // Two days on, the three held records are past their expiry without being marked so:
        // three simultaneous inserts all go ahead, and a fourth is refused.
        let later = now + Duration::days(2);
        let together: Vec<_> = (0..3).map(|_| tokio::spawn(insert(new_key("alice", "s", later, 3), later))).collect();
        for task in together {
            task.await.unwrap().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(refused(insert(new_key("alice", "s", later, 3), later).await), "{name}");
        // Bob's holding is his own.
        insert(new_key("bob", "s", later, 3), later).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[tokio::test]
async fn listing_filters_by_requester_scope_team_and_effective_state_and_pages_by_cursor() {
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let mut ids = Vec::new();
        for (i, (requester, scope)) in
            [("alice", "s"), ("alice", "t"), ("bob", "s"), ("alice", "s")].into_iter().enumerate()
        {
            let mut key = new_key(requester, scope, now, 10);
            if i == 3 {
                key.expires_at = now + Duration::seconds(5);
            }
            if requester == "bob" {
                key.requester_teams = vec!["team-c".to_owned()];
            }
            store.insert_pending(&key, &event(requester, Action::KeyRequested, Some(key.id)), now).await.unwrap();
            let mut act = activation(key.id, i as u32);
            act.expires_at = key.expires_at;
            store.activate(&act, &event(requester, Action::KeyIssued, Some(key.id))).await.unwrap();
            ids.push(key.id);
        }
        let page = PageRequest { before_seq: None, limit: 50 };
        let all = store.list_keys(&KeyFilter::default(), page).await.unwrap();
        assert_eq!(
            all.iter().map(|k| k.id).collect::<Vec<_>>(),
            ids.iter().rev().copied().collect::<Vec<_>>(),
            "{name}"
        );
        let alice = KeyFilter { requester: Some("alice".to_owned()), ..Default::default() };
        assert_eq!(store.list_keys(&alice, page).await.unwrap().len(), 3, "{name}");
        let alice_s =
            KeyFilter { requester: Some("alice".to_owned()), scope: Some("s".to_owned()), ..Default::default() };
        assert_eq!(store.list_keys(&alice_s, page).await.unwrap().len(), 2, "{name}");

        // A team matches a whole element of the teams the requester had, never a part of one.
        let team = |t: &str| KeyFilter { team: Some(t.to_owned()), ..Default::default() };
        let of = |keys: Vec<keybroker::domain::keys::KeyRecord>| keys.iter().map(|k| k.id).collect::<Vec<_>>();
        assert_eq!(of(store.list_keys(&team("team-c"), page).await.unwrap()), vec![ids[2]], "{name}");
        assert_eq!(store.list_keys(&team("team-a"), page).await.unwrap().len(), 3, "{name}");
        assert_eq!(store.list_keys(&team("team"), page).await.unwrap().len(), 0, "{name}");

        // Ten seconds later the short-lived key counts as expired, though no sweep ran.
        let later = Some(now + Duration::seconds(10));
        let active = KeyFilter { state: Some(KeyState::Active), now: later, ..Default::default() };
        assert_eq!(store.list_keys(&active, page).await.unwrap().len(), 3, "{name}");
        let expired = KeyFilter { state: Some(KeyState::Expired), now: later, ..Default::default() };
        let expired = store.list_keys(&expired, page).await.unwrap();
        assert_eq!(expired.iter().map(|k| k.id).collect::<Vec<_>>(), vec![ids[3]], "{name}");

        // Pages of one, newest first, see every record once.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page =
                store.list_keys(&KeyFilter::default(), PageRequest { before_seq: before, limit: 1 }).await.unwrap();
            let Some(last) = page.last() else { break };
            before = Some(last.seq);
            seen.push(last.id);
        }
        assert_eq!(seen.len(), 4, "{name}");
    }
}

#[tokio::test]
async fn a_secret_is_found_by_its_keyed_hash_only() {
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let key = new_key("alice", "s", now, 3);
        store.insert_pending(&key, &event("alice", Action::KeyRequested, Some(key.id)), now).await.unwrap();
        store.activate(&activation(key.id, 42), &event("alice", Action::KeyIssued, Some(key.id))).await.unwrap();
        let found = store.find_by_secret_hmac(&format!("{:064x}", 42)).await.unwrap().unwrap();
        assert_eq!(found.id, key.id, "{name}");
        assert!(store.find_by_secret_hmac(&format!("{:064x}", 43)).await.unwrap().is_none(), "{name}");
    }
}

#[tokio::test]
async fn pending_records_older_than_a_cutoff_are_listed_for_the_reconciler() {
    for (name, store, _guard) in backends().await {
        let old = Utc::now() - Duration::minutes(10);
        let young = Utc::now();
        let a = new_key("alice", "s", old, 5);
        store.insert_pending(&a, &event("alice", Action::KeyRequested, Some(a.id)), old).await.unwrap();
        let b = new_key("alice", "s", young, 5);
        store.insert_pending(&b, &event("alice", Action::KeyRequested, Some(b.id)), young).await.unwrap();
        let c = new_key("alice", "s", old, 5);
        store.insert_pending(&c, &event("alice", Action::KeyRequested, Some(c.id)), old).await.unwrap();
        store.activate(&activation(c.id, 7), &event("alice", Action::KeyIssued, Some(c.id))).await.unwrap();
        // An old record whose issuance is still within its deadline is its issuer's.
        let mut d = new_key("alice", "s", old, 5);
        d.deadline = Some(Utc::now() + Duration::seconds(30));
        store.insert_pending(&d, &event("alice", Action::KeyRequested, Some(d.id)), old).await.unwrap();
        let cutoff = Utc::now() - Duration::minutes(2);
        let pending = store.pending_before(cutoff, Utc::now(), 10).await.unwrap();
        assert_eq!(pending.iter().map(|k| k.id).collect::<Vec<_>>(), vec![a.id], "{name}");
        let later = store.pending_before(cutoff, Utc::now() + Duration::minutes(1), 10).await.unwrap();
        assert_eq!(later.iter().map(|k| k.id).collect::<Vec<_>>(), vec![a.id, d.id], "{name}: past its deadline");
    }
}

#[tokio::test]
async fn audit_events_round_trip_filter_and_chain() {
    for (name, store, _guard) in backends().await {
        let first = event("alice", Action::KeyRequested, None);
        store.append_audit(&first).await.unwrap();
        let mut second = event("bob", Action::PolicyDenied, None);
        second.outcome = Outcome::Denied;
        second.occurred_at = Utc::now() + Duration::seconds(1);
        store.append_audit(&second).await.unwrap();
        store.append_audit(&event("alice", Action::KeyIssued, Some(Uuid::new_v4()))).await.unwrap();

        let chain = store.audit_chain(0, 10).await.unwrap();
        assert_eq!(chain.len(), 3, "{name}");
        assert_eq!(chain[0].prev_hash, GENESIS_HASH, "{name}");
        assert_eq!(chain[1].prev_hash, chain[0].hash, "{name}");
        assert_eq!(chain[0].id, first.id, "{name}");
        assert_eq!(chain[0].detail, first.detail, "{name}");
        assert_eq!(chain[0].request_id.as_deref(), Some("req-1"), "{name}");
        verify_chain(GENESIS_HASH.to_owned(), &chain, None).unwrap();

        let page = PageRequest { before_seq: None, limit: 10 };
        let by_actor = store
            .list_audit(&AuditFilter { actor: Some("alice".to_owned()), ..Default::default() }, page)
            .await
            .unwrap();
        assert_eq!(by_actor.len(), 2, "{name}");
        let by_action = store
            .list_audit(&AuditFilter { action: Some("policy.denied".to_owned()), ..Default::default() }, page)
            .await
            .unwrap();
        assert_eq!(by_action.len(), 1, "{name}");
        assert_eq!(by_action[0].outcome, "denied", "{name}");
        let in_range = AuditFilter {
            from: Some(second.occurred_at),
            to: Some(second.occurred_at + Duration::milliseconds(1)),
            ..Default::default()
        };
        assert_eq!(store.list_audit(&in_range, page).await.unwrap().len(), 1, "{name}");
        let newest_first =
            store.list_audit(&AuditFilter::default(), PageRequest { before_seq: None, limit: 2 }).await.unwrap();
        assert_eq!(newest_first.len(), 2, "{name}");
        assert!(newest_first[0].seq > newest_first[1].seq, "{name}");
    }
}

#[tokio::test]
async fn concurrent_appends_never_fork_the_chain() {
    for (name, store, _guard) in backends().await {
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store.append_audit(&event(&format!("actor-{i}"), Action::KeyRequested, None)).await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(verify(&store).await, 50, "{name}");
    }
}

#[tokio::test]
async fn two_stores_on_one_database_append_to_one_chain() {
    // Each store remembers the head it last wrote; the other store's appends make that stale.
    for (name, first, guard) in backends().await {
        let second = second_store(&guard).await;
        for i in 0..6 {
            let store = if i % 3 == 0 { &second } else { &first };
            store.append_audit(&event(&format!("actor-{i}"), Action::KeyRequested, None)).await.unwrap();
        }
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let store = if i % 2 == 0 { first.clone() } else { second.clone() };
                tokio::spawn(async move {
                    store.append_audit(&event(&format!("actor-{i}"), Action::KeyRequested, None)).await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(verify(&first).await, 46, "{name}");
        second.close().await;
    }
}

#[tokio::test]
async fn concurrent_requests_of_one_requester_respect_the_limit() {
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let key = new_key("alice", "s", now, 3);
                    store.insert_pending(&key, &event("alice", Action::KeyRequested, Some(key.id)), now).await
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(Pending::Inserted) => ok += 1,
                Err(StoreError::LimitReached { .. }) => {}
                Ok(other) => panic!("{name}: unexpected {other:?}"),
                Err(e) => panic!("{name}: unexpected {e}"),
            }
        }
        assert_eq!(ok, 3, "{name}");
        assert_eq!(verify(&store).await, 3, "{name}");
    }
}

#[tokio::test]
async fn concurrent_writes_of_the_issuance_path_stay_all_or_nothing_each() {
    // Writes that arrive together are committed together; each must still succeed, be refused
    // or fail on its own, and only the writes that went ahead leave events in the chain.
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let taken = new_key("carol", "s", now, 100);
        store.insert_pending(&taken, &event("carol", Action::KeyRequested, Some(taken.id)), now).await.unwrap();
        let pending: Vec<NewKey> = (0..8).map(|i| new_key(&format!("p{i}"), "s", now, 5)).collect();
        for key in &pending {
            store.insert_pending(key, &event(&key.requester, Action::KeyRequested, Some(key.id)), now).await.unwrap();
        }
        let before = verify(&store).await;

        let mut tasks = Vec::new();
        for i in 0..16 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                // Sixteen new records of one requester with room for 10: 6 refused.
                let key = new_key("dave", "s", now, 10);
                match store.insert_pending(&key, &event("dave", Action::KeyRequested, Some(key.id)), now).await {
                    Ok(Pending::Inserted) => "inserted",
                    Err(StoreError::LimitReached { .. }) => "limit",
                    other => panic!("insert {i}: {other:?}"),
                }
            }));
        }
        for (i, key) in pending.iter().enumerate() {
            let (store, id) = (store.clone(), key.id);
            tasks.push(tokio::spawn(async move {
                let a = activation(id, u32::try_from(i).unwrap());
                store.activate(&a, &event("bot", Action::KeyIssued, Some(id))).await.unwrap();
                "activated"
            }));
        }
        for _ in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                // Not a pending record: refused, nothing written.
                let a = activation(Uuid::new_v4(), 99);
                match store.activate(&a, &event("bot", Action::KeyIssued, Some(a.id))).await {
                    Err(StoreError::NotFound(_)) => "not found",
                    other => panic!("{other:?}"),
                }
            }));
        }
        {
            // A record id that exists already: the database refuses it, and only it.
            let store = store.clone();
            let mut clash = new_key("erin", "s", now, 5);
            clash.id = taken.id;
            tasks.push(tokio::spawn(async move {
                match store.insert_pending(&clash, &event("erin", Action::KeyRequested, None), now).await {
                    Err(StoreError::Database(_)) => "failed",
                    other => panic!("{other:?}"),
                }
            }));
        }
        for i in 0..6 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.append_audit(&event(&format!("denied-{i}"), Action::PolicyDenied, None)).await.unwrap();
                "appended"
            }));
        }
        let mut counts = std::collections::BTreeMap::new();
        for task in tasks {
            *counts.entry(task.await.unwrap()).or_insert(0) += 1;
        }
        let expected =
            [("activated", 8), ("appended", 6), ("failed", 1), ("inserted", 10), ("limit", 6), ("not found", 4)];
        assert_eq!(counts, expected.into_iter().collect(), "{name}");
        assert_eq!(verify(&store).await, before + 10 + 8 + 6, "{name}: one event per write that went ahead");
        let erin = AuditFilter { actor: Some("erin".to_owned()), ..Default::default() };
        let erins = store.list_audit(&erin, PageRequest { before_seq: None, limit: 10 }).await.unwrap();
        assert!(erins.is_empty(), "{name}");
        for key in &pending {
            assert_eq!(store.get_key(key.id).await.unwrap().unwrap().state, KeyState::Active, "{name}");
        }
    }
}

#[tokio::test]
async fn simultaneous_retries_with_one_idempotency_key_write_one_record() {
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut key = new_key("alice", "s", now, 5);
                    key.idempotency = Some(Idempotency { key: "retry-1".to_owned(), request_hash: "h1".to_owned() });
                    let requested = event("alice", Action::KeyRequested, Some(key.id));
                    (key.id, store.insert_pending(&key, &requested, now).await.unwrap())
                })
            })
            .collect();
        let mut inserted = Vec::new();
        let mut replayed = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (id, Pending::Inserted) => inserted.push(id),
                (_, Pending::Existing { record, same_request: true }) => replayed.push(record.id),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(inserted.len(), 1, "{name}");
        assert_eq!(replayed, vec![inserted[0]; 7], "{name}");
        assert_eq!(verify(&store).await, 1, "{name}: a replay appends nothing");
    }
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_record_within_the_window() {
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let idem = |hash: &str| Some(Idempotency { key: "retry-1".to_owned(), request_hash: hash.to_owned() });
        let mut first = new_key("alice", "s", now, 5);
        first.idempotency = idem("h1");
        let ev = event("alice", Action::KeyRequested, Some(first.id));
        assert_eq!(store.insert_pending(&first, &ev, now).await.unwrap(), Pending::Inserted, "{name}");

        let mut retry = new_key("alice", "s", now, 5);
        retry.idempotency = idem("h1");
        match store.insert_pending(&retry, &event("alice", Action::KeyRequested, Some(retry.id)), now).await.unwrap() {
            Pending::Existing { record, same_request } => {
                assert_eq!(record.id, first.id, "{name}");
                assert!(same_request, "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        assert!(store.get_key(retry.id).await.unwrap().is_none(), "{name}: a replay writes nothing");

        let mut other_body = new_key("alice", "s", now, 5);
        other_body.idempotency = idem("h2");
        let outcome =
            store.insert_pending(&other_body, &event("alice", Action::KeyRequested, None), now).await.unwrap();
        assert!(matches!(outcome, Pending::Existing { same_request: false, .. }), "{name}");

        // Another requester has its own keys.
        let mut bobs = new_key("bob", "s", now, 5);
        bobs.idempotency = idem("h1");
        assert_eq!(
            store.insert_pending(&bobs, &event("bob", Action::KeyRequested, None), now).await.unwrap(),
            Pending::Inserted,
            "{name}"
        );

        // After the window the key may be used afresh.
        let later = now + Duration::hours(25);
        let mut fresh = new_key("alice", "s", later, 5);
        fresh.idempotency = idem("h1");
        assert_eq!(
            store.insert_pending(&fresh, &event("alice", Action::KeyRequested, None), later).await.unwrap(),
            Pending::Inserted,
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_job_lease_has_one_holder_until_it_expires() {
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let ttl = Duration::seconds(30);
        assert!(store.try_lease("sweep", "a", now, ttl).await.unwrap(), "{name}");
        assert!(!store.try_lease("sweep", "b", now, ttl).await.unwrap(), "{name}: b must wait");
        assert!(store.try_lease("sweep", "a", now + Duration::seconds(10), ttl).await.unwrap(), "{name}: a renews");
        assert!(store.try_lease("other-job", "b", now, ttl).await.unwrap(), "{name}: leases are per job");
        assert!(!store.try_lease("sweep", "b", now + Duration::seconds(30), ttl).await.unwrap(), "{name}");
        assert!(
            store.try_lease("sweep", "b", now + Duration::seconds(41), ttl).await.unwrap(),
            "{name}: expired lease"
        );
        assert!(!store.try_lease("sweep", "a", now + Duration::seconds(42), ttl).await.unwrap(), "{name}");
    }
}

#[tokio::test]
async fn the_outbox_holds_each_notice_once_and_tracks_attempts() {
    use keybroker::store::{DELIVERY_CLAIM, DeliveryResult, NewDelivery};
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let notice = |threshold: &str| NewDelivery {
            webhook: "chat".to_owned(),
            event: "key.expiring".to_owned(),
            key_id: Uuid::nil(),
            threshold: threshold.to_owned(),
            payload: json!({"event": "key.expiring", "n": 1}),
            created_at: now,
        };
        assert!(store.enqueue_delivery(&notice("20d")).await.unwrap(), "{name}");
        assert!(!store.enqueue_delivery(&notice("20d")).await.unwrap(), "{name}: once per threshold");
        assert!(store.enqueue_delivery(&notice("10d")).await.unwrap(), "{name}");
        let due = store.due_deliveries(now, 10).await.unwrap();
        assert_eq!(due.len(), 2, "{name}");
        assert!(
            store.due_deliveries(now, 10).await.unwrap().is_empty(),
            "{name}: claimed rows are not handed out twice"
        );
        assert_eq!(due[0].payload, json!({"event": "key.expiring", "n": 1}), "{name}");
        let retry = DeliveryResult::Retry { next_attempt_at: now + Duration::minutes(1), error: "503".to_owned() };
        assert!(store.finish_delivery(&due[0], &retry).await.unwrap());
        assert!(store.finish_delivery(&due[1], &DeliveryResult::Delivered { at: now }).await.unwrap());
        assert!(!store.finish_delivery(&due[1], &DeliveryResult::Delivered { at: now }).await.unwrap(), "{name}: once");
        assert!(store.due_deliveries(now, 10).await.unwrap().is_empty(), "{name}");
        let later = store.due_deliveries(now + Duration::minutes(2), 10).await.unwrap();
        assert_eq!(later.len(), 1, "{name}");
        assert_eq!(later[0].attempts, 1, "{name}");
        assert!(store.finish_delivery(&later[0], &DeliveryResult::GaveUp { error: "down".to_owned() }).await.unwrap());
        assert!(store.due_deliveries(now + Duration::days(3), 10).await.unwrap().is_empty(), "{name}");

        // A claim that lapsed belongs to its new claimer: the old one can no longer record it.
        let lapsing = NewDelivery { threshold: "lapse".to_owned(), ..notice("") };
        assert!(store.enqueue_delivery(&lapsing).await.unwrap());
        let first = store.due_deliveries(now, 1).await.unwrap().pop().unwrap();
        let second = store.due_deliveries(now + DELIVERY_CLAIM + Duration::seconds(1), 1).await.unwrap().pop().unwrap();
        assert_eq!(first.id, second.id, "{name}");
        let done = DeliveryResult::Delivered { at: now };
        assert!(!store.finish_delivery(&first, &done).await.unwrap(), "{name}: the lapsed claim records nothing");
        assert!(store.finish_delivery(&second, &done).await.unwrap(), "{name}");
    }
}

/// PostgreSQL's batches keep their connection from one batch to the next (no pool ping each
/// time). When the server drops it in between (a restart, an idle timeout), the next write must
/// still succeed, on a fresh connection. The test has a database of its own, so that it drops
/// no other test's connections.
#[tokio::test]
async fn postgres_writes_go_on_when_the_server_drops_the_batch_connection() {
    let Some(url) = crate::helpers::postgres_url() else { return };
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let db = format!("kb_drop_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&admin).await.unwrap();
    let (base, _) = url.rsplit_once('/').expect("a database URL ends with /<database>");
    let store: Arc<dyn Store> = Arc::new(keybroker::store::PgStore::connect(&format!("{base}/{db}")).await.unwrap());
    store.migrate().await.unwrap();

    let now = Utc::now();
    for round in 0..3 {
        let key = new_key("alice", "s", now, 5);
        store.insert_pending(&key, &event("alice", Action::KeyRequested, Some(key.id)), now).await.unwrap();
        let dropped: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&db)
        .fetch_all(&admin)
        .await
        .unwrap();
        assert!(!dropped.is_empty(), "round {round}: the store's connections were not found");
        // The server's goodbye must have reached the dropped connection before the next write.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let key = new_key("alice", "s", now, 5);
    store.insert_pending(&key, &event("alice", Action::KeyRequested, Some(key.id)), now).await.unwrap();
    assert_eq!(verify(&store).await, 4);

    store.close().await;
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)")).execute(&admin).await.unwrap();
    admin.close().await;
}

#[tokio::test]
async fn outbox_rows_from_before_webhook_names_lose_their_urls() {
    use keybroker::store::NewDelivery;
    for (name, store, _guard) in backends().await {
        let now = Utc::now();
        let legacy = |webhook: &str| NewDelivery {
            webhook: webhook.to_owned(),
            event: "key.issued".to_owned(),
            key_id: Uuid::new_v4(),
            threshold: String::new(),
            payload: json!({"event": "key.issued"}),
            created_at: now,
        };
        store.enqueue_delivery(&legacy("https://chat.example.com/hooks/T0K3N")).await.unwrap();
        store.enqueue_delivery(&legacy("https://gone.example.com/hooks/S3CR3T?token=x")).await.unwrap();
        store.enqueue_delivery(&legacy("chat")).await.unwrap();
        let renamed = store
            .name_webhook_deliveries(&[("https://chat.example.com/hooks/T0K3N".to_owned(), "chat".to_owned())])
            .await
            .unwrap();
        assert_eq!(renamed, 2, "{name}");
        let due = store.due_deliveries(now, 10).await.unwrap();
        let names: Vec<&str> = due.iter().map(|d| d.webhook.as_str()).collect();
        assert_eq!(names.len(), 3, "{name}");
        assert_eq!(names.iter().filter(|n| **n == "chat").count(), 2, "{name}: {names:?}");
        assert!(names.iter().any(|n| n.starts_with("removed-")), "{name}: {names:?}");
        assert!(names.iter().all(|n| !n.contains("://")), "{name}: {names:?}");
    }
}
