//! Long-range retrieval through the decode path (`eval --task copy`): can the model still copy
//! a passage it saw `filler` tokens ago?
//!
//! Each prompt is `passage | separator | filler | separator | passage[..cut]`, with the
//! passage's first `prefix_percent` (40%) repeated; the model continues it greedily (special
//! tokens suppressed) for as many tokens as the passage has left. The score is the fraction of
//! the continuation's words (whitespace-separated, after detokenizing both) reproduced before
//! the first wrong word: 1.0 is a verbatim copy. Passages and fillers are token ranges of one
//! text: passage `i` starts `start + i * passage` tokens in, and its filler is the text half
//! its length further on (wrapping around), so a filler never contains its own passage.
//! Nothing here depends on the model: any tokenizer, any text long enough.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mistralrs_core::MistralRs;
use serde::{Deserialize, Serialize};

use crate::engine::{build_engine, EngineOptions, KvCacheChoice};
use crate::generate::{
    detokenize, finished_sequences, generate_greedy, leading_special_tokens, special_token_ids,
    tokenize, usage_of_next_finished,
};

/// What to ask: `prompts` passages of `passage` tokens, each after every filler length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySettings {
    /// Tokens of the text skipped before the first passage.
    pub start: usize,
    /// Tokens per passage.
    pub passage: usize,
    /// Percent of the passage repeated after the filler (the rest is to be continued).
    pub prefix_percent: usize,
    /// Passages (prompts) per filler length.
    pub prompts: usize,
    /// Filler lengths, in tokens.
    pub fillers: Vec<usize>,
}

impl CopySettings {
    /// Tokens of the passage repeated after the filler.
    pub fn cut(&self) -> usize {
        (self.passage * self.prefix_percent / 100).clamp(1, self.passage - 1)
    }
}

/// One configuration at one filler length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyCell {
    pub filler: usize,
    /// Score of each prompt, in order.
    pub scores: Vec<f64>,
    pub mean: f64,
    /// Prompts copied verbatim (score 1).
    pub verbatim: usize,
}

/// One configuration's scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyRow {
    pub config: String,
    pub cells: Vec<CopyCell>,
    /// Of the last prompt, at the longest filler.
    #[serde(flatten)]
    pub memory: RowMemory,
}

/// A retrieval row's memory: the KV cache of its last prompt, and its configuration's bits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RowMemory {
    /// KV-cache bytes of the last prompt, what the default cache would hold for it, and its
    /// cached tokens.
    pub cache_bytes: usize,
    pub dense_cache_bytes: usize,
    pub cached_tokens: usize,
    /// Mean bits per cached value at 4096 tokens of a 16-bit model, all overhead included
    /// (`KvCacheChoice::bits_per_value`); absent in JSON written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_value_4k: Option<f64>,
    /// Fraction of the last prompt's cached tokens held in full precision (see
    /// [`crate::eval::EvalRow::full_precision_fraction`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_precision_fraction: Option<f64>,
}

impl RowMemory {
    /// `config`'s bits, and the cache of the last prompt as `usage` records it.
    pub fn of(
        config: &KvCacheChoice,
        usage: &mistralrs_core::kv_cache_backend::LayerUsage,
    ) -> Self {
        Self {
            cache_bytes: usage.bytes,
            dense_cache_bytes: usage.dense_bytes,
            cached_tokens: usage.tokens,
            bits_per_value_4k: config.bits_per_value(4096),
            full_precision_fraction: crate::eval::full_precision_fraction(usage),
        }
    }
}

/// Fraction of `expected`'s words that `generated` reproduces before its first wrong word.
pub fn copy_score(expected: &str, generated: &str) -> f64 {
    let want: Vec<&str> = expected.split_whitespace().collect();
    if want.is_empty() {
        return 1.0;
    }
    let right = want
        .iter()
        .zip(generated.split_whitespace())
        .take_while(|(a, b)| **a == *b)
        .count();
    right as f64 / want.len() as f64
}

/// One prompt: its tokens and the continuation to reproduce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPrompt {
    pub prompt: Vec<u32>,
    pub expected: Vec<u32>,
}

/// The prompt of passage `index` after `filler` tokens of filler, from the text's `tokens`.
pub fn build_prompt(
    tokens: &[u32],
    separator: &[u32],
    settings: &CopySettings,
    index: usize,
    filler: usize,
) -> Result<CopyPrompt> {
    let n = tokens.len();
    let start = settings.start + index * settings.passage;
    if start + settings.passage > n {
        bail!(
            "the text has {n} tokens; passage {} needs {} (start {} + {} passages of {})",
            index + 1,
            start + settings.passage,
            settings.start,
            index + 1,
            settings.passage
        );
    }
    if filler + settings.passage > n / 2 {
        bail!(
            "a {filler}-token filler needs a text of at least {} tokens (it has {n})",
            2 * (filler + settings.passage)
        );
    }
    let passage = &tokens[start..start + settings.passage];
    let cut = settings.cut();
    let filler_start = start + n / 2;
    let mut prompt = Vec::with_capacity(filler + settings.passage + cut + 2 * separator.len());
    prompt.extend_from_slice(passage);
    prompt.extend_from_slice(separator);
    prompt.extend((0..filler).map(|k| tokens[(filler_start + k) % n]));
    prompt.extend_from_slice(separator);
    prompt.extend_from_slice(&passage[..cut]);
    Ok(CopyPrompt {
        prompt,
        expected: passage[cut..].to_vec(),
    })
}

/// One greedy prompt of a retrieval task: its tokens, how many tokens to generate, and the text
/// a right answer continues with.
#[derive(Debug, Clone)]
pub struct GreedyPrompt {
    pub prompt: Vec<u32>,
    pub max_new: usize,
    pub expected: String,
}

/// One configuration's answers to every prompt of a retrieval task.
#[derive(Debug, Clone)]
pub struct ConfigScores {
    pub config: KvCacheChoice,
    /// The score of each prompt, grouped as the prompts were.
    pub scores: Vec<Vec<f64>>,
    /// The cache's usage at the end of the last prompt.
    pub last_usage: mistralrs_core::kv_cache_backend::LayerUsage,
}

/// Every prompt answered greedily (special tokens suppressed) by each configuration in turn (the
/// default cache first, added if missing), each answer scored by `score(expected, generated)`.
/// `prompts` builds the prompts once, with the first engine (for its tokenizer). `progress` gets
/// a message per phase, `done` the number of prompts answered so far over all configurations.
pub async fn answer_with_each_config<F, Fut>(
    base: &EngineOptions,
    configs: &[KvCacheChoice],
    prompts: F,
    score: impl Fn(&str, &str) -> f64,
    progress: impl Fn(&str),
    done: impl Fn(usize),
) -> Result<Vec<ConfigScores>>
where
    F: FnOnce(Arc<MistralRs>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<(String, Vec<GreedyPrompt>)>>>,
{
    let mut configs = configs.to_vec();
    configs.retain(|c| *c != KvCacheChoice::Default);
    configs.insert(0, KvCacheChoice::Default);
    let suppressed = special_token_ids(&base.model)?;
    let mut answered = 0;
    let mut out = Vec::new();
    let mut prompts = Some(prompts);
    let mut groups: Vec<(String, Vec<GreedyPrompt>)> = Vec::new();
    for config in configs {
        progress(&format!("loading model with {}", config.label()));
        let engine = build_engine(&base.with_cache(config.clone())).await?;
        if let Some(build) = prompts.take() {
            groups = build(engine.clone()).await?;
        }
        let mut scores = Vec::new();
        let mut last_usage = None;
        for (label, group) in &groups {
            progress(&format!("{} {label}", config.label()));
            let mut group_scores = Vec::new();
            for p in group {
                let finished = finished_sequences();
                let out =
                    generate_greedy(&engine, p.prompt.clone(), p.max_new, &suppressed).await?;
                last_usage = usage_of_next_finished(finished).await;
                group_scores.push(score(&p.expected, &detokenize(&engine, out).await?));
                answered += 1;
                done(answered);
            }
            scores.push(group_scores);
        }
        drop(engine);
        out.push(ConfigScores {
            config,
            scores,
            last_usage: last_usage.unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Run the copy task with each configuration (the default cache first, added if missing).
/// `progress` gets a message per phase, `done` the number of prompts answered so far over all
/// configurations.
pub async fn evaluate_copy(
    base: &EngineOptions,
    text_path: &Path,
    settings: &CopySettings,
    configs: &[KvCacheChoice],
    progress: impl Fn(&str),
    done: impl Fn(usize),
) -> Result<Vec<CopyRow>> {
    if settings.passage < 2 || settings.prompts == 0 || settings.fillers.is_empty() {
        bail!("the copy task needs a passage of at least 2 tokens, 1 prompt and 1 filler length");
    }
    let text = std::fs::read_to_string(text_path)
        .with_context(|| format!("cannot read --text {}", text_path.display()))?;
    let build = |engine: Arc<MistralRs>| async move {
        let tokens = tokenize(&engine, &text).await?;
        let separator = tokenize(&engine, "\n\n").await?;
        // A BOS where the model's tokenizer puts one (Gemma), as in a served completion.
        let leading = leading_special_tokens(&engine).await?;
        let mut groups = Vec::new();
        for &filler in &settings.fillers {
            let mut at_filler = Vec::new();
            for i in 0..settings.prompts {
                let mut p = build_prompt(&tokens, &separator, settings, i, filler)?;
                p.prompt.splice(0..0, leading.iter().copied());
                at_filler.push(GreedyPrompt {
                    max_new: p.expected.len(),
                    expected: detokenize(&engine, p.expected).await?,
                    prompt: p.prompt,
                });
            }
            groups.push((format!("after {filler} filler tokens"), at_filler));
        }
        Ok(groups)
    };
    let answers = answer_with_each_config(base, configs, build, copy_score, progress, done).await?;
    Ok(answers
        .into_iter()
        .map(|a| CopyRow {
            config: a.config.label(),
            memory: RowMemory::of(&a.config, &a.last_usage),
            cells: settings
                .fillers
                .iter()
                .zip(a.scores)
                .map(|(&filler, scores)| CopyCell {
                    filler,
                    verbatim: scores.iter().filter(|&&s| s == 1.0).count(),
                    mean: scores.iter().sum::<f64>() / scores.len() as f64,
                    scores,
                })
                .collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_counts_words_before_the_first_error() {
        assert_eq!(copy_score("a b c d", "a b c d"), 1.0);
        assert_eq!(copy_score("a b c d", "a b x d"), 0.5);
        assert_eq!(copy_score("a b c d", "x b c d"), 0.0);
        // Whitespace differences are not errors; a truncated generation scores what it has.
        assert_eq!(copy_score(" a\nb  c d", "a b c"), 0.75);
        assert_eq!(copy_score("", "anything"), 1.0);
    }

    #[test]
    fn prompts_repeat_the_passage_prefix_after_an_unrelated_filler() {
        let tokens: Vec<u32> = (0..1000).collect();
        let settings = CopySettings {
            start: 10,
            passage: 20,
            prefix_percent: 40,
            prompts: 3,
            fillers: vec![100],
        };
        let p = build_prompt(&tokens, &[9999], &settings, 2, 100).unwrap();
        let passage: Vec<u32> = (50..70).collect();
        assert_eq!(&p.prompt[..20], &passage[..]);
        assert_eq!(p.prompt[20], 9999);
        assert_eq!(p.prompt[21], 550, "filler starts half the text further on");
        assert_eq!(p.prompt[121], 9999);
        assert_eq!(&p.prompt[122..], &passage[..8]);
        assert_eq!(p.expected, &passage[8..]);
        assert!(p.prompt[21..121].iter().all(|t| !passage.contains(t)));
        // Fillers wrap around the end of the text.
        let late = CopySettings {
            start: 900,
            ..settings.clone()
        };
        let p = build_prompt(&tokens, &[], &late, 0, 100).unwrap();
        assert_eq!(p.prompt[20], 400);
        let err = build_prompt(&tokens, &[], &settings, 0, 490).unwrap_err();
        assert!(err.to_string().contains("at least 1020 tokens"), "{err}");
    }
}
