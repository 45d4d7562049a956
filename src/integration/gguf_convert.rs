//! A Gemma 3 GGUF as a safetensors model directory that mistral.rs 0.8.1 loads: its GGUF loader
//! has no `gemma3` architecture, its safetensors Gemma 3 loader (`Gemma3ForCausalLM`) does.
//!
//! The directory holds `model.safetensors` (every tensor dequantized to f32 by candle: the
//! values the GGUF encodes, nothing rounded again), `config.json` (from the GGUF's `gemma3.*`
//! metadata), `tokenizer.json` ([`crate::spm_tokenizer`]), `tokenizer_config.json` with the
//! chat template this project ships ([`GEMMA_CHAT_TEMPLATE`]), `generation_config.json`, and
//! last a manifest naming the source GGUF's sha256, this converter's version and every file's
//! size and sha256. A directory whose manifest does not match is rebuilt; a half-built one
//! never has the final name.
//!
//! Tensor names follow llama.cpp's `convert_hf_to_gguf.py` backwards (`blk.N.attn_q` to
//! `model.layers.N.self_attn.q_proj`, ...). That script adds 1 to every Gemma norm weight
//! (llama.cpp multiplies by the weight, Gemma's RMSNorm by `1 + weight`); it is subtracted here.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::package_index::sha256_file;

/// Bumped whenever the output of [`convert_gemma3`] changes, so cached directories are rebuilt.
pub const CONVERTER_VERSION: u32 = 2;

const MANIFEST: &str = "logquant-conversion.json";

/// Gemma's documented turn format (ai.google.dev/gemma/docs/core/prompt-structure): `user` and
/// `model` turns; a system message has no role of its own and opens the first user turn. The
/// GGUF carries no template; this one is the project's, written into `tokenizer_config.json`.
/// It writes no BOS: mistral.rs encodes the rendered prompt with special tokens, so the
/// tokenizer's post-processor puts the one BOS in front (as for a completion).
pub const GEMMA_CHAT_TEMPLATE: &str = concat!(
    "{% set ns = namespace(prefix='') %}",
    "{% for message in messages %}",
    "{% if message['role'] == 'system' %}",
    "{% set ns.prefix = (message['content'] | trim) ~ '\\n\\n' %}",
    "{% else %}",
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}",
    "{% else %}{% set role = message['role'] %}{% endif %}",
    "{{ '<start_of_turn>' ~ role ~ '\\n' ~ ns.prefix ~ (message['content'] | trim) ~ '<end_of_turn>\\n' }}",
    "{% set ns.prefix = '' %}",
    "{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Manifest {
    converter: u32,
    source_sha256: String,
    /// File name -> (size in bytes, sha256).
    files: BTreeMap<String, (u64, String)>,
}

/// The converted directory `dest` for the Gemma 3 GGUF at `gguf` (whose sha256 is
/// `gguf_sha256`): reused when its manifest matches this converter and every file's size and
/// sha256, else (re)built beside it and moved into place.
pub fn ensure_gemma3_dir(gguf: &Path, gguf_sha256: &str, dest: &Path) -> Result<PathBuf> {
    match check_manifest(dest, gguf_sha256) {
        Ok(()) => return Ok(dest.to_path_buf()),
        Err(why) if dest.exists() => {
            eprintln!(
                "converted model {} is stale or damaged ({why:#}); converting again",
                dest.display()
            );
        }
        Err(_) => {}
    }
    let parent = dest
        .parent()
        .context("the converted model's directory has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}-"))
        .tempdir_in(parent)
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                parent.display()
            )
        })?;
    eprintln!("Converting {} to safetensors (once)", gguf.display());
    convert_gemma3(gguf, staging.path())?;
    write_manifest(staging.path(), gguf_sha256)?;
    if dest.exists() {
        fs::remove_dir_all(dest).with_context(|| format!("cannot remove {}", dest.display()))?;
    }
    let staged = staging.keep();
    fs::rename(&staged, dest).with_context(|| {
        let _ = fs::remove_dir_all(&staged);
        format!("cannot move the converted model into {}", dest.display())
    })?;
    Ok(dest.to_path_buf())
}

fn check_manifest(dir: &Path, gguf_sha256: &str) -> Result<()> {
    let text = fs::read_to_string(dir.join(MANIFEST)).context("no manifest")?;
    let manifest: Manifest = serde_json::from_str(&text).context("unreadable manifest")?;
    ensure!(
        manifest.converter == CONVERTER_VERSION,
        "written by converter {}",
        manifest.converter
    );
    ensure!(
        manifest.source_sha256 == gguf_sha256,
        "converted from another GGUF"
    );
    for (name, (size, sha)) in &manifest.files {
        let path = dir.join(name);
        let len = fs::metadata(&path)
            .with_context(|| format!("{name} is missing"))?
            .len();
        ensure!(len == *size, "{name} has {len} bytes, not {size}");
        ensure!(
            sha256_file(&path)? == *sha,
            "{name} does not match its sha256"
        );
    }
    Ok(())
}

fn write_manifest(dir: &Path, gguf_sha256: &str) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        files.insert(name, (fs::metadata(&path)?.len(), sha256_file(&path)?));
    }
    let manifest = Manifest {
        converter: CONVERTER_VERSION,
        source_sha256: gguf_sha256.to_string(),
        files,
    };
    fs::write(dir.join(MANIFEST), serde_json::to_string_pretty(&manifest)?)
        .context("cannot write the conversion manifest")
}

/// The Hugging Face name of a Gemma 3 GGUF tensor, `None` for a name this converter does not
/// know.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let local = match rest.strip_suffix(".weight")? {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_norm" => "input_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{local}.weight"))
}

fn get<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata
        .get(key)
        .with_context(|| format!("GGUF metadata has no {key}"))
}

fn get_u32(metadata: &HashMap<String, Value>, key: &str) -> Result<u32> {
    get(metadata, key)?
        .to_u32()
        .with_context(|| format!("{key} is not a u32"))
}

fn get_f32(metadata: &HashMap<String, Value>, key: &str) -> Result<f32> {
    get(metadata, key)?
        .to_f32()
        .with_context(|| format!("{key} is not an f32"))
}

/// `config.json` of a `Gemma3ForCausalLM` from the GGUF's metadata. What Gemma 3 GGUFs do not
/// store is Gemma 3's fixed design (transformers' `Gemma3TextConfig` defaults, also hard-coded
/// in llama.cpp's gemma3 graph): one global layer in six, local RoPE base 10000, GeLU-tanh,
/// queries scaled by `head_dim^-0.5`, no soft-capping.
fn config_json(metadata: &HashMap<String, Value>, vocab_size: usize) -> Result<serde_json::Value> {
    let head_dim = get_u32(metadata, "gemma3.attention.key_length")?;
    ensure!(
        get_u32(metadata, "gemma3.attention.value_length")? == head_dim,
        "key_length and value_length differ"
    );
    let id = |key: &str| -> Result<u32> { get_u32(metadata, key) };
    Ok(json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": id("gemma3.embedding_length")?,
        "intermediate_size": id("gemma3.feed_forward_length")?,
        "num_hidden_layers": id("gemma3.block_count")?,
        "num_attention_heads": id("gemma3.attention.head_count")?,
        "num_key_value_heads": id("gemma3.attention.head_count_kv")?,
        "head_dim": head_dim,
        "rms_norm_eps": get_f32(metadata, "gemma3.attention.layer_norm_rms_epsilon")?,
        "rope_theta": get_f32(metadata, "gemma3.rope.freq_base")?,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": null,
        "sliding_window": id("gemma3.attention.sliding_window")?,
        "sliding_window_pattern": 6,
        "max_position_embeddings": id("gemma3.context_length")?,
        "query_pre_attn_scalar": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": null,
        "attention_bias": false,
        "attn_logit_softcapping": null,
        "final_logit_softcapping": null,
        "tie_word_embeddings": true,
        "bos_token_id": id("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": id("tokenizer.ggml.eos_token_id")?,
        "pad_token_id": id("tokenizer.ggml.padding_token_id")?,
        "torch_dtype": "float32",
    }))
}

/// Convert the Gemma 3 GGUF at `gguf` into the files of a safetensors model directory in
/// `out` (an existing, empty directory). Refuses another architecture, an unknown tensor name
/// and a tensor its dequantizer does not support, each in one line.
pub fn convert_gemma3(gguf: &Path, out: &Path) -> Result<()> {
    let mut reader = BufReader::new(
        File::open(gguf).with_context(|| format!("cannot open {}", gguf.display()))?,
    );
    let content = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("{} is not a readable GGUF file", gguf.display()))?;
    let metadata = &content.metadata;
    let arch = get(metadata, "general.architecture")?
        .to_string()
        .context("general.architecture is not a string")?;
    if arch != "gemma3" {
        bail!("{} is a {arch} GGUF; only gemma3 converts", gguf.display());
    }

    let tokenizer = crate::spm_tokenizer::tokenizer_json(metadata)?;
    let vocab_size = tokenizer["model"]["vocab"]
        .as_object()
        .map_or(0, |v| v.len());
    let config = config_json(metadata, vocab_size)?;

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(names.len());
    for name in names {
        let hf = hf_name(name).with_context(|| format!("unknown Gemma 3 GGUF tensor {name}"))?;
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .with_context(|| format!("cannot read tensor {name}"))?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .with_context(|| format!("cannot dequantize {name} ({:?})", q.dtype()))?;
        if name.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        tensors.insert(hf, t);
    }
    ensure!(
        tensors.contains_key("model.embed_tokens.weight"),
        "the GGUF has no token_embd.weight"
    );
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))
        .context("cannot write model.safetensors")?;
    drop(tensors);

    let write = |name: &str, value: &serde_json::Value| -> Result<()> {
        fs::write(out.join(name), serde_json::to_vec(value)?)
            .with_context(|| format!("cannot write {name}"))
    };
    write("config.json", &config)?;
    write("tokenizer.json", &tokenizer)?;
    let bos = config["bos_token_id"].as_u64().unwrap_or(2) as usize;
    let eos = config["eos_token_id"].as_u64().unwrap_or(1) as usize;
    let piece = |id: usize| tokenizer_piece(&tokenizer, id);
    let end_of_turn = tokenizer["model"]["vocab"]["<end_of_turn>"].as_u64();
    write(
        "tokenizer_config.json",
        &json!({
            "bos_token": piece(bos), "eos_token": piece(eos), "pad_token": piece(0),
            "unk_token": tokenizer["model"]["unk_token"], "add_bos_token": true,
            "add_eos_token": false, "chat_template": GEMMA_CHAT_TEMPLATE,
        }),
    )?;
    // A base model ends at <eos>; a chat turn at <end_of_turn>.
    let mut eos_ids = vec![eos as u64];
    eos_ids.extend(end_of_turn);
    write(
        "generation_config.json",
        &json!({"bos_token_id": bos, "eos_token_id": eos_ids, "pad_token_id": 0}),
    )?;
    Ok(())
}

fn tokenizer_piece(tokenizer: &serde_json::Value, id: usize) -> serde_json::Value {
    tokenizer["model"]["vocab"]
        .as_object()
        .and_then(|vocab| vocab.iter().find(|(_, v)| v.as_u64() == Some(id as u64)))
        .map_or(serde_json::Value::Null, |(k, _)| json!(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_the_gemma3_loaders_names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.17.attn_k_norm.weight",
                "model.layers.17.self_attn.k_norm.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.3.post_ffw_norm.weight",
                "model.layers.3.post_feedforward_layernorm.weight",
            ),
            (
                "blk.9.ffn_down.weight",
                "model.layers.9.mlp.down_proj.weight",
            ),
        ];
        for (gguf, hf) in cases {
            assert_eq!(hf_name(gguf).as_deref(), Some(hf), "{gguf}");
        }
        for unknown in [
            "output.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_qkv.weight",
            "blk.0.attn_q.bias",
        ] {
            assert_eq!(hf_name(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn a_stale_or_damaged_directory_fails_its_manifest_check() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), b"{}").unwrap();
        write_manifest(dir.path(), "abc").unwrap();
        check_manifest(dir.path(), "abc").unwrap();
        let err = check_manifest(dir.path(), "def").unwrap_err();
        assert!(err.to_string().contains("another GGUF"), "{err:#}");
        fs::write(dir.path().join("config.json"), b"[]").unwrap();
        let err = check_manifest(dir.path(), "abc").unwrap_err();
        assert!(err.to_string().contains("sha256"), "{err:#}");
        fs::remove_file(dir.path().join("config.json")).unwrap();
        let err = check_manifest(dir.path(), "abc").unwrap_err();
        assert!(err.to_string().contains("missing"), "{err:#}");
    }
}
