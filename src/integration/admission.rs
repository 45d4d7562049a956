//! `serve --kv-memory SIZE`: admission by KV memory. mistral.rs's scheduler (core patch 0023,
//! `kv_cache/admission.rs`) admits a waiting sequence only while the projected KV bytes of the
//! admitted sequences fit the budget; this module supplies the projection for the cache in
//! use, so that a smaller cache admits more sequences into the same memory.

use anyhow::{bail, Result};
use mistralrs_core::kv_cache_backend::{set_kv_admission, KvAdmission, ModelKvShape};

use crate::engine::{Dtype, KvCacheChoice};

/// Keys and values per token of a model, all layers (`kv_heads * (k_head_dim + v_head_dim)`
/// summed over the layers that keep their own cache).
pub fn values_per_token(shape: &ModelKvShape) -> usize {
    shape
        .layers
        .iter()
        .map(|l| l.kv_heads * (l.k_head_dim + l.v_head_dim))
        .sum()
}

/// Bits of one full-precision key or value in the activation dtype (`auto`: 16, the dtype
/// accelerators pick).
pub fn full_precision_bits(dtype: Dtype) -> u32 {
    match dtype {
        Dtype::F32 => 32,
        Dtype::F16 | Dtype::Bf16 | Dtype::Auto => 16,
    }
}

/// Bytes of KV cache that a sequence of `tokens` tokens holds under `choice`: the default and
/// pass-through caches `tokens * values * bits / 8`; LogQuant its compressed footprint
/// ([`crate::config::LogQuantConfig::footprint`]: codes, scales and the full-precision
/// tokens). `None` for a backend this crate cannot see into.
pub fn projected_kv_bytes(
    choice: &KvCacheChoice,
    values_per_token: usize,
    full_precision_bits: u32,
    tokens: usize,
) -> Option<usize> {
    let bits = match choice {
        KvCacheChoice::Default => f64::from(full_precision_bits),
        KvCacheChoice::LogQuant(config) => {
            config.footprint(tokens).bits_per_value(full_precision_bits)
        }
        KvCacheChoice::Backend(name) if name == crate::passthrough::PASSTHROUGH => {
            f64::from(full_precision_bits)
        }
        KvCacheChoice::Backend(_) => return None,
    };
    Some((tokens as f64 * values_per_token as f64 * bits / 8.0).ceil() as usize)
}

/// Turn admission on for the model just loaded (its KV shape as the loader recorded it).
pub fn install_kv_memory_budget(
    choice: &KvCacheChoice,
    dtype: Dtype,
    budget_bytes: usize,
    max_seq_len: usize,
) -> Result<()> {
    let Some(shape) = mistralrs_core::kv_cache_backend::loaded_model_kv_shape() else {
        bail!("--kv-memory: the loader recorded no KV shape for this model");
    };
    let values = values_per_token(&shape);
    let bits = full_precision_bits(dtype);
    if projected_kv_bytes(choice, values, bits, 1).is_none() {
        bail!(
            "--kv-memory: cannot project the bytes of the `{}` KV cache (use logquant, default \
             or passthrough)",
            choice.name()
        );
    }
    let choice = choice.clone();
    set_kv_admission(Some(KvAdmission {
        budget_bytes,
        max_seq_len,
        project: Box::new(move |tokens| {
            projected_kv_bytes(&choice, values, bits, tokens).unwrap_or(usize::MAX)
        }),
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogQuantConfig;

    #[test]
    fn projections_follow_the_dtype_and_the_compression() {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64.
        let values = 30 * 3 * (64 + 64);
        assert_eq!(values, 11_520);
        let default = projected_kv_bytes(&KvCacheChoice::Default, values, 32, 1000).unwrap();
        assert_eq!(default, 1000 * 11_520 * 4);
        let half = projected_kv_bytes(&KvCacheChoice::Default, values, 16, 1000).unwrap();
        assert_eq!(half * 2, default);
        // LogQuant keeps at most 3W = 126 tokens at full precision, the rest at K4V2: far
        // below the default cache at 4k tokens, equal to it below 3W.
        let lq = KvCacheChoice::LogQuant(LogQuantConfig::default());
        let short = projected_kv_bytes(&lq, values, 32, 100).unwrap();
        assert_eq!(
            short,
            projected_kv_bytes(&KvCacheChoice::Default, values, 32, 100).unwrap()
        );
        let long = projected_kv_bytes(&lq, values, 32, 4096).unwrap();
        let dense = projected_kv_bytes(&KvCacheChoice::Default, values, 32, 4096).unwrap();
        assert!(long * 5 < dense, "{long} vs {dense}");
        assert!(projected_kv_bytes(&KvCacheChoice::Backend("x".into()), values, 32, 1).is_none());
    }
}
