//! The real `mistralrs-logquant serve` binary on 127.0.0.1 (ephemeral port) with the real model,
//! driven by a real OpenAI client library (async-openai) and raw HTTP for malformed input.
//! Greedy replies are checked against the oracle [`direct_greedy`]: the same prompt through an
//! engine built in this process, decoded by the crate's own greedy loop.

mod common;
#[path = "support/server.rs"]
mod server_process;
use server_process::{chat_request, exited_within, model_with_context, Server, BIN};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use either::Either;
use futures::StreamExt;
use mistralrs::{Model, TextMessageRole, TextMessages};
use mistralrs_logquant::engine::{build_engine, EngineOptions, KvCacheChoice};
use mistralrs_logquant::generate::{detokenize, generate_greedy, special_token_ids};
use mistralrs_logquant::model_source::ModelSource;

/// A prompt for the oracle: a user message through the model's chat template (as the server's
/// chat endpoint applies it), or text (as its completions endpoint tokenizes it).
enum Prompt<'a> {
    Chat(&'a str),
    Text(&'a str),
}

/// The oracle for a greedy reply of the server: the prompt through an engine built in this
/// process by the crate (`build_engine`: the same model file and KV cache), `max_tokens` tokens
/// of the crate's own greedy decoding (`generate_greedy`: argmax of each step's logits, special
/// tokens never chosen), detokenized. It matches a served reply that stopped at the length
/// limit; the HTTP layer, the OpenAI shaping and mistral.rs's sampler are not involved.
async fn direct_greedy(
    model: ModelSource,
    cache: KvCacheChoice,
    prompt: Prompt<'_>,
    max_tokens: usize,
) -> String {
    let suppressed = special_token_ids(&model).unwrap();
    let engine = build_engine(&EngineOptions::new(model, cache))
        .await
        .unwrap();
    let tokenizer = Model::new(engine.clone());
    let tokens = match prompt {
        Prompt::Chat(text) => {
            let messages = TextMessages::new().add_message(TextMessageRole::User, text);
            tokenizer.tokenize(Either::Left(messages), None, true, true, None)
        }
        Prompt::Text(text) => {
            tokenizer.tokenize(Either::Right(text.to_string()), None, true, false, None)
        }
    }
    .await
    .unwrap();
    let reply = generate_greedy(&engine, tokens, max_tokens, &suppressed)
        .await
        .unwrap();
    detokenize(&engine, reply).await.unwrap()
}

/// A greedy chat reply, plain and streamed, through the OpenAI client: both texts and the plain
/// reply's finish reason.
async fn chat_both_ways(
    server: &Server,
    prompt: &str,
    max_tokens: u32,
) -> (String, String, String) {
    let client = server.client();
    let response = client
        .chat()
        .create(chat_request(prompt, max_tokens))
        .await
        .unwrap();
    let plain = response.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    let finish = serde_json::to_value(response.choices[0].finish_reason).unwrap();
    let mut stream = client
        .chat()
        .create_stream(chat_request(prompt, max_tokens))
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
    (
        plain,
        streamed,
        finish.as_str().unwrap_or_default().to_string(),
    )
}

/// Both caches, plain and streamed, give the oracle's greedy reply ([`direct_greedy`]), on a
/// prompt past LogQuant's 3W = 126 full-precision tokens, so that its reply attends to
/// quantized tokens (the report's `last_finished` must count some).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_gets_chat_completions_from_both_caches() {
    let text = common::shared_text();
    let passage: Vec<&str> = text.split_whitespace().skip(500).take(160).collect();
    let prompt = format!(
        "{}\n\nName three large rivers of Europe.",
        passage.join(" ")
    );
    let (prompt, max_tokens) = (prompt.as_str(), 24);
    for cache in ["logquant", "default"] {
        let want = direct_greedy(
            common::model(),
            cache.parse().unwrap(),
            Prompt::Chat(prompt),
            max_tokens,
        )
        .await;
        let server = Server::start(&["--kv-cache", cache]);
        let (plain, streamed, finish) = chat_both_ways(&server, prompt, max_tokens as u32).await;
        eprintln!("{cache}: {plain:?}");
        // The oracle never stops early: the prompt is one whose reply runs to the limit.
        assert_eq!(finish, "length", "{cache}: {plain:?}");
        assert_eq!(
            plain, want,
            "{cache}: plain reply differs from the direct engine's"
        );
        assert_eq!(
            streamed, want,
            "{cache}: streamed reply differs from the direct engine's"
        );
        let models = server.get_json("/v1/models").await;
        assert!(!models["data"].as_array().unwrap().is_empty(), "{models}");
        let report = server.get_json("/v1/kv-cache").await;
        assert_eq!(report["backend"], cache, "{report}");
        let quantized = report["last_finished"]["quantized_tokens"]
            .as_u64()
            .unwrap_or(0);
        if cache == "logquant" {
            assert!(quantized > 0, "LogQuant quantized nothing: {report}");
        } else {
            assert_eq!(quantized, 0, "{report}");
        }
        let health = reqwest::get(format!("{}/health", server.base))
            .await
            .unwrap();
        assert!(health.status().is_success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_requests_are_all_answered_and_quantize() {
    // A small window and groups, so that short prompts are quantized too (short prompts keep
    // the test quick).
    let server = Server::start(&[
        "--kv-cache",
        "logquant",
        "--kv-window",
        "8",
        "--kv-group-size",
        "16",
        "--kv-key-group-size",
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
    // A plain (not streamed) request whose client gives up before the answer: mistral.rs 0.8.1
    // failed the step on the closed channel and then panicked the engine thread sending the
    // error to it (fixed by the mistralrs-core patch).
    let abandoned = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", server.base))
        .timeout(Duration::from_millis(300))
        .json(&serde_json::json!({
            "model": "default",
            "max_tokens": 200,
            "messages": [{"role": "user", "content": "Tell a long story about a river."}]
        }))
        .send()
        .await;
    assert!(abandoned.is_err(), "200 tokens answered within 300 ms");
    server.assert_no_live_sequence().await;
    let ok = server
        .client()
        .chat()
        .create(chat_request("Say hello.", 4))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    // The abandoned sequences are released: nothing stays live.
    server.assert_no_live_sequence().await;
    let stderr = server.stderr.lock().unwrap().clone();
    assert!(
        !stderr.iter().any(|l| l.contains("panicked")),
        "the server panicked: {stderr:#?}"
    );
}

#[test]
fn invalid_flags_are_rejected_before_the_model_loads() {
    let cases: &[(&[&str], &str)] = &[
        (&["--kv-bits", "5"], "--kv-bits"),
        (&["--kv-window", "0"], "--kv-window"),
        // Issue 14, fault 2: LogQuant values are checked with every cache.
        (&["--kv-cache", "default", "--kv-bits", "5"], "--kv-bits"),
        (
            &["--kv-cache", "default", "--kv-window", "0"],
            "--kv-window",
        ),
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
        (&["--prefix-cache-bytes", "lots"], "--prefix-cache-bytes"),
        (&["--max-messages", "0"], "--max-messages"),
        (&["--api-key", ""], "API key"),
        (&["--allow-private-media-hosts"], "--allow-remote-media"),
        (
            &["--allowed-local-media-path", "/nonexistent-media"],
            "--allowed-local-media-path",
        ),
        (&["--host", "not an address"], "--host"),
    ];
    for (args, needle) in cases {
        let child = Command::new(BIN)
            .arg("serve")
            .args(*args)
            .env("MISTRALRS_LOGQUANT_CACHE", "/nonexistent-cache-dir")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A value that became valid would start a server that never exits: fail, don't hang.
        let out = exited_within(
            child,
            Duration::from_secs(60),
            &format!("{args:?} accepted"),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
}

// ---- Issue 14: faults found by replaying public bug reports against `serve` and `run`. ----

/// The body of an error response, parsed by async-openai: OpenAI's `{"error": {...}}`.
fn openai_error(status: u16, text: &str) -> async_openai::error::ApiError {
    serde_json::from_str::<async_openai::error::WrappedError>(text)
        .unwrap_or_else(|e| panic!("status {status}: not an OpenAI error ({e}): {text}"))
        .error
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .filter(|d| d != "[DONE]")
        .collect()
}

impl Server {
    async fn post_json(&self, path: &str, body: serde_json::Value) -> (u16, String) {
        self.post(path, body.to_string()).await
    }

    /// A good request still gets an answer.
    async fn still_serves(&self, after: &str) {
        let ok = self
            .client()
            .chat()
            .create(chat_request("Say hello.", 3))
            .await;
        assert!(ok.is_ok(), "after {after}: {ok:?}");
    }

    /// Nothing stays live once the engine has released finished sequences.
    async fn assert_no_live_sequence(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let report = self.get_json("/v1/kv-cache").await;
            if report["live_sequences"] == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "sequences still live: {report}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Fault 1: a LogQuant value that only the loaded model can refute (G=48 against head_dim 64)
/// refuses the start with one line, instead of a healthy server whose every request fails.
#[test]
fn a_value_the_model_refutes_refuses_the_start() {
    let _ = common::model();
    let child = Command::new(BIN)
        .args(["serve", "-p", "0", "--kv-group-size", "48"])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = exited_within(
        child,
        Duration::from_secs(180),
        "serve --kv-group-size 48 started instead of refusing",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stdout.contains("Serving"), "{stdout}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("group size 48 does not divide head_dim 64"),
        "{stderr}"
    );
}

/// Fault 2: LogQuant flags with another cache are named once on stderr, not silently ignored.
#[test]
fn logquant_flags_with_the_default_cache_are_named() {
    let out = Command::new(BIN)
        .args(["serve", "--kv-cache", "default", "--kv-bits", "4"])
        .args(["--model-id", "/nonexistent/model.gguf"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: --kv-bits only apply to --kv-cache logquant"),
        "{stderr}"
    );
}

/// Faults 3, 4 and 8 through `run`: the length limit holds when greedy, stdout carries only
/// the answer (no GGUF metadata), and a reply that fills the context stops there.
#[test]
fn run_keeps_to_max_tokens_the_context_and_stdout() {
    let _ = common::model();
    let out = Command::new(BIN)
        .args(["run", "-i", "Count from 1 to 100, one number per line."])
        .args(["--max-tokens", "5"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stdout.contains("general.") && !stdout.contains("llama."),
        "metadata on stdout: {stdout}"
    );
    // Five tokens: at most five words and a few characters each (the unbounded reply counted
    // to 30 and beyond).
    let words = stdout.split_whitespace().count();
    assert!(
        (1..=5).contains(&words) && stdout.trim().chars().count() <= 40,
        "--max-tokens 5 printed {words} words: {stdout:?}"
    );

    // A 128-token context: a long input and a large --max-tokens end at the context.
    let model = model_with_context(128);
    let text = common::shared_text();
    let words: Vec<&str> = text.split_whitespace().take(60).collect();
    let out = Command::new(BIN)
        .args(["run", "-m", model.to_str().unwrap(), "--max-tokens", "1000"])
        .args(["-i", &format!("Continue: {}", words.join(" "))])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.trim().is_empty(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The prompt takes at least 60 of the 128 tokens (60 words), so the reply gets at most 68:
    // at most 68 words, where --max-tokens 1000 alone would allow hundreds.
    let words = stdout.split_whitespace().count();
    assert!(
        words <= 128 - 60,
        "the reply ran past the 128-token context: {words} words"
    );
}

/// Faults 4 to 8 against one server: the context limit, log-probabilities, sampling
/// parameters, OpenAI's error shape, stdout; the server keeps serving after every case and
/// leaks no sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_real_client_traffic_in_openais_shape() {
    const CONTEXT: u64 = 192;
    let model = model_with_context(CONTEXT as u32);
    let server = Server::start(&["-m", model.to_str().unwrap()]);
    let text = common::shared_text();
    let words: Vec<&str> = text.split_whitespace().collect();

    // Fault 4: a completion that fills the context stops there with "length" and its text.
    let prompt = words[..110].join(" ");
    let (status, body) = server
        .post_json(
            "/v1/completions",
            serde_json::json!({"model": "default", "prompt": prompt, "max_tokens": CONTEXT,
                               "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let response: async_openai::types::completions::CreateCompletionResponse =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let usage = response.usage.clone().unwrap();
    assert_eq!(
        u64::from(usage.prompt_tokens + usage.completion_tokens),
        CONTEXT,
        "{body}"
    );
    assert!(usage.completion_tokens > 0, "{body}");
    assert_eq!(
        serde_json::to_value(response.choices[0].finish_reason).unwrap(),
        "length",
        "{body}"
    );
    assert!(!response.choices[0].text.is_empty(), "{body}");
    server.still_serves("filling the context").await;
    // Streamed, the same.
    let (status, body) = server
        .post_json(
            "/v1/completions",
            serde_json::json!({"model": "default", "prompt": prompt, "max_tokens": CONTEXT,
                               "temperature": 0, "stream": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let chunks: Vec<async_openai::types::completions::CreateCompletionResponse> = sse_data(&body)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect();
    let streamed: String = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .map(|c| c.text.as_str())
        .collect();
    let finish = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .find_map(|c| c.finish_reason);
    assert_eq!(serde_json::to_value(finish).unwrap(), "length", "{body}");
    // Both are the oracle's greedy continuation of the prompt (mistral.rs trims a completion's
    // leading space).
    let want = direct_greedy(
        ModelSource::Gguf(model.clone()),
        "logquant".parse().unwrap(),
        Prompt::Text(&prompt),
        usage.completion_tokens as usize,
    )
    .await;
    for (label, got) in [
        ("plain", &response.choices[0].text),
        ("streamed", &streamed),
    ] {
        assert_eq!(
            got.trim_start(),
            want.trim_start(),
            "{label} completion differs from the direct engine's"
        );
    }
    server
        .still_serves("a streamed reply filling the context")
        .await;

    // Faults 4 and 7: a prompt past the context is a 400 up front, in OpenAI's shape; streamed,
    // an error event in OpenAI's shape.
    let long = words[..400].join(" ");
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = if path.ends_with("chat/completions") {
            serde_json::json!({"model": "default", "messages": [{"role": "user", "content": long}]})
        } else {
            serde_json::json!({"model": "default", "prompt": long})
        };
        let (status, text) = server.post_json(path, body.clone()).await;
        assert_eq!(status, 400, "{path}: {text}");
        let error = openai_error(status, &text);
        assert_eq!(
            error.code.as_deref(),
            Some("context_length_exceeded"),
            "{text}"
        );
        assert_eq!(
            error.r#type.as_deref(),
            Some("invalid_request_error"),
            "{text}"
        );
        let mut streamed = body;
        streamed["stream"] = true.into();
        let (_, text) = server.post_json(path, streamed).await;
        let events = sse_data(&text);
        assert!(!events.is_empty(), "{text}");
        for event in &events {
            let error = openai_error(200, event);
            assert!(error.message.contains("length"), "{event}");
        }
        server.still_serves(path).await;
    }

    // Fault 5: log-probabilities of the distribution, alternatives as strings.
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "default", "logprobs": true, "top_logprobs": 5,
                "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": "Name a colour."}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let response: async_openai::types::chat::CreateChatCompletionResponse =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let content = response.choices[0]
        .logprobs
        .as_ref()
        .and_then(|l| l.content.clone())
        .unwrap_or_else(|| panic!("no logprobs: {body}"));
    assert!(!content.is_empty(), "{body}");
    let mut text = String::new();
    for entry in &content {
        assert!(entry.logprob <= 0.0, "positive logprob: {body}");
        assert_eq!(entry.top_logprobs.len(), 5, "{body}");
        let mass: f32 = entry.top_logprobs.iter().map(|t| t.logprob.exp()).sum();
        assert!(
            mass <= 1.0 + 1e-4,
            "alternatives hold {mass} of the mass: {body}"
        );
        // Greedy: the chosen token is the most likely alternative, with the same value.
        assert_eq!(entry.top_logprobs[0].token, entry.token, "{body}");
        assert!((entry.top_logprobs[0].logprob - entry.logprob).abs() < 1e-5);
        assert!(
            entry.top_logprobs.iter().all(|t| t.logprob <= 0.0),
            "{body}"
        );
        text.push_str(&entry.token);
    }
    assert_eq!(
        Some(text),
        response.choices[0].message.content.clone(),
        "tokens do not spell the reply"
    );
    // Sampled with top_p: every alternative has a value (none cut to null).
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "default", "logprobs": true, "top_logprobs": 5,
                "temperature": 1, "top_p": 0.5, "seed": 1, "max_tokens": 4, "stream": true,
                "messages": [{"role": "user", "content": "Name a colour."}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for data in sse_data(&body) {
        let chunk: async_openai::types::chat::CreateChatCompletionStreamResponse =
            serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
        for choice in &chunk.choices {
            for entry in choice
                .logprobs
                .as_ref()
                .and_then(|l| l.content.clone())
                .unwrap_or_default()
            {
                assert!(entry.logprob <= 0.0, "{data}");
                assert_eq!(entry.top_logprobs.len(), 5, "{data}");
            }
        }
    }
    // The legacy completions shape.
    let (status, body) = server
        .post_json(
            "/v1/completions",
            serde_json::json!({"model": "default", "prompt": "The river", "logprobs": 2,
                               "max_tokens": 6, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let response: async_openai::types::completions::CreateCompletionResponse =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let choice = &response.choices[0];
    let logprobs = choice.logprobs.as_ref().unwrap_or_else(|| panic!("{body}"));
    let n = logprobs.tokens.len();
    assert!(n > 0, "{body}");
    assert_eq!(logprobs.token_logprobs.len(), n, "{body}");
    assert_eq!(logprobs.top_logprobs.len(), n, "{body}");
    assert_eq!(logprobs.text_offset.len(), n, "{body}");
    // mistral.rs trims the completion's leading space; the tokens keep it.
    assert_eq!(
        logprobs.tokens.concat().trim_start(),
        choice.text.trim_start(),
        "{body}"
    );
    let mut offset = 0;
    for i in 0..n {
        assert_eq!(logprobs.text_offset[i], offset, "{body}");
        offset += logprobs.tokens[i].chars().count() as u32;
        assert!(
            logprobs.token_logprobs[i].is_some_and(|v| v <= 0.0),
            "{body}"
        );
        let tops = logprobs.top_logprobs[i].as_object().unwrap();
        assert!(!tops.is_empty() && tops.len() <= 2, "{body}");
        assert!(tops.values().all(|v| v.as_f64().is_some_and(|v| v <= 0.0)));
    }
    server.still_serves("logprobs").await;

    // Fault 6: sampling parameters.
    let chat = |extra: serde_json::Value| {
        let mut body = serde_json::json!({"model": "default", "max_tokens": 12,
            "messages": [{"role": "user", "content": "Write a line about rain."}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let mut texts = Vec::new();
    for extra in [
        serde_json::json!({"temperature": 1.0, "seed": 7}),
        serde_json::json!({"temperature": 1.0, "seed": 7}),
        serde_json::json!({"temperature": 0}),
        serde_json::json!({"temperature": 1.0, "top_p": 0}),
    ] {
        let (status, body) = server
            .post_json("/v1/chat/completions", chat(extra.clone()))
            .await;
        assert_eq!(status, 200, "{extra}: {body}");
        let response: async_openai::types::chat::CreateChatCompletionResponse =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        texts.push(
            response.choices[0]
                .message
                .content
                .clone()
                .unwrap_or_default(),
        );
    }
    assert_eq!(texts[0], texts[1], "seed 7 twice gave two texts");
    assert_eq!(texts[3], texts[2], "top_p 0 is not greedy");
    for (extra, field) in [
        (serde_json::json!({"temperature": -1}), "temperature"),
        (serde_json::json!({"max_tokens": 0}), "max_tokens"),
        (serde_json::json!({"top_p": 2}), "top_p"),
        (
            serde_json::json!({"presence_penalty": 3}),
            "presence_penalty",
        ),
        (
            serde_json::json!({"response_format": {"type": "yaml"}}),
            "response_format",
        ),
    ] {
        let (status, body) = server
            .post_json("/v1/chat/completions", chat(extra.clone()))
            .await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(
            openai_error(status, &body).param.as_deref(),
            Some(field),
            "{body}"
        );
    }
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            chat(serde_json::json!({"temperature": 0, "max_tokens": 24,
                                    "response_format": {"type": "json_object"}})),
        )
        .await;
    assert_eq!(status, 200, "json_object: {body}");
    let response: async_openai::types::chat::CreateChatCompletionResponse =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let content = response.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    assert!(
        content.trim_start().starts_with('{'),
        "json_object: {content:?}"
    );
    server.still_serves("sampling parameters").await;

    // Fault 7: the project's own 4xx and axum's rejections share OpenAI's shape too.
    for (path, body) in [
        ("/v1/chat/completions", "{not json".to_string()),
        (
            "/v1/chat/completions",
            r#"{"model":"default","messages":[]}"#.to_string(),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"default","messages":"hi","n":"x"}"#.to_string(),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"default","messages":[{"content":"hi"}]}"#.to_string(),
        ),
        (
            "/v1/completions",
            r#"{"model":"default","prompt":""}"#.to_string(),
        ),
    ] {
        let (status, text) = server.post(path, body.clone()).await;
        assert!((400..500).contains(&status), "{body}: {status} {text}");
        openai_error(status, &text);
    }

    // Fault 8: the server's stdout is its one address line.
    let stdout = server.stdout.lock().unwrap().clone();
    assert_eq!(stdout.len(), 1, "{stdout:?}");
    server.still_serves("everything").await;
    server.assert_no_live_sequence().await;
}

// ---- Issue 15: the model's name, and `/metrics`. ----

/// The samples of a Prometheus text exposition, `name{labels}` -> value.
fn prometheus_samples(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {l}"));
            let value = value.parse().unwrap_or_else(|e| panic!("{e}: {l}"));
            (name.to_string(), value)
        })
        .collect()
}

/// The model is named by its name, never a path: in `/v1/models`, in responses (plain and
/// streamed), in the log; `"default"` and the name both select it. And `/metrics`, scraped
/// while a streamed request runs, shows the live figures `/v1/kv-cache` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_has_its_name_and_metrics_match_the_kv_cache_mid_request() {
    const NAME: &str = "SmolLM2-135M-Instruct";
    // A small window and group, so that a short prompt is quantized already.
    let server = Server::start(&[
        "--kv-window",
        "8",
        "--kv-group-size",
        "16",
        "--kv-key-group-size",
        "16",
    ]);
    let models = server.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["default", NAME], "{models}");
    let stdout = server.stdout.lock().unwrap().clone();
    assert!(
        stdout[0].starts_with(&format!("Serving {NAME} with")),
        "{stdout:?}"
    );

    for model in ["default", NAME] {
        let mut request = chat_request("Say hello.", 3);
        request.model = model.to_string();
        let response = server.client().chat().create(request).await.unwrap();
        assert_eq!(response.model, NAME, "asked for {model}");
    }
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "default", "stream": true, "max_tokens": 3,
                "messages": [{"role": "user", "content": "Say hello."}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let events = sse_data(&body);
    assert!(!events.is_empty(), "{body}");
    for event in &events {
        let chunk: serde_json::Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["model"], NAME, "{event}");
    }
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "no-such-model",
                "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains(NAME) && !body.contains('/'),
        "the refusal names the served model, no path: {body}"
    );

    // A long greedy reply, streamed: read its first chunk, so that its sequence is live.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", server.base))
        .json(&serde_json::json!({
            "model": "default", "stream": true, "max_tokens": 300, "temperature": 0,
            "messages": [{"role": "user",
                          "content": "Count from 1 to 300, one number per line."}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    stream.next().await.expect("a first chunk").unwrap();
    // Decode steps keep changing the figures: compare a scrape with the reports taken just
    // before and just after it, when those two agree (the figures did not move in between).
    let p = |s: &str| format!("mistralrs_logquant_{s}");
    let mut attempts = 0;
    let (report, samples) = loop {
        attempts += 1;
        let before = server.get_json("/v1/kv-cache").await;
        let text = reqwest::get(format!("{}/metrics", server.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let after = server.get_json("/v1/kv-cache").await;
        let same = before["live"] == after["live"]
            && before["live_sequences"] == after["live_sequences"]
            && before["peak_live_bytes"] == after["peak_live_bytes"];
        if same {
            break (after, prometheus_samples(&text));
        }
        assert!(attempts < 200, "figures never held still: {before} {after}");
    };
    let value = |name: &str| -> f64 {
        *samples
            .get(&p(name))
            .unwrap_or_else(|| panic!("no {} in {samples:?}", p(name)))
    };
    let number = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{v} in {report}"));
    assert!(number(&report["live_sequences"]) >= 1.0, "{report}");
    assert!(
        number(&report["live"]["quantized_tokens"]) > 0.0,
        "nothing quantized yet: {report}"
    );
    for (metric, field) in [
        ("kv_cache_live_sequences", &report["live_sequences"]),
        ("kv_cache_live_tokens", &report["live"]["tokens"]),
        (
            "kv_cache_live_full_precision_tokens",
            &report["live"]["full_precision_tokens"],
        ),
        (
            "kv_cache_live_quantized_tokens",
            &report["live"]["quantized_tokens"],
        ),
        ("kv_cache_live_bytes", &report["live"]["bytes"]),
        (
            "kv_cache_live_default_cache_bytes",
            &report["live"]["default_cache_bytes"],
        ),
        ("kv_cache_peak_live_bytes", &report["peak_live_bytes"]),
    ] {
        assert_eq!(value(metric), number(field), "{metric} vs {report}");
    }
    assert!(value("kv_cache_live_bytes") < value("kv_cache_live_default_cache_bytes"));
    let info = p(r#"kv_cache_info{backend="logquant","#);
    assert!(
        samples
            .iter()
            .any(|(k, v)| k.starts_with(&info) && *v == 1.0),
        "no {info}: {samples:?}"
    );
    drop(stream); // disconnect; the sequence is released
    server.assert_no_live_sequence().await;

    // Requests are counted by route and status, refusals included.
    let text = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = prometheus_samples(&text);
    let count = |route: &str, status: u16| {
        samples
            .get(&p(&format!(
                r#"http_requests_total{{route="{route}",status="{status}"}}"#
            )))
            .copied()
            .unwrap_or(0.0)
    };
    assert_eq!(count("/v1/chat/completions", 200), 4.0, "{text}");
    assert_eq!(count("/v1/chat/completions", 404), 1.0, "{text}");
    assert_eq!(count("/v1/models", 200), 1.0, "{text}");
    assert!(count("/v1/kv-cache", 200) >= 2.0, "{text}");
    assert!(count("/metrics", 200) >= 1.0, "{text}");
    assert!(!text.contains("/root") && !text.contains("/home"), "{text}");
}
