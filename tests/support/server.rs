//! A `mistralrs-logquant serve` child process on 127.0.0.1 for the integration tests, found by
//! the line it prints ("... on http://ADDR"). Included with `#[path]` by the test binaries that
//! start servers, beside their `mod common`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use async_openai::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_mistralrs-logquant");

/// A server process, killed on drop.
pub struct Server {
    pub child: Child,
    pub base: String,
    /// Every line the server wrote to stdout.
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Every line the server wrote to stderr (also echoed to this process's stderr).
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// Started with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_with_env_removed(args, env, &[])
    }

    /// Started with extra environment variables and without the `removed` ones.
    pub fn start_with_env_removed(args: &[&str], env: &[(&str, &str)], removed: &[&str]) -> Server {
        // The test helper fetches the default model first, so the server never downloads.
        let _ = super::common::model();
        let mut command = Command::new(BIN);
        for var in removed {
            command.env_remove(var);
        }
        let mut child = command
            .arg("serve")
            .args(["-p", "0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let stderr_lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let seen_stderr = stderr_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                seen_stderr.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split("on http://").nth(1) {
                    let _ = tx.send(format!("http://{}", url.trim()));
                }
                seen.lock().unwrap().push(line);
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("server did not report its address");
        Server {
            child,
            base,
            stdout: lines,
            stderr: stderr_lines,
        }
    }

    pub fn client(&self) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{}/v1", self.base))
                .with_api_key("none"),
        )
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, body: String) -> (u16, String) {
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

/// The output of `child`, which must exit within `limit`; killed, and the test failed with
/// `what`, if it is still running then (a server that started instead of refusing).
pub fn exited_within(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A copy of the default model whose GGUF metadata says the context is `n` tokens (the weights
/// are untouched), so that filling the context takes seconds, not minutes.
pub fn model_with_context(n: u32) -> std::path::PathBuf {
    let source = super::common::model();
    let source = match &source {
        mistralrs_logquant::model_source::ModelSource::Gguf(path) => path.clone(),
        other => panic!("default model is not a GGUF file: {other:?}"),
    };
    let mut bytes = std::fs::read(&source).unwrap();
    let key = b"llama.context_length";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("llama.context_length in the GGUF metadata");
    let kind_at = at + key.len();
    let kind = u32::from_le_bytes(bytes[kind_at..kind_at + 4].try_into().unwrap());
    let value_at = kind_at + 4;
    match kind {
        4 => bytes[value_at..value_at + 4].copy_from_slice(&n.to_le_bytes()),
        10 => bytes[value_at..value_at + 8].copy_from_slice(&u64::from(n).to_le_bytes()),
        other => panic!("llama.context_length has GGUF type {other}"),
    }
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("smollm2-135m-context-{n}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A greedy one-message chat request for `default`, at most `max_tokens` tokens.
pub fn chat_request(text: &str, max_tokens: u32) -> CreateChatCompletionRequest {
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
