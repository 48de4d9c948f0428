//! The database as an operator meets it: unreachable at start, failing migrations, outages while
//! serving.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{TestApp, TestOptions, postgres_url};

fn config_with_db(dir: &std::path::Path, db_url: &str) -> std::path::PathBuf {
    crate::helpers::write_secret_files(dir);
    let mut file = crate::helpers::demo_file("http://127.0.0.1:9", "127.0.0.1:0", &dir.join("unused.db"));
    file.database.url = Some(db_url.to_owned());
    crate::helpers::write_file(dir, &file)
}

fn run(args: &[&str]) -> std::process::Output {
    crate::helpers::keybroker_command(args).output().unwrap()
}

#[test]
fn serve_stops_with_a_clear_message_when_the_database_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9 (discard) here.
    let path = config_with_db(dir.path(), "postgres://keybroker@127.0.0.1:9/keybroker");
    let out = run(&["serve", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open the database (database.url)"), "{stderr}");
}

#[test]
fn a_failing_migration_stops_migrate_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tampered.db");
    let path = config_with_db(dir.path(), &format!("sqlite://{}", db.display()));
    let out = run(&["migrate", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Someone edits an applied migration's record: sqlx refuses to go on.
    let status = Command::new("sqlite3").arg(&db).arg("UPDATE _sqlx_migrations SET checksum = X'00'").status();
    if !matches!(status, Ok(s) if s.success()) {
        // No sqlite3 CLI: tamper through sqlx instead.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
            sqlx::query("UPDATE _sqlx_migrations SET checksum = X'00'").execute(&pool).await.unwrap();
            pool.close().await;
        });
    }
    for command in ["migrate", "serve"] {
        let out = run(&[command, "--config", path.to_str().unwrap()]);
        assert!(!out.status.success(), "{command} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot apply the database migrations"), "{command}: {stderr}");
    }
}

/// A TCP proxy in front of PostgreSQL that can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
}

async fn proxy_to(upstream: SocketAddr) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Arc::new(AtomicBool::new(true));
    let flag = up.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if !flag.load(Ordering::SeqCst) {
                continue; // dropped: the connection is refused in effect
            }
            let flag = flag.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(upstream).await else { return };
                let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                let watch = async {
                    while flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                };
                tokio::select! { _ = copy => {}, () = watch => {} }
            });
        }
    });
    Proxy { addr, up }
}

#[tokio::test]
async fn readiness_follows_the_database_through_an_outage() {
    let Some(url) = postgres_url() else { return };
    let parsed = url::Url::parse(&url).unwrap();
    let upstream: SocketAddr =
        format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap_or(5432)).parse().unwrap();
    let proxy = proxy_to(upstream).await;
    let mut via_proxy = parsed.clone();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();

    let schema = format!("kb_test_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await.unwrap();
    let store = keybroker::store::PgStore::connect_in_schema(via_proxy.as_str(), Some(&schema)).await.unwrap();
    keybroker::store::Store::migrate(&store).await.unwrap();
    let app = TestApp::spawn_with(TestOptions { store: Some(Arc::new(store)), ..Default::default() }).await;

    assert_eq!(app.readyz_now().await.status(), 200);

    proxy.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let res = app.readyz_now().await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    let db = body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "database").unwrap().clone();
    assert_eq!(db["ok"], false, "{body}");
    // Issuance fails closed and creates nothing in Octopus.
    let res = app.issue(&app.alice(), serde_json::json!({"scope": "payments-deploy", "purpose": "outage"})).await;
    assert_eq!(res.status(), 503);
    assert!(app.keybroker_keys_in_octopus().is_empty());

    proxy.up.store(true, Ordering::SeqCst);
    let mut recovered = false;
    for _ in 0..50 {
        if app.readyz_now().await.status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(recovered, "/readyz did not recover after the database came back");
    app.issue_ok(&app.alice(), serde_json::json!({"scope": "payments-deploy", "purpose": "after outage"})).await;

    drop(app);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&admin).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_runs_against_a_postgres_url() {
    let Some(url) = postgres_url() else { return };
    let schema = format!("kb_test_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await.unwrap();
    let mut in_schema = url::Url::parse(&url).unwrap();
    in_schema.query_pairs_mut().append_pair("options", &format!("-c search_path={schema}"));
    let dir = tempfile::tempdir().unwrap();
    let path = config_with_db(dir.path(), in_schema.as_str());
    let out = run(&["migrate", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name IN ('key_records', 'audit_events')",
    )
    .bind(&schema)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(tables, 2, "migrate must create the tables in PostgreSQL");
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&admin).await.unwrap();
}

/// Frames in a SQLite database's WAL now, read on a connection of its own.
async fn frames_in_wal(path: &std::path::Path) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    let (_, in_wal, _): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut conn).await.unwrap();
    in_wal
}

/// Under issuances that never pause, SQLite's WAL still starts again from its beginning. With
/// background `PASSIVE` checkpoints alone it never did, and grew without end (400 MB after a
/// minute of the benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_wal_starts_again_from_its_beginning_under_issuances_that_never_pause() {
    // Nothing paces the callers: neither keybroker's limits nor its pace towards Octopus.
    let app = TestApp::spawn_with(TestOptions {
        configure: Box::new(|file| {
            file.server.rate_limit_per_minute = 0;
            keybroker_testkit::octopus(file).max_requests_per_minute = 0;
        }),
        ..Default::default()
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..2)
        .map(|c| {
            let (http, url, stop) = (app.http.clone(), format!("{}/v1/keys", app.url), stop.clone());
            let tokens: Vec<String> =
                (0..50).map(|i| app.token(&format!("wal-{c}-{i}@example.com"), &["payments"])).collect();
            tokio::spawn(async move {
                for token in tokens.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let body =
                        serde_json::json!({"scope": "payments-deploy", "purpose": "wal", "replace_previous": true});
                    let res = http.post(&url).bearer_auth(token).json(&body).send().await.unwrap();
                    assert_eq!(res.status().as_u16(), 201, "{}", res.text().await.unwrap());
                }
            })
        })
        .collect();
    // The restart comes once the WAL holds 16,384 frames (64 MB): a few seconds of these callers.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    let (mut most, mut restarted) = (0, false);
    while !restarted && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = frames_in_wal(&app.db_path()).await;
        if now < 0 {
            continue; // that checkpoint was busy, and counted nothing
        }
        restarted = most > 16_384 && now < most;
        most = most.max(now);
    }
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    assert!(restarted, "the WAL grew to {most} frames and did not start again past 16,384");
    assert!(most < 2 * 16_384, "the WAL grew to {most} frames before it started again");
    app.stop().await;
}
