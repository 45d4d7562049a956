//! The real `mistralrs-logquant serve` binary on 127.0.0.1 (ephemeral port) with the real model,
//! driven by a real OpenAI client library (async-openai) and raw HTTP for malformed input.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use futures::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_mistralrs-logquant");

/// A server process, killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(args: &[&str]) -> Server {
        // The test helper fetches the default model first, so the server never downloads.
        let _ = common::model();
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["-p", "0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split("on http://").nth(1) {
                    let _ = tx.send(format!("http://{}", url.trim()));
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("server did not report its address");
        Server { child, base }
    }

    fn client(&self) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{}/v1", self.base))
                .with_api_key("none"),
        )
    }

    async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn post(&self, path: &str, body: String) -> (u16, String) {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }
}

fn chat_request(
    text: &str,
    max_tokens: u32,
) -> async_openai::types::chat::CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("default")
        .max_completion_tokens(max_tokens)
        .temperature(0.0)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(text)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap()
}

/// Chat completions, plain and streamed, through the OpenAI client; returns both texts.
async fn chat_both_ways(server: &Server) -> (String, String) {
    let client = server.client();
    let prompt = "Name three large rivers of Europe.";
    let response = client
        .chat()
        .create(chat_request(prompt, 24))
        .await
        .unwrap();
    let plain = response.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    let mut stream = client
        .chat()
        .create_stream(chat_request(prompt, 24))
        .await
        .unwrap();
    let mut streamed = String::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        chunks += 1;
        if let Some(text) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
            streamed.push_str(&text);
        }
    }
    assert!(chunks > 2, "stream had {chunks} chunks");
    (plain, streamed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_gets_chat_completions_from_both_caches() {
    for cache in ["logquant", "default"] {
        let server = Server::start(&["--kv-cache", cache]);
        let (plain, streamed) = chat_both_ways(&server).await;
        eprintln!("{cache}: {plain:?}");
        assert!(plain.split_whitespace().count() >= 3, "{cache}: {plain:?}");
        assert_eq!(
            plain, streamed,
            "{cache}: streamed and plain greedy replies differ"
        );
        let models = server.get_json("/v1/models").await;
        assert!(!models["data"].as_array().unwrap().is_empty(), "{models}");
        let report = server.get_json("/v1/kv-cache").await;
        assert_eq!(report["backend"], cache, "{report}");
        let health = reqwest::get(format!("{}/health", server.base))
            .await
            .unwrap();
        assert!(health.status().is_success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_requests_are_all_answered_and_quantize() {
    // A small window and group, so that short prompts are quantized too: prefill of the Q4_1
    // model is slow on the CPU (candle has no SIMD kernel for Q4_1), so prompts stay short.
    let server = Server::start(&[
        "--kv-cache",
        "logquant",
        "--kv-window",
        "8",
        "--kv-group-size",
        "16",
    ]);
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/kjv_genesis_exodus.txt"
    ))
    .unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    let client = server.client();
    let requests = (0..16).map(|i| {
        // Prompt lengths from about 20 to 80 tokens, all different; most pass 3W = 24.
        let prompt = format!(
            "Continue this text: {}",
            words[i * 500..i * 500 + 8 + i * 3].join(" ")
        );
        let client = client.clone();
        async move { client.chat().create(chat_request(&prompt, 16)).await }
    });
    let results = futures::future::join_all(requests).await;
    let answered = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .ok()
                .and_then(|r| r.choices.first())
                .and_then(|c| c.message.content.as_ref())
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert_eq!(answered, 16, "{results:?}");
    // The engine releases finished sequences at its next scheduling pass: one more request,
    // then wait until nothing is live.
    let _ = client.chat().create(chat_request("Say hello.", 4)).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let report = loop {
        let report = server.get_json("/v1/kv-cache").await;
        if report["live_sequences"] == 0 || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{report:#}");
    assert_eq!(report["live_sequences"], 0, "{report}");
    assert!(
        report["finished_sequences"].as_u64().unwrap() >= 17,
        "{report}"
    );
    assert!(report["peak_live_bytes"].as_u64().unwrap() > 0, "{report}");
    let quantized = report["finished_total"]["quantized_tokens"]
        .as_u64()
        .unwrap();
    assert!(quantized > 0, "no quantized tokens reported: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_4xx_and_the_server_keeps_serving() {
    let server = Server::start(&["--kv-cache", "logquant"]);
    let long_prompt = "word ".repeat(9000);
    let cases = [
        ("/v1/chat/completions", "{not json".to_string()),
        (
            "/v1/chat/completions",
            r#"{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}"#.to_string(),
        ),
        ("/v1/chat/completions", r#"{"model":"default","messages":[]}"#.to_string()),
        (
            "/v1/chat/completions",
            serde_json::json!({"model":"default","messages":[{"role":"user","content": long_prompt}]})
                .to_string(),
        ),
        ("/v1/completions", r#"{"model":"default","prompt":""}"#.to_string()),
    ];
    for (path, body) in cases {
        let (status, text) = server.post(path, body.clone()).await;
        let short: String = body.chars().take(60).collect();
        assert!(
            (400..500).contains(&status),
            "{short}: status {status}: {text}"
        );
        assert!(!text.trim().is_empty(), "{short}: empty error body");
        // The server still answers a good request after each bad one.
        let ok = server
            .client()
            .chat()
            .create(chat_request("Say hello.", 4))
            .await;
        assert!(ok.is_ok(), "after {short}: {ok:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_leaks_nothing() {
    let server = Server::start(&["--kv-cache", "logquant"]);
    for _ in 0..3 {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", server.base))
            .json(&serde_json::json!({
                "model": "default",
                "stream": true,
                "max_tokens": 400,
                "messages": [{"role": "user", "content": "Tell a long story about a river."}]
            }))
            .send()
            .await
            .unwrap();
        let mut body = response.bytes_stream();
        let first = body.next().await.expect("a first chunk").unwrap();
        assert!(!first.is_empty());
        drop(body); // disconnect mid-stream
    }
    let ok = server
        .client()
        .chat()
        .create(chat_request("Say hello.", 4))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    // The abandoned sequences are released: nothing stays live.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let report = server.get_json("/v1/kv-cache").await;
        if report["live_sequences"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "sequences still live: {report}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn invalid_flags_are_rejected_before_the_model_loads() {
    let cases: &[(&[&str], &str)] = &[
        (&["--kv-bits", "3"], "--kv-bits"),
        (&["--kv-window", "0"], "--kv-window"),
        (&["--kv-group-size", "6"], "--kv-group-size"),
        (&["--kv-policy", "oldest"], "--kv-policy"),
        (&["--kv-key-grouping", "x"], "--kv-key-grouping"),
        (&["--kv-cache", "zip"], "--kv-cache"),
        (&["--dtype", "f8"], "--dtype"),
        (&["--port", "99999"], "--port"),
        (&["--max-seqs", "0"], "--max-seqs"),
        (
            &["--model-id", "/nonexistent/model.gguf"],
            "/nonexistent/model.gguf",
        ),
        (&["--prefix-cache-n", "4"], "--prefix-cache-n"),
        (&["--host", "not an address"], "--host"),
    ];
    for (args, needle) in cases {
        let out = Command::new(BIN)
            .arg("serve")
            .args(*args)
            .env("MISTRALRS_LOGQUANT_CACHE", "/nonexistent-cache-dir")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
}
