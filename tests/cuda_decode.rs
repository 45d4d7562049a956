//! The fused CUDA decode attention (`src/kernels/cuda/`) against the host reference attention
//! ([`naive_attention`] over the same cache built on the CPU by the scalar reference quantizer,
//! whose bytes the device quantizer reproduces exactly: `tests/device_store.rs`), and against
//! the `.cu`'s own reference kernels.
//!
//! Needs a CUDA device: without one (`Device::new_cuda(0)` fails) each test prints why and
//! returns. Built by `scripts/build-cuda.sh --test cuda_decode`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use mistralrs_core::kv_cache_backend::{stock_attention, AttentionParams, KvCacheBackend};
use mistralrs_logquant::backend::LogQuantCache;
use mistralrs_logquant::config::{AttentionKernel, KeyGrouping, LogQuantConfig, PolicyKind};
use mistralrs_logquant::kernels::cuda::{attend_decode, reference_decode_attention};
use mistralrs_logquant::kernels::reference::{max_abs_diff, naive_attention, AttnShape};
use mistralrs_logquant::store::device_path_host_reads;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const Q_HEADS: usize = 8;
const KV_HEADS: usize = 2;
const DIM: usize = 128;
const SCALE: f32 = 0.088;
/// Largest difference from the host reference, relative to the reference's largest magnitude:
/// f32 accumulation in another order (spans, exp2) over identical codes and scales.
const REL_TOL: f32 = 2e-3;

fn cuda() -> Option<Device> {
    // The backend takes the fused kernel on CUDA only when asked (it is opt-in until it has
    // passed on a GPU); read once per process, so set before the first cache attends.
    std::env::set_var(mistralrs_logquant::kernels::cuda::ENABLE_ENV, "1");
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        // On the GPU machine (scripts/device-check.sh) a missing device is a failure.
        Err(e) if std::env::var_os("MISTRALRS_LOGQUANT_REQUIRE_CUDA").is_some() => {
            panic!("MISTRALRS_LOGQUANT_REQUIRE_CUDA is set but there is no CUDA device: {e}")
        }
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
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

fn engine(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    stock_attention(q, k, v, mask, &params())
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Uniform in [-1, 1), with an outlier channel as real keys have.
fn random(rng: &mut ChaCha8Rng, dims: (usize, usize, usize, usize)) -> Tensor {
    let n = dims.0 * dims.1 * dims.2 * dims.3;
    let data: Vec<f32> = (0..n)
        .map(|i| {
            let x = rng.random::<f32>() * 2.0 - 1.0;
            if i % DIM == 5 {
                6.0 * x
            } else {
                x
            }
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

/// Encodings the kernels cover: every width, both key groupings, separate widths, rotation,
/// key group sizes, policies.
fn settings() -> Vec<(String, LogQuantConfig)> {
    let base = LogQuantConfig {
        window: 8,
        group_size: 32,
        kernel: AttentionKernel::Fused,
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
        "the default (k4v2, keys per channel over 64 tokens, rotated, G=64)".into(),
        LogQuantConfig {
            kernel: AttentionKernel::Fused,
            ..LogQuantConfig::default()
        },
    ));
    out.push((
        "k3v2 per-token keys, key group 64, rotated".into(),
        LogQuantConfig {
            key_bits: Some(3),
            value_bits: Some(2),
            key_grouping: KeyGrouping::PerToken,
            key_group_size: Some(64),
            rotate: true,
            ..base
        },
    ));
    out.push((
        "k4v2 keys per channel over 16 tokens".into(),
        LogQuantConfig {
            key_bits: Some(4),
            value_bits: Some(2),
            key_group_size: Some(16),
            ..base
        },
    ));
    out.push((
        "2-bit, policy none".into(),
        LogQuantConfig {
            policy: PolicyKind::None,
            ..base
        },
    ));
    out
}

/// Largest difference relative to the reference's largest magnitude, with the index; panics
/// on a non-finite value.
fn rel_diff(got: &[f32], want: &[f32], label: &str) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "{label}: lengths");
    let (diff, at, finite) = max_abs_diff(got, want);
    assert!(
        finite,
        "{label}: a non-finite output (largest difference at {at})"
    );
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    (diff / scale, at)
}

/// Prefill then decode steps through a CUDA cache (fused kernel) and the same cache on the CPU
/// (scalar reference quantizer); at each decode step the CUDA output must be the host reference
/// attention over the CPU cache, and the fused kernel must actually have run.
fn check(device: &Device, dtype: DType, batch: usize, decode_steps: usize) {
    for (label, config) in settings() {
        let label = format!("{label}, {dtype:?}, batch {batch}");
        let config = config.validate().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0xC0DA);
        let mut gpu = LogQuantCache::new(config, 100_000);
        let mut cpu = LogQuantCache::new(
            LogQuantConfig {
                kernel: AttentionKernel::Portable,
                ..config
            },
            100_000,
        );
        let mut worst = (0f32, 0f32);
        // A prefill of 301 tokens (ragged against span and tile sizes), then decode.
        for (step, new) in [301usize]
            .into_iter()
            .chain([1; 64])
            .take(1 + decode_steps)
            .enumerate()
        {
            let q = random(&mut rng, (batch, Q_HEADS, new, DIM));
            let k = random(&mut rng, (batch, KV_HEADS, new, DIM));
            let v = random(&mut rng, (batch, KV_HEADS, new, DIM));
            let to_gpu = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(device).unwrap();
            if new > 1 {
                gpu.append(&to_gpu(&k), &to_gpu(&v)).unwrap();
                cpu.append(&k.to_dtype(dtype).unwrap(), &v.to_dtype(dtype).unwrap())
                    .unwrap();
                continue;
            }
            let out = gpu
                .append_and_attend(
                    &to_gpu(&q),
                    &to_gpu(&k),
                    &to_gpu(&v),
                    None,
                    &params(),
                    &engine,
                )
                .unwrap_or_else(|e| panic!("{label}: step {step}: {e}"));
            cpu.append(&k.to_dtype(dtype).unwrap(), &v.to_dtype(dtype).unwrap())
                .unwrap();
            // The fused kernel takes this batch (no silent fallback to the portable path) and
            // is what `append_and_attend` returned.
            let q_dev = to_gpu(&q);
            let fused = attend_decode(&q_dev, gpu.rows(), SCALE)
                .unwrap()
                .unwrap_or_else(|| panic!("{label}: the fused CUDA kernel refused the batch"));
            assert_eq!(fused.dims(), q.dims(), "{label}: output shape");
            assert_eq!(fused.dtype(), dtype, "{label}: output dtype");
            let (d, i) = rel_diff(&host(&out), &host(&fused), &label);
            assert!(
                d == 0.0,
                "{label}: step {step}: append_and_attend is not the fused kernel ({d} at {i})"
            );
            // Against the references in f32 (queries rounded to the activation dtype first),
            // so that the output's rounding to bf16 is not counted.
            let q_dev = q_dev.to_dtype(DType::F32).unwrap();
            let fused = host(&attend_decode(&q_dev, gpu.rows(), SCALE).unwrap().unwrap());
            // The host reference: textbook attention over the CPU cache's rows.
            let (hk, hv) = cpu.materialize().unwrap().unwrap();
            let len = hk.dim(2).unwrap();
            let shape = AttnShape {
                batch,
                q_heads: Q_HEADS,
                kv_heads: KV_HEADS,
                queries: 1,
                cached: len - 1,
                dim: DIM,
            };
            let q_in = host(&q.to_dtype(dtype).unwrap());
            let want = naive_attention(&q_in, &host(&hk), &host(&hv), shape, SCALE);
            let (d, i) = rel_diff(&fused, &want, &label);
            worst.0 = worst.0.max(d);
            assert!(
                d <= REL_TOL,
                "{label}: step {step}: fused vs host reference {d:e} at {i}"
            );
            // The `.cu`'s reference kernels, on the device.
            let reference = host(&reference_decode_attention(&q_dev, gpu.rows(), SCALE).unwrap());
            let (d, i) = rel_diff(&reference, &want, &label);
            worst.1 = worst.1.max(d);
            assert!(
                d <= REL_TOL,
                "{label}: step {step}: CUDA reference vs host reference {d:e} at {i}"
            );
        }
        println!(
            "{label}: largest relative difference: fused {:e}, CUDA reference {:e}",
            worst.0, worst.1
        );
    }
    assert_eq!(device_path_host_reads(), 0);
}

#[test]
fn fused_cuda_decode_equals_the_host_reference_f32() {
    let Some(device) = cuda() else { return };
    check(&device, DType::F32, 3, 40);
}

#[test]
fn fused_cuda_decode_equals_the_host_reference_bf16_batch_1() {
    let Some(device) = cuda() else { return };
    check(&device, DType::BF16, 1, 20);
}

#[test]
fn fused_cuda_decode_equals_the_host_reference_f16_gqa_batch_5() {
    let Some(device) = cuda() else { return };
    check(&device, DType::F16, 5, 10);
}
