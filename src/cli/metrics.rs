//! `GET /metrics`: the KV-cache figures of `GET /v1/kv-cache` and the requests served, in
//! Prometheus's text format (the `prometheus` crate's registry and encoder).
//!
//! The KV-cache figures are read from mistral.rs's usage book
//! ([`kv_cache_usage`](mistralrs_core::kv_cache_backend::kv_cache_usage)) at each scrape, the
//! same snapshot `/v1/kv-cache` reports; requests are counted by a middleware around every
//! route, by matched route and status.

use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use mistralrs_core::kv_cache_backend::{
    kv_admission_stats, kv_cache_usage, prefix_cache_stats, KvCacheUsage,
};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use mistralrs_logquant::engine::{CacheLayers, KvCacheChoice};

/// Every metric's name starts with this.
pub const NAMESPACE: &str = "mistralrs_logquant";

/// The content type of Prometheus's text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    live_sequences: IntGauge,
    live_tokens: IntGauge,
    live_full_precision_tokens: IntGauge,
    live_quantized_tokens: IntGauge,
    live_bytes: IntGauge,
    live_default_cache_bytes: IntGauge,
    peak_live_bytes: IntGauge,
    finished_sequences: IntCounter,
    prefix_cache_entries: IntGauge,
    prefix_cache_bytes: IntGauge,
    prefix_cache_hits: IntCounter,
    prefix_cache_reused_tokens: IntCounter,
    kv_memory_budget_bytes: IntGauge,
    kv_memory_reserved_bytes: IntGauge,
    kv_memory_waiting_requests: IntGauge,
    kv_memory_admitted: IntCounter,
    /// Serializes scrapes: the finished-sequence counter is advanced to the book's count.
    scrape: Mutex<()>,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::with_opts(Opts::new(name, help).namespace(NAMESPACE))
        .expect("valid metric name");
    registry
        .register(Box::new(counter.clone()))
        .expect("metric registered once");
    counter
}

/// Advance a counter to a total that only grows.
fn advance(counter: &IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let gauge =
        IntGauge::with_opts(Opts::new(name, help).namespace(NAMESPACE)).expect("valid metric name");
    registry
        .register(Box::new(gauge.clone()))
        .expect("metric registered once");
    gauge
}

impl Metrics {
    /// The metrics of a server running the `choice` KV cache, held in `layers` of the model.
    pub fn new(choice: &KvCacheChoice, layers: &CacheLayers) -> Self {
        let registry = Registry::new();
        let info = IntGaugeVec::new(
            Opts::new(
                "kv_cache_info",
                "The KV cache in use (always 1): backend name and its settings.",
            )
            .namespace(NAMESPACE),
            &["backend", "description"],
        )
        .expect("valid metric name");
        info.with_label_values(&[choice.name(), choice.label().as_str()])
            .set(1);
        registry
            .register(Box::new(info))
            .expect("metric registered once");
        let layer_kinds = IntGaugeVec::new(
            Opts::new(
                "kv_cache_layers",
                "The model's layers by how their cache is held: `backend` (the chosen cache, \
                 e.g. LogQuant), `stock_full_attention`, `sliding_window` (mistral.rs's rotating \
                 cache), `shared` (reads another layer's), `recurrent` (a hybrid model's state).",
            )
            .namespace(NAMESPACE),
            &["kind"],
        )
        .expect("valid metric name");
        for (kind, count) in [
            ("backend", layers.backend),
            ("stock_full_attention", layers.stock_full_attention),
            ("sliding_window", layers.sliding_window),
            ("shared", layers.shared),
            ("recurrent", layers.recurrent),
        ] {
            layer_kinds.with_label_values(&[kind]).set(count as i64);
        }
        registry
            .register(Box::new(layer_kinds))
            .expect("metric registered once");
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests answered, by matched route and status (a streamed reply counts \
                 with the status of its headers).",
            )
            .namespace(NAMESPACE),
            &["route", "status"],
        )
        .expect("valid metric name");
        registry
            .register(Box::new(requests.clone()))
            .expect("metric registered once");
        let finished_sequences = IntCounter::with_opts(
            Opts::new(
                "kv_cache_finished_sequences_total",
                "Sequences whose KV cache has been released.",
            )
            .namespace(NAMESPACE),
        )
        .expect("valid metric name");
        registry
            .register(Box::new(finished_sequences.clone()))
            .expect("metric registered once");
        Self {
            live_sequences: gauge(
                &registry,
                "kv_cache_live_sequences",
                "Sequences that hold a KV cache now.",
            ),
            live_tokens: gauge(
                &registry,
                "kv_cache_live_tokens",
                "Tokens cached by the live sequences.",
            ),
            live_full_precision_tokens: gauge(
                &registry,
                "kv_cache_live_full_precision_tokens",
                "Tokens of the live sequences kept in the activation dtype.",
            ),
            live_quantized_tokens: gauge(
                &registry,
                "kv_cache_live_quantized_tokens",
                "Tokens of the live sequences stored quantized.",
            ),
            live_bytes: gauge(
                &registry,
                "kv_cache_live_bytes",
                "Bytes the live sequences' KV caches hold (all layers, K and V, codes and scales).",
            ),
            live_default_cache_bytes: gauge(
                &registry,
                "kv_cache_live_default_cache_bytes",
                "Bytes mistral.rs's default cache would hold for the same tokens.",
            ),
            peak_live_bytes: gauge(
                &registry,
                "kv_cache_peak_live_bytes",
                "Highest kv_cache_live_bytes since the server started.",
            ),
            prefix_cache_entries: gauge(
                &registry,
                "prefix_cache_entries",
                "Finished sequences kept for prefix reuse.",
            ),
            prefix_cache_bytes: gauge(
                &registry,
                "prefix_cache_bytes",
                "KV bytes the prefix cache holds (compressed bytes for LogQuant).",
            ),
            prefix_cache_hits: counter(
                &registry,
                "prefix_cache_hits_total",
                "Requests that started from a cached prefix.",
            ),
            prefix_cache_reused_tokens: counter(
                &registry,
                "prefix_cache_reused_tokens_total",
                "Prompt tokens served from the prefix cache instead of prefilled.",
            ),
            kv_memory_budget_bytes: gauge(
                &registry,
                "kv_memory_budget_bytes",
                "--kv-memory: KV bytes the started requests may project in all (0: no budget).",
            ),
            kv_memory_reserved_bytes: gauge(
                &registry,
                "kv_memory_reserved_bytes",
                "KV bytes projected by the requests started now (prompt plus max_tokens).",
            ),
            kv_memory_waiting_requests: gauge(
                &registry,
                "kv_memory_waiting_requests",
                "Requests waiting for KV memory to start.",
            ),
            kv_memory_admitted: counter(
                &registry,
                "kv_memory_admitted_total",
                "Requests started under the KV-memory budget.",
            ),
            registry,
            requests,
            finished_sequences,
            scrape: Mutex::new(()),
        }
    }

    /// Count one answered request.
    pub fn count(&self, route: &str, status: u16) {
        self.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// The exposition text with the KV-cache figures of `usage`.
    pub fn render(&self, usage: &KvCacheUsage) -> String {
        let _guard = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let gauge = |g: &IntGauge, v: usize| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        gauge(&self.live_sequences, usage.live_sequences);
        gauge(&self.live_tokens, usage.live.tokens);
        gauge(
            &self.live_full_precision_tokens,
            mistralrs_logquant::backend::full_precision_tokens(&usage.live),
        );
        gauge(&self.live_quantized_tokens, usage.live.quantized_tokens);
        gauge(&self.live_bytes, usage.live.bytes);
        gauge(&self.live_default_cache_bytes, usage.live.dense_bytes);
        gauge(&self.peak_live_bytes, usage.peak_live_bytes);
        // The book's count only grows (unless the process resets it, which the server never
        // does): advance the counter to it.
        advance(&self.finished_sequences, usage.finished_sequences as u64);
        let prefix = prefix_cache_stats();
        gauge(&self.prefix_cache_entries, prefix.entries);
        gauge(&self.prefix_cache_bytes, prefix.bytes);
        advance(&self.prefix_cache_hits, prefix.hits);
        advance(&self.prefix_cache_reused_tokens, prefix.reused_tokens);
        let admission = kv_admission_stats();
        gauge(
            &self.kv_memory_budget_bytes,
            admission.budget_bytes.unwrap_or(0),
        );
        gauge(&self.kv_memory_reserved_bytes, admission.reserved_bytes);
        gauge(
            &self.kv_memory_waiting_requests,
            admission.waiting_for_memory,
        );
        advance(&self.kv_memory_admitted, admission.admitted);
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// `GET /metrics`.
pub async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    let text = metrics.render(&kv_cache_usage());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Middleware: count every request by its matched route (`unmatched` for none, so that
/// unknown paths cannot grow the label set) and the status it was answered with.
pub async fn count_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    metrics.count(&route, response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use mistralrs_core::kv_cache_backend::LayerUsage;

    /// `name{labels} value` lines of an exposition text.
    fn samples(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').unwrap();
                (name.to_string(), value.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn figures_and_counters_are_exposed_under_their_names() {
        let layers = CacheLayers {
            sliding_window: 5,
            stock_full_attention: 1,
            ..Default::default()
        };
        let metrics = Metrics::new(&KvCacheChoice::Default, &layers);
        metrics.count("/v1/chat/completions", 200);
        metrics.count("/v1/chat/completions", 200);
        metrics.count("unmatched", 404);
        let usage = KvCacheUsage {
            live_sequences: 2,
            live: LayerUsage {
                tokens: 300,
                bytes: 1000,
                dense_bytes: 6000,
                full_precision_tokens: 120,
                quantized_tokens: 180,
            },
            peak_live_bytes: 1500,
            finished_sequences: 7,
            ..KvCacheUsage::default()
        };
        let text = metrics.render(&usage);
        let got = samples(&text);
        let value = |name: &str| {
            got.iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .1
        };
        let p = |s: &str| format!("{NAMESPACE}_{s}");
        assert_eq!(value(&p("kv_cache_live_sequences")), 2.0);
        assert_eq!(value(&p("kv_cache_live_tokens")), 300.0);
        assert_eq!(value(&p("kv_cache_live_full_precision_tokens")), 120.0);
        assert_eq!(value(&p("kv_cache_live_quantized_tokens")), 180.0);
        assert_eq!(value(&p("kv_cache_live_bytes")), 1000.0);
        assert_eq!(value(&p("kv_cache_live_default_cache_bytes")), 6000.0);
        assert_eq!(value(&p("kv_cache_peak_live_bytes")), 1500.0);
        assert_eq!(value(&p("kv_cache_finished_sequences_total")), 7.0);
        assert_eq!(value(&p(r#"kv_cache_layers{kind="sliding_window"}"#)), 5.0);
        assert_eq!(
            value(&p(r#"kv_cache_layers{kind="stock_full_attention"}"#)),
            1.0
        );
        assert_eq!(value(&p(r#"kv_cache_layers{kind="recurrent"}"#)), 0.0);
        assert_eq!(
            value(&p(
                r#"http_requests_total{route="/v1/chat/completions",status="200"}"#
            )),
            2.0
        );
        assert_eq!(
            value(&p(r#"http_requests_total{route="unmatched",status="404"}"#)),
            1.0
        );
        assert_eq!(
            value(&p(
                r#"kv_cache_info{backend="default",description="default"}"#
            )),
            1.0
        );
        assert!(text.contains(&format!("# TYPE {} counter", p("http_requests_total"))));
        // A later scrape advances the finished counter, never back.
        let text = metrics.render(&KvCacheUsage {
            finished_sequences: 9,
            ..usage
        });
        assert!(text.contains(&format!("{} 9", p("kv_cache_finished_sequences_total"))));
        let text = metrics.render(&usage);
        assert!(text.contains(&format!("{} 9", p("kv_cache_finished_sequences_total"))));
    }
}
