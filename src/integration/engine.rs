//! Building a mistral.rs engine with a chosen KV cache: one path for the server, the CLI, the
//! examples and the tests.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mistralrs_core::kv_cache_backend::{
    kv_cache_layer_census, register_kv_cache_backend, registered_kv_cache_backends,
    select_kv_cache_backend,
};
use mistralrs_core::{AutoDeviceMapParams, MistralRs, ModelDType, ModelSelected, TokenSource};
use mistralrs_server_core::mistralrs_for_server_builder::{MistralRsForServerBuilder, ModelConfig};

use crate::backend::{register_logquant, LOGQUANT};
use crate::config::LogQuantConfig;
use crate::model_source::ModelSource;
use crate::passthrough::{PassthroughFactory, PASSTHROUGH};

/// Register every backend this crate provides with mistral.rs; `logquant` with the default
/// configuration unless one is registered already.
pub fn register_backends() {
    register_kv_cache_backend(Arc::new(PassthroughFactory));
    if !registered_kv_cache_backends().iter().any(|n| n == LOGQUANT) {
        register_logquant(LogQuantConfig::default());
    }
}

/// Which KV cache the engine uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCacheChoice {
    /// mistral.rs's own cache, untouched.
    Default,
    /// LogQuant with this configuration.
    LogQuant(LogQuantConfig),
    /// Any other backend registered with mistral.rs under this name.
    Backend(String),
}

impl KvCacheChoice {
    pub fn passthrough() -> Self {
        Self::Backend(PASSTHROUGH.to_string())
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Default => "default",
            Self::LogQuant(_) => LOGQUANT,
            Self::Backend(name) => name,
        }
    }

    /// Mean bits per cached key or value after `tokens` tokens of a 16-bit model, all overhead
    /// included ([`crate::config::CacheFootprint`]): 16 for the default cache, `None` for a
    /// backend this crate cannot see into.
    pub fn bits_per_value(&self, tokens: usize) -> Option<f64> {
        match self {
            Self::Default => Some(16.0),
            Self::LogQuant(config) => Some(config.footprint(tokens).bits_per_value(16)),
            Self::Backend(_) => None,
        }
    }

    /// A label for tables: the name, and LogQuant's settings.
    pub fn label(&self) -> String {
        match self {
            Self::LogQuant(config) => config.describe(),
            other => other.name().to_string(),
        }
    }
}

impl FromStr for KvCacheChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        register_backends();
        if s == "default" {
            return Ok(Self::Default);
        }
        if s == LOGQUANT {
            return Ok(Self::LogQuant(LogQuantConfig::default()));
        }
        let known = registered_kv_cache_backends();
        if known.iter().any(|k| k == s) {
            return Ok(Self::Backend(s.to_string()));
        }
        bail!(
            "invalid value `{s}` for --kv-cache (allowed: default, {})",
            known.join(", ")
        )
    }
}

/// Activation dtype of the model (and so of the default cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    Auto,
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// f32 on the CPU (mistral.rs's CPU kernels are fastest there, and the default cache is an
    /// exact f32 reference); on an accelerator, the model's own dtype (`auto`).
    pub fn default_for(cpu: bool) -> Self {
        if cpu {
            Self::F32
        } else {
            Self::Auto
        }
    }

    /// The flag value: `auto`, `f32`, `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    fn to_model_dtype(self) -> ModelDType {
        match self {
            Self::Auto => ModelDType::Auto,
            Self::F32 => ModelDType::F32,
            Self::F16 => ModelDType::F16,
            Self::Bf16 => ModelDType::BF16,
        }
    }
}

/// How a GGUF model's quantized weights run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Weights {
    /// `q8_0` for a GGUF model of fewer than 1B parameters ([`SMALL_MODEL_PARAMETERS`]) on the CPU,
    /// `as-is` otherwise.
    Auto,
    /// On the CPU, tensors of the types candle has no SIMD kernel for (Q4_1, Q5_0, Q5_1) are
    /// requantized to Q8_0 at load, the rest kept as stored: decoding runs candle's SIMD
    /// Q8_0 dot products on every core. Costs about 1.06 bytes per parameter.
    #[value(name = "q8_0")]
    Q8_0,
    /// Dequantized to f32 once at load (candle's `CANDLE_DEQUANTIZE_ALL`): every matmul runs
    /// on candle's f32 GEMM. Costs 4 bytes per parameter.
    F32,
    /// As stored: candle's quantized matmuls (on the CPU, Q4_1 has only a scalar kernel).
    #[value(name = "as-is")]
    AsIs,
}

/// candle's switch that dequantizes quantized GGUF weights at load (candle-core
/// `quantized/mod.rs`: set, non-empty and not "0").
const DEQUANTIZE_ALL_ENV: &str = "CANDLE_DEQUANTIZE_ALL";

/// Below this many parameters, `--weights auto` requantizes a GGUF model's scalar-only
/// tensors to Q8_0 on the CPU (docs/speed.md, "The default command on the CPU"); at 1B the
/// Q8_0 copy of a Q4_1 file takes 0.4 GiB more, which a user of a quantized file did not ask for.
pub const SMALL_MODEL_PARAMETERS: u64 = 1_000_000_000;

impl Weights {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Q8_0 => "q8_0",
            Self::F32 => "f32",
            Self::AsIs => "as-is",
        }
    }
}

/// GGUF architectures whose mistral.rs 0.8.1 loader accepts dequantized weights. The phi2,
/// phi3 and starcoder2 loaders take their MLP matrices apart as quantized tensors and reach an
/// `unreachable!()` on f32 ones (quantized_phi2.rs line 267 and the like).
pub const F32_WEIGHTS_ARCHITECTURES: [&str; 4] = ["llama", "qwen2", "qwen3", "qwen3moe"];

/// What `--weights` needs of a GGUF file, read from its header alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    /// `general.architecture`.
    pub architecture: String,
    /// Elements of every tensor.
    pub parameters: u64,
}

impl GgufSummary {
    pub fn read(path: &Path) -> Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .with_context(|| format!("cannot read the GGUF header of {}", path.display()))?;
        let architecture = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let parameters = content
            .tensor_infos
            .values()
            .map(|info| info.shape.elem_count() as u64)
            .sum();
        Ok(Self {
            architecture,
            parameters,
        })
    }

    /// Whether mistral.rs loads this architecture with f32 weights.
    pub fn accepts_f32_weights(&self) -> bool {
        F32_WEIGHTS_ARCHITECTURES.contains(&self.architecture.as_str())
    }
}

/// Everything needed to build an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub model: ModelSource,
    pub kv_cache: KvCacheChoice,
    pub dtype: Dtype,
    /// Run on the CPU even when an accelerator is available.
    pub cpu: bool,
    /// How a GGUF model's quantized weights run (no effect on safetensors models).
    pub weights: Weights,
    /// In-situ quantization of a safetensors model's weights at load, as mistral.rs's `--isq`
    /// spells it (`q4k`, `q8_0`, `hqq4`, `afq4`, `fp8`, `4`, `8`, ...); `None` keeps them.
    pub isq: Option<String>,
    /// Most sequences scheduled at once.
    pub max_seqs: usize,
    /// Sequences kept for prefix-cache reuse; `None` turns the prefix cache off.
    pub prefix_cache_n: Option<usize>,
    /// Seed of the device's random generator (accelerators only: candle's CPU device has
    /// no seedable generator, and sampling here is seeded per request anyway).
    pub seed: Option<u64>,
}

impl EngineOptions {
    /// `model` with `kv_cache` on the best device of the build (the CUDA or Metal device when
    /// built with that feature, else the CPU), in that device's dtype.
    pub fn new(model: ModelSource, kv_cache: KvCacheChoice) -> Self {
        let cpu = !cfg!(any(feature = "cuda", feature = "metal"));
        Self {
            model,
            kv_cache,
            dtype: Dtype::default_for(cpu),
            cpu,
            weights: Weights::Auto,
            isq: None,
            max_seqs: 16,
            prefix_cache_n: None,
            seed: None,
        }
    }

    /// The same engine with another KV cache: how `bench` and `eval` build one engine per
    /// configuration on the model, device, dtype and weights the user chose.
    pub fn with_cache(&self, kv_cache: KvCacheChoice) -> Self {
        Self {
            kv_cache,
            ..self.clone()
        }
    }

    /// `weights` with `auto` decided: [`Weights::Q8_0`] for a GGUF model under
    /// [`SMALL_MODEL_PARAMETERS`] on the CPU, else [`Weights::AsIs`]. A safetensors model is
    /// `as-is` (its weights are not quantized); an explicit `f32` for an architecture whose
    /// loader needs quantized tensors ([`F32_WEIGHTS_ARCHITECTURES`]) is an error.
    pub fn effective_weights(&self) -> Result<Weights> {
        let ModelSource::Gguf(path) = &self.model else {
            return Ok(Weights::AsIs);
        };
        if self.weights == Weights::AsIs {
            return Ok(Weights::AsIs);
        }
        let gguf = GgufSummary::read(path)?;
        Ok(match self.weights {
            Weights::F32 if !gguf.accepts_f32_weights() => bail!(
                "--weights f32: mistral.rs 0.8.1 loads {} GGUF models with quantized weights only \
                 (use --weights q8_0 or as-is)",
                gguf.architecture
            ),
            Weights::Auto if self.cpu && gguf.parameters < SMALL_MODEL_PARAMETERS => Weights::Q8_0,
            Weights::Auto => Weights::AsIs,
            chosen => chosen,
        })
    }
}

impl EngineOptions {
    /// `isq` checked before the load: a known value (mistral.rs's own parser) for a
    /// safetensors model. A GGUF file is already quantized (`--weights` chooses how it runs).
    pub fn checked_isq(&self) -> Result<Option<String>> {
        let Some(isq) = &self.isq else {
            return Ok(None);
        };
        if matches!(self.model, ModelSource::Gguf(_)) {
            bail!(
                "--isq {isq}: in-situ quantization applies to safetensors models; a GGUF file is \
                 already quantized (--weights chooses how its weights run)"
            );
        }
        check_isq_value(isq)?;
        Ok(Some(isq.clone()))
    }
}

/// `--isq VALUE` checked by mistral.rs's own parser (`pipeline/isq.rs`), one line if unknown.
pub fn check_isq_value(isq: &str) -> Result<()> {
    mistralrs_core::parse_isq_value(isq, None)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("invalid value `{isq}` for --isq: {}", first_line(&e)))
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// How a loaded model's cache layers are held: counted by the patched mistral.rs as the
/// model builds its caches (`kv_cache_layer_census`), so a server can say where LogQuant is
/// and is not, and why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheLayers {
    /// Full-attention layers held by the selected backend (LogQuant, pass-through).
    pub backend: usize,
    /// Full-attention layers in mistral.rs's own cache (the default cache was chosen).
    pub stock_full_attention: usize,
    /// Sliding-window layers: mistral.rs's rotating cache, which keeps only the window.
    pub sliding_window: usize,
    /// Layers that attend over another layer's cache (Gemma 3n, Gemma 4) and hold none.
    pub shared: usize,
    /// Recurrent layers of a hybrid model (linear attention, Mamba): a fixed-size state.
    pub recurrent: usize,
}

impl CacheLayers {
    fn from_census(c: mistralrs_core::kv_cache_backend::CacheLayerCensus) -> Self {
        Self {
            backend: c.backend,
            stock_full_attention: c.stock_full_attention,
            sliding_window: c.sliding_window,
            shared: c.shared,
            recurrent: c.recurrent,
        }
    }

    /// Layers counted in every kind.
    pub fn total(&self) -> usize {
        self.backend
            + self.stock_full_attention
            + self.sliding_window
            + self.shared
            + self.recurrent
    }

    /// One phrase: where `cache` (the chosen cache's name) is and where it is not, and why.
    pub fn describe(&self, cache: &str) -> String {
        let mut others = Vec::new();
        if self.stock_full_attention > 0 && self.backend > 0 {
            others.push(format!(
                "{} in mistral.rs's own cache",
                self.stock_full_attention
            ));
        }
        if self.sliding_window > 0 {
            others.push(format!(
                "{} sliding-window layers keep mistral.rs's rotating cache",
                self.sliding_window
            ));
        }
        if self.shared > 0 {
            others.push(format!("{} layers read another layer's cache", self.shared));
        }
        if self.recurrent > 0 {
            others.push(format!("{} recurrent layers hold a state", self.recurrent));
        }
        let held = if self.backend > 0 {
            self.backend
        } else {
            self.stock_full_attention
        };
        let mut text = format!("{cache} in {held} of {} layers", self.total());
        if !others.is_empty() {
            text.push_str(": ");
            text.push_str(&others.join(", "));
        }
        text
    }
}

/// The cache layers of each model loaded by this process, by model name.
static CACHE_LAYERS: std::sync::Mutex<Vec<(String, CacheLayers)>> =
    std::sync::Mutex::new(Vec::new());

/// How model `name`'s cache layers are held (the last load of that name), if it was loaded.
pub fn cache_layers(name: &str) -> Option<CacheLayers> {
    CACHE_LAYERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, layers)| *layers)
}

/// Serializes "select backend, load model": the selection is process-wide and read while the
/// model's caches are built.
static LOAD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn model_selected(source: &ModelSource, dtype: ModelDType) -> Result<ModelSelected> {
    let path_str = |p: &Path| -> Result<String> {
        p.to_str()
            .map(str::to_string)
            .with_context(|| format!("model path {} is not valid UTF-8", p.display()))
    };
    Ok(match source {
        ModelSource::Gguf(path) => ModelSelected::GGUF {
            tok_model_id: None,
            quantized_model_id: path_str(path.parent().context("GGUF path has no directory")?)?,
            quantized_filename: path_str(Path::new(
                path.file_name().context("GGUF path has no file name")?,
            ))?,
            dtype,
            topology: None,
            max_seq_len: AutoDeviceMapParams::DEFAULT_MAX_SEQ_LEN,
            max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
        },
        // mistral.rs's auto loader: reads config.json's architecture and picks the text,
        // multimodal or hybrid loader, as `mistralrs run -m` does.
        ModelSource::Safetensors(dir) | ModelSource::Hub { dir, .. } => ModelSelected::Run {
            model_id: path_str(dir)?,
            tokenizer_json: None,
            dtype,
            topology: None,
            organization: None,
            write_uqff: None,
            from_uqff: None,
            imatrix: None,
            calibration_file: None,
            max_edge: None,
            max_seq_len: AutoDeviceMapParams::DEFAULT_MAX_SEQ_LEN,
            max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
            max_num_images: None,
            max_image_length: None,
            hf_cache_path: None,
            matformer_config_path: None,
            matformer_slice_name: None,
        },
    })
}

/// Load the model and start an engine with the chosen KV cache.
///
/// Under tensor parallelism ([`crate::tensor_parallel`], a `ring` build) this loads this rank's
/// share of the model; on a worker rank (rank >= 1) it never returns: the process serves rank
/// 0's requests until it is killed.
pub async fn build_engine(options: &EngineOptions) -> Result<Arc<MistralRs>> {
    register_backends();
    if let Some(rank) = crate::tensor_parallel::active()? {
        check_tensor_parallel_model(&options.model, rank.config.world_size)?;
    }
    let weights = options.effective_weights()?;
    let isq = options.checked_isq()?;
    let _guard = LOAD_LOCK.lock().await;
    let backend = match &options.kv_cache {
        KvCacheChoice::Default => None,
        KvCacheChoice::LogQuant(config) => {
            let config = config.validate()?;
            register_logquant(config);
            Some(LOGQUANT)
        }
        KvCacheChoice::Backend(name) => Some(name.as_str()),
    };
    select_kv_cache_backend(backend).map_err(|e| anyhow::anyhow!("{e}"))?;
    // mistral.rs names a local model by its path; the alias makes the model's name (file or
    // directory name) its id in `/v1/models`, in requests and in the engine's logs. The path
    // stays accepted as a second alias. (Responses carry the pipeline's name, the path: the
    // server renames them: the binary's `cli/openai.rs`.)
    let name = options.model.model_id();
    let selected = model_selected(&options.model, options.dtype.to_model_dtype())?;
    let mut builder = MistralRsForServerBuilder::new()
        .with_model_config(ModelConfig::new(name.clone(), selected).with_alias(name))
        .with_in_situ_quant_optional(isq)
        .with_token_source(TokenSource::None)
        .with_max_seqs(options.max_seqs)
        .with_cpu(options.cpu)
        .with_seed_optional(options.seed.filter(|_| !options.cpu))
        .set_paged_attn(Some(false));
    // Sliding-window models too: core patch 0026 fits a mask to the rotating cache's keys after
    // a prefix hit past the window (mistral.rs 0.8.1 failed there with a 500).
    let prefix_cache_n = options.prefix_cache_n.unwrap_or(0);
    builder = builder.with_prefix_cache_n(prefix_cache_n);
    if !options.cpu {
        // mistral.rs would turn paged attention on for CUDA; its block tables bypass the
        // backend seam, so every engine here runs the seam's (or the stock) contiguous cache.
        tracing::info!(
            "paged attention is off: the KV cache is the {} cache",
            options.kv_cache.name()
        );
        if matches!(&options.kv_cache, KvCacheChoice::LogQuant(c) if c.kernel == crate::config::AttentionKernel::Fused)
        {
            tracing::warn!(
                "--kv-kernel fused has a CPU kernel only: on this device LogQuant attends through \
                 the portable path (dequantize, then mistral.rs's attention)"
            );
        }
    }
    if let ModelSource::Gguf(path) = &options.model {
        log_weights(path, weights);
    }
    let built = load_with_weights(builder, weights).await;
    // Read before the selection below resets the count.
    let layers = CacheLayers::from_census(kv_cache_layer_census());
    // Leave the process-wide selection as it was found: stock.
    let _ = select_kv_cache_backend(None);
    let engine =
        built.with_context(|| format!("cannot load model {}", options.model.model_id()))?;
    if backend.is_some() && layers.backend == 0 {
        // Never silently inert: a model whose caches bypass the seam runs the default cache.
        bail!(
            "--kv-cache {}: model {} holds no layer in it ({}); its attention caches are not \
             built through mistral.rs's cache constructors (LLaVA's full cache, for one): use \
             --kv-cache default",
            options.kv_cache.name(),
            options.model.model_id(),
            if layers.total() == 0 {
                "no layer was counted".to_string()
            } else {
                layers.describe("the backend")
            }
        );
    }
    tracing::info!(
        "KV cache of {}: {}",
        options.model.model_id(),
        layers.describe(options.kv_cache.name())
    );
    CACHE_LAYERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((options.model.model_id(), layers));
    Ok(engine)
}

/// mistral.rs 0.8.1 splits safetensors models only, and only heads that divide evenly: say so
/// before the load instead of a per-request shape error (or every rank running the whole
/// GGUF model).
fn check_tensor_parallel_model(model: &ModelSource, world_size: usize) -> Result<()> {
    let Some(dir) = model.safetensors_dir() else {
        bail!(
            "tensor parallelism splits safetensors models only (mistral.rs 0.8.1 has no split \
             for GGUF): give --model a safetensors model directory"
        );
    };
    let path = dir.join("config.json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let count = |key: &str| config.get(key).and_then(serde_json::Value::as_u64);
    let heads = count("num_attention_heads")
        .with_context(|| format!("{} has no num_attention_heads", path.display()))?
        as usize;
    let kv_heads = count("num_key_value_heads").map_or(heads, |k| k as usize);
    // A world larger than the KV heads replicates them (mistral.rs's `compute_kv_shard`).
    if !heads.is_multiple_of(world_size)
        || !(kv_heads.is_multiple_of(world_size) || world_size.is_multiple_of(kv_heads))
    {
        bail!(
            "{}: {heads} attention heads and {kv_heads} KV heads do not split over {world_size} \
             ranks (tensor parallelism needs both divisible by the world size)",
            dir.display()
        );
    }
    Ok(())
}

/// Load on a new thread with candle's dequantize switch set for `weights`. candle reads
/// `CANDLE_DEQUANTIZE_ALL` once per thread, at the thread's first quantized weight, so a
/// fresh thread is the only way for each engine of one process to get its own mode (the
/// tests build both kinds). The switch is set under `LOAD_LOCK`, which every load holds.
async fn load_with_weights(
    builder: MistralRsForServerBuilder,
    weights: Weights,
) -> Result<Arc<MistralRs>> {
    let value = if weights == Weights::F32 { "1" } else { "0" };
    std::env::set_var(DEQUANTIZE_ALL_ENV, value);
    mistralrs_quant::set_cpu_gguf_requantize(weights == Weights::Q8_0);
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("model-load".to_string())
        .spawn(move || {
            let built = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the model-load runtime")
                .and_then(|runtime| runtime.block_on(builder.build()));
            let _ = sender.send(built);
        })
        .context("cannot start the model-load thread")?;
    receiver
        .await
        .context("the model-load thread ended without a result")?
}

fn log_weights(path: &Path, weights: Weights) {
    let parameters = GgufSummary::read(path).map_or(0, |g| g.parameters);
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    match weights {
        Weights::F32 => tracing::info!(
            "weights: {:.0}M parameters dequantized to f32 at load (+{} MiB over the file; \
             --weights as-is keeps them quantized)",
            parameters as f64 / 1e6,
            (parameters * 4).saturating_sub(file_bytes) >> 20
        ),
        Weights::Q8_0 => tracing::info!(
            "weights: {:.0}M parameters, Q4_1/Q5_0/Q5_1 tensors requantized to Q8_0 at load \
             (SIMD dot products; prompts of {}+ tokens run on weights dequantized per matmul); \
             --weights as-is keeps them as stored",
            parameters as f64 / 1e6,
            mistralrs_quant::CPU_GEMM_MIN_ROWS
        ),
        _ => tracing::info!(
            "weights: {:.0}M parameters run as stored ({} MiB)",
            parameters as f64 / 1e6,
            file_bytes >> 20
        ),
    }
}
