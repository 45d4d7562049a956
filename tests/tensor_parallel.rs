//! Tensor parallelism across processes (mistral.rs's ring backend, the `ring` build): two ranks
//! of the real binary on 127.0.0.1 against one process of the plain build, on a random-weight
//! tiny llama whose heads split evenly (4 query heads, 2 KV heads: one KV head per rank).
//!
//! Run by `make test-tp` (not in `make test`: it needs the second, `ring`, build of everything,
//! in target/ring). Each comparison starts rank 1 as a child, then rank 0, sends requests one at
//! a time to rank 0 through an OpenAI client, and kills both by PID at the end (a worker rank
//! never exits by itself). Rank 0 is a child too, rather than an engine in this process: each
//! cache needs a fresh pair of ranks, and the ring's sockets live once per process.
//!
//! The oracle is the same binary built without `ring` (`MISTRALRS_LOGQUANT_SINGLE_BIN`, by
//! default target/release/mistralrs-logquant, which `make test-tp` builds) serving the same
//! model alone: the same greedy tokens, log-probabilities within [`LOGPROB_TOLERANCE`], and
//! (per rank) half its KV-cache bytes.
#![cfg(feature = "ring")]

mod tiny;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use futures::StreamExt;
use serde_json::{json, Value};

const RING_BIN: &str = env!("CARGO_BIN_EXE_mistralrs-logquant");

/// Largest difference in a token's log-probability between the split and the single process.
/// Each rank sums half of every attention and MLP output and the halves are added over TCP:
/// the same f32 numbers in another order (measured: see docs/tensor-parallel.md).
const LOGPROB_TOLERANCE: f32 = 1e-3;

/// Tokens generated per request.
const MAX_TOKENS: u32 = 12;

fn single_process_bin() -> PathBuf {
    let path = std::env::var_os("MISTRALRS_LOGQUANT_SINGLE_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/mistralrs-logquant"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: `make test-tp` builds the plain binary first",
        path.display()
    );
    path
}

/// A child process, killed by PID on drop; `line` waits for a line of its stdout.
struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    fn start(bin: &Path, args: &[&str]) -> Process {
        let mut child = Command::new(bin)
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("RING_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the server");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Process { child, lines }
    }

    /// The first stdout line containing `needle` (panics after `limit`).
    fn line(&self, needle: &str, limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(e) => panic!("no line with `{needle}` from the server: {e}"),
            }
        }
    }

    /// The server's base URL, from its "Serving ... on http://ADDR" line.
    fn base_url(&self) -> String {
        let line = self.line("on http://", Duration::from_secs(300));
        let addr = line.split("on http://").nth(1).unwrap();
        format!("http://{}", addr.split_whitespace().next().unwrap())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The two ranks' configs on 127.0.0.1 with free ports: rank 0 listens on `p0`, rank 1 on `p1`,
/// each connects to the other, and rank 1 fetches requests from rank 0's `master`.
fn ring_configs(dir: &Path) -> [PathBuf; 2] {
    let (p0, p1, master) = (free_port(), free_port(), free_port());
    let configs = [
        json!({"master_port": master, "port": p0, "right_ip": "127.0.0.1", "right_port": p1,
               "rank": 0, "world_size": 2}),
        json!({"master_ip": "127.0.0.1", "master_port": master, "port": p1,
               "right_ip": "127.0.0.1", "right_port": p0, "rank": 1, "world_size": 2}),
    ];
    configs.map(|config| {
        let path = dir.join(format!("rank{}.json", config["rank"]));
        std::fs::write(&path, config.to_string()).unwrap();
        path
    })
}

/// What one greedy request produced, and the KV cache it left.
#[derive(Debug)]
struct Reply {
    tokens: Vec<String>,
    logprobs: Vec<f32>,
    /// `/v1/kv-cache`'s `last_finished` after the request.
    cache: Value,
    tensor_parallel: Value,
}

fn prompts() -> Vec<String> {
    // Word-level prompts of ~60-90 words (the tiny tokenizer's vocabulary is the word list).
    let mut rng = tiny::Rng::new(0x7E57);
    (0..3)
        .map(|i| {
            let ids = rng.words(60 + 15 * i);
            let words: Vec<String> = ids.iter().map(|id| format!("w{id}")).collect();
            words.join(" ")
        })
        .collect()
}

fn client(base: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{base}/v1"))
            .with_api_key("none"),
    )
}

/// One chat request: greedy, or sampled at temperature 1 with `seed`.
async fn reply(base: &str, prompt: &str, seed: Option<i64>) -> Reply {
    let mut request = CreateChatCompletionRequestArgs::default();
    request
        .model("default")
        .max_completion_tokens(MAX_TOKENS)
        .temperature(if seed.is_some() { 1.0 } else { 0.0 })
        .logprobs(true)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(prompt)
            .build()
            .unwrap()
            .into()]);
    if let Some(seed) = seed {
        request.seed(seed);
    }
    let response = client(base)
        .chat()
        .create(request.build().unwrap())
        .await
        .unwrap();
    let logprobs = response.choices[0]
        .logprobs
        .as_ref()
        .and_then(|l| l.content.clone())
        .expect("logprobs in the reply");
    let report: Value = reqwest::get(format!("{base}/v1/kv-cache"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Reply {
        tokens: logprobs.iter().map(|t| t.token.clone()).collect(),
        logprobs: logprobs.iter().map(|t| t.logprob).collect(),
        cache: report["last_finished"].clone(),
        tensor_parallel: report["tensor_parallel"].clone(),
    }
}

/// The greedy replies to [`prompts`], one request at a time (every rank must run the same
/// batches), then a seeded sampled reply to the first prompt.
async fn replies(base: &str) -> Vec<Reply> {
    let mut replies = Vec::new();
    for prompt in prompts() {
        replies.push(reply(base, &prompt, None).await);
    }
    replies.push(reply(base, &prompts()[0], Some(11)).await);
    replies
}

/// The replies of the model served by one plain process, then by two ranks, with `cache_args`.
async fn single_and_split(arch: tiny::Arch, cache_args: &[&str]) -> (Vec<Reply>, Vec<Reply>) {
    let dir = tempfile::tempdir().unwrap();
    let model = arch.write_safetensors(&dir.path().join(format!("tiny-{}", arch.hf_name())));
    let model = model.to_str().unwrap();
    let common: Vec<&str> = [&["--model", model, "--cpu"], cache_args].concat();

    let single = {
        let server = Process::start(&single_process_bin(), &[&["-p", "0"], &common[..]].concat());
        let base = server.base_url();
        replies(&base).await
    };

    let [rank0_config, rank1_config] = ring_configs(dir.path());
    let rank1 = Process::start(
        Path::new(RING_BIN),
        &[
            &["--rank-config", rank1_config.to_str().unwrap()],
            &common[..],
        ]
        .concat(),
    );
    rank1.line("Rank 1 of 2", Duration::from_secs(60));
    // Rank 0 must reach the ring within 10 s of rank 1 (mistral.rs's connect timeout).
    let rank0 = Process::start(
        Path::new(RING_BIN),
        &[
            &["-p", "0", "--rank-config", rank0_config.to_str().unwrap()],
            &common[..],
        ]
        .concat(),
    );
    let base = rank0.base_url();
    let split = replies(&base).await;
    // Two requests at once: rank 0's server lets one reach the engine at a time, so both are
    // answered (no deadlock of the ranks' collectives) with the tokens of one process.
    let all = prompts();
    let (first, second) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(reply(&base, &all[0], None), reply(&base, &all[1], None))
    })
    .await
    .expect("two concurrent requests were not both answered within 120 s");
    for (i, concurrent) in [first, second].into_iter().enumerate() {
        assert_eq!(
            concurrent.tokens, single[i].tokens,
            "concurrent request {i}: greedy tokens differ from one process"
        );
    }
    // A client that goes away after the first streamed chunk: the ranks finish its sequence
    // together, and the next request is answered as one process answers it.
    let mut stream = client(&base)
        .chat()
        .create_stream(
            CreateChatCompletionRequestArgs::default()
                .model("default")
                .max_completion_tokens(1500u32)
                .temperature(0.0)
                .messages([ChatCompletionRequestUserMessageArgs::default()
                    .content(all[2].clone())
                    .build()
                    .unwrap()
                    .into()])
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    // The same for a plain (not streamed) request whose client gives up after 200 ms.
    let abandoned = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .timeout(Duration::from_millis(200))
        .json(
            &json!({"model": "default", "max_tokens": 1500, "temperature": 0.0,
                      "messages": [{"role": "user", "content": all[2]}]}),
        )
        .send()
        .await;
    // Either the client gave up mid-sequence (a timeout), or the model stopped early and
    // answered within 200 ms (then nothing was abandoned, and its reply says it stopped).
    match abandoned {
        Err(e) => assert!(
            e.is_timeout(),
            "the abandoned request failed otherwise: {e}"
        ),
        Ok(response) => {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(
                body["choices"][0]["finish_reason"], "stop",
                "answered within 200 ms without stopping early: {body}"
            );
        }
    }
    // Long enough that the client leaves mid-sequence; a rank out of step would hang here.
    let after = tokio::time::timeout(Duration::from_secs(120), reply(&base, &all[2], None))
        .await
        .expect("the request after a disconnected client was not answered within 120 s");
    assert_eq!(
        after.tokens, single[2].tokens,
        "after a disconnected client: greedy tokens differ from one process"
    );
    drop(rank0);
    drop(rank1);
    (single, split)
}

fn assert_same_greedy_run(single: &[Reply], split: &[Reply]) {
    assert_eq!(single.len(), split.len());
    for (i, (one, two)) in single.iter().zip(split).enumerate() {
        // The last reply is sampled with a seed: the same tokens only if every rank drew them.
        assert_eq!(one.tokens, two.tokens, "reply {i}: tokens differ");
        assert!(!one.tokens.is_empty(), "prompt {i}: no tokens");
        let worst = one
            .logprobs
            .iter()
            .zip(&two.logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!("prompt {i}: max |logprob difference| {worst:.2e}");
        assert!(
            worst <= LOGPROB_TOLERANCE,
            "prompt {i}: log-probabilities differ by {worst}"
        );
        assert_eq!(two.tensor_parallel["rank"], 0);
        assert_eq!(two.tensor_parallel["world_size"], 2);
        assert_eq!(two.tensor_parallel["usage_is_a_share"], true);
        assert!(one.tensor_parallel.is_null());
    }
}

/// Rank 0 caches half of the KV heads: half the bytes of one process, for the same tokens.
fn assert_half_the_cache(single: &[Reply], split: &[Reply]) {
    for (i, (one, two)) in single.iter().zip(split).enumerate() {
        assert_eq!(one.cache["tokens"], two.cache["tokens"], "prompt {i}");
        for field in ["bytes", "default_cache_bytes"] {
            let (whole, share) = (
                one.cache[field].as_u64().unwrap(),
                two.cache[field].as_u64().unwrap(),
            );
            println!("prompt {i}: {field} one process {whole}, rank 0 of 2 {share}");
            assert!(whole > 0, "prompt {i}: {field}");
            assert_eq!(share * 2, whole, "prompt {i}: {field}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_on_two_ranks_gives_the_tokens_of_one_process() {
    let (single, split) = single_and_split(tiny::Arch::Llama, &["--kv-cache", "passthrough"]).await;
    assert_same_greedy_run(&single, &split);
    assert_half_the_cache(&single, &split);
}

/// The architectures of the matrix whose mistral.rs 0.8.1 files split attention over ranks and
/// that load from the tests' safetensors form with 4 query and 2 KV heads.
const SPLIT_ARCHITECTURES: [tiny::Arch; 4] = [
    tiny::Arch::Llama,
    tiny::Arch::Mistral,
    tiny::Arch::Qwen2,
    tiny::Arch::Qwen3,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logquant_on_two_ranks_gives_the_tokens_of_one_process_with_half_the_cache() {
    for arch in SPLIT_ARCHITECTURES {
        println!("{arch:?}");
        // A small window and groups, so that most of each prompt is quantized.
        let (single, split) = single_and_split(
            arch,
            &[
                "--kv-cache",
                "logquant",
                "--kv-window",
                "8",
                "--kv-group-size",
                "16",
                "--kv-key-group-size",
                "16",
            ],
        )
        .await;
        for reply in single.iter().chain(&split) {
            let quantized = reply.cache["quantized_tokens"].as_u64().unwrap();
            let tokens = reply.cache["tokens"].as_u64().unwrap();
            assert!(
                quantized * 2 > tokens,
                "{arch:?}: most tokens quantized: {}",
                reply.cache
            );
        }
        assert_same_greedy_run(&single, &split);
        assert_half_the_cache(&single, &split);
    }
}
