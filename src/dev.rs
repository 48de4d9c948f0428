//! `keybroker dev`: the Octopus simulator, a temporary SQLite database, a demo policy and
//! keybroker in one process, with tokens and curl lines to paste.

use std::path::Path;

use anyhow::Context;
use jsonwebtoken::{EncodingKey, Header};
use rand::RngCore;
use serde_json::json;

use crate::app::{App, shutdown_signal};
use crate::config::Config;
use crate::octopus_sim::{DEMO_BROKER_API_KEY, Seed, Simulator};

pub const DEV_ISSUER: &str = "https://keybroker-dev.local/";
pub const DEV_AUDIENCE: &str = "keybroker";

/// Signs an HS256 token for keybroker's `[auth]` (dev mode and tests).
pub fn mint_token(
    secret: &str,
    issuer: &str,
    audience: &str,
    subject: &str,
    name: &str,
    groups: &[&str],
    ttl: chrono::Duration,
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "name": name,
        "groups": groups,
        "iat": now,
        "nbf": now - 5,
        "exp": now + ttl.num_seconds(),
    });
    Ok(jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The demo configuration: three scopes on the simulator's service accounts.
pub fn demo_config_toml(octopus_url: &str, listen: &str, db_path: &Path) -> String {
    format!(
        r#"# Written by `keybroker dev`; a commented reference is keybroker.example.toml.
[server]
listen = "{listen}"
cors_allowed_origins = ["http://localhost:3000"]

[database]
url = "sqlite://{db}"

[octopus]
url = "{octopus_url}"
api_key_file = "octopus-api-key"
timeout = "10s"

[auth]
issuer = "{DEV_ISSUER}"
audience = "{DEV_AUDIENCE}"
algorithms = ["HS256"]
hs256_secret_file = "jwt-hs256"
teams_claim = "groups"
admin_teams = ["platform-admins"]
auditor_teams = ["security"]

[audit]
hmac_secret_file = "audit-hmac"

[[scopes]]
name = "payments-deploy"
description = "Deploy the payments services"
octopus_user = "svc-payments-deploy"
teams = ["payments"]
default_ttl = "7d"
max_ttl = "30d"
max_active_keys_per_requester = 3

[[scopes]]
name = "web-deploy"
description = "Deploy the public web site"
octopus_user = "svc-web-deploy"
teams = ["web"]
default_ttl = "1d"
max_ttl = "7d"
max_active_keys_per_requester = 2

[[scopes]]
name = "reporting-readonly"
description = "Read deployment data for reports"
octopus_user = "svc-readonly-reporting"
teams = ["payments", "web", "data"]
default_ttl = "12h"
max_ttl = "3d"
max_active_keys_per_requester = 5
"#,
        db = db_path.display()
    )
}

pub async fn run(port: u16) -> anyhow::Result<()> {
    let simulator = Simulator::new(Seed::demo()).context("cannot seed the Octopus simulator")?;
    let sim = simulator.spawn(([127, 0, 0, 1], 0).into()).await.context("cannot start the Octopus simulator")?;
    let octopus_url = sim.url();

    let dir =
        tempfile::Builder::new().prefix("keybroker-dev-").tempdir().context("cannot create a temporary folder")?;
    let jwt_secret = random_secret();
    std::fs::write(dir.path().join("octopus-api-key"), DEMO_BROKER_API_KEY)?;
    std::fs::write(dir.path().join("jwt-hs256"), &jwt_secret)?;
    std::fs::write(dir.path().join("audit-hmac"), random_secret())?;

    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("note: port {port} is not free ({e}); using an ephemeral port instead");
            tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?
        }
    };
    let listen = listener.local_addr()?;
    let config_path = dir.path().join("keybroker.toml");
    std::fs::write(
        &config_path,
        demo_config_toml(&octopus_url, &listen.to_string(), &dir.path().join("keybroker.db")),
    )?;
    let config = Config::load(&config_path)?;
    let app = App::build(config).await?.with_config_path(&config_path);

    let ttl = chrono::Duration::hours(12);
    let requester =
        mint_token(&jwt_secret, DEV_ISSUER, DEV_AUDIENCE, "alice@example.com", "Alice (payments)", &["payments"], ttl)?;
    let auditor =
        mint_token(&jwt_secret, DEV_ISSUER, DEV_AUDIENCE, "sam@example.com", "Sam (security)", &["security"], ttl)?;
    let admin = mint_token(
        &jwt_secret,
        DEV_ISSUER,
        DEV_AUDIENCE,
        "root@example.com",
        "Robin (platform admin)",
        &["platform-admins"],
        ttl,
    )?;
    print_banner(&format!("http://{listen}"), &octopus_url, dir.path(), &requester, &auditor, &admin);

    app.serve(listener, shutdown_signal()).await?;
    sim.shutdown().await;
    Ok(())
}

fn print_banner(url: &str, octopus_url: &str, dir: &Path, requester: &str, auditor: &str, admin: &str) {
    println!(
        r#"
keybroker dev is running (stop with Ctrl-C; everything below is thrown away then).

  keybroker          {url}
  OpenAPI            {url}/openapi.json
  Octopus simulator  {octopus_url}
  config and data    {dir}

Paste these into a shell (tokens are valid for 12 hours):

  export KB={url}
  export OCTOPUS={octopus_url}
  export REQUESTER_TOKEN={requester}
  export AUDITOR_TOKEN={auditor}
  export ADMIN_TOKEN={admin}

Who am I, and what may I ask for (alice, team payments):
  curl -s $KB/v1/me -H "Authorization: Bearer $REQUESTER_TOKEN"
  curl -s $KB/v1/scopes -H "Authorization: Bearer $REQUESTER_TOKEN"

Issue a key (the api_key in the answer is shown this once; note its id):
  curl -s -X POST $KB/v1/keys -H "Authorization: Bearer $REQUESTER_TOKEN" -H "Content-Type: application/json" \
       -d '{{"scope":"payments-deploy","purpose":"trying keybroker","ttl":"2d"}}'

Use the key against Octopus (paste the api_key):
  curl -s $OCTOPUS/api/users/me -H "X-Octopus-ApiKey: API-PASTE-THE-KEY"

List, read and revoke (paste the id):
  curl -s $KB/v1/keys -H "Authorization: Bearer $REQUESTER_TOKEN"
  curl -s $KB/v1/keys/ID -H "Authorization: Bearer $REQUESTER_TOKEN"
  curl -s -X DELETE $KB/v1/keys/ID -H "Authorization: Bearer $REQUESTER_TOKEN"

After the revoke, the Octopus call above answers 401.

As an auditor (sam, team security) or an admin (robin, team platform-admins):
  curl -s "$KB/v1/keys?state=active" -H "Authorization: Bearer $AUDITOR_TOKEN"
  curl -s $KB/v1/audit -H "Authorization: Bearer $AUDITOR_TOKEN"
  curl -s $KB/v1/audit/verify -H "Authorization: Bearer $AUDITOR_TOKEN"
  curl -s -X POST $KB/v1/keys/identify -H "Authorization: Bearer $ADMIN_TOKEN" -H "Content-Type: application/json" \
       -d '{{"api_key":"API-PASTE-THE-KEY"}}'
  curl -s -X POST $KB/v1/keys -H "Authorization: Bearer $ADMIN_TOKEN" -H "Content-Type: application/json" \
       -d '{{"scope":"web-deploy","purpose":"admins may request any scope"}}'

Health:
  curl -s $KB/healthz; curl -s $KB/readyz
"#,
        dir = dir.display()
    );
}
