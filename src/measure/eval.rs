//! Teacher-forced quality measurement through the decode path: perplexity, KL divergence of the
//! next-token distribution against the default cache, and top-1 agreement with it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::{build_engine, EngineOptions, KvCacheChoice};
use crate::generate::{
    finished_sequences, leading_special_tokens, score_teacher_forced_with_progress, tokenize,
    usage_of_next_finished, ScoredStep, StepCallback,
};

/// What to score: `score` tokens after a `prefill`-token exact prefix, starting `start`
/// tokens into the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalWindow {
    pub start: usize,
    pub prefill: usize,
    pub score: usize,
}

/// One configuration's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRow {
    pub config: String,
    pub perplexity: f64,
    /// Mean KL(default || this) per scored token, in nats.
    pub kl_vs_default: f64,
    /// Fraction of scored tokens whose argmax equals the default cache's.
    pub top1_agreement: f64,
    /// Negative log-likelihood of each scored token, in order.
    pub nll: Vec<f64>,
    /// KV-cache bytes at the end of the run, and what the default cache would hold.
    pub cache_bytes: usize,
    pub dense_cache_bytes: usize,
    /// Mean bits per cached value at 4096 tokens of a 16-bit model, all overhead included
    /// (`KvCacheChoice::bits_per_value`); absent in JSON written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_value_4k: Option<f64>,
    /// Fraction of the cached tokens held in full precision at the end of the run (LogQuant
    /// keeps at most 3W whatever the length, so short contexts flatter it); absent where the
    /// cache did not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_precision_fraction: Option<f64>,
}

/// exp(mean negative log-likelihood).
pub fn perplexity(logprobs: &[f64]) -> f64 {
    if logprobs.is_empty() {
        return f64::NAN;
    }
    (-logprobs.iter().sum::<f64>() / logprobs.len() as f64).exp()
}

/// KL(p || q) for log-probability vectors.
pub fn kl_divergence(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| {
            let p = (lp as f64).exp();
            if p == 0.0 {
                0.0
            } else {
                p * (lp as f64 - lq as f64)
            }
        })
        .sum()
}

/// Compare a run with the default cache's run of the same tokens.
pub fn compare(reference: &[ScoredStep], run: &[ScoredStep]) -> (f64, f64) {
    let mut kl = 0.0;
    let mut agree = 0usize;
    for (r, s) in reference.iter().zip(run) {
        if let (Some(p), Some(q)) = (&r.distribution, &s.distribution) {
            kl += kl_divergence(p, q);
        }
        agree += usize::from(r.argmax == s.argmax);
    }
    let n = reference.len().max(1) as f64;
    (kl / n, agree as f64 / n)
}

/// [`evaluate_window`]'s rows alone.
pub async fn evaluate(
    base: &EngineOptions,
    text_path: &Path,
    window: EvalWindow,
    configs: &[KvCacheChoice],
    progress: impl Fn(&str),
    scored: Option<StepCallback>,
) -> Result<Vec<EvalRow>> {
    Ok(
        evaluate_window(base, text_path, window, configs, progress, scored)
            .await?
            .rows,
    )
}

/// A perplexity evaluation: one row per configuration, and the token ids every configuration
/// saw (the tokenizer's leading special tokens, e.g. Gemma's BOS, then the window's prefill and
/// scored tokens), so that an independent forward pass can score the very same sequence.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub rows: Vec<EvalRow>,
    pub tokens: Vec<u32>,
}

/// Score `window` of `text_path` with each configuration; the default cache runs first and is
/// the reference for KL and agreement (it is added if missing). The prefill starts with the
/// tokens the tokenizer puts before any text (a BOS where the model has one), then the
/// window's tokens. `progress` gets a message as each phase starts; `scored`, if given, the
/// number of tokens scored so far over all configurations (out of `configs x window.score`,
/// the default included).
pub async fn evaluate_window(
    base: &EngineOptions,
    text_path: &Path,
    window: EvalWindow,
    configs: &[KvCacheChoice],
    progress: impl Fn(&str),
    scored: Option<StepCallback>,
) -> Result<Evaluation> {
    let text = std::fs::read_to_string(text_path)
        .with_context(|| format!("cannot read --text {}", text_path.display()))?;
    let mut configs = configs.to_vec();
    configs.retain(|c| *c != KvCacheChoice::Default);
    configs.insert(0, KvCacheChoice::Default);

    let mut reference: Option<Vec<ScoredStep>> = None;
    let mut tokens: Vec<u32> = Vec::new();
    let mut leading: Vec<u32> = Vec::new();
    let mut rows = Vec::new();
    for (index, config) in configs.into_iter().enumerate() {
        progress(&format!("loading model with {}", config.label()));
        let engine = build_engine(&base.with_cache(config.clone())).await?;
        if tokens.is_empty() {
            leading = leading_special_tokens(&engine).await?;
            tokens = tokenize(&engine, &text).await?;
            let needed = window.start + window.prefill + window.score;
            if tokens.len() < needed {
                bail!(
                    "--text has {} tokens, the window needs {needed} (start {} + prefill {} + score {})",
                    tokens.len(),
                    window.start,
                    window.prefill,
                    window.score
                );
            }
        }
        let mut prefix = leading.clone();
        prefix.extend_from_slice(&tokens[window.start..window.start + window.prefill]);
        let targets = tokens
            [window.start + window.prefill..window.start + window.prefill + window.score]
            .to_vec();
        progress(&format!(
            "scoring {} tokens with {}",
            window.score,
            config.label()
        ));
        let finished = finished_sequences();
        let on_step = scored.clone().map(|f| -> StepCallback {
            let done_before = index * window.score;
            Arc::new(move |n| f(done_before + n))
        });
        let steps =
            score_teacher_forced_with_progress(&engine, prefix, targets, true, on_step).await?;
        let usage = usage_of_next_finished(finished).await.unwrap_or_default();
        drop(engine);
        let logprobs: Vec<f64> = steps.iter().map(|s| s.logprob).collect();
        let (kl, agreement) = match &reference {
            None => (0.0, 1.0),
            Some(r) => compare(r, &steps),
        };
        rows.push(EvalRow {
            config: config.label(),
            perplexity: perplexity(&logprobs),
            kl_vs_default: kl,
            top1_agreement: agreement,
            nll: logprobs.iter().map(|l| -l).collect(),
            cache_bytes: usage.bytes,
            dense_cache_bytes: usage.dense_bytes,
            bits_per_value_4k: config.bits_per_value(4096),
            full_precision_fraction: full_precision_fraction(&usage),
        });
        if reference.is_none() {
            reference = Some(steps);
        }
    }
    let mut seen = leading;
    seen.extend_from_slice(&tokens[window.start..window.start + window.prefill + window.score]);
    Ok(Evaluation { rows, tokens: seen })
}

/// The fraction of a finished sequence's cached tokens that are not quantized
/// ([`crate::backend::full_precision_tokens`]).
pub fn full_precision_fraction(
    usage: &mistralrs_core::kv_cache_backend::LayerUsage,
) -> Option<f64> {
    (usage.tokens > 0)
        .then(|| crate::backend::full_precision_tokens(usage) as f64 / usage.tokens as f64)
}

/// `[from, to)` context ranges of the scored positions `prefill..prefill + score`, cut at
/// powers of two (e.g. 1024..2048, 2048..4096, 4096..8024).
pub fn context_segments(prefill: usize, score: usize) -> Vec<(usize, usize)> {
    let end = prefill + score;
    let mut out = Vec::new();
    let mut from = prefill;
    while from < end {
        let to = (from + 1).next_power_of_two().min(end);
        out.push((from, to));
        from = to;
    }
    out
}

/// Perplexity of the scored tokens in each context range; the token scored `i`-th sees
/// `prefill + i` cached tokens.
pub fn segment_perplexities(nll: &[f64], prefill: usize, segments: &[(usize, usize)]) -> Vec<f64> {
    segments
        .iter()
        .map(|&(from, to)| {
            let lo = from.saturating_sub(prefill).min(nll.len());
            let hi = to.saturating_sub(prefill).min(nll.len());
            let logprobs: Vec<f64> = nll[lo..hi].iter().map(|x| -x).collect();
            perplexity(&logprobs)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_of_a_uniform_distribution_is_its_size() {
        let lp = (1.0f64 / 50.0).ln();
        assert!((perplexity(&[lp; 10]) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn segments_cut_at_powers_of_two_and_cover_every_scored_token() {
        assert_eq!(
            context_segments(1024, 7000),
            vec![(1024, 2048), (2048, 4096), (4096, 8024)]
        );
        assert_eq!(context_segments(1000, 10), vec![(1000, 1010)]);
        // ln 2 in the first segment, ln 4 in the second: perplexities 2 and 4.
        let nll = [2f64.ln(), 2f64.ln(), 4f64.ln()];
        let ppl = segment_perplexities(&nll, 6, &context_segments(6, 3));
        assert!(
            (ppl[0] - 2.0).abs() < 1e-12 && (ppl[1] - 4.0).abs() < 1e-12,
            "{ppl:?}"
        );
    }

    #[test]
    fn kl_of_identical_runs_is_zero_and_positive_otherwise() {
        let p = crate::generate::log_softmax(&[1.0, 2.0, 3.0]);
        let q = crate::generate::log_softmax(&[3.0, 2.0, 1.0]);
        assert!(kl_divergence(&p, &p).abs() < 1e-12);
        let kl = kl_divergence(&p, &q);
        // By hand: p = softmax(1,2,3); KL = sum p (log p - log q) = 2 (p3 - p1) = 1.3219...
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).collect();
        let z: f64 = e.iter().sum();
        let expected = 2.0 * (e[2] - e[0]) / z;
        assert!((kl - expected).abs() < 1e-6, "{kl} vs {expected}");
        let step = |d: &Vec<f32>, a| ScoredStep {
            logprob: 0.0,
            argmax: a,
            distribution: Some(d.clone()),
        };
        let (kl0, agree) = compare(&[step(&p, 2), step(&p, 2)], &[step(&p, 2), step(&p, 2)]);
        assert_eq!((kl0, agree), (0.0, 1.0));
        let (_, half) = compare(&[step(&p, 2), step(&p, 2)], &[step(&p, 2), step(&q, 0)]);
        assert_eq!(half, 0.5);
    }
}
