//! The device path end to end: SmolLM2 through mistral.rs with the device path forced on the
//! CPU (what CUDA and Metal run) against the host path. Unit-level comparisons are in
//! `device_store.rs`.

use mistralrs_logquant::config::{AttentionKernel, LogQuantConfig};
use mistralrs_logquant::packed::device_quantizations;
use mistralrs_logquant::store::device_path_host_reads;

/// End to end on SmolLM2 (f32 weights on the CPU): teacher-forced decoding through the whole
/// engine with the device path forced (`MISTRALRS_LOGQUANT_DEVICE_PATH=1`, read when the
/// engine registers the backend) gives the same log-probabilities as the host path's portable
/// kernel, with tokens quantized (W=4, G=16), and no store reads to the host. (Alone in its
/// file: the variable and the process-wide counters are not shared with another test.)
#[tokio::test(flavor = "multi_thread")]
async fn smollm2_scores_equal_on_the_device_path() {
    use mistralrs_logquant::engine::{build_engine, EngineOptions, KvCacheChoice};
    use mistralrs_logquant::generate::{score_teacher_forced, tokenize};
    use mistralrs_logquant::model_source::ModelSource;

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/kjv_genesis_exodus.txt"
    ))
    .expect("../shared/data/kjv_genesis_exodus.txt");
    let config = LogQuantConfig {
        window: 4,
        group_size: 16,
        kernel: AttentionKernel::Portable,
        ..LogQuantConfig::paper()
    };
    let model = ModelSource::default_model().expect("default model");
    let mut runs = Vec::new();
    for forced in [false, true] {
        // Edition 2021: `set_var` is safe; no other test here reads the variable.
        if forced {
            std::env::set_var("MISTRALRS_LOGQUANT_DEVICE_PATH", "1");
        } else {
            std::env::remove_var("MISTRALRS_LOGQUANT_DEVICE_PATH");
        }
        let options = EngineOptions::new(model.clone(), KvCacheChoice::LogQuant(config));
        let engine = build_engine(&options).await.expect("engine");
        std::env::remove_var("MISTRALRS_LOGQUANT_DEVICE_PATH");
        let quantized_before = device_quantizations();
        let tokens = tokenize(&engine, &text[20_000..24_000]).await.unwrap();
        let steps = score_teacher_forced(
            &engine,
            tokens[..48].to_vec(),
            tokens[48..96].to_vec(),
            true,
        )
        .await
        .expect("scoring");
        // The device quantizer ran exactly when the path was forced.
        assert_eq!(
            device_quantizations() > quantized_before,
            forced,
            "forced {forced}"
        );
        runs.push(steps);
    }
    let mut worst = 0f32;
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        let (p, q) = (
            a.distribution.as_ref().unwrap(),
            b.distribution.as_ref().unwrap(),
        );
        for (x, y) in p.iter().zip(q) {
            worst = worst.max((x - y).abs());
        }
        assert_eq!(a.argmax, b.argmax);
    }
    println!("largest log-probability difference, host vs device path: {worst:e}");
    assert!(worst <= 1e-5, "largest log-probability difference {worst}");
    assert_eq!(device_path_host_reads(), 0);
}
