//! docker-compose.yml and the Dockerfile cannot be run here (no Docker engine), so their
//! contract with the service is checked instead: every variable, secret, port, volume and
//! dependency they name must fit keybroker's configuration and each other.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use keybroker::config::Config;
use octopus_sim::{Seed, Simulator};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn compose() -> Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docker-compose.yml")).unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn environment(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Object(map) => {
            map.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect()
        }
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str()?.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect(),
        _ => Vec::new(),
    }
}

/// `./deploy/x:/etc/y:ro` → (repo path, container path).
fn bind_mounts(service: &Value) -> Vec<(PathBuf, String)> {
    strings(&service["volumes"])
        .into_iter()
        .filter(|v| v.starts_with("./"))
        .map(|v| {
            let mut parts = v.split(':');
            let source = Path::new(ROOT).join(parts.next().unwrap().trim_start_matches("./"));
            (source, parts.next().unwrap().to_owned())
        })
        .collect()
}

fn port_of(addr_or_url: &str) -> u16 {
    let tail = addr_or_url.rsplit(':').next().unwrap();
    tail.split('/').next().unwrap().parse().unwrap()
}

#[test]
fn every_service_dependency_secret_and_mount_exists() {
    let doc = compose();
    let services = doc["services"].as_object().unwrap();
    for name in ["postgres", "octopus-sim", "keybroker", "octopus", "mssql", "keybroker-real"] {
        assert!(services.contains_key(name), "service {name} is missing");
    }
    let declared_secrets = doc["secrets"].as_object().unwrap();
    for (name, secret) in declared_secrets {
        let file = Path::new(ROOT).join(secret["file"].as_str().unwrap().trim_start_matches("./"));
        assert!(file.is_file(), "secret {name} points at {} which does not exist", file.display());
    }
    let volumes = doc["volumes"].as_object().unwrap();
    for (name, service) in services {
        for secret in strings(&service["secrets"]) {
            assert!(declared_secrets.contains_key(&secret), "{name} uses undeclared secret {secret}");
        }
        for (source, _) in bind_mounts(service) {
            assert!(source.exists(), "{name} mounts {} which does not exist", source.display());
        }
        for volume in strings(&service["volumes"]).into_iter().filter(|v| !v.starts_with("./")) {
            let named = volume.split(':').next().unwrap();
            assert!(volumes.contains_key(named), "{name} uses undeclared volume {named}");
        }
        if let Some(deps) = service["depends_on"].as_object() {
            for (dep, how) in deps {
                assert!(services.contains_key(dep), "{name} depends on unknown service {dep}");
                if how["condition"] == "service_healthy" {
                    assert!(
                        services[dep]["healthcheck"].is_object(),
                        "{name} waits for {dep} to be healthy, but {dep} has no health check"
                    );
                }
            }
        }
        if service["profiles"].is_null() {
            // Services of the default profile may not depend on profile-only ones.
            for dep in service["depends_on"].as_object().into_iter().flat_map(|d| d.keys()) {
                assert!(services[dep]["profiles"].is_null(), "{name} depends on {dep}, which only runs in a profile");
            }
        }
    }
}

#[test]
fn keybroker_services_fit_the_configuration_contract() {
    let doc = compose();
    let services = doc["services"].as_object().unwrap();
    let mut checked = 0;
    for (name, service) in services {
        let command = strings(&service["command"]);
        if command.first().map(String::as_str) != Some("serve") {
            continue;
        }
        checked += 1;
        let config_path = &command[command.iter().position(|c| c == "--config").unwrap() + 1];
        let mounts = bind_mounts(service);
        let (source, _) = mounts
            .iter()
            .find(|(_, target)| target == config_path)
            .unwrap_or_else(|| panic!("{name}: {config_path} is not mounted"));
        let text = std::fs::read_to_string(source).unwrap();
        let env = environment(service);

        // Every KEYBROKER_<SECTION>__<KEY> is a known configuration key of the right type.
        Config::check_shape(&text, &env).unwrap_or_else(|e| panic!("{name}: {e}"));
        // And a misspelt one would have been caught.
        assert!(Config::check_shape(&text, &[("KEYBROKER_SERVER__LISTN".to_owned(), "x".to_owned())]).is_err());

        // Every secret file the configuration or the environment names is mounted from a secret.
        let secrets: BTreeSet<String> = strings(&service["secrets"]).into_iter().collect();
        let overridden: BTreeSet<String> = env.iter().map(|(k, _)| k.clone()).collect();
        let table: toml::Table = text.parse().unwrap();
        let mut referenced: Vec<String> = Vec::new();
        for (section, value) in &table {
            let Some(fields) = value.as_table() else { continue };
            for (key, v) in fields {
                let Some(secret) = v.as_str().and_then(|p| p.strip_prefix("/run/secrets/")) else { continue };
                // A file entry replaced by an environment override need not be mounted.
                let env_name = format!("KEYBROKER_{}__{}", section.to_uppercase(), key.to_uppercase());
                if !overridden.contains(&env_name) {
                    referenced.push(secret.to_owned());
                }
            }
        }
        referenced.extend(env.iter().filter_map(|(_, v)| v.strip_prefix("/run/secrets/").map(str::to_owned)));
        assert!(!referenced.is_empty());
        for secret in referenced {
            assert!(secrets.contains(&secret), "{name} needs secret {secret} but does not mount it");
        }

        // The published port, the listen address and the health check agree.
        let listen = env.iter().find(|(k, _)| k == "KEYBROKER_SERVER__LISTEN").map(|(_, v)| v.clone()).unwrap();
        assert!(listen.starts_with("0.0.0.0:"), "{name} must listen on all interfaces inside its container");
        let port = port_of(&listen);
        for mapping in strings(&service["ports"]) {
            assert_eq!(port_of(&mapping), port, "{name}: port mapping {mapping} does not reach {listen}");
        }
        let check = strings(&service["healthcheck"]["test"]).join(" ");
        assert!(check.contains("keybroker healthcheck"), "{name}: {check}");
        assert_eq!(port_of(check.split("--url ").nth(1).unwrap()), port, "{name}: {check}");

        // The Octopus URL names a service of the file, on the port it serves.
        let octopus = env.iter().find(|(k, _)| k == "KEYBROKER_OCTOPUS__URL").map(|(_, v)| v.clone()).unwrap();
        let host = octopus.trim_start_matches("http://").split(':').next().unwrap().to_owned();
        assert!(services.contains_key(&host), "{name}: Octopus host {host} is not a service");
        let target = &services[&host];
        let target_port = if host == "octopus-sim" {
            let cmd = strings(&target["command"]);
            cmd[cmd.iter().position(|c| c == "--port").unwrap() + 1].parse::<u16>().unwrap()
        } else {
            port_of(strings(&target["ports"])[0].as_str())
        };
        assert_eq!(port_of(&octopus), target_port, "{name}: {octopus}");

        // The database URL in its secret names the postgres service and its credentials.
        let url = std::fs::read_to_string(Path::new(ROOT).join("deploy/secrets/database-url")).unwrap();
        let url = url::Url::parse(url.trim()).unwrap();
        assert_eq!(url.host_str(), Some("postgres"));
        let pg_env = environment(&services["postgres"]);
        let get = |k: &str| pg_env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(url.username(), get("POSTGRES_USER"));
        assert_eq!(url.path().trim_start_matches('/'), get("POSTGRES_DB"));
        let password = std::fs::read_to_string(Path::new(ROOT).join("deploy/secrets/postgres-password")).unwrap();
        assert_eq!(url.password(), Some(password.trim()));
    }
    assert_eq!(checked, 2, "both keybroker services must be checked");
}

#[tokio::test]
async fn the_compose_configuration_validates_and_serves_against_its_seed() {
    // The mounted configuration, with /run/secrets/ mapped to deploy/secrets/ and the URLs
    // pointed at local stand-ins, loads and builds the real app.
    let seed = Seed::from_file(&Path::new(ROOT).join("deploy/octopus-sim-seed.toml")).unwrap();
    let sim = Simulator::new(seed).unwrap().spawn(([127, 0, 0, 1], 0).into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = Path::new(ROOT).join("deploy/secrets");
    let mounted = std::fs::read_to_string(Path::new(ROOT).join("deploy/keybroker.toml"))
        .unwrap()
        .replace("/run/secrets/", &format!("{}/", secrets.display()))
        .replace(
            &format!("url_file = \"{}/database-url\"", secrets.display()),
            &format!("url = \"sqlite://{}\"", dir.path().join("k.db").display()),
        )
        .replace("0.0.0.0:8080", "127.0.0.1:0");
    // Its plain-http URL on compose's network is allowed only because the file says so.
    Config::from_toml_str(&mounted, dir.path()).expect("the mounted configuration validates as it is");
    let err = Config::from_toml_str(&mounted.replace("allow_insecure_http = true", ""), dir.path()).unwrap_err();
    assert!(err.to_string().starts_with("octopus.url: must be an https:// URL"), "{err}");
    let text = mounted.replace("http://octopus-sim:8065", &sim.url());
    let config = Config::from_toml_str(&text, dir.path()).unwrap();
    assert_eq!(config.policy.scopes().len(), 3);
    let app = keybroker::app::App::build(config).await.unwrap();
    for scope in app.state.keys.policy().scopes() {
        app.state.keys.scope_account(scope, false).await.unwrap_or_else(|e| panic!("scope {}: {e}", scope.name));
    }
}

#[test]
fn the_compose_seed_is_the_dev_seed() {
    let file = Seed::from_file(&Path::new(ROOT).join("deploy/octopus-sim-seed.toml")).unwrap();
    let demo = Seed::demo();
    assert_eq!(format!("{:?}", file.users), format!("{:?}", demo.users));
    assert_eq!(format!("{:?}", file.api_keys), format!("{:?}", demo.api_keys));
    assert_eq!(file.extra_users, demo.extra_users);
}

#[test]
fn the_image_is_multi_stage_and_runs_as_non_root() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "the Dockerfile must build in one stage and run from another");
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    let user = last_stage.lines().find_map(|l| l.strip_prefix("USER ")).expect("the runtime stage sets USER");
    assert!(!user.starts_with("root") && !user.starts_with('0'), "runs as {user}");
    assert!(last_stage.contains("ENTRYPOINT [\"/usr/local/bin/keybroker\"]"));
    // Every file the build copies exists.
    for line in text.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(Path::new(ROOT).join(source).exists(), "Dockerfile copies missing {source}");
        }
    }
}

/// What the build stage copies is enough to build: the workspace resolves from it, and every file
/// the code compiles in (`include_str!`, `include_bytes!`, `migrate!`) is inside it. A crate or
/// folder added without a `COPY` line breaks `docker build`, which cannot run here.
#[test]
fn the_build_stage_copies_everything_the_build_reads() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let build_stage = text.split("\nFROM ").nth(1).unwrap();
    // Cargo reads .cargo/config.toml too (the allocator's build defines).
    assert!(build_stage.contains("COPY .cargo ./.cargo"), "the build stage must copy .cargo/config.toml");
    let context = tempfile::tempdir().unwrap();
    for line in build_stage.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            copy_tree(&Path::new(ROOT).join(source), &context.path().join(source));
        }
    }
    let metadata = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline", "--locked", "--manifest-path"])
        .arg(context.path().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(metadata.status.success(), "{}", String::from_utf8_lossy(&metadata.stderr));
    let compiled_in = compiled_in_files(context.path());
    assert!(compiled_in.len() >= 5, "{compiled_in:?}");
    for (file, target) in compiled_in {
        assert!(
            target.exists(),
            "{} compiles in {}, which the Dockerfile does not copy",
            file.display(),
            target.display()
        );
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// Every `include_str!("…")`, `include_bytes!("…")` and `migrate!("…")` in the Rust files under
/// `root`, with the path it names (relative to the file, or to the crate for `migrate!`).
fn compiled_in_files(root: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (macro_name, relative_to_crate) in
                [("include_str!(\"", false), ("include_bytes!(\"", false), ("migrate!(\"", true)]
            {
                for piece in text.split(macro_name).skip(1) {
                    let Some(target) = piece.split('"').next() else { continue };
                    let base = if relative_to_crate {
                        path.ancestors().find(|a| a.join("Cargo.toml").exists()).unwrap().to_path_buf()
                    } else {
                        path.parent().unwrap().to_path_buf()
                    };
                    found.push((path.clone(), base.join(target)));
                }
            }
        }
    }
    found
}
