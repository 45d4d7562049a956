//! Tensor parallelism across processes: mistral.rs's TCP "ring" backend (cargo feature
//! `ring`; `make build-ring`).
//!
//! Every rank is a process of the same binary with the same model and flags, and its own
//! [`RankConfig`] file (mistral.rs reads it from `RING_CONFIG`). Each rank loads its share of
//! the attention and MLP weights (`num_kv_heads / world_size` KV heads, so its KV cache holds
//! that share of every token) and the ranks sum their partial outputs over TCP after each
//! attention and MLP block. Rank 0 serves the requests and forwards each one to the other
//! ranks, whose engine builds never return (they are workers until killed). LogQuant chooses
//! its full-precision tokens from positions alone, so every rank keeps the same tokens.
//!
//! What mistral.rs 0.8.1 splits: safetensors models through its plain loader (GGUF models are
//! not split: every rank would run the whole model), with attention heads divisible by the
//! world size. The world size is a power of two, 2 or more.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The environment variable mistral.rs reads its ring configuration from.
pub const RING_CONFIG_ENV: &str = "RING_CONFIG";

/// One rank's ring configuration: the JSON file mistral.rs 0.8.1 reads (`RingConfig` in
/// mistralrs-quant), checked here so that a bad file is one line instead of a panic inside
/// the model loader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankConfig {
    /// Address of rank 0, where ranks >= 1 fetch the requests (required for them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_ip: Option<String>,
    /// Port on rank 0 that hands the requests to the other ranks.
    pub master_port: u16,
    /// Port this rank listens on for its left neighbour (rank - 1, wrapping).
    pub port: u16,
    /// Address of the right neighbour (rank + 1, wrapping); default 0.0.0.0 (this host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub right_ip: Option<String>,
    /// The right neighbour's `port`.
    pub right_port: u16,
    pub rank: usize,
    /// Number of ranks: a power of two, 2 or more.
    pub world_size: usize,
}

impl RankConfig {
    /// Read and check `path`.
    ///
    /// # Errors
    /// The file is missing or not this JSON shape, the world size is not a power of two >= 2,
    /// the rank is outside it, a rank >= 1 has no `master_ip`, an address does not parse, or
    /// two of this rank's ports coincide.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the rank config {}", path.display()))?;
        let config: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "rank config {}: expected {{\"master_ip\", \"master_port\", \"port\", \
                 \"right_ip\", \"right_port\", \"rank\", \"world_size\"}}",
                path.display()
            )
        })?;
        config
            .check()
            .with_context(|| format!("rank config {}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        if self.world_size < 2 || !self.world_size.is_power_of_two() {
            bail!(
                "world_size {} is not a power of two >= 2 (mistral.rs's ring backend)",
                self.world_size
            );
        }
        if self.rank >= self.world_size {
            bail!(
                "rank {} is not below world_size {}",
                self.rank,
                self.world_size
            );
        }
        if self.rank > 0 && self.master_ip.is_none() {
            bail!("rank {} needs master_ip (the address of rank 0)", self.rank);
        }
        for (name, ip) in [("master_ip", &self.master_ip), ("right_ip", &self.right_ip)] {
            if let Some(ip) = ip {
                ip.parse::<IpAddr>()
                    .with_context(|| format!("{name} `{ip}` is not an IP address"))?;
            }
        }
        if self.port == self.right_port && self.right_ip.is_none() {
            bail!("port and right_port are both {} on this host", self.port);
        }
        if self.rank == 0 && self.master_port == self.port {
            bail!("master_port and port are both {}", self.port);
        }
        Ok(())
    }

    /// Rank 0 serves the requests; the others are workers.
    pub fn is_worker(&self) -> bool {
        self.rank > 0
    }
}

/// A rank config in effect for this process: its path and contents.
#[derive(Debug, Clone)]
pub struct ActiveRank {
    pub path: PathBuf,
    pub config: RankConfig,
}

/// Make `path` this process's rank config (sets `RING_CONFIG`, read by mistral.rs when the
/// model loads). Call it before any engine is built, while the process has one thread.
///
/// # Errors
/// This binary was built without the `ring` feature, or the file fails [`RankConfig::read`].
pub fn install(path: &Path) -> Result<ActiveRank> {
    if !cfg!(feature = "ring") {
        bail!(
            "--rank-config needs a tensor-parallel build: this binary was built without the \
             `ring` feature (make build-ring)"
        );
    }
    let config = RankConfig::read(path)?;
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    std::env::set_var(RING_CONFIG_ENV, &path);
    Ok(ActiveRank { path, config })
}

/// The rank config this process runs under: `RING_CONFIG` in a `ring` build, else none.
///
/// # Errors
/// A `ring` build without `RING_CONFIG` (mistral.rs's loader would panic), or a bad file.
pub fn active() -> Result<Option<ActiveRank>> {
    if !cfg!(feature = "ring") {
        return Ok(None);
    }
    let Some(path) = std::env::var_os(RING_CONFIG_ENV) else {
        bail!(
            "this binary is a tensor-parallel (`ring`) build: give `serve --rank-config FILE` \
             (or set {RING_CONFIG_ENV}); the plain build runs in one process"
        );
    };
    let path = PathBuf::from(path);
    let config = RankConfig::read(&path)?;
    Ok(Some(ActiveRank { path, config }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) -> PathBuf {
        let path = dir.join("rank.json");
        std::fs::write(&path, json).unwrap();
        path
    }

    #[test]
    fn a_rank_config_is_checked_before_the_loader_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let ok = write(
            dir.path(),
            r#"{"master_ip":"127.0.0.1","master_port":9000,"port":9002,"right_port":9001,"rank":1,"world_size":2}"#,
        );
        let config = RankConfig::read(&ok).unwrap();
        assert!(config.is_worker());
        assert_eq!(config.right_ip, None);

        for (json, expected) in [
            (
                r#"{"master_port":9000,"port":9001,"right_port":9002,"rank":0,"world_size":3}"#,
                "power of two",
            ),
            (
                r#"{"master_port":9000,"port":9001,"right_port":9002,"rank":2,"world_size":2}"#,
                "not below world_size",
            ),
            (
                r#"{"master_port":9000,"port":9001,"right_port":9002,"rank":1,"world_size":2}"#,
                "needs master_ip",
            ),
            (
                r#"{"master_ip":"rank0","master_port":9000,"port":9001,"right_port":9002,"rank":1,"world_size":2}"#,
                "not an IP address",
            ),
            (
                r#"{"master_port":9000,"port":9001,"right_port":9001,"rank":0,"world_size":2}"#,
                "both 9001",
            ),
            (
                r#"{"master_port":9000,"port":9001,"right_port":9002,"rank":0,"world":2}"#,
                "expected {",
            ),
        ] {
            let err = format!(
                "{:#}",
                RankConfig::read(&write(dir.path(), json)).unwrap_err()
            );
            assert!(err.contains(expected), "{json}: {err}");
            assert_eq!(err.lines().count(), 1, "{json}: {err}");
        }
        let missing = format!(
            "{:#}",
            RankConfig::read(&dir.path().join("no.json")).unwrap_err()
        );
        assert!(missing.contains("cannot read the rank config"), "{missing}");
    }

    #[cfg(not(feature = "ring"))]
    #[test]
    fn a_plain_build_refuses_a_rank_config_with_one_line() {
        let err = format!("{:#}", install(Path::new("rank.json")).unwrap_err());
        assert!(err.contains("make build-ring"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(active().unwrap().is_none());
    }
}
