//! What the kernels of `decode_attention.cu` take: their block constants (the `.cu`'s `LQ_*`),
//! the limits a batch is checked against ([`Unsupported`] and the encoding checks) and the
//! dynamic shared memory a block needs (the `.cu`'s `lq_*_smem_bytes`).

use candle_core::DType;

/// `LQ_THREADS`: threads of a span block.
pub(super) const THREADS: usize = 128;
/// `LQ_TILE`: tokens a span block stages at a time; spans are multiples of it.
pub(super) const TILE: usize = THREADS;
/// `LQ_WARPS`.
const WARPS: usize = THREADS / 32;
/// Dynamic shared memory a kernel may use without opting in.
pub(super) const DEFAULT_SMEM: usize = 48 * 1024;
/// Query heads per kv head an instantiation takes at most (`GT` of 1, 2, 4, 8).
pub(super) const MAX_REP: usize = 8;
/// Head dims the kernels take: multiples of 32 (whole u32 words per packed row) up to 256
/// (two channels per thread in the full-precision value phase).
pub(super) const MAX_DIM: usize = 256;

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

pub(super) fn fits_i32(what: &'static str, value: usize) -> std::result::Result<(), Unsupported> {
    if value > i32::MAX as usize {
        return Err(Unsupported::TooLarge { what, value });
    }
    Ok(())
}

pub(super) fn check_bits(bits: u8) -> std::result::Result<usize, Unsupported> {
    match bits {
        2 | 3 | 4 | 8 => Ok(bits as usize),
        _ => Err(Unsupported::Bits { bits }),
    }
}

pub(super) fn check_token_group(
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
