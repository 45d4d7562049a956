//! Attention over the packed cache, arranged by device and tier (as mistral.rs's attention
//! backends and ggml's CPU kernels are):
//!
//! - [`reference`]: textbook attention on host f32 arrays, the oracle every path is tested
//!   against (`tests/logquant_cache.rs`, `tests/device_store.rs`).
//! - the portable path, for every device: the store dequantizes its blocks with candle ops on
//!   the device ([`crate::packed::dequantize_blocks`]) into `[quantized | full precision]` and
//!   the engine's own attention runs over it ([`crate::backend`]).
//! - [`cpu`]: the fused kernel that reads the codes in place. `cpu/tier.rs` picks the SIMD
//!   tier (`MISTRALRS_LOGQUANT_SIMD=baseline` forces the generic one), `cpu/generic.rs` holds
//!   the plain-Rust inner loops and `cpu/avx2.rs` their AVX2+FMA versions, `cpu/spans.rs` cuts
//!   the cache into flash-decoding spans and `cpu/span_attention.rs` attends over one.
//! - [`cuda`] (feature `cuda`): the fused decode attention of `cuda/decode_attention.cu`
//!   (split-K flash decoding over the codes, and its reference kernels), compiled to PTX by
//!   `build.rs` and launched from `cuda/fused.rs` (its reference kernels from
//!   `cuda/reference.rs`); batches it does not cover, and chunks of
//!   several tokens, run the portable path.
//! - `metal/`: not written yet (issue 12); Metal runs the portable path.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
