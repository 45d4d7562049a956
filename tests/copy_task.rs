//! `eval --task copy` and `eval --task needle` on SmolLM2 and the shared text: the retrieval
//! scores separate a cache that keeps the passage (or the pass key) from one that has lost it.
//!
//! Oracle: the default cache copies a 100-token passage back after 300 tokens of unrelated text
//! (measured 0.81 of the words, 2 of 3 verbatim), while LogQuant's `none` policy at 2 bits
//! (every token quantized once a key group is full) gets almost nothing right (0.05). Weights run
//! as f32 (`--weights f32`, the setting the scores were measured with); both caches see the same prompts in
//! one process.

mod common;

use common::*;
use mistralrs_logquant::config::{LogQuantConfig, PolicyKind};
use mistralrs_logquant::engine::KvCacheChoice;
use mistralrs_logquant::needle::{evaluate_needle, NeedleRow, NeedleSettings};
use mistralrs_logquant::retrieval::{evaluate_copy, CopySettings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_cache_copies_what_an_all_quantized_cache_loses() {
    let text = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/kjv_genesis_exodus.txt"
    ));
    let settings = CopySettings {
        start: 20000,
        passage: 100,
        prefix_percent: 40,
        prompts: 2,
        fillers: vec![300],
    };
    let broken = KvCacheChoice::LogQuant(LogQuantConfig {
        policy: PolicyKind::None,
        ..LogQuantConfig::paper()
    });
    let mut base = mistralrs_logquant::engine::EngineOptions::new(model(), KvCacheChoice::Default);
    base.weights = mistralrs_logquant::engine::Weights::F32;
    let rows = evaluate_copy(
        &base,
        text,
        &settings,
        &[KvCacheChoice::Default, broken],
        |_| {},
        |_| {},
    )
    .await
    .expect("copy task");
    let table = format!("{rows:#?}");
    assert_eq!(rows.len(), 2, "{table}");
    let (default, none) = (&rows[0].cells[0], &rows[1].cells[0]);
    assert_eq!(default.scores.len(), 2);
    assert!(
        default.mean >= 0.5 && none.mean <= default.mean - 0.4,
        "default {:?} vs none {:?}\n{table}",
        default.scores,
        none.scores
    );
    // The byte counter of the last prompt: 100 + 300 + 40 prompt tokens and 2 separators, plus
    // the 60 generated (the last one is not cached).
    assert!(
        rows[1].memory.cache_bytes * 4 < rows[0].memory.cache_bytes,
        "{table}"
    );
    assert_eq!(rows[0].memory.cached_tokens, rows[1].memory.cached_tokens);
}

/// `eval --task needle` on SmolLM2: the default cache reads pass keys back from 600-token
/// prompts, and the all-quantized 2-bit cache loses most of them. Oracle: the default cache on
/// the same keys, texts and depths (measured: 5 of 6 keys whole, mean 0.83; all quantized: 2 of
/// 6, mean 0.57).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_cache_finds_the_pass_key_an_all_quantized_cache_loses() {
    let text = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/kjv_genesis_exodus.txt"
    ));
    let settings = NeedleSettings {
        start: 20000,
        prompts: 2,
        lengths: vec![600],
        depths: vec![10, 50, 90],
    };
    let broken = KvCacheChoice::LogQuant(LogQuantConfig {
        policy: PolicyKind::None,
        ..LogQuantConfig::paper()
    });
    let mut base = mistralrs_logquant::engine::EngineOptions::new(model(), KvCacheChoice::Default);
    base.weights = mistralrs_logquant::engine::Weights::F32;
    let rows = evaluate_needle(
        &base,
        text,
        &settings,
        &[KvCacheChoice::Default, broken],
        |_| {},
        |_| {},
    )
    .await
    .expect("needle task");
    let table = format!("{rows:#?}");
    assert_eq!(rows.len(), 2, "{table}");
    let scores = |r: &NeedleRow| r.scores_at_length(600);
    let (default, none) = (scores(&rows[0]), scores(&rows[1]));
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    eprintln!("needle at 600 tokens: default {default:?}, all quantized {none:?}");
    assert_eq!(default.len(), 6, "{table}");
    assert_eq!(rows[0].cells.len(), 3);
    let whole = |s: &[f64]| s.iter().filter(|&&x| x == 1.0).count();
    assert!(
        mean(&default) >= 0.75 && whole(&none) + 2 <= whole(&default),
        "default {default:?} vs none {none:?}\n{table}"
    );
    assert_eq!(rows[0].memory.cached_tokens, rows[1].memory.cached_tokens);
}
