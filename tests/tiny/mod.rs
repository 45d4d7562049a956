//! Tiny random-weight models, written at test time in the exact on-disk forms mistral.rs 0.8.1
//! loads: a safetensors directory (HF `config.json`, word-level `tokenizer.json`,
//! `tokenizer_config.json`, one `model.safetensors`) or a single GGUF file (f32 tensors, the
//! tokenizer in the metadata). Tensor names and config keys follow the 0.8.1 model files
//! (`models/<arch>.rs`, `models/quantized_<arch>.rs`); every model has 2 layers, hidden size 128,
//! head_dim 32 and (where the architecture has it) 4 query heads over 2 KV heads.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde_json::{json, Value};

pub const VOCAB: usize = 256;
pub const HIDDEN: usize = 128;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 32;
pub const INTERMEDIATE: usize = 256;
pub const LAYERS: usize = 2;
pub const EXPERTS: usize = 4;
/// Ids 0..3 are `<unk>`, `<s>`, `</s>`; every other id is a plain word.
pub const FIRST_WORD: u32 = 3;

/// The architectures of the matrix, safetensors and GGUF forms together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi2,
    Phi3,
    Gemma,
    Gemma2,
    Starcoder2,
    Mixtral,
    Qwen3Moe,
    /// Multi-head latent attention: K head size 48 (32 no-RoPE + 16 RoPE), V head size 32.
    DeepseekV2,
    /// Text-only Gemma 3 (`Gemma3ForCausalLM`, loaded by 0.8.1's multimodal Gemma 3 loader):
    /// layer 0 slides over a window of [`GEMMA3_WINDOW`] tokens, layer 1 attends globally.
    Gemma3,
    /// Granite 4 hybrid (`GraniteMoeHybridForCausalLM`, dense): layer 0 is Mamba 2 (a recurrent
    /// state), layer 1 attention, in mistral.rs's hybrid cache.
    GraniteHybrid,
    /// Gemma 4 (`Gemma4ForConditionalGeneration`, a vision tower of no layers, text only):
    /// 4 layers, sliding / full / shared / shared, both shared layers reading layer 1's KV.
    Gemma4,
    /// Gemma 3 with vision (`Gemma3ForConditionalGeneration`): the [`Arch::Gemma3`] text model
    /// under a one-layer SigLIP tower of 32 x 32 images in 8 x 8 patches, pooled to
    /// [`GEMMA3_IMAGE_TOKENS`] tokens per image.
    Gemma3Vision,
    /// Mistral 3 (`Mistral3ForConditionalGeneration`): the [`Arch::Mistral`] text model under a
    /// one-layer Pixtral tower and patch-merging projector.
    Mistral3,
    /// Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the [`Arch::Qwen2`] text model with
    /// multimodal RoPE, under a one-block vision tower and merger.
    Qwen25Vl,
    /// Llama 4 (`Llama4ForConditionalGeneration`), dense (`moe_layers: []`), its chunked
    /// attention as long as the context, under a one-layer vision tower.
    Llama4,
    /// LLaVA (`LlavaForConditionalGeneration`, llama text, CLIP tower): its text model keeps a
    /// cache of its own (`EitherCache::Full`), not built through the seam.
    Llava,
}

/// Image tokens per image of [`Arch::Gemma3Vision`] (and its processor's `image_seq_length`).
pub const GEMMA3_IMAGE_TOKENS: usize = 4;
/// [`Arch::Gemma3Vision`]'s image side in pixels.
pub const GEMMA3_IMAGE_SIZE: usize = 32;
/// Gemma 3's image markers, in the vision model's vocabulary (ids 253, 254, 255).
const GEMMA3_IMAGE_MARKERS: [&str; 3] =
    ["<start_of_image>", "<end_of_image>", "<image_soft_token>"];
const GEMMA4_LAYERS: usize = 4;

/// Gemma 3's sliding window here: shorter than the prompts, so the sliding layer slides.
pub const GEMMA3_WINDOW: usize = 16;
/// Granite hybrid's Mamba 2 layer: heads, state size, groups; its inner width is 2 x hidden.
const MAMBA_HEADS: usize = 4;
const MAMBA_STATE: usize = 16;
const MAMBA_CONV: usize = 4;

/// Seeded, platform-independent random weights and prompts (ChaCha8: the same stream for a seed
/// on every platform and rand_chacha version; candle's CPU `randn` has no seed).
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    pub fn normal(&mut self) -> f32 {
        self.0.sample(StandardNormal)
    }

    /// `n` plain-word token ids (never a special token).
    pub fn words(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| self.0.random_range(FIRST_WORD..VOCAB as u32))
            .collect()
    }
}

/// Named tensors with a deterministic fill.
struct Weights {
    rng: Rng,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl Weights {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            tensors: Vec::new(),
        }
    }

    fn normal(&mut self, name: &str, shape: &[usize], std: f32) {
        let n = shape.iter().product();
        let data = (0..n).map(|_| std * self.rng.normal()).collect();
        self.tensors.push((name.to_string(), shape.to_vec(), data));
    }

    /// A linear layer's weight `[out, in]`, scaled so outputs have about unit variance for
    /// unit-variance inputs (times `gain`).
    fn linear(&mut self, name: &str, out: usize, inp: usize, gain: f32) {
        self.normal(name, &[out, inp], gain / (inp as f32).sqrt());
    }

    fn constant(&mut self, name: &str, shape: &[usize], value: f32) {
        let n = shape.iter().product();
        self.tensors
            .push((name.to_string(), shape.to_vec(), vec![value; n]));
    }

    fn tensor(shape: &[usize], data: &[f32]) -> Tensor {
        Tensor::from_slice(data, shape, &Device::Cpu).expect("tensor")
    }

    fn save_safetensors(&self, path: &Path) {
        let map: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(name, shape, data)| (name.clone(), Self::tensor(shape, data)))
            .collect();
        candle_core::safetensors::save(&map, path).expect("write safetensors");
    }
}

/// Gains: attention scores of about unit scale (so attention depends on position and content),
/// logits with a spread of a few nats (a peaked but not one-hot next-token distribution).
const QK_GAIN: f32 = 1.5;
const LM_HEAD_GAIN: f32 = 3.0;
const EMBED_STD: f32 = 1.0;
const BIAS_STD: f32 = 0.05;
/// With tied embeddings the logits are `norm(h) . embedding`: if the residual stream were the
/// input embedding, every step would predict its own input token again (measured: 1 distinct
/// greedy token). These models get small embeddings and layer outputs 3x larger.
const TIED_EMBED_STD: f32 = 0.3;
const TIED_OUT_GAIN: f32 = 3.0;
/// Gemma multiplies its input embedding by sqrt(hidden) = 11.3, so its layers must write
/// much more to outweigh it.
const GEMMA_OUT_GAIN: f32 = 25.0;

impl Arch {
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Phi2 => "PhiForCausalLM",
            Self::Phi3 => "Phi3ForCausalLM",
            Self::Gemma => "GemmaForCausalLM",
            Self::Gemma2 => "Gemma2ForCausalLM",
            Self::Starcoder2 => "Starcoder2ForCausalLM",
            Self::Mixtral => "MixtralForCausalLM",
            Self::Qwen3Moe => "Qwen3MoeForCausalLM",
            Self::DeepseekV2 => "DeepseekV2ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
            Self::GraniteHybrid => "GraniteMoeHybridForCausalLM",
            Self::Gemma4 => "Gemma4ForConditionalGeneration",
            Self::Gemma3Vision => "Gemma3ForConditionalGeneration",
            Self::Mistral3 => "Mistral3ForConditionalGeneration",
            Self::Qwen25Vl => "Qwen2_5_VLForConditionalGeneration",
            Self::Llama4 => "Llama4ForConditionalGeneration",
            Self::Llava => "LlavaForConditionalGeneration",
        }
    }

    /// `general.architecture` of the GGUF form, for the architectures 0.8.1 loads from GGUF.
    pub fn gguf_name(self) -> Option<&'static str> {
        Some(match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3moe",
            Self::Phi2 => "phi2",
            Self::Phi3 => "phi3",
            Self::Starcoder2 => "starcoder2",
            _ => return None,
        })
    }

    /// quantized_phi2.rs, quantized_phi3.rs and quantized_starcoder2.rs take each layer's
    /// matrices apart as `QMatMul::QTensor` and hit `unreachable!()` on an f32 tensor (candle
    /// turns f32/f16 GGUF tensors into plain tensors): those forms get Q8_0 layer matrices.
    pub fn gguf_needs_quantized_matrices(self) -> bool {
        matches!(self, Self::Phi2 | Self::Phi3 | Self::Starcoder2)
    }

    fn kv_heads(self, gguf: bool) -> usize {
        match self {
            // quantized_phi2.rs splits the fused QKV into 3 x n_head: no GQA in that form.
            Self::Phi2 if gguf => HEADS,
            // deepseek2.rs: MLA expands K and V to every query head.
            Self::DeepseekV2 => HEADS,
            _ => KV_HEADS,
        }
    }

    fn tied(self) -> bool {
        matches!(
            self,
            Self::Gemma
                | Self::Gemma2
                | Self::Gemma3
                | Self::Gemma3Vision
                | Self::Gemma4
                | Self::Starcoder2
        )
    }

    /// Gemma's family: RMSNorm scales by (1 + weight), embeddings by sqrt(hidden).
    fn gemma_like(self) -> bool {
        matches!(
            self,
            Self::Gemma | Self::Gemma2 | Self::Gemma3 | Self::Gemma3Vision
        )
    }

    /// mistral.rs 0.8.1's own cache gives other log-probabilities to a request decoded in a
    /// batch than alone (measured in the architecture matrix: up to 2.8 nats on Gemma 3 and 2.1
    /// on Gemma 4, whose sliding layers' rotating caches are batched, 13 on Granite hybrid,
    /// whose recurrent state is); not a fault of the seam, which the matrix checks against the
    /// default cache's batch.
    pub fn default_cache_batches_wrongly(self) -> bool {
        matches!(self, Self::Gemma3 | Self::Gemma4 | Self::GraniteHybrid)
    }

    /// How the LogQuant engine must hold this model's layers, by the census the patched core
    /// takes: (backend-held full attention, sliding-window, shared, recurrent).
    pub fn expected_layers(self) -> (usize, usize, usize, usize) {
        match self {
            Self::Gemma3 | Self::Gemma3Vision => (1, 1, 0, 0),
            Self::GraniteHybrid => (1, 0, 0, 1),
            Self::Gemma4 => (1, 1, 2, 0),
            Self::Llava => (0, 0, 0, 0),
            _ => (LAYERS, 0, 0, 0),
        }
    }

    /// Standard deviation of the embedding table.
    fn embed_std(self) -> f32 {
        if self.tied() {
            TIED_EMBED_STD
        } else {
            EMBED_STD
        }
    }

    /// Gain of the layers that write into the residual stream (o_proj, down_proj).
    fn out_gain(self) -> f32 {
        match self {
            Self::Gemma | Self::Gemma2 | Self::Gemma3 | Self::Gemma3Vision | Self::Gemma4 => {
                GEMMA_OUT_GAIN
            }
            _ if self.tied() => TIED_OUT_GAIN,
            _ => 1.0,
        }
    }

    fn seed(self) -> u64 {
        0x5EED_0000 + self as u64
    }

    /// config.json in the HF form the 0.8.1 loader deserializes.
    fn hf_config(self) -> Value {
        match self {
            Self::Gemma4 => return gemma4_config(),
            Self::Gemma3Vision => return gemma3_vision_config(Self::Gemma3.hf_config()),
            Self::Mistral3 => return mistral3_config(Self::Mistral.hf_config()),
            Self::Qwen25Vl => return qwen25_vl_config(Self::Qwen2.hf_config()),
            Self::Llama4 => return llama4_config(Self::Llama.hf_config()),
            Self::Llava => return llava_config(Self::Llama.hf_config()),
            _ => {}
        }
        let mut c = json!({
            "architectures": [self.hf_name()],
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": self.kv_heads(false),
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            // No sliding window: sliding-window layers keep mistral.rs's own rotating cache.
            "sliding_window": null,
            "bos_token_id": 1,
            "eos_token_id": 2,
        });
        let extra = match self {
            Self::Llama | Self::Mistral | Self::Qwen2 => json!({}),
            Self::Gemma4
            | Self::Gemma3Vision
            | Self::Mistral3
            | Self::Qwen25Vl
            | Self::Llama4
            | Self::Llava => unreachable!("built above"),
            Self::Qwen3 => json!({
                "head_dim": HEAD_DIM, "max_window_layers": LAYERS, "use_sliding_window": false,
            }),
            Self::Qwen3Moe => json!({
                "head_dim": HEAD_DIM, "max_window_layers": LAYERS, "use_sliding_window": false,
                "moe_intermediate_size": INTERMEDIATE / 2, "num_experts": EXPERTS,
                "mlp_only_layers": [], "decoder_sparse_step": 1, "norm_topk_prob": true,
                "num_experts_per_tok": 2,
            }),
            Self::Mixtral => json!({"num_local_experts": EXPERTS, "num_experts_per_tok": 2}),
            Self::Phi2 => json!({
                "hidden_act": "gelu_new", "layer_norm_eps": 1e-5,
                // 0.8.1's phi2.rs builds a partial RoPE table but applies it to the whole head
            // ("inconsistent last dim size in rope [1, 4, 48, 32] [48, 8] [48, 8]" with 0.5).
            "partial_rotary_factor": 1.0, "qk_layernorm": false,
            }),
            Self::Phi3 => json!({
                "rope_scaling": null, "original_max_position_embeddings": 4096,
                "partial_rotary_factor": null,
            }),
            Self::Gemma => json!({
                "head_dim": HEAD_DIM, "attention_bias": false, "hidden_act": null,
                "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
            }),
            Self::Gemma2 => json!({
                "head_dim": HEAD_DIM, "attention_bias": false, "hidden_act": null,
                "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
                // Required by 0.8.1 for every layer; as long as the context it is full attention.
                "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0, "query_pre_attn_scalar": HEAD_DIM,
            }),
            Self::Starcoder2 => json!({
                "hidden_act": "gelu_pytorch_tanh", "norm_epsilon": 1e-5, "use_bias": true,
                "tie_word_embeddings": true,
            }),
            Self::Gemma3 => json!({
                "head_dim": HEAD_DIM, "attention_bias": false, "hidden_act": null,
                "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
                "sliding_window": GEMMA3_WINDOW, "sliding_window_pattern": 2,
                "query_pre_attn_scalar": HEAD_DIM, "rope_local_base_freq": 10000.0,
                "attn_logit_softcapping": null, "final_logit_softcapping": null,
                "rope_scaling": null, "model_type": "gemma3_text",
            }),
            Self::GraniteHybrid => json!({
                "layer_types": ["mamba", "attention"], "num_local_experts": 0,
                "shared_intermediate_size": INTERMEDIATE, "position_embedding_type": "rope",
                "attention_multiplier": 1.0 / (HEAD_DIM as f64).sqrt(),
                "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
                "mamba_n_heads": MAMBA_HEADS, "mamba_d_head": 2 * HIDDEN / MAMBA_HEADS,
                "mamba_n_groups": 1, "mamba_d_state": MAMBA_STATE, "mamba_d_conv": MAMBA_CONV,
                "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": true,
                "mamba_proj_bias": false,
            }),
            Self::DeepseekV2 => json!({
                "moe_intermediate_size": INTERMEDIATE / 2, "n_shared_experts": null,
                "n_routed_experts": null, "num_experts_per_tok": null, "rope_scaling": null,
                "attention_bias": false, "q_lora_rank": null, "qk_rope_head_dim": 16,
                "kv_lora_rank": 32, "v_head_dim": HEAD_DIM, "qk_nope_head_dim": HEAD_DIM,
                "n_group": 1, "topk_group": 1,
            }),
        };
        for (k, v) in extra.as_object().expect("object") {
            c[k] = v.clone();
        }
        c
    }

    /// Every tensor the 0.8.1 safetensors loader of this architecture reads.
    fn hf_weights(self) -> Weights {
        match self {
            Self::GraniteHybrid => return granite_hybrid_weights(self.seed()),
            Self::Gemma4 => return gemma4_weights(self.seed()),
            Self::Gemma3Vision => return gemma3_vision_weights(Self::Gemma3.hf_weights()),
            Self::Mistral3 => return mistral3_weights(Self::Mistral.hf_weights()),
            Self::Qwen25Vl => return qwen25_vl_weights(Self::Qwen2.hf_weights()),
            Self::Llama4 => return llama4_weights(Self::Llama.hf_weights()),
            Self::Llava => return llava_weights(Self::Llama.hf_weights()),
            _ => {}
        }
        let mut w = Weights::new(self.seed());
        let (h, d, i) = (HIDDEN, HEAD_DIM, INTERMEDIATE);
        let (q_out, kv_out) = (HEADS * d, self.kv_heads(false) * d);
        // Gemma's RMSNorm multiplies by (1 + weight).
        let norm_one = if self.gemma_like() { 0.0 } else { 1.0 };
        let layer_norm = |w: &mut Weights, name: &str, with_bias: bool| {
            w.constant(&format!("{name}.weight"), &[h], norm_one);
            if with_bias {
                w.constant(&format!("{name}.bias"), &[h], 0.0);
            }
        };
        let biased = matches!(self, Self::Phi2 | Self::Starcoder2);
        let out_gain = self.out_gain();
        w.normal("model.embed_tokens.weight", &[VOCAB, h], self.embed_std());
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            match self {
                Self::Phi3 => {
                    w.linear(
                        &format!("{a}.qkv_proj.weight"),
                        q_out + 2 * kv_out,
                        h,
                        QK_GAIN,
                    );
                    w.linear(&format!("{a}.o_proj.weight"), h, q_out, out_gain);
                }
                Self::DeepseekV2 => {
                    let (rope, lora) = (16, 32);
                    w.linear(
                        &format!("{a}.q_proj.weight"),
                        HEADS * (d + rope),
                        h,
                        QK_GAIN,
                    );
                    w.linear(
                        &format!("{a}.kv_a_proj_with_mqa.weight"),
                        lora + rope,
                        h,
                        1.0,
                    );
                    w.constant(&format!("{a}.kv_a_layernorm.weight"), &[lora], 1.0);
                    w.linear(
                        &format!("{a}.kv_b_proj.weight"),
                        HEADS * 2 * d,
                        lora,
                        QK_GAIN,
                    );
                    w.linear(&format!("{a}.o_proj.weight"), h, HEADS * d, 1.0);
                }
                _ => {
                    let o = if self == Self::Phi2 {
                        "dense"
                    } else {
                        "o_proj"
                    };
                    w.linear(&format!("{a}.q_proj.weight"), q_out, h, QK_GAIN);
                    w.linear(&format!("{a}.k_proj.weight"), kv_out, h, QK_GAIN);
                    w.linear(&format!("{a}.v_proj.weight"), kv_out, h, 1.0);
                    w.linear(&format!("{a}.{o}.weight"), h, q_out, out_gain);
                    if biased || self == Self::Qwen2 {
                        for (proj, n) in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)]
                        {
                            w.normal(&format!("{a}.{proj}.bias"), &[n], BIAS_STD);
                        }
                    }
                    if biased {
                        w.normal(&format!("{a}.{o}.bias"), &[h], BIAS_STD);
                    }
                }
            }
            if matches!(self, Self::Qwen3 | Self::Qwen3Moe | Self::Gemma3) {
                w.constant(&format!("{a}.q_norm.weight"), &[d], norm_one);
                w.constant(&format!("{a}.k_norm.weight"), &[d], norm_one);
            }
            let m = format!("{p}.mlp");
            match self {
                Self::Phi2 | Self::Starcoder2 => {
                    let (up, down) = if self == Self::Phi2 {
                        ("fc1", "fc2")
                    } else {
                        ("c_fc", "c_proj")
                    };
                    w.linear(&format!("{m}.{up}.weight"), i, h, 1.0);
                    w.normal(&format!("{m}.{up}.bias"), &[i], BIAS_STD);
                    w.linear(&format!("{m}.{down}.weight"), h, i, out_gain);
                    w.normal(&format!("{m}.{down}.bias"), &[h], BIAS_STD);
                }
                Self::Phi3 => {
                    w.linear(&format!("{m}.gate_up_proj.weight"), 2 * i, h, 1.0);
                    w.linear(&format!("{m}.down_proj.weight"), h, i, 1.0);
                }
                Self::Mixtral => {
                    let moe = format!("{p}.block_sparse_moe");
                    w.linear(&format!("{moe}.gate.weight"), EXPERTS, h, 1.0);
                    for e in 0..EXPERTS {
                        w.linear(&format!("{moe}.experts.{e}.w1.weight"), i, h, 1.0);
                        w.linear(&format!("{moe}.experts.{e}.w2.weight"), h, i, 1.0);
                        w.linear(&format!("{moe}.experts.{e}.w3.weight"), i, h, 1.0);
                    }
                }
                Self::Qwen3Moe => {
                    // The stacked expert layout (`experts.gate_up_proj` [E, hidden, 2 x inter],
                    // `experts.down_proj` [E, inter, hidden]): on the CPU, 0.8.1 loads the
                    // per-expert layout (`experts.{e}.gate_proj.weight`, the published
                    // checkpoints' form) as placeholder layers, and the first forward fails
                    // with "DummyLayer should not ever be present in forward pass!".
                    let mi = INTERMEDIATE / 2;
                    w.linear(&format!("{m}.gate.weight"), EXPERTS, h, 1.0);
                    let (std_h, std_mi) = (1.0 / (h as f32).sqrt(), 1.0 / (mi as f32).sqrt());
                    w.normal(
                        &format!("{m}.experts.gate_up_proj"),
                        &[EXPERTS, h, 2 * mi],
                        std_h,
                    );
                    w.normal(&format!("{m}.experts.down_proj"), &[EXPERTS, mi, h], std_mi);
                }
                _ => {
                    w.linear(&format!("{m}.gate_proj.weight"), i, h, 1.0);
                    w.linear(&format!("{m}.up_proj.weight"), i, h, 1.0);
                    w.linear(&format!("{m}.down_proj.weight"), h, i, out_gain);
                }
            }
            layer_norm(&mut w, &format!("{p}.input_layernorm"), biased);
            // Phi-2 runs attention and MLP in parallel from one norm; Gemma 2's is below.
            if !matches!(self, Self::Phi2 | Self::Gemma2 | Self::Gemma3) {
                layer_norm(&mut w, &format!("{p}.post_attention_layernorm"), biased);
            }
            if matches!(self, Self::Gemma2 | Self::Gemma3) {
                layer_norm(&mut w, &format!("{p}.pre_feedforward_layernorm"), false);
                // Gemma 2 normalizes each sublayer's output before adding it: the output gain
                // goes into these norms, 1 + (gain - 1).
                w.constant(
                    &format!("{p}.post_feedforward_layernorm.weight"),
                    &[h],
                    out_gain - 1.0,
                );
                w.constant(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    out_gain - 1.0,
                );
            }
        }
        if self == Self::Phi2 {
            layer_norm(&mut w, "model.final_layernorm", true);
        } else {
            layer_norm(&mut w, "model.norm", biased);
        }
        // Gemma, Gemma 2 and Starcoder2 tie the output layer to the embeddings.
        if !self.tied() {
            w.linear("lm_head.weight", VOCAB, h, LM_HEAD_GAIN);
        }
        w
    }

    /// GGUF tensors (candle shape order, `[out, in]`) and architecture metadata of the forms
    /// `models/quantized_*.rs` read.
    fn gguf_weights(self) -> (Weights, Vec<(String, gguf_file::Value)>) {
        use gguf_file::Value as V;
        let arch = self.gguf_name().expect("a GGUF architecture");
        let mut w = Weights::new(self.seed() ^ 0x6666);
        let (h, d, i) = (HIDDEN, HEAD_DIM, INTERMEDIATE);
        let (q_out, kv_out) = (HEADS * d, self.kv_heads(true) * d);
        let layer_norm_biased = matches!(self, Self::Phi2 | Self::Starcoder2);
        let norm = |w: &mut Weights, name: &str| {
            w.constant(&format!("{name}.weight"), &[h], 1.0);
            if layer_norm_biased {
                w.constant(&format!("{name}.bias"), &[h], 0.0);
            }
        };
        // Linear layers read through `QLinear` carry a bias in these three forms.
        let linear = |w: &mut Weights, name: &str, out: usize, inp: usize, gain: f32| {
            w.linear(&format!("{name}.weight"), out, inp, gain);
            if matches!(self, Self::Phi2 | Self::Starcoder2) {
                w.normal(&format!("{name}.bias"), &[out], BIAS_STD);
            }
        };
        w.normal("token_embd.weight", &[VOCAB, h], EMBED_STD);
        norm(&mut w, "output_norm");
        linear(&mut w, "output", VOCAB, h, LM_HEAD_GAIN);
        if self == Self::Starcoder2 {
            // quantized_starcoder2.rs reads `output.weight` only.
            w.tensors.retain(|(n, _, _)| n != "output.bias");
        }
        for l in 0..LAYERS {
            let p = format!("blk.{l}");
            norm(&mut w, &format!("{p}.attn_norm"));
            if self != Self::Phi2 {
                norm(&mut w, &format!("{p}.ffn_norm"));
            }
            match self {
                Self::Phi2 | Self::Phi3 => {
                    linear(
                        &mut w,
                        &format!("{p}.attn_qkv"),
                        q_out + 2 * kv_out,
                        h,
                        QK_GAIN,
                    );
                }
                _ => {
                    linear(&mut w, &format!("{p}.attn_q"), q_out, h, QK_GAIN);
                    linear(&mut w, &format!("{p}.attn_k"), kv_out, h, QK_GAIN);
                    linear(&mut w, &format!("{p}.attn_v"), kv_out, h, 1.0);
                }
            }
            linear(&mut w, &format!("{p}.attn_output"), h, q_out, 1.0);
            if self == Self::Qwen2 {
                for (proj, n) in [("attn_q", q_out), ("attn_k", kv_out), ("attn_v", kv_out)] {
                    w.normal(&format!("{p}.{proj}.bias"), &[n], BIAS_STD);
                }
            }
            if matches!(self, Self::Qwen3 | Self::Qwen3Moe) {
                w.constant(&format!("{p}.attn_q_norm.weight"), &[d], 1.0);
                w.constant(&format!("{p}.attn_k_norm.weight"), &[d], 1.0);
            }
            match self {
                Self::Phi2 | Self::Starcoder2 => {
                    linear(&mut w, &format!("{p}.ffn_up"), i, h, 1.0);
                    linear(&mut w, &format!("{p}.ffn_down"), h, i, 1.0);
                }
                Self::Phi3 => {
                    w.linear(&format!("{p}.ffn_up.weight"), 2 * i, h, 1.0);
                    w.linear(&format!("{p}.ffn_down.weight"), h, i, 1.0);
                }
                Self::Qwen3Moe => {
                    let mi = INTERMEDIATE / 2;
                    w.linear(&format!("{p}.ffn_gate_inp.weight"), EXPERTS, h, 1.0);
                    let std_in = 1.0 / (h as f32).sqrt();
                    w.normal(
                        &format!("{p}.ffn_gate_exps.weight"),
                        &[EXPERTS, mi, h],
                        std_in,
                    );
                    w.normal(
                        &format!("{p}.ffn_up_exps.weight"),
                        &[EXPERTS, mi, h],
                        std_in,
                    );
                    let std_mid = 1.0 / (mi as f32).sqrt();
                    w.normal(
                        &format!("{p}.ffn_down_exps.weight"),
                        &[EXPERTS, h, mi],
                        std_mid,
                    );
                }
                _ => {
                    w.linear(&format!("{p}.ffn_gate.weight"), i, h, 1.0);
                    w.linear(&format!("{p}.ffn_up.weight"), i, h, 1.0);
                    w.linear(&format!("{p}.ffn_down.weight"), h, i, 1.0);
                }
            }
        }
        let key = |k: &str| format!("{arch}.{k}");
        let mut meta = vec![
            ("general.architecture".to_string(), V::String(arch.into())),
            (key("block_count"), V::U32(LAYERS as u32)),
            (key("context_length"), V::U32(4096)),
            (key("embedding_length"), V::U32(h as u32)),
            (key("feed_forward_length"), V::U32(i as u32)),
            (key("attention.head_count"), V::U32(HEADS as u32)),
            (
                key("attention.head_count_kv"),
                V::U32(self.kv_heads(true) as u32),
            ),
            (key("attention.layer_norm_rms_epsilon"), V::F32(1e-6)),
            (key("attention.layer_norm_epsilon"), V::F32(1e-5)),
            (key("rope.freq_base"), V::F32(10000.0)),
            // Phi-2 rotates half of each head (partial_rotary_factor 0.5).
            (
                key("rope.dimension_count"),
                V::U32(if self == Self::Phi2 { d / 2 } else { d } as u32),
            ),
        ];
        if self == Self::Qwen3Moe {
            meta.push((key("expert_count"), V::U32(EXPERTS as u32)));
            meta.push((key("expert_used_count"), V::U32(2)));
            meta.push((
                key("expert_feed_forward_length"),
                V::U32(INTERMEDIATE as u32 / 2),
            ));
        }
        (w, meta)
    }

    /// Write the safetensors form into `dir` (created).
    pub fn write_safetensors(self, dir: &Path) -> PathBuf {
        fs::create_dir_all(dir).expect("model dir");
        let write_json = |name: &str, value: &Value| {
            fs::write(dir.join(name), serde_json::to_string_pretty(value).unwrap())
                .expect("write json")
        };
        write_json("config.json", &self.hf_config());
        let vision = self == Self::Gemma3Vision;
        let mut tokenizer = word_level_tokenizer();
        let mut template = "{% for m in messages %}{{ m['content'] }} {% endfor %}";
        if vision {
            add_image_markers(&mut tokenizer);
            // Gemma 3's processor expands each `<start_of_image>` the template emits into the
            // image's soft tokens.
            template = "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }} \
                {% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}\
                <start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}\
                {% endfor %}{% endif %}{% endfor %}";
            write_json(
                "preprocessor_config.json",
                &json!({
                    "do_resize": true,
                    "size": {"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE},
                    "resample": 2, "do_rescale": true, "rescale_factor": 1.0 / 255.0,
                    "do_normalize": true, "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": true, "do_pan_and_scan": false,
                }),
            );
            write_json(
                "processor_config.json",
                &json!({"image_seq_length": GEMMA3_IMAGE_TOKENS}),
            );
        }
        match self {
            // Read at load (`Mistral3Processor::new`, `Llama4Processor::new`).
            Self::Mistral3 => write_json(
                "processor_config.json",
                &json!({"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
                        "image_end_token": "[IMG_END]", "patch_size": 8,
                        "spatial_merge_size": 2}),
            ),
            Self::Llama4 => write_json(
                "processor_config.json",
                &json!({"patch_size": 8, "pixel_shuffle_ratio": 0.5}),
            ),
            _ => {}
        }
        write_json("tokenizer.json", &tokenizer);
        write_json(
            "tokenizer_config.json",
            &json!({
                "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": false, "add_eos_token": false,
                "chat_template": template,
            }),
        );
        self.hf_weights()
            .save_safetensors(&dir.join("model.safetensors"));
        dir.to_path_buf()
    }

    /// Write the GGUF form to `dir/<arch>.gguf`.
    pub fn write_gguf(self, dir: &Path) -> PathBuf {
        use gguf_file::Value as V;
        fs::create_dir_all(dir).expect("model dir");
        let (weights, mut meta) = self.gguf_weights();
        // A SentencePiece-style (`llama` unigram) vocabulary: what mistral.rs converts from GGUF.
        let tokens: Vec<V> = vocab_words()
            .iter()
            .enumerate()
            .map(|(id, w)| V::String(piece(id, w)))
            .collect();
        let scores = (0..VOCAB).map(|id| V::F32(-(id as f32))).collect();
        // Token type 3 (control) for <unk>, <s>, </s>; 1 (normal) for the words.
        let types = (0..VOCAB)
            .map(|id| V::I32(if id < FIRST_WORD as usize { 3 } else { 1 }))
            .collect();
        meta.extend([
            (
                "tokenizer.ggml.model".to_string(),
                V::String("llama".into()),
            ),
            ("tokenizer.ggml.tokens".to_string(), V::Array(tokens)),
            ("tokenizer.ggml.scores".to_string(), V::Array(scores)),
            ("tokenizer.ggml.token_type".to_string(), V::Array(types)),
            ("tokenizer.ggml.unknown_token_id".to_string(), V::U32(0)),
            ("tokenizer.ggml.bos_token_id".to_string(), V::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_string(), V::U32(2)),
        ]);
        let qtensors: Vec<(String, QTensor)> = weights
            .tensors
            .iter()
            .map(|(name, shape, data)| {
                let t = Weights::tensor(shape, data);
                let dtype = if self.gguf_needs_quantized_matrices()
                    && name.starts_with("blk.")
                    && name.ends_with(".weight")
                    && shape.len() == 2
                    && !name.contains("norm")
                {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::F32
                };
                (name.clone(), QTensor::quantize(&t, dtype).expect("qtensor"))
            })
            .collect();
        let path = dir.join(format!("{}.gguf", self.gguf_name().expect("GGUF arch")));
        let mut file = fs::File::create(&path).expect("create gguf");
        let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut file, &meta_refs, &tensor_refs).expect("write gguf");
        path
    }
}

/// `<unk>`, `<s>`, `</s>`, then `w3`, `w4`, ... (a word's id is its number).
/// The vision form of Gemma 3: `text` (the text form's config) under `text_config`, a tiny
/// SigLIP tower and the image token ids (`gemma3/config.rs`, `siglip.rs`).
fn gemma3_vision_config(text: Value) -> Value {
    let mut text_config = text;
    text_config["model_type"] = json!("gemma3_text");
    json!({
        "architectures": [Arch::Gemma3Vision.hf_name()],
        "model_type": "gemma3",
        "boi_token_index": VOCAB - 3,
        "eoi_token_index": VOCAB - 2,
        "image_token_index": VOCAB - 1,
        "mm_tokens_per_image": GEMMA3_IMAGE_TOKENS,
        "text_config": text_config,
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_channels": 3,
            "image_size": GEMMA3_IMAGE_SIZE, "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        },
    })
}

/// The text model's tensors under `language_model.`, then the SigLIP tower's and the
/// projector's (every bias present: a missing one loads as a placeholder layer that fails at
/// the first image).
fn gemma3_vision_weights(text: Weights) -> Weights {
    let mut w = prefixed(text, "language_model.");
    let (v, i, patch) = (32, 64, 8);
    let positions = (GEMMA3_IMAGE_SIZE / patch).pow(2);
    let t = "vision_tower.vision_model";
    w.normal(
        &format!("{t}.embeddings.patch_embedding.weight"),
        &[v, 3, patch, patch],
        0.1,
    );
    w.constant(&format!("{t}.embeddings.patch_embedding.bias"), &[v], 0.0);
    w.normal(
        &format!("{t}.embeddings.position_embedding.weight"),
        &[positions, v],
        0.1,
    );
    clip_encoder_layer(&mut w, &format!("{t}.encoder.layers.0"), v, i);
    w.constant(&format!("{t}.post_layernorm.weight"), &[v], 1.0);
    w.constant(&format!("{t}.post_layernorm.bias"), &[v], 0.0);
    // Used as `x @ W` ([vision hidden, text hidden]), no `.weight` suffix.
    w.normal(
        "multi_modal_projector.mm_input_projection_weight",
        &[v, HIDDEN],
        0.3 / (v as f32).sqrt(),
    );
    w.constant("multi_modal_projector.mm_soft_emb_norm.weight", &[v], 0.0);
    w
}

/// One encoder layer of a CLIP-style vision tower (SigLIP, CLIP) at `l`, hidden `v`, MLP `i`:
/// every linear with its bias (a missing one loads as a placeholder that fails at the first
/// image).
fn clip_encoder_layer(w: &mut Weights, l: &str, v: usize, i: usize) {
    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        w.linear(&format!("{l}.self_attn.{proj}.weight"), v, v, 1.0);
        w.constant(&format!("{l}.self_attn.{proj}.bias"), &[v], 0.0);
    }
    for norm in ["layer_norm1", "layer_norm2"] {
        w.constant(&format!("{l}.{norm}.weight"), &[v], 1.0);
        w.constant(&format!("{l}.{norm}.bias"), &[v], 0.0);
    }
    w.linear(&format!("{l}.mlp.fc1.weight"), i, v, 1.0);
    w.constant(&format!("{l}.mlp.fc1.bias"), &[i], 0.0);
    w.linear(&format!("{l}.mlp.fc2.weight"), v, i, 1.0);
    w.constant(&format!("{l}.mlp.fc2.bias"), &[v], 0.0);
}

/// Prefix every tensor name.
fn prefixed(mut w: Weights, prefix: &str) -> Weights {
    for (name, _, _) in w.tensors.iter_mut() {
        *name = format!("{prefix}{name}");
    }
    w
}

/// Mistral 3: `text` (the Mistral config) under `text_config`, a tiny Pixtral tower
/// (`mistral3/config.rs`, `vision.rs`).
fn mistral3_config(text: Value) -> Value {
    let mut text_config = text;
    text_config["model_type"] = json!("mistral");
    json!({
        "architectures": [Arch::Mistral3.hf_name()], "model_type": "mistral3",
        "image_token_index": VOCAB - 1, "multimodal_projector_bias": false,
        "projector_hidden_act": "gelu", "spatial_merge_size": 2, "vision_feature_layer": -1,
        "text_config": text_config,
        "vision_config": {
            "model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16,
            "num_channels": 3, "image_size": 32, "patch_size": 8, "rope_theta": 10000.0,
            "hidden_act": "silu",
        },
    })
}

fn mistral3_weights(text: Weights) -> Weights {
    let mut w = prefixed(text, "language_model.");
    let (v, i) = (32, 64);
    w.normal("vision_tower.patch_conv.weight", &[v, 3, 8, 8], 0.1);
    w.constant("vision_tower.ln_pre.weight", &[v], 1.0);
    let l = "vision_tower.transformer.layers.0";
    w.constant(&format!("{l}.attention_norm.weight"), &[v], 1.0);
    w.constant(&format!("{l}.ffn_norm.weight"), &[v], 1.0);
    for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        w.linear(&format!("{l}.attention.{proj}.weight"), v, v, 1.0);
    }
    w.linear(&format!("{l}.feed_forward.gate_proj.weight"), i, v, 1.0);
    w.linear(&format!("{l}.feed_forward.up_proj.weight"), i, v, 1.0);
    w.linear(&format!("{l}.feed_forward.down_proj.weight"), v, i, 1.0);
    w.constant("multi_modal_projector.norm.weight", &[v], 1.0);
    w.linear("multi_modal_projector.linear_1.weight", HIDDEN, v, 1.0);
    w.linear("multi_modal_projector.linear_2.weight", HIDDEN, HIDDEN, 1.0);
    w.linear(
        "multi_modal_projector.patch_merger.merging_layer.weight",
        v,
        4 * v,
        1.0,
    );
    w
}

/// Qwen2.5-VL: the Qwen2 config (flat) with multimodal RoPE (sections summing to head_dim / 2)
/// and a one-block vision tower (`qwen2_5_vl/config.rs`).
fn qwen25_vl_config(text: Value) -> Value {
    let mut c = text;
    c["architectures"] = json!([Arch::Qwen25Vl.hf_name()]);
    c["model_type"] = json!("qwen2_5_vl");
    c["use_sliding_window"] = json!(false);
    c["rope_scaling"] = json!({"type": "mrope", "mrope_section": [4, 6, 6]});
    c["image_token_id"] = json!(VOCAB - 3);
    c["video_token_id"] = json!(VOCAB - 2);
    c["vision_start_token_id"] = json!(VOCAB - 5);
    c["vision_end_token_id"] = json!(VOCAB - 4);
    c["vision_config"] = json!({
        "depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
        "out_hidden_size": HIDDEN, "in_chans": 3, "patch_size": 8, "temporal_patch_size": 2,
        "spatial_merge_size": 2, "window_size": 32, "fullatt_block_indexes": [0],
        "hidden_act": "silu",
    });
    c
}

fn qwen25_vl_weights(text: Weights) -> Weights {
    let mut w = text;
    let (v, i) = (32, 64);
    w.normal("visual.patch_embed.proj.weight", &[v, 3, 2, 8, 8], 0.1);
    let b = "visual.blocks.0";
    w.constant(&format!("{b}.norm1.weight"), &[v], 1.0);
    w.constant(&format!("{b}.norm2.weight"), &[v], 1.0);
    w.linear(&format!("{b}.attn.qkv.weight"), 3 * v, v, 1.0);
    w.constant(&format!("{b}.attn.qkv.bias"), &[3 * v], 0.0);
    w.linear(&format!("{b}.attn.proj.weight"), v, v, 1.0);
    w.constant(&format!("{b}.attn.proj.bias"), &[v], 0.0);
    for (proj, out, inp) in [("gate_proj", i, v), ("up_proj", i, v), ("down_proj", v, i)] {
        w.linear(&format!("{b}.mlp.{proj}.weight"), out, inp, 1.0);
        w.constant(&format!("{b}.mlp.{proj}.bias"), &[out], 0.0);
    }
    w.constant("visual.merger.ln_q.weight", &[v], 1.0);
    w.linear("visual.merger.mlp.0.weight", 4 * v, 4 * v, 1.0);
    w.constant("visual.merger.mlp.0.bias", &[4 * v], 0.0);
    w.linear("visual.merger.mlp.2.weight", HIDDEN, 4 * v, 1.0);
    w.constant("visual.merger.mlp.2.bias", &[HIDDEN], 0.0);
    w
}

/// Llama 4, dense: the llama config under `text_config` with `moe_layers: []` and a chunked
/// attention as long as the context (so its mask is the causal one), a one-layer vision tower
/// (`llama4/config.rs`).
fn llama4_config(text: Value) -> Value {
    let mut t = text;
    for (k, v) in [
        ("intermediate_size_mlp", json!(INTERMEDIATE)),
        ("use_qk_norm", json!(false)),
        ("moe_layers", json!([])),
        ("interleave_moe_layer_step", json!(1)),
        ("num_local_experts", json!(1)),
        ("num_experts_per_tok", json!(1)),
        ("attention_chunk_size", json!(4096)),
        ("rope_scaling", Value::Null),
        ("model_type", json!("llama4_text")),
    ] {
        t[k] = v;
    }
    json!({
        "architectures": [Arch::Llama4.hf_name()], "model_type": "llama4",
        "image_token_index": VOCAB - 4,
        "text_config": t,
        "vision_config": {
            "hidden_size": 32, "hidden_act": "gelu", "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_channels": 3, "intermediate_size": 128,
            "vision_output_dim": 64, "image_size": 16, "patch_size": 8, "norm_eps": 1e-5,
            "pixel_shuffle_ratio": 0.5, "projector_input_dim": 64, "projector_output_dim": 64,
            "vision_feature_layer": -1, "rope_theta": 10000.0,
        },
    })
}

fn llama4_weights(text: Weights) -> Weights {
    let mut w = prefixed(text, "language_model.");
    for (name, _, _) in w.tensors.iter_mut() {
        *name = name.replace(".mlp.", ".feed_forward.");
    }
    let v = 32;
    w.linear("multi_modal_projector.linear_1.weight", HIDDEN, 64, 1.0);
    let m = "vision_model";
    w.linear(
        &format!("{m}.patch_embedding.linear.weight"),
        v,
        3 * 8 * 8,
        1.0,
    );
    w.normal(&format!("{m}.class_embedding"), &[v], 0.1);
    w.normal(&format!("{m}.positional_embedding_vlm"), &[5, v], 0.1);
    for norm in ["layernorm_pre", "layernorm_post"] {
        w.constant(&format!("{m}.{norm}.weight"), &[v], 1.0);
        w.constant(&format!("{m}.{norm}.bias"), &[v], 0.0);
    }
    let l = format!("{m}.model.layers.0");
    for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        w.linear(&format!("{l}.self_attn.{proj}.weight"), v, v, 1.0);
        w.constant(&format!("{l}.self_attn.{proj}.bias"), &[v], 0.0);
    }
    w.linear(&format!("{l}.mlp.fc1.weight"), 128, v, 1.0);
    w.constant(&format!("{l}.mlp.fc1.bias"), &[128], 0.0);
    w.linear(&format!("{l}.mlp.fc2.weight"), v, 128, 1.0);
    w.constant(&format!("{l}.mlp.fc2.bias"), &[v], 0.0);
    for norm in ["input_layernorm", "post_attention_layernorm"] {
        w.constant(&format!("{l}.{norm}.weight"), &[v], 1.0);
        w.constant(&format!("{l}.{norm}.bias"), &[v], 0.0);
    }
    w.linear(&format!("{m}.vision_adapter.mlp.fc1.weight"), 64, 128, 1.0);
    w.linear(&format!("{m}.vision_adapter.mlp.fc2.weight"), 64, 64, 1.0);
    w
}

/// LLaVA 1.5: the llama config under `text_config`, a one-layer CLIP tower
/// (`llava/config.rs`).
fn llava_config(text: Value) -> Value {
    let mut t = text;
    t["model_type"] = json!("llama");
    t["max_length"] = json!(4096);
    json!({
        "architectures": [Arch::Llava.hf_name()], "model_type": "llava",
        "image_token_index": VOCAB - 1, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": t,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_attention_heads": 2, "num_hidden_layers": 1, "image_size": 32,
            "patch_size": 8,
        },
    })
}

fn llava_weights(text: Weights) -> Weights {
    let mut w = prefixed(text, "language_model.");
    let (v, i) = (32, 64);
    let t = "vision_tower.vision_model";
    w.normal(&format!("{t}.embeddings.class_embedding"), &[v], 0.1);
    w.normal(
        &format!("{t}.embeddings.patch_embedding.weight"),
        &[v, 3, 8, 8],
        0.1,
    );
    w.normal(
        &format!("{t}.embeddings.position_embedding.weight"),
        &[17, v],
        0.1,
    );
    for norm in ["pre_layrnorm", "post_layernorm"] {
        w.constant(&format!("{t}.{norm}.weight"), &[v], 1.0);
        w.constant(&format!("{t}.{norm}.bias"), &[v], 0.0);
    }
    clip_encoder_layer(&mut w, &format!("{t}.encoder.layers.0"), v, i);
    w.linear("multi_modal_projector.linear_1.weight", HIDDEN, v, 1.0);
    w.constant("multi_modal_projector.linear_1.bias", &[HIDDEN], 0.0);
    w.linear("multi_modal_projector.linear_2.weight", HIDDEN, HIDDEN, 1.0);
    w.constant("multi_modal_projector.linear_2.bias", &[HIDDEN], 0.0);
    w
}

/// Gemma 4 with text settings under `text_config`: layer 0 slides (window [`GEMMA3_WINDOW`]),
/// layers 1-3 attend globally, the last two share layer 1's KV (`num_kv_shared_layers`), and a
/// vision tower of no layers (`gemma4/config.rs`).
fn gemma4_config() -> Value {
    json!({
        "architectures": [Arch::Gemma4.hf_name()],
        "model_type": "gemma4",
        "text_config": {
            "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": GEMMA4_LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "global_head_dim": HEAD_DIM,
            "vocab_size": VOCAB, "sliding_window": GEMMA3_WINDOW,
            "max_position_embeddings": 4096,
            "layer_types": ["sliding_attention", "full_attention", "full_attention",
                            "full_attention"],
            "num_kv_shared_layers": 2, "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": true, "rms_norm_eps": 1e-6,
        },
        "vision_config": {
            "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 0,
            "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8, "patch_size": 2,
            "position_embedding_size": 4, "default_output_length": 4,
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
    })
}

/// Every tensor 0.8.1's Gemma 4 loader reads for [`gemma4_config`]. Its RMSNorm scales by the
/// weight itself (not 1 + weight), and attention has a softmax scale of 1 over normalized q and
/// k: q_norm and k_norm of 1/sqrt(sqrt(head_dim)) give scores of about unit scale.
fn gemma4_weights(seed: u64) -> Weights {
    let mut w = Weights::new(seed);
    let (h, d, i) = (HIDDEN, HEAD_DIM, INTERMEDIATE);
    let qk_norm = 1.0 / (d as f32).sqrt().sqrt();
    let m = "model.language_model";
    w.normal(
        &format!("{m}.embed_tokens.weight"),
        &[VOCAB, h],
        TIED_EMBED_STD,
    );
    for l in 0..GEMMA4_LAYERS {
        let p = format!("{m}.layers.{l}");
        let a = format!("{p}.self_attn");
        // Shared layers load (and discard) their own k and v projections too.
        w.linear(&format!("{a}.q_proj.weight"), HEADS * d, h, 1.0);
        w.linear(&format!("{a}.k_proj.weight"), KV_HEADS * d, h, 1.0);
        w.linear(&format!("{a}.v_proj.weight"), KV_HEADS * d, h, 1.0);
        w.linear(&format!("{a}.o_proj.weight"), h, HEADS * d, 1.0);
        w.constant(&format!("{a}.q_norm.weight"), &[d], qk_norm);
        w.constant(&format!("{a}.k_norm.weight"), &[d], qk_norm);
        w.linear(&format!("{p}.mlp.gate_proj.weight"), i, h, 1.0);
        w.linear(&format!("{p}.mlp.up_proj.weight"), i, h, 1.0);
        w.linear(&format!("{p}.mlp.down_proj.weight"), h, i, 1.0);
        w.constant(&format!("{p}.input_layernorm.weight"), &[h], 1.0);
        w.constant(&format!("{p}.pre_feedforward_layernorm.weight"), &[h], 1.0);
        w.constant(
            &format!("{p}.post_attention_layernorm.weight"),
            &[h],
            GEMMA_OUT_GAIN,
        );
        w.constant(
            &format!("{p}.post_feedforward_layernorm.weight"),
            &[h],
            GEMMA_OUT_GAIN,
        );
    }
    w.constant(&format!("{m}.norm.weight"), &[h], 1.0);
    w.normal(
        "model.vision_tower.patch_embedder.input_proj.weight",
        &[8, 12],
        0.1,
    );
    w.normal(
        "model.vision_tower.patch_embedder.position_embedding_table",
        &[2, 4, 8],
        0.1,
    );
    w.normal(
        "model.embed_vision.embedding_projection.weight",
        &[h, 8],
        0.1,
    );
    w
}

/// Gemma 3's image markers replace the last three words as special added tokens.
fn add_image_markers(tokenizer: &mut Value) {
    let vocab = tokenizer["model"]["vocab"].as_object_mut().expect("vocab");
    for (k, marker) in GEMMA3_IMAGE_MARKERS.iter().enumerate() {
        let id = VOCAB - 3 + k;
        vocab.remove(&piece(id, &format!("w{id}")));
        vocab.insert(marker.to_string(), json!(id));
    }
    let added = tokenizer["added_tokens"]
        .as_array_mut()
        .expect("added_tokens");
    for (k, marker) in GEMMA3_IMAGE_MARKERS.iter().enumerate() {
        added.push(
            json!({"id": VOCAB - 3 + k, "content": marker, "single_word": false,
                          "lstrip": false, "rstrip": false, "normalized": false,
                          "special": true}),
        );
    }
}

/// Every tensor 0.8.1's Granite hybrid loader (`models/granite.rs`) reads for the dense form:
/// a Mamba 2 layer (0) and an attention layer (1), each with the shared MLP.
fn granite_hybrid_weights(seed: u64) -> Weights {
    let mut w = Weights::new(seed);
    let (h, d) = (HIDDEN, HEAD_DIM);
    let inner = 2 * h;
    let conv_dim = inner + 2 * MAMBA_STATE;
    w.normal("model.embed_tokens.weight", &[VOCAB, h], EMBED_STD);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        if l == 0 {
            let m = format!("{p}.mamba");
            // Rows: the gate (inner), x B C (conv_dim), one dt per head.
            w.linear(
                &format!("{m}.in_proj.weight"),
                inner + conv_dim + MAMBA_HEADS,
                h,
                1.0,
            );
            w.normal(
                &format!("{m}.conv1d.weight"),
                &[conv_dim, 1, MAMBA_CONV],
                0.5,
            );
            w.constant(&format!("{m}.conv1d.bias"), &[conv_dim], 0.0);
            w.constant(&format!("{m}.dt_bias"), &[MAMBA_HEADS], 0.0);
            w.constant(&format!("{m}.A_log"), &[MAMBA_HEADS], 0.0);
            w.constant(&format!("{m}.D"), &[MAMBA_HEADS], 1.0);
            w.constant(&format!("{m}.norm.weight"), &[inner], 1.0);
            w.linear(&format!("{m}.out_proj.weight"), h, inner, 1.0);
        } else {
            let a = format!("{p}.self_attn");
            w.linear(&format!("{a}.q_proj.weight"), HEADS * d, h, QK_GAIN);
            w.linear(&format!("{a}.k_proj.weight"), KV_HEADS * d, h, QK_GAIN);
            w.linear(&format!("{a}.v_proj.weight"), KV_HEADS * d, h, 1.0);
            w.linear(&format!("{a}.o_proj.weight"), h, HEADS * d, 1.0);
        }
        let mlp = format!("{p}.shared_mlp");
        w.linear(
            &format!("{mlp}.input_linear.weight"),
            2 * INTERMEDIATE,
            h,
            1.0,
        );
        w.linear(&format!("{mlp}.output_linear.weight"), h, INTERMEDIATE, 1.0);
        w.constant(&format!("{p}.input_layernorm.weight"), &[h], 1.0);
        w.constant(&format!("{p}.post_attention_layernorm.weight"), &[h], 1.0);
    }
    w.constant("model.norm.weight", &[h], 1.0);
    w.linear("lm_head.weight", VOCAB, h, LM_HEAD_GAIN);
    w
}

fn vocab_words() -> Vec<String> {
    ["<unk>", "<s>", "</s>"]
        .iter()
        .map(|s| s.to_string())
        .chain((FIRST_WORD as usize..VOCAB).map(|i| format!("w{i}")))
        .collect()
}

/// The SentencePiece form of word `id`: `\u{2581}w<id>` (specials as they are).
fn piece(id: usize, word: &str) -> String {
    if id < FIRST_WORD as usize {
        word.to_string()
    } else {
        format!("\u{2581}{word}")
    }
}

/// A word-level tokenizer.json; the three specials are added tokens. Words are split and marked
/// SentencePiece-style (Metaspace) and decoded with a `Replace` + `ByteFallback` sequence:
/// llguidance, which mistral.rs builds for every model, accepts only byte-level or byte-fallback
/// decoders ("can't determine decoder type" otherwise).
fn word_level_tokenizer() -> Value {
    let words = vocab_words();
    let vocab: serde_json::Map<String, Value> = words
        .iter()
        .enumerate()
        .map(|(id, w)| (piece(id, w), json!(id)))
        .collect();
    let added: Vec<Value> = words[..FIRST_WORD as usize]
        .iter()
        .enumerate()
        .map(|(id, w)| {
            json!({"id": id, "content": w, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
                          "prepend_scheme": "always", "split": true},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    })
}
