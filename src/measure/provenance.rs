//! What a measurement ran on, recorded next to its numbers: `bench --json` and `eval --json`
//! both carry one [`RunInfo`], so that a committed result can be traced to a commit, a CPU, a
//! kernel tier, a thread count, a dtype and a weights mode.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::engine::{EngineOptions, Weights};
use crate::kernels::cpu::SimdTier;

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
    /// The SIMD tier the LogQuant kernel runs ([`SimdTier::chosen`]).
    pub simd_tier: String,
    /// Threads of the rayon pool that candle's CPU ops and the kernel run on.
    pub threads: usize,
    /// Activation dtype of the engines measured.
    pub dtype: String,
    /// How quantized GGUF weights ran: `f32` (dequantized at load) or `as-is` (candle's
    /// quantized matmuls); see [`Weights`].
    pub weights: String,
    /// `cpu`, or `accelerator` (the CUDA or Metal device of the build).
    pub device: String,
}

impl RunInfo {
    /// Collect the conditions of a run whose engines are built from `options` (one per KV
    /// cache configuration, [`EngineOptions::with_cache`]).
    pub fn collect(options: &EngineOptions) -> Self {
        let model = &options.model;
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
            simd_tier: format!("{:?}", SimdTier::chosen()),
            threads: rayon::current_num_threads(),
            dtype: options.dtype.name().to_string(),
            weights: options
                .effective_weights()
                .map_or("unknown", Weights::name)
                .to_string(),
            device: if options.cpu { "cpu" } else { "accelerator" }.to_string(),
        }
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
            "commit {}, {}, {} tier, {} threads, device {}, dtype {}, weights {}, model {}",
            or_unknown(&self.commit),
            or_unknown(&self.cpu),
            or_unknown(&self.simd_tier),
            self.threads,
            or_unknown(&self.device),
            or_unknown(&self.dtype),
            or_unknown(&self.weights),
            or_unknown(&self.model),
        )
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
    use crate::engine::KvCacheChoice;
    use crate::model_source::ModelSource;

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
    fn a_run_records_its_commit_cpu_tier_threads_dtype_and_weights() {
        let model = ModelSource::Gguf("/some/dir/My-Model.Q4_1.gguf".into());
        let mut options = EngineOptions::new(model, KvCacheChoice::Default);
        options.weights = Weights::AsIs;
        let info = RunInfo::collect(&options);
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
        assert_eq!(info.simd_tier, format!("{:?}", SimdTier::chosen()));
        assert!(info.threads >= 1);
        assert!(!info.cpu.is_empty());
        assert_eq!(
            (info.weights.as_str(), info.device.as_str()),
            ("as-is", "cpu")
        );
        // `auto` is decided from the file's header; a file that is not there is "unknown".
        options.weights = Weights::Auto;
        assert_eq!(RunInfo::collect(&options).weights, "unknown");
        // JSON without the record (or with only some fields) still reads.
        let old: RunInfo = serde_json::from_str(r#"{"commit":"abc"}"#).unwrap();
        assert_eq!(old.commit, "abc");
        assert_eq!(old.threads, 0);
    }
}
