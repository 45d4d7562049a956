//! # mistralrs-logquant
//!
//! LogQuant 2-bit KV-cache quantization for the [mistral.rs] inference engine.
//!
//! mistral.rs 0.8.1 has a closed cache type; the patches in `patches/mistralrs-core+0.8.1/` add a
//! pluggable KV-cache backend seam to it ([`mistralrs_core::kv_cache_backend`]). This crate
//! registers its backends there and builds engines that use them:
//!
//! - [`backend`]: the LogQuant cache (`logquant`): a log-distributed set of at most 3W tokens
//!   in full precision ([`policy`]), every other token in 2, 3, 4 or 8 bits, keys and values
//!   at their own widths ([`quant`], [`store`]), configured by [`config::LogQuantConfig`];
//!   quantized blocks are candle tensors on the model's device, quantized and dequantized
//!   there with candle ops off the CPU ([`packed`], built from [`device_ops`]).
//! - [`kernels`]: attention over the packed cache (the fused CPU kernel and its reference).
//! - [`engine`]: a mistral.rs engine with a chosen cache, device, dtype and weights mode;
//!   [`generate`]: greedy and teacher-forced requests against it.
//! - [`eval`], [`retrieval`], [`needle`] and [`bench`]: measurements through the real decode
//!   path (perplexity and KL against the default cache, the copy and passkey tasks, decode
//!   speed and KV bytes),
//!   returning rows; [`provenance`] records what a measurement ran on.
//! - [`passthrough`]: an exact full-precision backend, the reference for the plumbing.
//! - [`tensor_parallel`]: rank configs for mistral.rs's multi-process tensor parallelism (the
//!   `ring` build).
//!
//! The `mistralrs-logquant` binary (`src/main.rs`, `src/cli/`, `src/cli/plot.rs`) holds the
//! commands, the OpenAI server, the tables and the charts; none of it is library API.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use mistralrs_logquant::engine::{build_engine, EngineOptions, KvCacheChoice};
//! use mistralrs_logquant::model_source::ModelSource;
//!
//! let model = ModelSource::default_model()?; // fetched and verified on first use
//! let engine = build_engine(&EngineOptions::new(model, KvCacheChoice::passthrough())).await?;
//! # let _ = engine; Ok(()) }
//! ```
//!
//! [mistral.rs]: https://github.com/EricLBuehler/mistral.rs

pub mod cache;
pub mod integration;
pub mod kernels;
pub mod measure;

// Every module by its own name too (`mistralrs_logquant::engine`, `crate::config`): the layers
// are folders, the paths stay short.
pub use cache::{config, device_ops, packed, policy, quant, store};
pub use integration::{
    admission, backend, engine, gguf_convert, hub, model_source, package_index, passthrough,
    spm_tokenizer, tensor_parallel,
};
pub use measure::{bench, bootstrap, eval, generate, needle, provenance, retrieval};
