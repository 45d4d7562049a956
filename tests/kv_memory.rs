//! `serve --kv-memory SIZE`: requests start only while the KV bytes projected for the started
//! ones fit the budget; the rest wait in arrival order and none is dropped. Oracles: the model's
//! shape (SmolLM2-135M: 30 layers, 3 KV heads of 64; f32 on the CPU) for the projection of one
//! request, and the server's own admission counters for how many ran at once.

mod common;
#[path = "support/server.rs"]
mod server_process;

use serde_json::{json, Value};
use server_process::Server;

const MAX_TOKENS: u64 = 24;
/// The default cache's bytes per token: 30 layers x 3 KV heads x (64 + 64) values x 4 bytes.
const DEFAULT_CACHE_BYTES_PER_TOKEN: u64 = 30 * 3 * (64 + 64) * 4;
const PROMPT: &str = "Name three large rivers of Europe.";

/// A greedy chat reply: (finish reason, prompt tokens, completion tokens).
async fn chat(server: &Server) -> (String, u64, u64) {
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            json!({"model": "default", "max_tokens": MAX_TOKENS, "temperature": 0,
                   "messages": [{"role": "user", "content": PROMPT}]})
            .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    (
        v["choices"][0]["finish_reason"]
            .as_str()
            .unwrap()
            .to_string(),
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

async fn admission(server: &Server) -> Value {
    server.get_json("/v1/kv-cache").await["admission"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_budget_makes_requests_wait_and_every_one_completes() {
    // One request alone reserves its prompt plus max_tokens of the default cache.
    let roomy = Server::start(&["--kv-cache", "default", "--kv-memory", "1GiB"]);
    let (_, prompt_tokens, _) = chat(&roomy).await;
    let one = (prompt_tokens + MAX_TOKENS) * DEFAULT_CACHE_BYTES_PER_TOKEN;
    let report = admission(&roomy).await;
    assert_eq!(report["budget_bytes"], 1u64 << 30, "{report}");
    assert_eq!(report["peak_reserved_bytes"], one, "{report}");
    assert_eq!(report["admitted"], 1, "{report}");
    drop(roomy);

    // Room for two: six requests sent at once run at most two at a time, and all finish.
    let budget = one * 5 / 2;
    let tight = Server::start(&["--kv-cache", "default", "--kv-memory", &budget.to_string()]);
    let replies = futures::future::join_all((0..6).map(|_| chat(&tight))).await;
    for (finish, prompt, completion) in &replies {
        assert_eq!(
            (finish.as_str(), *prompt, *completion),
            ("length", prompt_tokens, MAX_TOKENS)
        );
    }
    let report = admission(&tight).await;
    assert_eq!(report["budget_bytes"], budget, "{report}");
    assert_eq!(report["admitted"], 6, "{report}");
    assert_eq!(
        report["peak_reserved_bytes"],
        2 * one,
        "never three at once: {report}"
    );
    assert!(
        report["peak_waiting_for_memory"].as_u64().unwrap() >= 1,
        "some request must have waited: {report}"
    );
    let metrics = reqwest::get(format!("{}/metrics", tight.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "mistralrs_logquant_kv_memory_budget_bytes {budget}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("mistralrs_logquant_kv_memory_admitted_total 6"),
        "{metrics}"
    );
}

#[test]
fn a_bad_size_is_refused_in_one_line() {
    let _ = common::model();
    let out = std::process::Command::new(server_process::BIN)
        .args(["serve", "-p", "0", "--kv-memory", "0.5x"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--kv-memory"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
