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
    Constraint, CustomLogitsProcessor, MistralRs, NormalRequest, Request, RequestMessage,
    Response, SamplingParams, TokenizationRequest,
};

use crate::model_source::ModelSource;

/// Picks the most likely token that is not suppressed, and records it.
struct GreedyChooser {
    suppressed: HashSet<u32>,
    chosen: Mutex<Vec<u32>>,
}

impl CustomLogitsProcessor for GreedyChooser {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> candle_core::Result<Tensor> {
        let values = logits.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut best: Option<(usize, f32)> = None;
        for (i, &x) in values.iter().enumerate() {
            if self.suppressed.contains(&(i as u32)) || x.is_nan() {
                continue;
            }
            if best.is_none_or(|(_, b)| x > b) {
                best = Some((i, x));
            }
        }
        let Some((token, _)) = best else {
            candle_core::bail!("no token can be chosen: every logit is suppressed or NaN");
        };
        self.chosen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(token as u32);
        let mut forced = vec![f32::NEG_INFINITY; values.len()];
        forced[token] = 0.0;
        Tensor::from_vec(forced, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

/// Send one completion request for `prompt` and wait for it to finish.
async fn run_request(
    engine: &MistralRs,
    prompt: Vec<u32>,
    max_new: usize,
    processor: Arc<dyn CustomLogitsProcessor>,
) -> Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
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
    engine
        .get_sender(None)
        .context("engine has no model")?
        .send(Request::Normal(Box::new(request)))
        .await
        .context("engine stopped")?;
    loop {
        match rx.recv().await.context("engine dropped the request")? {
            Response::CompletionDone(_) => return Ok(()),
            Response::CompletionChunk(_) => continue,
            Response::CompletionModelError(msg, _) => bail!("model error: {msg}"),
            Response::InternalError(e) => bail!("engine error: {e}"),
            Response::ValidationError(e) => bail!("invalid request: {e}"),
            other => bail!("unexpected response: {:?}", std::mem::discriminant(&other)),
        }
    }
}

/// Greedy generation of exactly `max_new` tokens after `prompt`, never choosing a `suppressed`
/// token (pass the special tokens to run past end-of-sequence).
pub async fn generate_greedy(
    engine: &MistralRs,
    prompt: Vec<u32>,
    max_new: usize,
    suppressed: &[u32],
) -> Result<Vec<u32>> {
    let chooser = Arc::new(GreedyChooser {
        suppressed: suppressed.iter().copied().collect(),
        chosen: Mutex::new(Vec::with_capacity(max_new)),
    });
    run_request(engine, prompt, max_new, chooser.clone()).await?;
    let chosen = chooser
        .chosen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if chosen.len() != max_new {
        bail!("asked for {max_new} tokens, the engine generated {}", chosen.len());
    }
    Ok(chosen)
}

/// Token ids of `text` (no special tokens added).
pub async fn tokenize(engine: &MistralRs, text: &str) -> Result<Vec<u32>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let request = TokenizationRequest {
        text: Either::Right(text.to_string()),
        tools: None,
        add_generation_prompt: false,
        add_special_tokens: false,
        enable_thinking: None,
        reasoning_effort: None,
        response: tx,
    };
    engine
        .get_sender(None)
        .context("engine has no model")?
        .send(Request::Tokenize(request))
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
        ModelSource::Safetensors(dir) => {
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
