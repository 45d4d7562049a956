//! The cache's place in mistral.rs: the backend the patched engine calls ([`backend`], and the
//! exact [`passthrough`] backend that checks the plumbing), engines built with a chosen cache,
//! device, dtype and weights ([`engine`]), where models come from ([`model_source`]: the hub
//! through [`hub`], the package index through [`package_index`], a Gemma 3 GGUF converted by
//! [`gguf_convert`] with its SentencePiece vocabulary by [`spm_tokenizer`]), and rank
//! configs for multi-process tensor parallelism ([`tensor_parallel`]).
//!
//! A change in how the engine sees the cache belongs here (or, where mistral.rs itself must
//! change, in a patch of `patches/`).

pub mod admission;
pub mod backend;
pub mod engine;
pub mod gguf_convert;
pub mod hub;
pub mod model_source;
pub mod package_index;
pub mod passthrough;
pub mod spm_tokenizer;
pub mod tensor_parallel;
