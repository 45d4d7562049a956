//! One sequence's cache for one layer: full-precision rows chosen by the policy, evicted rows
//! waiting for a whole key group, and append-only quantized blocks shared between clones.
//!
//! Every token is stored exactly once. Rows are kept in three parts whose concatenation,
//! `[quantized blocks | staged | full precision]`, is the position-agnostic layout that
//! LogQuant's own attention reads (spec section 3): keys are cached after RoPE, so permuting K
//! and V rows together does not change attention when every cached row is visible. Wherever the
//! engine applies its own mask, the rows are handed over in position order instead
//! ([`SeqLayerStore::materialize_in_position_order`]): each row's position is kept for that.
//!
//! Quantized chunks are candle tensors on the model's device ([`PackedBlock`]). Where the store
//! computes them is its [`QuantPath`]: on the CPU by default the scalar reference quantizes on
//! the host and the fused kernel reads the tensors' bytes in place; on any other device (or on
//! the CPU when [`QuantPath::Device`] is chosen) quantization and dequantization run as candle
//! ops on the device, and every read of tensor data to the host is refused
//! ([`SeqLayerStore::host_read_check`], counted by [`device_path_host_reads`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, IndexOp, Result, Tensor};

use crate::config::{KeyGrouping, LogQuantConfig};
use crate::device_ops::{arange_u32, note_upload};
use crate::packed::{dequantize_blocks, PackedBlock};
use crate::policy::Selection;
use crate::quant::{dequantize_rows, Grouping, QuantBlock};

/// Where a store quantizes and dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantPath {
    /// The host scalar reference on the CPU (the fused kernel reads the bytes in place);
    /// candle ops on the device for every other device.
    #[default]
    Auto,
    /// Candle ops on the rows' device, the CPU included, with host reads refused: exactly
    /// what runs on CUDA or Metal (tests force it on the CPU; the backend then uses the
    /// portable attention path).
    Device,
}

impl QuantPath {
    /// `Device` if the environment variable `MISTRALRS_LOGQUANT_DEVICE_PATH` is `1`, else
    /// `Auto`: forces the device path for a whole process (e.g. `eval` on the CPU).
    pub fn from_env() -> Self {
        match std::env::var("MISTRALRS_LOGQUANT_DEVICE_PATH").as_deref() {
            Ok("1") => QuantPath::Device,
            _ => QuantPath::Auto,
        }
    }
}

/// Host reads of tensor data that stores on the device path attempted (each one refused with
/// an error). Zero unless a code path regressed; tests assert it stays zero.
pub fn device_path_host_reads() -> usize {
    DEVICE_PATH_HOST_READS.load(Ordering::Relaxed)
}

static DEVICE_PATH_HOST_READS: AtomicUsize = AtomicUsize::new(0);

/// A quantized slice of tokens: keys and values of the same rows.
#[derive(Debug, Clone)]
pub struct QuantChunk {
    pub k: PackedBlock,
    pub v: PackedBlock,
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

/// Host f32 copy of `t` `(heads, n, dim)`, row-major (only after
/// [`SeqLayerStore::host_read_check`]).
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
    path: QuantPath,
    /// Position order on the device path: `(len, index)` where `len` is the cache length right
    /// after the last eviction and `index`, built on first use, gives the layout row of each
    /// position below `len`. Rows appended since sit at the end of the layout with row ==
    /// position, so the index of the whole cache is `index` followed by `len..`: no upload per
    /// step. Shared by clones until one of them evicts.
    order: (usize, Arc<OnceLock<Tensor>>),
}

impl SeqLayerStore {
    pub fn new(config: LogQuantConfig) -> Self {
        Self::with_quant_path(config, QuantPath::Auto)
    }

    /// A store that quantizes on `path` (see [`QuantPath`]).
    pub fn with_quant_path(config: LogQuantConfig, path: QuantPath) -> Self {
        Self {
            config,
            path,
            selection: Selection::new(config.policy_rule()),
            layout: None,
            full: None,
            staged: None,
            staged_positions: Vec::new(),
            chunks: Vec::new(),
            order: (0, Arc::new(OnceLock::new())),
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

    pub fn quant_path(&self) -> QuantPath {
        self.path
    }

    /// True if chunks are quantized and dequantized with candle ops on the rows' device and host
    /// reads are refused: [`QuantPath::Device`], or any device other than the CPU.
    pub fn on_device_path(&self) -> bool {
        self.path == QuantPath::Device || self.layout.as_ref().is_some_and(|l| !l.device.is_cpu())
    }

    /// The hook every host-side read of tensor data in the store passes first: on the device
    /// path it counts the attempt ([`device_path_host_reads`]) and refuses it.
    pub fn host_read_check(&self, what: &str) -> Result<()> {
        if self.on_device_path() {
            DEVICE_PATH_HOST_READS.fetch_add(1, Ordering::Relaxed);
            candle_core::bail!(
                "logquant: host read of {what} on the device path (the store must stay on the \
                 device)"
            );
        }
        Ok(())
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
        self.order = (self.len(), Arc::new(OnceLock::new()));
        self.flush_staged()
    }

    /// Quantize staged rows: all of them for per-token keys, whole groups for per-channel keys.
    fn flush_staged(&mut self) -> Result<()> {
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
        let device_path = self.on_device_path();
        let mut start = 0;
        while start < take {
            let k = staged.k.i((.., start..start + group_tokens, ..))?;
            let v = staged.v.i((.., start..start + group_tokens, ..))?;
            let (k, v) = if device_path {
                self.quantize_on_device(&k, &v)?
            } else {
                self.quantize_on_host(&k, &v)?
            };
            self.chunks.push(Arc::new(QuantChunk {
                k,
                v,
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

    /// How keys and values are grouped, with their widths: `(key, value)`.
    fn encodings(&self) -> [(Grouping, u8); 2] {
        let config = &self.config;
        let key_grouping = match config.key_grouping {
            KeyGrouping::PerToken => Grouping::PerToken {
                group: config.key_group_size(),
            },
            KeyGrouping::PerChannel => Grouping::PerChannel,
        };
        let value_grouping = Grouping::PerToken {
            group: config.group_size,
        };
        [
            (key_grouping, config.key_bits()),
            (value_grouping, config.value_bits()),
        ]
    }

    /// Quantize evicted rows `(heads, n, dim)` with candle ops on their device.
    fn quantize_on_device(&self, k: &Tensor, v: &Tensor) -> Result<(PackedBlock, PackedBlock)> {
        let [(kg, kb), (vg, vb)] = self.encodings();
        Ok((
            PackedBlock::quantize(k, kb, kg, self.config.rotate)?,
            PackedBlock::quantize(v, vb, vg, self.config.rotate)?,
        ))
    }

    /// Quantize evicted rows `(heads, n, dim)` with the scalar reference on the host (reads
    /// them to the host: refused on the device path).
    fn quantize_on_host(&self, k: &Tensor, v: &Tensor) -> Result<(PackedBlock, PackedBlock)> {
        self.host_read_check("evicted rows")?;
        let (heads, n, dim) = k.dims3()?;
        let quantize = if self.config.rotate {
            QuantBlock::quantize_rotated
        } else {
            QuantBlock::quantize
        };
        let [(kg, kb), (vg, vb)] = self.encodings();
        let (host_k, host_v) = (host_f32(k)?, host_f32(v)?);
        Ok((
            PackedBlock::from_reference(quantize(&host_k, heads, n, dim, kb, kg), k.device())?,
            PackedBlock::from_reference(quantize(&host_v, heads, n, dim, vb, vg), v.device())?,
        ))
    }

    /// The quantized rows, dequantized to `(heads, n_quantized, dim)` f32 on the rows' device:
    /// candle ops on the device path, the scalar reference over the tensors' bytes otherwise.
    pub fn dequantized(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.chunks.is_empty() {
            return Ok(None);
        }
        if self.on_device_path() {
            let ks: Vec<&PackedBlock> = self.chunks.iter().map(|c| &c.k).collect();
            let vs: Vec<&PackedBlock> = self.chunks.iter().map(|c| &c.v).collect();
            return Ok(Some((dequantize_blocks(&ks)?, dequantize_blocks(&vs)?)));
        }
        self.dequantized_on_host().map(Some)
    }

    /// The host path of [`SeqLayerStore::dequantized`] (CPU tensors, read in place: refused on
    /// the device path).
    fn dequantized_on_host(&self) -> Result<(Tensor, Tensor)> {
        self.host_read_check("quantized chunks")?;
        let first = &self.chunks[0];
        let (heads, dim) = (first.k.heads, first.k.dim);
        let tokens = self.quantized_tokens();
        let mut k = vec![0f32; heads * tokens * dim];
        let mut v = vec![0f32; heads * tokens * dim];
        // Blocks are [head][token][dim]; the output interleaves them per head.
        let mut offset = 0;
        let mut buf = Vec::new();
        for chunk in &self.chunks {
            let n = chunk.tokens();
            buf.resize(heads * n * dim, 0.0);
            for (block, out) in [(&chunk.k, &mut k), (&chunk.v, &mut v)] {
                let bytes = block.cpu_bytes()?;
                dequantize_rows(bytes.codes, bytes.params, bytes.shape(), &mut buf);
                for h in 0..heads {
                    let dst = (h * tokens + offset) * dim;
                    let src = h * n * dim;
                    out[dst..dst + n * dim].copy_from_slice(&buf[src..src + n * dim]);
                }
            }
            offset += n;
        }
        Ok((
            Tensor::from_vec(k, (heads, tokens, dim), &Device::Cpu)?,
            Tensor::from_vec(v, (heads, tokens, dim), &Device::Cpu)?,
        ))
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
        let same_device = self
            .layout
            .as_ref()
            .is_some_and(|l| l.device.same_device(device));
        let index = if self.on_device_path() && same_device {
            let (evicted_at, base) = &self.order;
            if *evicted_at == 0 {
                // Nothing ever left full precision: the layout is position order.
                return Ok(Some((k, v)));
            }
            let base = match base.get() {
                Some(base) => base.clone(),
                None => {
                    note_upload();
                    let built =
                        Tensor::from_vec(self.row_of_position(*evicted_at), *evicted_at, device)?;
                    base.get_or_init(|| built).clone()
                }
            };
            let len = self.len();
            if len == *evicted_at {
                base
            } else {
                let tail = arange_u32(device, len)?.narrow(0, *evicted_at, len - evicted_at)?;
                Tensor::cat(&[&base, &tail], 0)?
            }
        } else {
            let layout = self.layout_positions();
            if layout.iter().enumerate().all(|(i, &p)| p as usize == i) {
                return Ok(Some((k, v)));
            }
            Tensor::from_vec(self.row_of_position(layout.len()), layout.len(), device)?
        };
        Ok(Some((
            k.index_select(&index, 1)?,
            v.index_select(&index, 1)?,
        )))
    }

    /// The layout row of each position below `len` (host bookkeeping, no tensor data; rows
    /// from `len` on hold positions `len..`).
    fn row_of_position(&self, len: usize) -> Vec<u32> {
        let mut row_of_position = vec![0u32; len];
        for (row, &position) in self.layout_positions().iter().enumerate() {
            if (position as usize) < len {
                row_of_position[position as usize] = row as u32;
            }
        }
        row_of_position
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LogQuantConfig {
        LogQuantConfig {
            window: 4,
            group_size: 16,
            ..LogQuantConfig::paper()
        }
    }

    fn rows(n: usize) -> Tensor {
        let data: Vec<f32> = (0..2 * n * 32).map(|i| (i as f32 * 0.61).sin()).collect();
        Tensor::from_vec(data, (2, n, 32), &Device::Cpu).unwrap()
    }

    /// The hook: on the device path every host-side routine of the store is refused and
    /// counted; the device routines run and count nothing. (The counter is process-wide, so
    /// this test only checks that it grows; `tests/device_store.rs` checks that it stays 0.)
    #[test]
    fn host_routines_are_refused_and_counted_on_the_device_path() {
        let mut store = SeqLayerStore::with_quant_path(config(), QuantPath::Device);
        let x = rows(40);
        store.admit(&x, &x).unwrap();
        assert!(store.on_device_path() && !store.chunks().is_empty());
        assert!(store.dequantized().unwrap().is_some());
        let before = device_path_host_reads();
        let err = store.dequantized_on_host().unwrap_err();
        assert!(err.to_string().contains("host read"), "{err}");
        let staged = rows(16);
        assert!(store.quantize_on_host(&staged, &staged).is_err());
        assert!(device_path_host_reads() >= before + 2);
        // The host path on the CPU passes the hook.
        let mut host = SeqLayerStore::new(config());
        host.admit(&x, &x).unwrap();
        assert!(!host.on_device_path());
        host.host_read_check("rows").unwrap();
        assert!(host.dequantized_on_host().is_ok());
    }
}
