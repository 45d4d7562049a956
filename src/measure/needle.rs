//! Passkey retrieval through the decode path (`eval --task needle`): a five-digit key is hidden
//! at a given depth of a long text, and the model is asked for it at the end. The task of
//! Mohtashami & Jaggi, *Landmark Attention* (arXiv 2305.16300, section 4.2), with the shared
//! text as the haystack instead of one repeated filler sentence, so that nothing but the key
//! repeats.
//!
//! Each prompt is `haystack[..at] | needle | haystack[at..] | question`, `length` tokens in all,
//! where the needle reads "The pass key is K. Remember it. K is the pass key." and the question
//! ends "The pass key is"; `at` puts `depth`% of the haystack before the needle (0: first, 100:
//! just before the question). The model continues greedily (special tokens suppressed); the
//! score is the fraction of the key's five digits it reproduces before the first wrong one (1.0:
//! the key). Prompt `i` of a cell takes its haystack from its own place in the text and its
//! own key (seeded by length, depth and `i`), so the cells do not share prompts.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mistralrs_core::MistralRs;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::engine::{EngineOptions, KvCacheChoice};
use crate::generate::{leading_special_tokens, tokenize};
use crate::retrieval::{answer_with_each_config, GreedyPrompt, RowMemory};

/// Digits in a pass key.
pub const KEY_DIGITS: usize = 5;

/// What to ask: `prompts` keys at each (length, depth).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedleSettings {
    /// Tokens of the text skipped before the first haystack.
    pub start: usize,
    /// Prompts per (length, depth).
    pub prompts: usize,
    /// Prompt lengths in tokens (haystack, needle and question together).
    pub lengths: Vec<usize>,
    /// Depths, in percent of the haystack before the needle.
    pub depths: Vec<usize>,
}

/// One configuration at one (length, depth).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NeedleCell {
    pub length: usize,
    pub depth: usize,
    /// Score of each prompt, in order.
    pub scores: Vec<f64>,
    pub mean: f64,
    /// Prompts answered with the whole key.
    pub exact: usize,
}

/// One configuration's scores, cells by length then depth.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NeedleRow {
    pub config: String,
    pub cells: Vec<NeedleCell>,
    /// Of the last prompt (the longest, deepest).
    #[serde(flatten)]
    pub memory: RowMemory,
}

impl NeedleRow {
    /// Every score at `length`, all depths together.
    pub fn scores_at_length(&self, length: usize) -> Vec<f64> {
        self.cells
            .iter()
            .filter(|c| c.length == length)
            .flat_map(|c| c.scores.iter().copied())
            .collect()
    }
}

/// The key of prompt `index` at (`length`, `depth`): five digits, the first not 0.
pub fn pass_key(length: usize, depth: usize, index: usize) -> u32 {
    let seed = (length as u64) << 32 ^ (depth as u64) << 16 ^ index as u64;
    ChaCha8Rng::seed_from_u64(seed).random_range(10_000..100_000)
}

/// The needle's sentence for `key`, set off by blank lines.
pub fn needle_text(key: u32) -> String {
    format!("\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n")
}

/// What follows the haystack: the question, and the start of the answer.
pub const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

/// Fraction of `key`'s digits that `generated` reproduces before its first wrong one, reading
/// the first run of digits after any leading whitespace (" 12345." scores 1 for "12345").
pub fn key_score(key: &str, generated: &str) -> f64 {
    let want: Vec<char> = key.chars().collect();
    if want.is_empty() {
        return 1.0;
    }
    let right = generated
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .zip(&want)
        .take_while(|(a, b)| a == *b)
        .count();
    right as f64 / want.len() as f64
}

/// The prompt of `index` at (`length`, `depth`) from the text's `tokens`: `haystack` tokens from
/// the text (wrapping around its end) with `needle` inserted `depth`% of the way in, then
/// `question`.
pub fn build_prompt(
    tokens: &[u32],
    needle: &[u32],
    question: &[u32],
    settings: &NeedleSettings,
    index: usize,
    length: usize,
    depth: usize,
) -> Result<Vec<u32>> {
    let n = tokens.len();
    let fixed = needle.len() + question.len();
    if length <= fixed {
        bail!("a {length}-token prompt cannot hold the needle and the question ({fixed} tokens)");
    }
    if depth > 100 {
        bail!("depth {depth}% is not a percentage");
    }
    let haystack = length - fixed;
    if haystack > n {
        bail!("a {length}-token prompt needs a text of at least {haystack} tokens (it has {n})");
    }
    // Haystacks of one cell start 1/prompts of the text apart.
    let offset = settings.start + index * (n / settings.prompts.max(1));
    let at = haystack * depth / 100;
    let mut prompt = Vec::with_capacity(length);
    prompt.extend((0..at).map(|k| tokens[(offset + k) % n]));
    prompt.extend_from_slice(needle);
    prompt.extend((at..haystack).map(|k| tokens[(offset + k) % n]));
    prompt.extend_from_slice(question);
    Ok(prompt)
}

/// Run the needle task with each configuration (the default cache first, added if missing).
/// `progress` gets a message per phase, `done` the number of prompts answered so far over all
/// configurations.
pub async fn evaluate_needle(
    base: &EngineOptions,
    text_path: &Path,
    settings: &NeedleSettings,
    configs: &[KvCacheChoice],
    progress: impl Fn(&str),
    done: impl Fn(usize),
) -> Result<Vec<NeedleRow>> {
    if settings.prompts == 0 || settings.lengths.is_empty() || settings.depths.is_empty() {
        bail!("the needle task needs 1 prompt, 1 length and 1 depth");
    }
    let text = std::fs::read_to_string(text_path)
        .with_context(|| format!("cannot read --text {}", text_path.display()))?;
    let cells: Vec<(usize, usize)> = settings
        .lengths
        .iter()
        .flat_map(|&l| settings.depths.iter().map(move |&d| (l, d)))
        .collect();
    let cells = &cells;
    let build = |engine: Arc<MistralRs>| async move {
        let tokens = tokenize(&engine, &text).await?;
        let question = tokenize(&engine, QUESTION).await?;
        // A BOS where the model's tokenizer puts one (Gemma), as in a served completion.
        let leading = leading_special_tokens(&engine).await?;
        let mut groups = Vec::new();
        for &(length, depth) in cells {
            let mut group = Vec::new();
            for i in 0..settings.prompts {
                let key = pass_key(length, depth, i);
                let needle = tokenize(&engine, &needle_text(key)).await?;
                let answer = tokenize(&engine, &format!(" {key}")).await?;
                let body_length = length.saturating_sub(leading.len());
                let mut prompt =
                    build_prompt(&tokens, &needle, &question, settings, i, body_length, depth)?;
                prompt.splice(0..0, leading.iter().copied());
                group.push(GreedyPrompt {
                    prompt,
                    // Room for a space token or a tokenizer that splits digits differently.
                    max_new: answer.len() + 2,
                    expected: key.to_string(),
                });
            }
            groups.push((format!("at {length} tokens, depth {depth}%"), group));
        }
        Ok(groups)
    };
    let answers = answer_with_each_config(base, configs, build, key_score, progress, done).await?;
    Ok(answers
        .into_iter()
        .map(|a| NeedleRow {
            config: a.config.label(),
            memory: RowMemory::of(&a.config, &a.last_usage),
            cells: cells
                .iter()
                .zip(a.scores)
                .map(|(&(length, depth), scores)| NeedleCell {
                    length,
                    depth,
                    exact: scores.iter().filter(|&&s| s == 1.0).count(),
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
    fn the_score_counts_key_digits_before_the_first_error() {
        assert_eq!(key_score("12345", " 12345. Remember"), 1.0);
        assert_eq!(key_score("12345", "12355"), 0.6);
        assert_eq!(key_score("12345", "\n1234"), 0.8);
        assert_eq!(key_score("12345", " the key"), 0.0);
        // Digits after other text are not the answer.
        assert_eq!(key_score("12345", " is 12345"), 0.0);
        // More digits than the key: the key's digits are all there.
        assert_eq!(key_score("12345", "123456"), 1.0);
    }

    #[test]
    fn keys_have_five_digits_and_differ_between_prompts() {
        let keys: Vec<u32> = (0..50).map(|i| pass_key(4096, 50, i)).collect();
        assert!(keys
            .iter()
            .all(|k| k.to_string().len() == KEY_DIGITS && (10_000..100_000).contains(k)));
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert!(distinct.len() > 45, "{keys:?}");
        assert_ne!(pass_key(4096, 50, 0), pass_key(4096, 25, 0));
        assert_ne!(pass_key(4096, 50, 0), pass_key(2048, 50, 0));
        assert_eq!(pass_key(1024, 0, 3), pass_key(1024, 0, 3));
    }

    #[test]
    fn the_needle_sits_at_its_depth_of_a_prompt_of_the_asked_length() {
        let tokens: Vec<u32> = (0..1000).collect();
        let needle = [5000, 5001, 5002];
        let question = [6000, 6001];
        let settings = NeedleSettings {
            start: 10,
            prompts: 4,
            lengths: vec![105],
            depths: vec![0, 50, 100],
        };
        let at = |p: &[u32]| p.iter().position(|&t| t == 5000).unwrap();
        // 100 haystack tokens: the needle after 0, 50 and 100 of them.
        let p = build_prompt(&tokens, &needle, &question, &settings, 0, 105, 0).unwrap();
        assert_eq!(p.len(), 105);
        assert_eq!((at(&p), p[3]), (0, 10));
        let p = build_prompt(&tokens, &needle, &question, &settings, 0, 105, 50).unwrap();
        assert_eq!((at(&p), p[49], p[53]), (50, 59, 60));
        let p = build_prompt(&tokens, &needle, &question, &settings, 0, 105, 100).unwrap();
        assert_eq!(at(&p), 100);
        assert_eq!(&p[100..], &[5000, 5001, 5002, 6000, 6001]);
        // Prompt 2 starts half the text further on; haystacks wrap around the text's end.
        let p = build_prompt(&tokens, &needle, &question, &settings, 2, 105, 0).unwrap();
        assert_eq!(p[3], 510);
        let p = build_prompt(&tokens, &needle, &question, &settings, 3, 105, 100).unwrap();
        assert_eq!((p[0], p[99]), (760, 859));
        let late = NeedleSettings {
            start: 950,
            ..settings.clone()
        };
        let p = build_prompt(&tokens, &needle, &question, &late, 0, 105, 100).unwrap();
        assert_eq!((p[49], p[50]), (999, 0));
        let err = build_prompt(&tokens, &needle, &question, &settings, 0, 5, 0).unwrap_err();
        assert!(err.to_string().contains("cannot hold"), "{err}");
        let err = build_prompt(&tokens, &needle, &question, &settings, 0, 2000, 0).unwrap_err();
        assert!(err.to_string().contains("at least 1995 tokens"), "{err}");
    }
}
