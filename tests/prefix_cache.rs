//! Prefix caching in multi-turn chat, through the real server: each turn repeats the whole
//! conversation, and a server with the prefix cache (the default) must prefill only the new
//! tokens, on both KV caches. Oracles: the prompt and completion token counts the server reports
//! for the previous turn (what the reused prefix must cover), and a second server without the
//! prefix cache (a cold prefill of the same full request) for the answers.

mod common;
#[path = "support/server.rs"]
mod server_process;

use serde_json::{json, Value};
use server_process::Server;

/// The user's turns: the first carries a passage long enough (about 400 tokens) that LogQuant
/// stores most of the prefix quantized, so a prefix hit serves quantized tokens.
fn turns() -> Vec<String> {
    let text = common::shared_text();
    let passage: Vec<&str> = text.split_whitespace().skip(2000).take(300).collect();
    vec![
        format!(
            "Read this passage:\n\n{}\n\nWho speaks in it?",
            passage.join(" ")
        ),
        "What happens next in the passage?".into(),
        "Name one place the passage mentions.".into(),
        "Summarize the passage in one sentence.".into(),
    ]
}

/// The prefix cache's counters (`/v1/kv-cache`).
async fn prefix_stats(server: &Server) -> Value {
    server.get_json("/v1/kv-cache").await["prefix_cache"].clone()
}

/// A greedy chat turn: `(reply text, prompt tokens, completion tokens)`.
async fn turn(server: &Server, messages: &[Value]) -> (String, u64, u64) {
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            json!({"model": "default", "messages": messages, "max_tokens": 16,
                   "temperature": 0})
            .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

/// Tokens of the same beginning (by whitespace words) before the first difference.
fn agreeing_words(a: &str, b: &str) -> usize {
    a.split_whitespace()
        .zip(b.split_whitespace())
        .take_while(|(x, y)| x == y)
        .count()
}

/// Turns 2.. reuse the previous turn's whole cache (its prompt and reply, less the reply's last
/// token, which was never fed), and the answers match a cold server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_turn_chat_prefills_only_the_new_tokens_on_both_caches() {
    for cache in ["default", "logquant"] {
        // f32 weights: under q8_0 a prompt of under 32 new tokens takes the quantized matmul
        // (8-bit activations) where a cold prefill of the whole prompt takes the f32 GEMM, and
        // that alone moves greedy answers (seen at turn 3 on the default cache).
        let warm = Server::start(&["--kv-cache", cache, "--weights", "f32"]);
        let cold = Server::start(&[
            "--kv-cache",
            cache,
            "--weights",
            "f32",
            "--prefix-cache-n",
            "0",
        ]);
        let mut messages: Vec<Value> = Vec::new();
        let mut previous: Option<(u64, u64)> = None;
        let (mut words, mut agreeing) = (0, 0);
        for (t, text) in turns().iter().enumerate() {
            messages.push(json!({"role": "user", "content": text}));
            let before = prefix_stats(&warm).await;
            let (reply, prompt, completion) = turn(&warm, &messages).await;
            let after = prefix_stats(&warm).await;
            let hits = after["hits"].as_u64().unwrap() - before["hits"].as_u64().unwrap();
            let reused = after["reused_tokens"].as_u64().unwrap()
                - before["reused_tokens"].as_u64().unwrap();
            match previous {
                None => assert_eq!((hits, reused), (0, 0), "{cache}: turn 1 {after}"),
                Some((p, c)) => {
                    assert_eq!(hits, 1, "{cache}: turn {} {after}", t + 1);
                    // The previous turn's whole KV: its prompt and reply but the last token.
                    assert!(
                        reused > p && reused < p + c && reused < prompt,
                        "{cache}: turn {}: reused {reused} of {prompt} prompt tokens; the \
                         previous turn had {p} + {c}",
                        t + 1
                    );
                }
            }
            let (cold_reply, cold_prompt, _) = turn(&cold, &messages).await;
            assert_eq!(cold_prompt, prompt);
            if cache == "default" {
                assert_eq!(
                    reply,
                    cold_reply,
                    "turn {}: a prefix hit changed the answer",
                    t + 1
                );
            }
            words += cold_reply.split_whitespace().count();
            agreeing += agreeing_words(&reply, &cold_reply);
            eprintln!(
                "{cache} turn {}: {prompt} prompt tokens, {reused} reused; warm {reply:?}, cold \
                 {cold_reply:?}",
                t + 1
            );
            messages.push(json!({"role": "assistant", "content": reply}));
            previous = Some((prompt, completion));
        }
        let stats = prefix_stats(&warm).await;
        let cold_stats = prefix_stats(&cold).await;
        assert_eq!(cold_stats["entries"], 0, "{cold_stats}");
        assert_eq!(cold_stats["hits"], 0, "{cold_stats}");
        eprintln!("{cache}: {agreeing} of {words} words agree with the cold server; {stats}");
        // LogQuant's new tokens attend to the stored (quantized) prefix, a cold prefill to exact
        // keys and values: the answers may part, but most must agree.
        assert!(
            agreeing * 2 >= words,
            "{cache}: only {agreeing} of {words} words agree with a cold prefill"
        );
    }
}

/// The prefix cache keeps to its byte bound on the CPU (upstream counted only entries off the
/// CPU, so there it grew without bound), and never holds more entries than `--prefix-cache-n`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_keeps_to_its_bounds_on_the_cpu() {
    const BOUND: u64 = 6 << 20;
    for cache in ["default", "logquant"] {
        let server = Server::start(&[
            "--kv-cache",
            cache,
            "--prefix-cache-bytes",
            "6MiB",
            "--prefix-cache-n",
            "3",
        ]);
        let mut seen_bytes = 0;
        for i in 0..6 {
            let messages = [json!({"role": "user",
                "content": format!("Question {i}: what is {i} plus {i}? Explain in detail.")})];
            turn(&server, &messages).await;
            let stats = prefix_stats(&server).await;
            let bytes = stats["bytes"].as_u64().unwrap();
            assert!(bytes <= BOUND, "{cache}: {stats}");
            assert!(stats["entries"].as_u64().unwrap() <= 3, "{cache}: {stats}");
            assert_eq!(stats["max_bytes"], BOUND, "{cache}: {stats}");
            seen_bytes = seen_bytes.max(bytes);
        }
        let stats = prefix_stats(&server).await;
        assert!(stats["evicted"].as_u64().unwrap() >= 3, "{cache}: {stats}");
        assert!(seen_bytes > 0, "{cache}: nothing was ever stored: {stats}");
    }
}
