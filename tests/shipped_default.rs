//! The configuration users run, against the default cache, on the real model under the weights
//! users run (`--weights auto`: q8_0 on the CPU): `LogQuantConfig::default()` (K4V2, keys per
//! channel, Hadamard rotation, W = 42), whose values `src/cli/mod.rs` pins as the CLI default.
//! The prompt is long enough (2,048 tokens) that most cached tokens are quantized. Oracle: the
//! default cache, scored through the same decode path in the same process.
//!
//! The bounds are set from measured values with a margin, written beside each; the paper's
//! 2-bit setting (`LogQuantConfig::paper()`) measured outside them, so a change that put it back
//! in place of the default fails here.

mod common;

use mistralrs_logquant::config::LogQuantConfig;
use mistralrs_logquant::engine::{EngineOptions, KvCacheChoice};
use mistralrs_logquant::eval::{evaluate, EvalWindow};
use mistralrs_logquant::retrieval::{evaluate_copy, CopySettings};

fn text() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/kjv_genesis_exodus.txt")
}

/// KL and top-1 agreement over 256 tokens scored after a 2,048-token prefix, and the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_default_tracks_the_default_cache_at_2k_tokens() {
    let base = EngineOptions::new(common::model(), KvCacheChoice::Default);
    let shipped = KvCacheChoice::LogQuant(LogQuantConfig::default());
    let window = EvalWindow {
        start: 20_000,
        prefill: 2048,
        score: 256,
    };
    let rows = evaluate(&base, &text(), window, &[shipped], |_| {}, None)
        .await
        .expect("eval");
    let (default, logquant) = (&rows[0], &rows[1]);
    eprintln!(
        "shipped default at 2k: KL {:.4} nats, top-1 {:.3}, perplexity {:.3} vs {:.3}, {} of {} \
         bytes",
        logquant.kl_vs_default,
        logquant.top1_agreement,
        logquant.perplexity,
        default.perplexity,
        logquant.cache_bytes,
        logquant.dense_cache_bytes
    );
    // Bounds from the values measured 2026-12-07 (Sapphire Rapids, 2 cores, q8_0 weights):
    // see the constants below.
    assert!(
        logquant.kl_vs_default < KL_BOUND,
        "KL {}",
        logquant.kl_vs_default
    );
    assert!(
        logquant.top1_agreement > TOP1_BOUND,
        "top-1 agreement {}",
        logquant.top1_agreement
    );
    assert!(
        logquant.perplexity < default.perplexity * PPL_RATIO_BOUND,
        "perplexity {} against {}",
        logquant.perplexity,
        default.perplexity
    );
    // Most of 2,304 tokens quantized at about 3.9 bits against 32-bit rows (f32 activations).
    assert!(
        logquant.cache_bytes * 4 < logquant.dense_cache_bytes,
        "{} of {} bytes",
        logquant.cache_bytes,
        logquant.dense_cache_bytes
    );
}

/// The copy task: a passage, 1,000 tokens of other text, then the passage's first 40% again;
/// the shipped default must continue it about as far as the default cache does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_default_copies_a_passage_after_1k_tokens() {
    let base = EngineOptions::new(common::model(), KvCacheChoice::Default);
    let settings = CopySettings {
        start: 5000,
        passage: 160,
        prefix_percent: 40,
        prompts: 4,
        fillers: vec![1000],
    };
    let shipped = KvCacheChoice::LogQuant(LogQuantConfig::default());
    let rows = evaluate_copy(&base, &text(), &settings, &[shipped], |_| {}, |_| {})
        .await
        .expect("copy task");
    let (default, logquant) = (&rows[0].cells[0], &rows[1].cells[0]);
    eprintln!(
        "copy after 1k: default {:?} (mean {:.3}), shipped default {:?} (mean {:.3})",
        default.scores, default.mean, logquant.scores, logquant.mean
    );
    assert!(
        logquant.mean >= COPY_RATIO_BOUND * default.mean,
        "copy score {} against the default cache's {}",
        logquant.mean,
        default.mean
    );
}

// Measured 2026-12-07 on this window (shipped default / paper's 2-bit setting in its place):
// KL 0.0194 / 0.316 nats, top-1 0.922 / 0.711, perplexity 14.134 / 17.329 against the default
// cache's 14.055 (x1.006 / x1.233), 16.8 / 13.7 MB against 106.1 MB.
const KL_BOUND: f64 = 0.05;
const TOP1_BOUND: f64 = 0.85;
const PPL_RATIO_BOUND: f64 = 1.03;
// Measured: default cache 0.238 (0.378, 0.025, 0.298, 0.250), shipped default 0.126 (0.53x),
// paper's setting 0.033 (0.14x). Retrieval under q8_0 weights is the default's weak point
// (issue #32), so this bound only catches a collapse to the 2-bit level.
const COPY_RATIO_BOUND: f64 = 0.35;
