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
//! The reference is [`crate::reference::naive_attention`] over the dequantized layout.
//!
//! Work is split into spans of at most a few hundred tokens of one (sequence, kv head), so both
//! cores have work even at batch 1 (SmolLM2 has 3 kv heads); each span keeps its own softmax
//! state (max, sum, unnormalized output) and the spans are merged exactly, as in flash decoding.
//!
//! The inner loops are plain Rust written so that LLVM vectorizes them (fixed-width chunks,
//! independent accumulators). They are compiled twice: for the baseline target and, picked at
//! run time, with AVX2 and FMA ([`SimdTier`]).

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::packed::BlockBytes;
use crate::quant::Grouping;
use crate::store::SeqLayerStore;

/// Instruction-set tier of the kernel's inner loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdTier {
    /// Whatever the build target guarantees (SSE2 on x86-64).
    Baseline,
    /// x86-64 with AVX2 and FMA, detected at run time.
    Avx2Fma,
}

impl SimdTier {
    /// The best tier this CPU supports.
    pub fn detected() -> Self {
        static DETECTED: std::sync::LazyLock<SimdTier> = std::sync::LazyLock::new(|| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return SimdTier::Avx2Fma;
            }
            SimdTier::Baseline
        });
        *DETECTED
    }

    /// Every tier this CPU can run, baseline first (for tests that compare them).
    pub fn available() -> Vec<Self> {
        let mut tiers = vec![Self::Baseline];
        if Self::detected() == Self::Avx2Fma {
            tiers.push(Self::Avx2Fma);
        }
        tiers
    }
}

/// How [`attend_decode_with`] runs: the SIMD tier and the most tokens one task scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPlan {
    pub tier: SimdTier,
    pub span_tokens: usize,
}

impl Default for KernelPlan {
    fn default() -> Self {
        Self {
            tier: SimdTier::detected(),
            // Scores of a span (query heads x tokens) stay in L1; enough tasks at batch 1.
            span_tokens: 512,
        }
    }
}

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
#[inline(always)]
fn unpack_row<const FMA: bool>(table: &Unpack, packed: &[u8], bits: u8, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if FMA && bits == 8 {
        // SAFETY: as in `dot`.
        return unsafe { avx2::unpack_row8(packed, out) };
    }
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
        3 => {
            // Eight codes in three bytes, low bits first (see `quant`).
            for (o, b) in out.chunks_exact_mut(8).zip(packed.chunks_exact(3)) {
                let w = b[0] as u32 | (b[1] as u32) << 8 | (b[2] as u32) << 16;
                for (j, o) in o.iter_mut().enumerate() {
                    *o = ((w >> (3 * j)) & 7) as f32;
                }
            }
        }
        _ => {
            for (o, &b) in out.iter_mut().zip(packed) {
                *o = b as f32;
            }
        }
    }
}

/// `a * b + c`, fused where the tier has FMA (`mul_add` without it is a slow libm call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: the FMA instantiation only runs inside `attend_span_avx2_fma`, after
        // AVX2 and FMA were detected.
        return unsafe { avx2::dot(a, b) };
    }
    // Eight independent partial sums: no reassociation is needed for LLVM to vectorize.
    let mut acc = [0f32; 8];
    let n = a.len().min(b.len());
    let m = n - n % 8;
    for (x, y) in a[..m].chunks_exact(8).zip(b[..m].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a[m..n].iter().zip(&b[m..n]) {
        sum += x * y;
    }
    sum
}

#[inline(always)]
fn axpy<const FMA: bool>(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `dot`.
        return unsafe { avx2::axpy(alpha, x, y) };
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// The AVX2+FMA versions of the two inner products. Autovectorization of the portable loops
/// came out as 128-bit operations with 64-bit loads in the AVX2 build (checked with objdump),
/// so this tier spells them out.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline(always)]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY (all loads): i + 8 <= n or i + 16 <= n bounds every 8-lane read.
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        let mut sum = _mm_cvtss_f32(one);
        while i < n {
            sum = a[i].mul_add(b[i], sum);
            i += 1;
        }
        sum
    }

    /// `out[t] = q . rows[t]` for whole groups of 8 rows (`dim` a multiple of 8); returns how
    /// many rows it did. Eight rows at a time, one accumulator each, then one transposing
    /// reduction for the eight sums instead of eight horizontal ones.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline(always)]
    pub unsafe fn row_dots8(q: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) -> usize {
        let n = (out.len().min(rows.len() / dim) / 8) * 8;
        let (pq, pr) = (q.as_ptr(), rows.as_ptr());
        let mut t = 0;
        // SAFETY (loads): rows t..t + 8 exist (t + 8 <= n) and c + 8 <= dim == q.len().
        while t < n {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c < dim {
                let qv = _mm256_loadu_ps(pq.add(c));
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(pr.add((t + k) * dim + c)), *a);
                }
                c += 8;
            }
            let h01 = _mm256_hadd_ps(acc[0], acc[1]);
            let h23 = _mm256_hadd_ps(acc[2], acc[3]);
            let h45 = _mm256_hadd_ps(acc[4], acc[5]);
            let h67 = _mm256_hadd_ps(acc[6], acc[7]);
            // Lane halves: [t0 t1 t2 t3] partial sums of channels 0-3 (low) and 4-7 (high).
            let h0123 = _mm256_hadd_ps(h01, h23);
            let h4567 = _mm256_hadd_ps(h45, h67);
            let lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
            let hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
            _mm256_storeu_ps(out.as_mut_ptr().add(t), _mm256_add_ps(lo, hi));
            t += 8;
        }
        n
    }

    /// `out[c] += sum_t weights[t] * rows[t][col + c]` for the first multiple of 64 columns
    /// of `out` (eight vector accumulators stay in registers over all rows); returns how
    /// many columns it did.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline(always)]
    pub unsafe fn weighted_rows64(
        weights: &[f32],
        rows: &[f32],
        dim: usize,
        col: usize,
        out: &mut [f32],
    ) -> usize {
        let width = (out.len() / 64) * 64;
        let n = weights.len().min(rows.len() / dim);
        let mut c0 = 0;
        // SAFETY: col + c0 + 64 <= col + out.len() <= dim, so each row read is in bounds.
        while c0 < width {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (t, &w) in weights[..n].iter().enumerate() {
                let wv = _mm256_set1_ps(w);
                let row = rows.as_ptr().add(t * dim + col + c0);
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * k)), *a);
                }
            }
            let o = out.as_mut_ptr().add(c0);
            for (k, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(
                    o.add(8 * k),
                    _mm256_add_ps(_mm256_loadu_ps(o.add(8 * k)), *a),
                );
            }
            c0 += 64;
        }
        width
    }

    /// Widen a row of 8-bit codes to f32, eight per step. (For 2 and 4 bits the byte table
    /// was faster than variable shifts here: 0.51 vs 0.59 ms at 8k tokens.)
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline(always)]
    pub unsafe fn unpack_row8(packed: &[u8], out: &mut [f32]) {
        let n = out.len().min(packed.len());
        let steps = n / 8;
        for i in 0..steps {
            // SAFETY: bytes and floats 8i..8i+8 exist (8 (i + 1) <= n).
            let bytes = _mm_loadl_epi64(packed.as_ptr().add(8 * i) as *const __m128i);
            let codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), codes);
        }
        for (o, &b) in out[8 * steps..n].iter_mut().zip(&packed[8 * steps..n]) {
            *o = b as f32;
        }
    }

    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline(always)]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        // SAFETY: i + 8 <= n bounds every 8-lane access.
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), r);
            i += 8;
        }
        while i < n {
            y[i] = alpha.mul_add(x[i], y[i]);
            i += 1;
        }
    }
}

/// `x[i] = e^(x[i] - max)` for scores `x <= max`; returns their sum. Vectorizable (libm's
/// `expf` is a call per element and was half of the kernel's time): `e^y = 2^n * e^r` with
/// `n = round(y / ln 2)`, `|r| <= ln 2 / 2`, and a degree-6 Taylor polynomial for `e^r`
/// (relative error below 2e-7, the order of f32 rounding).
#[inline(always)]
fn exp_shifted<const FMA: bool>(x: &mut [f32], max: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and the rest, so `y - n ln 2` loses nothing.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    // No reduction in this loop, so it vectorizes; the sum follows in `sum8`.
    for v in x.iter_mut() {
        // Below e^-87 the weight is zero for softmax purposes; the clamp keeps 2^n normal.
        let y = (*v - max).max(-87.0);
        let n = (y * LOG2E + ROUND) - ROUND;
        let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, y));
        let mut p = 1.0 / 720.0;
        p = madd::<FMA>(p, r, 1.0 / 120.0);
        p = madd::<FMA>(p, r, 1.0 / 24.0);
        p = madd::<FMA>(p, r, 1.0 / 6.0);
        p = madd::<FMA>(p, r, 0.5);
        p = madd::<FMA>(p, r, 1.0);
        p = madd::<FMA>(p, r, 1.0);
        let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
        *v = p * two_n;
    }
    sum8(x)
}

/// Sum with eight independent partial sums (vectorizes; f32 addition is not reassociated).
#[inline(always)]
fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let m = x.len() - x.len() % 8;
    for c in x[..m].chunks_exact(8) {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + x[m..].iter().sum::<f32>()
}

/// Maximum with eight independent lanes (NaN-free input: scores of finite rows).
#[inline(always)]
fn max8(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let m = x.len() - x.len() % 8;
    for c in x[..m].chunks_exact(8) {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    x[m..]
        .iter()
        .chain(&acc)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Host f32 view of a `(heads, n, dim)` tensor, flattened.
fn host_rows(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Staged and full-precision rows of one sequence as host f32.
struct DenseRows {
    k: Vec<f32>,
    v: Vec<f32>,
    tokens: usize,
    /// For the new rows of a chunk, the chunk length `L`: query position `i` (query row
    /// `r`, `i = r % L`) sees row `j` of this part only if `j <= i`. `None`: seen by all.
    causal: Option<usize>,
}

/// Tokens `start..end` of one part of a sequence's cache, in layout order.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// Quantized chunk `chunk` of the store.
    Quant { chunk: usize },
    /// Dense part `part` (staged, then full precision).
    Dense { part: usize },
}

#[derive(Debug, Clone, Copy)]
struct Span {
    source: Source,
    start: usize,
    end: usize,
}

/// The cache of one sequence cut into spans of at most `max_tokens`.
fn spans(store: &SeqLayerStore, dense: &[DenseRows], max_tokens: usize) -> Vec<Span> {
    let parts = store
        .chunks()
        .iter()
        .enumerate()
        .map(|(chunk, c)| (Source::Quant { chunk }, c.tokens()))
        .chain(
            dense
                .iter()
                .enumerate()
                .map(|(part, d)| (Source::Dense { part }, d.tokens)),
        );
    let mut out = Vec::new();
    for (source, tokens) in parts {
        let mut start = 0;
        while start < tokens {
            let end = (start + max_tokens).min(tokens);
            out.push(Span { source, start, end });
            start = end;
        }
    }
    out
}

/// Softmax state of one span for the query heads of one kv head: running max and sum of
/// `exp(score - max)`, and the output weighted by the same, not yet divided by the sum.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// The bytes of one quantized chunk's keys and values, borrowed from its CPU tensors.
struct ChunkBytes<'a> {
    k: BlockBytes<'a>,
    v: BlockBytes<'a>,
}

/// Everything one task reads.
struct SpanTask<'a> {
    chunks: &'a [ChunkBytes<'a>],
    dense: &'a [DenseRows],
    head: usize,
    /// `[row][dim]` queries of this kv head: its query heads times the chunk's positions.
    queries: &'a [f32],
    /// The same rows rotated by `H / sqrt(dim)`, for rotated key blocks (empty if none).
    rotated_queries: &'a [f32],
    query_rows: usize,
    dim: usize,
    scale: f32,
    span: Span,
}

/// Unpack rows `start..end` of `head` of `block` into `out` (`[token][dim]`, codes as f32).
#[inline(always)]
fn unpack_span<const FMA: bool>(
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
fn row_dots<const FMA: bool>(q: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) {
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
fn weighted_rows<const FMA: bool>(
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
fn block_scores<const FMA: bool>(
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
fn block_values<const FMA: bool>(
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
fn attend_span<const FMA: bool>(task: &SpanTask<'_>) -> Partial {
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

fn attend_span_baseline(task: &SpanTask<'_>) -> Partial {
    attend_span::<false>(task)
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_span_avx2_fma(task: &SpanTask<'_>) -> Partial {
    attend_span::<true>(task)
}

fn run_span(task: &SpanTask<'_>, tier: SimdTier) -> Partial {
    match tier {
        #[cfg(target_arch = "x86_64")]
        SimdTier::Avx2Fma if SimdTier::detected() == SimdTier::Avx2Fma => {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            unsafe { attend_span_avx2_fma(task) }
        }
        _ => attend_span_baseline(task),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorizable_exp_matches_libm_over_the_softmax_range() {
        let xs: Vec<f32> = (0..20_000).map(|i| -100.0 + i as f32 * 0.005).collect();
        for fma in [false, true] {
            let mut got = xs.clone();
            let sum = if fma {
                exp_shifted::<true>(&mut got, 0.0)
            } else {
                exp_shifted::<false>(&mut got, 0.0)
            };
            let mut want_sum = 0f64;
            for (&x, &g) in xs.iter().zip(&got) {
                let want = (x as f64).exp();
                want_sum += want;
                if x >= -87.0 {
                    assert!(
                        ((g as f64 - want) / want).abs() < 3e-7,
                        "e^{x}: {g} vs {want}"
                    );
                } else {
                    assert!(g as f64 <= 1e-37, "e^{x}: {g}");
                }
            }
            assert!(((sum as f64 - want_sum) / want_sum).abs() < 1e-5);
        }
    }
}
