//! What a measurement ran on, recorded next to its numbers: `bench --json` and `eval --json`
//! both carry one [`RunInfo`], so that a committed result can be traced to a commit, a CPU, a
//! kernel tier, a thread count, a dtype and a weights mode.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::engine::{Dtype, EngineOptions, KvCacheChoice};
use crate::kernels::cpu::SimdTier;
use crate::model_source::ModelSource;

/// The environment variables that make candle dequantize quantized GGUF weights at load, to
/// f32 and to f16 (candle-core `quantized/mod.rs`: set, non-empty and not "0").
pub const DEQUANTIZE_ALL_ENV: &str = "CANDLE_DEQUANTIZE_ALL";
pub const DEQUANTIZE_ALL_F16_ENV: &str = "CANDLE_DEQUANTIZE_ALL_F16";

/// The conditions of one `bench` or `eval` run. Every field defaults when absent, so JSON
/// written before a field existed still reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunInfo {
    /// `git rev-parse HEAD` of the source tree, `-dirty` appended when tracked files differ
    /// from it; "unknown" outside a git checkout.
    pub commit: String,
    /// This crate's version.
    pub version: String,
    /// The command line, as given.
    pub command: Vec<String>,
    /// The model's name (file or directory name, never a path).
    pub model: String,
    /// `model name` of /proc/cpuinfo; "unknown" elsewhere.
    pub cpu: String,
    /// The SIMD tier the LogQuant kernel runs ([`SimdTier::detected`]).
    pub simd_tier: String,
    /// Threads of the rayon pool that candle's CPU ops and the kernel run on.
    pub threads: usize,
    /// Activation dtype of the engines measured.
    pub dtype: String,
    /// How quantized GGUF weights run: `f32` (dequantized at load, `CANDLE_DEQUANTIZE_ALL`
    /// set), `f16` (`CANDLE_DEQUANTIZE_ALL_F16`) or `as-is` (candle's quantized matmuls).
    pub weights: String,
}

impl RunInfo {
    /// Collect the conditions of a run of `model` with engines of activation dtype `dtype`.
    pub fn collect(model: &ModelSource, dtype: Dtype) -> Self {
        Self {
            commit: git_commit(Path::new(env!("CARGO_MANIFEST_DIR")))
                .unwrap_or_else(|| "unknown".to_string()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            command: std::env::args().collect(),
            model: model.model_id(),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|text| cpu_model(&text))
                .unwrap_or_else(|| "unknown".to_string()),
            simd_tier: format!("{:?}", SimdTier::detected()),
            threads: rayon::current_num_threads(),
            dtype: dtype.name().to_string(),
            weights: weights_mode(
                std::env::var(DEQUANTIZE_ALL_ENV).ok().as_deref(),
                std::env::var(DEQUANTIZE_ALL_F16_ENV).ok().as_deref(),
            )
            .to_string(),
        }
    }

    /// The conditions of a `bench` or `eval` run of `model`: their engines are built by
    /// [`EngineOptions::new`], so in its activation dtype.
    pub fn of_measurement(model: &ModelSource) -> Self {
        let dtype = EngineOptions::new(model.clone(), KvCacheChoice::Default).dtype;
        Self::collect(model, dtype)
    }

    /// One line for reports: commit, CPU, tier, threads, dtype, weights.
    pub fn summary(&self) -> String {
        let or_unknown = |s: &str| {
            if s.is_empty() {
                "unknown".to_string()
            } else {
                s.to_string()
            }
        };
        format!(
            "commit {}, {}, {} tier, {} threads, dtype {}, weights {}, model {}",
            or_unknown(&self.commit),
            or_unknown(&self.cpu),
            or_unknown(&self.simd_tier),
            self.threads,
            or_unknown(&self.dtype),
            or_unknown(&self.weights),
            or_unknown(&self.model),
        )
    }
}

/// How candle runs quantized weights, from the values of [`DEQUANTIZE_ALL_ENV`] and
/// [`DEQUANTIZE_ALL_F16_ENV`], by candle's own rule (f32 wins over f16).
pub fn weights_mode(
    dequantize_all: Option<&str>,
    dequantize_all_f16: Option<&str>,
) -> &'static str {
    let on = |v: Option<&str>| v.is_some_and(|s| !s.is_empty() && s != "0");
    if on(dequantize_all) {
        "f32"
    } else if on(dequantize_all_f16) {
        "f16"
    } else {
        "as-is"
    }
}

/// The first `model name` line of a /proc/cpuinfo text.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    })
}

/// HEAD of the git checkout at `dir`, with `-dirty` when tracked files differ from it.
fn git_commit(dir: &Path) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let commit = String::from_utf8(output.stdout).ok()?.trim().to_string();
    if commit.is_empty() {
        return None;
    }
    let clean = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["diff-index", "--quiet", "HEAD", "--"])
        .status()
        .is_ok_and(|s| s.success());
    Some(if clean {
        commit
    } else {
        format!("{commit}-dirty")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_is_the_first_model_name_line() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) \
                    CPU @ 2.20GHz\nflags\t\t: fpu\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            cpu_model(text).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(cpu_model("processor : 0\n"), None);
    }

    #[test]
    fn weights_mode_follows_candles_rule() {
        assert_eq!(weights_mode(None, None), "as-is");
        assert_eq!(weights_mode(Some("1"), None), "f32");
        assert_eq!(weights_mode(Some("0"), None), "as-is");
        assert_eq!(weights_mode(Some(""), Some("1")), "f16");
        assert_eq!(weights_mode(Some("1"), Some("1")), "f32");
    }

    #[test]
    fn a_run_records_its_commit_cpu_tier_threads_dtype_and_weights() {
        let model = ModelSource::Gguf("/some/dir/My-Model.Q4_1.gguf".into());
        let info = RunInfo::collect(&model, Dtype::F32);
        // This test runs inside the crate's git checkout (CI clones it), so HEAD is known.
        let head = Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        match head {
            Some(head) => assert!(info.commit.starts_with(&head), "{info:?} vs {head}"),
            None => assert_eq!(info.commit, "unknown"),
        }
        assert_eq!(info.model, "My-Model.Q4_1");
        assert_eq!(info.dtype, "f32");
        assert_eq!(info.simd_tier, format!("{:?}", SimdTier::detected()));
        assert!(info.threads >= 1);
        assert!(!info.cpu.is_empty());
        assert!(
            ["f32", "f16", "as-is"].contains(&info.weights.as_str()),
            "{info:?}"
        );
        // JSON without the record (or with only some fields) still reads.
        let old: RunInfo = serde_json::from_str(r#"{"commit":"abc"}"#).unwrap();
        assert_eq!(old.commit, "abc");
        assert_eq!(old.threads, 0);
    }
}
