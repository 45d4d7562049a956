//! A server one can expose: the real `serve` binary on 127.0.0.1 with the real model, tried with
//! what an attacker on the network would send. Nothing in a request may make it read a file,
//! reach the network or change what it serves; every bad input is a 4xx with one line; it keeps
//! serving. The oracles are outside the server: a local listener that must see no connection, a
//! named pipe the server would block on if it opened it, the answers of a second request.

mod common;
#[path = "support/server.rs"]
mod server_process;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::config::OpenAIConfig;
use async_openai::Client;
use serde_json::{json, Value};
use server_process::{chat_request, exited_within, model_with_context, Server, BIN};

const KEY: &str = "test-key-7f3a9c";

/// A raw HTTP exchange: `(status, body)`, with the key when `key` is given.
async fn send(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", server.base))
        .timeout(Duration::from_secs(120));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: no answer: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn post(server: &Server, path: &str, body: &Value) -> (u16, String) {
    send(
        server,
        reqwest::Method::POST,
        path,
        Some(KEY),
        Some(body.to_string().into_bytes()),
    )
    .await
}

/// The error message of a 4xx answer: one line in OpenAI's shape.
fn one_line_error(status: u16, body: &str) -> String {
    assert!((400..500).contains(&status), "status {status}: {body}");
    let value: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    let message = value["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {body}"))
        .to_string();
    assert!(!message.is_empty() && !message.contains('\n'), "{body}");
    message
}

fn chat_with(content: Value) -> Value {
    json!({"model": "default", "max_tokens": 2,
           "messages": [{"role": "user", "content": content}]})
}

fn image_part(url: &str) -> Value {
    json!([{"type": "text", "text": "What is this?"},
           {"type": "image_url", "image_url": {"url": url}}])
}

/// An HTTP listener on 127.0.0.1 that counts the connections it sees.
fn counting_listener() -> (String, Arc<AtomicUsize>) {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        for stream in socket.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (format!("http://{addr}"), seen)
}

/// A named pipe: a server that opened it for reading would block there (no writer ever
/// comes), so a prompt 4xx shows it was never opened.
fn named_pipe(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("probe.png");
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    path
}

fn keyed_client(server: &Server, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", server.base))
            .with_api_key(key),
    )
}

/// The API key, media refusals, admin routes, limits, slow clients and the OpenAI details of
/// the stream against one server; it answers a good request after every case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_server_refuses_what_it_must_and_keeps_serving() {
    let model = model_with_context(256);
    let server = Server::start_with_env(
        &[
            "-m",
            model.to_str().unwrap(),
            "--max-request-bytes",
            "1MiB",
            "--max-messages",
            "8",
            "--request-read-timeout",
            "2",
        ],
        &[("MISTRALRS_LOGQUANT_API_KEY", KEY)],
    );
    let get = |path: &'static str, key: Option<&'static str>| {
        send(&server, reqwest::Method::GET, path, key, None)
    };

    // The key: /health is open, everything else needs it.
    assert_eq!(get("/health", None).await.0, 200);
    for key in [None, Some("wrong"), Some("test-key-7f3a9")] {
        let (status, body) = get("/v1/models", key).await;
        assert_eq!(status, 401, "{key:?}: {body}");
        one_line_error(status, &body);
    }
    assert_eq!(get("/v1/models", Some(KEY)).await.0, 200);
    let refused = keyed_client(&server, "wrong")
        .chat()
        .create(chat_request("Say hello.", 2))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let good = keyed_client(&server, KEY);
    let still_serves = |after: &'static str| {
        let good = good.clone();
        async move {
            let reply = good.chat().create(chat_request("Say hello.", 2)).await;
            assert!(reply.is_ok(), "after {after}: {reply:?}");
        }
    };
    still_serves("the key checks").await;

    // Media with a text-only model: refused before anything is opened or fetched.
    let dir = tempfile::tempdir().unwrap();
    let pipe = named_pipe(dir.path());
    let existing = dir.path().join("exists.png");
    std::fs::write(&existing, b"not an image").unwrap();
    let (listener, seen) = counting_listener();
    let mut messages = Vec::new();
    for url in [
        pipe.to_str().unwrap().to_string(),
        format!("file://{}", pipe.display()),
        existing.to_str().unwrap().to_string(),
        "/no/such/file.png".to_string(),
        format!("{listener}/image.png"),
        "data:image/png;base64,iVBORw0KGgo=".to_string(),
    ] {
        let started = Instant::now();
        let (status, body) = post(
            &server,
            "/v1/chat/completions",
            &chat_with(image_part(&url)),
        )
        .await;
        assert_eq!(status, 400, "{url}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{url}: slow refusal"
        );
        messages.push(one_line_error(status, &body));
    }
    assert!(messages.iter().all(|m| m == &messages[0]), "{messages:#?}");
    assert!(messages[0].contains("reads text only"), "{}", messages[0]);
    // An audio part too, and web search (mistral.rs would fetch pages).
    let audio = json!([{"type": "audio_url", "audio_url": {"url": format!("{listener}/a.wav")}}]);
    let (status, body) = post(&server, "/v1/chat/completions", &chat_with(audio)).await;
    one_line_error(status, &body);
    let mut search = chat_with(json!("Find news."));
    search["web_search_options"] = json!({});
    let (status, body) = post(&server, "/v1/chat/completions", &search).await;
    assert!(
        one_line_error(status, &body).contains("web search"),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the server fetched a URL from a request"
    );
    still_serves("the media refusals").await;

    // Admin and unserved routes are 404 by default; the model stays loaded.
    for path in [
        "/v1/models/unload",
        "/v1/models/reload",
        "/re_isq",
        "/v1/system/doctor",
    ] {
        let (status, body) = post(&server, path, &json!({"model_id": "default"})).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(one_line_error(status, &body).contains("admin"), "{body}");
    }
    let (status, body) = get("/v1/system/info", Some(KEY)).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post(
        &server,
        "/v1/responses",
        &json!({"model": "default", "input": "x"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get("/no/such/route", Some(KEY)).await;
    assert_eq!(status, 404);
    one_line_error(status, &body);
    still_serves("the admin routes").await;

    // Limits: body size, message count, context, max_tokens.
    let big = chat_with(json!("x ".repeat(600_000)));
    let (status, body) = post(&server, "/v1/chat/completions", &big).await;
    assert_eq!(status, 413, "{body}");
    one_line_error(status, &body);
    let many = json!({"model": "default", "max_tokens": 1,
        "messages": vec![json!({"role": "user", "content": "hi"}); 9]});
    let (status, body) = post(&server, "/v1/chat/completions", &many).await;
    assert!(
        one_line_error(status, &body).contains("9 messages"),
        "{body}"
    );
    let long = chat_with(json!(
        "The quick brown fox jumps over the lazy dog. ".repeat(100)
    ));
    let (status, body) = post(&server, "/v1/chat/completions", &long).await;
    let message = one_line_error(status, &body);
    assert!(
        message.contains("256"),
        "the context is not named: {message}"
    );
    let mut huge = chat_with(json!("hi"));
    huge["max_tokens"] = json!(1_000_000);
    let (status, body) = post(&server, "/v1/chat/completions", &huge).await;
    let message = one_line_error(status, &body);
    assert!(
        message.contains("1000000") && message.contains("256"),
        "{message}"
    );
    still_serves("the limits").await;

    // Slow clients: headers not sent in time, then a body not sent in time.
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a connection without complete headers was held for {:?}",
        started.elapsed()
    );
    let mut slow = TcpStream::connect(&addr).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Streaming: no usage chunk unless asked for; exactly one at the end when asked.
    for include_usage in [None, Some(false), Some(true)] {
        let mut body = chat_with(json!("Count to five."));
        body["stream"] = json!(true);
        body["max_tokens"] = json!(4);
        if let Some(include) = include_usage {
            body["stream_options"] = json!({"include_usage": include});
        }
        let (status, text) = post(&server, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{text}");
        let chunks: Vec<Value> = text
            .split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let with_usage: Vec<&Value> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
        if include_usage == Some(true) {
            assert_eq!(with_usage.len(), 1, "{text}");
            assert_eq!(with_usage[0]["choices"], json!([]), "{text}");
            assert!(
                std::ptr::eq(with_usage[0], chunks.last().unwrap()),
                "{text}"
            );
            assert!(
                with_usage[0]["usage"]["completion_tokens"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
        } else {
            assert!(with_usage.is_empty(), "{include_usage:?}: {text}");
        }
    }

    // A stream cut by max_tokens inside a multi-byte character still ends with its finish
    // reason and [DONE] (mistral.rs held the last chunk back with the incomplete bytes and
    // ended the stream without either: found by the soak). Seeded samples of emoji, each cut
    // after an emoji's first token on the unfixed build (seeds 0, 3 and 7 at 4, 13 and 11
    // tokens, 2026-12-07).
    for (seed, max_tokens) in [(0, 4), (3, 13), (7, 11)] {
        let body = json!({"model": "default", "stream": true, "temperature": 1.0, "seed": seed,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Reply with emoji only."}]});
        let (status, text) = post(&server, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{text}");
        let finished = text
            .split("\n\n")
            .any(|e| e.contains("\"finish_reason\":\"length\""));
        assert!(
            finished && text.trim_end().ends_with("data: [DONE]"),
            "seed {seed}: {text}"
        );
    }

    // The key never reaches the log.
    let stderr = server.stderr.lock().unwrap().join("\n");
    let stdout = server.stdout.lock().unwrap().join("\n");
    assert!(!stderr.contains(KEY) && !stdout.contains(KEY));
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Admin routes need their flag, and then the key; the flag without a key is refused off
/// loopback, before the model loads.
#[tokio::test]
async fn admin_routes_need_their_flag_and_then_the_key() {
    let out = exited_within(
        std::process::Command::new(BIN)
            .args([
                "serve",
                "--host",
                "0.0.0.0",
                "-p",
                "0",
                "--enable-admin-routes",
            ])
            .env_remove("MISTRALRS_LOGQUANT_API_KEY")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(30),
        "--enable-admin-routes on 0.0.0.0 without a key",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--api-key"), "{stderr}");

    let server = Server::start(&["--enable-admin-routes", "--api-key", KEY]);
    let (status, _) = send(&server, reqwest::Method::GET, "/v1/system/info", None, None).await;
    assert_eq!(status, 401);
    let (status, body) = send(
        &server,
        reqwest::Method::GET,
        "/v1/system/info",
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let args = server.stdout.lock().unwrap().join("\n") + &server.stderr.lock().unwrap().join("\n");
    assert!(!args.contains(KEY));
}
