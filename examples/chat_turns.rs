//! Multi-turn chat through `serve`: time to first token per turn, each cache in its own server
//! (started by this program from the release binary, one at a time), streamed and greedy. Each
//! turn adds a user message of about `--turn-words` words of `--text` and keeps the whole
//! conversation, as chat clients do. The prefix cache's counters (`/v1/kv-cache`) show how many
//! prompt tokens each turn reused. Prints one JSON report.
//!
//! ```sh
//! cargo build --release && cargo run --release --example chat_turns -- \
//!     --text ../shared/data/kjv_genesis_exodus.txt --json docs/data/serving/chat-turns.json
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};

#[path = "support/server.rs"]
mod server;
use server::start;

#[derive(Parser)]
struct Args {
    /// The server binary. [default: target/release/mistralrs-logquant]
    #[arg(long)]
    bin: Option<std::path::PathBuf>,
    /// A plain-text file the user messages are cut from.
    #[arg(long)]
    text: std::path::PathBuf,
    /// Server configurations: `NAME=serve flags` (flags separated by spaces).
    #[arg(long, value_delimiter = ',', default_values_t = [
        "default=--kv-cache default".to_string(),
        "logquant=--kv-cache logquant".to_string(),
        "logquant-no-prefix-cache=--kv-cache logquant --prefix-cache-n 0".to_string(),
    ])]
    configs: Vec<String>,
    #[arg(long, default_value_t = 6)]
    turns: usize,
    /// Words of text per user message (about 1.3 tokens a word).
    #[arg(long, default_value_t = 500)]
    turn_words: usize,
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// One streamed greedy turn: (reply, seconds to the first content chunk, seconds in all,
/// prompt tokens).
async fn turn(
    client: &reqwest::Client,
    base: &str,
    messages: &[Value],
    max_tokens: usize,
) -> Result<(String, f64, f64, u64)> {
    let started = Instant::now();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &json!({"model": "default", "messages": messages, "max_tokens": max_tokens,
                      "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("{}: {}", response.status(), response.text().await?);
    }
    let mut stream = response.bytes_stream();
    let (mut buffer, mut reply, mut first, mut prompt) = (String::new(), String::new(), None, 0);
    while let Some(chunk) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            if let Some(text) = v["choices"][0]["delta"]["content"].as_str() {
                if !text.is_empty() && first.is_none() {
                    first = Some(started.elapsed().as_secs_f64());
                }
                reply.push_str(text);
            }
            if let Some(p) = v["usage"]["prompt_tokens"].as_u64() {
                prompt = p;
            }
        }
    }
    let all = started.elapsed().as_secs_f64();
    Ok((reply, first.unwrap_or(all), all, prompt))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = args
        .bin
        .clone()
        .unwrap_or_else(|| server::DEFAULT_BIN.into());
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            bin.display()
        );
    }
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read {}", args.text.display()))?;
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < args.turns * args.turn_words {
        bail!(
            "{} has too few words for {} turns",
            args.text.display(),
            args.turns
        );
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1200))
        .build()?;
    let mut runs = Vec::new();
    for config in &args.configs {
        let (name, flags) = config.split_once('=').unwrap_or((config, ""));
        let flags: Vec<&str> = flags.split_whitespace().collect();
        let server = start(&bin, &flags)?;
        let mut messages = Vec::new();
        let mut turns = Vec::new();
        for t in 0..args.turns {
            let passage = words[t * args.turn_words..(t + 1) * args.turn_words].join(" ");
            messages.push(json!({"role": "user",
                "content": format!("Here is more of the text:\n\n{passage}\n\nWhat happens in this part?")}));
            let before: Value = client
                .get(format!("{}/v1/kv-cache", server.base))
                .send()
                .await?
                .json()
                .await?;
            let (reply, ttft, total, prompt) =
                turn(&client, &server.base, &messages, args.max_tokens).await?;
            let after: Value = client
                .get(format!("{}/v1/kv-cache", server.base))
                .send()
                .await?
                .json()
                .await?;
            let reused = after["prefix_cache"]["reused_tokens"].as_u64().unwrap_or(0)
                - before["prefix_cache"]["reused_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            eprintln!(
                "{name} turn {}: {prompt} prompt tokens, {reused} reused, first token {ttft:.2} s",
                t + 1
            );
            turns.push(
                json!({"turn": t + 1, "prompt_tokens": prompt, "reused_tokens": reused,
                              "ttft_s": ttft, "total_s": total, "reply": reply}),
            );
            messages.push(json!({"role": "assistant", "content": reply}));
        }
        let stats: Value = client
            .get(format!("{}/v1/kv-cache", server.base))
            .send()
            .await?
            .json()
            .await?;
        runs.push(json!({"config": name, "flags": flags, "turns": turns,
                         "prefix_cache": stats["prefix_cache"]}));
    }
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "turn_words": args.turn_words,
        "max_tokens": args.max_tokens,
        "runs": runs,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
