//! Job leases across processes: two `keybroker serve` processes on one PostgreSQL database share
//! the webhook outbox, with a receiver slower than the job's lease, and every notice is delivered
//! exactly once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use keybroker::config::RawWebhook;
use keybroker::store::{NewDelivery, Store};
use octopus_sim::{Seed, Simulator};
use serde_json::json;

use crate::helpers::{demo_file, keybroker_command, postgres_url, write_file, write_secret_files};

/// Kills the process when the test ends, however it ends.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A database of its own, dropped afterwards.
struct Database {
    admin_url: String,
    name: String,
}

impl Drop for Database {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&pool).await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_deliver_each_of_200_notices_once_behind_a_receiver_slower_than_the_lease() {
    let Some(admin_url) = postgres_url() else { return };
    let name = format!("kb_leases_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
    admin.close().await;
    let database = Database { admin_url: admin_url.clone(), name: name.clone() };
    let mut db_url = url::Url::parse(&admin_url).unwrap();
    db_url.set_path(&name);

    // The outbox: 200 notices for the webhook "slow".
    let store = keybroker::store::PgStore::connect(db_url.as_str()).await.unwrap();
    store.migrate().await.unwrap();
    let now = chrono::Utc::now();
    for n in 0..200 {
        let notice = NewDelivery {
            webhook: "slow".to_owned(),
            event: "key.issued".to_owned(),
            key_id: uuid::Uuid::new_v4(),
            threshold: String::new(),
            payload: json!({ "n": n }),
            created_at: now,
        };
        assert!(store.enqueue_delivery(&notice).await.unwrap());
    }

    // The receiver takes longer per request than the job's lease lasts (3 × 20 ms).
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = received.clone();
    let router = Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap| {
            let sink = sink.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(80)).await;
                let id = headers.get("x-keybroker-delivery").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                sink.lock().unwrap().push(id);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let sim = Simulator::new(Seed::demo()).unwrap();
    let running = sim.spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut processes = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        write_secret_files(dir.path());
        let mut file = demo_file(&running.url(), "127.0.0.1:0", &dir.path().join("unused.db"));
        file.database.url = Some(db_url.to_string());
        file.jobs.webhook_interval = Duration::from_millis(20).into();
        file.jobs.reconcile_interval = Duration::from_secs(3600).into();
        file.jobs.drift_interval = Duration::from_secs(3600).into();
        file.webhooks.push(RawWebhook {
            name: Some("slow".to_owned()),
            url: hook_url.clone(),
            unsigned: true,
            ..Default::default()
        });
        let config = write_file(dir.path(), &file);
        let child = keybroker_command(&["serve", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        processes.push(Process(child));
        dirs.push(dir);
    }

    let delivered = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'delivered'")
            .fetch_one(&sqlx::PgPool::connect(db_url.as_str()).await.unwrap())
            .await
            .unwrap()
    };
    let started = std::time::Instant::now();
    while delivered().await < 200 {
        assert!(started.elapsed() < Duration::from_secs(90), "only {} delivered", delivered().await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Anything sent twice would arrive within a claim's send time; wait past that.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(processes);
    let received = received.lock().unwrap().clone();
    let distinct: HashSet<&String> = received.iter().collect();
    assert_eq!(distinct.len(), 200, "every notice arrived");
    assert_eq!(received.len(), 200, "and none twice");
    drop(database);
}
