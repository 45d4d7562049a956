//! Shared helpers for the integration tests: the real default model, engines, prompts.
#![allow(dead_code)]

use std::sync::Arc;

use mistralrs_core::MistralRs;
use mistralrs_logquant::engine::{build_engine, EngineOptions, KvCacheChoice};
use mistralrs_logquant::generate::{special_token_ids, tokenize};
use mistralrs_logquant::model_source::ModelSource;

/// SmolLM2-135M-Instruct, fetched and verified on first use.
pub fn model() -> ModelSource {
    ModelSource::default_model().expect("default model")
}

/// An engine on the shared model with f32 weights, not the CPU default (`q8_0`): these tests
/// compare caches and kernels to 1e-3, and candle's Q8_0 matmul quantizes each activation row
/// to 8 bits, so a 1e-6 difference in attention can flip a code and move a log-probability by
/// whole tenths (measured 0.9 in `fused_decode_equals_the_default_cache...`). The default
/// weights are covered by `weights_mode_is_per_engine...`, the architecture matrix and the
/// server tests.
pub async fn engine(cache: KvCacheChoice) -> Arc<MistralRs> {
    engine_with(cache, |_| {}).await
}

pub async fn engine_with(
    cache: KvCacheChoice,
    configure: impl FnOnce(&mut EngineOptions),
) -> Arc<MistralRs> {
    let mut options = EngineOptions::new(model(), cache);
    options.weights = mistralrs_logquant::engine::Weights::F32;
    configure(&mut options);
    build_engine(&options).await.expect("engine")
}

pub fn suppressed() -> Vec<u32> {
    special_token_ids(&model()).expect("special tokens")
}

/// The shared long text (Genesis and Exodus, KJV; read-only test data).
pub fn shared_text() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/kjv_genesis_exodus.txt"
    ))
    .expect("../shared/data/kjv_genesis_exodus.txt")
}

/// The first 300,000 bytes of the shared text, tokenized by `engine`'s model.
pub async fn shared_tokens(engine: &MistralRs) -> Vec<u32> {
    tokens(engine, &shared_text()[..300_000]).await
}

/// Texts of different lengths from the shared long text (read-only test data).
pub fn passages() -> Vec<String> {
    let text = shared_text();
    let words: Vec<&str> = text.split_whitespace().collect();
    [(200, 40), (5000, 55), (20000, 90)]
        .iter()
        .map(|&(start, len)| words[start..start + len].join(" "))
        .collect()
}

pub async fn tokens(engine: &MistralRs, text: &str) -> Vec<u32> {
    tokenize(engine, text).await.expect("tokenize")
}

/// Analytic bytes per token of the default cache of SmolLM2-135M at the given element size:
/// 30 layers x (K + V) x 3 kv heads x 64 dims.
pub fn smollm2_dense_bytes_per_token(elem_size: usize) -> usize {
    30 * 2 * 3 * 64 * elem_size
}
