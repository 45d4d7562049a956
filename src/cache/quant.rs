//! Scalar reference quantization: the bit encoding, stated once, and the packed block layout
//! that every attention path reads.
//!
//! Encoding (asymmetric min/max, unsigned codes, `bits` in {2, 3, 4, 8}):
//!
//! ```text
//! scale = (max - min) / (2^bits - 1)
//! code  = clamp(round_ties_even((x - min) / scale), 0, 2^bits - 1)     (scale == 0: code 0)
//! x_hat = code * scale + min
//! ```
//!
//! `scale` and `min` are stored as f16. `min` is rounded down and `scale` up to the next f16,
//! so every input lies inside the stored range and `|x - x_hat| <= scale / 2` holds with the
//! stored values (plus f32 rounding). Inputs are first clamped to the finite f16 range
//! (+-65504) and NaN is read as 0, so codes and scales are always finite.
//!
//! Packing: a row is a little-endian bit stream; code `i` occupies bits
//! `bits * i .. bits * (i + 1)`, i.e. byte `bits * i / 8` from bit `bits * i % 8`, continuing
//! into the next byte when it does not fit. For 2, 4 and 8 bits no code straddles a byte (four
//! 2-bit codes per byte, low bits first); 3-bit codes pack 8 to 3 bytes, so a row needs
//! `bits * dim` divisible by 8.
//!
//! Rotation (optional, [`QuantBlock::quantize_rotated`]): each row is multiplied by the
//! normalized Hadamard matrix `H / sqrt(dim)` ([`hadamard_in_place`]) before quantizing.
//! `H / sqrt(dim)` is symmetric and orthogonal, so it is its own inverse: dequantizing applies
//! it again, and `q . k = (H q) . (H k)` lets attention score rotated keys with a rotated query.

use half::f16;

/// Largest magnitude stored: the f16 range.
pub const F16_MAX: f32 = 65504.0;

/// Bytes that `codes` packed codes of `bits` bits take (`codes * bits` a multiple of 8).
pub const fn packed_bytes(codes: usize, bits: u8) -> usize {
    codes * bits as usize / 8
}

/// Largest code.
pub const fn max_code(bits: u8) -> u8 {
    ((1u16 << bits) - 1) as u8
}

/// Scale and minimum of one group. `#[repr(C)]`: the f16 pair a device block stores
/// ([`crate::packed::PackedBlock::params`]) is read as this type on the CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct GroupParams {
    pub scale: f16,
    pub min: f16,
}

/// The largest f16 that is <= x (x finite, within the f16 range).
pub(crate) fn f16_at_most(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() <= x {
        return h;
    }
    step_down(h)
}

/// The smallest f16 that is >= x (x finite, within the f16 range).
pub(crate) fn f16_at_least(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        return h;
    }
    step_up(h)
}

fn step_down(h: f16) -> f16 {
    let bits = h.to_bits();
    if bits == 0x0000 || bits == 0x8000 {
        f16::from_bits(0x8001)
    } else if bits & 0x8000 == 0 {
        f16::from_bits(bits - 1)
    } else {
        f16::from_bits(bits + 1)
    }
}

fn step_up(h: f16) -> f16 {
    let bits = h.to_bits();
    if bits == 0x0000 || bits == 0x8000 {
        f16::from_bits(0x0001)
    } else if bits & 0x8000 == 0 {
        f16::from_bits(bits + 1)
    } else {
        f16::from_bits(bits - 1)
    }
}

/// The value actually quantized: clamped to the f16 range, NaN read as 0.
#[inline]
pub fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-F16_MAX, F16_MAX)
    }
}

/// Group parameters for values produced by `values` (any order).
pub fn group_params(values: impl Iterator<Item = f32>, bits: u8) -> GroupParams {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for x in values {
        let x = sanitize(x);
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        return GroupParams {
            scale: f16::ZERO,
            min: f16::ZERO,
        };
    }
    let min = f16_at_most(lo);
    let range = hi - min.to_f32();
    let scale = if range <= 0.0 {
        f16::ZERO
    } else {
        f16_at_least((range / max_code(bits) as f32).min(F16_MAX))
    };
    GroupParams { scale, min }
}

/// The code of `x` under `params`.
#[inline]
pub fn quantize_value(x: f32, params: GroupParams, bits: u8) -> u8 {
    let scale = params.scale.to_f32();
    if scale == 0.0 {
        return 0;
    }
    let q = ((sanitize(x) - params.min.to_f32()) / scale).round_ties_even();
    q.clamp(0.0, max_code(bits) as f32) as u8
}

/// The reconstruction of `code` under `params`.
#[inline]
pub fn dequantize_value(code: u8, params: GroupParams) -> f32 {
    code as f32 * params.scale.to_f32() + params.min.to_f32()
}

/// Quantize one contiguous group: unpacked codes into `codes` (same length as `x`).
pub fn quantize_group(x: &[f32], bits: u8, codes: &mut [u8]) -> GroupParams {
    let params = group_params(x.iter().copied(), bits);
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = quantize_value(v, params, bits);
    }
    params
}

/// Pack unpacked `codes` into `out` (`packed_bytes(codes.len(), bits)` bytes).
pub fn pack(codes: &[u8], bits: u8, out: &mut [u8]) {
    debug_assert_eq!(codes.len() * bits as usize, out.len() * 8);
    out.fill(0);
    for (i, &c) in codes.iter().enumerate() {
        let bit = bits as usize * i;
        let (byte, shift) = (bit / 8, bit % 8);
        let wide = ((c & max_code(bits)) as u16) << shift;
        out[byte] |= wide as u8;
        if shift + bits as usize > 8 {
            out[byte + 1] |= (wide >> 8) as u8;
        }
    }
}

/// The code at index `i` of a packed row.
#[inline]
pub fn unpack_one(packed: &[u8], bits: u8, i: usize) -> u8 {
    let bit = bits as usize * i;
    let (byte, shift) = (bit / 8, bit % 8);
    let mut wide = packed[byte] as u16;
    if shift + bits as usize > 8 {
        wide |= (packed[byte + 1] as u16) << 8;
    }
    ((wide >> shift) as u8) & max_code(bits)
}

/// `x <- (H / sqrt(n)) x` for the Sylvester-Hadamard matrix `H` of order `n = x.len()` (a
/// power of two): the fast Walsh-Hadamard transform, `n log2 n` additions. Orthogonal and
/// symmetric, so applying it twice gives `x` back (up to f32 rounding).
pub fn hadamard_in_place(x: &mut [f32]) {
    let n = x.len();
    assert!(
        n.is_power_of_two(),
        "Hadamard order {n} is not a power of two"
    );
    let mut half = 1;
    while half < n {
        for block in x.chunks_exact_mut(2 * half) {
            let (a, b) = block.split_at_mut(half);
            for (a, b) in a.iter_mut().zip(b.iter_mut()) {
                let (x, y) = (*a, *b);
                *a = x + y;
                *b = x - y;
            }
        }
        half *= 2;
    }
    let norm = 1.0 / (n as f32).sqrt();
    for v in x.iter_mut() {
        *v *= norm;
    }
}

/// [`hadamard_in_place`] on every `dim`-long row of `x`.
pub fn hadamard_rows(x: &mut [f32], dim: usize) {
    for row in x.chunks_exact_mut(dim) {
        hadamard_in_place(row);
    }
}

/// Unpack `out.len()` codes from `packed`.
pub fn unpack(packed: &[u8], bits: u8, out: &mut [u8]) {
    for (i, c) in out.iter_mut().enumerate() {
        *c = unpack_one(packed, bits, i);
    }
}

/// How a block's scale/min groups are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// Groups of `group` consecutive channels of one token: params `[head][token][dim / group]`.
    PerToken { group: usize },
    /// One group per channel over all tokens of the block: params `[head][dim]`.
    PerChannel,
}

/// A block of `tokens` quantized rows for `heads` heads of `dim` channels.
///
/// Codes are token-major, `[head][token][dim * bits / 8]`, for every grouping, so a
/// kernel reads one token's codes contiguously whatever the grouping.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantBlock {
    pub heads: usize,
    pub tokens: usize,
    pub dim: usize,
    pub bits: u8,
    pub grouping: Grouping,
    /// Rows were rotated by `H / sqrt(dim)` before quantizing (see the module docs).
    pub rotated: bool,
    pub codes: Vec<u8>,
    pub params: Vec<GroupParams>,
}

/// Compile-time check of the stored sizes that the byte accounting relies on.
const _: () = assert!(std::mem::size_of::<GroupParams>() == 4);

impl QuantBlock {
    /// Quantize `x`, laid out `[head][token][dim]`.
    pub fn quantize(
        x: &[f32],
        heads: usize,
        tokens: usize,
        dim: usize,
        bits: u8,
        grouping: Grouping,
    ) -> Self {
        assert_eq!(x.len(), heads * tokens * dim, "block shape");
        assert!(
            (dim * bits as usize).is_multiple_of(8),
            "{bits}-bit rows of {dim} codes do not fill whole bytes"
        );
        let row_bytes = packed_bytes(dim, bits);
        let mut codes = vec![0u8; heads * tokens * row_bytes];
        let mut unpacked = vec![0u8; dim];
        let params = match grouping {
            Grouping::PerToken { group } => {
                assert!(
                    group > 0 && dim.is_multiple_of(group),
                    "group {group} must divide dim {dim}"
                );
                let mut params = Vec::with_capacity(heads * tokens * (dim / group));
                for (row, out) in x.chunks(dim).zip(codes.chunks_mut(row_bytes)) {
                    for (g, c) in row.chunks(group).zip(unpacked.chunks_mut(group)) {
                        params.push(quantize_group(g, bits, c));
                    }
                    pack(&unpacked, bits, out);
                }
                params
            }
            Grouping::PerChannel => {
                let mut params = Vec::with_capacity(heads * dim);
                for h in 0..heads {
                    let head = &x[h * tokens * dim..(h + 1) * tokens * dim];
                    let first = params.len();
                    for c in 0..dim {
                        params.push(group_params((0..tokens).map(|t| head[t * dim + c]), bits));
                    }
                    let head_params = &params[first..];
                    for t in 0..tokens {
                        for c in 0..dim {
                            unpacked[c] = quantize_value(head[t * dim + c], head_params[c], bits);
                        }
                        let row = (h * tokens + t) * row_bytes;
                        pack(&unpacked, bits, &mut codes[row..row + row_bytes]);
                    }
                }
                params
            }
        };
        Self {
            heads,
            tokens,
            dim,
            bits,
            grouping,
            rotated: false,
            codes,
            params,
        }
    }

    /// [`QuantBlock::quantize`] of the rows rotated by `H / sqrt(dim)` (`dim` a power of two).
    pub fn quantize_rotated(
        x: &[f32],
        heads: usize,
        tokens: usize,
        dim: usize,
        bits: u8,
        grouping: Grouping,
    ) -> Self {
        let mut rotated = x.to_vec();
        hadamard_rows(&mut rotated, dim);
        Self {
            rotated: true,
            ..Self::quantize(&rotated, heads, tokens, dim, bits, grouping)
        }
    }

    /// Packed bytes of one token row.
    pub fn row_bytes(&self) -> usize {
        packed_bytes(self.dim, self.bits)
    }

    /// The packed codes of `token` of `head`.
    pub fn row(&self, head: usize, token: usize) -> &[u8] {
        let n = self.row_bytes();
        let start = (head * self.tokens + token) * n;
        &self.codes[start..start + n]
    }

    /// The parameters of channel `channel` of `token` of `head`.
    #[inline]
    pub fn params_at(&self, head: usize, token: usize, channel: usize) -> GroupParams {
        match self.grouping {
            Grouping::PerToken { group } => {
                let groups = self.dim / group;
                self.params[(head * self.tokens + token) * groups + channel / group]
            }
            Grouping::PerChannel => self.params[head * self.dim + channel],
        }
    }

    /// Reconstruct into `out`, laid out `[head][token][dim]` (rotated back if the block was
    /// rotated).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        dequantize_rows(
            &self.codes,
            &self.params,
            BlockShape {
                heads: self.heads,
                tokens: self.tokens,
                dim: self.dim,
                bits: self.bits,
                grouping: self.grouping,
                rotated: self.rotated,
            },
            out,
        );
    }

    /// Bytes held: packed codes plus 16-bit scale and min per group.
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.params.len() * std::mem::size_of::<GroupParams>()
    }
}

/// The shape and encoding of a block whose bytes live elsewhere (see [`dequantize_rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub heads: usize,
    pub tokens: usize,
    pub dim: usize,
    pub bits: u8,
    pub grouping: Grouping,
    pub rotated: bool,
}

/// [`QuantBlock::dequantize_into`] over borrowed codes and parameters laid out as a
/// [`QuantBlock`]'s: `out` is `[head][token][dim]`.
pub fn dequantize_rows(codes: &[u8], params: &[GroupParams], shape: BlockShape, out: &mut [f32]) {
    let BlockShape {
        heads,
        tokens,
        dim,
        bits,
        grouping,
        rotated,
    } = shape;
    assert_eq!(out.len(), heads * tokens * dim, "output shape");
    let row_bytes = packed_bytes(dim, bits);
    let mut unpacked = vec![0u8; dim];
    for h in 0..heads {
        for t in 0..tokens {
            let row = (h * tokens + t) * row_bytes;
            unpack(&codes[row..row + row_bytes], bits, &mut unpacked);
            let base = (h * tokens + t) * dim;
            for (c, &code) in unpacked.iter().enumerate() {
                let p = match grouping {
                    Grouping::PerToken { group } => {
                        params[(h * tokens + t) * (dim / group) + c / group]
                    }
                    Grouping::PerChannel => params[h * dim + c],
                };
                out[base + c] = dequantize_value(code, p);
            }
        }
    }
    if rotated {
        hadamard_rows(out, dim);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn roundtrip(x: &[f32], bits: u8) -> (Vec<u8>, Vec<f32>) {
        let mut codes = vec![0u8; x.len()];
        let p = quantize_group(x, bits, &mut codes);
        let hat = codes.iter().map(|&c| dequantize_value(c, p)).collect();
        (codes, hat)
    }

    #[test]
    fn spec_vectors() {
        assert_eq!(
            roundtrip(&[0.0, 1.0, 2.0, 3.0], 2),
            (vec![0, 1, 2, 3], vec![0.0, 1.0, 2.0, 3.0])
        );
        assert_eq!(
            roundtrip(&[-1.0, 0.2, 0.5, 2.0], 2),
            (vec![0, 1, 2, 3], vec![-1.0, 0.0, 1.0, 2.0])
        );
        // Ties go to even: 0.5 -> 0 and 2.5 -> 2 (f32::round would give 1 and 3).
        assert_eq!(roundtrip(&[0.0, 0.5, 2.5, 3.0], 2).0, vec![0, 0, 2, 3]);
    }

    #[test]
    fn constant_groups_are_exact_and_finite() {
        for v in [0.0f32, 1.5, -7.25, 65504.0, -65504.0] {
            let (codes, hat) = roundtrip(&[v; 8], 2);
            assert_eq!(codes, vec![0; 8]);
            assert!(hat.iter().all(|&h| h == v), "{v}: {hat:?}");
        }
    }

    #[test]
    fn packing_layout_is_little_endian_within_a_byte() {
        let mut out = [0u8; 1];
        pack(&[1, 2, 3, 0], 2, &mut out);
        assert_eq!(out[0], 0b00_11_10_01);
        let mut out = [0u8; 1];
        pack(&[0xA, 0x5], 4, &mut out);
        assert_eq!(out[0], 0x5A);
    }

    #[test]
    fn per_channel_block_groups_over_tokens() {
        // One head, 4 tokens, 4 channels; channel c holds c * [0, 1, 2, 3].
        let mut x = vec![0f32; 16];
        for t in 0..4 {
            for c in 0..4 {
                x[t * 4 + c] = (c * t) as f32;
            }
        }
        let block = QuantBlock::quantize(&x, 1, 4, 4, 2, Grouping::PerChannel);
        let mut out = vec![0f32; 16];
        block.dequantize_into(&mut out);
        assert_eq!(out, x, "each channel spans exactly four levels");
        assert_eq!(block.bytes(), 4 + 4 * 4);
    }

    /// Seeded, platform-independent inputs for the property tests.
    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn error_is_at_most_half_a_step_for_random_groups() {
        let mut rng = rng(0x2545_F491_4F6C_DD1D);
        for case in 0..2000 {
            let bits = [2u8, 3, 4, 8][case % 4];
            let len = 4 * rng.random_range(1..=32);
            let magnitude = [1e-3f32, 1.0, 30.0, 1e4][(case / 4) % 4];
            let offset = (rng.random::<f32>() - 0.5) * magnitude;
            let x: Vec<f32> = (0..len)
                .map(|_| offset + (rng.random::<f32>() - 0.5) * magnitude)
                .collect();
            let mut codes = vec![0u8; len];
            let p = quantize_group(&x, bits, &mut codes);
            let half_step = p.scale.to_f32() / 2.0;
            for (i, (&v, &c)) in x.iter().zip(&codes).enumerate() {
                assert!(c <= max_code(bits));
                let err = (v - dequantize_value(c, p)).abs();
                // f32 rounding of code * scale + min, relative to the values involved.
                let slack = 4.0
                    * f32::EPSILON
                    * (v.abs() + p.min.to_f32().abs() + p.scale.to_f32() * max_code(bits) as f32);
                assert!(
                    err <= half_step + slack,
                    "case {case} bits {bits} index {i}: |{v} - x_hat| = {err} > {half_step}"
                );
            }
        }
    }

    #[test]
    fn three_bit_codes_straddle_bytes_little_endian() {
        // Codes 0..8 at bit offsets 0, 3, ..., 21 of a 24-bit little-endian stream.
        let codes: Vec<u8> = (0..8).collect();
        let mut out = [0u8; 3];
        pack(&codes, 3, &mut out);
        let stream = codes
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (c as u32) << (3 * i));
        assert_eq!(
            out,
            [stream as u8, (stream >> 8) as u8, (stream >> 16) as u8]
        );
        assert_eq!(out[0], 0b10_001_000, "code 2's low bits share byte 0");
    }

    #[test]
    fn hadamard_is_orthogonal_and_its_own_inverse() {
        let mut rng = rng(11);
        for n in [1usize, 2, 8, 64, 128] {
            let x: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let mut y = x.clone();
            hadamard_in_place(&mut y);
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            assert!(
                (norm(&x) - norm(&y)).abs() <= 1e-5 * norm(&x).max(1.0),
                "n {n}: norm"
            );
            hadamard_in_place(&mut y);
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                assert!((a - b).abs() < 1e-6, "n {n} index {i}: {a} vs {b}");
            }
        }
        // Against the matrix itself: row i of H / sqrt(n) is +-1 / sqrt(n) with the sign of
        // (-1)^popcount(i & j).
        let n = 16;
        for i in 0..n {
            let mut e = vec![0f32; n];
            e[i] = 1.0;
            hadamard_in_place(&mut e);
            for (j, v) in e.iter().enumerate() {
                let sign = if (i & j).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                };
                assert!((v - sign / 4.0).abs() < 1e-7, "H[{j}][{i}] = {v}");
            }
        }
    }

    #[test]
    fn rotated_blocks_dequantize_back_to_the_original_space() {
        let mut rng = rng(3);
        let (heads, tokens, dim) = (2, 5, 32);
        let x: Vec<f32> = (0..heads * tokens * dim)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        for grouping in [Grouping::PerChannel, Grouping::PerToken { group: 16 }] {
            // 8 bits: small error, so the rotation back must be right for the error to be small.
            let block = QuantBlock::quantize_rotated(&x, heads, tokens, dim, 8, grouping);
            let mut out = vec![0f32; x.len()];
            block.dequantize_into(&mut out);
            let err = x
                .iter()
                .zip(&out)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(block.rotated && err < 0.02, "{grouping:?}: error {err}");
        }
    }

    #[test]
    fn packing_round_trips_for_every_width() {
        let mut rng = rng(7);
        for bits in [2u8, 3, 4, 8] {
            let codes: Vec<u8> = (0..256)
                .map(|_| rng.random_range(0..=max_code(bits)))
                .collect();
            let mut packed = vec![0u8; packed_bytes(codes.len(), bits)];
            pack(&codes, bits, &mut packed);
            let mut back = vec![0u8; codes.len()];
            unpack(&packed, bits, &mut back);
            assert_eq!(back, codes, "bits {bits}");
        }
    }

    #[test]
    fn extreme_inputs_stay_finite() {
        let cases: Vec<Vec<f32>> = vec![
            vec![0.0; 4],
            vec![65504.0, -65504.0, 0.0, 1.0],
            vec![1e9, -1e9, f32::INFINITY, f32::NEG_INFINITY],
            vec![f32::NAN, 1.0, 2.0, 3.0],
            vec![1e-40, -1e-40, 0.0, 1e-45],
            vec![6e-8, 1.2e-7, 0.0, 5.96e-8],
        ];
        for x in cases {
            for bits in [2u8, 3, 4, 8] {
                let mut codes = vec![0u8; x.len()];
                let p = quantize_group(&x, bits, &mut codes);
                assert!(
                    p.scale.to_f32().is_finite() && p.min.to_f32().is_finite(),
                    "{x:?}"
                );
                for (&v, &c) in x.iter().zip(&codes) {
                    let hat = dequantize_value(c, p);
                    assert!(hat.is_finite(), "{x:?} -> {hat}");
                    let err = (sanitize(v) - hat).abs();
                    assert!(
                        err <= p.scale.to_f32() / 2.0 + 1e-3 * sanitize(v).abs().max(1e-6),
                        "{x:?}: {v} -> {hat}"
                    );
                }
            }
        }
    }
}
