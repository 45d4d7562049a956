//! The LogQuant cache itself, independent of mistral.rs: which tokens stay in full precision
//! ([`policy`]), how the others are quantized ([`quant`]) and packed into device tensors
//! ([`packed`], from the portable candle-op building blocks in [`device_ops`]), one sequence's
//! layer of both ([`store`]), and the settings that choose all of it ([`config`]).
//!
//! A change to the quantization or the selection rule belongs here, with a test against the
//! spec's vectors (`tests/spec`). Nothing here knows about the engine.

pub mod config;
pub mod device_ops;
pub mod packed;
pub mod policy;
pub mod quant;
pub mod store;
