//! The portable candle-op building blocks of [`crate::packed`]'s quantizer and dequantizer:
//! f16 rounding, rounding half to even, packing and unpacking codes, the Hadamard rotation, the
//! small constants they use (per device) and a cached position index ([`arange_u32`]); and the
//! counters that show which path ran and what was uploaded ([`device_quantizations`],
//! [`note_upload`]).
//!
//! Every step is made of candle ops that every backend has (CPU, CUDA, Metal) and, on the CPU,
//! gives the host's results ([`crate::quant`]) bit for bit, except the rotation back (equal to
//! f32 rounding); the tests here check each against the host. How each step is built from
//! portable ops:
//!
//! - f16 rounding of the minimum (down) and the scale (up): the f16 spacing `u` at `|x|` comes
//!   from comparing `|x|` with the binade bounds `2^-14 ..= 2^15`; `floor(x / u) * u` and
//!   `ceil(x / u) * u` are then exact in f32 (divisions by powers of two).
//! - Round half to even (the spec's rounding): candle's `round` rounds halves away from zero,
//!   so it is not used. For `0 <= y < 2^23`, `(y + 2^23) - 2^23` in f32 is `y` rounded to an
//!   integer with ties to even (IEEE round-to-nearest-even at a spacing of 1): two `affine` ops.
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
//! tensor data back to the host.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor, D};

use crate::quant::{max_code, packed_bytes, F16_MAX};

/// `2^23`: adding and subtracting it rounds a float in `[0, 2^23)` to an integer, ties to even.
const ROUND_EVEN: f64 = 8_388_608.0;

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
pub(crate) fn sanitize(x: &Tensor, c: &Consts) -> Result<Tensor> {
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
pub(crate) fn f16_floor(x: &Tensor, c: &Consts) -> Result<Tensor> {
    let u = f16_spacing(x, c)?;
    (x / &u)?.floor()? * u
}

/// The smallest f16 `>= x`, as f32 (the reference's rounding of a scale).
pub(crate) fn f16_ceil(x: &Tensor, c: &Consts) -> Result<Tensor> {
    let u = f16_spacing(x, c)?;
    (x / &u)?.ceil()? * u
}

/// `y` (in `[0, 2^23)`) rounded to an integer, ties to even.
pub(crate) fn round_half_even(y: &Tensor) -> Result<Tensor> {
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
pub(crate) fn pack(codes: &Tensor, bits: u8, c: &Consts) -> Result<Tensor> {
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
pub(crate) fn unpack(codes: &Tensor, bits: u8, dim: usize, c: &Consts) -> Result<Tensor> {
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
pub(crate) struct Consts {
    device: Device,
    /// Shape `(1,)` f32 scalars, broadcast where used.
    pub(crate) zero: Tensor,
    pub(crate) f16_max: Tensor,
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

    pub(crate) fn max_code(&self, bits: u8) -> &Tensor {
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
pub(crate) fn consts(device: &Device) -> Result<Arc<Consts>> {
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

pub(crate) static DEVICE_QUANTIZATIONS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Blocks quantized with candle ops ([`crate::packed::PackedBlock::quantize`]) in this
/// process: shows which path an engine took.
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
pub(crate) mod tests {
    //! The building blocks against the host's ([`crate::quant`]) on the CPU: f16 rounding at
    //! every f16, ties to even, both Hadamard forms, unpacking of every byte.

    use super::*;
    use crate::quant::{f16_at_least, f16_at_most};
    use half::f16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A tensor's elements as f32 on the host (shared with `packed`'s tests).
    pub(crate) fn host(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// First index where two float slices differ (NaN equal to NaN), with both values.
    pub(crate) fn first_difference(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .enumerate()
            .find(|(_, (x, y))| !(x == y || (x.is_nan() && y.is_nan())))
            .map(|(i, (x, y))| (i, *x, *y))
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
