//! The launch plan of a decode batch, known on the host: the batch checked against the kernels'
//! limits (encodings, head counts, shared memory against the device's), then the grids, spans,
//! slots and per-sequence offsets of the launches, from the stores' token counts.

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType, Result};

use super::limits::{
    check_bits, check_token_group, dense_smem_bytes, fits_i32, quant_smem_bytes, Unsupported,
    DEFAULT_SMEM, MAX_DIM, MAX_REP, TILE,
};
use crate::quant::Grouping;
use crate::store::SeqLayerStore;

/// Full-precision spans: one tile each (a few hundred such rows per sequence at most).
pub(super) const DENSE_SPAN: usize = TILE;
/// Span blocks per SM aimed at: enough loads in flight to saturate HBM (as the harness's
/// `choose_span` in scripts/cuda-kernel-check.py).
const BLOCKS_PER_SM: usize = 8;

/// The instantiation's query-head group `GT`: the smallest of 1, 2, 4, 8 holding `n_rep`.
fn group_tile(n_rep: usize) -> usize {
    n_rep.next_power_of_two()
}

/// Tokens per quantized span: about [`BLOCKS_PER_SM`] blocks per SM over the grid
/// `(spans, kv heads, batch)`, but at least one tile per block.
fn span_tokens(max_quant: usize, batch: usize, n_kv: usize, sms: usize) -> usize {
    let splits = (BLOCKS_PER_SM * sms).div_ceil(batch * n_kv).max(1);
    (max_quant.div_ceil(splits * TILE) * TILE).max(TILE)
}

/// The quantized side of a batch: encodings and per-sequence token counts.
#[derive(Debug, Clone, Copy)]
pub(super) struct QuantPlan {
    pub(super) kbits: usize,
    pub(super) vbits: usize,
    pub(super) key_per_channel: bool,
    /// Tokens per per-channel key group, channels per per-token key group.
    pub(super) key_group: usize,
    pub(super) value_group: usize,
    pub(super) rotated: bool,
    /// `N`: quantized tokens per kv head over the batch.
    pub(super) tokens: usize,
    pub(super) span_tokens: usize,
    pub(super) slots: usize,
    pub(super) smem: usize,
}

/// Everything the launches need that is known on the host.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) batch: usize,
    pub(super) n_q: usize,
    pub(super) n_kv: usize,
    pub(super) d: usize,
    pub(super) gt: usize,
    pub(super) quant: Option<QuantPlan>,
    /// `Nd` and the dense slots, when any sequence has full-precision rows.
    pub(super) dense: Option<(usize, usize)>,
    pub(super) dense_dtype: DType,
    pub(super) dense_smem: usize,
    /// `[seq_start; B] [seq_len; B] [dense_start; B] [dense_len; B]`.
    pub(super) offsets: Vec<i32>,
}

impl Plan {
    pub(super) fn quant_slots(&self) -> usize {
        self.quant.map_or(0, |p| p.slots)
    }

    pub(super) fn n_slots(&self) -> usize {
        (self.quant_slots() + self.dense.map_or(0, |(_, s)| s)).max(1)
    }

    pub(super) fn rotated(&self) -> bool {
        self.quant.is_some_and(|p| p.rotated)
    }
}

/// What the device allows: opt-in shared memory per block and the SM count.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeviceLimits {
    smem_optin: usize,
    sms: usize,
}

pub(super) fn device_limits(dev: &CudaDevice) -> Result<DeviceLimits> {
    let ctx = dev.cuda_stream().context().clone();
    let smem = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    let sms = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(DeviceLimits {
        smem_optin: smem.max(0) as usize,
        sms: sms.max(1) as usize,
    })
}

/// Checks a decode batch against the kernels' limits (the `.cu` header's "Limits checked by
/// the caller") and lays out the launches. `q_dims` is `(b, n_q, 1, d)`.
pub(super) fn plan(
    q_dims: (usize, usize, usize, usize),
    rows: &[SeqLayerStore],
    limits: DeviceLimits,
) -> std::result::Result<Plan, Unsupported> {
    let (batch, n_q, queries, d) = q_dims;
    if queries != 1 {
        return Err(Unsupported::NotDecode { queries });
    }
    if batch != rows.len() {
        return Err(Unsupported::BatchMismatch {
            queries: batch,
            stores: rows.len(),
        });
    }
    let Some(layout) = rows.first().and_then(|r| r.layout()) else {
        return Err(Unsupported::Empty);
    };
    let (n_kv, dense_dtype) = (layout.heads, layout.dtype);
    if rows.iter().any(|r| {
        r.layout()
            .is_none_or(|l| (l.heads, l.dim, l.dtype) != (n_kv, d, dense_dtype))
    }) {
        return Err(Unsupported::MixedRows);
    }
    if d == 0 || !d.is_multiple_of(32) || d > MAX_DIM {
        return Err(Unsupported::HeadDim { dim: d });
    }
    if n_kv == 0 || !n_q.is_multiple_of(n_kv) || n_q / n_kv > MAX_REP {
        return Err(Unsupported::Heads {
            q_heads: n_q,
            kv_heads: n_kv,
        });
    }
    if !matches!(dense_dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Unsupported::DenseDtype { dtype: dense_dtype });
    }
    // Grid y and z are limited to 65535.
    if n_kv > 65_535 {
        return Err(Unsupported::TooLarge {
            what: "kv heads",
            value: n_kv,
        });
    }
    if batch > 65_535 {
        return Err(Unsupported::TooLarge {
            what: "batch",
            value: batch,
        });
    }
    let gt = group_tile(n_q / n_kv);

    // Per-sequence token counts, host bookkeeping only.
    let quant_lens: Vec<usize> = rows.iter().map(SeqLayerStore::quantized_tokens).collect();
    let dense_lens: Vec<usize> = rows
        .iter()
        .map(SeqLayerStore::full_precision_tokens)
        .collect();
    let (total_quant, total_dense) = (quant_lens.iter().sum(), dense_lens.iter().sum());
    fits_i32("quantized tokens", total_quant)?;
    fits_i32("full-precision tokens", total_dense)?;
    if total_quant == 0 && total_dense == 0 {
        return Err(Unsupported::Empty);
    }

    let quant = if total_quant == 0 {
        None
    } else {
        let mut chunks = rows.iter().flat_map(|r| r.chunks().iter());
        let first = chunks.next().ok_or(Unsupported::Empty)?;
        let kind = |c: &crate::store::QuantChunk| {
            (
                c.k.bits,
                c.k.grouping,
                c.k.rotated,
                c.v.bits,
                c.v.grouping,
                c.v.rotated,
                c.k.heads,
                c.k.dim,
            )
        };
        let want = kind(first);
        let per_channel_tokens = first.k.tokens;
        let key_per_channel = first.k.grouping == Grouping::PerChannel;
        // Per-channel keys: every chunk is one whole key group, so any concatenation of whole
        // chunks starts each sequence at a multiple of the group (the kernel relies on it).
        if rows
            .iter()
            .flat_map(|r| r.chunks())
            .any(|c| kind(c) != want || (key_per_channel && c.k.tokens != per_channel_tokens))
            || first.k.rotated != first.v.rotated
            || (first.k.heads, first.k.dim) != (n_kv, d)
        {
            return Err(Unsupported::MixedChunks);
        }
        let (kbits, vbits) = (check_bits(first.k.bits)?, check_bits(first.v.bits)?);
        let key_group = match first.k.grouping {
            Grouping::PerChannel => per_channel_tokens.max(1),
            Grouping::PerToken { group } => {
                check_token_group("key", group, d)?;
                group
            }
        };
        let value_group = match first.v.grouping {
            Grouping::PerChannel => return Err(Unsupported::PerChannelValues),
            Grouping::PerToken { group } => {
                check_token_group("value", group, d)?;
                group
            }
        };
        let rotated = first.k.rotated;
        if rotated && !d.is_power_of_two() {
            return Err(Unsupported::Rotation { dim: d });
        }
        let smem = quant_smem_bytes(kbits, vbits, key_per_channel, gt, d, key_group, value_group);
        if smem > limits.smem_optin.max(DEFAULT_SMEM) {
            return Err(Unsupported::SharedMemory {
                what: "a quantized span",
                need: smem,
                limit: limits.smem_optin,
            });
        }
        let max_quant = quant_lens.iter().copied().max().unwrap_or(0);
        let span = span_tokens(max_quant, batch, n_kv, limits.sms);
        Some(QuantPlan {
            kbits,
            vbits,
            key_per_channel,
            key_group,
            value_group,
            rotated,
            tokens: total_quant,
            span_tokens: span,
            slots: max_quant.div_ceil(span),
            smem,
        })
    };
    let dense = (total_dense > 0).then(|| {
        let max_dense = dense_lens.iter().copied().max().unwrap_or(0);
        (total_dense, max_dense.div_ceil(DENSE_SPAN))
    });
    let dense_smem = dense_smem_bytes(gt, d);
    if dense_smem > DEFAULT_SMEM {
        return Err(Unsupported::SharedMemory {
            what: "a full-precision span",
            need: dense_smem,
            limit: DEFAULT_SMEM,
        });
    }

    let starts = |lens: &[usize]| -> Vec<i32> {
        lens.iter()
            .scan(0usize, |acc, &n| {
                let start = *acc;
                *acc += n;
                Some(start as i32)
            })
            .collect()
    };
    let mut offsets = Vec::with_capacity(4 * batch);
    offsets.extend(starts(&quant_lens));
    offsets.extend(quant_lens.iter().map(|&n| n as i32));
    offsets.extend(starts(&dense_lens));
    offsets.extend(dense_lens.iter().map(|&n| n as i32));
    Ok(Plan {
        batch,
        n_q,
        n_kv,
        d,
        gt,
        quant,
        dense,
        dense_dtype,
        dense_smem,
        offsets,
    })
}
