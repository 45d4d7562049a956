//! The LogQuant backend without a model: layout, attention equivalence, batching, rewinds and
//! byte accounting, against independent references: the spec's token rule written out
//! (`spec/mod.rs`, checked against the spec's hand-computed vectors), textbook attention in
//! plain candle ops ([`textbook`]), and byte counts written out from shapes.

mod spec;

use candle_core::{Device, Result, Tensor, D};
use mistralrs_core::kv_cache_backend::{AttentionParams, KvCacheBackend};
use mistralrs_logquant::backend::LogQuantCache;
use mistralrs_logquant::config::{AttentionKernel, KeyGrouping, LogQuantConfig, PolicyKind};
use mistralrs_logquant::kernels::reference::{max_abs_diff, naive_attention, AttnShape};
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spec::{Rule, SpecSelection};

const Q_HEADS: usize = 4;
const KV_HEADS: usize = 2;
const DIM: usize = 16;
const SCALE: f32 = 0.25;

/// Seeded uniform values in [-1, 1) (ChaCha8: the same stream on every platform).
struct Rng(ChaCha8Rng);
impl Rng {
    fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
    fn next(&mut self) -> f32 {
        self.0.random_range(-1.0..1.0)
    }
    fn tensor(&mut self, dims: (usize, usize, usize, usize)) -> Result<Tensor> {
        let n = dims.0 * dims.1 * dims.2 * dims.3;
        let data: Vec<f32> = (0..n).map(|_| self.next()).collect();
        Tensor::from_vec(data, dims, &Device::Cpu)
    }
}

fn params() -> AttentionParams {
    AttentionParams {
        n_kv_groups: Q_HEADS / KV_HEADS,
        softmax_scale: SCALE,
        softcap: None,
        sliding_window: None,
        sinks: None,
    }
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The oracle: textbook attention `softmax(Q K^T * scale + M) V` in plain candle ops, each kv
/// head repeated for its `q_heads / kv_heads` query heads, `M` the given additive mask
/// `(queries, keys)` or else the causal one (every earlier row visible to each of the last
/// `queries` rows). Shares no code with the crate's attention paths or its reference.
fn textbook(q: &Tensor, k: &Tensor, v: &Tensor, m: Option<&Tensor>, scale: f64) -> Vec<f32> {
    let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    let (q, k, v) = (f32(q), f32(k), f32(v));
    let (b, q_heads, queries, dim) = q.dims4().unwrap();
    let (_, kv_heads, keys, _) = k.dims4().unwrap();
    let groups = q_heads / kv_heads;
    let per_query_head = |t: &Tensor| {
        t.unsqueeze(2)
            .and_then(|t| t.repeat((1, 1, groups, 1, 1)))
            .and_then(|t| t.reshape((b, q_heads, keys, dim)))
            .unwrap()
    };
    let m = m
        .cloned()
        .unwrap_or_else(|| mask(keys - queries, queries, None));
    let scores = (q.matmul(&per_query_head(&k).t().unwrap()).unwrap() * scale)
        .and_then(|s| s.broadcast_add(&m))
        .unwrap();
    let e = scores
        .broadcast_sub(&scores.max_keepdim(D::Minus1).unwrap())
        .and_then(|s| s.exp())
        .unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    host(&p.matmul(&per_query_head(&v)).unwrap())
}

/// The spec rule of `config`'s policy.
fn rule(config: &LogQuantConfig) -> Rule {
    match config.policy {
        PolicyKind::Logquant => Rule::LogQuant { w: config.window },
        PolicyKind::Recent => Rule::Recent { r: config.recent },
        PolicyKind::SinkRecent => Rule::SinkRecent {
            s: config.sink,
            r: config.recent,
        },
        PolicyKind::None => Rule::None,
    }
}

/// Textbook attention over whatever K/V the backend hands to "the engine".
fn naive_engine(q: &Tensor, k: &Tensor, v: &Tensor, _mask: Option<&Tensor>) -> Result<Tensor> {
    let (batch, q_heads, queries, dim) = q.dims4()?;
    let (_, kv_heads, kv_len, _) = k.dims4()?;
    let shape = AttnShape {
        batch,
        q_heads,
        kv_heads,
        queries,
        cached: kv_len - queries,
        dim,
    };
    let out = naive_attention(&host(q), &host(k), &host(v), shape, SCALE);
    Tensor::from_vec(out, q.shape(), q.device())
}

/// Everything appended so far, per batch row, in original order: `[row][head][pos][dim]`.
struct History {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl History {
    fn new(batch: usize) -> Self {
        Self {
            k: vec![Vec::new(); batch],
            v: vec![Vec::new(); batch],
            len: 0,
        }
    }

    fn push(&mut self, k: &Tensor, v: &Tensor) {
        let n = k.dims()[2];
        for (b, (hk, hv)) in self.k.iter_mut().zip(self.v.iter_mut()).enumerate() {
            let (nk, nv) = (host(&k.get(b).unwrap()), host(&v.get(b).unwrap()));
            let mut k2 = Vec::new();
            let mut v2 = Vec::new();
            for h in 0..KV_HEADS {
                k2.extend_from_slice(&hk[h * self.len * DIM..(h + 1) * self.len * DIM]);
                k2.extend_from_slice(&nk[h * n * DIM..(h + 1) * n * DIM]);
                v2.extend_from_slice(&hv[h * self.len * DIM..(h + 1) * self.len * DIM]);
                v2.extend_from_slice(&nv[h * n * DIM..(h + 1) * n * DIM]);
            }
            *hk = k2;
            *hv = v2;
        }
        self.len += n;
    }
}

/// Drive a cache through a prefill and decode steps; at every step check that (1) the
/// full-precision positions are the spec rule's and the quantized ones the first it evicted,
/// (2) full-precision rows are exact and quantized rows within half a quantization step,
/// (3) the backend's attention equals textbook attention over the original order.
/// How a quantization group is formed, in the basis rows are quantized in.
#[derive(Clone, Copy)]
enum Grouping {
    /// `n` consecutive channels of one row (values; per-token keys).
    Channels(usize),
    /// One channel over `n` rows, consecutive in the order they were quantized (per-channel
    /// keys).
    Tokens(usize),
}

/// The normalized Sylvester-Hadamard matrix of order [`DIM`] applied to `row`, written out
/// (`H_2n = [[H, H], [H, -H]]`, divided by sqrt(n)), independent of the cache's transform.
fn rotate(row: &[f32]) -> Vec<f32> {
    let sign = |i: usize, j: usize| {
        if (i & j).count_ones().is_multiple_of(2) {
            1.0
        } else {
            -1.0
        }
    };
    let norm = (DIM as f32).sqrt();
    (0..DIM)
        .map(|i| (0..DIM).map(|j| sign(i, j) * row[j]).sum::<f32>() / norm)
        .collect()
}

/// Largest error of one quantized value whose group holds `members`, from the encoding alone
/// (src/cache/quant.rs): half a step, `(max - min) / (2^bits - 1) / 2`; the stored f16 minimum
/// (rounded down, up to 2^-11 of |min| lower) and f16 scale (rounded up, 2^-10) widen it a
/// little, plus f32 rounding.
fn quantization_error_bound(members: &[f32], bits: u8) -> f32 {
    let max = members.iter().copied().fold(f32::MIN, f32::max);
    let min = members.iter().copied().fold(f32::MAX, f32::min);
    let range = max - min + min.abs() / 1024.0;
    range / ((1u32 << bits) - 1) as f32 / 2.0 * (1.0 + 1.0 / 512.0) + 1e-5
}

fn check_layout_and_attention(config: LogQuantConfig, batch: usize, prefill: usize, steps: usize) {
    let mut rng = Rng::new(0xDEAD_BEEF ^ (prefill as u64) << 8 ^ batch as u64);
    let mut cache = LogQuantCache::new(config, 100_000);
    let mut spec = SpecSelection::new(rule(&config));
    let mut evicted_order: Vec<usize> = Vec::new();
    let mut history = History::new(batch);
    // The quantization error is checked in the basis the rows are quantized in (rotated by
    // the test's own Hadamard matrix when `rotate` is on: an orthogonal map, so the error is
    // the same vector there), per width, against half a step of each group's own range
    // (`quantization_error_bound`).

    for step in 0..=steps {
        let n = if step == 0 { prefill } else { 1 };
        let q = rng.tensor((batch, Q_HEADS, n, DIM)).unwrap();
        let k = rng.tensor((batch, KV_HEADS, n, DIM)).unwrap();
        let v = rng.tensor((batch, KV_HEADS, n, DIM)).unwrap();
        // One call's evicted rows are stored in position order.
        evicted_order.extend(spec.admit(n));
        history.push(&k, &v);
        let out = cache
            .append_and_attend(&q, &k, &v, None, &params(), &naive_engine)
            .unwrap();
        assert_eq!(cache.seq_len(), history.len);

        // `materialize` hands rows out in position order (row p holds position p), as the stock
        // cache does; the quantized positions are the first evicted ones, in eviction order.
        let len = history.len;
        let (mk, mv) = cache.materialize().unwrap().expect("rows");
        assert_eq!(mk.dims(), [batch, KV_HEADS, len, DIM]);
        let (ok, ov) = (host(&mk), host(&mv));
        let fp = cache.rows()[0].full_precision_positions().to_vec();
        assert_eq!(
            fp,
            spec.positions(),
            "step {step}: full-precision positions differ from the spec rule's"
        );
        for b in 0..batch {
            let row = &cache.rows()[b];
            let quantized = &evicted_order[..row.quantized_tokens()];
            let stored: Vec<usize> = row
                .quantized_positions()
                .iter()
                .map(|&p| p as usize)
                .collect();
            assert_eq!(stored, quantized, "quantized positions");
            for h in 0..KV_HEADS {
                let rows_of = |data: &[f32]| -> Vec<Vec<f32>> {
                    (0..len)
                        .map(|pos| {
                            let at = (h * len + pos) * DIM;
                            let row = &data[at..at + DIM];
                            if config.rotate {
                                rotate(row)
                            } else {
                                row.to_vec()
                            }
                        })
                        .collect()
                };
                // Batch row b of `(batch, heads, len, dim)`: laid out as a history row.
                let got_at = |data: &[f32]| -> Vec<f32> {
                    let start = b * KV_HEADS * len * DIM;
                    data[start..start + KV_HEADS * len * DIM].to_vec()
                };
                for (what, truth, got, bits, grouping) in [
                    (
                        "key",
                        rows_of(&history.k[b]),
                        rows_of(&got_at(&ok)),
                        config.key_bits(),
                        match config.key_grouping {
                            KeyGrouping::PerChannel => Grouping::Tokens(config.key_group_size()),
                            KeyGrouping::PerToken => Grouping::Channels(config.key_group_size()),
                        },
                    ),
                    (
                        "value",
                        rows_of(&history.v[b]),
                        rows_of(&got_at(&ov)),
                        config.value_bits(),
                        Grouping::Channels(config.group_size),
                    ),
                ] {
                    for (j, &pos) in quantized.iter().enumerate() {
                        for c in 0..DIM {
                            let members: Vec<f32> = match grouping {
                                Grouping::Channels(g) => {
                                    truth[pos][c / g * g..(c / g + 1) * g].to_vec()
                                }
                                Grouping::Tokens(g) => quantized[j / g * g..(j / g + 1) * g]
                                    .iter()
                                    .map(|&p| truth[p][c])
                                    .collect(),
                            };
                            let bound = quantization_error_bound(&members, bits);
                            let err = (got[pos][c] - truth[pos][c]).abs();
                            assert!(
                                err <= bound,
                                "step {step}: {what} row {pos} channel {c} ({bits} bits, \
                                 rotate {}): error {err} > {bound}",
                                config.rotate
                            );
                        }
                    }
                }
            }
            for h in 0..KV_HEADS {
                for pos in 0..len {
                    let got = ((b * KV_HEADS + h) * len + pos) * DIM;
                    let truth = (h * len + pos) * DIM;
                    // Full-precision and staged rows (evicted, waiting for a key group) are exact.
                    let exact = !quantized.contains(&pos);
                    for (got, want) in [
                        (&ok[got..got + DIM], &history.k[b][truth..truth + DIM]),
                        (&ov[got..got + DIM], &history.v[b][truth..truth + DIM]),
                    ] {
                        let (err, _, finite) = max_abs_diff(got, want);
                        assert!(finite);
                        if exact {
                            assert_eq!(err, 0.0, "step {step}: full-precision row {pos} changed");
                        }
                    }
                }
            }
        }
        if step == 0 {
            continue;
        }
        let want = textbook(&q, &mk, &mv, None, SCALE.into());
        let (err, at, finite) = max_abs_diff(&host(&out), &want);
        assert!(finite, "step {step}: non-finite output");
        // The portable path hands the same values to textbook attention in another order;
        // the fused kernel reassociates sums (scale times code-dot instead of dot of products).
        let tolerance = match config.kernel {
            AttentionKernel::Portable => 1e-5,
            AttentionKernel::Fused => 1e-4,
        };
        assert!(
            err < tolerance,
            "step {step} ({:?}): attention differs by {err} at {at}",
            config.kernel
        );
    }
}

fn config(bits: u8, keys: KeyGrouping, policy: PolicyKind) -> LogQuantConfig {
    LogQuantConfig {
        bits,
        window: 4,
        group_size: 8,
        key_grouping: keys,
        policy,
        recent: 12,
        sink: 2,
        kernel: AttentionKernel::Portable,
        ..LogQuantConfig::paper()
    }
    .validate()
    .unwrap()
}

#[test]
fn position_agnostic_layout_matches_original_order_for_every_policy_and_grouping() {
    for policy in [
        PolicyKind::Logquant,
        PolicyKind::Recent,
        PolicyKind::SinkRecent,
        PolicyKind::None,
    ] {
        for keys in [KeyGrouping::PerChannel, KeyGrouping::PerToken] {
            for bits in [2, 4, 8] {
                for (batch, prefill) in [(1, 1), (2, 17), (3, 40)] {
                    for kernel in [AttentionKernel::Portable, AttentionKernel::Fused] {
                        let config = LogQuantConfig {
                            kernel,
                            ..config(bits, keys, policy)
                        };
                        check_layout_and_attention(config, batch, prefill, 45);
                    }
                }
            }
        }
    }
}

/// Keys and values at their own widths (3-bit codes included), a separate key group and the
/// Hadamard rotation, through both kernels, against the spec rule's layout and textbook
/// attention.
#[test]
fn mixed_widths_key_groups_and_rotation_match_the_reference() {
    for (key_bits, value_bits, key_group, rotate) in [
        (4, 2, None, false),
        (2, 4, None, false),
        (8, 2, None, false),
        (3, 2, Some(16), false),
        (3, 3, None, false),
        (4, 2, None, true),
        (3, 2, Some(16), true),
    ] {
        for keys in [KeyGrouping::PerChannel, KeyGrouping::PerToken] {
            for kernel in [AttentionKernel::Portable, AttentionKernel::Fused] {
                let config = LogQuantConfig {
                    key_bits: Some(key_bits),
                    value_bits: Some(value_bits),
                    // Per-token keys group channels: 16 (all of DIM) instead of 8.
                    key_group_size: key_group,
                    rotate,
                    kernel,
                    ..config(2, keys, PolicyKind::Logquant)
                };
                let config = config.validate().unwrap();
                check_layout_and_attention(config, 2, 17, 45);
                check_layout_and_attention(config, 1, 40, 20);
            }
        }
    }
}

/// The oracle itself: the spec rule as `spec/mod.rs` writes it reproduces the spec's
/// hand-computed vectors.
#[test]
fn the_written_out_rule_reproduces_the_spec_vectors() {
    for vector in spec::spec_vectors() {
        let mut rule = SpecSelection::new(Rule::LogQuant { w: vector.w });
        let mut arrived = 0;
        for point in &vector.points {
            let mut evicted = Vec::new();
            while arrived <= point.token {
                let n = if arrived == 0 { vector.prefill } else { 1 };
                evicted = rule.admit(n);
                arrived += n;
                if arrived <= point.token {
                    assert!(
                        evicted.is_empty(),
                        "{vector:?}: token {} evicted",
                        arrived - 1
                    );
                }
            }
            let mut want = point.evicted.clone();
            want.sort_unstable();
            assert_eq!(evicted, want, "{vector:?} at {}", point.token);
            assert_eq!(rule.positions(), point.fp, "{vector:?} at {}", point.token);
        }
    }
}

/// The spec's hand-computed vectors through the cache: after every arrival the cache's
/// full-precision positions are the spec's, and the positions it quantized at that arrival
/// are the ones the spec evicts (per-token keys: every evicted row is quantized at once).
#[test]
fn the_cache_keeps_the_specs_test_vectors() {
    for vector in spec::spec_vectors() {
        let config = LogQuantConfig {
            window: vector.w,
            group_size: 8,
            key_grouping: KeyGrouping::PerToken,
            kernel: AttentionKernel::Portable,
            ..LogQuantConfig::paper()
        }
        .validate()
        .unwrap();
        let mut cache = LogQuantCache::new(config, 1000);
        let mut rng = Rng::new(7);
        let mut quantized_before = 0;
        let mut points = vector.points.iter().peekable();
        let mut arrived = 0;
        while let Some(next) = points.peek() {
            let n = if arrived == 0 { vector.prefill } else { 1 };
            let k = rng.tensor((1, KV_HEADS, n, DIM)).unwrap();
            let v = rng.tensor((1, KV_HEADS, n, DIM)).unwrap();
            cache.append(&k, &v).unwrap();
            arrived += n;
            let row = &cache.rows()[0];
            let quantized: Vec<usize> = row
                .quantized_positions()
                .iter()
                .map(|&p| p as usize)
                .collect();
            let new_quantized = quantized[quantized_before..].to_vec();
            quantized_before = quantized.len();
            let token = arrived - 1;
            if next.token == token {
                let mut want = next.evicted.clone();
                want.sort_unstable();
                assert_eq!(new_quantized, want, "W={} token {token}", vector.w);
                assert_eq!(
                    row.full_precision_positions(),
                    next.fp,
                    "W={} token {token}",
                    vector.w
                );
                points.next();
            } else {
                assert!(
                    new_quantized.is_empty(),
                    "W={} token {token} quantized {new_quantized:?}",
                    vector.w
                );
            }
        }
    }
}

/// Prefill with the engine's causal mask: the output equals textbook causal attention over the
/// prompt, `softmax(Q K^T / sqrt(d) + M) V`, for both kernels (portable: the engine's attention
/// gets the prompt's exact rows; fused: the kernel attends itself), although most of the
/// prompt is quantized for the steps after.
#[test]
fn prefill_attends_to_exact_rows() {
    assert_eq!(SCALE, 1.0 / (DIM as f32).sqrt());
    let (b, n) = (2, 33);
    for kernel in [AttentionKernel::Portable, AttentionKernel::Fused] {
        let mut rng = Rng::new(99);
        let config = LogQuantConfig {
            kernel,
            ..config(2, KeyGrouping::PerChannel, PolicyKind::Logquant)
        };
        let mut cache = LogQuantCache::new(config, 1000);
        let q = rng.tensor((b, Q_HEADS, n, DIM)).unwrap();
        let k = rng.tensor((b, KV_HEADS, n, DIM)).unwrap();
        let v = rng.tensor((b, KV_HEADS, n, DIM)).unwrap();
        let causal = mask(0, n, None);
        let out = cache
            .append_and_attend(&q, &k, &v, Some(&causal), &params(), &masked_engine)
            .unwrap();
        let want = textbook(&q, &k, &v, Some(&causal), 1.0 / (DIM as f64).sqrt());
        let (err, at, finite) = max_abs_diff(&host(&out), &want);
        assert!(
            finite && err < 1e-5,
            "{kernel:?}: prefill differs from textbook attention by {err} at {at}"
        );
        assert!(
            cache.rows()[0].quantized_tokens() > 0,
            "prefill quantized nothing"
        );
    }
}

#[test]
fn batching_round_trips_and_clones_share_quantized_blocks() {
    let mut rng = Rng::new(5);
    let cfg = config(2, KeyGrouping::PerChannel, PolicyKind::Logquant);
    let mut a = LogQuantCache::new(cfg, 1000);
    let mut b = LogQuantCache::new(cfg, 1000);
    for cache in [&mut a, &mut b] {
        let k = rng.tensor((1, KV_HEADS, 30, DIM)).unwrap();
        cache.append(&k, &k).unwrap();
    }
    let batch = a.cat_batch(&[&b]).unwrap();
    let parts = batch.split_batch(2).unwrap();
    for (part, original) in parts.iter().zip([&a, &b]) {
        let (pk, pv) = part.materialize().unwrap().unwrap();
        let (ok, ov) = original.materialize().unwrap().unwrap();
        assert_eq!(host(&pk), host(&ok));
        assert_eq!(host(&pv), host(&ov));
        let part = part.as_any().downcast_ref::<LogQuantCache>().unwrap();
        let shared = part.rows()[0]
            .chunks()
            .iter()
            .zip(original.rows()[0].chunks())
            .all(|(x, y)| std::sync::Arc::ptr_eq(x, y));
        assert!(shared, "clone-in / clone-out copied quantized blocks");
    }
    let snapshot = a.box_clone();
    let k = rng.tensor((1, KV_HEADS, 1, DIM)).unwrap();
    a.append(&k, &k).unwrap();
    assert_eq!(snapshot.seq_len(), 30);
    assert_eq!(a.seq_len(), 31);
    assert!(batch.split_batch(3).is_err());
}

#[test]
fn rewinds_are_refused_with_a_reason() {
    let mut cache = LogQuantCache::new(LogQuantConfig::paper(), 1000);
    let k = Tensor::zeros((1, KV_HEADS, 10, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    cache.append(&k, &k).unwrap();
    assert!(cache.try_set_len(10).is_ok());
    let err = cache.try_set_len(4).unwrap_err().to_string();
    assert!(
        err.contains("cannot change the cache from 10 to 4 tokens"),
        "{err}"
    );
    assert!(cache.set_len(11).is_err());
}

/// The byte counter against counts written out by hand: how many tokens stay full precision
/// from the spec's rule, bytes per token from the shapes of what is stored.
#[test]
fn bytes_follow_the_memory_arithmetic() {
    // SmolLM2's layer geometry: 3 kv heads x 64 dims, f32 activations; 2 bits, W=42, G=64.
    let (heads, dim, tokens, w, g) = (3, 64, 1000, 42, 64);
    let cfg = LogQuantConfig::paper();
    assert_eq!((cfg.bits, cfg.window, cfg.group_size), (2, w, g));
    let mut cache = LogQuantCache::new(cfg, 10_000);
    let k = Tensor::ones(
        (1, heads, tokens, dim),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    cache.append(&k, &k).unwrap();
    // The eager prefill passes 21 times (1000 - 21 x 42 = 118 < 3W); per-channel keys quantize
    // the evicted tokens in whole groups of G, the rest waits in f32.
    let fp = spec::logquant_prefill(tokens, w).len();
    let evicted = tokens - fp;
    let (quantized, staged) = (evicted / g * g, evicted % g);
    assert_eq!((fp, quantized, staged), (118, 832, 50));
    // A quantized token: 2-bit codes of K and V, 3 x 64 each (2 x 48 B); values a 16-bit scale
    // and min per 64 channels (3 x 4 B); keys a 16-bit scale and min per channel per 64 tokens
    // (3 x 64 x 4 B / 64 tokens). 120 B, the spec's 3,600 B over 30 layers.
    let per_quantized = 2 * 48 + 3 * 4 + 3 * 64 * 4 / 64;
    assert_eq!(per_quantized * 30, 3600);
    let per_f32 = 2 * heads * dim * 4;
    let usage = cache.usage();
    let row = &cache.rows()[0];
    assert_eq!(row.quantized_tokens(), quantized);
    assert_eq!(row.full_precision_tokens(), fp + staged);
    assert_eq!(
        usage.bytes,
        quantized * per_quantized + (fp + staged) * per_f32
    );
    assert_eq!(usage.dense_bytes, tokens * per_f32);
    assert_eq!(usage.quantized_tokens, quantized);
    assert_eq!(usage.full_precision_tokens, fp + staged);
}

/// The byte counter against an analytic count from tensor sizes, for mixed widths, 3-bit codes
/// and a key group of 128 tokens: quantized rows hold `heads x dim x bits / 8` bytes of codes
/// for K and V each, values a 4-byte scale/min per `G` channels of each token, per-channel keys
/// a 4-byte scale/min per channel per block of `key group` tokens; full-precision and staged
/// rows hold `2 x heads x dim` f32 values. Token counts come from the spec's rule.
#[test]
fn bytes_of_mixed_widths_match_an_analytic_count() {
    let (heads, dim, tokens) = (3, 64, 1000);
    for (key_bits, value_bits, key_group, keys) in [
        (4, 2, 64, KeyGrouping::PerChannel),
        (2, 4, 64, KeyGrouping::PerChannel),
        (8, 2, 64, KeyGrouping::PerChannel),
        (3, 2, 128, KeyGrouping::PerChannel),
        (4, 2, 32, KeyGrouping::PerToken),
    ] {
        let cfg = LogQuantConfig {
            key_bits: Some(key_bits),
            value_bits: Some(value_bits),
            key_group_size: Some(key_group),
            key_grouping: keys,
            ..LogQuantConfig::paper()
        }
        .validate()
        .unwrap();
        let mut cache = LogQuantCache::new(cfg, 10_000);
        let mut rng = Rng::new(key_bits as u64 * 31 + value_bits as u64);
        let k = rng.tensor((1, heads, tokens, dim)).unwrap();
        let v = rng.tensor((1, heads, tokens, dim)).unwrap();
        cache.append(&k, &v).unwrap();
        let row = &cache.rows()[0];
        // Per-channel keys quantize evicted tokens in whole key groups; per-token keys at once.
        let evicted = tokens - spec::logquant_prefill(tokens, cfg.window).len();
        let quantized = match keys {
            KeyGrouping::PerChannel => evicted / key_group * key_group,
            KeyGrouping::PerToken => evicted,
        };
        let full = tokens - quantized;
        assert_eq!(
            (row.quantized_tokens(), row.full_precision_tokens()),
            (quantized, full)
        );
        for chunk in row.chunks() {
            assert_eq!((chunk.k.bits, chunk.v.bits), (key_bits, value_bits));
        }
        let key_params = match keys {
            KeyGrouping::PerChannel => quantized / key_group * heads * dim * 4,
            KeyGrouping::PerToken => quantized * heads * (dim / key_group) * 4,
        };
        let expected = quantized * heads * dim * (key_bits + value_bits) as usize / 8
            + quantized * heads * (dim / 64) * 4
            + key_params
            + full * 2 * heads * dim * 4;
        let usage = cache.usage();
        assert_eq!(
            usage.bytes, expected,
            "K{key_bits}V{value_bits} key group {key_group} {keys:?}"
        );
        assert_eq!(usage.dense_bytes, tokens * 2 * heads * dim * 4);
    }
}

#[test]
fn group_size_that_does_not_divide_head_dim_is_a_clear_error() {
    let cfg = LogQuantConfig {
        group_size: 48,
        ..LogQuantConfig::paper()
    };
    let mut cache = LogQuantCache::new(cfg, 100);
    let k = Tensor::zeros((1, 2, 3, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = cache.append(&k, &k).unwrap_err().to_string();
    assert!(
        err.contains("group size 48 does not divide head_dim 64"),
        "{err}"
    );
}

/// The fused kernel against textbook attention over the dequantized layout, on edge cases:
/// one token, no quantized part yet, constant groups, 16-bit activations, lengths that are
/// not multiples of the group.
#[test]
fn fused_kernel_matches_the_reference_on_edge_cases() {
    let mut rng = Rng::new(77);
    for (bits, keys, prefill, constant, dtype) in [
        (
            2,
            KeyGrouping::PerChannel,
            1,
            false,
            candle_core::DType::F32,
        ),
        (2, KeyGrouping::PerToken, 1, true, candle_core::DType::F32),
        (
            4,
            KeyGrouping::PerChannel,
            13,
            true,
            candle_core::DType::F16,
        ),
        (
            8,
            KeyGrouping::PerToken,
            131,
            false,
            candle_core::DType::F16,
        ),
        (
            2,
            KeyGrouping::PerChannel,
            113,
            false,
            candle_core::DType::BF16,
        ),
    ] {
        let cfg = LogQuantConfig {
            kernel: AttentionKernel::Fused,
            ..config(bits, keys, PolicyKind::Logquant)
        };
        let mut cache = LogQuantCache::new(cfg, 100_000);
        let make = |rng: &mut Rng, dims| -> Tensor {
            let t = if constant {
                Tensor::full(0.37f32, dims, &Device::Cpu).unwrap()
            } else {
                rng.tensor(dims).unwrap()
            };
            t.to_dtype(dtype).unwrap()
        };
        let k = make(&mut rng, (1, KV_HEADS, prefill, DIM));
        let v = make(&mut rng, (1, KV_HEADS, prefill, DIM));
        cache.append(&k, &v).unwrap();
        for step in 0..9 {
            let q = rng
                .tensor((1, Q_HEADS, 1, DIM))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let k = make(&mut rng, (1, KV_HEADS, 1, DIM));
            let v = make(&mut rng, (1, KV_HEADS, 1, DIM));
            let out = cache
                .append_and_attend(&q, &k, &v, None, &params(), &naive_engine)
                .unwrap();
            assert_eq!(out.dtype(), dtype);
            let (mk, mv) = cache.materialize().unwrap().unwrap();
            let to_f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
            let want = textbook(&q, &mk, &mv, None, SCALE.into());
            let (err, at, finite) = max_abs_diff(&host(&to_f32(&out)), &want);
            let tolerance = if dtype == candle_core::DType::F32 {
                1e-4
            } else {
                1e-2
            };
            assert!(
                finite && err < tolerance,
                "bits {bits} {keys:?} prefill {prefill} step {step} {dtype:?}: error {err} at {at}"
            );
        }
    }
}

/// A fused-kernel LogQuant cache (W=42) for a batch of 2, prefilled with `tokens` random rows.
fn fused_cache(
    rng: &mut Rng,
    (bits, group, keys): (u8, usize, KeyGrouping),
    tokens: usize,
    dim: usize,
) -> LogQuantCache {
    let cfg = LogQuantConfig {
        bits,
        window: 42,
        group_size: group,
        key_grouping: keys,
        kernel: AttentionKernel::Fused,
        ..LogQuantConfig::paper()
    };
    fused_cache_with(rng, cfg, tokens, dim)
}

/// [`fused_cache`] with any configuration.
fn fused_cache_with(
    rng: &mut Rng,
    cfg: LogQuantConfig,
    tokens: usize,
    dim: usize,
) -> LogQuantCache {
    let cfg = cfg.validate().unwrap();
    let mut cache = LogQuantCache::new(cfg, 100_000);
    let k = rng.tensor((2, KV_HEADS, tokens, dim)).unwrap();
    let v = rng.tensor((2, KV_HEADS, tokens, dim)).unwrap();
    cache.append(&k, &v).unwrap();
    cache
}

/// Span splitting and every SIMD tier this CPU has, against textbook attention over the
/// dequantized layout: many quantized rows, a batch of 2, head dims with and without a
/// remainder after the kernel's 16-wide loops, both key groupings.
#[test]
fn fused_kernel_tiers_and_span_splits_match_the_reference() {
    use mistralrs_logquant::kernels::cpu::{attend_with, KernelPlan, SimdTier};
    let mut rng = Rng::new(99);
    for (dim, group, bits) in [(64, 64, 2), (24, 8, 4), (16, 16, 8)] {
        for keys in [KeyGrouping::PerChannel, KeyGrouping::PerToken] {
            let mut cache = fused_cache(&mut rng, (bits, group, keys), 700, dim);
            let (k1, v1) = (
                rng.tensor((2, KV_HEADS, 1, dim)).unwrap(),
                rng.tensor((2, KV_HEADS, 1, dim)).unwrap(),
            );
            cache.append(&k1, &v1).unwrap();
            let q = rng.tensor((2, Q_HEADS, 1, dim)).unwrap();
            let (mk, mv) = cache.materialize().unwrap().unwrap();
            let want = textbook(&q, &mk, &mv, None, SCALE.into());
            let row = &cache.rows()[0];
            assert!(row.quantized_tokens() > 500 && row.full_precision_tokens() > 0);
            for tier in SimdTier::available() {
                for span_tokens in [1, 37, 512, 100_000] {
                    let plan = KernelPlan { tier, span_tokens };
                    let got = attend_with(&q, cache.rows(), None, SCALE, plan).unwrap();
                    let (err, at, finite) = max_abs_diff(&host(&got), &want);
                    assert!(
                        finite && err < 1e-4,
                        "dim {dim} {keys:?} {plan:?}: error {err} at {at}"
                    );
                }
            }
        }
    }
}

/// Mixed key/value widths (K4V2, K2V4, K8V2, K3V2 with 128-token key groups), with and
/// without rotation, through every SIMD tier and span split of the fused kernel, against
/// textbook attention over the dequantized layout; and the rotated cache against exact
/// attention over the original rows (rotation undone correctly: within 8-bit error).
#[test]
fn fused_kernel_mixed_widths_match_the_reference() {
    use mistralrs_logquant::kernels::cpu::{attend_with, KernelPlan, SimdTier};
    let mut rng = Rng::new(4242);
    let dim = 64;
    for (key_bits, value_bits, key_group, rotate) in [
        (4, 2, None, false),
        (2, 4, None, false),
        (8, 2, None, false),
        (3, 2, Some(128), false),
        (3, 2, Some(128), true),
        (4, 2, None, true),
    ] {
        for keys in [KeyGrouping::PerChannel, KeyGrouping::PerToken] {
            let cfg = LogQuantConfig {
                key_bits: Some(key_bits),
                value_bits: Some(value_bits),
                group_size: 32,
                key_group_size: key_group.filter(|_| keys == KeyGrouping::PerChannel),
                key_grouping: keys,
                rotate,
                kernel: AttentionKernel::Fused,
                ..LogQuantConfig::paper()
            };
            let mut cache = fused_cache_with(&mut rng, cfg, 700, dim);
            let (k1, v1) = (
                rng.tensor((2, KV_HEADS, 1, dim)).unwrap(),
                rng.tensor((2, KV_HEADS, 1, dim)).unwrap(),
            );
            cache.append(&k1, &v1).unwrap();
            let q = rng.tensor((2, Q_HEADS, 1, dim)).unwrap();
            let (mk, mv) = cache.materialize().unwrap().unwrap();
            let want = textbook(&q, &mk, &mv, None, SCALE.into());
            let row = &cache.rows()[0];
            assert!(row.quantized_tokens() > 500);
            let chunk = &row.chunks()[0];
            assert_eq!(
                (chunk.k.bits, chunk.v.bits, chunk.k.rotated, chunk.v.rotated),
                (key_bits, value_bits, rotate, rotate)
            );
            for tier in SimdTier::available() {
                for span_tokens in [1, 37, 512] {
                    let plan = KernelPlan { tier, span_tokens };
                    let got = attend_with(&q, cache.rows(), None, SCALE, plan).unwrap();
                    let (err, at, finite) = max_abs_diff(&host(&got), &want);
                    assert!(
                        finite && err < 1e-4,
                        "K{key_bits}V{value_bits} {keys:?} rotate {rotate} {plan:?}: \
                         error {err} at {at}"
                    );
                }
            }
        }
    }
    // Rotation at 8 bits: attention over the rotated, quantized cache stays within 8-bit
    // error of exact attention over the rows as given, as the unrotated cache does.
    let (k, v) = (
        rng.tensor((1, KV_HEADS, 600, dim)).unwrap(),
        rng.tensor((1, KV_HEADS, 600, dim)).unwrap(),
    );
    let q = rng.tensor((1, Q_HEADS, 1, dim)).unwrap();
    let exact = textbook(&q, &k, &v, None, SCALE.into());
    for rotate in [false, true] {
        let cfg = LogQuantConfig {
            bits: 8,
            rotate,
            kernel: AttentionKernel::Fused,
            ..LogQuantConfig::paper()
        };
        let mut cache = LogQuantCache::new(cfg.validate().unwrap(), 10_000);
        cache.append(&k, &v).unwrap();
        assert!(cache.rows()[0].quantized_tokens() >= 448);
        let got = attend_with(&q, cache.rows(), None, SCALE, KernelPlan::default()).unwrap();
        let (err, at, finite) = max_abs_diff(&host(&got), &exact);
        assert!(
            finite && err < 5e-3,
            "8-bit rotate {rotate}: error {err} at {at} against exact attention"
        );
    }
}

/// The engine's causal mask for `new` rows after `cached` ones, as mistral.rs builds it.
fn causal_mask(cached: usize, new: usize) -> Tensor {
    let data: Vec<f32> = (0..new)
        .flat_map(|i| {
            (0..cached + new).map(move |j| {
                if j <= cached + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (new, cached + new), &Device::Cpu).unwrap()
}

/// A chunk of new tokens after a cached prefix: the fused kernel reads the cache whole and
/// masks only the chunk, equal to textbook causal attention over [cache | chunk], for every
/// tier, span size and key grouping, GQA and a batch of 2.
#[test]
fn fused_chunk_after_a_cached_prefix_matches_the_reference() {
    use mistralrs_logquant::kernels::cpu::{attend_with, KernelPlan, SimdTier};
    let mut rng = Rng::new(5);
    for keys in [KeyGrouping::PerChannel, KeyGrouping::PerToken] {
        let cache = fused_cache(&mut rng, (2, 16, keys), 300, DIM);
        for new in [1usize, 5, 40] {
            let q = rng.tensor((2, Q_HEADS, new, DIM)).unwrap();
            let k_new = rng.tensor((2, KV_HEADS, new, DIM)).unwrap();
            let v_new = rng.tensor((2, KV_HEADS, new, DIM)).unwrap();
            let (mk, mv) = cache.materialize().unwrap().unwrap();
            let k_all = Tensor::cat(&[&mk, &k_new], 2).unwrap();
            let v_all = Tensor::cat(&[&mv, &v_new], 2).unwrap();
            let want = textbook(&q, &k_all, &v_all, None, SCALE.into());
            for tier in SimdTier::available() {
                for span_tokens in [1, 3, 512] {
                    let plan = KernelPlan { tier, span_tokens };
                    let got =
                        attend_with(&q, cache.rows(), Some((&k_new, &v_new)), SCALE, plan).unwrap();
                    let (err, at, finite) = max_abs_diff(&host(&got), &want);
                    assert!(
                        finite && err < 1e-4,
                        "{keys:?} chunk {new} {plan:?}: error {err} at {at}"
                    );
                }
            }
        }
    }
}

/// Through the backend: chunks with the engine's causal mask (the fused kernel's chunk path)
/// and decode steps, on both kernels, against textbook causal attention over the cache as it
/// was plus the chunk's exact rows (a decode step: over the cache after its admission); the
/// two caches end up identical.
#[test]
fn backend_chunks_match_textbook_attention_on_both_kernels() {
    let mut rng = Rng::new(11);
    let base = LogQuantConfig {
        window: 4,
        group_size: 8,
        ..LogQuantConfig::paper()
    };
    let mut caches = [AttentionKernel::Fused, AttentionKernel::Portable]
        .map(|kernel| LogQuantCache::new(LogQuantConfig { kernel, ..base }, 100_000));
    let mut cached = 0;
    for new in [50usize, 7, 1, 13] {
        let q = rng.tensor((1, Q_HEADS, new, DIM)).unwrap();
        let k = rng.tensor((1, KV_HEADS, new, DIM)).unwrap();
        let v = rng.tensor((1, KV_HEADS, new, DIM)).unwrap();
        let m = (new > 1).then(|| causal_mask(cached, new));
        for cache in &mut caches {
            let before = cache.materialize().unwrap();
            let got = cache
                .append_and_attend(&q, &k, &v, m.as_ref(), &params(), &naive_engine)
                .unwrap();
            let (all_k, all_v) = match before {
                _ if new == 1 => cache.materialize().unwrap().unwrap(),
                Some((ck, cv)) => (
                    Tensor::cat(&[&ck, &k], 2).unwrap(),
                    Tensor::cat(&[&cv, &v], 2).unwrap(),
                ),
                None => (k.clone(), v.clone()),
            };
            let want = textbook(&q, &all_k, &all_v, m.as_ref(), SCALE.into());
            let (err, at, finite) = max_abs_diff(&host(&got), &want);
            assert!(
                finite && err < 1e-4,
                "{:?}: chunk {new} after {cached}: error {err} at {at}",
                cache.config().kernel
            );
        }
        cached += new;
    }
    let [fused, portable] = &caches;
    assert!(fused.rows()[0].quantized_tokens() > 0);
    let (fk, fv) = fused.materialize().unwrap().unwrap();
    let (pk, pv) = portable.materialize().unwrap().unwrap();
    assert_eq!(host(&fk), host(&pk));
    assert_eq!(host(&fv), host(&pv));
}

#[test]
fn only_the_plain_causal_mask_is_recognized() {
    use mistralrs_logquant::backend::is_plain_causal;
    assert!(is_plain_causal(Some(&causal_mask(10, 4)), 10, 4).unwrap());
    // Batched and per-head leading dims.
    let m = causal_mask(3, 2)
        .unsqueeze(0)
        .unwrap()
        .repeat((2, 1, 1))
        .unwrap();
    assert!(is_plain_causal(Some(&m), 3, 2).unwrap());
    // Wrong shape, no mask, a sliding window (row 3 may not see column 0).
    assert!(!is_plain_causal(Some(&causal_mask(10, 4)), 9, 4).unwrap());
    assert!(!is_plain_causal(None, 10, 4).unwrap());
    let mut window = host(&causal_mask(2, 4));
    window[3 * 6] = f32::NEG_INFINITY;
    let window = Tensor::from_vec(window, (4, 6), &Device::Cpu).unwrap();
    assert!(!is_plain_causal(Some(&window), 2, 4).unwrap());
}

/// Textbook attention with the engine's additive mask `(queries, keys)` (broadcast over batch
/// and heads), written with plain candle ops: what a model that applies its own mask computes.
fn masked_engine(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, q_heads, queries, dim) = q.dims4()?;
    let (_, kv_heads, keys, _) = k.dims4()?;
    let groups = q_heads / kv_heads;
    let q = q.reshape((b, kv_heads, groups * queries, dim))?;
    let scores = (q.matmul(&k.t()?)? * SCALE as f64)?.reshape((b, q_heads, queries, keys))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    p.reshape((b, kv_heads, groups * queries, keys))?
        .matmul(v)?
        .reshape((b, q_heads, queries, dim))
}

/// An additive mask for `new` rows after `cached` ones: causal, and if `window` is set, each
/// row sees only the last `window` positions (itself included).
fn mask(cached: usize, new: usize, window: Option<usize>) -> Tensor {
    let total = cached + new;
    let data: Vec<f32> = (0..new)
        .flat_map(|i| {
            let me = cached + i;
            (0..total).map(move |j| {
                let visible = j <= me && window.is_none_or(|w| me - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (new, total), &Device::Cpu).unwrap()
}

/// What models that call `append` and mask the result themselves rely on: the cache comes back
/// in position order with the new rows exact, as from the stock cache, across a prefill longer
/// than 3W, a chunk and decode steps (W=4 so most rows are 2-bit). Then attention under a
/// sliding-window mask through `append_and_attend` equals masked textbook attention over the
/// same rows in position order.
#[test]
fn append_hands_out_rows_in_position_order_with_new_rows_exact() {
    let config = LogQuantConfig {
        window: 4,
        group_size: 16,
        kernel: AttentionKernel::Portable,
        ..LogQuantConfig::paper()
    }
    .validate()
    .unwrap();
    let step_bound = 2.0 / 3.0 / 2.0 * 1.001 + 1e-3;
    let batch = 2;
    let mut rng = Rng::new(4242);
    let mut cache = LogQuantCache::new(config, 100_000);
    let mut history = History::new(batch);
    for n in [40, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 23, 1] {
        let k = rng.tensor((batch, KV_HEADS, n, DIM)).unwrap();
        let v = rng.tensor((batch, KV_HEADS, n, DIM)).unwrap();
        let before = history.len;
        history.push(&k, &v);
        let (ak, av) = cache.append(&k, &v).unwrap();
        let len = history.len;
        assert_eq!(ak.dims(), [batch, KV_HEADS, len, DIM]);
        let (ak, av) = (host(&ak), host(&av));
        let mut quantized_rows = 0;
        for b in 0..batch {
            for h in 0..KV_HEADS {
                for pos in 0..len {
                    let got = ((b * KV_HEADS + h) * len + pos) * DIM;
                    let truth = (h * len + pos) * DIM;
                    let (ek, _, _) =
                        max_abs_diff(&ak[got..got + DIM], &history.k[b][truth..truth + DIM]);
                    let (ev, _, _) =
                        max_abs_diff(&av[got..got + DIM], &history.v[b][truth..truth + DIM]);
                    if pos >= before {
                        assert_eq!((ek, ev), (0.0, 0.0), "new row {pos} of {n} not exact");
                    } else {
                        assert!(ek <= step_bound && ev <= step_bound, "row {pos}: {ek} {ev}");
                        quantized_rows += usize::from(ek > 0.0);
                    }
                }
            }
        }
        if before > 0 {
            assert!(
                quantized_rows > 0,
                "nothing was quantized before {n} new rows"
            );
        }
    }

    // A chunk of 3 and a decode step under a sliding window of 9: the engine's mask picks
    // columns by position, so any other order would attend to the wrong rows.
    let mut windowed = params();
    windowed.sliding_window = Some(9);
    for n in [3, 1] {
        let cached = cache.seq_len();
        let q = rng.tensor((batch, Q_HEADS, n, DIM)).unwrap();
        let k = rng.tensor((batch, KV_HEADS, n, DIM)).unwrap();
        let v = rng.tensor((batch, KV_HEADS, n, DIM)).unwrap();
        // A chunk attends to the cache as it was plus its exact rows; a decode step lets the
        // policy compress first, then attends to the cache as it is after.
        let (ck, cv) = cache.materialize().unwrap().unwrap();
        let m = mask(cached, n, Some(9));
        let got = cache
            .append_and_attend(&q, &k, &v, Some(&m), &windowed, &masked_engine)
            .unwrap();
        let (all_k, all_v) = if n == 1 {
            cache.materialize().unwrap().unwrap()
        } else {
            (
                Tensor::cat(&[&ck, &k], 2).unwrap(),
                Tensor::cat(&[&cv, &v], 2).unwrap(),
            )
        };
        let want = textbook(&q, &all_k, &all_v, Some(&m), SCALE.into());
        let (err, at, finite) = max_abs_diff(&host(&got), &want);
        assert!(finite && err < 1e-5, "chunk of {n}: error {err} at {at}");
    }
}

/// The load-time refusals: a latent (MLA) cache, K and V heads of different sizes, a head size
/// the group size does not divide; an ordinary GQA model passes.
#[test]
fn models_logquant_cannot_cache_are_refused_with_one_line() {
    use mistralrs_core::kv_cache_backend::{LayerKvShape, ModelKvShape};
    use mistralrs_logquant::backend::check_model_shape;
    let layer = |k_head_dim, v_head_dim| LayerKvShape {
        kv_heads: 2,
        k_head_dim,
        v_head_dim,
    };
    let shape = |layers, latent_attention| ModelKvShape {
        layers,
        latent_attention,
    };
    let config = LogQuantConfig::paper(); // group size 64
    assert_eq!(
        check_model_shape(&config, &shape(vec![layer(64, 64); 3], false)),
        Ok(())
    );
    let cases = [
        (shape(vec![layer(192, 128)], true), "multi-head latent"),
        (
            shape(vec![layer(64, 64), layer(192, 128)], false),
            "layer 1 has key heads of 192 and value heads of 128",
        ),
        (
            shape(vec![layer(96, 96)], false),
            "does not divide head_dim 96",
        ),
    ];
    for (shape, want) in cases {
        let err = check_model_shape(&config, &shape).unwrap_err();
        assert!(err.contains(want), "{err:?} lacks {want:?}");
        assert!(!err.contains('\n'), "{err:?} is not one line");
    }
}
