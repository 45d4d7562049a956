//! Decode-speed and memory benchmark: each configuration against the default cache, in one
//! process, same prompts, end-of-sequence suppressed so every run decodes the asked length.
//!
//! Step times come from the engine itself: a logits processor stamps the time at every
//! sampling step, so a decode step's time is the gap between two stamps (prefill excluded).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::Tensor;
use mistralrs_core::{CustomLogitsProcessor, MistralRs};
use serde::Serialize;

use crate::engine::{build_engine, EngineOptions, KvCacheChoice};
use crate::generate::{finished_sequences, run_request, special_token_ids, usage_of_next_finished};
use crate::model_source::ModelSource;

/// Greedy over non-special tokens, stamping the time of every step.
struct Stamper {
    suppressed: Vec<bool>,
    stamps: Mutex<Vec<Instant>>,
}

impl CustomLogitsProcessor for Stamper {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> candle_core::Result<Tensor> {
        self.stamps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        let mut values = crate::generate::host_logits(logits)?;
        for (v, s) in values.iter_mut().zip(&self.suppressed) {
            if *s {
                *v = f32::NEG_INFINITY;
            }
        }
        Tensor::from_vec(values, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

/// One measured cell.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub config: String,
    pub context: usize,
    pub batch: usize,
    /// Median seconds of one decode step of the whole batch.
    pub median_step_s: f64,
    /// `batch / median_step_s`.
    pub decode_tokens_per_s: f64,
    /// KV-cache bytes of one sequence at the end, and the default cache's for the same tokens.
    pub cache_bytes: usize,
    pub dense_cache_bytes: usize,
    /// Peak resident memory of the process so far (kB), from /proc.
    pub peak_rss_kb: Option<u64>,
}

/// Peak resident set size of this process, in kB (Linux).
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The median of `xs` (NaN when empty).
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Run `batch` equal-length sequences of `context` prompt tokens and `decode` new tokens each;
/// returns the per-step durations of the first sequence.
async fn decode_run(
    engine: &MistralRs,
    prompts: &[Vec<u32>],
    decode: usize,
    suppressed: &[bool],
) -> Result<Vec<Duration>> {
    let stampers: Vec<Arc<Stamper>> = prompts
        .iter()
        .map(|_| {
            Arc::new(Stamper {
                suppressed: suppressed.to_vec(),
                stamps: Mutex::new(Vec::new()),
            })
        })
        .collect();
    let runs = prompts.iter().zip(&stampers).map(|(p, s)| {
        run_request(
            engine,
            p.clone(),
            decode,
            s.clone() as Arc<dyn CustomLogitsProcessor>,
        )
    });
    for r in futures::future::join_all(runs).await {
        r?;
    }
    let stamps = stampers[0]
        .stamps
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if stamps.len() != decode {
        bail!("decoded {} of {decode} tokens", stamps.len());
    }
    // The first stamp ends the prefill; every later gap is one decode step.
    Ok(stamps.windows(2).map(|w| w[1] - w[0]).collect())
}

/// Measure every (configuration, context, batch) cell.
pub async fn bench(
    model: &ModelSource,
    configs: &[KvCacheChoice],
    contexts: &[usize],
    batches: &[usize],
    decode: usize,
    progress: impl Fn(&str),
) -> Result<Vec<BenchRow>> {
    if decode < 3 {
        bail!("--decode must be at least 3 (the median needs decode steps)");
    }
    let special = special_token_ids(model)?;
    let mut rows = Vec::new();
    for config in configs {
        progress(&format!("loading model with {}", config.label()));
        let mut options = EngineOptions::new(model.clone(), config.clone());
        options.max_seqs = batches.iter().copied().max().unwrap_or(1);
        let engine = build_engine(&options).await?;
        let vocab = special.iter().copied().max().unwrap_or(0) as usize + 1;
        let mut suppressed = vec![false; vocab.max(1)];
        for &s in &special {
            suppressed[s as usize] = true;
        }
        for &context in contexts {
            for &batch in batches {
                progress(&format!(
                    "{}: context {context}, batch {batch}",
                    config.label()
                ));
                // Token-id prompts of identical length, different content per sequence (the
                // scheduler batches only equal lengths). Ids avoid the special range.
                let prompts: Vec<Vec<u32>> = (0..batch)
                    .map(|b| {
                        (0..context)
                            .map(|i| 1000 + ((i * 7919 + b * 104729) % 40000) as u32)
                            .collect()
                    })
                    .collect();
                let finished = finished_sequences();
                let steps = decode_run(&engine, &prompts, decode, &suppressed).await?;
                let usage = usage_of_next_finished(finished).await.unwrap_or_default();
                let mut secs: Vec<f64> = steps.iter().map(|d| d.as_secs_f64()).collect();
                let step = median(&mut secs);
                rows.push(BenchRow {
                    config: config.label(),
                    context,
                    batch,
                    median_step_s: step,
                    decode_tokens_per_s: batch as f64 / step,
                    cache_bytes: usage.bytes,
                    dense_cache_bytes: usage.dense_bytes,
                    peak_rss_kb: peak_rss_kb(),
                });
            }
        }
    }
    Ok(rows)
}

/// A Markdown table with ratios against the default cache's row of the same cell.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| config | context | batch | decode tok/s (median) | vs default | KV bytes / seq | KV vs default |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.config == "default" && b.context == r.context && b.batch == r.batch);
        let speed = base.map_or("-".to_string(), |b| {
            format!("{:.2}x", r.decode_tokens_per_s / b.decode_tokens_per_s)
        });
        let mem = base.map_or("-".to_string(), |b| {
            format!(
                "{:.2}x smaller",
                b.cache_bytes as f64 / r.cache_bytes.max(1) as f64
            )
        });
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {} | {} | {} |\n",
            r.config, r.context, r.batch, r.decode_tokens_per_s, speed, r.cache_bytes, mem
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_lengths() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn ratios_are_against_the_default_row_of_the_same_cell() {
        let row = |config: &str, tps: f64, bytes| BenchRow {
            config: config.into(),
            context: 1024,
            batch: 1,
            median_step_s: 1.0 / tps,
            decode_tokens_per_s: tps,
            cache_bytes: bytes,
            dense_cache_bytes: 0,
            peak_rss_kb: None,
        };
        let t = table(&[row("default", 10.0, 1000), row("lq", 15.0, 100)]);
        assert!(
            t.contains("| lq | 1024 | 1 | 15.00 | 1.50x | 100 | 10.00x smaller |"),
            "{t}"
        );
    }
}
