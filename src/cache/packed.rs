//! Quantized blocks as candle tensors on the model's device ([`PackedBlock`]), with a quantizer
//! and a dequantizer written in candle ops that every backend has (CPU, CUDA, Metal).
//!
//! The encoding is [`crate::quant`]'s, byte for byte (codes, f16 scale and minimum, packing);
//! on the CPU these ops give exactly the scalar reference's bytes and values (tested against
//! [`crate::quant::QuantBlock`], the oracle). The steps (f16 rounding, round half to even,
//! packing and unpacking, the Hadamard rotation) are portable building blocks in
//! [`crate::device_ops`], whose documentation says how each is built; one step is built here:
//!
//! - `range / (2^bits - 1)`: a tensor division (candle's `tensor / f64` multiplies by the
//!   reciprocal, which rounds differently from the reference's division).
//!
//! Nothing here reads tensor data back to the host. On the CPU, [`PackedBlock::cpu_bytes`] lends
//! the fused kernel the tensors' own bytes (no copy, no lock).

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};
use half::f16;

use crate::device_ops::{
    consts, f16_ceil, f16_floor, pack, round_half_even, sanitize, unpack, DEVICE_QUANTIZATIONS,
};
use crate::quant::{packed_bytes, GroupParams, Grouping, QuantBlock};

// Public before these moved to `device_ops`: `mistralrs_logquant::packed::...` keeps working.
pub use crate::device_ops::{
    arange_u32, device_quantizations, hadamard_rows, hadamard_rows_gemm, note_upload,
    uploads_on_this_thread,
};

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

#[cfg(test)]
mod tests {
    //! The device-op quantizer against the scalar reference ([`QuantBlock`], the oracle), on
    //! the CPU: identical codes and f16 parameters, identical reconstructions.

    use super::*;
    use crate::device_ops::tests::{first_difference, host};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

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
}
