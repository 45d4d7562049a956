//! Launches the fused CUDA decode attention of `decode_attention.cu` over the LogQuant stores of
//! a batch (one query token per sequence, no mask), and its reference kernels.
//!
//! The `.cu` header states the device layout and the math; this side gathers the inputs in that
//! layout with candle ops on the device (the chunks of all sequences concatenated along the
//! token axis, the full-precision rows likewise), uploads the per-sequence offsets (host
//! bookkeeping from chunk token counts, one small upload a call), checks the kernels' limits and
//! launches quantized spans, full-precision spans and the reduce through candle's CUDA backend
//! ([`CustomOp1::cuda_fwd`], the module loaded once per device by
//! `CudaDevice::get_or_load_custom_func`). Nothing here reads tensor data back to the host.
//!
//! Whatever the kernels do not cover ([`Unsupported`]) returns `Ok(None)` from
//! [`attend_decode`], and the backend runs the portable path instead.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage,
    Tensor,
};

use crate::quant::Grouping;
use crate::store::SeqLayerStore;

/// PTX of `decode_attention.cu`, compiled by nvcc in `build.rs` for `compute_${CUDA_COMPUTE_CAP}`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
/// The name candle caches the loaded module under (once per device).
const MODULE: &str = "mistralrs_logquant_decode_attention";

/// `LQ_THREADS`: threads of a span block.
const THREADS: usize = 128;
/// `LQ_TILE`: tokens a span block stages at a time; spans are multiples of it.
const TILE: usize = THREADS;
/// `LQ_WARPS`.
const WARPS: usize = THREADS / 32;
/// Full-precision spans: one tile each (a few hundred such rows per sequence at most).
const DENSE_SPAN: usize = TILE;
/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;
/// Span blocks per SM aimed at: enough loads in flight to saturate HBM (as the harness's
/// `choose_span` in scripts/cuda-kernel-check.py).
const BLOCKS_PER_SM: usize = 8;
/// Query heads per kv head an instantiation takes at most (`GT` of 1, 2, 4, 8).
const MAX_REP: usize = 8;
/// Head dims the kernels take: multiples of 32 (whole u32 words per packed row) up to 256
/// (two channels per thread in the full-precision value phase).
const MAX_DIM: usize = 256;
/// Reference kernels: a grid-stride loop over elements.
const REF_BLOCKS: u32 = 1024;

/// Why the fused CUDA kernel does not take a batch (the portable path does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("the queries are not on a CUDA device")]
    NotCuda,
    #[error("{queries} query tokens per sequence: the kernel is for decode (1)")]
    NotDecode { queries: usize },
    #[error("{queries} query rows for {stores} sequences")]
    BatchMismatch { queries: usize, stores: usize },
    #[error("the cache is empty")]
    Empty,
    #[error("sequences with different head counts, head sizes or dtypes")]
    MixedRows,
    #[error("head dim {dim}: the kernel needs a multiple of 32 of at most {MAX_DIM}")]
    HeadDim { dim: usize },
    #[error("{q_heads} query heads for {kv_heads} kv heads: the kernel takes 1 to {MAX_REP} per kv head")]
    Heads { q_heads: usize, kv_heads: usize },
    #[error("chunks of different encodings in one batch")]
    MixedChunks,
    #[error("{bits}-bit codes: the kernel reads 2, 3, 4 or 8")]
    Bits { bits: u8 },
    #[error(
        "{what} groups of {group} channels: the kernel needs a multiple of 8 dividing dim {dim}"
    )]
    Group {
        what: &'static str,
        group: usize,
        dim: usize,
    },
    #[error("per-channel values: the kernel reads per-token value groups")]
    PerChannelValues,
    #[error("rotation over dim {dim}: needs a power of two")]
    Rotation { dim: usize },
    #[error("full-precision rows in {dtype:?}: the kernel reads f32, f16 or bf16")]
    DenseDtype { dtype: DType },
    #[error("{what} of {value} exceeds the kernel's index range or grid")]
    TooLarge { what: &'static str, value: usize },
    #[error("{what} needs {need} bytes of shared memory a block, the device allows {limit}")]
    SharedMemory {
        what: &'static str,
        need: usize,
        limit: usize,
    },
}

fn align16(bytes: usize) -> usize {
    (bytes + 15) & !15
}

/// `lq_quant_smem_bytes` of the `.cu`: the dynamic shared memory of a quantized-span block, in
/// bytes (the kernel checks what it gets against the same sum and writes NaN if short).
/// `key_group` counts tokens for per-channel keys, channels for per-token keys.
pub fn quant_smem_bytes(
    kbits: usize,
    vbits: usize,
    key_per_channel: bool,
    gt: usize,
    d: usize,
    key_group: usize,
    value_group: usize,
) -> usize {
    let (kwords, vwords) = (d * kbits / 32, d * vbits / 32);
    let kstride = kwords | 1;
    let ng = if key_per_channel {
        TILE / key_group + 2
    } else {
        1
    };
    let q = 4 * d * gt;
    let probs = 4 * TILE * gt;
    let red = 4 * 2 * WARPS * gt;
    let qx = 4 * (if key_per_channel { ng } else { d / key_group }) * gt;
    let qtab = 4 * ng * d * gt;
    let kmin = if key_per_channel { 4 * ng * d } else { 0 };
    let kc = 4 * (TILE * kstride + 2);
    let vc = 4 * (TILE * vwords + 2);
    let kp = if key_per_channel {
        0
    } else {
        8 * TILE * (d / key_group)
    };
    let vp = 8 * TILE * (d / value_group);
    let staging = align16(kc) + align16(vc) + align16(kp) + align16(vp);
    let slots = d / 8;
    let final_red = 4 * (THREADS / slots) * gt * d;
    align16(q)
        + align16(probs)
        + align16(red)
        + align16(qx)
        + align16(qtab)
        + align16(kmin)
        + staging.max(final_red)
}

/// `lq_dense_smem_bytes` of the `.cu`: the dynamic shared memory of a full-precision-span block.
pub fn dense_smem_bytes(gt: usize, d: usize) -> usize {
    align16(4 * d * gt) + align16(4 * TILE * gt) + align16(4 * 2 * WARPS * gt)
}

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
struct QuantPlan {
    kbits: usize,
    vbits: usize,
    key_per_channel: bool,
    /// Tokens per per-channel key group, channels per per-token key group.
    key_group: usize,
    value_group: usize,
    rotated: bool,
    /// `N`: quantized tokens per kv head over the batch.
    tokens: usize,
    span_tokens: usize,
    slots: usize,
    smem: usize,
}

/// Everything the launches need that is known on the host.
#[derive(Debug, Clone)]
struct Plan {
    batch: usize,
    n_q: usize,
    n_kv: usize,
    d: usize,
    gt: usize,
    quant: Option<QuantPlan>,
    /// `Nd` and the dense slots, when any sequence has full-precision rows.
    dense: Option<(usize, usize)>,
    dense_dtype: DType,
    dense_smem: usize,
    /// `[seq_start; B] [seq_len; B] [dense_start; B] [dense_len; B]`.
    offsets: Vec<i32>,
}

impl Plan {
    fn quant_slots(&self) -> usize {
        self.quant.map_or(0, |p| p.slots)
    }

    fn n_slots(&self) -> usize {
        (self.quant_slots() + self.dense.map_or(0, |(_, s)| s)).max(1)
    }

    fn rotated(&self) -> bool {
        self.quant.is_some_and(|p| p.rotated)
    }
}

/// What the device allows: opt-in shared memory per block and the SM count.
#[derive(Debug, Clone, Copy)]
struct DeviceLimits {
    smem_optin: usize,
    sms: usize,
}

fn device_limits(dev: &CudaDevice) -> Result<DeviceLimits> {
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

fn fits_i32(what: &'static str, value: usize) -> std::result::Result<(), Unsupported> {
    if value > i32::MAX as usize {
        return Err(Unsupported::TooLarge { what, value });
    }
    Ok(())
}

fn check_bits(bits: u8) -> std::result::Result<usize, Unsupported> {
    match bits {
        2 | 3 | 4 | 8 => Ok(bits as usize),
        _ => Err(Unsupported::Bits { bits }),
    }
}

fn check_token_group(
    what: &'static str,
    group: usize,
    d: usize,
) -> std::result::Result<(), Unsupported> {
    if group == 0 || !group.is_multiple_of(8) || !d.is_multiple_of(group) {
        return Err(Unsupported::Group {
            what,
            group,
            dim: d,
        });
    }
    Ok(())
}

/// Checks a decode batch against the kernels' limits (the `.cu` header's "Limits checked by
/// the caller") and lays out the launches. `q_dims` is `(b, n_q, 1, d)`.
fn plan(
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

/// The batch's cache in the kernels' layout, as tensors on the device (candle ops only).
struct Inputs {
    /// u8 `(n_kv, N, d * kbits / 8)`, f16 params (`(n_kv, N, d / key_group, 2)` per-token,
    /// `(n_kv, N / key_group, d, 2)` per-channel), u8 `(n_kv, N, d * vbits / 8)`, f16
    /// `(n_kv, N, d / value_group, 2)`.
    quant: Option<[Tensor; 4]>,
    /// `(n_kv, Nd, d)` K and V in the activation dtype: staged then the policy's rows of each
    /// sequence, sequence after sequence.
    dense: Option<[Tensor; 2]>,
}

fn cat1(parts: &[&Tensor]) -> Result<Tensor> {
    match parts {
        [one] => one.contiguous(),
        _ => Tensor::cat(parts, 1)?.contiguous(),
    }
}

fn gather(plan: &Plan, rows: &[SeqLayerStore]) -> Result<Inputs> {
    let quant = match plan.quant {
        None => None,
        Some(qp) => {
            let chunks: Vec<_> = rows.iter().flat_map(|r| r.chunks()).collect();
            let k_codes: Vec<&Tensor> = chunks.iter().map(|c| c.k.codes_tensor()).collect();
            let v_codes: Vec<&Tensor> = chunks.iter().map(|c| c.v.codes_tensor()).collect();
            let v_params: Vec<&Tensor> = chunks.iter().map(|c| c.v.params_tensor()).collect();
            let k_params = if qp.key_per_channel {
                // (n_kv, d, 2) per chunk -> (n_kv, chunks, d, 2).
                let stacked = chunks
                    .iter()
                    .map(|c| c.k.params_tensor().unsqueeze(1))
                    .collect::<Result<Vec<_>>>()?;
                cat1(&stacked.iter().collect::<Vec<_>>())?
            } else {
                cat1(
                    &chunks
                        .iter()
                        .map(|c| c.k.params_tensor())
                        .collect::<Vec<_>>(),
                )?
            };
            Some([cat1(&k_codes)?, k_params, cat1(&v_codes)?, cat1(&v_params)?])
        }
    };
    let dense = match plan.dense {
        None => None,
        Some(_) => {
            let parts: Vec<_> = rows
                .iter()
                .flat_map(|r| [r.staged(), r.full()])
                .flatten()
                .collect();
            let k: Vec<&Tensor> = parts.iter().map(|r| &r.k).collect();
            let v: Vec<&Tensor> = parts.iter().map(|r| &r.v).collect();
            Some([cat1(&k)?, cat1(&v)?])
        }
    };
    Ok(Inputs { quant, dense })
}

/// The CUDA storage of a tensor on the device.
fn cuda_storage<'a>(storage: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match storage {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("logquant: the {what} are not on a CUDA device"),
    }
}

/// The elements of a contiguous CUDA tensor's storage, as a view for a kernel argument.
fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("logquant: the {what} are not contiguous");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// Scratch of one launch: the spans' softmax states and the merged output.
struct Partials {
    /// f32 `(B, n_q, n_slots, d)`, unnormalized outputs.
    out: CudaSlice<f32>,
    /// f32 `(B, n_q, n_slots)`, running max in log2 units and sum.
    max: CudaSlice<f32>,
    sum: CudaSlice<f32>,
}

/// The fused decode attention as a candle op over the queries f32 `(B, n_q, d)`; the output is
/// f32 `(B, n_q, d)`.
struct FusedDecode {
    plan: Plan,
    inputs: Inputs,
    softmax_scale: f32,
}

impl FusedDecode {
    /// Quantized spans: grid `(quant_slots, n_kv, B)`, slots `[0, quant_slots)`.
    fn launch_quant(
        &self,
        dev: &CudaDevice,
        q: &CudaView<'_, f32>,
        offsets: &CudaSlice<i32>,
        parts: &mut Partials,
    ) -> Result<()> {
        let (Some(qp), Some([kc, kp, vc, vp])) = (self.plan.quant, &self.inputs.quant) else {
            return Ok(());
        };
        let p = &self.plan;
        let name = format!(
            "lq_decode_quant_k{}v{}_{}_g{}",
            qp.kbits,
            qp.vbits,
            if qp.key_per_channel { "pc" } else { "pt" },
            p.gt
        );
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        if qp.smem > DEFAULT_SMEM {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                qp.smem as i32,
            )
            .w()?;
        }
        let (kc_s, kc_l) = kc.storage_and_layout();
        let (kp_s, kp_l) = kp.storage_and_layout();
        let (vc_s, vc_l) = vc.storage_and_layout();
        let (vp_s, vp_l) = vp.storage_and_layout();
        let kc = view::<u8>(cuda_storage(&kc_s, "key codes")?, kc_l, "key codes")?;
        let kp = view::<half::f16>(cuda_storage(&kp_s, "key scales")?, kp_l, "key scales")?;
        let vc = view::<u8>(cuda_storage(&vc_s, "value codes")?, vc_l, "value codes")?;
        let vp = view::<half::f16>(cuda_storage(&vp_s, "value scales")?, vp_l, "value scales")?;
        let b = p.batch;
        let (seq_start, seq_len) = (offsets.slice(0..b), offsets.slice(b..2 * b));
        let head_stride = qp.tokens as i64;
        let (n_q, n_kv, d) = (p.n_q as i32, p.n_kv as i32, p.d as i32);
        let (key_group, value_group) = (qp.key_group as i32, qp.value_group as i32);
        let span = qp.span_tokens as i32;
        let rotated = i32::from(qp.rotated);
        let (n_slots, slot_base) = (p.n_slots() as i32, 0i32);
        let cfg = LaunchConfig {
            grid_dim: (qp.slots as u32, p.n_kv as u32, b as u32),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: qp.smem as u32,
        };
        let mut builder = func.builder();
        builder.arg(q);
        builder.arg(&kc);
        builder.arg(&kp);
        builder.arg(&vc);
        builder.arg(&vp);
        builder.arg(&seq_start);
        builder.arg(&seq_len);
        builder.arg(&head_stride);
        builder.arg(&n_q);
        builder.arg(&n_kv);
        builder.arg(&d);
        builder.arg(&key_group);
        builder.arg(&value_group);
        builder.arg(&span);
        builder.arg(&self.softmax_scale);
        builder.arg(&rotated);
        builder.arg(&mut parts.out);
        builder.arg(&mut parts.max);
        builder.arg(&mut parts.sum);
        builder.arg(&n_slots);
        builder.arg(&slot_base);
        // SAFETY: the arguments are the kernel's parameters in order and type (the `.cu`'s
        // LQ_QUANT_ENTRY); the buffers hold what the plan sized them for and outlive the launch
        // (cudarc records the stream's use of each one).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    /// Full-precision spans: grid `(dense_slots, n_kv, B)`, slots after the quantized ones.
    fn launch_dense(
        &self,
        dev: &CudaDevice,
        q: &CudaView<'_, f32>,
        offsets: &CudaSlice<i32>,
        parts: &mut Partials,
    ) -> Result<()> {
        let (Some((tokens, slots)), Some([k, v])) = (self.plan.dense, &self.inputs.dense) else {
            return Ok(());
        };
        let p = &self.plan;
        let tag = match p.dense_dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => candle_core::bail!("logquant: full-precision rows in {other:?}"),
        };
        let func =
            dev.get_or_load_custom_func(&format!("lq_decode_dense_{tag}_g{}", p.gt), MODULE, PTX)?;
        let (k_s, k_l) = k.storage_and_layout();
        let (v_s, v_l) = v.storage_and_layout();
        let (k_s, v_s) = (cuda_storage(&k_s, "keys")?, cuda_storage(&v_s, "values")?);
        let b = p.batch;
        let (dense_start, dense_len) = (offsets.slice(2 * b..3 * b), offsets.slice(3 * b..4 * b));
        let head_stride = tokens as i64;
        let (n_q, n_kv, d) = (p.n_q as i32, p.n_kv as i32, p.d as i32);
        let span = DENSE_SPAN as i32;
        let (n_slots, slot_base) = (p.n_slots() as i32, p.quant_slots() as i32);
        let cfg = LaunchConfig {
            grid_dim: (slots as u32, p.n_kv as u32, b as u32),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: p.dense_smem as u32,
        };
        // One body for the three element types (the views differ in type only).
        macro_rules! launch {
            ($t:ty) => {{
                let k = view::<$t>(k_s, k_l, "keys")?;
                let v = view::<$t>(v_s, v_l, "values")?;
                let mut builder = func.builder();
                builder.arg(q);
                builder.arg(&k);
                builder.arg(&v);
                builder.arg(&dense_start);
                builder.arg(&dense_len);
                builder.arg(&head_stride);
                builder.arg(&n_q);
                builder.arg(&n_kv);
                builder.arg(&d);
                builder.arg(&span);
                builder.arg(&self.softmax_scale);
                builder.arg(&mut parts.out);
                builder.arg(&mut parts.max);
                builder.arg(&mut parts.sum);
                builder.arg(&n_slots);
                builder.arg(&slot_base);
                // SAFETY: as in `launch_quant` (the `.cu`'s LQ_DENSE_ENTRY).
                unsafe { builder.launch(cfg) }.w()?;
            }};
        }
        match p.dense_dtype {
            DType::F32 => launch!(f32),
            DType::F16 => launch!(half::f16),
            _ => launch!(half::bf16),
        }
        Ok(())
    }

    /// Merge of all slots: grid `(n_q, B)`, one thread per channel.
    fn launch_reduce(
        &self,
        dev: &CudaDevice,
        parts: &Partials,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let p = &self.plan;
        let func = dev.get_or_load_custom_func("lq_decode_reduce", MODULE, PTX)?;
        let (n_slots, quant_slots) = (p.n_slots() as i32, p.quant_slots() as i32);
        let d = p.d as i32;
        let rotated = i32::from(p.rotated());
        let cfg = LaunchConfig {
            grid_dim: (p.n_q as u32, p.batch as u32, 1),
            block_dim: (p.d as u32, 1, 1),
            shared_mem_bytes: 4 * p.d as u32,
        };
        let mut builder = func.builder();
        builder.arg(&parts.out);
        builder.arg(&parts.max);
        builder.arg(&parts.sum);
        builder.arg(&n_slots);
        builder.arg(&quant_slots);
        builder.arg(&d);
        builder.arg(&rotated);
        builder.arg(out);
        // SAFETY: the `.cu`'s lq_decode_reduce; `out` holds B * n_q * d floats.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }
}

impl CustomOp1 for FusedDecode {
    fn name(&self) -> &'static str {
        "logquant-fused-decode-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("logquant: the fused CUDA decode attention runs on CUDA only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let q = view::<f32>(q, q_layout, "queries")?;
        let p = &self.plan;
        let rows = p.batch * p.n_q;
        let n_slots = p.n_slots();
        let offsets = dev.clone_htod(&p.offsets)?;
        // SAFETY (uninitialized scratch and output): every (sequence, query head, slot) gets
        // its max and sum from exactly one span block (the grids cover all slots, and a block
        // past its sequence's end writes max = -inf); the reduce reads part_out only where max
        // is finite, where that block wrote it; the reduce writes every element of `out`.
        let mut parts = Partials {
            out: unsafe { dev.alloc::<f32>(rows * n_slots * p.d)? },
            max: unsafe { dev.alloc::<f32>(rows * n_slots)? },
            sum: unsafe { dev.alloc::<f32>(rows * n_slots)? },
        };
        let mut out = unsafe { dev.alloc::<f32>(rows * p.d)? };
        self.launch_quant(&dev, &q, &offsets, &mut parts)?;
        self.launch_dense(&dev, &q, &offsets, &mut parts)?;
        self.launch_reduce(&dev, &parts, &mut out)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((p.batch, p.n_q, p.d)),
        ))
    }
}

/// The plan and the gathered inputs of a decode batch, or why the kernel does not take it.
fn prepare(
    q: &Tensor,
    rows: &[SeqLayerStore],
) -> Result<std::result::Result<(Plan, Inputs, Tensor), Unsupported>> {
    let Device::Cuda(dev) = q.device() else {
        return Ok(Err(Unsupported::NotCuda));
    };
    let plan = match plan(q.dims4()?, rows, device_limits(dev)?) {
        Ok(plan) => plan,
        Err(reason) => return Ok(Err(reason)),
    };
    let inputs = gather(&plan, rows)?;
    let q32 = q
        .to_dtype(DType::F32)?
        .reshape((plan.batch, plan.n_q, plan.d))?
        .contiguous()?;
    // The offsets are the one host-to-device upload of a call (bookkeeping, not tensor data).
    crate::packed::note_upload();
    Ok(Ok((plan, inputs, q32)))
}

/// The environment variable that turns the fused CUDA decode attention on
/// (`MISTRALRS_LOGQUANT_CUDA_FUSED=1`).
pub const ENABLE_ENV: &str = "MISTRALRS_LOGQUANT_CUDA_FUSED";

/// Whether the backend uses [`attend_decode`] on CUDA (read once per process). Off by default:
/// the kernels have not yet run on a GPU (scripts/device-check.sh turns them on to check them);
/// until a GPU run passes, CUDA decodes through the portable path.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(ENABLE_ENV).is_ok_and(|v| v == "1"))
}

/// Fused decode attention on CUDA over LogQuant stores, one per batch row: the codes are read
/// in place by `decode_attention.cu` (split-K flash decoding, f32 softmax).
///
/// `q` is `(b, q_heads, 1, dim)` on a CUDA device, `rows` the `b` stores of one layer after the
/// new token was admitted, `scale` the softmax scale. Returns the attention output with `q`'s
/// shape and dtype, or `None` where the kernels do not cover the batch ([`Unsupported`], logged
/// at debug level): the caller then runs the portable path. Reads nothing back to the host.
pub fn attend_decode(q: &Tensor, rows: &[SeqLayerStore], scale: f32) -> Result<Option<Tensor>> {
    let (plan, inputs, q32) = match prepare(q, rows)? {
        Ok(prepared) => prepared,
        Err(reason) => {
            tracing::debug!("logquant: fused CUDA decode attention not used: {reason}");
            return Ok(None);
        }
    };
    let (b, n_q, d) = (plan.batch, plan.n_q, plan.d);
    let op = FusedDecode {
        plan,
        inputs,
        softmax_scale: scale,
    };
    let out = q32.apply_op1_no_bwd(&op)?;
    Ok(Some(out.reshape((b, n_q, 1, d))?.to_dtype(q.dtype())?))
}

/// The reference kernels of `decode_attention.cu` (the on-device oracle): dequantize into
/// scratch, rotate back, textbook attention. Same inputs as [`FusedDecode`], the full-precision
/// rows in f32.
struct ReferenceDecode {
    plan: Plan,
    inputs: Inputs,
    softmax_scale: f32,
}

impl CustomOp1 for ReferenceDecode {
    fn name(&self) -> &'static str {
        "logquant-reference-decode-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("logquant: the reference CUDA decode attention runs on CUDA only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let q = view::<f32>(q, q_layout, "queries")?;
        let p = &self.plan;
        let (n_kv, d) = (p.n_kv as i32, p.d as i32);
        let b = p.batch;
        let offsets = dev.clone_htod(&p.offsets)?;
        let (q_start, q_len) = (offsets.slice(0..b), offsets.slice(b..2 * b));
        let (d_start, d_len) = (offsets.slice(2 * b..3 * b), offsets.slice(3 * b..4 * b));
        let grid = LaunchConfig {
            grid_dim: (REF_BLOCKS, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Quantized rows dequantized (and rotated back) into f32 (n_kv, nq, d); one zero row
        // when there are none (lengths 0: never read).
        let nq = p.quant.map_or(1, |qp| qp.tokens);
        let mut kq = dev.alloc_zeros::<f32>(p.n_kv * nq * p.d)?;
        let mut vq = dev.alloc_zeros::<f32>(p.n_kv * nq * p.d)?;
        if let (Some(qp), Some([kc, kp, vc, vp])) = (p.quant, &self.inputs.quant) {
            let dequant = dev.get_or_load_custom_func("lq_ref_dequant", MODULE, PTX)?;
            let encodings = [
                (kc, kp, qp.kbits, qp.key_per_channel, qp.key_group, &mut kq),
                (vc, vp, qp.vbits, false, qp.value_group, &mut vq),
            ];
            for (codes, params, bits, per_channel, group, out) in encodings {
                let (c_s, c_l) = codes.storage_and_layout();
                let (p_s, p_l) = params.storage_and_layout();
                let codes = view::<u8>(cuda_storage(&c_s, "codes")?, c_l, "codes")?;
                let params = view::<half::f16>(cuda_storage(&p_s, "scales")?, p_l, "scales")?;
                let (bits, per_channel, group) =
                    (bits as i32, i32::from(per_channel), group as i32);
                let n_tokens = nq as i64;
                let mut builder = dequant.builder();
                builder.arg(&codes);
                builder.arg(&params);
                builder.arg(&bits);
                builder.arg(&per_channel);
                builder.arg(&group);
                builder.arg(&n_tokens);
                builder.arg(&n_kv);
                builder.arg(&d);
                builder.arg(out);
                // SAFETY: the `.cu`'s lq_ref_dequant; `out` holds n_kv * nq * d floats.
                unsafe { builder.launch(grid) }.w()?;
            }
            if qp.rotated {
                let rotate = dev.get_or_load_custom_func("lq_ref_rotate_rows", MODULE, PTX)?;
                let rows = (p.n_kv * nq) as i64;
                for x in [&mut kq, &mut vq] {
                    let mut y = dev.alloc_zeros::<f32>(p.n_kv * nq * p.d)?;
                    let mut builder = rotate.builder();
                    builder.arg(&*x);
                    builder.arg(&mut y);
                    builder.arg(&rows);
                    builder.arg(&d);
                    // SAFETY: the `.cu`'s lq_ref_rotate_rows, out of place, equal sizes.
                    unsafe { builder.launch(grid) }.w()?;
                    *x = y;
                }
            }
        }
        // Full-precision rows in f32 (converted by `reference_decode_attention`), or one zero
        // row when there are none.
        let nd = p.dense.map_or(1, |(tokens, _)| tokens);
        let zeros = dev.alloc_zeros::<f32>(p.n_kv * p.d)?;
        let dense = self
            .inputs
            .dense
            .as_ref()
            .map(|[k, v]| (k.storage_and_layout(), v.storage_and_layout()));
        let (kd, vd) = match &dense {
            Some(((k_s, k_l), (v_s, v_l))) => (
                view::<f32>(cuda_storage(k_s, "keys")?, k_l, "keys")?,
                view::<f32>(cuda_storage(v_s, "values")?, v_l, "values")?,
            ),
            None => (zeros.slice(..), zeros.slice(..)),
        };
        let mut out = dev.alloc_zeros::<f32>(b * p.n_q * p.d)?;
        let attention = dev.get_or_load_custom_func("lq_ref_attention", MODULE, PTX)?;
        let (nq, nd) = (nq as i64, nd as i64);
        let (batch, n_q) = (b as i32, p.n_q as i32);
        let mut builder = attention.builder();
        builder.arg(&q);
        builder.arg(&kq);
        builder.arg(&vq);
        builder.arg(&q_start);
        builder.arg(&q_len);
        builder.arg(&nq);
        builder.arg(&kd);
        builder.arg(&vd);
        builder.arg(&d_start);
        builder.arg(&d_len);
        builder.arg(&nd);
        builder.arg(&batch);
        builder.arg(&n_q);
        builder.arg(&n_kv);
        builder.arg(&d);
        builder.arg(&self.softmax_scale);
        builder.arg(&mut out);
        // SAFETY: the `.cu`'s lq_ref_attention; `out` holds B * n_q * d floats.
        unsafe {
            builder.launch(LaunchConfig {
                block_dim: (128, 1, 1),
                ..grid
            })
        }
        .w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, p.n_q, p.d)),
        ))
    }
}

/// [`attend_decode`] through the reference kernels of `decode_attention.cu` (dequantize into
/// scratch, rotate back, textbook attention, one thread per output element): the on-device
/// oracle for tests. Same arguments and result; an error where the fused kernels would not
/// take the batch.
pub fn reference_decode_attention(
    q: &Tensor,
    rows: &[SeqLayerStore],
    scale: f32,
) -> Result<Tensor> {
    let (plan, mut inputs, q32) = prepare(q, rows)?
        .map_err(|reason| candle_core::Error::Msg(format!("logquant: {reason}")))?;
    if let Some([k, v]) = &inputs.dense {
        inputs.dense = Some([k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?]);
    }
    let (b, n_q, d) = (plan.batch, plan.n_q, plan.d);
    let op = ReferenceDecode {
        plan,
        inputs,
        softmax_scale: scale,
    };
    let out = q32.apply_op1_no_bwd(&op)?;
    out.reshape((b, n_q, 1, d))?.to_dtype(q.dtype())
}
