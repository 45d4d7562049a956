//! Driving the engine token by token with exact token ids: greedy generation with end-of-sequence
//! suppressed (so every run generates the asked length), and tokenization.
//!
//! A logits processor attached to the request chooses each token itself (argmax over the
//! non-suppressed vocabulary) and masks every other logit, so the engine's sampler can only
//! take that token. The processor sees every decode step of the real engine, cache included.

use std::collections::HashSet;
use std::fs::File;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use either::Either;
use mistralrs_core::{
    Constraint, CustomLogitsProcessor, DetokenizationRequest, MistralRs, NormalRequest, Request,
    RequestMessage, Response, SamplingParams, TokenizationRequest,
};

use crate::model_source::ModelSource;
use mistralrs_core::kv_cache_backend::{kv_cache_usage, LayerUsage};

/// A step's logits on the host, as f32.
pub(crate) fn host_logits(logits: &Tensor) -> candle_core::Result<Vec<f32>> {
    logits
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// Logits that leave the sampler no choice but `token`.
fn forced_logits(logits: &Tensor, token: usize) -> candle_core::Result<Tensor> {
    let mut forced = vec![f32::NEG_INFINITY; logits.elem_count()];
    forced[token] = 0.0;
    Tensor::from_vec(forced, logits.shape(), logits.device())?.to_dtype(logits.dtype())
}

/// Picks the most likely token that is not suppressed, and records it.
struct GreedyChooser {
    suppressed: HashSet<u32>,
    chosen: Mutex<Vec<(u32, f32)>>,
}

impl CustomLogitsProcessor for GreedyChooser {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> candle_core::Result<Tensor> {
        let values = host_logits(logits)?;
        let mut best: Option<(usize, f32)> = None;
        let mut second = f32::NEG_INFINITY;
        for (i, &x) in values.iter().enumerate() {
            if self.suppressed.contains(&(i as u32)) || x.is_nan() {
                continue;
            }
            match best {
                Some((_, b)) if x <= b => second = second.max(x),
                _ => {
                    if let Some((_, b)) = best {
                        second = second.max(b);
                    }
                    best = Some((i, x));
                }
            }
        }
        let Some((token, top)) = best else {
            candle_core::bail!("no token can be chosen: every logit is suppressed or NaN");
        };
        self.chosen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((token as u32, top - second));
        forced_logits(logits, token)
    }
}

/// A completion request in the engine's queue; [`Submitted::finish`] waits for it.
pub struct Submitted {
    responses: tokio::sync::mpsc::Receiver<Response>,
    engine: tokio::sync::mpsc::Sender<Request>,
}

/// Put one completion request for `prompt` into the engine's queue, `processor` shaping each
/// step's logits, and return once it is queued. The engine reads its queue only between
/// steps, so requests queued while it is inside a step are all admitted at its next
/// scheduling pass.
pub async fn submit(
    engine: &MistralRs,
    prompt: Vec<u32>,
    max_new: usize,
    processor: Arc<dyn CustomLogitsProcessor>,
) -> Result<Submitted> {
    let (tx, responses) = tokio::sync::mpsc::channel(16);
    let mut sampling = SamplingParams::deterministic();
    sampling.max_len = Some(max_new);
    let request = NormalRequest {
        messages: RequestMessage::CompletionTokens(prompt),
        sampling_params: sampling,
        response: tx,
        return_logprobs: false,
        is_streaming: false,
        id: engine.next_request_id(),
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: Some(vec![processor]),
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    };
    let engine = engine.get_sender(None).context("engine has no model")?;
    engine
        .send(Request::Normal(Box::new(request)))
        .await
        .context("engine stopped")?;
    Ok(Submitted { responses, engine })
}

impl Submitted {
    /// Wait until the request has finished and the engine has released its sequence (so that
    /// [`kv_cache_usage`] already counts it as finished).
    pub async fn finish(mut self) -> Result<()> {
        loop {
            match self
                .responses
                .recv()
                .await
                .context("engine dropped the request")?
            {
                Response::CompletionDone(_) => break,
                Response::CompletionChunk(_) => continue,
                Response::CompletionModelError(msg, _) => bail!("model error: {msg}"),
                Response::InternalError(e) => bail!("engine error: {e}"),
                Response::ValidationError(e) => bail!("invalid request: {e}"),
                other => bail!("unexpected response: {:?}", std::mem::discriminant(&other)),
            }
        }
        // The engine answers in the middle of a step and releases the step's finished
        // sequences at its end; it reads requests only between steps. So a request sent now is
        // answered after that release.
        tokenize_with(&self.engine, "", false).await?;
        Ok(())
    }
}

/// Send one completion request for `prompt` and wait for it to finish (see [`submit`]).
pub(crate) async fn run_request(
    engine: &MistralRs,
    prompt: Vec<u32>,
    max_new: usize,
    processor: Arc<dyn CustomLogitsProcessor>,
) -> Result<()> {
    submit(engine, prompt, max_new, processor)
        .await?
        .finish()
        .await
}

/// Greedy generation of exactly `max_new` tokens after `prompt`, never choosing a `suppressed`
/// token (pass the special tokens to run past end-of-sequence).
pub async fn generate_greedy(
    engine: &MistralRs,
    prompt: Vec<u32>,
    max_new: usize,
    suppressed: &[u32],
) -> Result<Vec<u32>> {
    submit_greedy(engine, prompt, max_new, suppressed)
        .await?
        .tokens()
        .await
}

/// [`generate_greedy`], with each step's margin: the chosen logit minus the runner-up's. A
/// small margin is a near-tie that any rounding difference may flip.
pub async fn generate_greedy_with_margins(
    engine: &MistralRs,
    prompt: Vec<u32>,
    max_new: usize,
    suppressed: &[u32],
) -> Result<Vec<(u32, f32)>> {
    submit_greedy(engine, prompt, max_new, suppressed)
        .await?
        .tokens_with_margins()
        .await
}

/// A [`generate_greedy`] request in the engine's queue (see [`submit`]).
pub struct GreedyRequest {
    submitted: Submitted,
    chooser: Arc<GreedyChooser>,
    max_new: usize,
}

/// Queue a [`generate_greedy`] request and return once it is queued; its tokens come from
/// [`GreedyRequest::tokens`].
pub async fn submit_greedy(
    engine: &MistralRs,
    prompt: Vec<u32>,
    max_new: usize,
    suppressed: &[u32],
) -> Result<GreedyRequest> {
    let chooser = Arc::new(GreedyChooser {
        suppressed: suppressed.iter().copied().collect(),
        chosen: Mutex::new(Vec::with_capacity(max_new)),
    });
    let submitted = submit(engine, prompt, max_new, chooser.clone()).await?;
    Ok(GreedyRequest {
        submitted,
        chooser,
        max_new,
    })
}

impl GreedyRequest {
    /// The generated tokens, once the request has finished.
    pub async fn tokens(self) -> Result<Vec<u32>> {
        Ok(self
            .tokens_with_margins()
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .collect())
    }

    /// The generated tokens with their margins (see [`generate_greedy_with_margins`]).
    pub async fn tokens_with_margins(self) -> Result<Vec<(u32, f32)>> {
        self.submitted.finish().await?;
        let chosen = self
            .chooser
            .chosen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if chosen.len() != self.max_new {
            bail!(
                "asked for {} tokens, the engine generated {}",
                self.max_new,
                chosen.len()
            );
        }
        Ok(chosen)
    }
}

/// What one teacher-forced step saw.
#[derive(Debug, Clone)]
pub struct ScoredStep {
    /// Natural-log probability of the reference token.
    pub logprob: f64,
    /// The most likely token.
    pub argmax: u32,
    /// The whole log-softmax distribution, when asked for.
    pub distribution: Option<Vec<f32>>,
}

/// Records each step's distribution, then forces the reference token.
struct TeacherForcer {
    targets: Vec<u32>,
    keep_distributions: bool,
    steps: Mutex<Vec<ScoredStep>>,
    /// Called with the number of tokens scored so far, after each step.
    on_step: Option<StepCallback>,
}

/// Progress callback of [`score_teacher_forced_with_progress`]: tokens scored so far.
pub type StepCallback = Arc<dyn Fn(usize) + Send + Sync>;

impl CustomLogitsProcessor for TeacherForcer {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> candle_core::Result<Tensor> {
        let values = host_logits(logits)?;
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&target) = self.targets.get(steps.len()) else {
            candle_core::bail!(
                "teacher forcing ran past its {} targets",
                self.targets.len()
            );
        };
        let log_softmax = log_softmax(&values);
        let argmax = log_softmax
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        steps.push(ScoredStep {
            logprob: log_softmax[target as usize] as f64,
            argmax,
            distribution: self.keep_distributions.then_some(log_softmax),
        });
        if let Some(on_step) = &self.on_step {
            on_step(steps.len());
        }
        forced_logits(logits, target as usize)
    }
}

/// log-softmax in f64 accumulation.
pub fn log_softmax(values: &[f32]) -> Vec<f32> {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = values.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    values.iter().map(|&x| (x as f64 - log_z) as f32).collect()
}

/// Score `targets` after `prefix` through the decode path: the prefix is prefilled, then every
/// target token is predicted in its own cached decode step (attending to whatever the cache
/// holds) and forced as the next input.
pub async fn score_teacher_forced(
    engine: &MistralRs,
    prefix: Vec<u32>,
    targets: Vec<u32>,
    keep_distributions: bool,
) -> Result<Vec<ScoredStep>> {
    score_teacher_forced_with_progress(engine, prefix, targets, keep_distributions, None).await
}

/// [`score_teacher_forced`], reporting each scored token to `on_step`.
pub async fn score_teacher_forced_with_progress(
    engine: &MistralRs,
    prefix: Vec<u32>,
    targets: Vec<u32>,
    keep_distributions: bool,
    on_step: Option<StepCallback>,
) -> Result<Vec<ScoredStep>> {
    if prefix.is_empty() || targets.is_empty() {
        bail!("teacher forcing needs a non-empty prefix and targets");
    }
    let n = targets.len();
    let forcer = Arc::new(TeacherForcer {
        targets,
        keep_distributions,
        steps: Mutex::new(Vec::with_capacity(n)),
        on_step,
    });
    run_request(engine, prefix, n, forcer.clone()).await?;
    let steps = std::mem::take(&mut *forcer.steps.lock().unwrap_or_else(|e| e.into_inner()));
    if steps.len() != n {
        bail!(
            "scored {} of {n} tokens (the sequence ended early)",
            steps.len()
        );
    }
    Ok(steps)
}

/// Usage of the next sequence to finish after `finished_before` sequences had finished (see
/// [`kv_cache_usage`]). Every request of this module returns only after the engine has
/// released its sequence ([`Submitted::finish`]), so the record is read once, no waiting;
/// `None` if no sequence finished since.
pub async fn usage_of_next_finished(finished_before: usize) -> Option<LayerUsage> {
    let usage = kv_cache_usage();
    (usage.finished_sequences > finished_before)
        .then_some(usage.last_finished)
        .flatten()
}

/// Number of sequences finished so far (for [`usage_of_next_finished`]).
pub fn finished_sequences() -> usize {
    kv_cache_usage().finished_sequences
}

/// Token ids of `text` (no special tokens added).
pub async fn tokenize(engine: &MistralRs, text: &str) -> Result<Vec<u32>> {
    tokenize_with(
        &engine.get_sender(None).context("engine has no model")?,
        text,
        false,
    )
    .await
}

/// What the model's tokenizer puts before a text of its own accord (a BOS token for Gemma or
/// Llama 2, nothing for SmolLM2): the tokens of the empty text with special tokens added.
pub async fn leading_special_tokens(engine: &MistralRs) -> Result<Vec<u32>> {
    tokenize_with(
        &engine.get_sender(None).context("engine has no model")?,
        "",
        true,
    )
    .await
}

/// [`tokenize`] through the engine's request queue `engine`.
async fn tokenize_with(
    engine: &tokio::sync::mpsc::Sender<Request>,
    text: &str,
    add_special_tokens: bool,
) -> Result<Vec<u32>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let request = TokenizationRequest {
        text: Either::Right(text.to_string()),
        tools: None,
        add_generation_prompt: false,
        add_special_tokens,
        enable_thinking: None,
        reasoning_effort: None,
        response: tx,
    };
    engine
        .send(Request::Tokenize(request))
        .await
        .context("engine stopped")?;
    rx.recv().await.context("engine dropped the request")?
}

/// The text of `tokens` (special tokens skipped).
pub async fn detokenize(engine: &MistralRs, tokens: Vec<u32>) -> Result<String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let request = DetokenizationRequest {
        tokens,
        skip_special_tokens: true,
        response: tx,
    };
    engine
        .get_sender(None)
        .context("engine has no model")?
        .send(Request::Detokenize(request))
        .await
        .context("engine stopped")?;
    rx.recv().await.context("engine dropped the request")?
}

/// The model's special (control) tokens: suppressing them keeps generation going past
/// end-of-sequence.
pub fn special_token_ids(source: &ModelSource) -> Result<Vec<u32>> {
    match source {
        ModelSource::Gguf(path) => {
            let mut file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let content = candle_core::quantized::gguf_file::Content::read(&mut file)
                .with_context(|| format!("cannot read GGUF metadata of {}", path.display()))?;
            let types = content
                .metadata
                .get("tokenizer.ggml.token_type")
                .context("GGUF has no tokenizer.ggml.token_type")?
                .to_vec()
                .context("tokenizer.ggml.token_type is not an array")?;
            // GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
            let mut ids = Vec::new();
            for (id, ty) in types.iter().enumerate() {
                if matches!(ty.to_i32(), Ok(3)) {
                    ids.push(id as u32);
                }
            }
            Ok(ids)
        }
        ModelSource::Safetensors(dir) | ModelSource::Hub { dir, .. } => {
            let path = dir.join("tokenizer.json");
            let json: serde_json::Value = serde_json::from_reader(
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?,
            )
            .with_context(|| format!("{} is not JSON", path.display()))?;
            Ok(json["added_tokens"]
                .as_array()
                .map(|tokens| {
                    tokens
                        .iter()
                        .filter(|t| t["special"].as_bool() == Some(true))
                        .filter_map(|t| t["id"].as_u64().map(|id| id as u32))
                        .collect()
                })
                .unwrap_or_default())
        }
    }
}
