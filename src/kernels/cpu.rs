//! Fused decode attention on the CPU over the packed cache: scores and values are computed from
//! the 2/4/8-bit codes, scales and minimums directly; no dequantized copy of the cache is built.
//!
//! With per-token groups (scale `s`, minimum `m` over channels `g` of one token):
//!
//! ```text
//! q . k_hat = sum_g [ s_g * (q_g . codes_g) + m_g * sum(q_g) ]
//! ```
//!
//! With per-channel keys (one `s_c`, `m_c` per channel over a block of tokens):
//!
//! ```text
//! q . k_hat = (q * s) . codes + q . m        ((q * s) and q . m computed once per block)
//! ```
//!
//! Values are per-token groups: `sum_t p_t v_hat_t[c] = sum_t (p_t s_tg) codes_t[c] + sum_t p_t m_tg`.
//! Softmax is exact (all scores kept, max subtracted) in f32, whatever the activation dtype.
//! The reference is [`crate::reference::naive_attention`] over the dequantized layout.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::quant::{Grouping, QuantBlock};
use crate::store::SeqLayerStore;

/// Byte -> the codes it holds, as f32, for each bit width: one table lookup unpacks a byte.
struct Unpack {
    two: [[f32; 4]; 256],
    four: [[f32; 2]; 256],
}

static UNPACK: std::sync::LazyLock<Unpack> = std::sync::LazyLock::new(|| {
    let mut two = [[0f32; 4]; 256];
    let mut four = [[0f32; 2]; 256];
    for b in 0..256usize {
        for (j, v) in two[b].iter_mut().enumerate() {
            *v = ((b >> (2 * j)) & 3) as f32;
        }
        for (j, v) in four[b].iter_mut().enumerate() {
            *v = ((b >> (4 * j)) & 15) as f32;
        }
    }
    Unpack { two, four }
});

/// Unpack one packed row into `out` (codes as f32).
#[inline]
fn unpack_row(packed: &[u8], bits: u8, out: &mut [f32]) {
    let table = &*UNPACK;
    match bits {
        2 => {
            for (o, &b) in out.chunks_exact_mut(4).zip(packed) {
                o.copy_from_slice(&table.two[b as usize]);
            }
        }
        4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(packed) {
                o.copy_from_slice(&table.four[b as usize]);
            }
        }
        _ => {
            for (o, &b) in out.iter_mut().zip(packed) {
                *o = b as f32;
            }
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorize without reassociation.
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a_rest.iter().zip(b_rest) {
        sum += x * y;
    }
    sum
}

#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Host f32 view of a `(heads, n, dim)` tensor, flattened.
fn host_rows(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Staged and full-precision rows of one sequence as host f32: `(k, v, tokens)` per part.
type DenseRows = Vec<(Vec<f32>, Vec<f32>, usize)>;

/// Scores of `queries` (`groups` query heads of one kv head, `[group][dim]`) against the rows of
/// one quantized key block, written to `scores[group][offset..offset + tokens]`.
// The scratch row and output slice are the caller's, so the per-token loop allocates nothing.
#[allow(clippy::too_many_arguments)]
fn block_scores(
    block: &QuantBlock,
    head: usize,
    queries: &[f32],
    groups: usize,
    scale: f32,
    scores: &mut [Vec<f32>],
    offset: usize,
    codes: &mut [f32],
) {
    let dim = block.dim;
    match block.grouping {
        Grouping::PerToken { group } => {
            let n_groups = dim / group;
            // sum(q_g) per query head and group.
            let qsums: Vec<f32> = (0..groups)
                .flat_map(|g| {
                    let q = &queries[g * dim..(g + 1) * dim];
                    q.chunks(group)
                        .map(|c| c.iter().sum::<f32>())
                        .collect::<Vec<_>>()
                })
                .collect();
            for t in 0..block.tokens {
                unpack_row(block.row(head, t), block.bits, codes);
                let params = &block.params[(head * block.tokens + t) * n_groups..][..n_groups];
                for g in 0..groups {
                    let q = &queries[g * dim..(g + 1) * dim];
                    let mut s = 0f32;
                    for (j, p) in params.iter().enumerate() {
                        let r = j * group..(j + 1) * group;
                        s += p.scale.to_f32() * dot(&q[r.clone()], &codes[r])
                            + p.min.to_f32() * qsums[g * n_groups + j];
                    }
                    scores[g][offset + t] = s * scale;
                }
            }
        }
        Grouping::PerChannel => {
            let params = &block.params[head * dim..(head + 1) * dim];
            // (q * s) and q . m once per block and query head.
            let mut qs = vec![0f32; groups * dim];
            let mut qm = vec![0f32; groups];
            for g in 0..groups {
                let q = &queries[g * dim..(g + 1) * dim];
                for (c, p) in params.iter().enumerate() {
                    qs[g * dim + c] = q[c] * p.scale.to_f32();
                    qm[g] += q[c] * p.min.to_f32();
                }
            }
            for t in 0..block.tokens {
                unpack_row(block.row(head, t), block.bits, codes);
                for g in 0..groups {
                    scores[g][offset + t] =
                        (dot(&qs[g * dim..(g + 1) * dim], codes) + qm[g]) * scale;
                }
            }
        }
    }
}

/// `out[group][dim] += sum_t p[group][offset + t] * v_hat_t` for one quantized value block.
fn block_values(
    block: &QuantBlock,
    head: usize,
    probs: &[Vec<f32>],
    offset: usize,
    out: &mut [f32],
    codes: &mut [f32],
) {
    let dim = block.dim;
    let Grouping::PerToken { group } = block.grouping else {
        unreachable!("values are grouped per token");
    };
    let n_groups = dim / group;
    let groups = probs.len();
    let mut bias = vec![0f32; groups * n_groups];
    for t in 0..block.tokens {
        unpack_row(block.row(head, t), block.bits, codes);
        let params = &block.params[(head * block.tokens + t) * n_groups..][..n_groups];
        for g in 0..groups {
            let p = probs[g][offset + t];
            let o = &mut out[g * dim..(g + 1) * dim];
            for (j, par) in params.iter().enumerate() {
                let r = j * group..(j + 1) * group;
                axpy(p * par.scale.to_f32(), &codes[r.clone()], &mut o[r]);
                bias[g * n_groups + j] += p * par.min.to_f32();
            }
        }
    }
    for g in 0..groups {
        for (j, b) in bias[g * n_groups..(g + 1) * n_groups].iter().enumerate() {
            for o in &mut out[g * dim + j * group..g * dim + (j + 1) * group] {
                *o += b;
            }
        }
    }
}

/// Attention of the `groups` query heads of kv head `head` over one sequence's cache.
/// `queries` is `[group][dim]`; returns `[group][dim]`.
fn attend_head(
    store: &SeqLayerStore,
    dense: &DenseRows,
    head: usize,
    queries: &[f32],
    groups: usize,
    dim: usize,
    scale: f32,
) -> Vec<f32> {
    let total = store.len();
    let mut scores = vec![vec![0f32; total]; groups];
    let mut codes = vec![0f32; dim];
    let mut offset = 0;
    for chunk in store.chunks() {
        block_scores(
            &chunk.k,
            head,
            queries,
            groups,
            scale,
            &mut scores,
            offset,
            &mut codes,
        );
        offset += chunk.tokens();
    }
    for (k, _, n) in dense {
        let k = &k[head * n * dim..(head + 1) * n * dim];
        for (t, row) in k.chunks_exact(dim).enumerate() {
            for g in 0..groups {
                scores[g][offset + t] = dot(&queries[g * dim..(g + 1) * dim], row) * scale;
            }
        }
        offset += n;
    }
    debug_assert_eq!(offset, total);
    for s in scores.iter_mut() {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in s.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in s.iter_mut() {
            *x *= inv;
        }
    }
    let mut out = vec![0f32; groups * dim];
    let mut offset = 0;
    for chunk in store.chunks() {
        block_values(&chunk.v, head, &scores, offset, &mut out, &mut codes);
        offset += chunk.tokens();
    }
    for (_, v, n) in dense {
        let v = &v[head * n * dim..(head + 1) * n * dim];
        for (t, row) in v.chunks_exact(dim).enumerate() {
            for g in 0..groups {
                axpy(scores[g][offset + t], row, &mut out[g * dim..(g + 1) * dim]);
            }
        }
        offset += n;
    }
    out
}

/// Decode attention (one query token per sequence) over LogQuant stores, one per batch row.
/// `q` is `(b, q_heads, 1, dim)`; the result has `q`'s shape and dtype.
pub fn attend_decode(q: &Tensor, rows: &[SeqLayerStore], scale: f32) -> Result<Tensor> {
    let (b, q_heads, q_len, dim) = q.dims4()?;
    if q_len != 1 || b != rows.len() {
        candle_core::bail!("fused decode attention needs one query per sequence");
    }
    let Some(layout) = rows.first().and_then(|r| r.layout()) else {
        candle_core::bail!("fused decode attention over an empty cache");
    };
    let kv_heads = layout.heads;
    let groups = q_heads / kv_heads;
    let qf = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    // Staged and full-precision rows as host f32, per batch row: (k, v, tokens).
    let dense: Vec<DenseRows> = rows
        .iter()
        .map(|row| {
            [row.staged(), row.full()]
                .into_iter()
                .flatten()
                .map(|r| Ok((host_rows(&r.k)?, host_rows(&r.v)?, r.k.dims()[1])))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    // One task per (sequence, kv head).
    let outputs: Vec<Vec<f32>> = (0..b * kv_heads)
        .into_par_iter()
        .map(|i| {
            let (bi, h) = (i / kv_heads, i % kv_heads);
            let qh =
                &qf[(bi * q_heads + h * groups) * dim..(bi * q_heads + (h + 1) * groups) * dim];
            attend_head(&rows[bi], &dense[bi], h, qh, groups, dim, scale)
        })
        .collect();
    let out: Vec<f32> = outputs.into_iter().flatten().collect();
    Tensor::from_vec(out, (b, q_heads, 1, dim), &Device::Cpu)?
        .to_dtype(q.dtype())?
        .to_device(q.device())
}
