//! Decode attention alone, SmolLM2-135M's shape (9 query heads, 3 KV heads, head dim 64, f32),
//! one layer: the default cache (mistral.rs's CPU attention over dense K/V), LogQuant's portable
//! path (dequantize, then the same stock attention) and the fused kernel over the packed codes;
//! and the cost of reading the cache out in position order rather than LogQuant's layout.
//!
//! `cargo bench --bench attention` (add `-- 8192` to filter). Report medians; the end-to-end
//! counterpart is `mistralrs-logquant bench`.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mistralrs_core::kv_cache_backend::{stock_attention, AttentionParams, KvCacheBackend};
use mistralrs_logquant::backend::LogQuantCache;
use mistralrs_logquant::config::LogQuantConfig;
use mistralrs_logquant::kernels::cpu::attend_decode;
use mistralrs_logquant::store::QuantPath;

const Q_HEADS: usize = 9;
const KV_HEADS: usize = 3;
const DIM: usize = 64;

fn attention(c: &mut Criterion) {
    let device = Device::Cpu;
    let params = AttentionParams {
        n_kv_groups: Q_HEADS / KV_HEADS,
        softmax_scale: 1.0 / (DIM as f32).sqrt(),
        softcap: None,
        sliding_window: None,
        sinks: None,
    };
    let mut group = c.benchmark_group("decode_attention");
    group.sample_size(20);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    for batch in [1usize, 8] {
        for context in [1024usize, 4096, 8192] {
            let k = Tensor::randn(0f32, 1.0, (batch, KV_HEADS, context, DIM), &device).unwrap();
            let v = Tensor::randn(0f32, 1.0, (batch, KV_HEADS, context, DIM), &device).unwrap();
            let q = Tensor::randn(0f32, 1.0, (batch, Q_HEADS, 1, DIM), &device).unwrap();
            let mut cache = LogQuantCache::new(LogQuantConfig::paper(), 8192);
            cache.append(&k, &v).unwrap();
            let id = |name: &str| BenchmarkId::new(name, format!("ctx{context}/b{batch}"));

            group.bench_function(id("default"), |b| {
                b.iter(|| stock_attention(&q, &k, &v, None, &params).unwrap())
            });
            group.bench_function(id("logquant-portable"), |b| {
                // What the portable decode path does with no mask: the layout, any order.
                b.iter(|| {
                    let (k, v) = layout_rows(&cache);
                    stock_attention(&q, &k, &v, None, &params).unwrap()
                })
            });
            group.bench_function(id("logquant-fused"), |b| {
                b.iter(|| attend_decode(&q, cache.rows(), params.softmax_scale).unwrap())
            });
        }
    }
    group.finish();
}

/// The batch's rows in LogQuant's layout `[quantized | staged | full precision]`.
fn layout_rows(cache: &LogQuantCache) -> (Tensor, Tensor) {
    let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = cache
        .rows()
        .iter()
        .map(|row| row.materialize(DType::F32, &Device::Cpu).unwrap().unwrap())
        .unzip();
    (
        Tensor::stack(&ks, 0).unwrap(),
        Tensor::stack(&vs, 0).unwrap(),
    )
}

/// The cost of handing the cache to the engine in position order (what models that apply their
/// own mask need) over the layout order LogQuant's own attention reads: one gather per tensor;
/// and the device path's readout (candle-op dequantization, what CUDA and Metal run) on the CPU.
fn position_order(c: &mut Criterion) {
    let device = Device::Cpu;
    let mut group = c.benchmark_group("cache_readout");
    group.sample_size(20);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    for context in [1024usize, 8192] {
        let k = Tensor::randn(0f32, 1.0, (1, KV_HEADS, context, DIM), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, KV_HEADS, context, DIM), &device).unwrap();
        let mut cache = LogQuantCache::new(LogQuantConfig::paper(), 8192);
        cache.append(&k, &v).unwrap();
        let row = &cache.rows()[0];
        let id = |name: &str| BenchmarkId::new(name, format!("ctx{context}"));
        group.bench_function(id("layout"), |b| {
            b.iter(|| row.materialize(DType::F32, &device).unwrap())
        });
        group.bench_function(id("position-order"), |b| {
            b.iter(|| {
                row.materialize_in_position_order(DType::F32, &device)
                    .unwrap()
            })
        });
        let mut forced =
            LogQuantCache::with_quant_path(LogQuantConfig::paper(), 8192, QuantPath::Device);
        forced.append(&k, &v).unwrap();
        let forced_row = &forced.rows()[0];
        group.bench_function(id("layout-device-path"), |b| {
            b.iter(|| forced_row.materialize(DType::F32, &device).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, attention, position_order);
criterion_main!(benches);
