//! The pluggable-backend seam, end to end on SmolLM2-135M with the real engine: the pass-through
//! backend reproduces the default cache token for token (single and batched requests), the
//! unselected engine is stock, byte counts match the analytic sizes, and a backend that refuses
//! rewinds makes prefix-cache reuse skip instead of producing wrong output.
//!
//! The weights run as f32 (`--weights auto` on the CPU): batched and single decoding, and
//! runs whose batches formed differently, then differ by rounding only, which the Q4_1 path
//! (8-bit activations) can turn into a different token.

mod common;

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Result, Tensor};
use common::*;
use mistralrs_core::kv_cache_backend::{
    register_kv_cache_backend, AttentionParams, EngineAttention, KvCacheBackend,
    KvCacheBackendFactory, LayerUsage,
};
use mistralrs_core::{CustomLogitsProcessor, MistralRs};
use mistralrs_logquant::engine::KvCacheChoice;
use mistralrs_logquant::generate::{
    finished_sequences, generate_greedy, submit, submit_greedy, usage_of_next_finished,
};
use mistralrs_logquant::passthrough::PassthroughCache;

const NEW_TOKENS: usize = 64;

/// Counts what the engine asks of a backend; delegates to the pass-through cache. With
/// `refuse_rewind` it refuses any length change, like a quantized cache must.
#[derive(Debug, Clone)]
struct Probe {
    inner: PassthroughCache,
    refuse_rewind: bool,
}

/// Multi-sequence clone-ins (`cat_batch`) and attention calls on a batch of 2+ sequences.
static MULTI_BATCHES: AtomicUsize = AtomicUsize::new(0);
static BATCHED_ATTENTION: AtomicUsize = AtomicUsize::new(0);
static REFUSED_REWINDS: AtomicUsize = AtomicUsize::new(0);

struct ProbeFactory {
    name: &'static str,
    refuse_rewind: bool,
}

impl KvCacheBackendFactory for ProbeFactory {
    fn name(&self) -> &str {
        self.name
    }
    fn create(&self, _layer: usize, max_seq_len: usize) -> Box<dyn KvCacheBackend> {
        Box::new(Probe {
            inner: PassthroughCache::new(max_seq_len),
            refuse_rewind: self.refuse_rewind,
        })
    }
}

fn unwrap_probe(b: &dyn KvCacheBackend) -> &Probe {
    b.as_any().downcast_ref::<Probe>().expect("probe")
}

impl KvCacheBackend for Probe {
    fn append_and_attend(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        params: &AttentionParams,
        engine: &EngineAttention<'_>,
    ) -> Result<Tensor> {
        if k.dims()[0] > 1 {
            BATCHED_ATTENTION.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.append_and_attend(q, k, v, mask, params, engine)
    }
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inner.append(k, v)
    }
    fn materialize(&self) -> Result<Option<(Tensor, Tensor)>> {
        self.inner.materialize()
    }
    fn seq_len(&self) -> usize {
        self.inner.seq_len()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn try_set_len(&self, len: usize) -> Result<()> {
        if self.refuse_rewind && len != self.seq_len() {
            REFUSED_REWINDS.fetch_add(1, Ordering::SeqCst);
            candle_core::bail!("probe: refusing to set length {len}");
        }
        self.inner.try_set_len(len)
    }
    fn set_len(&mut self, len: usize) -> Result<()> {
        self.try_set_len(len)?;
        self.inner.set_len(len)
    }
    fn box_clone(&self) -> Box<dyn KvCacheBackend> {
        Box::new(self.clone())
    }
    fn cat_batch(&self, rest: &[&dyn KvCacheBackend]) -> Result<Box<dyn KvCacheBackend>> {
        MULTI_BATCHES.fetch_add(1, Ordering::SeqCst);
        let inner_rest: Vec<&dyn KvCacheBackend> = rest
            .iter()
            .map(|b| &unwrap_probe(*b).inner as &dyn KvCacheBackend)
            .collect();
        let batched = self.inner.cat_batch(&inner_rest)?;
        let inner = batched
            .as_any()
            .downcast_ref::<PassthroughCache>()
            .expect("pass-through")
            .clone();
        Ok(Box::new(Probe {
            inner,
            refuse_rewind: self.refuse_rewind,
        }))
    }
    fn split_batch(&self, n: usize) -> Result<Vec<Box<dyn KvCacheBackend>>> {
        Ok(self
            .inner
            .split_batch(n)?
            .into_iter()
            .map(|part| {
                let inner = part
                    .as_any()
                    .downcast_ref::<PassthroughCache>()
                    .expect("pass-through")
                    .clone();
                Box::new(Probe {
                    inner,
                    refuse_rewind: self.refuse_rewind,
                }) as Box<dyn KvCacheBackend>
            })
            .collect())
    }
    fn usage(&self) -> LayerUsage {
        self.inner.usage()
    }
    fn device(&self) -> Option<Device> {
        self.inner.device()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn register_probes() {
    register_kv_cache_backend(Arc::new(ProbeFactory {
        name: "probe",
        refuse_rewind: false,
    }));
    register_kv_cache_backend(Arc::new(ProbeFactory {
        name: "probe-no-rewind",
        refuse_rewind: true,
    }));
}

/// Holds the engine inside one step: the logits processor of a short request, which the
/// engine runs inside its step, reports that it was entered and then waits until the test
/// opens it (or drops the key, so a failing test never leaves the engine stuck).
struct Gate {
    entered: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    open: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl CustomLogitsProcessor for Gate {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> Result<Tensor> {
        if let Some(entered) = self.entered.lock().unwrap().take() {
            let _ = entered.send(());
        }
        let _ = self.open.lock().unwrap().recv();
        Ok(logits.clone())
    }
}

/// Greedy tokens for `prompts`, all waiting for the same scheduling pass of the engine: they
/// are queued while a [`Gate`] holds the engine inside a step, and the engine reads its queue
/// only between steps. So every run sees the same schedule; no timing is involved.
async fn generate_together(
    engine: &MistralRs,
    prompts: Vec<Vec<u32>>,
    suppressed: &[u32],
) -> Vec<Vec<u32>> {
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let (key, open) = std::sync::mpsc::channel();
    let gate = Arc::new(Gate {
        entered: Mutex::new(Some(entered_tx)),
        open: Mutex::new(open),
    });
    // Two tokens: a request that ends at its first token is released a step late (see
    // `generate::Submitted::finish`).
    let gate_request = submit(engine, prompts[0][..1].to_vec(), 2, gate)
        .await
        .expect("gate request");
    entered.await.expect("the engine ran the gate's step");
    let mut queued = Vec::new();
    for prompt in prompts {
        queued.push(
            submit_greedy(engine, prompt, NEW_TOKENS, suppressed)
                .await
                .expect("queue"),
        );
    }
    // Open the gate, and keep it open: dropping the key lets any later call through.
    key.send(()).expect("the gate is waiting");
    drop(key);
    gate_request.finish().await.expect("gate request");
    let mut tokens = Vec::new();
    for request in futures::future::join_all(queued.into_iter().map(|r| r.tokens())).await {
        tokens.push(request.expect("generate"));
    }
    tokens
}

/// Greedy tokens for each prompt: one request at a time, then each group of prompts admitted
/// together ([`generate_together`]).
async fn run_all(
    cache: KvCacheChoice,
    prompts: &[Vec<u32>],
    groups: &[Vec<usize>],
) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let engine = engine(cache).await;
    let suppressed = suppressed();
    let mut single = Vec::new();
    for p in prompts {
        single.push(
            generate_greedy(&engine, p.clone(), NEW_TOKENS, &suppressed)
                .await
                .expect("generate"),
        );
    }
    // Batch composition changes floating-point results (GEMMs round differently with the
    // batch size), so every cache must see the same schedule: each group is admitted at once.
    let mut concurrent = vec![Vec::new(); prompts.len()];
    for group in groups {
        let group_prompts = group.iter().map(|&i| prompts[i].clone()).collect();
        let results = generate_together(&engine, group_prompts, &suppressed).await;
        for (&i, tokens) in group.iter().zip(results) {
            concurrent[i] = tokens;
        }
    }
    (single, concurrent)
}

fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_backend_matches_the_default_cache_token_for_token() {
    register_probes();
    let tokenizer_engine = engine(KvCacheChoice::Default).await;
    let mut prompts = Vec::new();
    for text in passages() {
        prompts.push(tokens(&tokenizer_engine, &text).await);
    }
    drop(tokenizer_engine);
    let distinct_lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(
        distinct_lengths.windows(2).all(|w| w[0] != w[1]),
        "prompts must differ in length: {distinct_lengths:?}"
    );
    // Two more prompts of equal length and different content: the scheduler batches only
    // sequences of equal length, so these run as one batch of 2 through clone-in / clone-out.
    let n = prompts[0].len();
    prompts.push(prompts[1][..n].to_vec());
    prompts.push(prompts[2][..n].to_vec());
    let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let groups = vec![vec![0, 1, 2], vec![3, 4]];

    let (default_single, default_concurrent) =
        run_all(KvCacheChoice::Default, &prompts, &groups).await;
    let (pass_single, pass_concurrent) =
        run_all(KvCacheChoice::passthrough(), &prompts, &groups).await;
    let batches_before = MULTI_BATCHES.load(Ordering::SeqCst);
    let attention_before = BATCHED_ATTENTION.load(Ordering::SeqCst);
    let (probe_single, probe_concurrent) =
        run_all(KvCacheChoice::Backend("probe".into()), &prompts, &groups).await;
    let batched = MULTI_BATCHES.load(Ordering::SeqCst) - batches_before;
    let batched_attention = BATCHED_ATTENTION.load(Ordering::SeqCst) - attention_before;

    for i in 0..prompts.len() {
        assert_eq!(default_single[i].len(), NEW_TOKENS);
        for (label, got, reference) in [
            ("pass-through, single", &pass_single[i], &default_single[i]),
            ("probe, single", &probe_single[i], &default_single[i]),
            (
                "pass-through, concurrent",
                &pass_concurrent[i],
                &default_concurrent[i],
            ),
            (
                "probe, concurrent",
                &probe_concurrent[i],
                &default_concurrent[i],
            ),
        ] {
            assert_eq!(
                got,
                reference,
                "prompt {i} ({} tokens), {label}: first difference at token {:?}",
                lengths[i],
                first_difference(got, reference)
            );
        }
        // Concurrent and single runs may part ways after a near-tie (batched GEMMs round
        // differently), but never at once: that was a real batching bug (rows mixed up).
        let agree =
            first_difference(&default_concurrent[i], &default_single[i]).unwrap_or(NEW_TOKENS);
        assert!(
            agree >= 8,
            "prompt {i}: batched run differs from single at token {agree}"
        );
    }
    // The engine clones caches in only when the batch changes, and out after every step.
    assert!(
        batched >= 30,
        "no multi-sequence clone-in reached the backend"
    );
    // 30 layers x (prefill + NEW_TOKENS - 1 decode steps) of the equal-length pair.
    assert!(
        batched_attention >= 30 * NEW_TOKENS,
        "the equal-length requests ran as a batch in only {batched_attention} layer steps"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_bytes_match_the_analytic_size_for_both_caches() {
    let prompt_len = 100;
    let new_tokens = 20;
    for cache in [KvCacheChoice::Default, KvCacheChoice::passthrough()] {
        let engine = engine(cache.clone()).await;
        let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| 1000 + i).collect();
        let finished = finished_sequences();
        generate_greedy(&engine, prompt, new_tokens, &suppressed())
            .await
            .expect("generate");
        let usage = usage_of_next_finished(finished)
            .await
            .expect("a finished sequence was recorded");
        // The last sampled token is never fed back, so it is not cached.
        let cached = prompt_len + new_tokens - 1;
        let expected = cached * smollm2_dense_bytes_per_token(4);
        eprintln!(
            "{}: {} tokens cached, {} bytes ({} per token); analytic f32 size {}",
            cache.name(),
            usage.tokens,
            usage.bytes,
            usage.bytes / usage.tokens.max(1),
            expected
        );
        assert_eq!(usage.tokens, cached, "{}", cache.name());
        assert_eq!(usage.bytes, expected, "{}", cache.name());
        assert_eq!(usage.dense_bytes, expected, "{}", cache.name());
        assert_eq!(usage.quantized_tokens, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_reuse_is_skipped_when_the_backend_refuses_to_rewind() {
    register_probes();
    let suppressed = suppressed();
    let first: Vec<u32> = (0..48u32).map(|i| 2000 + 7 * i).collect();
    // Shares 32 tokens with `first`, so reusing its cache needs a rewind from 55 to 32 tokens.
    let mut second: Vec<u32> = first[..32].to_vec();
    second.extend((0..9u32).map(|i| 9000 + i));

    let reference = {
        let engine = engine(KvCacheChoice::Default).await;
        generate_greedy(&engine, second.clone(), 16, &suppressed)
            .await
            .expect("reference")
    };

    let engine = engine_with(KvCacheChoice::Backend("probe-no-rewind".into()), |o| {
        o.prefix_cache_n = Some(16)
    })
    .await;
    generate_greedy(&engine, first, 8, &suppressed)
        .await
        .expect("first request");
    let refused_before = REFUSED_REWINDS.load(Ordering::SeqCst);
    let got = generate_greedy(&engine, second, 16, &suppressed)
        .await
        .expect("second request");
    let refused = REFUSED_REWINDS.load(Ordering::SeqCst) - refused_before;
    assert!(refused > 0, "the prefix cacher never asked for a rewind");
    assert_eq!(
        got,
        reference,
        "output after a refused rewind differs from a fresh run at token {:?}",
        first_difference(&got, &reference)
    );
}

/// A request that ends at its first token is released with its answer. mistral.rs 0.8.1 set
/// every sequence running again after its prompt step, so such a sequence ran one step more and
/// stayed live, cache and all, until the engine next had work (fixed by the patch). Oracle: the
/// released sequence's cache holds exactly the prompt (the extra step would have added the
/// sampled token), and nothing is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_token_request_is_released_with_its_answer() {
    let engine = engine(KvCacheChoice::passthrough()).await;
    let prompt: Vec<u32> = (0..20u32).map(|i| 1000 + 3 * i).collect();
    let finished = finished_sequences();
    let tokens = generate_greedy(&engine, prompt.clone(), 1, &suppressed())
        .await
        .expect("one token");
    assert_eq!(tokens.len(), 1);
    let usage = usage_of_next_finished(finished)
        .await
        .expect("the one-token sequence is still live after its answer");
    assert_eq!(usage.tokens, prompt.len(), "{usage:?}");
    assert_eq!(
        mistralrs_core::kv_cache_backend::kv_cache_usage().live_sequences,
        0
    );
}
