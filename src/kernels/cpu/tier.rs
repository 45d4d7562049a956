//! Which instruction-set tier runs the kernel's inner loops, and how the work is cut.

/// Environment variable that forces the generic tier (`baseline`).
pub const SIMD_ENV: &str = "MISTRALRS_LOGQUANT_SIMD";

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

    /// The tier the kernel runs by default: [`SimdTier::detected`], unless the environment
    /// variable `MISTRALRS_LOGQUANT_SIMD` is `baseline` (to measure or test the generic loops
    /// in a whole process). Any other value of it is ignored with a warning.
    pub fn chosen() -> Self {
        static CHOSEN: std::sync::LazyLock<SimdTier> = std::sync::LazyLock::new(|| {
            let forced = std::env::var(SIMD_ENV).ok();
            SimdTier::choose(SimdTier::detected(), forced.as_deref())
        });
        *CHOSEN
    }

    fn choose(detected: SimdTier, forced: Option<&str>) -> SimdTier {
        match forced {
            None | Some("") | Some("auto") => detected,
            Some("baseline") => SimdTier::Baseline,
            Some(other) => {
                tracing::warn!("{SIMD_ENV}={other} is not `baseline` or `auto`: ignored");
                detected
            }
        }
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

/// How [`super::attend_with`] runs: the SIMD tier and the most tokens one task scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPlan {
    pub tier: SimdTier,
    pub span_tokens: usize,
}

impl Default for KernelPlan {
    fn default() -> Self {
        Self {
            tier: SimdTier::chosen(),
            // Scores of a span (query heads x tokens) stay in L1; enough tasks at batch 1.
            span_tokens: 512,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_can_force_the_generic_tier_only() {
        let best = SimdTier::Avx2Fma;
        assert_eq!(SimdTier::choose(best, None), best);
        assert_eq!(SimdTier::choose(best, Some("auto")), best);
        assert_eq!(SimdTier::choose(best, Some("baseline")), SimdTier::Baseline);
        assert_eq!(SimdTier::choose(best, Some("avx512")), best);
        assert_eq!(
            SimdTier::choose(SimdTier::Baseline, None),
            SimdTier::Baseline
        );
    }
}
