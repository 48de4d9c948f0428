//! `keybroker dev`: the Octopus simulator, a temporary SQLite database, a demo policy and
//! keybroker in one process, with tokens and curl lines to paste.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use jsonwebtoken::{EncodingKey, Header};
use rand::RngCore;
use serde_json::json;

use crate::app::{App, shutdown_signal};
use crate::config::Config;
use crate::dev_idp::{DevIdp, DevIdpSettings, DevUser};
use octopus_sim::{DEMO_BROKER_API_KEY, RunningSimulator, Seed, Simulator};

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
    demo_config(octopus_url, listen, db_path, &hs256_auth(), "")
}

/// `[auth]` for tests and `keybroker mint-token`: HS256 tokens from a shared secret file.
fn hs256_auth() -> String {
    format!(
        r#"[auth]
issuer = "{DEV_ISSUER}"
audience = "{DEV_AUDIENCE}"
algorithms = ["HS256"]
hs256_secret_file = "jwt-hs256"
teams_claim = "groups"
admin_teams = ["platform-admins"]
auditor_teams = ["security"]

"#
    )
}

/// The demo configuration with `auth` as its `[auth]` section (and whatever follows it), and
/// `audit` added to its `[audit]` section.
fn demo_config(octopus_url: &str, listen: &str, db_path: &Path, auth: &str, audit: &str) -> String {
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

{auth}[audit]
hmac_secret_file = "audit-hmac"
{audit}
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
        db = db_path.display(),
    )
}

/// The page's client id at the development provider.
pub const DEV_CLIENT_ID: &str = "keybroker-page";

/// `[auth]`, `[ui]` and `[tickets]` of `keybroker dev`: people sign in at the development
/// provider (EdDSA tokens, verified through its JWKS); members of `chatops` may create tickets.
fn dev_auth(idp_issuer: &str) -> String {
    format!(
        r#"[auth]
issuer = "{idp_issuer}"
audience = "{DEV_AUDIENCE}"
algorithms = ["EdDSA"]
jwks_url = "{idp_issuer}/jwks"
teams_claim = "groups"
admin_teams = ["platform-admins"]
auditor_teams = ["security"]
delegate_teams = ["chatops"]

[ui]
issuer = "{idp_issuer}"
client_id = "{DEV_CLIENT_ID}"

[tickets]
lifetime = "15m"

"#
    )
}

/// The demo people of the development provider, and the chat-ops bot.
pub fn dev_people() -> (Vec<DevUser>, DevUser) {
    let people = vec![
        DevUser::new("alice@example.com", "Alice (payments)", &["payments"], "requester, team payments"),
        DevUser::new("bob@example.com", "Bob (web)", &["web"], "requester, team web"),
        DevUser::new("sam@example.com", "Sam (security)", &["security"], "auditor"),
        DevUser::new("root@example.com", "Robin (platform admin)", &["platform-admins"], "admin"),
    ];
    let bot = DevUser::new("chatops-bot", "Deploy bot (chat-ops)", &["chatops"], "may create pickup tickets");
    (people, bot)
}

/// Everything `keybroker dev` runs: the simulator, the development identity provider and
/// keybroker with the page, over a temporary SQLite database. The browser tests start the same.
pub struct DevEnvironment {
    /// keybroker's address, `http://127.0.0.1:<port>`.
    pub url: String,
    pub octopus_url: String,
    pub idp: Arc<DevIdp>,
    pub bot: DevUser,
    pub dir: tempfile::TempDir,
    pub app: App,
    pub listener: tokio::net::TcpListener,
    sim: RunningSimulator,
    idp_task: tokio::task::JoinHandle<()>,
}

impl DevEnvironment {
    /// Binds keybroker to `port` on 127.0.0.1 (or a free port if it is taken; 0 for any).
    pub async fn start(port: u16) -> anyhow::Result<Self> {
        let simulator = Simulator::new(Seed::demo()).context("cannot seed the Octopus simulator")?;
        let sim = simulator.spawn(([127, 0, 0, 1], 0).into()).await.context("cannot start the Octopus simulator")?;
        let octopus_url = sim.url();

        let dir =
            tempfile::Builder::new().prefix("keybroker-dev-").tempdir().context("cannot create a temporary folder")?;
        std::fs::write(dir.path().join("octopus-api-key"), DEMO_BROKER_API_KEY)?;
        std::fs::write(dir.path().join("jwt-hs256"), random_secret())?;
        std::fs::write(dir.path().join("audit-hmac"), random_secret())?;
        // The audit chain is keyed in dev too, with a key of its own.
        std::fs::write(dir.path().join("chain-key"), random_secret())?;

        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("note: port {port} is not free ({e}); using an ephemeral port instead");
                tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?
            }
        };
        let listen = listener.local_addr()?;
        let url = format!("http://{listen}");
        let idp_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let idp_issuer = format!("http://{}", idp_listener.local_addr()?);
        let (people, bot) = dev_people();
        let idp = DevIdp::new(DevIdpSettings {
            issuer: idp_issuer.clone(),
            audience: DEV_AUDIENCE.to_owned(),
            client_id: DEV_CLIENT_ID.to_owned(),
            redirect_uri: format!("{url}/"),
            users: people,
        })?;
        let idp_task = idp.clone().spawn(idp_listener);

        let config_path = dir.path().join("keybroker.toml");
        let text = demo_config(
            &octopus_url,
            &listen.to_string(),
            &dir.path().join("keybroker.db"),
            &dev_auth(&idp_issuer),
            "chain_key_file = \"chain-key\"\n",
        );
        std::fs::write(&config_path, text)?;
        let config = Config::load(&config_path)?;
        let app = App::build(config).await?.with_config_path(&config_path);
        Ok(Self { url, octopus_url, idp, bot, dir, app, listener, sim, idp_task })
    }

    /// A token for one of the provider's people (by subject), or the bot.
    pub fn token(&self, subject: &str) -> anyhow::Result<String> {
        let user = if subject == self.bot.subject { Some(&self.bot) } else { self.idp.user(subject) };
        let user = user.ok_or_else(|| anyhow::anyhow!("no dev user {subject}"))?;
        self.idp.access_token(user, std::time::Duration::from_secs(12 * 3600))
    }

    /// Serves until `shutdown`, then stops the provider and the simulator.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self { app, listener, sim, idp_task, dir, .. } = self;
        let result = app.serve(listener, shutdown).await;
        idp_task.abort();
        sim.shutdown().await;
        drop(dir);
        result
    }
}

pub async fn run(port: u16) -> anyhow::Result<()> {
    let env = DevEnvironment::start(port).await?;
    let tokens = [
        env.token("alice@example.com")?,
        env.token("sam@example.com")?,
        env.token("root@example.com")?,
        env.token(&env.bot.subject)?,
    ];
    print_banner(&env, &tokens);
    env.serve(shutdown_signal()).await
}

fn print_banner(env: &DevEnvironment, [requester, auditor, admin, bot]: &[String; 4]) {
    let (url, octopus_url, dir) = (&env.url, &env.octopus_url, env.dir.path().display());
    let idp = env.idp.issuer();
    println!(
        r#"
keybroker dev is running (stop with Ctrl-C; everything below is thrown away then).

  The page           {url}/        (sign in as alice, request a key, revoke it)
  Swagger UI         {url}/docs
  OpenAPI            {url}/openapi.json
  Identity provider  {idp}   (development only: "sign in as", no passwords)
  Octopus simulator  {octopus_url}
  config and data    {dir}

Open {url}/ in a browser and sign in as alice. Or paste these into a shell (tokens are valid
for 12 hours):

  export KB={url}
  export OCTOPUS={octopus_url}
  export REQUESTER_TOKEN={requester}
  export AUDITOR_TOKEN={auditor}
  export ADMIN_TOKEN={admin}
  export BOT_TOKEN={bot}

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

A chat-ops bot asks for alice; she opens the pickup_url, signs in and claims the key there:
  curl -s -X POST $KB/v1/tickets -H "Authorization: Bearer $BOT_TOKEN" -H "Content-Type: application/json" \
       -d '{{"for":"alice@example.com","scope":"payments-deploy","purpose":"hotfix, asked in #payments"}}'

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
"#
    );
}
