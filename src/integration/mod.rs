//! The cache's place in mistral.rs: the backend the patched engine calls ([`backend`], and the
//! exact [`passthrough`] backend that checks the plumbing), engines built with a chosen cache,
//! device, dtype and weights ([`engine`]), where models come from ([`model_source`]), and rank
//! configs for multi-process tensor parallelism ([`tensor_parallel`]).
//!
//! A change in how the engine sees the cache belongs here (or, where mistral.rs itself must
//! change, in a patch of `patches/`).

pub mod admission;
pub mod backend;
pub mod engine;
pub mod hub;
pub mod model_source;
pub mod passthrough;
pub mod tensor_parallel;
