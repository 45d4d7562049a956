//! The validated LogQuant configuration: bit width, window, group size, key grouping and the
//! full-precision selection policy. Raw values (flags, TOML) become a [`LogQuantConfig`] only
//! through [`LogQuantConfig::validate`], whose errors name the field and the allowed values.

use serde::{Deserialize, Serialize};

use crate::policy::{Policy, Selection};

/// Bits of one group's f16 scale and f16 minimum (see `quant`).
const SCALE_MIN_BITS: f64 = 32.0;

/// The memory arithmetic of the spec (section 5), generalized to separate key and value widths
/// and key groups: how many of a sequence's tokens are quantized, and what each costs.
/// Per layer and KV head, a token holds `head_dim` keys and `head_dim` values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheFootprint {
    pub tokens: usize,
    /// Tokens stored as codes (keys and values).
    pub quantized: usize,
    /// Tokens in the activation dtype: the policy's selection plus keys staged for a group.
    pub full_precision: usize,
    /// Bits per quantized key, its share of the group's scale and min included.
    pub key_bits_per_value: f64,
    /// Bits per quantized value (V), likewise.
    pub value_bits_per_value: f64,
}

impl CacheFootprint {
    /// Mean bits per cached key or value, all overhead included, with full-precision tokens at
    /// `full_precision_bits` (16 for a 16-bit model, 32 for f32). A 16-bit default cache is 16.
    pub fn bits_per_value(&self, full_precision_bits: u32) -> f64 {
        if self.tokens == 0 {
            return 0.0;
        }
        let quantized =
            self.quantized as f64 * (self.key_bits_per_value + self.value_bits_per_value) / 2.0;
        let full = self.full_precision as f64 * f64::from(full_precision_bits);
        (quantized + full) / self.tokens as f64
    }
}

/// How keys are grouped for quantization. Values are always grouped per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KeyGrouping {
    /// One scale/min per channel over `group_size` consecutive evicted tokens (KIVI-style).
    /// Keys have outlier channels; at 2 bits this is the setting that keeps SmolLM2 working.
    PerChannel,
    /// One scale/min per `group_size` channels of one token (the reference code's behaviour).
    PerToken,
}

impl std::str::FromStr for KeyGrouping {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        parse_named("key-grouping", s)
    }
}

/// How decode attention reads the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionKernel {
    /// On the CPU (and for decode on CUDA with the `cuda` feature), attend over the packed
    /// codes directly (no dequantized copy).
    Fused,
    /// Dequantize into one block and use mistral.rs's attention (every device).
    Portable,
}

impl std::str::FromStr for AttentionKernel {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        parse_named("kernel", s)
    }
}

/// The names of a configuration enum, as flags and TOML spell them: `a, b, c`.
pub fn allowed_names<T: clap::ValueEnum>() -> String {
    T::value_variants()
        .iter()
        .filter_map(|v| v.to_possible_value())
        .map(|v| v.get_name().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parse a configuration enum by name; the error names `field` and the allowed names.
pub fn parse_named<T: clap::ValueEnum>(field: &'static str, s: &str) -> Result<T, ConfigError> {
    T::from_str(s, false).map_err(|_| ConfigError::Invalid {
        field,
        value: s.to_string(),
        allowed: allowed_names::<T>(),
    })
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field} `{value}` (allowed: {allowed})")]
    Invalid {
        field: &'static str,
        value: String,
        allowed: String,
    },
    #[error("group size {group_size} does not divide head_dim {head_dim}")]
    GroupSizeVsHeadDim { group_size: usize, head_dim: usize },
    #[error("rotation needs a power-of-two head_dim, not {head_dim}")]
    RotateVsHeadDim { head_dim: usize },
    #[error("3-bit codes need a head_dim that is a multiple of 8, not {head_dim}")]
    ThreeBitsVsHeadDim { head_dim: usize },
}

/// Allowed widths of a quantized key or value.
pub const ALLOWED_BITS: [u8; 4] = [2, 3, 4, 8];

/// The LogQuant cache configuration. `Default` is the setting this crate recommends (4-bit keys
/// grouped per channel over 64 tokens, 2-bit values, Hadamard rotation, W = 42: about 3.9 bits
/// per cached value at 4k tokens; docs/quality.md has the measurements that chose it, among
/// them that 3-bit keys lose long-range retrieval);
/// [`LogQuantConfig::paper`] is the paper's 2-bit setting.
///
/// Deserialized (TOML `[logquant]`, JSON) over `Default`, with `bits` applied first and
/// setting both widths, as `--kv-bits` does; `key-bits` and `value-bits` then override it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RawConfig", into = "RawConfig")]
pub struct LogQuantConfig {
    /// Bits per quantized value: 2, 3, 4 or 8; keys and values unless overridden below.
    pub bits: u8,
    /// Bits per quantized key, when it differs from `bits` (see [`LogQuantConfig::key_bits`]).
    pub key_bits: Option<u8>,
    /// Bits per quantized value (V), when it differs from `bits`.
    pub value_bits: Option<u8>,
    /// LogQuant window W: at most 3W full-precision tokens.
    pub window: usize,
    /// Values per scale/min group.
    pub group_size: usize,
    /// Values per key scale/min group, when it differs from `group_size`: tokens per group for
    /// per-channel keys (e.g. 128), channels per group for per-token keys.
    pub key_group_size: Option<usize>,
    pub key_grouping: KeyGrouping,
    pub policy: PolicyKind,
    /// Newest tokens kept by `recent` and `sink-recent`.
    pub recent: usize,
    /// First tokens kept by `sink-recent`.
    pub sink: usize,
    /// Decode attention: fused over the codes (CPU) or portable.
    pub kernel: AttentionKernel,
    /// Rotate keys and values by a normalized Hadamard transform over head_dim before
    /// quantizing (spreads outlier channels; head_dim must be a power of two).
    pub rotate: bool,
}

impl Default for LogQuantConfig {
    fn default() -> Self {
        Self {
            key_bits: Some(4),
            rotate: true,
            ..Self::paper()
        }
    }
}

/// A `[logquant]` table as written: every key optional. A configuration serializes with every
/// key and the widths and key group in effect, so it reads back to the same cache.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    bits: Option<u8>,
    key_bits: Option<u8>,
    value_bits: Option<u8>,
    window: Option<usize>,
    group_size: Option<usize>,
    key_group_size: Option<usize>,
    key_grouping: Option<KeyGrouping>,
    policy: Option<PolicyKind>,
    recent: Option<usize>,
    sink: Option<usize>,
    kernel: Option<AttentionKernel>,
    rotate: Option<bool>,
}

impl From<LogQuantConfig> for RawConfig {
    fn from(c: LogQuantConfig) -> Self {
        Self {
            bits: Some(c.bits),
            key_bits: Some(c.key_bits()),
            value_bits: Some(c.value_bits()),
            window: Some(c.window),
            group_size: Some(c.group_size),
            key_group_size: Some(c.key_group_size()),
            key_grouping: Some(c.key_grouping),
            policy: Some(c.policy),
            recent: Some(c.recent),
            sink: Some(c.sink),
            kernel: Some(c.kernel),
            rotate: Some(c.rotate),
        }
    }
}

impl From<RawConfig> for LogQuantConfig {
    fn from(raw: RawConfig) -> Self {
        let mut c = Self::default();
        if let Some(bits) = raw.bits {
            c.set_bits(bits);
        }
        c.key_bits = raw.key_bits.or(c.key_bits);
        c.value_bits = raw.value_bits.or(c.value_bits);
        c.window = raw.window.unwrap_or(c.window);
        c.group_size = raw.group_size.unwrap_or(c.group_size);
        if let Some(grouping) = raw.key_grouping {
            c.set_key_grouping(grouping);
        }
        c.key_group_size = raw.key_group_size.or(c.key_group_size);
        c.policy = raw.policy.unwrap_or(c.policy);
        c.recent = raw.recent.unwrap_or(c.recent);
        c.sink = raw.sink.unwrap_or(c.sink);
        c.kernel = raw.kernel.unwrap_or(c.kernel);
        c.rotate = raw.rotate.unwrap_or(c.rotate);
        c
    }
}

impl LogQuantConfig {
    /// The paper's headline setting (arXiv 2503.19950): 2-bit keys and values, W = 42,
    /// groups of 64 (keys per channel over 64 tokens), no rotation.
    pub fn paper() -> Self {
        Self {
            bits: 2,
            key_bits: None,
            value_bits: None,
            window: 42,
            group_size: 64,
            key_group_size: None,
            key_grouping: KeyGrouping::PerChannel,
            policy: PolicyKind::Logquant,
            recent: 126,
            sink: 4,
            kernel: AttentionKernel::Fused,
            rotate: false,
        }
    }

    /// Check every field; the error names the first bad one.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let invalid = |field, value: String, allowed: &str| ConfigError::Invalid {
            field,
            value,
            allowed: allowed.to_string(),
        };
        for (field, bits) in [
            ("bits", Some(self.bits)),
            ("key-bits", self.key_bits),
            ("value-bits", self.value_bits),
        ] {
            if let Some(bits) = bits.filter(|b| !ALLOWED_BITS.contains(b)) {
                return Err(invalid(field, bits.to_string(), "2, 3, 4, 8"));
            }
        }
        self.policy.validate(&self)?;
        if self.group_size == 0 || !self.group_size.is_multiple_of(4) {
            return Err(invalid(
                "group-size",
                self.group_size.to_string(),
                "a positive multiple of 4 that divides head_dim",
            ));
        }
        if let Some(g) = self
            .key_group_size
            .filter(|g| *g == 0 || !g.is_multiple_of(4))
        {
            return Err(invalid(
                "key-group-size",
                g.to_string(),
                "a positive multiple of 4 (tokens per channel group, or channels dividing head_dim)",
            ));
        }
        Ok(self)
    }

    /// Check the parts that depend on the model's head dimension.
    pub fn validate_for_head_dim(&self, head_dim: usize) -> Result<(), ConfigError> {
        let mut channel_groups = vec![self.group_size];
        if self.key_grouping == KeyGrouping::PerToken {
            channel_groups.push(self.key_group_size());
        }
        for group_size in channel_groups {
            if !head_dim.is_multiple_of(group_size) {
                return Err(ConfigError::GroupSizeVsHeadDim {
                    group_size,
                    head_dim,
                });
            }
        }
        if self.rotate && !head_dim.is_power_of_two() {
            return Err(ConfigError::RotateVsHeadDim { head_dim });
        }
        // 3-bit rows pack 8 codes into 3 bytes (quant.rs).
        if (self.key_bits() == 3 || self.value_bits() == 3) && !head_dim.is_multiple_of(8) {
            return Err(ConfigError::ThreeBitsVsHeadDim { head_dim });
        }
        Ok(())
    }

    /// Bits per quantized key.
    pub fn key_bits(&self) -> u8 {
        self.key_bits.unwrap_or(self.bits)
    }

    /// Bits per quantized value (V).
    pub fn value_bits(&self) -> u8 {
        self.value_bits.unwrap_or(self.bits)
    }

    /// Values per key group: tokens for per-channel keys, channels for per-token keys.
    pub fn key_group_size(&self) -> usize {
        self.key_group_size.unwrap_or(self.group_size)
    }

    /// Group keys `grouping`-wise (what `--kv-key-grouping` does). A key group size counts
    /// tokens for per-channel keys and channels for per-token keys, so a change of grouping
    /// drops it (back to `group_size`) unless it is set again afterwards.
    pub fn set_key_grouping(&mut self, grouping: KeyGrouping) {
        if grouping != self.key_grouping {
            self.key_grouping = grouping;
            self.key_group_size = None;
        }
    }

    /// Set keys and values to `bits` (what `--kv-bits` does).
    pub fn set_bits(&mut self, bits: u8) {
        self.bits = bits;
        self.key_bits = None;
        self.value_bits = None;
    }

    /// The full-precision token budget of the policy (excluding key-group staging).
    pub fn full_precision_budget(&self) -> usize {
        self.policy.full_precision_budget(self)
    }

    /// Where a sequence's `tokens` cached tokens sit under this configuration, after a
    /// prefill of `tokens - 1` and one decode step (what a prompt and its first generated token
    /// leave): see [`CacheFootprint`].
    pub fn footprint(&self, tokens: usize) -> CacheFootprint {
        let mut selection = Selection::new(self.policy_rule());
        let mut evicted = selection.admit(tokens.saturating_sub(1)).len();
        if tokens > 0 {
            evicted += selection.admit(1).len();
        }
        // Per-channel keys are quantized in whole key groups; the rest wait, staged, in the
        // activation dtype. Per-token keys quantize every evicted token at once.
        let quantized = match self.key_grouping {
            KeyGrouping::PerChannel => evicted / self.key_group_size() * self.key_group_size(),
            KeyGrouping::PerToken => evicted,
        };
        CacheFootprint {
            tokens,
            quantized,
            full_precision: tokens - quantized,
            key_bits_per_value: f64::from(self.key_bits())
                + SCALE_MIN_BITS / self.key_group_size() as f64,
            value_bits_per_value: f64::from(self.value_bits())
                + SCALE_MIN_BITS / self.group_size as f64,
        }
    }

    /// One line for logs and `/v1/kv-cache`.
    pub fn describe(&self) -> String {
        let policy = self.policy.describe(self);
        let keys = match self.key_grouping {
            KeyGrouping::PerChannel => "per-channel",
            KeyGrouping::PerToken => "per-token",
        };
        let kernel = match self.kernel {
            AttentionKernel::Fused => "",
            AttentionKernel::Portable => ", portable",
        };
        let bits = if self.key_bits() == self.value_bits() {
            format!("{}-bit", self.key_bits())
        } else {
            format!("K{}V{}", self.key_bits(), self.value_bits())
        };
        let groups = if self.key_group_size() == self.group_size {
            format!("G={}", self.group_size)
        } else {
            format!("G={} (keys {})", self.group_size, self.key_group_size())
        };
        let rotate = if self.rotate { ", rotated" } else { "" };
        format!("{policy}, {bits}, {groups}, keys {keys}{rotate}{kernel}")
    }
}

/// Which tokens stay in full precision (`--kv-policy`, TOML `policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// LogQuant's log-distributed selection (Algorithm 1), at most 3W tokens.
    Logquant,
    /// The newest `recent` tokens (KIVI / HF QuantizedCache baseline).
    Recent,
    /// The first `sink` tokens plus the newest `recent` tokens (StreamingLLM-style).
    SinkRecent,
    /// Every token quantized once prefill is done.
    None,
}

impl PolicyKind {
    /// The name users write: `logquant`, `recent`, `sink-recent`, `none`.
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// Check the parameters this policy reads.
    pub fn validate(self, config: &LogQuantConfig) -> Result<(), ConfigError> {
        let positive = |field: &'static str, value: usize| {
            if value == 0 {
                Err(ConfigError::Invalid {
                    field,
                    value: "0".into(),
                    allowed: "an integer >= 1".into(),
                })
            } else {
                Ok(())
            }
        };
        match self {
            Self::Logquant => positive("window", config.window),
            Self::Recent => positive("recent", config.recent),
            Self::SinkRecent => {
                positive("recent", config.recent)?;
                positive("sink", config.sink)
            }
            Self::None => Ok(()),
        }
    }

    /// Most tokens the policy keeps in full precision (excluding key-group staging).
    pub fn full_precision_budget(self, config: &LogQuantConfig) -> usize {
        match self {
            Self::Logquant => 3 * config.window,
            Self::Recent => config.recent,
            Self::SinkRecent => config.sink + config.recent,
            Self::None => 1,
        }
    }

    /// The policy and its parameters, for logs, tables and `/v1/kv-cache`.
    pub fn describe(self, config: &LogQuantConfig) -> String {
        match self {
            Self::Logquant => format!("logquant W={}", config.window),
            Self::Recent => format!("recent R={}", config.recent),
            Self::SinkRecent => format!("sink-recent S={} R={}", config.sink, config.recent),
            Self::None => "none".to_string(),
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        parse_named("policy", s)
    }
}

impl LogQuantConfig {
    /// The full-precision rule this configuration selects, with its parameters.
    pub fn policy_rule(&self) -> Policy {
        match self.policy {
            PolicyKind::Logquant => Policy::LogQuant {
                window: self.window,
            },
            PolicyKind::Recent => Policy::Recent {
                recent: self.recent,
            },
            PolicyKind::SinkRecent => Policy::SinkRecent {
                sink: self.sink,
                recent: self.recent,
            },
            PolicyKind::None => Policy::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed from the spec's arithmetic (section 5). After a 4095-token prefill and one
    /// step, W=42 holds 106 tokens (between 2W and 3W) and has evicted 3990: 3968 quantized
    /// (whole key groups of 64 or 128) and 22 staged, so 128 at 16 bits; each quantized key
    /// costs `bits + 32 / key group`, each value `bits + 32 / 64`.
    #[test]
    fn footprint_at_4096_tokens_matches_the_hand_count() {
        let paper = LogQuantConfig::paper().footprint(4096);
        assert_eq!((paper.quantized, paper.full_precision), (3968, 128));
        assert!((paper.bits_per_value(16) - (16.0 * 128.0 + 2.5 * 3968.0) / 4096.0).abs() < 1e-12);
        let default = LogQuantConfig::default().footprint(4096);
        assert!((default.bits_per_value(16) - 3.890625).abs() < 1e-12);
        let small = LogQuantConfig {
            key_bits: Some(3),
            key_group_size: Some(128),
            ..LogQuantConfig::default()
        }
        .footprint(4096);
        // 3990 evicted: 31 groups of 128 quantized, 22 staged.
        assert_eq!((small.quantized, small.full_precision), (3968, 128));
        assert!((small.bits_per_value(16) - (2048.0 + 2.875 * 3968.0) / 4096.0).abs() < 1e-12);
        let per_token = LogQuantConfig {
            key_grouping: KeyGrouping::PerToken,
            ..LogQuantConfig::paper()
        }
        .footprint(4096);
        // Per-token keys quantize every evicted token at once: nothing staged.
        assert_eq!((per_token.quantized, per_token.full_precision), (3990, 106));
        assert_eq!(
            LogQuantConfig::default().footprint(0).bits_per_value(16),
            0.0
        );
    }

    #[test]
    fn default_is_k4v2_rotated_and_the_paper_is_two_bit() {
        let c = LogQuantConfig::default().validate().unwrap();
        assert_eq!(
            (
                c.key_bits(),
                c.value_bits(),
                c.key_group_size(),
                c.group_size
            ),
            (4, 2, 64, 64)
        );
        assert!(c.rotate);
        assert_eq!(c.full_precision_budget(), 126);
        assert_eq!(c.key_grouping, KeyGrouping::PerChannel);
        let p = LogQuantConfig::paper().validate().unwrap();
        assert_eq!(
            (p.key_bits(), p.value_bits(), p.key_group_size(), p.window),
            (2, 2, 64, 42)
        );
        assert!(!p.rotate);
        assert_eq!(p.describe(), "logquant W=42, 2-bit, G=64, keys per-channel");
    }

    #[test]
    fn a_table_reads_over_the_default_with_bits_first_and_configs_round_trip() {
        let read = |json: &str| serde_json::from_str::<LogQuantConfig>(json).unwrap();
        assert_eq!(read("{}"), LogQuantConfig::default());
        // `bits` sets both widths (as --kv-bits does); key-bits then overrides it.
        let c = read(r#"{"bits": 4}"#);
        assert_eq!((c.key_bits(), c.value_bits()), (4, 4));
        let c = read(r#"{"bits": 4, "key-bits": 8}"#);
        assert_eq!((c.key_bits(), c.value_bits()), (8, 4));
        for c in [LogQuantConfig::default(), LogQuantConfig::paper()] {
            let back = read(&serde_json::to_string(&c).unwrap());
            assert_eq!(back.describe(), c.describe());
            assert_eq!(
                (
                    back.key_bits(),
                    back.value_bits(),
                    back.key_group_size(),
                    back.rotate
                ),
                (c.key_bits(), c.value_bits(), c.key_group_size(), c.rotate)
            );
        }
    }

    #[test]
    fn errors_name_the_field_and_allowed_values() {
        let bad = |f: fn(&mut LogQuantConfig)| {
            let mut c = LogQuantConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert_eq!(
            bad(|c| c.bits = 5),
            "invalid bits `5` (allowed: 2, 3, 4, 8)"
        );
        assert!(bad(|c| c.key_bits = Some(1)).starts_with("invalid key-bits `1`"));
        assert!(bad(|c| c.value_bits = Some(16)).starts_with("invalid value-bits `16`"));
        assert!(bad(|c| c.key_group_size = Some(6)).starts_with("invalid key-group-size `6`"));
        assert!(bad(|c| c.window = 0).starts_with("invalid window `0`"));
        assert!(bad(|c| c.group_size = 0).starts_with("invalid group-size `0`"));
        assert!(bad(|c| c.group_size = 6).starts_with("invalid group-size `6`"));
        assert!(bad(|c| {
            c.policy = PolicyKind::Recent;
            c.recent = 0
        })
        .starts_with("invalid recent `0`"));
        let head = LogQuantConfig {
            group_size: 48,
            ..Default::default()
        };
        assert_eq!(
            head.validate_for_head_dim(64).unwrap_err().to_string(),
            "group size 48 does not divide head_dim 64"
        );
        assert_eq!(
            "sideways".parse::<PolicyKind>().unwrap_err().to_string(),
            "invalid policy `sideways` (allowed: logquant, recent, sink-recent, none)"
        );
    }

    #[test]
    fn deserializes_from_toml_style_keys_and_rejects_unknown_ones() {
        let c: LogQuantConfig =
            serde_json::from_str(r#"{"bits": 4, "key-grouping": "per-token", "policy": "recent"}"#)
                .unwrap();
        assert_eq!(c.bits, 4);
        assert_eq!(c.key_grouping, KeyGrouping::PerToken);
        assert_eq!(c.window, 42);
        assert_eq!(c.key_group_size(), c.group_size);
        c.validate_for_head_dim(64).unwrap();
        // 128-token key groups do not carry over as 128-channel groups.
        let mut wide = LogQuantConfig {
            key_group_size: Some(128),
            ..Default::default()
        };
        wide.set_key_grouping(KeyGrouping::PerToken);
        assert_eq!(wide.key_group_size(), wide.group_size);
        wide.validate_for_head_dim(64).unwrap();
        assert!(serde_json::from_str::<LogQuantConfig>(r#"{"bitz": 4}"#).is_err());
        let c: LogQuantConfig = serde_json::from_str(
            r#"{"bits": 2, "key-bits": 4, "key-group-size": 128, "rotate": true}"#,
        )
        .unwrap();
        assert_eq!(
            (c.key_bits(), c.value_bits(), c.key_group_size()),
            (4, 2, 128)
        );
        assert!(c.rotate);
        assert_eq!(
            c.describe(),
            "logquant W=42, K4V2, G=64 (keys 128), keys per-channel, rotated"
        );
    }

    #[test]
    fn widths_and_key_groups_default_to_the_shared_values() {
        let mut c = LogQuantConfig {
            value_bits: Some(8),
            ..LogQuantConfig::paper()
        };
        assert_eq!(
            (c.key_bits(), c.value_bits(), c.key_group_size()),
            (2, 8, 64)
        );
        c.set_bits(4);
        assert_eq!((c.key_bits(), c.value_bits()), (4, 4));
        assert_eq!(c.describe(), "logquant W=42, 4-bit, G=64, keys per-channel");
        let three = LogQuantConfig {
            key_bits: Some(3),
            ..LogQuantConfig::paper()
        };
        assert!(three.validate_for_head_dim(64).is_ok());
        assert_eq!(
            three.validate_for_head_dim(12).unwrap_err().to_string(),
            "group size 64 does not divide head_dim 12"
        );
        let rotated = LogQuantConfig {
            rotate: true,
            group_size: 16,
            ..LogQuantConfig::paper()
        };
        assert_eq!(
            rotated.validate_for_head_dim(48).unwrap_err().to_string(),
            "rotation needs a power-of-two head_dim, not 48"
        );
    }
}
