//! The validated LogQuant configuration: bit width, window, group size, key grouping and the
//! full-precision selection policy. Raw values (flags, TOML) become a [`LogQuantConfig`] only
//! through [`LogQuantConfig::validate`], whose errors name the field and the allowed values.

use serde::{Deserialize, Serialize};

/// How keys are grouped for quantization. Values are always grouped per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyGrouping {
    /// One scale/min per channel over `group_size` consecutive evicted tokens (KIVI-style).
    /// Keys have outlier channels; at 2 bits this is the setting that keeps SmolLM2 working.
    PerChannel,
    /// One scale/min per `group_size` channels of one token (the reference code's behaviour).
    PerToken,
}

/// Which tokens stay in full precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    pub fn name(self) -> &'static str {
        match self {
            Self::Logquant => "logquant",
            Self::Recent => "recent",
            Self::SinkRecent => "sink-recent",
            Self::None => "none",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "logquant" => Self::Logquant,
            "recent" => Self::Recent,
            "sink-recent" => Self::SinkRecent,
            "none" => Self::None,
            _ => {
                return Err(ConfigError::Invalid {
                    field: "policy",
                    value: s.to_string(),
                    allowed: "logquant, recent, sink-recent, none",
                })
            }
        })
    }
}

impl std::str::FromStr for KeyGrouping {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "per-channel" => Self::PerChannel,
            "per-token" => Self::PerToken,
            _ => {
                return Err(ConfigError::Invalid {
                    field: "key-grouping",
                    value: s.to_string(),
                    allowed: "per-channel, per-token",
                })
            }
        })
    }
}

/// How decode attention reads the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionKernel {
    /// On the CPU, attend over the packed codes directly (no dequantized copy).
    Fused,
    /// Dequantize into one block and use mistral.rs's attention (every device).
    Portable,
}

impl std::str::FromStr for AttentionKernel {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "fused" => Self::Fused,
            "portable" => Self::Portable,
            _ => {
                return Err(ConfigError::Invalid {
                    field: "kernel",
                    value: s.to_string(),
                    allowed: "fused, portable",
                })
            }
        })
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field} `{value}` (allowed: {allowed})")]
    Invalid {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("group size {group_size} does not divide head_dim {head_dim}")]
    GroupSizeVsHeadDim { group_size: usize, head_dim: usize },
}

/// The LogQuant cache configuration. `Default` is the paper's headline setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogQuantConfig {
    /// Bits per quantized value: 2, 4 or 8.
    pub bits: u8,
    /// LogQuant window W: at most 3W full-precision tokens.
    pub window: usize,
    /// Values per scale/min group.
    pub group_size: usize,
    pub key_grouping: KeyGrouping,
    pub policy: PolicyKind,
    /// Newest tokens kept by `recent` and `sink-recent`.
    pub recent: usize,
    /// First tokens kept by `sink-recent`.
    pub sink: usize,
    /// Decode attention: fused over the codes (CPU) or portable.
    pub kernel: AttentionKernel,
}

impl Default for LogQuantConfig {
    fn default() -> Self {
        Self {
            bits: 2,
            window: 42,
            group_size: 64,
            key_grouping: KeyGrouping::PerChannel,
            policy: PolicyKind::Logquant,
            recent: 126,
            sink: 4,
            kernel: AttentionKernel::Fused,
        }
    }
}

impl LogQuantConfig {
    /// Check every field; the error names the first bad one.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let invalid = |field, value: String, allowed| ConfigError::Invalid {
            field,
            value,
            allowed,
        };
        if ![2, 4, 8].contains(&self.bits) {
            return Err(invalid("bits", self.bits.to_string(), "2, 4, 8"));
        }
        if self.policy == PolicyKind::Logquant && self.window == 0 {
            return Err(invalid("window", "0".into(), "an integer >= 1"));
        }
        if self.group_size == 0 || !self.group_size.is_multiple_of(4) {
            return Err(invalid(
                "group-size",
                self.group_size.to_string(),
                "a positive multiple of 4 that divides head_dim",
            ));
        }
        if matches!(self.policy, PolicyKind::Recent | PolicyKind::SinkRecent) && self.recent == 0 {
            return Err(invalid("recent", "0".into(), "an integer >= 1"));
        }
        if self.policy == PolicyKind::SinkRecent && self.sink == 0 {
            return Err(invalid("sink", "0".into(), "an integer >= 1"));
        }
        Ok(self)
    }

    /// Check the parts that depend on the model's head dimension.
    pub fn validate_for_head_dim(&self, head_dim: usize) -> Result<(), ConfigError> {
        if !head_dim.is_multiple_of(self.group_size) {
            return Err(ConfigError::GroupSizeVsHeadDim {
                group_size: self.group_size,
                head_dim,
            });
        }
        Ok(())
    }

    /// The full-precision token budget of the policy (excluding key-group staging).
    pub fn full_precision_budget(&self) -> usize {
        match self.policy {
            PolicyKind::Logquant => 3 * self.window,
            PolicyKind::Recent => self.recent,
            PolicyKind::SinkRecent => self.sink + self.recent,
            PolicyKind::None => 1,
        }
    }

    /// One line for logs and `/v1/kv-cache`.
    pub fn describe(&self) -> String {
        let policy = match self.policy {
            PolicyKind::Logquant => format!("logquant W={}", self.window),
            PolicyKind::Recent => format!("recent R={}", self.recent),
            PolicyKind::SinkRecent => format!("sink-recent S={} R={}", self.sink, self.recent),
            PolicyKind::None => "none".to_string(),
        };
        let keys = match self.key_grouping {
            KeyGrouping::PerChannel => "per-channel",
            KeyGrouping::PerToken => "per-token",
        };
        let kernel = match self.kernel {
            AttentionKernel::Fused => "",
            AttentionKernel::Portable => ", portable",
        };
        format!(
            "{policy}, {}-bit, G={}, keys {keys}{kernel}",
            self.bits, self.group_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_papers_setting() {
        let c = LogQuantConfig::default().validate().unwrap();
        assert_eq!((c.bits, c.window, c.group_size), (2, 42, 64));
        assert_eq!(c.full_precision_budget(), 126);
        assert_eq!(c.key_grouping, KeyGrouping::PerChannel);
    }

    #[test]
    fn errors_name_the_field_and_allowed_values() {
        let bad = |f: fn(&mut LogQuantConfig)| {
            let mut c = LogQuantConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert_eq!(bad(|c| c.bits = 3), "invalid bits `3` (allowed: 2, 4, 8)");
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
        assert!(serde_json::from_str::<LogQuantConfig>(r#"{"bitz": 4}"#).is_err());
    }
}
