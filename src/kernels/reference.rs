//! Textbook attention on host f32 arrays: the oracle that the backend's paths are tested against.

/// Shapes of one attention call. Rows of a sequence: `cached` rows visible to every query,
/// followed by `queries` new rows that are causally masked among themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    pub cached: usize,
    pub dim: usize,
}

impl AttnShape {
    pub fn kv_len(&self) -> usize {
        self.cached + self.queries
    }
}

/// `softmax(scale * q k^T + causal mask) v` with GQA (query head `h` reads kv head
/// `h / (q_heads / kv_heads)`). `q` is `[b][q_heads][queries][dim]`, `k` and `v`
/// `[b][kv_heads][kv_len][dim]`; the output is laid out like `q`.
pub fn naive_attention(q: &[f32], k: &[f32], v: &[f32], shape: AttnShape, scale: f32) -> Vec<f32> {
    let AttnShape {
        batch,
        q_heads,
        kv_heads,
        queries,
        cached,
        dim,
    } = shape;
    let kv_len = shape.kv_len();
    let groups = q_heads / kv_heads;
    let mut out = vec![0f32; q.len()];
    let mut scores = vec![0f32; kv_len];
    for b in 0..batch {
        for h in 0..q_heads {
            let kvh = h / groups;
            let kv_base = (b * kv_heads + kvh) * kv_len * dim;
            for i in 0..queries {
                let q_row = &q[((b * q_heads + h) * queries + i) * dim..][..dim];
                let visible = cached + i + 1;
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate().take(visible) {
                    let k_row = &k[kv_base + j * dim..][..dim];
                    *s = scale * q_row.iter().zip(k_row).map(|(a, b)| a * b).sum::<f32>();
                    max = max.max(*s);
                }
                let mut denom = 0f32;
                for s in scores.iter_mut().take(visible) {
                    *s = (*s - max).exp();
                    denom += *s;
                }
                let o = &mut out[((b * q_heads + h) * queries + i) * dim..][..dim];
                for (j, s) in scores.iter().enumerate().take(visible) {
                    let v_row = &v[kv_base + j * dim..][..dim];
                    for (o, x) in o.iter_mut().zip(v_row) {
                        *o += s / denom * x;
                    }
                }
            }
        }
    }
    out
}

/// Largest absolute difference and its index, with whether both inputs were finite.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize, bool) {
    let mut worst = (0f32, 0usize);
    let mut finite = true;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        finite &= x.is_finite() && y.is_finite();
        let d = (x - y).abs();
        if d > worst.0 || d.is_nan() {
            worst = (d, i);
        }
    }
    (worst.0, worst.1, finite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_returns_its_value_whatever_the_query() {
        let shape = AttnShape {
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            queries: 1,
            cached: 0,
            dim: 2,
        };
        for q in [[1.0, 0.0], [-30.0, 7.5], [0.0, 0.0]] {
            let out = naive_attention(&q, &[3.0, -1.0], &[5.0, 7.0], shape, 0.5);
            assert_eq!(out, vec![5.0, 7.0], "query {q:?}");
        }
    }

    #[test]
    fn equal_scores_average_the_values() {
        let shape = AttnShape {
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            queries: 1,
            cached: 1,
            dim: 2,
        };
        // Two rows with equal scores (q orthogonal to both keys): the output is the mean of v.
        let out = naive_attention(
            &[1.0, 0.0],
            &[0.0, 1.0, 0.0, 2.0],
            &[2.0, 4.0, 6.0, 8.0],
            shape,
            1.0,
        );
        assert_eq!(out, vec![4.0, 6.0]);
    }
}
