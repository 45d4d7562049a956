//! Quantized blocks as candle tensors on the model's device ([`PackedBlock`]), with a quantizer
//! and a dequantizer written in candle ops that every backend has (CPU, CUDA, Metal).
//!
//! The encoding is [`crate::quant`]'s, byte for byte (codes, f16 scale and minimum, packing);
//! on the CPU these ops give exactly the scalar reference's bytes and values (tested against
//! [`crate::quant::QuantBlock`], the oracle). How each step is built from portable ops:
//!
//! - f16 rounding of the minimum (down) and the scale (up): the f16 spacing `u` at `|x|` comes
//!   from comparing `|x|` with the binade bounds `2^-14 ..= 2^15`; `floor(x / u) * u` and
//!   `ceil(x / u) * u` are then exact in f32 (divisions by powers of two).
//! - Round half to even (the spec's rounding): candle's `round` rounds halves away from zero,
//!   so it is not used. For `0 <= y < 2^23`, `(y + 2^23) - 2^23` in f32 is `y` rounded to an
//!   integer with ties to even (IEEE round-to-nearest-even at a spacing of 1): two `affine` ops.
//! - `range / (2^bits - 1)`: a tensor division (candle's `tensor / f64` multiplies by the
//!   reciprocal, which rounds differently from the reference's division).
//! - Packing: the codes of one word (four 2-bit, eight 3-bit, two 4-bit codes) are summed with
//!   their bit weights (integers below 2^24, exact in f32) and split into bytes by floor and
//!   remainder. Unpacking: `index_select` into a 256-entry table for 2 and 4 bits (with u32
//!   ids: an u8 id of 255 reads as candle's "padding" and gives zeros), into three such tables
//!   for 3 bits (one per byte of a 3-byte word, the shares summed), a cast for 8.
//! - Hadamard rotation before quantizing: the butterfly stages of
//!   [`crate::quant::hadamard_in_place`] as narrow, add, sub and cat, so rotated rows, and so
//!   the stored bytes, are the host's exactly. Rotating back after dequantizing (every step):
//!   one product with the cached `H / sqrt(n)`, equal to f32 rounding.
//!
//! Small constants (tables, bounds) are uploaded once per device and cached; nothing here reads
//! tensor data back to the host. On the CPU, [`PackedBlock::cpu_bytes`] lends the fused kernel
//! the tensors' own bytes (no copy, no lock).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor, D};
use half::f16;

use crate::quant::{max_code, packed_bytes, GroupParams, Grouping, QuantBlock, F16_MAX};

/// `2^23`: adding and subtracting it rounds a float in `[0, 2^23)` to an integer, ties to even.
const ROUND_EVEN: f64 = 8_388_608.0;

/// A block of `tokens` quantized rows for `heads` heads of `dim` channels, as tensors on one
/// device. Same layout as [`QuantBlock`]: codes token-major, parameters `(scale, min)` pairs.
///
/// The tensors are private and never written after construction (no in-place op touches
/// them): that is what lets [`PackedBlock::cpu_bytes`] lend a CPU block's storage without a
/// lock or a copy.
#[derive(Debug, Clone)]
pub struct PackedBlock {
    pub heads: usize,
    pub tokens: usize,
    pub dim: usize,
    pub bits: u8,
    pub grouping: Grouping,
    /// Rows were rotated by `H / sqrt(dim)` before quantizing.
    pub rotated: bool,
    /// u8 `(heads, tokens, dim * bits / 8)`, contiguous.
    codes: Tensor,
    /// f16 `(scale, min)` pairs, contiguous: `(heads, tokens, dim / group, 2)` for per-token
    /// groups, `(heads, dim, 2)` for per-channel groups.
    params: Tensor,
    /// On the CPU: where the two tensors' elements live.
    host: Option<HostView>,
}

/// Addresses of a CPU block's elements inside its tensors' storage, taken once when the block
/// is built.
#[derive(Debug, Clone, Copy)]
struct HostView {
    codes: *const u8,
    codes_len: usize,
    params: *const GroupParams,
    params_len: usize,
}

// SAFETY: the addresses point into storage that the block's own tensors keep alive and that
// nothing writes after construction (see `PackedBlock::cpu_bytes`); threads only read it.
unsafe impl Send for HostView {}
unsafe impl Sync for HostView {}

/// A CPU block's bytes, borrowed from its tensors: what the fused kernel reads.
#[derive(Debug, Clone, Copy)]
pub struct BlockBytes<'a> {
    pub heads: usize,
    pub tokens: usize,
    pub dim: usize,
    pub bits: u8,
    pub grouping: Grouping,
    pub rotated: bool,
    /// `[head][token][row_bytes]`.
    pub codes: &'a [u8],
    /// Laid out as [`QuantBlock::params`].
    pub params: &'a [GroupParams],
}

impl BlockBytes<'_> {
    /// Packed bytes of one token row.
    pub fn row_bytes(&self) -> usize {
        packed_bytes(self.dim, self.bits)
    }

    /// The shape and encoding, for [`crate::quant::dequantize_rows`].
    pub fn shape(&self) -> crate::quant::BlockShape {
        crate::quant::BlockShape {
            heads: self.heads,
            tokens: self.tokens,
            dim: self.dim,
            bits: self.bits,
            grouping: self.grouping,
            rotated: self.rotated,
        }
    }
}

/// The contiguous elements of a CPU tensor's storage.
fn cpu_slice<'a, T: candle_core::WithDType>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("logquant: {what} are not on the CPU");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("logquant: {what} are not contiguous");
    };
    Ok(&CpuStorage::as_slice::<T>(cpu)?[start..end])
}

// `GroupParams` is `#[repr(C)] { scale: f16, min: f16 }`: two f16 without padding, so a slice of
// 2n f16 is a slice of n `GroupParams` (every bit pattern is a valid f16).
const _: () = assert!(std::mem::size_of::<GroupParams>() == 2 * std::mem::size_of::<f16>());
const _: () = assert!(std::mem::align_of::<GroupParams>() == std::mem::align_of::<f16>());

impl PackedBlock {
    /// A block over `codes` and `params` (made contiguous); on the CPU their storage's
    /// addresses are noted for [`PackedBlock::cpu_bytes`]. Both callers pass tensors they have
    /// just built, which nothing outside this block holds.
    #[allow(clippy::too_many_arguments)]
    fn new(
        (heads, tokens, dim): (usize, usize, usize),
        bits: u8,
        grouping: Grouping,
        rotated: bool,
        codes: Tensor,
        params: Tensor,
    ) -> Result<Self> {
        let codes = codes.contiguous()?;
        let params = params.contiguous()?;
        let groups = match grouping {
            Grouping::PerToken { group } => heads * tokens * (dim / group),
            Grouping::PerChannel => heads * dim,
        };
        if codes.dtype() != DType::U8
            || params.dtype() != DType::F16
            || codes.elem_count() != heads * tokens * packed_bytes(dim, bits)
            || params.elem_count() != 2 * groups
        {
            candle_core::bail!("logquant: a packed block's tensors do not match its shape");
        }
        let host = if codes.device().is_cpu() {
            let (storage, layout) = codes.storage_and_layout();
            let c = cpu_slice::<u8>(&storage, layout, "codes")?;
            let (storage_p, layout_p) = params.storage_and_layout();
            let p = cpu_slice::<f16>(&storage_p, layout_p, "scales")?;
            Some(HostView {
                codes: c.as_ptr(),
                codes_len: c.len(),
                params: p.as_ptr().cast::<GroupParams>(),
                params_len: p.len() / 2,
            })
        } else {
            None
        };
        Ok(Self {
            heads,
            tokens,
            dim,
            bits,
            grouping,
            rotated,
            codes,
            params,
            host,
        })
    }

    /// The scalar reference's block as tensors on `device` (on the CPU, its vectors become the
    /// tensors' storage without a copy of the codes).
    pub fn from_reference(block: QuantBlock, device: &Device) -> Result<Self> {
        let row_bytes = block.row_bytes();
        let params: Vec<f16> = block.params.iter().flat_map(|p| [p.scale, p.min]).collect();
        let params_shape: Vec<usize> = match block.grouping {
            Grouping::PerToken { group } => vec![block.heads, block.tokens, block.dim / group, 2],
            Grouping::PerChannel => vec![block.heads, block.dim, 2],
        };
        if !device.is_cpu() {
            note_upload();
        }
        Self::new(
            (block.heads, block.tokens, block.dim),
            block.bits,
            block.grouping,
            block.rotated,
            Tensor::from_vec(
                block.codes,
                (block.heads, block.tokens, row_bytes),
                &Device::Cpu,
            )?
            .to_device(device)?,
            Tensor::from_vec(params, params_shape, &Device::Cpu)?.to_device(device)?,
        )
    }

    /// A host copy in the reference's form (for tests and inspection; reads the device).
    pub fn to_reference(&self) -> Result<QuantBlock> {
        let codes = self.codes.flatten_all()?.to_vec1::<u8>()?;
        let raw = self.params.flatten_all()?.to_vec1::<f16>()?;
        Ok(QuantBlock {
            heads: self.heads,
            tokens: self.tokens,
            dim: self.dim,
            bits: self.bits,
            grouping: self.grouping,
            rotated: self.rotated,
            codes,
            params: raw
                .chunks_exact(2)
                .map(|p| GroupParams {
                    scale: p[0],
                    min: p[1],
                })
                .collect(),
        })
    }

    pub fn device(&self) -> &Device {
        self.codes.device()
    }

    /// Packed bytes of one token row.
    pub fn row_bytes(&self) -> usize {
        packed_bytes(self.dim, self.bits)
    }

    /// The packed codes, u8 `(heads, tokens, row_bytes)`, contiguous on the block's device: what
    /// the fused CUDA kernel reads (concatenated over chunks, never copied to the host).
    #[cfg(feature = "cuda")]
    pub(crate) fn codes_tensor(&self) -> &Tensor {
        &self.codes
    }

    /// The f16 `(scale, min)` pairs, contiguous: `(heads, tokens, dim / group, 2)` per-token,
    /// `(heads, dim, 2)` per-channel.
    #[cfg(feature = "cuda")]
    pub(crate) fn params_tensor(&self) -> &Tensor {
        &self.params
    }

    /// Bytes held: packed codes plus 16-bit scale and min per group.
    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + self.params.elem_count() * DType::F16.size_in_bytes()
    }

    /// A CPU block's codes and parameters, read in place from its tensors' storage (no lock,
    /// no copy); an error on another device.
    pub fn cpu_bytes(&self) -> Result<BlockBytes<'_>> {
        let Some(h) = self.host else {
            candle_core::bail!("logquant: the fused kernel reads CPU blocks only");
        };
        // SAFETY: `h` was taken in `new` from the contiguous CPU storage of `self.codes` and
        // `self.params`. Those tensors live as long as `self` (clones share them), are private
        // to this module and never written in place, so the elements stay where they were and
        // unchanged for the borrow of `self`. `GroupParams` has the size and alignment of two
        // f16 (asserted above) and any bits are valid.
        let (codes, params) = unsafe {
            (
                std::slice::from_raw_parts(h.codes, h.codes_len),
                std::slice::from_raw_parts(h.params, h.params_len),
            )
        };
        Ok(BlockBytes {
            heads: self.heads,
            tokens: self.tokens,
            dim: self.dim,
            bits: self.bits,
            grouping: self.grouping,
            rotated: self.rotated,
            codes,
            params,
        })
    }

    /// Quantize `x` `(heads, tokens, dim)` (any float dtype) with candle ops on its device,
    /// rotating the rows by `H / sqrt(dim)` first if `rotate`: the reference's
    /// [`QuantBlock::quantize`] / [`QuantBlock::quantize_rotated`], computed where `x` lives.
    pub fn quantize(x: &Tensor, bits: u8, grouping: Grouping, rotate: bool) -> Result<Self> {
        let (heads, tokens, dim) = x.dims3()?;
        if !crate::config::ALLOWED_BITS.contains(&bits) || !(dim * bits as usize).is_multiple_of(8)
        {
            candle_core::bail!("logquant: {bits}-bit rows of {dim} codes cannot be packed");
        }
        if let Grouping::PerToken { group } = grouping {
            if group == 0 || !dim.is_multiple_of(group) {
                candle_core::bail!("logquant: group {group} must divide dim {dim}");
            }
        }
        if rotate && !dim.is_power_of_two() {
            candle_core::bail!("logquant: rotation needs a power-of-two dim, not {dim}");
        }
        let c = consts(x.device())?;
        DEVICE_QUANTIZATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut x = x.to_dtype(DType::F32)?.contiguous()?;
        if rotate {
            x = hadamard_rows(&x)?;
        }
        let x = sanitize(&x, &c)?;
        // Values of one group along `axis`.
        let (xs, axis) = match grouping {
            Grouping::PerToken { group } => (x.reshape((heads, tokens, dim / group, group))?, 3),
            Grouping::PerChannel => (x, 1),
        };
        let lo = xs.min_keepdim(axis)?;
        let hi = xs.max_keepdim(axis)?;
        let min = f16_floor(&lo, &c)?;
        let range = (hi - &min)?;
        let step = range
            .broadcast_div(c.max_code(bits))?
            .broadcast_minimum(&c.f16_max)?;
        let scale = f16_ceil(&step, &c)?;
        // scale == 0 only when every value of the group equals min: divide by 1, code 0.
        let divisor = (scale.broadcast_eq(&c.zero)?.to_dtype(DType::F32)? + &scale)?;
        let y = xs.broadcast_sub(&min)?.broadcast_div(&divisor)?;
        let codes = round_half_even(&y)?
            .broadcast_minimum(c.max_code(bits))?
            .broadcast_maximum(&c.zero)?
            .reshape((heads, tokens, dim))?;
        let params = match grouping {
            Grouping::PerToken { .. } => Tensor::cat(&[&scale, &min], 3)?,
            Grouping::PerChannel => Tensor::cat(&[&scale, &min], 1)?.transpose(1, 2)?,
        };
        Self::new(
            (heads, tokens, dim),
            bits,
            grouping,
            rotate,
            pack(&codes, bits, &c)?,
            params.to_dtype(DType::F16)?,
        )
    }

    /// Reconstruct `(heads, tokens, dim)` f32 on the block's device (rotated back if the block
    /// was rotated): [`QuantBlock::dequantize_into`] in candle ops (bit for bit, except the
    /// rotation back, to f32 rounding: [`hadamard_rows_gemm`]).
    pub fn dequantize(&self) -> Result<Tensor> {
        dequantize_blocks(&[self])
    }
}

/// Blocks of one kind (same heads, dim, bits, grouping, rotation), reconstructed and
/// concatenated along tokens: `(heads, sum of tokens, dim)` f32 on their device. One unpack and
/// one scale/min application for all of them (per-channel blocks of equal length), so the
/// number of ops does not grow with the number of blocks beyond the concatenations.
pub fn dequantize_blocks(blocks: &[&PackedBlock]) -> Result<Tensor> {
    let Some(first) = blocks.first() else {
        candle_core::bail!("logquant: no blocks to dequantize");
    };
    let same_kind = blocks.iter().all(|b| {
        (b.heads, b.dim, b.bits, b.grouping, b.rotated)
            == (
                first.heads,
                first.dim,
                first.bits,
                first.grouping,
                first.rotated,
            )
    });
    let equal_tokens = blocks.iter().all(|b| b.tokens == first.tokens);
    if !same_kind || (first.grouping == Grouping::PerChannel && !equal_tokens) {
        let parts = blocks
            .iter()
            .map(|b| dequantize_blocks(&[b]))
            .collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&parts, 1);
    }
    let (heads, dim, bits) = (first.heads, first.dim, first.bits);
    let c = consts(first.device())?;
    let cat = |ts: Vec<&Tensor>, axis: usize| -> Result<Tensor> {
        if ts.len() == 1 {
            Ok(ts[0].clone())
        } else {
            Tensor::cat(&ts, axis)
        }
    };
    let codes = cat(blocks.iter().map(|b| &b.codes).collect(), 1)?;
    let tokens = codes.dim(1)?;
    let q = unpack(&codes, bits, dim, &c)?;
    let x = match first.grouping {
        Grouping::PerToken { group } => {
            let p = cat(blocks.iter().map(|b| &b.params).collect(), 1)?.to_dtype(DType::F32)?;
            let (scale, min) = (p.narrow(3, 0, 1)?, p.narrow(3, 1, 1)?);
            q.reshape((heads, tokens, dim / group, group))?
                .broadcast_mul(&scale)?
                .broadcast_add(&min)?
                .reshape((heads, tokens, dim))?
        }
        Grouping::PerChannel => {
            let n = blocks.len();
            let per_block: Vec<Tensor> = blocks
                .iter()
                .map(|b| b.params.unsqueeze(1))
                .collect::<Result<_>>()?;
            let p = cat(per_block.iter().collect(), 1)?.to_dtype(DType::F32)?;
            // (heads, blocks, dim, 2) -> scale and min (heads, blocks, 1, dim).
            let scale = p.narrow(3, 0, 1)?.transpose(2, 3)?.contiguous()?;
            let min = p.narrow(3, 1, 1)?.transpose(2, 3)?.contiguous()?;
            q.reshape((heads, n, first.tokens, dim))?
                .broadcast_mul(&scale)?
                .broadcast_add(&min)?
                .reshape((heads, tokens, dim))?
        }
    };
    if first.rotated {
        hadamard_rows_gemm(&x)
    } else {
        Ok(x)
    }
}

/// [`hadamard_rows`] as one matrix product with the cached `H / sqrt(n)` (symmetric): what
/// dequantization uses every step (one GEMM instead of `3 log2 n` ops). Equal to the butterflies
/// to f32 rounding, not bit for bit (quantization keeps the butterflies, so stored bytes are
/// the reference's exactly).
pub fn hadamard_rows_gemm(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = *dims.last().unwrap_or(&1);
    let h = hadamard_matrix(x.device(), n)?;
    x.reshape((x.elem_count() / n.max(1), n))?
        .matmul(&h)?
        .reshape(dims)
}

/// `H / sqrt(n)` (`n` a power of two) as an f32 `(n, n)` tensor on `device`, built once.
fn hadamard_matrix(device: &Device, n: usize) -> Result<Tensor> {
    static CACHE: Mutex<Vec<(usize, Tensor)>> = Mutex::new(Vec::new());
    if !n.is_power_of_two() {
        candle_core::bail!("logquant: Hadamard order {n} is not a power of two");
    }
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, h)) = cache
        .iter()
        .find(|(m, h)| *m == n && h.device().same_device(device))
    {
        return Ok(h.clone());
    }
    let mut rows = vec![0f32; n * n];
    for (i, row) in rows.chunks_exact_mut(n).enumerate() {
        row[i] = 1.0;
        crate::quant::hadamard_in_place(row);
    }
    note_upload();
    let h = Tensor::from_vec(rows, (n, n), device)?;
    cache.push((n, h.clone()));
    Ok(h)
}

/// `x <- (H / sqrt(n)) x` on every row of the last dimension (`n` a power of two): the
/// butterflies of [`crate::quant::hadamard_in_place`], stage by stage, in candle ops.
pub fn hadamard_rows(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = *dims.last().unwrap_or(&1);
    if !n.is_power_of_two() {
        candle_core::bail!("logquant: Hadamard order {n} is not a power of two");
    }
    let rows = x.elem_count() / n.max(1);
    let mut y = x.reshape((rows, n))?;
    let mut half = 1;
    while half < n {
        let pairs = y.reshape((rows, n / (2 * half), 2, half))?;
        let (a, b) = (pairs.narrow(2, 0, 1)?, pairs.narrow(2, 1, 1)?);
        y = Tensor::cat(&[(&a + &b)?, (&a - &b)?], 2)?.reshape((rows, n))?;
        half *= 2;
    }
    let norm = 1.0 / (n as f32).sqrt();
    y.affine(norm as f64, 0.0)?.reshape(dims)
}

/// NaN read as 0, then clamped to the f16 range (as [`crate::quant::sanitize`]).
fn sanitize(x: &Tensor, c: &Consts) -> Result<Tensor> {
    let not_nan = x.eq(x)?;
    not_nan
        .where_cond(x, &c.zero.broadcast_as(x.shape())?)?
        .broadcast_minimum(&c.f16_max)?
        .broadcast_maximum(&c.neg_f16_max)
}

/// The f16 spacing at `|x|` (`x` finite, within the f16 range): `2^(e - 10)` for
/// `2^e <= |x| < 2^(e + 1)`, `2^-24` below the normal range.
fn f16_spacing(x: &Tensor, c: &Consts) -> Result<Tensor> {
    x.abs()?
        .unsqueeze(D::Minus1)?
        .broadcast_ge(&c.binade_bounds)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&c.binade_spacings)?
        .max_keepdim(D::Minus1)?
        .squeeze(D::Minus1)?
        .broadcast_maximum(&c.min_spacing)
}

/// The largest f16 `<= x`, as f32 (the reference's rounding of a group's minimum).
fn f16_floor(x: &Tensor, c: &Consts) -> Result<Tensor> {
    let u = f16_spacing(x, c)?;
    (x / &u)?.floor()? * u
}

/// The smallest f16 `>= x`, as f32 (the reference's rounding of a scale).
fn f16_ceil(x: &Tensor, c: &Consts) -> Result<Tensor> {
    let u = f16_spacing(x, c)?;
    (x / &u)?.ceil()? * u
}

/// `y` (in `[0, 2^23)`) rounded to an integer, ties to even.
fn round_half_even(y: &Tensor) -> Result<Tensor> {
    y.affine(1.0, ROUND_EVEN)?.affine(1.0, -ROUND_EVEN)
}

/// Codes per packing word (a whole number of bytes) for each width.
fn codes_per_word(bits: u8) -> usize {
    match bits {
        2 => 4,
        3 => 8,
        4 => 2,
        _ => 1,
    }
}

/// Integer-valued f32 codes `(heads, tokens, dim)` packed into u8 `(heads, tokens, row_bytes)`
/// (the layout of [`crate::quant::pack`]).
fn pack(codes: &Tensor, bits: u8, c: &Consts) -> Result<Tensor> {
    let (heads, tokens, dim) = codes.dims3()?;
    if bits == 8 {
        return codes.to_dtype(DType::U8);
    }
    let per_word = codes_per_word(bits);
    let words = codes
        .reshape((heads, tokens, dim / per_word, per_word))?
        .broadcast_mul(c.word_weights(bits))?
        .sum(3)?;
    let word_bytes = per_word * bits as usize / 8;
    let bytes = if word_bytes == 1 {
        words
    } else {
        // Byte k of a word w: floor(w / 256^k) mod 256.
        let parts = (0..word_bytes)
            .map(|k| {
                let shifted = words.affine(256f64.powi(-(k as i32)), 0.0)?.floor()?;
                let high = shifted
                    .affine(1.0 / 256.0, 0.0)?
                    .floor()?
                    .affine(256.0, 0.0)?;
                (shifted - high)?.unsqueeze(3)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 3)?.reshape((heads, tokens, packed_bytes(dim, bits)))?
    };
    bytes.to_dtype(DType::U8)
}

/// Packed u8 rows `(heads, tokens, row_bytes)` to f32 codes `(heads, tokens, dim)`.
fn unpack(codes: &Tensor, bits: u8, dim: usize, c: &Consts) -> Result<Tensor> {
    let (heads, tokens, row_bytes) = codes.dims3()?;
    match bits {
        // u32 ids: candle's index_select writes zeros for an id equal to the id type's
        // maximum (its padding convention), and byte 255 is a valid row of codes.
        2 | 4 => c
            .unpack_table(bits)
            .index_select(&codes.flatten_all()?.to_dtype(DType::U32)?, 0)?
            .reshape((heads, tokens, dim)),
        3 => {
            // Byte k of a 3-byte word holds bits 8k..8k+8 of the 24-bit stream: a table row
            // per (k, byte) gives those bits' share of each of the eight codes. The shares of
            // one code come from different bits, so their sum is the code (exact).
            let ids = codes
                .reshape((heads, tokens, row_bytes / 3, 3))?
                .to_dtype(DType::U32)?
                .broadcast_add(&c.unpack3_offsets)?
                .flatten_all()?;
            c.unpack3
                .index_select(&ids, 0)?
                .reshape((heads * tokens * row_bytes / 3, 3, 8))?
                .sum(1)?
                .reshape((heads, tokens, dim))
        }
        _ => codes.to_dtype(DType::F32),
    }
}

/// Small constant tensors on one device.
struct Consts {
    device: Device,
    /// Shape `(1,)` f32 scalars, broadcast where used.
    zero: Tensor,
    f16_max: Tensor,
    neg_f16_max: Tensor,
    min_spacing: Tensor,
    /// `2^-14 ..= 2^15` and the f16 spacing in each binade, `2^-24 ..= 2^5`.
    binade_bounds: Tensor,
    binade_spacings: Tensor,
    /// `2^bits - 1` for 2, 3, 4, 8 bits.
    max_codes: [Tensor; 4],
    /// `2^(bits * j)` for the codes `j` of a word, for 2, 3, 4 bits.
    word_weights: [Tensor; 3],
    /// Byte value -> its codes, `(256, 4)` for 2 bits and `(256, 2)` for 4 bits.
    unpack2: Tensor,
    unpack4: Tensor,
    /// 3 bits: row `256 k + b` holds the share of byte `b`, at byte `k` of a word, in each of
    /// the word's eight codes, `(768, 8)`; and the row offsets `[0, 256, 512]` (u32).
    unpack3: Tensor,
    unpack3_offsets: Tensor,
}

impl Consts {
    fn new(device: &Device) -> Result<Self> {
        let scalar = |v: f32| Tensor::new(&[v], device);
        let pow2 = |e: i32| 2f32.powi(e);
        let bounds: Vec<f32> = (-14..=15).map(pow2).collect();
        let spacings: Vec<f32> = (-14..=15).map(|e| pow2(e - 10)).collect();
        let weights = |bits: u8| {
            let w: Vec<f32> = (0..codes_per_word(bits))
                .map(|j| pow2((bits as usize * j) as i32))
                .collect();
            Tensor::new(w.as_slice(), device)
        };
        let table = |bits: u8| {
            let per = 8 / bits as usize;
            let t: Vec<f32> = (0..256usize)
                .flat_map(|b| {
                    (0..per).map(move |j| ((b >> (bits as usize * j)) & ((1 << bits) - 1)) as f32)
                })
                .collect();
            Tensor::from_vec(t, (256, per), device)
        };
        Ok(Self {
            device: device.clone(),
            zero: scalar(0.0)?,
            f16_max: scalar(F16_MAX)?,
            neg_f16_max: scalar(-F16_MAX)?,
            min_spacing: scalar(pow2(-24))?,
            binade_bounds: Tensor::new(bounds.as_slice(), device)?,
            binade_spacings: Tensor::new(spacings.as_slice(), device)?,
            max_codes: [
                scalar(max_code(2) as f32)?,
                scalar(max_code(3) as f32)?,
                scalar(max_code(4) as f32)?,
                scalar(max_code(8) as f32)?,
            ],
            word_weights: [weights(2)?, weights(3)?, weights(4)?],
            unpack2: table(2)?,
            unpack4: table(4)?,
            unpack3: {
                let t: Vec<f32> = (0..3usize)
                    .flat_map(|k| {
                        (0..256u32).flat_map(move |b| {
                            (0..8).map(move |j| (((b << (8 * k)) >> (3 * j)) & 7) as f32)
                        })
                    })
                    .collect();
                Tensor::from_vec(t, (768, 8), device)?
            },
            unpack3_offsets: Tensor::new(&[0u32, 256, 512], device)?,
        })
    }

    fn max_code(&self, bits: u8) -> &Tensor {
        match bits {
            2 => &self.max_codes[0],
            3 => &self.max_codes[1],
            4 => &self.max_codes[2],
            _ => &self.max_codes[3],
        }
    }

    fn word_weights(&self, bits: u8) -> &Tensor {
        match bits {
            2 => &self.word_weights[0],
            3 => &self.word_weights[1],
            _ => &self.word_weights[2],
        }
    }

    fn unpack_table(&self, bits: u8) -> &Tensor {
        if bits == 2 {
            &self.unpack2
        } else {
            &self.unpack4
        }
    }
}

/// The constants of `device`, uploaded on first use.
fn consts(device: &Device) -> Result<Arc<Consts>> {
    static CACHE: Mutex<Vec<Arc<Consts>>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = cache.iter().find(|c| c.device.same_device(device)) {
        return Ok(c.clone());
    }
    note_upload();
    let c = Arc::new(Consts::new(device)?);
    cache.push(c.clone());
    Ok(c)
}

/// `0, 1, .., end - 1` as u32 on `device`: a slice of a cached tensor that grows by doubling,
/// so building position indices uploads nothing per step.
pub fn arange_u32(device: &Device, end: usize) -> Result<Tensor> {
    static CACHE: Mutex<Vec<Tensor>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let slot = cache.iter().position(|t| t.device().same_device(device));
    if let Some(t) = slot
        .map(|i| &cache[i])
        .filter(|t| t.dim(0).is_ok_and(|n| n >= end))
    {
        return t.narrow(0, 0, end);
    }
    note_upload();
    let capacity = end.next_power_of_two().max(4096);
    let t = Tensor::arange(0u32, capacity as u32, device)?;
    match slot {
        Some(i) => cache[i] = t.clone(),
        None => cache.push(t.clone()),
    }
    t.narrow(0, 0, end)
}

static DEVICE_QUANTIZATIONS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Blocks quantized with candle ops ([`PackedBlock::quantize`]) in this process: shows which
/// path an engine took.
pub fn device_quantizations() -> usize {
    DEVICE_QUANTIZATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    static UPLOADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Count one host-to-device upload made for the cache on this thread (constants, position
/// indices): [`uploads_on_this_thread`] lets tests check that a decode step makes none.
pub fn note_upload() {
    UPLOADS.with(|u| u.set(u.get() + 1));
}

/// Uploads counted by [`note_upload`] on the calling thread so far.
pub fn uploads_on_this_thread() -> usize {
    UPLOADS.with(|u| u.get())
}

#[cfg(test)]
mod tests {
    //! The device-op quantizer against the scalar reference ([`QuantBlock`], the oracle), on
    //! the CPU: identical codes and f16 parameters, identical reconstructions.

    use super::*;
    use crate::quant::{f16_at_least, f16_at_most};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn host(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// First index where two float slices differ (NaN equal to NaN), with both values.
    fn first_difference(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .enumerate()
            .find(|(_, (x, y))| !(x == y || (x.is_nan() && y.is_nan())))
            .map(|(i, (x, y))| (i, *x, *y))
    }

    /// Quantize `x` with candle ops and with the reference; everything must match exactly.
    #[allow(clippy::too_many_arguments)]
    fn check(
        x: &[f32],
        (heads, tokens, dim): (usize, usize, usize),
        bits: u8,
        grouping: Grouping,
        rotate: bool,
        label: &str,
    ) {
        let t = Tensor::from_vec(x.to_vec(), (heads, tokens, dim), &Device::Cpu).unwrap();
        let block = PackedBlock::quantize(&t, bits, grouping, rotate).unwrap();
        let reference = if rotate {
            QuantBlock::quantize_rotated(x, heads, tokens, dim, bits, grouping)
        } else {
            QuantBlock::quantize(x, heads, tokens, dim, bits, grouping)
        };
        let got = block.to_reference().unwrap();
        if let Some(i) = (0..reference.params.len()).find(|&i| {
            got.params[i].scale.to_bits() != reference.params[i].scale.to_bits()
                && got.params[i].scale != reference.params[i].scale
                || got.params[i].min != reference.params[i].min
        }) {
            panic!(
                "{label}: group {i}: params {:?}, reference {:?}",
                got.params[i], reference.params[i]
            );
        }
        if let Some(i) = (0..reference.codes.len()).find(|&i| got.codes[i] != reference.codes[i]) {
            panic!(
                "{label}: byte {i}: {:#010b}, reference {:#010b}",
                got.codes[i], reference.codes[i]
            );
        }
        assert_eq!(block.bytes(), reference.bytes(), "{label}: bytes");
        let mut want = vec![0f32; x.len()];
        reference.dequantize_into(&mut want);
        let have = host(&block.dequantize().unwrap());
        if rotate {
            // Rotated back by a matrix product instead of the butterflies: equal to f32
            // rounding, relative to the block's largest value (the GEMM sums `dim` terms).
            let scale = want
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()))
                .max(f32::MIN_POSITIVE);
            let bound = 4.0 * dim as f32 * f32::EPSILON * scale;
            for (i, (a, b)) in have.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= bound,
                    "{label}: reconstruction {i}: {a}, reference {b} (bound {bound:e})"
                );
            }
        } else if let Some((i, a, b)) = first_difference(&have, &want) {
            panic!("{label}: reconstruction {i}: {a}, reference {b}");
        }
    }

    fn groupings(dim: usize) -> Vec<Grouping> {
        let mut g = vec![Grouping::PerChannel, Grouping::PerToken { group: dim }];
        if dim >= 16 {
            g.push(Grouping::PerToken { group: 16 });
        }
        g
    }

    #[test]
    fn random_blocks_match_the_reference_byte_for_byte() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
        // Token counts that hit remainders; dims that are powers of two (rotation) and 3-bit
        // friendly (multiples of 8).
        let shapes = [
            (1, 1, 8),
            (2, 17, 64),
            (3, 42, 64),
            (1, 64, 32),
            (2, 5, 128),
        ];
        let mut case = 0;
        for &(heads, tokens, dim) in &shapes {
            for bits in [2u8, 3, 4, 8] {
                for grouping in groupings(dim) {
                    for rotate in [false, true] {
                        let magnitude = [1e-3f32, 1.0, 30.0, 1e4][case % 4];
                        let offset = (rng.random::<f32>() - 0.5) * magnitude;
                        let x: Vec<f32> = (0..heads * tokens * dim)
                            .map(|_| offset + (rng.random::<f32>() - 0.5) * magnitude)
                            .collect();
                        let label = format!(
                            "case {case}: {heads}x{tokens}x{dim} {bits}-bit {grouping:?} \
                             rotate {rotate} magnitude {magnitude}"
                        );
                        check(&x, (heads, tokens, dim), bits, grouping, rotate, &label);
                        case += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn spec_vectors_and_ties_to_even() {
        let codes = |x: &[f32]| {
            let t = Tensor::from_vec(x.to_vec(), (1, 1, 4), &Device::Cpu).unwrap();
            let b = PackedBlock::quantize(&t, 2, Grouping::PerToken { group: 4 }, false).unwrap();
            let r = b.to_reference().unwrap();
            let mut c = vec![0u8; 4];
            crate::quant::unpack(&r.codes, 2, &mut c);
            (c, host(&b.dequantize().unwrap()))
        };
        assert_eq!(
            codes(&[0.0, 1.0, 2.0, 3.0]),
            (vec![0, 1, 2, 3], vec![0.0, 1.0, 2.0, 3.0])
        );
        assert_eq!(
            codes(&[-1.0, 0.2, 0.5, 2.0]),
            (vec![0, 1, 2, 3], vec![-1.0, 0.0, 1.0, 2.0])
        );
        // candle's `round` would give [0, 1, 3, 3]; the spec wants ties to even.
        assert_eq!(codes(&[0.0, 0.5, 2.5, 3.0]).0, vec![0, 0, 2, 3]);
    }

    #[test]
    fn extreme_and_constant_inputs_match_the_reference() {
        let rows: Vec<[f32; 8]> = vec![
            [0.0; 8],
            [1.5; 8],
            [-65504.0; 8],
            [65504.0, -65504.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            [
                1e9,
                -1e9,
                f32::INFINITY,
                f32::NEG_INFINITY,
                0.0,
                1.0,
                -1.0,
                7.0,
            ],
            [f32::NAN, 1.0, 2.0, 3.0, f32::NAN, -2.0, 0.5, 0.25],
            [1e-40, -1e-40, 0.0, 1e-45, 6e-8, 1.2e-7, 5.96e-8, -3e-8],
            [0.0, 0.5, 2.5, 3.0, 0.0, 0.5, 2.5, 3.0],
            [-0.0, 0.0, -0.0, 0.0, 1e-30, -1e-30, 2.0, -2.0],
        ];
        for (i, row) in rows.iter().enumerate() {
            for bits in [2u8, 3, 4, 8] {
                for grouping in [
                    Grouping::PerToken { group: 4 },
                    Grouping::PerToken { group: 8 },
                ] {
                    let label = format!("row {i} {bits}-bit {grouping:?}");
                    check(row, (1, 1, 8), bits, grouping, false, &label);
                }
            }
        }
        // Per channel: the same rows as tokens of one head.
        let x: Vec<f32> = rows.iter().flatten().copied().collect();
        for bits in [2u8, 3, 4, 8] {
            for rotate in [false, true] {
                let label = format!("per-channel {bits}-bit rotate {rotate}");
                check(
                    &x,
                    (1, rows.len(), 8),
                    bits,
                    Grouping::PerChannel,
                    rotate,
                    &label,
                );
            }
        }
    }

    #[test]
    fn f16_rounding_matches_the_reference_at_every_f16() {
        // Every finite f16, and the f32 neighbours on both sides of it.
        let mut xs = Vec::new();
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            if !h.is_finite() {
                continue;
            }
            let x = h.to_f32();
            for y in [
                x,
                f32::from_bits(x.to_bits() + 1),
                f32::from_bits(x.to_bits().max(1) - 1),
            ] {
                if y.is_finite() && y.abs() <= F16_MAX {
                    xs.push(y);
                }
            }
        }
        let c = consts(&Device::Cpu).unwrap();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let floor = host(&f16_floor(&t, &c).unwrap());
        let ceil = host(&f16_ceil(&t, &c).unwrap());
        for (i, &x) in xs.iter().enumerate() {
            assert_eq!(floor[i], f16_at_most(x).to_f32(), "floor of {x:e}");
            if x >= 0.0 {
                assert_eq!(ceil[i], f16_at_least(x).to_f32(), "ceil of {x:e}");
            }
        }
    }

    #[test]
    fn rounding_is_half_to_even_over_the_code_range() {
        let mut ys: Vec<f32> = (0..=4 * 256).map(|k| k as f32 / 4.0).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        ys.extend((0..10_000).map(|_| rng.random::<f32>() * 256.0));
        let t = Tensor::new(ys.as_slice(), &Device::Cpu).unwrap();
        let got = host(&round_half_even(&t).unwrap());
        for (y, g) in ys.iter().zip(&got) {
            assert_eq!(*g, y.round_ties_even(), "{y}");
        }
    }

    #[test]
    fn hadamard_gemm_equals_the_host_transform_to_rounding() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for n in [1usize, 2, 8, 64, 128] {
            let x: Vec<f32> = (0..5 * n)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect();
            let mut want = x.clone();
            crate::quant::hadamard_rows(&mut want, n);
            let t = Tensor::from_vec(x, (5, n), &Device::Cpu).unwrap();
            let got = host(&hadamard_rows_gemm(&t).unwrap());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6, "n {n} index {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn hadamard_ops_equal_the_host_transform() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for n in [1usize, 2, 8, 64, 128] {
            let x: Vec<f32> = (0..3 * n)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect();
            let mut want = x.clone();
            crate::quant::hadamard_rows(&mut want, n);
            let t = Tensor::from_vec(x, (3, n), &Device::Cpu).unwrap();
            let got = host(&hadamard_rows(&t).unwrap());
            assert_eq!(first_difference(&got, &want), None, "n {n}");
        }
    }

    #[test]
    fn many_blocks_dequantize_as_their_concatenation() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (heads, dim) = (2, 32);
        for bits in [2u8, 3, 4, 8] {
            for (grouping, lengths) in [
                (Grouping::PerChannel, vec![16, 16, 16]),
                (Grouping::PerToken { group: 16 }, vec![5, 1, 17]),
            ] {
                let mut blocks = Vec::new();
                let mut want = vec![Vec::new(); heads];
                for &tokens in &lengths {
                    let x: Vec<f32> = (0..heads * tokens * dim)
                        .map(|_| rng.random::<f32>() * 4.0 - 2.0)
                        .collect();
                    let r = QuantBlock::quantize(&x, heads, tokens, dim, bits, grouping);
                    let mut out = vec![0f32; x.len()];
                    r.dequantize_into(&mut out);
                    for (h, w) in want.iter_mut().enumerate() {
                        w.extend_from_slice(&out[h * tokens * dim..(h + 1) * tokens * dim]);
                    }
                    blocks.push(PackedBlock::from_reference(r, &Device::Cpu).unwrap());
                }
                let refs: Vec<&PackedBlock> = blocks.iter().collect();
                let got = host(&dequantize_blocks(&refs).unwrap());
                let want: Vec<f32> = want.concat();
                assert_eq!(
                    first_difference(&got, &want),
                    None,
                    "{bits}-bit {grouping:?}"
                );
            }
        }
    }

    #[test]
    fn cpu_bytes_are_the_reference_bytes_in_place() {
        let x: Vec<f32> = (0..2 * 3 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
        for grouping in [Grouping::PerToken { group: 8 }, Grouping::PerChannel] {
            let r = QuantBlock::quantize(&x, 2, 3, 16, 2, grouping);
            let block = PackedBlock::from_reference(r.clone(), &Device::Cpu).unwrap();
            let copy = block.clone();
            drop(block);
            let bytes = copy.cpu_bytes().unwrap();
            assert_eq!(bytes.codes, r.codes.as_slice());
            assert_eq!(bytes.params, r.params.as_slice());
            // The slices are the tensors' storage, not a copy.
            for (t, ptr) in [
                (&copy.codes, bytes.codes.as_ptr()),
                (&copy.params, bytes.params.as_ptr().cast::<u8>()),
            ] {
                let (storage, _) = t.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    unreachable!()
                };
                let start = match cpu {
                    CpuStorage::U8(v) => v.as_ptr(),
                    CpuStorage::F16(v) => v.as_ptr().cast::<u8>(),
                    _ => unreachable!(),
                };
                assert_eq!(start, ptr);
            }
        }
    }

    #[test]
    fn every_byte_unpacks_like_the_reference() {
        let c = consts(&Device::Cpu).unwrap();
        // All 256 byte values (255 included: candle's index_select pads a maximal id), and
        // for 3 bits every byte in every position of a 3-byte word.
        let all: Vec<u8> = (0..=255).collect();
        let mut triples = Vec::new();
        for b in 0..=255u8 {
            triples.extend_from_slice(&[b, b.wrapping_mul(7), 255 - b]);
            triples.extend_from_slice(&[255 - b, b, b.wrapping_add(85)]);
        }
        for (bits, bytes) in [(2u8, &all), (4, &all), (8, &all), (3, &triples)] {
            let dim = bytes.len() * 8 / bits as usize;
            let t = Tensor::from_vec(bytes.clone(), (1, 1, bytes.len()), &Device::Cpu).unwrap();
            let got = host(&unpack(&t, bits, dim, &c).unwrap());
            let mut want = vec![0u8; dim];
            crate::quant::unpack(bytes, bits, &mut want);
            let want: Vec<f32> = want.iter().map(|&w| w as f32).collect();
            assert_eq!(first_difference(&got, &want), None, "{bits}-bit");
        }
    }
}
