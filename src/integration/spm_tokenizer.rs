//! A SentencePiece BPE vocabulary stored in a GGUF (`tokenizer.ggml.model = "llama"`: pieces,
//! scores, piece types) as a Hugging Face `tokenizer.json` that tokenizes as SentencePiece does.
//!
//! SentencePiece's BPE repeatedly merges the adjacent pair whose merged piece has the highest
//! score (the leftmost of equals). A `tokenizers` BPE model merges the pair of lowest rank, so
//! every split `left + right` of a normal piece into two normal pieces becomes one merge, ranked
//! by the merged piece's score (the same construction as `tokenizers`'
//! `SentencePieceExtractor`). What SentencePiece does around the merges is mapped to the
//! pipeline's other stages:
//! - spaces are escaped to `▁` (normalizer `Replace`); no dummy prefix when the GGUF says
//!   `add_space_prefix = false` (Gemma);
//! - user-defined pieces (Gemma: newline and space runs, `[multimodal]`, image markers) are
//!   matched whole before BPE: non-special added tokens matched on the raw text, longest first;
//! - characters outside the vocabulary fall back to `<0xNN>` byte pieces (`byte_fallback`);
//! - control pieces (`<bos>`, `<start_of_turn>`, `<unusedN>` ...) are special added tokens. Here
//!   the two differ on purpose: SentencePiece never reads a control piece from text, while
//!   Hugging Face tokenizers (and so mistral.rs and chat templates) do;
//! - the post-processor prepends the BOS piece when the GGUF's `add_bos_token` says so.
//!
//! Equality with the `sentencepiece` library is tested in `tests/gemma3.rs`.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

/// SentencePiece's whitespace marker (U+2581).
const SPACE_MARK: &str = "\u{2581}";

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_gguf(value: i64) -> Result<Self> {
        Ok(match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            other => bail!("unknown tokenizer.ggml.token_type {other}"),
        })
    }
}

/// The vocabulary as read from the GGUF metadata.
struct Vocab {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<PieceType>,
    unk: u32,
    bos: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
}

fn meta<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata
        .get(key)
        .with_context(|| format!("GGUF metadata has no {key}"))
}

fn meta_array<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Vec<Value>> {
    meta(metadata, key)?
        .to_vec()
        .with_context(|| format!("GGUF metadata {key} is not an array"))
}

fn integer(value: &Value) -> Result<i64> {
    Ok(match value {
        Value::I8(v) => *v as i64,
        Value::U8(v) => *v as i64,
        Value::I16(v) => *v as i64,
        Value::U16(v) => *v as i64,
        Value::I32(v) => *v as i64,
        Value::U32(v) => *v as i64,
        Value::I64(v) => *v,
        Value::U64(v) => *v as i64,
        other => bail!("expected an integer, found {:?}", other.value_type()),
    })
}

fn flag(metadata: &HashMap<String, Value>, key: &str, default: bool) -> Result<bool> {
    match metadata.get(key) {
        None => Ok(default),
        Some(v) => v.to_bool().with_context(|| format!("{key} is not a bool")),
    }
}

fn token_id(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    metadata
        .get(key)
        .map(|v| integer(v).map(|id| id as u32))
        .transpose()
        .with_context(|| format!("{key} is not an integer"))
}

impl Vocab {
    fn read(metadata: &HashMap<String, Value>) -> Result<Self> {
        let model = meta(metadata, "tokenizer.ggml.model")?
            .to_string()
            .context("tokenizer.ggml.model is not a string")?;
        ensure!(
            model == "llama",
            "tokenizer.ggml.model is {model:?}; only SentencePiece vocabularies (\"llama\") convert"
        );
        let pieces = meta_array(metadata, "tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned().context("a token is not a string"))
            .collect::<Result<Vec<_>>>()?;
        let scores = meta_array(metadata, "tokenizer.ggml.scores")?
            .iter()
            .map(|v| v.to_f32().context("a score is not an f32"))
            .collect::<Result<Vec<_>>>()?;
        let types = meta_array(metadata, "tokenizer.ggml.token_type")?
            .iter()
            .map(|v| integer(v).and_then(PieceType::from_gguf))
            .collect::<Result<Vec<_>>>()?;
        ensure!(
            pieces.len() == scores.len() && pieces.len() == types.len(),
            "GGUF vocabulary lists {} tokens, {} scores, {} types",
            pieces.len(),
            scores.len(),
            types.len()
        );
        let unk = token_id(metadata, "tokenizer.ggml.unknown_token_id")?
            .context("GGUF vocabulary has no unknown_token_id")?;
        ensure!(
            (unk as usize) < pieces.len(),
            "unknown_token_id {unk} is out of range"
        );
        let bos = token_id(metadata, "tokenizer.ggml.bos_token_id")?;
        let mut vocab = Self {
            pieces,
            scores,
            types,
            unk,
            bos,
            add_bos: flag(metadata, "tokenizer.ggml.add_bos_token", true)?,
            add_space_prefix: flag(metadata, "tokenizer.ggml.add_space_prefix", true)?,
        };
        vocab.escape_user_defined_spaces();
        Ok(vocab)
    }

    /// llama.cpp's converter stores user-defined pieces unescaped (Gemma's space runs as
    /// `"  "`); SentencePiece matches them against escaped text, so they are `▁▁` here.
    fn escape_user_defined_spaces(&mut self) {
        for (piece, kind) in self.pieces.iter_mut().zip(&self.types) {
            if *kind == PieceType::UserDefined && piece.contains(' ') {
                *piece = piece.replace(' ', SPACE_MARK);
            }
        }
    }

    /// Every split of a normal piece into two normal pieces, ranked by the merged piece's score
    /// (highest first), then by the merged piece's id and the split point.
    fn merges(&self, ids: &HashMap<&str, u32>) -> Vec<(String, String)> {
        let normal = |piece: &str| {
            ids.get(piece)
                .is_some_and(|&id| self.types[id as usize] == PieceType::Normal)
        };
        let mut ranked: Vec<(f32, u32, usize, &str, &str)> = Vec::new();
        for (id, piece) in self.pieces.iter().enumerate() {
            if self.types[id] != PieceType::Normal {
                continue;
            }
            for (at, _) in piece.char_indices().skip(1) {
                let (left, right) = piece.split_at(at);
                if normal(left) && normal(right) {
                    ranked.push((self.scores[id], id as u32, at, left, right));
                }
            }
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        ranked
            .into_iter()
            .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
            .collect()
    }
}

/// The `tokenizer.json` (as JSON) for the SentencePiece vocabulary in `metadata`: the GGUF's
/// `tokenizer.ggml.*` keys. Errors name the missing or malformed key; a vocabulary that is not
/// SentencePiece's (`tokenizer.ggml.model` other than `llama`) is refused.
pub fn tokenizer_json(metadata: &HashMap<String, Value>) -> Result<Json> {
    let vocab = Vocab::read(metadata)?;
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(vocab.pieces.len());
    for (id, piece) in vocab.pieces.iter().enumerate() {
        if ids.insert(piece, id as u32).is_some() {
            bail!("GGUF vocabulary lists the piece {piece:?} twice");
        }
    }
    let merges: Vec<Json> = vocab
        .merges(&ids)
        .into_iter()
        .map(|(l, r)| json!([l, r]))
        .collect();
    let added_tokens: Vec<Json> = vocab
        .types
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(t, PieceType::Control | PieceType::UserDefined))
        .map(|(id, t)| {
            let special = *t == PieceType::Control;
            // Matched on the escaped text (a user-defined `▁▁` must see `▁▁`), a control piece
            // on the raw text.
            json!({
                "id": id, "content": vocab.pieces[id], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": !special, "special": special,
            })
        })
        .collect();
    let unk = &vocab.pieces[vocab.unk as usize];
    let vocab_map: serde_json::Map<String, Json> = vocab
        .pieces
        .iter()
        .enumerate()
        .map(|(id, piece)| (piece.clone(), json!(id)))
        .collect();

    let mut normalizers = Vec::new();
    if vocab.add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": SPACE_MARK}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if vocab.add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post_processor = match (vocab.add_bos, vocab.bos) {
        (true, Some(bos)) => {
            let bos_piece = &vocab.pieces[bos as usize];
            let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
            let special = json!({"SpecialToken": {"id": bos_piece, "type_id": 0}});
            json!({
                "type": "TemplateProcessing",
                "single": [special, seq("A")],
                "pair": [special, seq("A"), special, seq("B")],
                "special_tokens": {bos_piece.clone(): {"id": bos_piece, "ids": [bos], "tokens": [bos_piece]}},
            })
        }
        _ => Json::Null,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab_map, "merges": merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF-style vocabulary: `(piece, score, type)`.
    fn metadata(pieces: &[(&str, f32, i32)], add_bos: bool) -> HashMap<String, Value> {
        let mut m = HashMap::new();
        let s = |v: &str| Value::String(v.to_string());
        m.insert("tokenizer.ggml.model".into(), s("llama"));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(pieces.iter().map(|p| s(p.0)).collect()),
        );
        m.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(pieces.iter().map(|p| Value::F32(p.1)).collect()),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(pieces.iter().map(|p| Value::I32(p.2)).collect()),
        );
        m.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        m.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos));
        m.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
        m
    }

    #[test]
    fn merges_are_ranked_by_the_merged_pieces_score() {
        // "ab" (-1) outranks "bc" (-2); "abc" is reachable as ab+c and a+bc, both ranked by
        // its score -3, ab+c first (the earlier split point).
        let m = metadata(
            &[
                ("<unk>", 0.0, 2),
                ("<bos>", 0.0, 3),
                ("a", -10.0, 1),
                ("b", -11.0, 1),
                ("c", -12.0, 1),
                ("bc", -2.0, 1),
                ("ab", -1.0, 1),
                ("abc", -3.0, 1),
                ("\u{2581}\u{2581}", 0.0, 4),
            ],
            true,
        );
        let json = tokenizer_json(&m).unwrap();
        let merges: Vec<(String, String)> =
            serde_json::from_value(json["model"]["merges"].clone()).unwrap();
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(pairs, [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]);
        let added = json["added_tokens"].as_array().unwrap();
        assert_eq!(added.len(), 2, "the control and the user-defined piece");
        assert_eq!(added[0]["special"], true);
        assert_eq!(added[1]["special"], false);
        assert_eq!(
            json["post_processor"]["special_tokens"]["<bos>"]["ids"][0],
            1
        );
    }

    #[test]
    fn unescaped_user_defined_spaces_are_escaped_and_no_bos_means_no_post_processor() {
        let m = metadata(
            &[("<unk>", 0.0, 2), ("<bos>", 0.0, 3), ("   ", 0.0, 4)],
            false,
        );
        let json = tokenizer_json(&m).unwrap();
        assert_eq!(json["model"]["vocab"]["\u{2581}\u{2581}\u{2581}"], 2);
        assert!(json["post_processor"].is_null());
    }

    #[test]
    fn other_vocabularies_and_broken_metadata_are_refused() {
        let mut m = metadata(&[("<unk>", 0.0, 2)], true);
        m.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        let err = tokenizer_json(&m).unwrap_err();
        assert!(err.to_string().contains("only SentencePiece"), "{err:#}");
        let mut m = metadata(&[("<unk>", 0.0, 2), ("a", 0.0, 1)], true);
        m.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(vec![Value::F32(0.0)]),
        );
        let err = tokenizer_json(&m).unwrap_err();
        assert!(err.to_string().contains("2 tokens, 1 scores"), "{err:#}");
    }
}
