//! Measurements through the real decode path: requests against an engine ([`generate`]),
//! perplexity and KL against the default cache ([`eval`]), the copy task ([`retrieval`]), the
//! passkey task ([`needle`]), decode speed and KV bytes ([`bench`]), and the record of what a
//! measurement ran on ([`provenance`]). They return rows; the binary prints, plots and writes
//! them.

pub mod bench;
pub mod bootstrap;
pub mod eval;
pub mod generate;
pub mod needle;
pub mod provenance;
pub mod retrieval;
