//! The LogQuant [`KvCacheBackend`]: one layer's cache for a batch of sequences, registered with
//! mistral.rs under the name `logquant`.
//!
//! Two rules keep it exact wherever the engine, not LogQuant, applies the mask:
//! - whatever goes to the engine (through `append`, `materialize`, or the engine's attention
//!   inside `append_and_attend`) is in position order, as the stock cache returns it;
//! - new rows are attended exactly (prefill, chunks, `append`); the policy compresses after.
//!
//! Inside `append_and_attend` with no mask to honour (decode on the CPU, and on CUDA with the
//! `cuda` feature), the fused kernel reads the position-agnostic layout
//! `[quantized | staged | full precision]` directly. Elsewhere the
//! portable path dequantizes the cache on its device (candle ops off the CPU, see
//! [`crate::store::QuantPath`]) and hands it to the engine's attention for the device.

use std::any::Any;
use std::sync::Arc;

use candle_core::{Device, Result, Tensor};
use mistralrs_core::kv_cache_backend::{
    register_kv_cache_backend, AttentionParams, EngineAttention, KvCacheBackend,
    KvCacheBackendFactory, LayerUsage, ModelKvShape,
};

use crate::config::{AttentionKernel, LogQuantConfig};
use crate::kernels::cpu::{attend_chunk, attend_decode};
use crate::store::{QuantPath, SeqLayerStore};

/// Registry name of the LogQuant backend.
pub const LOGQUANT: &str = "logquant";

/// Creates [`LogQuantCache`] layers with one configuration.
#[derive(Debug, Clone, Copy)]
pub struct LogQuantFactory {
    pub config: LogQuantConfig,
    /// Where the layers quantize ([`QuantPath::Auto`] unless forced).
    pub quant_path: QuantPath,
}

impl KvCacheBackendFactory for LogQuantFactory {
    fn name(&self) -> &str {
        LOGQUANT
    }

    fn create(&self, _layer: usize, max_seq_len: usize) -> Box<dyn KvCacheBackend> {
        Box::new(LogQuantCache::with_quant_path(
            self.config,
            max_seq_len,
            self.quant_path,
        ))
    }

    /// Refuses, at load time, models LogQuant cannot cache: a compressed latent instead of
    /// per-head K and V (multi-head latent attention), K and V heads of different sizes, or a
    /// head size that the group size does not divide.
    fn check_model(&self, shape: &ModelKvShape) -> Result<()> {
        check_model_shape(&self.config, shape).map_err(candle_core::Error::Msg)
    }
}

/// The load-time check of [`LogQuantFactory::check_model`], as one line of text.
pub fn check_model_shape(
    config: &LogQuantConfig,
    shape: &ModelKvShape,
) -> std::result::Result<(), String> {
    if shape.latent_attention {
        return Err(
            "logquant: this model caches a compressed latent (multi-head latent \
                    attention, deepseek2/3) instead of per-head keys and values; run it with \
                    --kv-cache default"
                .to_string(),
        );
    }
    for (layer, l) in shape.layers.iter().enumerate() {
        if l.k_head_dim != l.v_head_dim {
            return Err(format!(
                "logquant: layer {layer} has key heads of {} and value heads of {} values; \
                 LogQuant needs equal K and V head sizes; run it with --kv-cache default",
                l.k_head_dim, l.v_head_dim
            ));
        }
        config
            .validate_for_head_dim(l.k_head_dim)
            .map_err(|e| format!("logquant: {e} (layer {layer})"))?;
    }
    Ok(())
}

/// The order in which cached rows are handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowOrder {
    /// Row `p` is position `p`: for attention under the engine's mask.
    Position,
    /// `[quantized | staged | full precision]`: enough when every row is visible.
    Layout,
}

/// Register (or replace) the `logquant` backend with `config`. Models built afterwards with
/// the backend selected use this configuration; models already built keep theirs. The quant
/// path is [`QuantPath::from_env`] (`MISTRALRS_LOGQUANT_DEVICE_PATH=1` forces the device path).
pub fn register_logquant(config: LogQuantConfig) {
    register_logquant_with(config, QuantPath::from_env());
}

/// [`register_logquant`] with an explicit quant path.
pub fn register_logquant_with(config: LogQuantConfig, quant_path: QuantPath) {
    register_kv_cache_backend(Arc::new(LogQuantFactory { config, quant_path }));
}

/// One layer's LogQuant cache for a batch of equal-length sequences.
#[derive(Debug, Clone)]
pub struct LogQuantCache {
    config: LogQuantConfig,
    max_seq_len: usize,
    quant_path: QuantPath,
    /// One store per batch row; empty until the first append tells the batch size.
    rows: Vec<SeqLayerStore>,
}

impl LogQuantCache {
    pub fn new(config: LogQuantConfig, max_seq_len: usize) -> Self {
        Self::with_quant_path(config, max_seq_len, QuantPath::Auto)
    }

    /// A cache whose stores quantize on `quant_path`. With [`QuantPath::Device`] the CPU runs
    /// exactly what CUDA and Metal run: candle-op quantization, the portable attention path,
    /// no host reads of tensor data.
    pub fn with_quant_path(
        config: LogQuantConfig,
        max_seq_len: usize,
        quant_path: QuantPath,
    ) -> Self {
        Self {
            config,
            max_seq_len,
            quant_path,
            rows: Vec::new(),
        }
    }

    pub fn config(&self) -> &LogQuantConfig {
        &self.config
    }

    /// The per-sequence stores of the batch.
    pub fn rows(&self) -> &[SeqLayerStore] {
        &self.rows
    }

    fn admit(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, _, n, _) = k.dims4()?;
        let new_len = self.seq_len() + n;
        if new_len > self.max_seq_len {
            candle_core::bail!(
                "kv-cache: {new_len} tokens exceed the model's context of {}",
                self.max_seq_len
            );
        }
        if self.rows.is_empty() {
            self.rows = vec![SeqLayerStore::with_quant_path(self.config, self.quant_path); b];
        } else if self.rows.len() != b {
            candle_core::bail!(
                "logquant: batch of {b} appended to a cache of {} sequences",
                self.rows.len()
            );
        }
        for (i, row) in self.rows.iter_mut().enumerate() {
            row.admit(&k.get(i)?, &v.get(i)?)?;
        }
        Ok(())
    }

    /// The batch as `(b, heads, len, dim)` K and V in `like`'s dtype and device.
    fn materialize_like(&self, like: &Tensor, order: RowOrder) -> Result<Option<(Tensor, Tensor)>> {
        if !self.rows.is_empty() {
            FULL_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut ks = Vec::with_capacity(self.rows.len());
        let mut vs = Vec::with_capacity(self.rows.len());
        for row in &self.rows {
            let rows = match order {
                RowOrder::Position => {
                    row.materialize_in_position_order(like.dtype(), like.device())?
                }
                RowOrder::Layout => row.materialize(like.dtype(), like.device())?,
            };
            match rows {
                Some((k, v)) => {
                    ks.push(k);
                    vs.push(v);
                }
                None => return Ok(None),
            }
        }
        if ks.is_empty() {
            return Ok(None);
        }
        Ok(Some((Tensor::stack(&ks, 0)?, Tensor::stack(&vs, 0)?)))
    }

    /// The cached rows in position order followed by the exact new rows `k`, `v`
    /// `(b, heads, n, dim)`: what the stock cache returns from an append.
    fn cached_then_exact(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = k.dim(0)?;
        if !self.rows.is_empty() && self.rows.len() != b {
            candle_core::bail!(
                "logquant: batch of {b} appended to a cache of {} sequences",
                self.rows.len()
            );
        }
        let new_len = self.seq_len() + k.dim(2)?;
        if new_len > self.max_seq_len {
            candle_core::bail!(
                "kv-cache: {new_len} tokens exceed the model's context of {}",
                self.max_seq_len
            );
        }
        Ok(match self.materialize_like(k, RowOrder::Position)? {
            None => (k.clone(), v.clone()),
            Some((ck, cv)) => (Tensor::cat(&[&ck, k], 2)?, Tensor::cat(&[&cv, v], 2)?),
        })
    }

    fn with_rows(&self, rows: Vec<SeqLayerStore>) -> Self {
        Self {
            config: self.config,
            max_seq_len: self.max_seq_len,
            quant_path: self.quant_path,
            rows,
        }
    }
}

/// Full reads of LogQuant caches: see [`full_cache_reads`].
static FULL_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times, since the process started, a whole LogQuant layer cache was dequantized
/// (materialized) for the engine's attention or a reader: each portable-path attention, each
/// `append` that returns the cache, each `materialize` (a shared-KV layer reading its owner).
/// The fused kernels read the packed cache in place and do not count. For tests and
/// diagnostics: the count is process-wide.
pub fn full_cache_reads() -> u64 {
    FULL_READS.load(std::sync::atomic::Ordering::Relaxed)
}

impl KvCacheBackend for LogQuantCache {
    fn append_and_attend(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        params: &AttentionParams,
        engine: &EngineAttention<'_>,
    ) -> Result<Tensor> {
        let fused_ok = self.config.kernel == AttentionKernel::Fused
            && self.quant_path == QuantPath::Auto
            && q.device().is_cpu()
            && params.is_plain();
        if k.dim(2)? == 1 {
            // Decode: the policy compresses first, then the new token attends to the cache.
            self.admit(k, v)?;
            if fused_ok && mask.is_none() {
                return attend_decode(q, &self.rows, params.softmax_scale);
            }
            // The same conditions on CUDA, where the kernel is opt-in until it has run on a GPU
            // (`MISTRALRS_LOGQUANT_CUDA_FUSED=1`); a batch it does not cover (`None`) falls
            // through to the portable path.
            #[cfg(feature = "cuda")]
            if crate::kernels::cuda::enabled()
                && self.config.kernel == AttentionKernel::Fused
                && self.quant_path == QuantPath::Auto
                && q.device().is_cuda()
                && params.is_plain()
                && mask.is_none()
            {
                if let Some(out) =
                    crate::kernels::cuda::attend_decode(q, &self.rows, params.softmax_scale)?
                {
                    return Ok(out);
                }
            }
            // Under a mask the engine needs position order; without one any order will do.
            let order = if mask.is_some() {
                RowOrder::Position
            } else {
                RowOrder::Layout
            };
            let Some((k_all, v_all)) = self.materialize_like(k, order)? else {
                candle_core::bail!("logquant: the cache lost the token just appended");
            };
            return engine(q, &k_all, &v_all, mask);
        }
        // A chunk after cached tokens: the fused kernel reads the cache as it is stored and
        // masks only the chunk's own rows, if the engine's mask is exactly that causal mask.
        let cached = self.seq_len();
        if cached > 0 && fused_ok && is_plain_causal(mask, cached, k.dim(2)?)? {
            let out = attend_chunk(q, &self.rows, k, v, params.softmax_scale)?;
            self.admit(k, v)?;
            return Ok(out);
        }
        // Prefill (or a chunk the fused kernel does not cover): the engine's attention over
        // the stock layout, then the policy compresses.
        let (k_all, v_all) = self.cached_then_exact(k, v)?;
        let out = engine(q, &k_all, &v_all, mask)?;
        self.admit(k, v)?;
        Ok(out)
    }

    /// For model code that applies its own mask: the stock cache's answer (cached rows in
    /// position order, then the exact new rows); the policy compresses after.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.cached_then_exact(k, v)?;
        self.admit(k, v)?;
        Ok(out)
    }

    fn materialize(&self) -> Result<Option<(Tensor, Tensor)>> {
        let Some(layout) = self.rows.first().and_then(|r| r.layout()) else {
            return Ok(None);
        };
        let like = Tensor::zeros(0, layout.dtype, &layout.device)?;
        self.materialize_like(&like, RowOrder::Position)
    }

    fn seq_len(&self) -> usize {
        self.rows.first().map_or(0, SeqLayerStore::len)
    }

    fn reset(&mut self) {
        self.rows.clear();
    }

    fn try_set_len(&self, len: usize) -> Result<()> {
        let current = self.seq_len();
        if len != current {
            candle_core::bail!(
                "logquant: cannot change the cache from {current} to {len} tokens: quantized \
                 tokens cannot be restored (run without prefix caching or speculative decoding)"
            );
        }
        Ok(())
    }

    fn set_len(&mut self, len: usize) -> Result<()> {
        self.try_set_len(len)
    }

    fn box_clone(&self) -> Box<dyn KvCacheBackend> {
        Box::new(self.clone())
    }

    fn cat_batch(&self, rest: &[&dyn KvCacheBackend]) -> Result<Box<dyn KvCacheBackend>> {
        let mut rows = self.rows.clone();
        for part in rest {
            let Some(part) = part.as_any().downcast_ref::<LogQuantCache>() else {
                candle_core::bail!("logquant: cannot batch with another kind of cache");
            };
            if part.seq_len() != self.seq_len() {
                candle_core::bail!(
                    "logquant: cannot batch sequences of {} and {} tokens",
                    self.seq_len(),
                    part.seq_len()
                );
            }
            rows.extend(part.rows.iter().cloned());
        }
        Ok(Box::new(self.with_rows(rows)))
    }

    fn split_batch(&self, n: usize) -> Result<Vec<Box<dyn KvCacheBackend>>> {
        if self.rows.is_empty() {
            return Ok((0..n)
                .map(|_| self.with_rows(Vec::new()).box_clone())
                .collect());
        }
        if self.rows.len() != n {
            candle_core::bail!(
                "logquant: batch of {} cannot split into {n}",
                self.rows.len()
            );
        }
        Ok(self
            .rows
            .iter()
            .map(|row| Box::new(self.with_rows(vec![row.clone()])) as Box<dyn KvCacheBackend>)
            .collect())
    }

    fn usage(&self) -> LayerUsage {
        let mut usage = LayerUsage::default();
        for row in &self.rows {
            let dense_per_token = row.layout().map_or(0, |l| l.dense_bytes_per_token());
            usage.tokens = row.len();
            usage.bytes += row.bytes();
            usage.dense_bytes += row.len() * dense_per_token;
            usage.full_precision_tokens = row.full_precision_tokens();
            usage.quantized_tokens = row.quantized_tokens();
        }
        usage
    }

    fn device(&self) -> Option<Device> {
        self.rows
            .first()
            .and_then(|r| r.layout())
            .map(|l| l.device.clone())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Cached tokens not quantized, from a usage record (one sequence's, or a sum of them). The
/// core's book merges a sequence's layers by the maximum of each count, so where stock layers
/// sit beside the backend's (Gemma 3: sliding-window layers of 512 exact tokens beside LogQuant's
/// global layers) its `full_precision_tokens` is the stock layers' count; `tokens -
/// quantized_tokens` is the backend's own (stock layers quantize nothing, and the longest layers
/// are the backend's). Where every layer is the backend's, the two agree.
pub fn full_precision_tokens(usage: &LayerUsage) -> usize {
    usage.tokens.saturating_sub(usage.quantized_tokens)
}

/// True if `mask` is the plain causal mask of `new` rows after `cached` ones: shape
/// `(.., new, cached + new)`, 0 where row `i` may see column `j <= cached + i`, a large negative
/// number elsewhere, the same for every leading index. Anything else (a sliding window, padding,
/// no mask) is left to the engine's attention.
pub fn is_plain_causal(mask: Option<&Tensor>, cached: usize, new: usize) -> Result<bool> {
    let Some(mask) = mask else {
        return Ok(false);
    };
    let dims = mask.dims();
    if dims.len() < 2 || dims[dims.len() - 2] != new || dims[dims.len() - 1] != cached + new {
        return Ok(false);
    }
    let values = mask
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let width = cached + new;
    Ok(values.chunks_exact(width).enumerate().all(|(row, cols)| {
        let i = row % new;
        cols.iter()
            .enumerate()
            .all(|(j, &m)| if j <= cached + i { m == 0.0 } else { m < -1e4 })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma 3's shape: the book's maximum-merged record of 15 stock sliding layers (512 exact
    /// tokens) beside LogQuant layers (8448 tokens, 126 exact, 8322 quantized).
    #[test]
    fn full_precision_tokens_are_the_backends_own_beside_stock_layers() {
        let merged = LayerUsage {
            tokens: 8448,
            bytes: 0,
            dense_bytes: 0,
            full_precision_tokens: 512,
            quantized_tokens: 8322,
        };
        assert_eq!(full_precision_tokens(&merged), 126);
        let stock_only = LayerUsage {
            full_precision_tokens: 8448,
            quantized_tokens: 0,
            ..merged
        };
        assert_eq!(full_precision_tokens(&stock_only), 8448);
    }
}
