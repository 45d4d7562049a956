//! Fused decode attention on the CPU over the packed cache: scores and values are computed from
//! the 2/3/4/8-bit codes, scales and minimums directly; no dequantized copy of the cache is built.
//! Keys and values may have different widths (each block carries its own). The codes and
//! scales are the CPU tensors' own storage ([`crate::packed::PackedBlock::cpu_bytes`], no copy).
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
//!
//! Rotated blocks (`PackedBlock::rotated`, rows stored as `R x` with `R = H / sqrt(dim)`
//! orthogonal and symmetric): keys are scored with the rotated query `R q`, since
//! `(R q) . (R k) = q . k`; a span's weighted sum of rotated values is rotated back once per
//! query row (`R` is its own inverse) before the spans are merged, which is linear.
//! The reference is [`crate::kernels::reference::naive_attention`] over the dequantized layout.
//!
//! Work is split into spans of at most a few hundred tokens of one (sequence, kv head), so both
//! cores have work even at batch 1 (SmolLM2 has 3 kv heads); each span keeps its own softmax
//! state (max, sum, unnormalized output) and the spans are merged exactly, as in flash decoding.
//!
//! The inner loops are plain Rust written so that LLVM vectorizes them (fixed-width chunks,
//! independent accumulators). They are compiled twice: for the baseline target and, picked at
//! run time, with AVX2 and FMA ([`SimdTier`]).

#[cfg(target_arch = "x86_64")]
mod avx2;
mod generic;
mod span_attention;
mod spans;
mod tier;

pub use tier::{KernelPlan, SimdTier};

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::store::SeqLayerStore;
use span_attention::run_span;
use spans::*;

/// Merge the spans of one (sequence, kv head): rescale each to the common max, divide once.
fn merge(parts: &[Partial], query_rows: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; query_rows * dim];
    for g in 0..query_rows {
        let max = parts
            .iter()
            .map(|p| p.max[g])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        let o = &mut out[g * dim..(g + 1) * dim];
        for p in parts {
            let w = (p.max[g] - max).exp();
            sum += w * p.sum[g];
            for (o, x) in o.iter_mut().zip(&p.out[g * dim..(g + 1) * dim]) {
                *o += w * x;
            }
        }
        let inv = 1.0 / sum;
        for o in o.iter_mut() {
            *o *= inv;
        }
    }
    out
}

/// Decode attention (one query token per sequence) over LogQuant stores, one per batch row.
/// `q` is `(b, q_heads, 1, dim)`; the result has `q`'s shape and dtype.
pub fn attend_decode(q: &Tensor, rows: &[SeqLayerStore], scale: f32) -> Result<Tensor> {
    attend_with(q, rows, None, scale, KernelPlan::default())
}

/// Attention of a chunk of `L` new tokens after the cached ones: `q` is `(b, q_heads, L, dim)`,
/// `k_new`/`v_new` are the chunk's exact rows `(b, kv_heads, L, dim)`, not yet in `rows`.
/// The cache is seen whole; only the chunk's own rows are causally masked.
pub fn attend_chunk(
    q: &Tensor,
    rows: &[SeqLayerStore],
    k_new: &Tensor,
    v_new: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    attend_with(q, rows, Some((k_new, v_new)), scale, KernelPlan::default())
}

/// [`attend_decode`] (`new` is `None`) or [`attend_chunk`] with an explicit plan.
pub fn attend_with(
    q: &Tensor,
    rows: &[SeqLayerStore],
    new: Option<(&Tensor, &Tensor)>,
    scale: f32,
    plan: KernelPlan,
) -> Result<Tensor> {
    let (b, q_heads, q_len, dim) = q.dims4()?;
    if b != rows.len() {
        candle_core::bail!("fused attention: {b} queries for {} sequences", rows.len());
    }
    let kv_heads = match (rows.first().and_then(|r| r.layout()), new) {
        (_, Some((k, _))) => {
            if k.dims4()? != (b, k.dim(1)?, q_len, dim) {
                candle_core::bail!(
                    "fused attention: new rows {:?} for queries {:?}",
                    k.dims(),
                    q.dims()
                );
            }
            k.dim(1)?
        }
        (Some(layout), None) if q_len == 1 => layout.heads,
        (Some(_), None) => {
            candle_core::bail!("fused attention: {q_len} queries need their new rows")
        }
        (None, None) => candle_core::bail!("fused attention over an empty cache"),
    };
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        candle_core::bail!("fused attention: {q_heads} query heads for {kv_heads} kv heads");
    }
    // Query rows of one kv head: its query heads times the positions, `[head][position]`.
    let query_rows = q_heads / kv_heads * q_len;
    let qf = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let any_rotated_keys = rows.iter().any(|r| r.chunks().iter().any(|c| c.k.rotated));
    let qf_rotated = if any_rotated_keys {
        let mut r = qf.clone();
        crate::quant::hadamard_rows(&mut r, dim);
        r
    } else {
        Vec::new()
    };
    let dense: Vec<Vec<DenseRows>> = rows
        .iter()
        .enumerate()
        .map(|(bi, row)| {
            let mut parts = [row.staged(), row.full()]
                .into_iter()
                .flatten()
                .map(|r| {
                    Ok(DenseRows {
                        k: host_rows(&r.k)?,
                        v: host_rows(&r.v)?,
                        tokens: r.k.dims()[1],
                        causal: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some((k, v)) = new {
                parts.push(DenseRows {
                    k: host_rows(&k.get(bi)?)?,
                    v: host_rows(&v.get(bi)?)?,
                    tokens: q_len,
                    causal: Some(q_len),
                });
            }
            Ok(parts)
        })
        .collect::<Result<_>>()?;
    // The chunks' bytes, read in place from their CPU tensors.
    let chunk_bytes: Vec<Vec<ChunkBytes<'_>>> = rows
        .iter()
        .map(|row| {
            if row.on_device_path() {
                candle_core::bail!("fused attention over a store on the device path");
            }
            row.chunks()
                .iter()
                .map(|c| {
                    Ok(ChunkBytes {
                        k: c.k.cpu_bytes()?,
                        v: c.v.cpu_bytes()?,
                    })
                })
                .collect()
        })
        .collect::<Result<_>>()?;
    let span_tokens = plan.span_tokens.max(1);
    let per_head = query_rows * dim;
    let row_spans: Vec<Vec<Span>> = rows
        .iter()
        .zip(&dense)
        .map(|(store, dense)| spans(store, dense, span_tokens))
        .collect();
    let tasks: Vec<SpanTask<'_>> = chunk_bytes
        .iter()
        .zip(&dense)
        .zip(&row_spans)
        .enumerate()
        .flat_map(|(bi, ((chunks, dense), spans))| {
            let (qf, qf_rotated) = (&qf, &qf_rotated);
            (0..kv_heads).flat_map(move |h| {
                let first = (bi * kv_heads + h) * per_head;
                let queries = &qf[first..first + per_head];
                let rotated_queries = qf_rotated.get(first..first + per_head).unwrap_or(&[]);
                spans.iter().map(move |&span| SpanTask {
                    chunks,
                    dense,
                    head: h,
                    queries,
                    rotated_queries,
                    query_rows,
                    dim,
                    scale,
                    span,
                })
            })
        })
        .collect();
    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|task| run_span(task, plan.tier))
        .collect();
    // Tasks are ordered by (sequence, kv head, span): merge each consecutive run.
    let mut out = Vec::with_capacity(b * q_heads * q_len * dim);
    let mut i = 0;
    for n_spans in row_spans.iter().map(Vec::len) {
        for _ in 0..kv_heads {
            out.extend(merge(&partials[i..i + n_spans], query_rows, dim));
            i += n_spans;
        }
    }
    Tensor::from_vec(out, (b, q_heads, q_len, dim), &Device::Cpu)?
        .to_dtype(q.dtype())?
        .to_device(q.device())
}
