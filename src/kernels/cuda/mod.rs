//! Launches the fused CUDA decode attention of `decode_attention.cu` over the LogQuant stores of
//! a batch (one query token per sequence, no mask), and its reference kernels.
//!
//! The `.cu` header states the device layout and the math; this side gathers the inputs in that
//! layout with candle ops on the device (the chunks of all sequences concatenated along the
//! token axis, the full-precision rows likewise), uploads the per-sequence offsets (host
//! bookkeeping from chunk token counts, one small upload a call), checks the kernels' limits and
//! launches quantized spans, full-precision spans and the reduce through candle's CUDA backend
//! ([`CustomOp1::cuda_fwd`](candle_core::CustomOp1::cuda_fwd), the module loaded once per
//! device by `CudaDevice::get_or_load_custom_func`). Nothing here reads tensor data back to
//! the host.
//!
//! Whatever the kernels do not cover ([`Unsupported`]) returns `Ok(None)` from
//! [`attend_decode`], and the backend runs the portable path instead.
//!
//! One concern per file:
//! - `limits.rs`: the `.cu`'s block constants, what the kernels take ([`Unsupported`] and the
//!   checks) and the shared memory a block needs ([`quant_smem_bytes`], [`dense_smem_bytes`]).
//! - `plan.rs`: the launch plan of a batch (grids, spans, slots, per-sequence offsets) from the
//!   stores' host bookkeeping and the device's limits.
//! - `inputs.rs`: the batch's cache gathered into the kernels' layout on the device, and the
//!   views of tensor storage the launches pass.
//! - `fused.rs`: the fused kernels' candle op and [`attend_decode`], the backend's entry.
//! - `reference.rs`: the reference kernels' candle op and [`reference_decode_attention`].
//! - this file: the PTX both ops load, and the public items.

mod fused;
mod inputs;
mod limits;
mod plan;
mod reference;

pub use fused::{attend_decode, enabled, ENABLE_ENV};
pub use limits::{dense_smem_bytes, quant_smem_bytes, Unsupported};
pub use reference::reference_decode_attention;

/// PTX of `decode_attention.cu`, compiled by nvcc in `build.rs` for `compute_${CUDA_COMPUTE_CAP}`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
/// The name candle caches the loaded module under (once per device).
const MODULE: &str = "mistralrs_logquant_decode_attention";
