//! The fused CPU kernel inside the real engine equals the default cache when nothing is
//! quantized, to f32 rounding.
//!
//! With the GGUF's Q4_1 weights, candle quantizes every matmul's activations to 8 bits first, so
//! a 1e-6 change in an attention output can flip an activation code and move a log-probability
//! by up to ~0.4 a few layers later (measured: scaling the engine's own attention output by
//! 1 + 1e-6 did exactly that). This test therefore runs the weights as f32
//! (`CANDLE_DEQUANTIZE_ALL`, read by candle when it loads them), in its own process.

mod common;

use mistralrs_logquant::config::{AttentionKernel, LogQuantConfig};
use mistralrs_logquant::engine::KvCacheChoice;
use mistralrs_logquant::generate::score_teacher_forced;

#[tokio::test(flavor = "multi_thread")]
async fn fused_decode_equals_the_default_cache_while_everything_is_full_precision() {
    // Set before any engine (and so any weight) exists; this binary has no other test.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let text = &common::passages()[2];
    let fused = LogQuantConfig {
        kernel: AttentionKernel::Fused,
        ..LogQuantConfig::default()
    };
    let mut runs = Vec::new();
    for cache in [KvCacheChoice::Default, KvCacheChoice::LogQuant(fused)] {
        let engine = common::engine(cache).await;
        let tokens = common::tokens(&engine, text).await;
        // 40 + 24 tokens: below 3W = 126, so LogQuant keeps every token in full precision and
        // only the attention kernel differs.
        let steps = score_teacher_forced(
            &engine,
            tokens[..40].to_vec(),
            tokens[40..64].to_vec(),
            true,
        )
        .await
        .expect("scoring");
        runs.push(steps);
    }
    let mut worst = 0f32;
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        let (p, q) = (
            a.distribution.as_ref().unwrap(),
            b.distribution.as_ref().unwrap(),
        );
        for (x, y) in p.iter().zip(q) {
            worst = worst.max((x - y).abs());
        }
        assert_eq!(a.argmax, b.argmax);
    }
    // Measured: about 2e-5. A wrong score, scale or head mapping moves
    // log-probabilities by whole units.
    assert!(worst < 1e-3, "largest log-probability difference {worst}");
}
