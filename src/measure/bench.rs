//! Decode-speed and memory benchmark: each configuration against the default cache, in one
//! process, same prompts, end-of-sequence suppressed so every run decodes the asked length.
//!
//! Step times come from the engine itself: a logits processor stamps the time at every
//! sampling step, so a decode step's time is the gap between two stamps, and prefill is the
//! time from sending the requests to the first stamp.
//!
//! With a KV-memory budget, each configuration also runs at the largest batch whose caches fit
//! the budget ([`largest_fitting_batch`]), and reports the aggregate decode throughput there.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::Tensor;
use mistralrs_core::{CustomLogitsProcessor, MistralRs};
use serde::{Deserialize, Serialize};

use crate::engine::{build_engine, EngineOptions, KvCacheChoice};
use crate::generate::{finished_sequences, run_request, special_token_ids, usage_of_next_finished};
use crate::provenance::RunInfo;

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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRow {
    pub config: String,
    pub context: usize,
    pub batch: usize,
    /// Prompt tokens of the whole batch per second of prefill (one measurement).
    #[serde(default)]
    pub prefill_tokens_per_s: f64,
    /// Median seconds of one decode step of the whole batch.
    pub median_step_s: f64,
    /// `batch / median_step_s`.
    pub decode_tokens_per_s: f64,
    /// KV-cache bytes of one sequence at the end, and the default cache's for the same tokens.
    pub cache_bytes: usize,
    pub dense_cache_bytes: usize,
    /// Peak resident memory of the process during this cell (kB), from /proc; the peak is
    /// reset before each cell (Linux), so it includes the model but not earlier cells.
    pub peak_rss_kb: Option<u64>,
}

/// The largest batch the budget allows for one configuration, and its throughput there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetRow {
    pub config: String,
    pub context: usize,
    pub budget_bytes: usize,
    /// KV-cache bytes of one sequence at its longest (prompt plus decoded tokens).
    pub bytes_per_sequence: usize,
    /// 0 when not even one sequence fits.
    pub batch: usize,
    /// True when `--budget-max-batch` stopped the search before the budget did.
    pub capped: bool,
    /// Decode tokens per second of the whole batch (median step).
    pub aggregate_tokens_per_s: f64,
}

/// The largest `batch` in `1..=max_batch` with `cost(batch) <= budget`, for a cost that does
/// not decrease with the batch (`None` when batch 1 does not fit). Binary search, so a
/// measured cost can be expensive.
pub fn largest_fitting_batch(
    budget: usize,
    max_batch: usize,
    cost: impl Fn(usize) -> usize,
) -> Option<usize> {
    if max_batch == 0 || cost(1) > budget {
        return None;
    }
    // Invariant: cost(lo) fits; every batch above hi does not fit (or is above the cap).
    let (mut lo, mut hi) = (1, max_batch);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if cost(mid) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

/// Return freed heap to the OS and restart the peak-RSS counter (Linux; no-op elsewhere), so
/// the next [`peak_rss_kb`] is the peak of what follows.
pub fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
    unsafe {
        libc::malloc_trim(0);
    }
    // "5" resets VmHWM to the current RSS (proc(5), clear_refs).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
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

/// What one batch run measured.
struct RunTimes {
    /// From sending the requests to the first sampled token of the last sequence.
    prefill: Duration,
    /// Decode steps of the first sequence.
    steps: Vec<Duration>,
}

/// Run `batch` equal-length sequences of `context` prompt tokens and `decode` new tokens each.
async fn decode_run(
    engine: &MistralRs,
    prompts: &[Vec<u32>],
    decode: usize,
    suppressed: &[bool],
) -> Result<RunTimes> {
    let stampers: Vec<Arc<Stamper>> = prompts
        .iter()
        .map(|_| {
            Arc::new(Stamper {
                suppressed: suppressed.to_vec(),
                stamps: Mutex::new(Vec::new()),
            })
        })
        .collect();
    let started = Instant::now();
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
    let stamps: Vec<Vec<Instant>> = stampers
        .iter()
        .map(|s| s.stamps.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    if let Some(short) = stamps.iter().find(|s| s.len() != decode) {
        bail!("decoded {} of {decode} tokens", short.len());
    }
    // The first stamp ends a sequence's prefill; every later gap is one decode step.
    let prefill_end = stamps.iter().filter_map(|s| s.first()).max();
    Ok(RunTimes {
        prefill: prefill_end.map_or(Duration::ZERO, |t| *t - started),
        steps: stamps[0].windows(2).map(|w| w[1] - w[0]).collect(),
    })
}

/// Token-id prompts of identical length, different content per sequence (the scheduler
/// batches only equal lengths). Ids avoid the special range.
fn prompts(batch: usize, context: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|b| {
            (0..context)
                .map(|i| 1000 + ((i * 7919 + b * 104729) % 40000) as u32)
                .collect()
        })
        .collect()
}

/// One cell: run, then read the engine's usage counter for the first finished sequence.
async fn measure(
    engine: &MistralRs,
    label: &str,
    context: usize,
    batch: usize,
    decode: usize,
    suppressed: &[bool],
) -> Result<BenchRow> {
    reset_peak_rss();
    let finished = finished_sequences();
    let times = decode_run(engine, &prompts(batch, context), decode, suppressed).await?;
    let usage = usage_of_next_finished(finished).await.unwrap_or_default();
    let mut secs: Vec<f64> = times.steps.iter().map(|d| d.as_secs_f64()).collect();
    let step = median(&mut secs);
    Ok(BenchRow {
        config: label.to_string(),
        context,
        batch,
        prefill_tokens_per_s: (batch * context) as f64 / times.prefill.as_secs_f64(),
        median_step_s: step,
        decode_tokens_per_s: batch as f64 / step,
        cache_bytes: usage.bytes,
        dense_cache_bytes: usage.dense_bytes,
        peak_rss_kb: peak_rss_kb(),
    })
}

/// The KV-memory budget part of a run: `bytes` of KV cache, sequences of `context` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub bytes: usize,
    pub context: usize,
    pub max_batch: usize,
}

/// Everything one `bench` run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BenchReport {
    pub rows: Vec<BenchRow>,
    pub budget: Vec<BudgetRow>,
    /// What the run ran on (absent in JSON written before it was recorded).
    #[serde(default)]
    pub run: Option<RunInfo>,
}

/// Measure every (configuration, context, batch) cell, then the budget runs if asked.
pub async fn bench(
    base: &EngineOptions,
    configs: &[KvCacheChoice],
    contexts: &[usize],
    batches: &[usize],
    decode: usize,
    budget: Option<Budget>,
    progress: impl Fn(&str),
) -> Result<BenchReport> {
    if decode < 3 {
        bail!("--decode must be at least 3 (the median needs decode steps)");
    }
    let special = special_token_ids(&base.model)?;
    let mut report = BenchReport {
        run: Some(RunInfo::collect(base)),
        ..BenchReport::default()
    };
    for config in configs {
        let label = config.label();
        progress(&format!("loading model with {label}"));
        let mut options = base.with_cache(config.clone());
        options.max_seqs = batches
            .iter()
            .copied()
            .chain(budget.map(|b| b.max_batch))
            .max()
            .unwrap_or(1);
        let engine = build_engine(&options).await?;
        let vocab = special.iter().copied().max().unwrap_or(0) as usize + 1;
        let mut suppressed = vec![false; vocab.max(1)];
        for &s in &special {
            suppressed[s as usize] = true;
        }
        for &context in contexts {
            for &batch in batches {
                progress(&format!("{label}: context {context}, batch {batch}"));
                let row = measure(&engine, &label, context, batch, decode, &suppressed).await?;
                report.rows.push(row);
            }
        }
        if let Some(budget) = budget {
            progress(&format!("{label}: budget of {} bytes", budget.bytes));
            // One sequence's bytes at its longest, from a batch-1 cell of the same length.
            let single = match report
                .rows
                .iter()
                .find(|r| r.config == label && r.context == budget.context && r.batch == 1)
            {
                Some(r) => r.clone(),
                None => measure(&engine, &label, budget.context, 1, decode, &suppressed).await?,
            };
            let per_seq = single.cache_bytes;
            let fit = largest_fitting_batch(budget.bytes, budget.max_batch, |b| b * per_seq);
            let batch = fit.unwrap_or(0);
            let aggregate = if batch == 0 {
                0.0
            } else {
                progress(&format!("{label}: budget batch {batch}"));
                measure(&engine, &label, budget.context, batch, decode, &suppressed)
                    .await?
                    .decode_tokens_per_s
            };
            report.budget.push(BudgetRow {
                config: label.clone(),
                context: budget.context,
                budget_bytes: budget.bytes,
                bytes_per_sequence: per_seq,
                batch,
                capped: batch == budget.max_batch && (batch + 1) * per_seq <= budget.bytes,
                aggregate_tokens_per_s: aggregate,
            });
        }
    }
    Ok(report)
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
    fn budget_search_returns_the_largest_fitting_batch() {
        // Linear cost: 48 per sequence, budget 200 -> 4 (5 * 48 = 240 > 200).
        assert_eq!(largest_fitting_batch(200, 64, |b| b * 48), Some(4));
        // Exactly at the budget fits.
        assert_eq!(largest_fitting_batch(192, 64, |b| b * 48), Some(4));
        // Fixed overhead plus a per-sequence cost, checked against a linear scan.
        for budget in [0usize, 99, 100, 101, 150, 1000, 5000] {
            let cost = |b: usize| 100 + 7 * b * b;
            let scan = (1..=30).rev().find(|&b| cost(b) <= budget);
            assert_eq!(
                largest_fitting_batch(budget, 30, cost),
                scan,
                "budget {budget}"
            );
        }
        // The cap stops the search; nothing fits; a zero cap.
        assert_eq!(largest_fitting_batch(1 << 40, 16, |b| b), Some(16));
        assert_eq!(largest_fitting_batch(10, 16, |b| 11 * b), None);
        assert_eq!(largest_fitting_batch(10, 0, |b| b), None);
    }
}
