//! One sequence's cache for one layer: full-precision rows chosen by the policy, evicted rows
//! waiting for a whole key group, and append-only quantized blocks shared between clones.
//!
//! Every token is stored exactly once. Rows are kept in three parts whose concatenation,
//! `[quantized blocks | staged | full precision]`, is the position-agnostic layout that
//! LogQuant's own attention reads (spec section 3): keys are cached after RoPE, so permuting K
//! and V rows together does not change attention when every cached row is visible. Wherever the
//! engine applies its own mask, the rows are handed over in position order instead
//! ([`SeqLayerStore::materialize_in_position_order`]): each row's position is kept for that.

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Result, Tensor};

use crate::config::{KeyGrouping, LogQuantConfig};
use crate::policy::{Policy, Selection};
use crate::quant::{Grouping, QuantBlock};

/// A quantized slice of tokens: keys and values of the same rows.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantChunk {
    pub k: QuantBlock,
    pub v: QuantBlock,
    /// Sequence position of each row, in row order (4 bytes a token of host bookkeeping, not
    /// counted in [`QuantChunk::bytes`]).
    pub positions: Vec<u32>,
}

impl QuantChunk {
    pub fn tokens(&self) -> usize {
        self.k.tokens
    }

    pub fn bytes(&self) -> usize {
        self.k.bytes() + self.v.bytes()
    }
}

/// Rows `(kv_heads, n, head_dim)` of K and V in the activation dtype.
#[derive(Debug, Clone)]
pub struct Rows {
    pub k: Tensor,
    pub v: Tensor,
}

impl Rows {
    fn len(&self) -> usize {
        self.k.dims()[1]
    }

    fn cat(a: Option<&Rows>, b: &Rows) -> Result<Rows> {
        match a {
            None => Ok(b.clone()),
            Some(a) => Ok(Rows {
                k: Tensor::cat(&[&a.k, &b.k], 1)?,
                v: Tensor::cat(&[&a.v, &b.v], 1)?,
            }),
        }
    }

    fn select(&self, indices: &[usize]) -> Result<Option<Rows>> {
        if indices.is_empty() {
            return Ok(None);
        }
        // Runs of consecutive indices are narrowed, not gathered: the common case is one run.
        let mut parts_k = Vec::new();
        let mut parts_v = Vec::new();
        let mut start = 0;
        while start < indices.len() {
            let mut end = start + 1;
            while end < indices.len() && indices[end] == indices[end - 1] + 1 {
                end += 1;
            }
            parts_k.push(self.k.narrow(1, indices[start], end - start)?);
            parts_v.push(self.v.narrow(1, indices[start], end - start)?);
            start = end;
        }
        Ok(Some(Rows {
            k: Tensor::cat(&parts_k, 1)?.contiguous()?,
            v: Tensor::cat(&parts_v, 1)?.contiguous()?,
        }))
    }

    fn bytes(&self) -> usize {
        (self.k.elem_count() + self.v.elem_count()) * self.k.dtype().size_in_bytes()
    }
}

/// Host f32 copy of `t` `(heads, n, dim)`, row-major.
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// Shape and placement of the cached rows, known from the first append.
#[derive(Debug, Clone)]
pub struct RowLayout {
    pub heads: usize,
    pub dim: usize,
    pub dtype: DType,
    pub device: Device,
}

impl RowLayout {
    /// Bytes the stock cache takes per token for K and V.
    pub fn dense_bytes_per_token(&self) -> usize {
        2 * self.heads * self.dim * self.dtype.size_in_bytes()
    }
}

/// One sequence, one layer.
#[derive(Debug, Clone)]
pub struct SeqLayerStore {
    config: LogQuantConfig,
    layout: Option<RowLayout>,
    selection: Selection,
    /// Rows of `selection.positions()`, in that order.
    full: Option<Rows>,
    /// Evicted rows waiting for a whole per-channel key group.
    staged: Option<Rows>,
    /// Sequence position of each staged row.
    staged_positions: Vec<u32>,
    chunks: Vec<Arc<QuantChunk>>,
}

impl SeqLayerStore {
    pub fn new(config: LogQuantConfig) -> Self {
        Self {
            config,
            selection: Selection::new(Policy::from_config(&config)),
            layout: None,
            full: None,
            staged: None,
            staged_positions: Vec::new(),
            chunks: Vec::new(),
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.selection.len()
    }

    pub fn is_empty(&self) -> bool {
        self.selection.is_empty()
    }

    pub fn layout(&self) -> Option<&RowLayout> {
        self.layout.as_ref()
    }

    pub fn chunks(&self) -> &[Arc<QuantChunk>] {
        &self.chunks
    }

    pub fn staged(&self) -> Option<&Rows> {
        self.staged.as_ref()
    }

    pub fn full(&self) -> Option<&Rows> {
        self.full.as_ref()
    }

    pub fn full_precision_positions(&self) -> &[usize] {
        self.selection.positions()
    }

    /// Tokens held in the activation dtype (policy selection plus staging).
    pub fn full_precision_tokens(&self) -> usize {
        self.full.as_ref().map_or(0, Rows::len) + self.staged.as_ref().map_or(0, Rows::len)
    }

    pub fn quantized_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens()).sum()
    }

    /// Bytes held: quantized blocks, staged and full-precision rows.
    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.bytes()).sum::<usize>()
            + self.full.as_ref().map_or(0, Rows::bytes)
            + self.staged.as_ref().map_or(0, Rows::bytes)
    }

    /// Admit new rows `(heads, n, dim)`: the policy decides which rows leave full precision,
    /// and those are quantized (per-channel keys once a whole group of tokens has left).
    pub fn admit(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (heads, n, dim) = k.dims3()?;
        let v_dims = v.dims3()?;
        if v_dims != (heads, n, dim) {
            candle_core::bail!(
                "logquant: keys {:?} and values {:?} differ in shape (a model whose K and V head \
                 sizes differ, e.g. multi-head latent attention); use --kv-cache default",
                (heads, n, dim),
                v_dims
            );
        }
        self.config
            .validate_for_head_dim(dim)
            .map_err(|e| candle_core::Error::Msg(format!("logquant: {e}")))?;
        if self.layout.is_none() {
            self.layout = Some(RowLayout {
                heads,
                dim,
                dtype: k.dtype(),
                device: k.device().clone(),
            });
        }
        let incoming = Rows {
            k: k.contiguous()?,
            v: v.contiguous()?,
        };
        let extended = Rows::cat(self.full.as_ref(), &incoming)?;
        let first_new = self.selection.len();
        let extended_positions: Vec<usize> = self
            .selection
            .positions()
            .iter()
            .copied()
            .chain(first_new..first_new + n)
            .collect();
        let evicted = self.selection.admit(n);
        if evicted.is_empty() {
            self.full = Some(extended);
            return Ok(());
        }
        let total = extended.len();
        let mut is_evicted = vec![false; total];
        for &i in &evicted {
            is_evicted[i] = true;
        }
        let kept: Vec<usize> = (0..total).filter(|&i| !is_evicted[i]).collect();
        let leaving = extended.select(&evicted)?.expect("evicted rows");
        self.full = extended.select(&kept)?;
        self.staged = Some(Rows::cat(self.staged.as_ref(), &leaving)?);
        self.staged_positions
            .extend(evicted.iter().map(|&i| extended_positions[i] as u32));
        self.flush_staged(heads, dim)
    }

    /// Quantize staged rows: all of them for per-token keys, whole groups for per-channel keys.
    fn flush_staged(&mut self, heads: usize, dim: usize) -> Result<()> {
        let Some(staged) = self.staged.take() else {
            return Ok(());
        };
        let n = staged.len();
        let config = &self.config;
        let key_group = config.key_group_size();
        let take = match config.key_grouping {
            KeyGrouping::PerToken => n,
            KeyGrouping::PerChannel => n - n % key_group,
        };
        if take == 0 {
            self.staged = Some(staged);
            return Ok(());
        }
        let group_tokens = match config.key_grouping {
            KeyGrouping::PerToken => take,
            KeyGrouping::PerChannel => key_group,
        };
        let value_grouping = Grouping::PerToken {
            group: config.group_size,
        };
        let key_grouping = match config.key_grouping {
            KeyGrouping::PerToken => Grouping::PerToken { group: key_group },
            KeyGrouping::PerChannel => Grouping::PerChannel,
        };
        let quantize = if config.rotate {
            QuantBlock::quantize_rotated
        } else {
            QuantBlock::quantize
        };
        let (key_bits, value_bits) = (config.key_bits(), config.value_bits());
        let mut start = 0;
        while start < take {
            let k = host_f32(&staged.k.i((.., start..start + group_tokens, ..))?)?;
            let v = host_f32(&staged.v.i((.., start..start + group_tokens, ..))?)?;
            self.chunks.push(Arc::new(QuantChunk {
                k: quantize(&k, heads, group_tokens, dim, key_bits, key_grouping),
                v: quantize(&v, heads, group_tokens, dim, value_bits, value_grouping),
                positions: self.staged_positions[start..start + group_tokens].to_vec(),
            }));
            start += group_tokens;
        }
        self.staged_positions.drain(..take);
        if take < n {
            self.staged = Some(Rows {
                k: staged.k.narrow(1, take, n - take)?.contiguous()?,
                v: staged.v.narrow(1, take, n - take)?.contiguous()?,
            });
        }
        Ok(())
    }

    /// The quantized rows, dequantized to `(heads, n_quantized, dim)` f32 on the CPU.
    pub fn dequantized(&self) -> Result<Option<(Tensor, Tensor)>> {
        let Some(first) = self.chunks.first() else {
            return Ok(None);
        };
        let (heads, dim) = (first.k.heads, first.k.dim);
        let tokens = self.quantized_tokens();
        let mut k = vec![0f32; heads * tokens * dim];
        let mut v = vec![0f32; heads * tokens * dim];
        // Blocks are [head][token][dim]; the output interleaves them per head.
        let mut offset = 0;
        let mut buf_k = Vec::new();
        let mut buf_v = Vec::new();
        for chunk in &self.chunks {
            let n = chunk.tokens();
            buf_k.resize(heads * n * dim, 0.0);
            buf_v.resize(heads * n * dim, 0.0);
            chunk.k.dequantize_into(&mut buf_k);
            chunk.v.dequantize_into(&mut buf_v);
            for h in 0..heads {
                let dst = (h * tokens + offset) * dim;
                let src = h * n * dim;
                k[dst..dst + n * dim].copy_from_slice(&buf_k[src..src + n * dim]);
                v[dst..dst + n * dim].copy_from_slice(&buf_v[src..src + n * dim]);
            }
            offset += n;
        }
        Ok(Some((
            Tensor::from_vec(k, (heads, tokens, dim), &Device::Cpu)?,
            Tensor::from_vec(v, (heads, tokens, dim), &Device::Cpu)?,
        )))
    }

    /// Sequence position of each row of the layout `[quantized | staged | full precision]`.
    pub fn layout_positions(&self) -> Vec<u32> {
        let mut positions = Vec::with_capacity(self.len());
        for chunk in &self.chunks {
            positions.extend_from_slice(&chunk.positions);
        }
        positions.extend_from_slice(&self.staged_positions);
        positions.extend(self.selection.positions().iter().map(|&p| p as u32));
        positions
    }

    /// Sequence positions of the quantized rows, in layout order.
    pub fn quantized_positions(&self) -> Vec<u32> {
        self.chunks
            .iter()
            .flat_map(|c| c.positions.iter().copied())
            .collect()
    }

    /// The whole cache as `(heads, len, dim)` K and V in `dtype` on `device`, row `p` holding
    /// position `p`: what the stock cache returns, for attention under the engine's own mask.
    /// The layout is reordered by one gather (`index_select`) on `device`.
    pub fn materialize_in_position_order(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Some((k, v)) = self.materialize(dtype, device)? else {
            return Ok(None);
        };
        let layout = self.layout_positions();
        if layout.iter().enumerate().all(|(i, &p)| p as usize == i) {
            return Ok(Some((k, v)));
        }
        let mut row_of_position = vec![0u32; layout.len()];
        for (row, &position) in layout.iter().enumerate() {
            row_of_position[position as usize] = row as u32;
        }
        let index = Tensor::from_vec(row_of_position, layout.len(), device)?;
        Ok(Some((
            k.index_select(&index, 1)?,
            v.index_select(&index, 1)?,
        )))
    }

    /// The whole cache as `(heads, len, dim)` K and V in `dtype` on `device`, laid out
    /// `[quantized | staged | full precision]` (see [`SeqLayerStore::layout_positions`]).
    pub fn materialize(&self, dtype: DType, device: &Device) -> Result<Option<(Tensor, Tensor)>> {
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        if let Some((k, v)) = self.dequantized()? {
            ks.push(k.to_dtype(dtype)?.to_device(device)?);
            vs.push(v.to_dtype(dtype)?.to_device(device)?);
        }
        for rows in [&self.staged, &self.full].into_iter().flatten() {
            ks.push(rows.k.clone());
            vs.push(rows.v.clone());
        }
        if ks.is_empty() {
            return Ok(None);
        }
        Ok(Some((Tensor::cat(&ks, 1)?, Tensor::cat(&vs, 1)?)))
    }
}
