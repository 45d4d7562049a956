//! Soak: many concurrent streaming clients against `serve` on 127.0.0.1, a share of them leaving
//! mid-stream, on each KV cache in turn (one server process per cache, started by this program
//! from the release binary). Recorded, never a test: it prints one JSON report.
//!
//! Checked per run: every completed stream is well-formed (each event parses, the last chunk
//! has a finish reason, `[DONE]` ends it); no error but the client's own disconnects; the
//! server's resident memory (VmRSS) after warm-up against the end; the KV bytes in use once the
//! server is idle (must be 0).
//!
//! ```sh
//! cargo build --release && cargo run --release --example soak -- --requests 3000 \
//!     --json docs/data/serving/soak.json
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};

#[path = "support/server.rs"]
mod server;
use server::Server;

#[derive(Parser)]
struct Args {
    /// The server binary. [default: target/release/mistralrs-logquant]
    #[arg(long)]
    bin: Option<std::path::PathBuf>,
    /// KV caches to soak, one server each.
    #[arg(long, value_delimiter = ',', default_value = "default,logquant")]
    caches: Vec<String>,
    /// Requests per cache after the warm-up.
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// Requests per cache before memory is first measured.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Clients streaming at once.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Share of requests whose client leaves after the first content chunk.
    #[arg(long, default_value_t = 0.25)]
    disconnect_share: f64,
    /// Most tokens per reply (each request draws 4..=this).
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
    /// Extra flags for `serve`.
    #[arg(long, allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Write the report here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const PROMPTS: &[&str] = &[
    "Say hello.",
    "Write a haiku about the sea.",
    "List three fruits and their colours.",
    "Explain in one paragraph why the sky is blue, for a child of eight.",
    "What is the capital of France? Answer in one word.",
    "Continue the story: The lighthouse keeper opened the door and saw",
    "Translate to French: The cat sleeps on the warm windowsill every afternoon.",
    "Give me a short recipe for pancakes, with quantities, in a numbered list.",
];

/// What one request ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Completed,
    Disconnected,
    Error,
}

fn start(bin: &std::path::Path, cache: &str, extra: &[String]) -> Result<Server> {
    let mut flags = vec!["--kv-cache".to_string(), cache.to_string()];
    flags.extend_from_slice(extra);
    server::start(bin, &flags)
}

/// The server's resident memory in bytes (VmRSS).
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// One streamed request; `leave` drops the connection after the first content chunk.
async fn one(
    client: &reqwest::Client,
    base: &str,
    n: usize,
    leave: bool,
    max_tokens: usize,
) -> (Outcome, String) {
    let body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": PROMPTS[n % PROMPTS.len()]}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": n,
        "stream": true,
    });
    let response = match client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return (Outcome::Error, format!("send: {e}")),
    };
    if !response.status().is_success() {
        let status = response.status();
        return (
            Outcome::Error,
            format!("{status}: {}", response.text().await.unwrap_or_default()),
        );
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let (mut finished, mut done) = (false, false);
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return (Outcome::Error, format!("stream: {e}")),
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let value: Value = match serde_json::from_str(data) {
                Ok(v) => v,
                Err(e) => return (Outcome::Error, format!("bad event {data:?}: {e}")),
            };
            if value.get("error").is_some() {
                return (Outcome::Error, format!("error event {data}"));
            }
            if leave {
                return (Outcome::Disconnected, String::new());
            }
            finished |= value["choices"][0]["finish_reason"].is_string();
        }
    }
    match (finished, done) {
        (true, true) => (Outcome::Completed, String::new()),
        _ => (
            Outcome::Error,
            format!("stream ended without finish reason or [DONE]: {buffer}"),
        ),
    }
}

/// `count` requests by `clients` concurrent clients; outcomes and the first errors.
async fn run_requests(
    args: &Args,
    base: &str,
    first: usize,
    count: usize,
) -> (Vec<Outcome>, Vec<String>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client");
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let share = args.disconnect_share;
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| {
            let (client, next, results, base) = (
                client.clone(),
                next.clone(),
                results.clone(),
                base.to_string(),
            );
            let max = args.max_tokens.max(4);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count {
                        return;
                    }
                    let n = first + i;
                    // A fixed pattern, not a generator: the same requests on every cache.
                    let leave = ((n * 7919) % 1000) as f64 / 1000.0 < share;
                    let max_tokens = 4 + (n * 31) % (max - 3);
                    let (outcome, error) = one(&client, &base, n, leave, max_tokens).await;
                    let mut r = results.lock().unwrap();
                    r.0.push(outcome);
                    if !error.is_empty() && r.1.len() < 10 {
                        r.1.push(error);
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(tasks).await;
    let r = results.lock().unwrap();
    (r.0.clone(), r.1.clone())
}

async fn soak(args: &Args, bin: &std::path::Path, cache: &str) -> Result<Value> {
    let server = start(bin, cache, &args.serve_args)?;
    let pid = server.child.id();
    let rss_at_start = rss(pid);
    let (warm, warm_errors) = run_requests(args, &server.base, 0, args.warmup).await;
    let rss_after_warmup = rss(pid);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampling = {
        let samples = samples.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                samples
                    .lock()
                    .unwrap()
                    .push((started.elapsed().as_secs_f64(), rss(pid)));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let started = Instant::now();
    let (outcomes, errors) = run_requests(args, &server.base, args.warmup, args.requests).await;
    let wall = started.elapsed().as_secs_f64();
    sampling.abort();
    let rss_at_end = rss(pid);
    // Idle: every sequence released, abandoned ones included.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let idle = loop {
        let report: Value = client
            .get(format!("{}/v1/kv-cache", server.base))
            .send()
            .await?
            .json()
            .await?;
        if report["live_sequences"] == 0 || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let count = |o: Outcome| outcomes.iter().filter(|x| **x == o).count();
    let samples = samples.lock().unwrap().clone();
    let rss_max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let alive = server.child.id() == pid && rss(pid) > 0;
    Ok(json!({
        "cache": cache,
        "requests": outcomes.len(),
        "completed": count(Outcome::Completed),
        "disconnected": count(Outcome::Disconnected),
        "errors": count(Outcome::Error),
        "first_errors": errors,
        "warmup_requests": warm.len(),
        "warmup_errors": warm.iter().filter(|o| **o == Outcome::Error).count(),
        "warmup_first_errors": warm_errors,
        "wall_s": wall,
        "requests_per_s": outcomes.len() as f64 / wall,
        "rss_bytes": {"start": rss_at_start, "after_warmup": rss_after_warmup, "end": rss_at_end, "max": rss_max},
        "rss_growth_after_warmup_bytes": rss_at_end as i64 - rss_after_warmup as i64,
        "rss_samples": samples.iter().step_by((samples.len() / 60).max(1)).map(|s| json!([s.0, s.1])).collect::<Vec<_>>(),
        "idle_live_sequences": idle["live_sequences"],
        "idle_live_kv_bytes": idle["live"]["bytes"],
        "server_alive_at_end": alive,
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = args
        .bin
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(server::DEFAULT_BIN));
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            bin.display()
        );
    }
    let mut runs = Vec::new();
    for cache in &args.caches {
        eprintln!(
            "soak: {cache}: {} + {} requests, {} clients",
            args.warmup, args.requests, args.clients
        );
        let run = soak(&args, &bin, cache).await?;
        eprintln!("soak: {cache}: {run}");
        runs.push(run);
    }
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "clients": args.clients,
        "disconnect_share": args.disconnect_share,
        "max_tokens": args.max_tokens,
        "runs": runs,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
