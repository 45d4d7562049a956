//! The device path ([`QuantPath::Device`]: candle-op quantization and dequantization, the
//! portable attention path, host reads refused) run on the CPU, against today's host path as
//! the oracle: the scalar reference quantizer ([`mistralrs_logquant::quant::QuantBlock`]) with
//! the portable and the fused kernel. What runs here is exactly what CUDA and Metal run.
//!
//! Every test ends by checking that no store on the device path attempted a host read
//! ([`device_path_host_reads`]); an attempt is also an error, which fails the test where it
//! happens.
//!
//! The device-path caches run on [`test_device`]: the CPU, or the accelerator named by
//! `MISTRALRS_LOGQUANT_TEST_DEVICE` in a build with its feature (`scripts/device-check.sh`).
//! The host-path oracles always run on the CPU, from the same inputs.

use candle_core::{DType, Device, Result, Tensor};
use mistralrs_core::kv_cache_backend::{stock_attention, AttentionParams, KvCacheBackend};
use mistralrs_logquant::backend::LogQuantCache;
use mistralrs_logquant::config::{AttentionKernel, KeyGrouping, LogQuantConfig, PolicyKind};
use mistralrs_logquant::packed::uploads_on_this_thread;
use mistralrs_logquant::store::{device_path_host_reads, QuantPath};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const Q_HEADS: usize = 4;
const KV_HEADS: usize = 2;
const DIM: usize = 64;
const SCALE: f32 = 0.125;

/// `MISTRALRS_LOGQUANT_TEST_DEVICE`: `cpu` (the default), `cuda`, `cuda:N` or `metal`. Made
/// once: each `Device::new_cuda` is a device of its own, and candle refuses to combine tensors
/// of two.
fn test_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let name = std::env::var("MISTRALRS_LOGQUANT_TEST_DEVICE").unwrap_or_default();
            let device = match name.as_str() {
                "" | "cpu" => Ok(Device::Cpu),
                "cuda" => Device::new_cuda(0),
                "metal" => Device::new_metal(0),
                other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                    Some(Ok(ordinal)) => Device::new_cuda(ordinal),
                    _ => panic!(
                        "MISTRALRS_LOGQUANT_TEST_DEVICE={other}: expected cpu, cuda, cuda:N or metal"
                    ),
                },
            };
            device.unwrap_or_else(|e| panic!("MISTRALRS_LOGQUANT_TEST_DEVICE={name}: {e}"))
        })
        .clone()
}

/// A copy of `t` on the device under test.
fn on_device(t: &Tensor) -> Tensor {
    t.to_device(&test_device()).unwrap()
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

fn engine(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    stock_attention(q, k, v, mask, &params())
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn random(rng: &mut ChaCha8Rng, dims: (usize, usize, usize, usize)) -> Tensor {
    let n = dims.0 * dims.1 * dims.2 * dims.3;
    // Keys with an outlier channel, as real keys have.
    let data: Vec<f32> = (0..n)
        .map(|i| {
            let x = rng.random::<f32>() * 2.0 - 1.0;
            if i % DIM == 3 {
                8.0 * x
            } else {
                x
            }
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

/// The causal mask of `new` rows after `cached` ones, `(new, cached + new)`.
fn causal(cached: usize, new: usize) -> Tensor {
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

/// Largest `|a - b|` with its index; panics on a length mismatch or a non-finite value.
fn max_diff(a: &[f32], b: &[f32], label: &str) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "{label}: lengths");
    let mut worst = (0f32, 0);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.is_finite() && y.is_finite(),
            "{label}: index {i}: {x} vs {y}"
        );
        if (x - y).abs() > worst.0 {
            worst = ((x - y).abs(), i);
        }
    }
    worst
}

/// Settings the crate supports: widths 2/3/4/8, separate key/value widths, both key
/// groupings, a key group size of its own, rotation, and the policies.
fn settings() -> Vec<(String, LogQuantConfig)> {
    let base = LogQuantConfig {
        window: 4,
        group_size: 16,
        kernel: AttentionKernel::Portable,
        ..LogQuantConfig::paper()
    };
    let mut out = Vec::new();
    for bits in [2u8, 3, 4, 8] {
        for key_grouping in [KeyGrouping::PerChannel, KeyGrouping::PerToken] {
            out.push((
                format!("{bits}-bit {key_grouping:?}"),
                LogQuantConfig {
                    bits,
                    key_grouping,
                    ..base
                },
            ));
        }
    }
    out.push((
        "k4v2 key group 32 rotated".into(),
        LogQuantConfig {
            key_bits: Some(4),
            value_bits: Some(2),
            key_group_size: Some(32),
            rotate: true,
            ..base
        },
    ));
    out.push((
        "k3v2 per-token keys, key group 32, rotated".into(),
        LogQuantConfig {
            key_bits: Some(3),
            value_bits: Some(2),
            key_grouping: KeyGrouping::PerToken,
            key_group_size: Some(32),
            rotate: true,
            ..base
        },
    ));
    out.push((
        "the default (k4v2, keys per channel over 64 tokens, rotated, G=64)".into(),
        LogQuantConfig {
            window: 4,
            kernel: AttentionKernel::Portable,
            ..LogQuantConfig::default()
        },
    ));
    out.push((
        "k3v2, keys per channel over 128 tokens, rotated, G=64".into(),
        LogQuantConfig {
            window: 4,
            key_bits: Some(3),
            key_group_size: Some(128),
            kernel: AttentionKernel::Portable,
            ..LogQuantConfig::default()
        },
    ));
    out.push((
        "2-bit G=64, policy none".into(),
        LogQuantConfig {
            group_size: 64,
            policy: PolicyKind::None,
            ..base
        },
    ));
    out
}

/// The same prefill, chunk and decode steps through a host-path cache (portable and fused)
/// and a device-path cache: identical chunks (bytes, scales, positions), identical rows
/// handed out (to f32 rounding where blocks are rotated back), attention outputs equal to float
/// tolerance.
#[test]
fn device_path_equals_the_host_path_for_every_setting() {
    for (label, config) in settings() {
        let config = config.validate().unwrap();
        let batch = 2;
        let mut rng = ChaCha8Rng::seed_from_u64(0xD1CE);
        let mut portable = LogQuantCache::new(config, 10_000);
        let mut fused = LogQuantCache::new(
            LogQuantConfig {
                kernel: AttentionKernel::Fused,
                ..config
            },
            10_000,
        );
        let mut device = LogQuantCache::with_quant_path(config, 10_000, QuantPath::Device);
        // Prefill 37, a chunk of 11 after it, then 150 decode steps: several compressions,
        // whole per-channel key groups (of 16, 32 and 128 tokens) and a staged remainder.
        let mut cached = 0;
        let mut worst_portable = 0f32;
        let mut worst_fused = 0f32;
        for (step, new) in [37usize, 11].into_iter().chain([1; 150]).enumerate() {
            let q = random(&mut rng, (batch, Q_HEADS, new, DIM));
            let k = random(&mut rng, (batch, KV_HEADS, new, DIM));
            let v = random(&mut rng, (batch, KV_HEADS, new, DIM));
            let mask = (new > 1).then(|| causal(cached, new));
            let mut outs = Vec::new();
            for cache in [&mut portable, &mut fused] {
                let out = cache
                    .append_and_attend(&q, &k, &v, mask.as_ref(), &params(), &engine)
                    .unwrap_or_else(|e| panic!("{label}: step {step}: {e}"));
                outs.push(host(&out));
            }
            let out = device
                .append_and_attend(
                    &on_device(&q),
                    &on_device(&k),
                    &on_device(&v),
                    mask.as_ref().map(on_device).as_ref(),
                    &params(),
                    &engine,
                )
                .unwrap_or_else(|e| panic!("{label}: step {step}: device path: {e}"));
            outs.push(host(&out));
            let (d, i) = max_diff(&outs[2], &outs[0], &label);
            worst_portable = worst_portable.max(d);
            assert!(
                d <= 1e-5,
                "{label}: step {step}: device vs host portable {d} at {i}"
            );
            let (d, i) = max_diff(&outs[2], &outs[1], &label);
            worst_fused = worst_fused.max(d);
            assert!(
                d <= 1e-4,
                "{label}: step {step}: device vs fused {d} at {i}"
            );
            cached += new;
        }
        // The stored chunks: the device quantizer's bytes are the reference's.
        for (b, (h, d)) in portable.rows().iter().zip(device.rows()).enumerate() {
            assert!(d.on_device_path() && !h.on_device_path());
            assert_eq!(
                h.chunks().len(),
                d.chunks().len(),
                "{label}: row {b}: chunks"
            );
            assert!(!d.chunks().is_empty(), "{label}: nothing was quantized");
            for (i, (hc, dc)) in h.chunks().iter().zip(d.chunks()).enumerate() {
                assert_eq!(hc.positions, dc.positions, "{label}: chunk {i}: positions");
                for (which, hb, db) in [("keys", &hc.k, &dc.k), ("values", &hc.v, &dc.v)] {
                    let (hr, dr) = (hb.to_reference().unwrap(), db.to_reference().unwrap());
                    assert!(
                        hr == dr,
                        "{label}: row {b} chunk {i} {which}: device bytes differ from the \
                         reference's (first differing byte {:?})",
                        hr.codes.iter().zip(&dr.codes).position(|(x, y)| x != y)
                    );
                }
            }
            assert_eq!(h.bytes(), d.bytes(), "{label}: bytes");
        }
        // Rows handed to the engine in position order: identical, except that rotated blocks
        // are rotated back by a matrix product on the device (equal to f32 rounding).
        let (hk, hv) = portable.materialize().unwrap().unwrap();
        let (dk, dv) = device.materialize().unwrap().unwrap();
        for (which, h, d) in [("keys", &hk, &dk), ("values", &hv, &dv)] {
            let (diff, i) = max_diff(&host(h), &host(d), &label);
            let bound = if config.rotate { 1e-5 } else { 0.0 };
            assert!(
                diff <= bound,
                "{label}: {which} in position order differ by {diff} at {i}"
            );
        }
        assert_eq!(portable.usage(), device.usage(), "{label}: usage");
        println!(
            "{label}: largest difference vs portable {worst_portable:e}, vs fused {worst_fused:e}"
        );
    }
    assert_eq!(device_path_host_reads(), 0);
}

/// Through `append` (models that mask themselves): the device path hands out the same rows as
/// the host path, in position order with the new rows exact.
#[test]
fn append_on_the_device_path_equals_the_host_path() {
    let config = LogQuantConfig {
        window: 4,
        group_size: 16,
        ..LogQuantConfig::paper()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut host_cache = LogQuantCache::new(config, 1000);
    let mut device = LogQuantCache::with_quant_path(config, 1000, QuantPath::Device);
    for new in [30usize, 7].into_iter().chain([1; 40]) {
        let k = random(&mut rng, (1, KV_HEADS, new, DIM));
        let v = random(&mut rng, (1, KV_HEADS, new, DIM));
        let (hk, hv) = host_cache.append(&k, &v).unwrap();
        let (dk, dv) = device.append(&on_device(&k), &on_device(&v)).unwrap();
        assert_eq!(host(&hk), host(&dk));
        assert_eq!(host(&hv), host(&dv));
    }
    assert!(device.usage().quantized_tokens > 0);
    assert_eq!(device_path_host_reads(), 0);
}

/// Clone-in / clone-out on the device path shares the quantized tensors, as on the host path.
#[test]
fn device_chunks_are_shared_between_clones() {
    let config = LogQuantConfig {
        window: 4,
        group_size: 16,
        ..LogQuantConfig::paper()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut a = LogQuantCache::with_quant_path(config, 1000, QuantPath::Device);
    let mut b = LogQuantCache::with_quant_path(config, 1000, QuantPath::Device);
    for cache in [&mut a, &mut b] {
        let k = on_device(&random(&mut rng, (1, KV_HEADS, 40, DIM)));
        cache.append(&k, &k).unwrap();
    }
    let batch = a.cat_batch(&[&b]).unwrap();
    let parts = batch.split_batch(2).unwrap();
    for (part, original) in parts.iter().zip([&a, &b]) {
        let part = part.as_any().downcast_ref::<LogQuantCache>().unwrap();
        let (p, o) = (&part.rows()[0], &original.rows()[0]);
        assert!(!o.chunks().is_empty());
        assert!(p
            .chunks()
            .iter()
            .zip(o.chunks())
            .all(|(x, y)| std::sync::Arc::ptr_eq(x, y)));
        assert_eq!(p.quant_path(), QuantPath::Device);
    }
    assert_eq!(device_path_host_reads(), 0);
}

/// The fused CPU kernel refuses a store on the device path (on CUDA it could not read it).
#[test]
fn the_fused_kernel_refuses_device_path_stores() {
    let config = LogQuantConfig {
        window: 4,
        group_size: 16,
        ..LogQuantConfig::paper()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut device = LogQuantCache::with_quant_path(config, 1000, QuantPath::Device);
    let k = random(&mut rng, (1, KV_HEADS, 40, DIM));
    device.append(&k, &k).unwrap();
    let q = random(&mut rng, (1, Q_HEADS, 1, DIM));
    let err = mistralrs_logquant::kernels::cpu::attend_decode(&q, device.rows(), SCALE)
        .expect_err("fused kernel over a device-path store");
    assert!(err.to_string().contains("device path"), "{err}");
}

/// No counted host transfer per step: after the first prefill (which uploads the device's
/// constants once), decode steps make no counted upload: through `append_and_attend` (layout
/// order) not even at a compression; through `append` (position order every step) only the
/// position index, once per compression. What is counted ([`uploads_on_this_thread`]): the
/// uploads the cache marks with `note_upload()` where it makes them (the per-device constants,
/// the position index, the Hadamard matrix, host-quantized blocks, the position-order base);
/// an upload made elsewhere would not be counted. Host *reads* are checked independently:
/// every test here ends with [`device_path_host_reads`] at zero.
#[test]
fn decode_steps_make_no_counted_upload_to_the_device() {
    let config = LogQuantConfig {
        window: 4,
        group_size: 16,
        kernel: AttentionKernel::Portable,
        ..LogQuantConfig::paper()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut attend = LogQuantCache::with_quant_path(config, 1000, QuantPath::Device);
    let mut append = LogQuantCache::with_quant_path(config, 1000, QuantPath::Device);
    let k = on_device(&random(&mut rng, (1, KV_HEADS, 40, DIM)));
    let q = on_device(&random(&mut rng, (1, Q_HEADS, 40, DIM)));
    attend
        .append_and_attend(
            &q,
            &k,
            &k,
            Some(&on_device(&causal(0, 40))),
            &params(),
            &engine,
        )
        .unwrap();
    append.append(&k, &k).unwrap();
    append
        .append(&k.narrow(2, 0, 1).unwrap(), &k.narrow(2, 0, 1).unwrap())
        .unwrap();
    let quantized_before = append.usage().quantized_tokens;
    let mut append_uploads = 0;
    for step in 0..64 {
        // Made on the device before counting: the test's own inputs are not the store's uploads.
        let q = on_device(&random(&mut rng, (1, Q_HEADS, 1, DIM)));
        let k = on_device(&random(&mut rng, (1, KV_HEADS, 1, DIM)));
        let before = uploads_on_this_thread();
        attend
            .append_and_attend(&q, &k, &k, None, &params(), &engine)
            .unwrap();
        assert_eq!(
            uploads_on_this_thread(),
            before,
            "step {step}: append_and_attend uploaded"
        );
        let before = uploads_on_this_thread();
        append.append(&k, &k).unwrap();
        let uploads = uploads_on_this_thread() - before;
        assert!(uploads <= 1, "step {step}: {uploads} uploads");
        append_uploads += uploads;
    }
    // One position index per compression (W = 4 tokens leave full precision each time).
    let compressions = (append.usage().quantized_tokens - quantized_before) / 4;
    assert!(compressions >= 10, "{compressions} compressions");
    assert!(
        append_uploads <= compressions + 1,
        "{append_uploads} uploads for {compressions} compressions"
    );
    assert_eq!(device_path_host_reads(), 0);
}
