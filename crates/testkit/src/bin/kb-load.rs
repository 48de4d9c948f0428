//! `kb-load`: offers requests at a fixed rate (open loop; see `keybroker_testkit::load`) and
//! prints their latency percentiles as one JSON line. For `benches/crosscheck.sh`, whose wrk
//! only knows closed loops.
//!
//!   kb-load --url URL --rate 500 --seconds 10 [--method POST] [--body JSON]
//!           [--header 'Name: value']... [--tokens FILE]
//!
//! `--tokens FILE`: one bearer token a line, used in turn (one requester each).
//! `kb-load --reference` prints the benchmark's reference workload in microseconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, bail};
use keybroker_testkit::load::open_loop;

struct Args {
    url: String,
    rate: f64,
    seconds: f64,
    method: reqwest::Method,
    body: Option<String>,
    headers: Vec<(String, String)>,
    tokens: Vec<String>,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        url: String::new(),
        rate: 100.0,
        seconds: 10.0,
        method: reqwest::Method::GET,
        body: None,
        headers: Vec::new(),
        tokens: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--rate" => args.rate = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--method" => args.method = value()?.parse()?,
            "--body" => args.body = Some(value()?),
            "--header" => {
                let header = value()?;
                let (name, v) = header.split_once(':').context("a header is `Name: value`")?;
                args.headers.push((name.trim().to_owned(), v.trim().to_owned()));
            }
            "--tokens" => {
                let text = std::fs::read_to_string(value()?)?;
                args.tokens = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.url.is_empty() || args.rate <= 0.0 || args.seconds <= 0.0 {
        bail!(
            "usage: kb-load --url URL --rate N --seconds N [--method M] [--body JSON] [--header 'N: v'] [--tokens FILE]"
        );
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--reference") {
        // The benchmark's reference workload (see `keybroker_testkit::load::reference_unit`).
        println!("{:.1}", keybroker_testkit::load::reference_unit());
        return Ok(());
    }
    let args = parse()?;
    // Two workers, as the benchmark's own generator: enough for 1,000 requests a second.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
        let args = std::sync::Arc::new(args);
        let run = args.clone();
        let lat = open_loop(args.rate, Duration::from_secs_f64(args.seconds), move |i| {
            let mut request = http.request(run.method.clone(), &run.url);
            for (name, value) in &run.headers {
                request = request.header(name, value);
            }
            if !run.tokens.is_empty() {
                request = request.bearer_auth(&run.tokens[i % run.tokens.len()]);
            }
            if let Some(body) = &run.body {
                request = request.header("content-type", "application/json").body(body.clone());
            }
            async move {
                match request.send().await {
                    Ok(res) if res.status().is_success() => res.bytes().await.is_ok(),
                    _ => false,
                }
            }
        })
        .await;
        println!(
            "{}",
            serde_json::json!({
                "rate": args.rate,
                "offered": lat.offered,
                "failed": lat.failed,
                "answered_per_sec": lat.answered_per_sec(),
                "p50_ms": lat.quantile_ms(0.50),
                "p99_ms": lat.quantile_ms(0.99),
                "p999_ms": lat.quantile_ms(0.999),
                "max_ms": lat.quantile_ms(1.0),
            })
        );
        anyhow::Ok(())
    })
}
