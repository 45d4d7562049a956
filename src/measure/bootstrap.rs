//! Bootstrap 95% confidence intervals for the eval's scores: the percentile interval of
//! Efron & Tibshirani (*An Introduction to the Bootstrap*, 1993, ch. 13) over resamples drawn
//! with replacement. Scores of neighbouring tokens are correlated, so token series are
//! resampled in blocks of consecutive positions (Künsch's moving-block bootstrap, *Ann. Stat.*
//! 17(3), 1989); passages of the copy task are independent and resampled one by one. A
//! comparison with the default cache is paired: each resample takes the same positions (or
//! passages) from both series, so what the two share (a hard passage) cancels.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Resamples per interval.
pub const RESAMPLES: usize = 2000;

/// Tokens per block when resampling a series of per-token scores.
pub const TOKEN_BLOCK: usize = 32;

/// A two-sided 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = f.precision().unwrap_or(3);
        write!(f, "[{:.digits$}, {:.digits$}]", self.low, self.high)
    }
}

/// The 2.5th and 97.5th percentiles of `statistic` over [`RESAMPLES`] resamples of `n` items
/// in blocks of `block` consecutive items (1: items one by one). `statistic` gets the resampled
/// item indices (`n` of them, repeats allowed). Seeded: the same call gives the same interval.
/// `None` for no items.
pub fn percentile_interval(
    n: usize,
    block: usize,
    statistic: impl Fn(&[usize]) -> f64,
) -> Option<Interval> {
    if n == 0 {
        return None;
    }
    let block = block.clamp(1, n);
    let starts = n - block + 1;
    let mut rng = ChaCha8Rng::seed_from_u64(0x6c6f_6771_7561_6e74);
    let mut indices = Vec::with_capacity(n + block);
    let mut stats: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            indices.clear();
            while indices.len() < n {
                let start = rng.random_range(0..starts);
                indices.extend(start..start + block);
            }
            indices.truncate(n);
            statistic(&indices)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let at = |q: f64| stats[((q * (RESAMPLES - 1) as f64).round() as usize).min(RESAMPLES - 1)];
    Some(Interval {
        low: at(0.025),
        high: at(0.975),
    })
}

fn mean_at(values: &[f64], indices: &[usize]) -> f64 {
    indices.iter().map(|&i| values[i]).sum::<f64>() / indices.len() as f64
}

/// Interval of the perplexity `exp(mean nll)` of per-token negative log-likelihoods.
pub fn perplexity_interval(nll: &[f64]) -> Option<Interval> {
    percentile_interval(nll.len(), TOKEN_BLOCK, |ix| mean_at(nll, ix).exp())
}

/// Interval of the perplexity ratio `exp(mean nll - mean reference)` over the same scored
/// tokens (paired by position).
pub fn perplexity_ratio_interval(nll: &[f64], reference: &[f64]) -> Option<Interval> {
    let n = nll.len().min(reference.len());
    percentile_interval(n, TOKEN_BLOCK, |ix| {
        (mean_at(nll, ix) - mean_at(reference, ix)).exp()
    })
}

/// Interval of a mean score over independent cases (e.g. copy-task passages).
pub fn mean_interval(scores: &[f64]) -> Option<Interval> {
    percentile_interval(scores.len(), 1, |ix| mean_at(scores, ix))
}

/// Interval of `mean(scores) / mean(reference)` over the same cases (paired); resamples whose
/// reference mean is 0 are left out, `None` if all are.
pub fn mean_ratio_interval(scores: &[f64], reference: &[f64]) -> Option<Interval> {
    let n = scores.len().min(reference.len());
    let interval = percentile_interval(n, 1, |ix| {
        let d = mean_at(reference, ix);
        if d > 0.0 {
            mean_at(scores, ix) / d
        } else {
            f64::NAN
        }
    })?;
    (interval.low.is_finite() && interval.high.is_finite()).then_some(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_of_a_constant_is_that_constant() {
        let i = mean_interval(&[0.5; 16]).unwrap();
        assert_eq!((i.low, i.high), (0.5, 0.5));
        assert!(mean_interval(&[]).is_none());
    }

    /// 400 independent fair coin flips: the textbook 95% interval of the mean is
    /// 0.5 +- 1.96 * sqrt(0.25 / 400) = [0.451, 0.549]; the bootstrap's must be close.
    #[test]
    fn a_mean_interval_matches_the_normal_approximation() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let flips: Vec<f64> = (0..400).map(|_| rng.random_range(0..2) as f64).collect();
        let mean = flips.iter().sum::<f64>() / 400.0;
        let half = 1.96 * (mean * (1.0 - mean) / 400.0).sqrt();
        let i = mean_interval(&flips).unwrap();
        assert!(
            (i.low - (mean - half)).abs() < 0.01,
            "{i} against {mean} +- {half}"
        );
        assert!(
            (i.high - (mean + half)).abs() < 0.01,
            "{i} against {mean} +- {half}"
        );
    }

    /// Paired: a series that is its reference plus a constant has a point interval, however
    /// much the reference itself varies.
    #[test]
    fn paired_ratios_cancel_what_the_series_share() {
        let reference: Vec<f64> = (0..256).map(|i| ((i * 37) % 11) as f64).collect();
        let shifted: Vec<f64> = reference.iter().map(|x| x + 0.1).collect();
        let i = perplexity_ratio_interval(&shifted, &reference).unwrap();
        assert!((i.low - 0.1f64.exp()).abs() < 1e-9 && (i.high - 0.1f64.exp()).abs() < 1e-9);
        let spread = perplexity_interval(&reference).unwrap();
        assert!(
            spread.high / spread.low > 1.05,
            "unpaired, the spread shows: {spread}"
        );
        let scaled: Vec<f64> = reference.iter().map(|x| x * 2.0).collect();
        let r = mean_ratio_interval(&scaled, &reference).unwrap();
        assert!(
            (r.low - 2.0).abs() < 1e-9 && (r.high - 2.0).abs() < 1e-9,
            "{r}"
        );
        assert!(mean_ratio_interval(&[1.0, 1.0], &[0.0, 0.0]).is_none());
    }
}
