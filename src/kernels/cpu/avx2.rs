//! The AVX2+FMA versions of the two inner products. Autovectorization of the portable loops
//! came out as 128-bit operations with 64-bit loads in the AVX2 build (checked with objdump),
//! so this tier spells them out.

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
