//! LogQuant end to end on SmolLM2-135M with the real engine (weights as f32, the CPU default):
//! 2-bit writes fluent text, the engine's byte counter shows the memory saving, and `eval`
//! measures the dtype it is given. Comparisons that need the model to be continuous (8-bit vs
//! default, fused vs portable) are in `continuous_model.rs`.

mod common;
mod spec;

use common::*;
use mistralrs_logquant::config::{KeyGrouping, LogQuantConfig};
use mistralrs_logquant::engine::{Dtype, KvCacheChoice};
use mistralrs_logquant::eval::perplexity;
use mistralrs_logquant::generate::{
    finished_sequences, generate_greedy, score_teacher_forced, usage_of_next_finished,
};

/// Long prompts from the shared text, tokenized by the model.
async fn long_prompts(lengths: &[usize]) -> Vec<Vec<u32>> {
    let engine = engine(KvCacheChoice::Default).await;
    let text = shared_text();
    let all = tokens(&engine, &text[..200_000]).await;
    let mut start = 1000;
    lengths
        .iter()
        .map(|&n| {
            let p = all[start..start + n].to_vec();
            start += n + 5000;
            p
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bit_default_setting_writes_fluent_text() {
    let prompts = long_prompts(&[600]).await;
    let suppressed = suppressed();
    let lq = engine(KvCacheChoice::LogQuant(LogQuantConfig::paper())).await;
    let finished = finished_sequences();
    let generated = generate_greedy(&lq, prompts[0].clone(), 64, &suppressed)
        .await
        .unwrap();
    let usage = usage_of_next_finished(finished).await.expect("usage");
    drop(lq);
    assert!(usage.quantized_tokens >= 400, "{usage:?}");
    // Fluency, judged by the model itself with the exact cache: greedy text of a working model
    // scores a low perplexity; text from a broken cache (loops of junk, wrong language) does not.
    let default = engine(KvCacheChoice::Default).await;
    let steps = score_teacher_forced(&default, prompts[0].clone(), generated.clone(), false)
        .await
        .unwrap();
    let ppl = perplexity(&steps.iter().map(|s| s.logprob).collect::<Vec<_>>());
    let reference = generate_greedy(&default, prompts[0].clone(), 64, &suppressed)
        .await
        .unwrap();
    let distinct = |t: &[u32]| t.iter().collect::<std::collections::HashSet<_>>().len();
    eprintln!(
        "2-bit continuation: perplexity {ppl:.2} under the default cache, {} distinct tokens of \
         64 (default cache's own continuation: {})",
        distinct(&generated),
        distinct(&reference)
    );
    assert!(ppl < 8.0, "2-bit continuation has perplexity {ppl:.2}");
    assert!(
        2 * distinct(&generated) >= distinct(&reference),
        "2-bit continuation repeats itself far more than the default cache's"
    );
}

/// Bytes of a LogQuant cache (2-bit, G=64) on SmolLM2 from token counts: 3,600 bytes per
/// quantized token (30 layers x K and V x 3 heads x (64 two-bit codes + one 16-bit scale and
/// min)), the activation dtype for full-precision and staged tokens.
fn analytic_bytes(quantized: usize, full_precision: usize, elem: usize) -> usize {
    quantized * 3600 + full_precision * smollm2_dense_bytes_per_token(elem)
}

/// Quantized and full-precision (selected or staged) token counts after a prefill of `prompt`
/// tokens and one decode step under the default LogQuant (W=42, keys per channel in groups of
/// 64 tokens), from the spec's rule: evicted tokens are quantized in whole key groups.
fn spec_counts(prompt: usize) -> (usize, usize) {
    let mut rule = spec::SpecSelection::new(spec::Rule::LogQuant { w: 42 });
    let evicted = rule.admit(prompt).len() + rule.admit(1).len();
    let quantized = evicted / 64 * 64;
    (quantized, prompt + 1 - quantized)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_bytes_at_4096_tokens_are_over_5x_below_the_16_bit_default() {
    let prompt = long_prompts(&[4095]).await.remove(0);
    let suppressed = suppressed();
    // f32 activations (this crate's CPU default): prefill 4096 tokens and read the counter.
    let lq = engine(KvCacheChoice::LogQuant(LogQuantConfig::paper())).await;
    let finished = finished_sequences();
    generate_greedy(&lq, prompt.clone(), 2, &suppressed)
        .await
        .unwrap();
    let usage = usage_of_next_finished(finished).await.expect("usage");
    drop(lq);
    assert_eq!(usage.tokens, 4096);
    let (q, f) = spec_counts(4095);
    assert_eq!((q, f), (3968, 128));
    assert_eq!(
        (usage.quantized_tokens, usage.full_precision_tokens),
        (q, f)
    );
    assert_eq!(usage.bytes, analytic_bytes(q, f, 4), "{usage:?}");
    assert_eq!(usage.dense_bytes, 4096 * smollm2_dense_bytes_per_token(4));
    assert_footprint_is_the_counter(4096, 32, &usage);
    // A 16-bit model holds the same tokens the same way, with 2-byte full-precision rows.
    let sixteen_bit_default = 4096 * smollm2_dense_bytes_per_token(2);
    let ratio_16 = sixteen_bit_default as f64 / analytic_bytes(q, f, 2) as f64;
    let ratio_f32 = usage.dense_bytes as f64 / usage.bytes as f64;
    eprintln!(
        "4096 tokens: {f} full precision, {q} quantized; f32: {} bytes, {ratio_f32:.2}x below the \
         f32 default cache; 16-bit: {:.2}x below the 16-bit default cache",
        usage.bytes, ratio_16
    );
    assert!(
        ratio_16 >= 5.0,
        "only {ratio_16:.2}x below the 16-bit default cache"
    );
    // 3,968 quantized tokens at 3,600 B and 128 f32 rows at 46,080 B: 9.35x below f32.
    assert!(
        ratio_f32 >= 9.0,
        "only {ratio_f32:.2}x below the f32 default cache"
    );

    // The counter in a 16-bit run (shorter: f16 prefill is slow on the CPU).
    let short = prompt[..511].to_vec();
    let lq = engine_with(KvCacheChoice::LogQuant(LogQuantConfig::paper()), |o| {
        o.dtype = Dtype::F16
    })
    .await;
    let finished = finished_sequences();
    generate_greedy(&lq, short, 2, &suppressed).await.unwrap();
    let usage = usage_of_next_finished(finished).await.expect("usage");
    assert_eq!(usage.tokens, 512);
    let (q, f) = spec_counts(511);
    assert_eq!(usage.bytes, analytic_bytes(q, f, 2), "{usage:?}");
    assert_eq!(usage.dense_bytes, 512 * smollm2_dense_bytes_per_token(2));
    assert_footprint_is_the_counter(512, 16, &usage);
}

/// `LogQuantConfig::footprint` (the bits per value that `eval` records and plots) against the
/// engine's counter, which sums tensor sizes: same token split, same bytes for SmolLM2's
/// 30 layers x 3 KV heads x 64 channels of keys and of values per token.
fn assert_footprint_is_the_counter(
    tokens: usize,
    activation_bits: u32,
    usage: &mistralrs_core::kv_cache_backend::LayerUsage,
) {
    let footprint = LogQuantConfig::paper().footprint(tokens);
    assert_eq!(
        (footprint.quantized, footprint.full_precision),
        (usage.quantized_tokens, usage.full_precision_tokens)
    );
    let values = (tokens * 30 * 3 * 64 * 2) as f64;
    let bytes = footprint.bits_per_value(activation_bits) * values / 8.0;
    assert!(
        (bytes - usage.bytes as f64).abs() < 0.5,
        "footprint {bytes} bytes, counter {}",
        usage.bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_token_keys_need_no_staging() {
    let prompt = long_prompts(&[1023]).await.remove(0);
    let per_token = LogQuantConfig {
        key_grouping: KeyGrouping::PerToken,
        ..LogQuantConfig::paper()
    };
    let lq = engine(KvCacheChoice::LogQuant(per_token)).await;
    let finished = finished_sequences();
    generate_greedy(&lq, prompt, 2, &suppressed())
        .await
        .unwrap();
    let usage = usage_of_next_finished(finished).await.expect("usage");
    // After the eager prefill of 1023 tokens 2W + (1023 - 2W) mod W stay (W = 42), and the
    // decode step adds one; every evicted token is quantized at once.
    let after_prefill = 2 * 42 + (1023 - 2 * 42) % 42;
    assert_eq!(usage.full_precision_tokens, after_prefill + 1, "{usage:?}");
    assert_eq!(usage.quantized_tokens, 1024 - after_prefill - 1);
}

/// `eval --dtype bf16` measures bf16: the engines `evaluate` builds take the dtype of the
/// options it is given (they once hard-coded f32). Oracle: the cache's bytes are whole
/// bf16 rows (2 bytes per value, counted from SmolLM2's shapes), not f32 ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_measures_the_dtype_it_is_given() {
    use mistralrs_logquant::engine::EngineOptions;
    use mistralrs_logquant::eval::{evaluate, EvalWindow};
    let text = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/kjv_genesis_exodus.txt"
    ));
    let window = EvalWindow {
        start: 0,
        prefill: 32,
        score: 8,
    };
    // W = 100: every token stays in full precision, so every cached byte is an activation.
    let exact = KvCacheChoice::LogQuant(LogQuantConfig {
        window: 100,
        ..LogQuantConfig::paper()
    });
    for (dtype, bytes_per_value) in [(Dtype::Bf16, 2), (Dtype::F32, 4)] {
        let mut base = EngineOptions::new(model(), KvCacheChoice::Default);
        base.dtype = dtype;
        let rows = evaluate(
            &base,
            text,
            window,
            std::slice::from_ref(&exact),
            |_| {},
            None,
        )
        .await
        .expect("eval");
        let per_token = smollm2_dense_bytes_per_token(bytes_per_value);
        let bytes = rows[1].cache_bytes;
        assert!(
            bytes % per_token == 0
                && (window.prefill..=window.prefill + window.score).contains(&(bytes / per_token)),
            "{dtype:?}: {bytes} bytes is not a whole number of {bytes_per_value}-byte rows of \
             32-40 tokens"
        );
        assert!(rows[1].perplexity.is_finite() && rows[0].perplexity.is_finite());
    }
}
