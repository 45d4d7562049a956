//! Attention of one span: scores from the packed codes (or dense rows), exact softmax state,
//! weighted values; compiled once per SIMD tier.

use crate::packed::BlockBytes;
use crate::quant::Grouping;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::generic::*;
use super::spans::*;
use super::tier::SimdTier;

/// Unpack rows `start..end` of `head` of `block` into `out` (`[token][dim]`, codes as f32).
#[inline(always)]
pub(super) fn unpack_span<const FMA: bool>(
    block: &BlockBytes<'_>,
    head: usize,
    (start, end): (usize, usize),
    out: &mut Vec<f32>,
) {
    let table = &*UNPACK;
    let dim = block.dim;
    out.resize((end - start) * dim, 0.0);
    let row_bytes = block.row_bytes();
    let packed =
        &block.codes[(head * block.tokens + start) * row_bytes..][..(end - start) * row_bytes];
    for (o, p) in out
        .chunks_exact_mut(dim)
        .zip(packed.chunks_exact(row_bytes))
    {
        unpack_row::<FMA>(table, p, block.bits, o);
    }
}

/// `out[t] = q . rows[t]` for the `[token][dim]` rows.
#[inline(always)]
pub(super) fn row_dots<const FMA: bool>(q: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if FMA && dim.is_multiple_of(8) {
        // SAFETY: as in `dot`.
        done = unsafe { avx2::row_dots8(q, rows, dim, out) };
    }
    for (o, row) in out[done..]
        .iter_mut()
        .zip(rows[done * dim..].chunks_exact(dim))
    {
        *o = dot::<FMA>(q, row);
    }
}

/// `out += sum_t weights[t] * rows[t][col..col + out.len()]` over `[token][dim]` rows.
#[inline(always)]
pub(super) fn weighted_rows<const FMA: bool>(
    weights: &[f32],
    rows: &[f32],
    dim: usize,
    col: usize,
    out: &mut [f32],
) {
    let width = out.len();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `dot`.
        done = unsafe { avx2::weighted_rows64(weights, rows, dim, col, out) };
    }
    if done < width {
        for (w, row) in weights.iter().zip(rows.chunks_exact(dim)) {
            axpy::<FMA>(*w, &row[col + done..col + width], &mut out[done..]);
        }
    }
}

/// Scores of quantized keys `start..end` of `block`, written to `scores[g * n + (t - start)]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn block_scores<const FMA: bool>(
    block: &BlockBytes<'_>,
    head: usize,
    (start, end): (usize, usize),
    queries: &[f32],
    query_rows: usize,
    scale: f32,
    scores: &mut [f32],
    codes: &mut Vec<f32>,
) {
    let dim = block.dim;
    let n = end - start;
    unpack_span::<FMA>(block, head, (start, end), codes);
    match block.grouping {
        Grouping::PerToken { group } => {
            let n_groups = dim / group;
            // sum(q_g) per query head and channel group.
            let qsums: Vec<f32> = queries
                .chunks_exact(group)
                .map(|c| c.iter().sum::<f32>())
                .collect();
            for (i, row) in codes.chunks_exact(dim).enumerate() {
                let t = start + i;
                let raw = &block.params[(head * block.tokens + t) * n_groups..][..n_groups];
                for g in 0..query_rows {
                    let q = &queries[g * dim..(g + 1) * dim];
                    let mut s = 0f32;
                    for (j, r) in raw.iter().enumerate() {
                        let c = j * group..(j + 1) * group;
                        s += r.scale.to_f32_const() * dot::<FMA>(&q[c.clone()], &row[c])
                            + r.min.to_f32_const() * qsums[g * n_groups + j];
                    }
                    scores[g * n + i] = s * scale;
                }
            }
        }
        Grouping::PerChannel => {
            let params = &block.params[head * dim..(head + 1) * dim];
            // q . k_hat = (q * s) . codes + q . m, with (q * s) and q . m once per span.
            let mut qs = vec![0f32; dim];
            for g in 0..query_rows {
                let q = &queries[g * dim..(g + 1) * dim];
                let mut qm = 0f32;
                for ((qs, &q), p) in qs.iter_mut().zip(q).zip(params) {
                    *qs = q * p.scale.to_f32_const();
                    qm += q * p.min.to_f32_const();
                }
                let out = &mut scores[g * n..(g + 1) * n];
                row_dots::<FMA>(&qs, codes, dim, out);
                for o in out.iter_mut() {
                    *o = (*o + qm) * scale;
                }
            }
        }
    }
}

/// `out[g] += sum_t p[g * n + (t - start)] * v_hat_t` over quantized values `start..end`:
/// per channel group `j`, `sum_t (p_t s_tj) codes_t + sum_t p_t m_tj`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn block_values<const FMA: bool>(
    block: &BlockBytes<'_>,
    head: usize,
    (start, end): (usize, usize),
    probs: &[f32],
    query_rows: usize,
    out: &mut [f32],
    codes: &mut Vec<f32>,
) {
    let dim = block.dim;
    let n = end - start;
    let Grouping::PerToken { group } = block.grouping else {
        unreachable!("values are grouped per token");
    };
    let n_groups = dim / group;
    unpack_span::<FMA>(block, head, (start, end), codes);
    let raw = &block.params[(head * block.tokens + start) * n_groups..][..n * n_groups];
    let mut weights = vec![0f32; n];
    let mut scales = vec![0f32; n];
    let mut mins = vec![0f32; n];
    for j in 0..n_groups {
        for ((s, m), r) in scales
            .iter_mut()
            .zip(mins.iter_mut())
            .zip(raw.iter().skip(j).step_by(n_groups))
        {
            *s = r.scale.to_f32_const();
            *m = r.min.to_f32_const();
        }
        for g in 0..query_rows {
            let p = &probs[g * n..(g + 1) * n];
            for ((w, &p), &s) in weights.iter_mut().zip(p).zip(&scales) {
                *w = p * s;
            }
            let bias = dot::<FMA>(p, &mins);
            let o = &mut out[g * dim + j * group..g * dim + (j + 1) * group];
            weighted_rows::<FMA>(&weights, codes, dim, j * group, o);
            for o in o.iter_mut() {
                *o += bias;
            }
        }
    }
}

/// Attention of one span: scores, the span's softmax state, weighted values.
#[inline(always)]
pub(super) fn attend_span<const FMA: bool>(task: &SpanTask<'_>) -> Partial {
    let SpanTask {
        chunks,
        dense,
        head,
        queries,
        rotated_queries,
        query_rows,
        dim,
        scale,
        span,
    } = *task;
    let n = span.end - span.start;
    let range = (span.start, span.end);
    let mut scores = vec![0f32; query_rows * n];
    // The unpacked codes of a span (up to span_tokens x dim floats) are reused across the
    // spans a thread runs, instead of a fresh zeroed allocation each time.
    thread_local! {
        static CODES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut codes = CODES.with(|c| std::mem::take(&mut *c.borrow_mut()));
    match span.source {
        Source::Quant { chunk } => block_scores::<FMA>(
            &chunks[chunk].k,
            head,
            range,
            if chunks[chunk].k.rotated {
                rotated_queries
            } else {
                queries
            },
            query_rows,
            scale,
            &mut scores,
            &mut codes,
        ),
        Source::Dense { part } => {
            let d = &dense[part];
            let k = &d.k[(head * d.tokens + span.start) * dim..(head * d.tokens + span.end) * dim];
            for g in 0..query_rows {
                let out = &mut scores[g * n..(g + 1) * n];
                row_dots::<FMA>(&queries[g * dim..(g + 1) * dim], k, dim, out);
                for o in out.iter_mut() {
                    *o *= scale;
                }
            }
        }
    }
    // Rows of this span that query row `g` may not see (a chunk's later rows): `visible..`.
    let visible = |g: usize| match span.source {
        Source::Dense { part } => match dense[part].causal {
            Some(len) => (g % len + 1).saturating_sub(span.start).min(n),
            None => n,
        },
        Source::Quant { .. } => n,
    };
    let mut max = vec![f32::NEG_INFINITY; query_rows];
    let mut sum = vec![0f32; query_rows];
    for g in 0..query_rows {
        let s = &mut scores[g * n..(g + 1) * n];
        let seen = visible(g);
        s[seen..].fill(0.0);
        if seen > 0 {
            max[g] = max8(&s[..seen]);
            sum[g] = exp_shifted::<FMA>(&mut s[..seen], max[g]);
        }
    }
    let mut out = vec![0f32; query_rows * dim];
    match span.source {
        Source::Quant { chunk } => {
            let block = &chunks[chunk].v;
            block_values::<FMA>(
                block, head, range, &scores, query_rows, &mut out, &mut codes,
            );
            if block.rotated {
                crate::quant::hadamard_rows(&mut out, dim);
            }
        }
        Source::Dense { part } => {
            let d = &dense[part];
            let v = &d.v[(head * d.tokens + span.start) * dim..(head * d.tokens + span.end) * dim];
            for g in 0..query_rows {
                weighted_rows::<FMA>(
                    &scores[g * n..(g + 1) * n],
                    v,
                    dim,
                    0,
                    &mut out[g * dim..(g + 1) * dim],
                );
            }
        }
    }
    CODES.with(|c| *c.borrow_mut() = codes);
    Partial { max, sum, out }
}

pub(super) fn attend_span_baseline(task: &SpanTask<'_>) -> Partial {
    attend_span::<false>(task)
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend_span_avx2_fma(task: &SpanTask<'_>) -> Partial {
    attend_span::<true>(task)
}

pub(super) fn run_span(task: &SpanTask<'_>, tier: SimdTier) -> Partial {
    match tier {
        #[cfg(target_arch = "x86_64")]
        SimdTier::Avx2Fma if SimdTier::detected() == SimdTier::Avx2Fma => {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            unsafe { attend_span_avx2_fma(task) }
        }
        _ => attend_span_baseline(task),
    }
}
