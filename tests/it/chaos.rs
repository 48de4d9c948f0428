//! The chaos soak: two `keybroker serve` replicas on one PostgreSQL database, issuances from many
//! requesters retried as the README tells callers to, while the simulator fails, loses and delays
//! answers and one replica is killed with SIGKILL and restarted. Afterwards the books must
//! balance: Octopus's keybroker keys are exactly the active records, nothing is pending, the
//! trail verifies, no webhook notice arrived twice, and no answer was a 5xx beyond 502/503/504.
//!
//! CI runs it small (100 issuances, 10 requesters, one kill). The full size, with PostgreSQL
//! restarted once (which would disturb other tests, so only on request):
//!
//! ```sh
//! KEYBROKER_CHAOS_FULL=1 KEYBROKER_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo test --release --test it chaos -- --nocapture
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use keybroker::config::RawWebhook;
use keybroker::dev::{DEV_AUDIENCE, DEV_ISSUER, mint_token};
use keybroker::store::Store;
use octopus_sim::{Fault, FaultKind, Seed, Simulator};
use reqwest::Method;
use serde_json::json;

use crate::helpers::{JWT_SECRET, demo_file, keybroker_command, postgres_url, secs, write_file, write_secret_files};

struct Replica {
    url: String,
    config: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Replica {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.config.with_file_name("serve.log"))
            .unwrap();
        let child = keybroker_command(&["serve", "--config", self.config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL: no clean-up code runs
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_healthy(url: &str) {
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http.get(format!("{url}/healthz")).send().await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("keybroker serve did not come up at {url}");
}

#[derive(Default, Debug)]
struct Tally {
    issued: usize,
    replayed: usize,
    gave_up: usize,
    retries: usize,
    statuses: HashMap<u16, usize>,
    /// Answers that are 5xx but not 502/503/504.
    violations: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaos_soak_leaves_the_books_balanced() {
    let Some(admin_url) = postgres_url() else { return };
    let full = std::env::var_os("KEYBROKER_CHAOS_FULL").is_some();
    let (issuances, requesters, kills) = if full { (1000, 50, 3) } else { (100, 10, 1) };

    let name = format!("kb_chaos_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
    let mut db_url = url::Url::parse(&admin_url).unwrap();
    db_url.set_path(&name);

    // Octopus on a bad day: 10 % errors, 5 % answers lost after the key was made, 5 % slower
    // than keybroker's timeout, on every create.
    let sim = Simulator::new(Seed::demo()).unwrap();
    let running = sim.spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let create = "/api/users/{id}/apikeys";
    let error = FaultKind::Status { status: 500, error_message: "chaos".to_owned() };
    sim.inject(Fault::on(Method::POST, create, error).per_mille(100));
    sim.inject(Fault::on(Method::POST, create, FaultKind::LoseResponseAfterCreate).per_mille(50));
    sim.inject(Fault::on(Method::POST, create, FaultKind::Latency(Duration::from_secs(3))).per_mille(50));

    // The webhook receiver counts every delivery id.
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = received.clone();
    let router = Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap| {
            let sink = sink.clone();
            async move {
                let id = headers.get("x-keybroker-delivery").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                sink.lock().unwrap().push(id);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let mut replicas = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        write_secret_files(dir.path());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listen = format!("127.0.0.1:{port}");
        let unused = dir.path().join("unused.db");
        let mut file = demo_file(&running.url(), &listen, &unused);
        file.database.url = Some(db_url.to_string());
        let octopus = crate::helpers::octopus(&mut file);
        octopus.timeout = secs(2);
        // keybroker's own outbound pace (150 a minute, for a real server) is not what is tested.
        octopus.max_requests_per_minute = 0;
        crate::helpers::scope(&mut file, "reporting-readonly").max_active_keys_per_requester = 10_000;
        file.server.request_timeout = secs(10);
        file.server.rate_limit_per_minute = 0;
        file.jobs.reconcile_interval = secs(1);
        file.jobs.pending_grace = secs(5);
        file.jobs.webhook_interval = std::time::Duration::from_millis(200).into();
        file.jobs.drift_interval = secs(2);
        file.webhooks.push(RawWebhook {
            name: Some("soak".to_owned()),
            url: hook.clone(),
            events: vec!["key.issued".to_owned()],
            unsigned: true,
            ..Default::default()
        });
        let config = write_file(dir.path(), &file);
        let mut replica = Replica { url: format!("http://{listen}"), config, child: None };
        replica.start();
        wait_healthy(&replica.url).await;
        replicas.push(replica);
        dirs.push(dir);
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let replicas = Arc::new(tokio::sync::Mutex::new(replicas));

    // The load: workers take issuances one by one and retry them as callers should.
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..requesters)
            .map(|r| {
                let sub = format!("soak-{r}@example.com");
                mint_token(JWT_SECRET, DEV_ISSUER, DEV_AUDIENCE, &sub, &sub, &["data"], chrono::Duration::hours(2))
                    .unwrap()
            })
            .collect(),
    );
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (next, done, tally, tokens, urls) =
            (next.clone(), done.clone(), tally.clone(), tokens.clone(), urls.clone());
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= issuances {
                    return;
                }
                issue_with_retries(&http, &urls, &tokens[i % tokens.len()], i, &tally).await;
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // The chaos: replica 0 killed and restarted `kills` times; PostgreSQL restarted once (full).
    let mut restarted_postgres = false;
    for k in 1..=kills {
        let at = issuances * k / (kills + 1);
        while done.load(Ordering::SeqCst) < at {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        replicas.lock().await[0].kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if full && k == 2 && !restarted_postgres {
            let cluster = std::fs::read_dir("/etc/postgresql").unwrap().next().unwrap().unwrap().file_name();
            let status = std::process::Command::new("pg_ctlcluster")
                .args(["--skip-systemctl-redirect", cluster.to_str().unwrap(), "main", "restart"])
                .status()
                .unwrap();
            assert!(status.success(), "PostgreSQL restarted");
            restarted_postgres = true;
        }
        let mut guard = replicas.lock().await;
        guard[0].start();
        let url = guard[0].url.clone();
        drop(guard);
        wait_healthy(&url).await;
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let load_time = started.elapsed();
    sim.clear_faults();

    // Let the reconciler, drift and the webhooks finish what the chaos left.
    let store = keybroker::store::PgStore::connect(db_url.as_str()).await.unwrap();
    let pool = sqlx::PgPool::connect(db_url.as_str()).await.unwrap();
    let settle = Instant::now();
    let balanced = loop {
        let active: HashSet<String> =
            sqlx::query_scalar::<_, String>("SELECT octopus_key_id FROM key_records WHERE state = 'active'")
                .fetch_all(&pool)
                .await
                .unwrap()
                .into_iter()
                .collect();
        let in_octopus: HashSet<String> =
            sim.api_keys().into_iter().filter(|k| k.purpose.starts_with("keybroker:")).map(|k| k.id).collect();
        let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM key_records WHERE state = 'pending'")
            .fetch_one(&pool)
            .await
            .unwrap();
        // Deliveries a killed replica had claimed wait out their claim (5 minutes): leave them.
        let outbox: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at < now() + interval '1 minute'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        // Every issued key's notice is in the outbox (queued by the webhook job).
        let notices: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries").fetch_one(&pool).await.unwrap();
        if active == in_octopus && pending == 0 && outbox == 0 && notices == active.len() as i64 {
            break (active.len(), in_octopus.len());
        }
        assert!(
            settle.elapsed() < Duration::from_secs(120),
            "not settled: {} active, {} in Octopus ({} not recorded, {} gone), {pending} pending, {outbox} notices due",
            active.len(),
            in_octopus.len(),
            in_octopus.difference(&active).count(),
            active.difference(&in_octopus).count()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let verification =
        keybroker::services::audit_watch::AuditWatch::new(None).verify(&store, 10_000_000).await.unwrap();
    if let Some(dir) = std::env::var_os("KEYBROKER_CHAOS_LOGS") {
        for (i, d) in dirs.iter().enumerate() {
            let _ =
                std::fs::copy(d.path().join("serve.log"), std::path::Path::new(&dir).join(format!("replica-{i}.log")));
        }
    }
    drop(replicas);
    let received = received.lock().unwrap().clone();
    let distinct: HashSet<&String> = received.iter().collect();
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_events").fetch_one(&pool).await.unwrap();
    let delivered: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'delivered'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!(
        "chaos soak: {issuances} issuances from {requesters} requesters in {:.1} s with {kills} kill(s){}; \
         {} issued, {} replayed, {} gave up, {} retries; answers {:?}; settled in {:.1} s with {} active keys = \
         {} Octopus keys; {} notices received, {} distinct, {delivered} recorded delivered, {held} held by a killed replica's claim; \
         {events} audit events verified",
        load_time.as_secs_f64(),
        if restarted_postgres { " and a PostgreSQL restart" } else { "" },
        tally.issued,
        tally.replayed,
        tally.gave_up,
        tally.retries,
        tally.statuses,
        settle.elapsed().as_secs_f64(),
        balanced.0,
        balanced.1,
        received.len(),
        distinct.len()
    );
    assert!(tally.violations.is_empty(), "5xx beyond 502/503/504: {:?}", tally.violations);
    // Every issuance answers within its deadline: never the request timeout's 408.
    assert_eq!(tally.statuses.get(&408), None, "{:?}", tally.statuses);
    assert_eq!(verification.first_break, None, "the trail verifies");
    assert_eq!(distinct.len(), received.len(), "no notice arrived twice");
    // Each recorded delivery arrived; one a killed replica was sending may have arrived too.
    assert!(received.len() as i64 >= delivered && received.len() as i64 <= delivered + held, "{delivered} {held}");
    assert!(tally.issued + tally.replayed + tally.gave_up == issuances);
    assert!(tally.gave_up * 20 <= issuances, "retries get their keys: {} of {issuances} gave up", tally.gave_up);
    pool.close().await;
    store.close().await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await;
}

/// One issuance, retried with the same Idempotency-Key on 502/503/504 and on a replica that is
/// not answering (the other one is tried), and after 409 (the first attempt still in progress).
async fn issue_with_retries(http: &reqwest::Client, urls: &[String], token: &str, i: usize, tally: &Mutex<Tally>) {
    let key = format!("soak-{i}");
    let body = json!({"scope": "reporting-readonly", "purpose": format!("soak {i}")});
    let mut replica = i % urls.len();
    let give_up_at = Instant::now() + Duration::from_secs(90);
    loop {
        let sent = http
            .post(format!("{}/v1/keys", urls[replica]))
            .bearer_auth(token)
            .header("Idempotency-Key", &key)
            .json(&body)
            .send()
            .await;
        let status = match sent {
            Ok(res) => res.status().as_u16(),
            Err(_) => 0,
        };
        {
            let mut t = tally.lock().unwrap();
            *t.statuses.entry(status).or_default() += 1;
            match status {
                201 => {
                    t.issued += 1;
                    return;
                }
                200 => {
                    t.replayed += 1;
                    return;
                }
                500..=599 if ![502, 503, 504].contains(&status) => t.violations.push(format!("{key}: {status}")),
                _ => {}
            }
            if Instant::now() > give_up_at {
                t.gave_up += 1;
                return;
            }
            t.retries += 1;
        }
        if status == 0 {
            replica = (replica + 1) % urls.len();
        }
        tokio::time::sleep(Duration::from_millis(if status == 409 { 500 } else { 150 })).await;
    }
}
