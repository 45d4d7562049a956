//! Span planning: one sequence's cache cut into spans of at most a few hundred tokens of one
//! kv head (flash decoding), each scored by one task with its own softmax state.

use candle_core::{DType, Result, Tensor};

use crate::packed::BlockBytes;
use crate::store::SeqLayerStore;

/// Host f32 view of a `(heads, n, dim)` tensor, flattened.
pub(super) fn host_rows(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Staged and full-precision rows of one sequence as host f32.
pub(super) struct DenseRows {
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    pub(super) tokens: usize,
    /// For the new rows of a chunk, the chunk length `L`: query position `i` (query row
    /// `r`, `i = r % L`) sees row `j` of this part only if `j <= i`. `None`: seen by all.
    pub(super) causal: Option<usize>,
}

/// Tokens `start..end` of one part of a sequence's cache, in layout order.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    /// Quantized chunk `chunk` of the store.
    Quant { chunk: usize },
    /// Dense part `part` (staged, then full precision).
    Dense { part: usize },
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    pub(super) source: Source,
    pub(super) start: usize,
    pub(super) end: usize,
}

/// The cache of one sequence cut into spans of at most `max_tokens`.
pub(super) fn spans(store: &SeqLayerStore, dense: &[DenseRows], max_tokens: usize) -> Vec<Span> {
    let parts = store
        .chunks()
        .iter()
        .enumerate()
        .map(|(chunk, c)| (Source::Quant { chunk }, c.tokens()))
        .chain(
            dense
                .iter()
                .enumerate()
                .map(|(part, d)| (Source::Dense { part }, d.tokens)),
        );
    let mut out = Vec::new();
    for (source, tokens) in parts {
        let mut start = 0;
        while start < tokens {
            let end = (start + max_tokens).min(tokens);
            out.push(Span { source, start, end });
            start = end;
        }
    }
    out
}

/// Softmax state of one span for the query heads of one kv head: running max and sum of
/// `exp(score - max)`, and the output weighted by the same, not yet divided by the sum.
pub(super) struct Partial {
    pub(super) max: Vec<f32>,
    pub(super) sum: Vec<f32>,
    pub(super) out: Vec<f32>,
}

/// The bytes of one quantized chunk's keys and values, borrowed from its CPU tensors.
pub(super) struct ChunkBytes<'a> {
    pub(super) k: BlockBytes<'a>,
    pub(super) v: BlockBytes<'a>,
}

/// Everything one task reads.
pub(super) struct SpanTask<'a> {
    pub(super) chunks: &'a [ChunkBytes<'a>],
    pub(super) dense: &'a [DenseRows],
    pub(super) head: usize,
    /// `[row][dim]` queries of this kv head: its query heads times the chunk's positions.
    pub(super) queries: &'a [f32],
    /// The same rows rotated by `H / sqrt(dim)`, for rotated key blocks (empty if none).
    pub(super) rotated_queries: &'a [f32],
    pub(super) query_rows: usize,
    pub(super) dim: usize,
    pub(super) scale: f32,
    pub(super) span: Span,
}
