//! Inner loops in plain Rust, written so that LLVM vectorizes them (fixed-width chunks,
//! independent accumulators); the `FMA` instantiation calls into [`super::avx2`] where
//! autovectorization fell short.

#[cfg(target_arch = "x86_64")]
use super::avx2;

/// Byte -> the codes it holds, as f32, for each bit width: one table lookup unpacks a byte.
pub(super) struct Unpack {
    pub(super) two: [[f32; 4]; 256],
    pub(super) four: [[f32; 2]; 256],
}

pub(super) static UNPACK: std::sync::LazyLock<Unpack> = std::sync::LazyLock::new(|| {
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
pub(super) fn unpack_row<const FMA: bool>(
    table: &Unpack,
    packed: &[u8],
    bits: u8,
    out: &mut [f32],
) {
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
pub(super) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
pub(super) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
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
pub(super) fn axpy<const FMA: bool>(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `dot`.
        return unsafe { avx2::axpy(alpha, x, y) };
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `x[i] = e^(x[i] - max)` for scores `x <= max`; returns their sum. Vectorizable (libm's
/// `expf` is a call per element and was half of the kernel's time): `e^y = 2^n * e^r` with
/// `n = round(y / ln 2)`, `|r| <= ln 2 / 2`, and a degree-6 Taylor polynomial for `e^r`
/// (relative error below 2e-7, the order of f32 rounding).
#[inline(always)]
pub(super) fn exp_shifted<const FMA: bool>(x: &mut [f32], max: f32) -> f32 {
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
pub(super) fn sum8(x: &[f32]) -> f32 {
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
pub(super) fn max8(x: &[f32]) -> f32 {
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
