//! LogQuant end to end on SmolLM2-135M with the real engine: 8-bit agrees with the default
//! cache, 2-bit writes fluent text, and the engine's byte counter shows the memory saving.

mod common;

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
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/kjv_genesis_exodus.txt"
    ))
    .unwrap();
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
async fn eight_bit_greedy_output_agrees_with_the_default_cache() {
    let prompts = long_prompts(&[150, 230, 310]).await;
    let suppressed = suppressed();
    let default = engine(KvCacheChoice::Default).await;
    let mut reference = Vec::new();
    for p in &prompts {
        reference.push(generate_greedy(&default, p.clone(), 32, &suppressed).await.unwrap());
    }
    drop(default);
    // A small window and group so that most of each prompt really is quantized.
    let config = LogQuantConfig {
        bits: 8,
        window: 8,
        group_size: 16,
        ..Default::default()
    };
    let lq = engine(KvCacheChoice::LogQuant(config)).await;
    for (p, want) in prompts.iter().zip(&reference) {
        let finished = finished_sequences();
        let got = generate_greedy(&lq, p.clone(), 32, &suppressed).await.unwrap();
        let usage = usage_of_next_finished(finished).await.expect("usage");
        assert!(
            usage.quantized_tokens > p.len() / 2,
            "only {} of {} tokens were quantized",
            usage.quantized_tokens,
            usage.tokens
        );
        assert_eq!(
            &got,
            want,
            "8-bit LogQuant differs from the default cache at token {:?} ({}-token prompt)",
            got.iter().zip(want).position(|(a, b)| a != b),
            p.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bit_default_setting_writes_fluent_text() {
    let prompts = long_prompts(&[600]).await;
    let suppressed = suppressed();
    let lq = engine(KvCacheChoice::LogQuant(LogQuantConfig::default())).await;
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
    let distinct = generated
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    eprintln!("2-bit continuation: perplexity {ppl:.2} under the default cache, {distinct} distinct tokens of 64");
    assert!(ppl < 8.0, "2-bit continuation has perplexity {ppl:.2}");
    assert!(distinct >= 16, "2-bit continuation repeats itself: {distinct} distinct tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_bytes_at_4096_tokens_are_over_5x_below_the_16_bit_default() {
    let prompt = long_prompts(&[4095]).await.remove(0);
    let suppressed = suppressed();
    for (dtype, elem) in [(Dtype::F16, 2usize), (Dtype::F32, 4)] {
        let lq = engine_with(KvCacheChoice::LogQuant(LogQuantConfig::default()), |o| {
            o.dtype = dtype
        })
        .await;
        let finished = finished_sequences();
        generate_greedy(&lq, prompt.clone(), 2, &suppressed)
            .await
            .unwrap();
        let usage = usage_of_next_finished(finished).await.expect("usage");
        assert_eq!(usage.tokens, 4096);
        // Analytic: 3,600 bytes per quantized token (2-bit, G=64, 16-bit scale+min), and the
        // activation dtype for the full-precision and staged tokens (30 layers).
        let quantized_per_token = 3600;
        let expected = usage.quantized_tokens * quantized_per_token
            + usage.full_precision_tokens * smollm2_dense_bytes_per_token(elem);
        assert_eq!(usage.bytes, expected, "{usage:?}");
        assert_eq!(usage.dense_bytes, 4096 * smollm2_dense_bytes_per_token(elem));
        let sixteen_bit = 4096 * smollm2_dense_bytes_per_token(2);
        let ratio = sixteen_bit as f64 / usage.bytes as f64;
        eprintln!(
            "{dtype:?}: {} bytes for 4096 tokens ({} full precision, {} quantized): {:.2}x below \
             the 16-bit default cache, {:.2}x below the default cache in this dtype",
            usage.bytes,
            usage.full_precision_tokens,
            usage.quantized_tokens,
            ratio,
            usage.dense_bytes as f64 / usage.bytes as f64
        );
        if dtype == Dtype::F16 {
            assert!(ratio >= 5.0, "only {ratio:.2}x below the 16-bit default cache");
        }
    }
    // Keys per token (the reference's grouping) have the same byte cost.
    let per_token = LogQuantConfig {
        key_grouping: KeyGrouping::PerToken,
        ..Default::default()
    };
    let lq = engine_with(KvCacheChoice::LogQuant(per_token), |o| o.dtype = Dtype::F16).await;
    let finished = finished_sequences();
    generate_greedy(&lq, prompt, 2, &suppressed).await.unwrap();
    let usage = usage_of_next_finished(finished).await.expect("usage");
    // No staging: after the eager prefill of 4095 tokens 2W + (4095 - 2W) mod W stay, and
    // the decode step adds one.
    let after_prefill = 2 * 42 + (4095 - 2 * 42) % 42;
    assert_eq!(usage.full_precision_tokens, after_prefill + 1, "{usage:?}");
}
