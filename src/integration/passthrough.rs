//! The pass-through backend: an exact full-precision cache implemented only through the
//! [`KvCacheBackend`] trait. It is the reference that proves the plumbing (batching, clone-in /
//! clone-out, byte accounting) and is expected to produce the same tokens as the stock cache.

use std::any::Any;

use candle_core::{Device, Result, Tensor};
use mistralrs_core::kv_cache_backend::{
    AttentionParams, EngineAttention, KvCacheBackend, KvCacheBackendFactory, LayerUsage,
};

/// Registry name of [`PassthroughFactory`].
pub const PASSTHROUGH: &str = "passthrough";

/// Creates [`PassthroughCache`] layers.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassthroughFactory;

impl KvCacheBackendFactory for PassthroughFactory {
    fn name(&self) -> &str {
        PASSTHROUGH
    }

    fn create(&self, _layer: usize, max_seq_len: usize) -> Box<dyn KvCacheBackend> {
        Box::new(PassthroughCache::new(max_seq_len))
    }
}

/// One layer's dense cache for a batch: `(b, kv_heads, seq, head_dim)` K and V.
///
/// Tensors are immutable and shared between clones; an append builds new tensors, so a clone
/// taken before it never sees the new rows.
#[derive(Debug, Clone)]
pub struct PassthroughCache {
    kv: Option<(Tensor, Tensor)>,
    max_seq_len: usize,
}

impl PassthroughCache {
    pub fn new(max_seq_len: usize) -> Self {
        Self {
            kv: None,
            max_seq_len,
        }
    }

    fn from_kv(kv: Option<(Tensor, Tensor)>, max_seq_len: usize) -> Self {
        Self { kv, max_seq_len }
    }
}

impl KvCacheBackend for PassthroughCache {
    fn append_and_attend(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        _params: &AttentionParams,
        engine: &EngineAttention<'_>,
    ) -> Result<Tensor> {
        let (k, v) = self.append(k, v)?;
        engine(q, &k, &v, mask)
    }

    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new_len = self.seq_len() + k.dim(2)?;
        if new_len > self.max_seq_len {
            candle_core::bail!(
                "kv-cache: {new_len} tokens exceed the model's context of {}",
                self.max_seq_len
            );
        }
        let (k, v) = match &self.kv {
            None => (k.contiguous()?, v.contiguous()?),
            Some((k_old, v_old)) => (Tensor::cat(&[k_old, k], 2)?, Tensor::cat(&[v_old, v], 2)?),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    fn materialize(&self) -> Result<Option<(Tensor, Tensor)>> {
        Ok(self.kv.clone())
    }

    fn seq_len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    fn reset(&mut self) {
        self.kv = None;
    }

    fn try_set_len(&self, len: usize) -> Result<()> {
        if len > self.seq_len() {
            candle_core::bail!(
                "kv-cache: cannot extend a pass-through cache of {} tokens to {len}",
                self.seq_len()
            );
        }
        Ok(())
    }

    fn set_len(&mut self, len: usize) -> Result<()> {
        self.try_set_len(len)?;
        if let Some((k, v)) = &self.kv {
            self.kv = Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?));
        }
        Ok(())
    }

    fn box_clone(&self) -> Box<dyn KvCacheBackend> {
        Box::new(self.clone())
    }

    fn cat_batch(&self, rest: &[&dyn KvCacheBackend]) -> Result<Box<dyn KvCacheBackend>> {
        let mut ks = Vec::with_capacity(rest.len() + 1);
        let mut vs = Vec::with_capacity(rest.len() + 1);
        for part in std::iter::once(self as &dyn KvCacheBackend).chain(rest.iter().copied()) {
            let Some(part) = part.as_any().downcast_ref::<PassthroughCache>() else {
                candle_core::bail!("kv-cache: cannot batch a pass-through cache with another kind");
            };
            match &part.kv {
                Some((k, v)) => {
                    ks.push(k.clone());
                    vs.push(v.clone());
                }
                None => candle_core::bail!("kv-cache: cannot batch an empty pass-through cache"),
            }
        }
        let kv = (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?);
        Ok(Box::new(Self::from_kv(Some(kv), self.max_seq_len)))
    }

    fn split_batch(&self, n: usize) -> Result<Vec<Box<dyn KvCacheBackend>>> {
        let Some((k, v)) = &self.kv else {
            return Ok((0..n)
                .map(|_| Box::new(Self::new(self.max_seq_len)) as Box<dyn KvCacheBackend>)
                .collect());
        };
        let ks = k.chunk(n, 0)?;
        let vs = v.chunk(n, 0)?;
        if ks.len() != n {
            candle_core::bail!("kv-cache: batch of {} cannot split into {n}", k.dims()[0]);
        }
        Ok(ks
            .into_iter()
            .zip(vs)
            .map(|(k, v)| {
                Box::new(Self::from_kv(Some((k, v)), self.max_seq_len)) as Box<dyn KvCacheBackend>
            })
            .collect())
    }

    fn usage(&self) -> LayerUsage {
        match &self.kv {
            None => LayerUsage::default(),
            Some((k, v)) => {
                let tokens = k.dims()[2];
                let bytes = (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes();
                LayerUsage {
                    tokens,
                    bytes,
                    dense_bytes: bytes,
                    full_precision_tokens: tokens,
                    quantized_tokens: 0,
                }
            }
        }
    }

    fn device(&self) -> Option<Device> {
        self.kv.as_ref().map(|(k, _)| k.device().clone())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn rows(b: usize, seq: usize, start: f32) -> Result<Tensor> {
        let n = b * 2 * seq * 4;
        Tensor::arange(start, start + n as f32, &Device::Cpu)?.reshape((b, 2, seq, 4))
    }

    #[test]
    fn append_accumulates_along_the_sequence_axis() -> Result<()> {
        let mut cache = PassthroughCache::new(16);
        let a = rows(1, 3, 0.0)?;
        let b = rows(1, 1, 100.0)?;
        cache.append(&a, &a)?;
        let (k, _) = cache.append(&b, &b)?;
        assert_eq!(k.dims(), &[1, 2, 4, 4]);
        let expected = Tensor::cat(&[&a, &b], 2)?;
        let diff = (k - expected)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        assert_eq!(cache.seq_len(), 4);
        Ok(())
    }

    #[test]
    fn cat_then_split_round_trips_and_clones_are_isolated() -> Result<()> {
        let mut x = PassthroughCache::new(16);
        let mut y = PassthroughCache::new(16);
        x.append(&rows(1, 2, 0.0)?, &rows(1, 2, 0.5)?)?;
        y.append(&rows(1, 2, 50.0)?, &rows(1, 2, 50.5)?)?;
        let batch = x.cat_batch(&[&y])?;
        assert_eq!(batch.seq_len(), 2);
        let parts = batch.split_batch(2)?;
        for (part, original) in parts.iter().zip([&x, &y]) {
            let (pk, pv) = part.materialize()?.unwrap();
            let (ok, ov) = original.materialize()?.unwrap();
            for (p, o) in [(pk, ok), (pv, ov)] {
                let d = (p - o)?.abs()?.sum_all()?.to_scalar::<f32>()?;
                assert_eq!(d, 0.0);
            }
        }
        let snapshot = x.box_clone();
        x.append(&rows(1, 1, 9.0)?, &rows(1, 1, 9.0)?)?;
        assert_eq!(snapshot.seq_len(), 2);
        assert_eq!(x.seq_len(), 3);
        Ok(())
    }

    #[test]
    fn refuses_to_grow_past_context_or_by_rewind() -> Result<()> {
        let mut cache = PassthroughCache::new(3);
        cache.append(&rows(1, 3, 0.0)?, &rows(1, 3, 0.0)?)?;
        assert!(cache.append(&rows(1, 1, 0.0)?, &rows(1, 1, 0.0)?).is_err());
        assert!(cache.try_set_len(4).is_err());
        cache.set_len(1)?;
        assert_eq!(cache.seq_len(), 1);
        Ok(())
    }

    #[test]
    fn usage_counts_k_and_v_bytes() -> Result<()> {
        let mut cache = PassthroughCache::new(64);
        let k = Tensor::zeros((1, 3, 10, 64), DType::F16, &Device::Cpu)?;
        cache.append(&k, &k)?;
        let usage = cache.usage();
        assert_eq!(usage.tokens, 10);
        assert_eq!(usage.bytes, 2 * 3 * 10 * 64 * 2);
        assert_eq!(usage.dense_bytes, usage.bytes);
        Ok(())
    }
}
