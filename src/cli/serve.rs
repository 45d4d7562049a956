//! `serve`: the OpenAI-compatible server of mistralrs-server-core, plus `GET /v1/kv-cache` and
//! `GET /metrics` (Prometheus, see [`metrics`](super::metrics)).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use clap::Args;
use mistralrs_core::MistralRs;
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;
use serde_json::json;

use super::metrics::{self, Metrics};
use super::openai::{self, ApiError, Endpoint};
use super::{CacheArgs, ModelArgs};
use mistralrs_logquant::engine::{build_engine, KvCacheChoice};
use mistralrs_logquant::tensor_parallel::{self, ActiveRank, RankConfig};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Port to listen on (0 picks a free one; the chosen port is printed).
    #[arg(short = 'p', long, default_value_t = 1234)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Sequences kept for prefix-cache reuse (0 turns it off). LogQuant cannot rewind its
    /// cache, so with LogQuant the prefix cache is always off. [default: 16 with the default
    /// cache]
    #[arg(long)]
    pub prefix_cache_n: Option<usize>,
    /// Tensor parallelism across processes (a `ring` build, `make build-ring`): this rank's
    /// JSON config (`master_ip`, `master_port`, `port`, `right_ip`, `right_port`, `rank`,
    /// `world_size`; mistral.rs's `RING_CONFIG`, which is read when this flag is absent).
    /// Rank 0 serves; ranks >= 1 run as its workers and open no HTTP port. Every rank needs the
    /// same model (a safetensors directory) and flags; start rank 0 within 10 s of the others.
    #[arg(long, value_name = "FILE")]
    pub rank_config: Option<PathBuf>,
}

/// `GET /v1/kv-cache`: the active cache, its parameters and its usage. Under tensor
/// parallelism (`rank`) the usage is this rank's share: its `1 / world_size` of the KV heads.
pub fn kv_cache_report(choice: &KvCacheChoice, rank: Option<&RankConfig>) -> serde_json::Value {
    let usage = mistralrs_core::kv_cache_backend::kv_cache_usage();
    let layer = |u: &mistralrs_core::kv_cache_backend::LayerUsage| {
        json!({
            "tokens": u.tokens,
            "bytes": u.bytes,
            "default_cache_bytes": u.dense_bytes,
            "full_precision_tokens": u.full_precision_tokens,
            "quantized_tokens": u.quantized_tokens,
        })
    };
    json!({
        "backend": choice.name(),
        "parameters": match choice {
            KvCacheChoice::LogQuant(config) => {
                // The widths and key group in effect, whether set one by one or through `bits`.
                let mut p = serde_json::to_value(config).unwrap_or_default();
                p["key-bits"] = json!(config.key_bits());
                p["value-bits"] = json!(config.value_bits());
                p["key-group-size"] = json!(config.key_group_size());
                p
            }
            _ => serde_json::Value::Null,
        },
        "description": choice.label(),
        "live_sequences": usage.live_sequences,
        "live": layer(&usage.live),
        "peak_live_bytes": usage.peak_live_bytes,
        "finished_sequences": usage.finished_sequences,
        "last_finished": usage.last_finished.as_ref().map(layer),
        "finished_total": layer(&usage.finished_total),
        "tensor_parallel": rank.map(|r| json!({
            "rank": r.rank,
            "world_size": r.world_size,
            "usage_is_a_share": true,
            "note": format!(
                "tokens and bytes are this rank's: it caches 1/{} of the KV heads; the other \
                 ranks hold the rest",
                r.world_size
            ),
        })),
    })
}

/// Under tensor parallelism (`Some` semaphore of one permit): each POST waits for the previous
/// one's response to end, streamed bodies included, before it reaches the engine. mistral.rs's
/// ring workers replay rank 0's requests in order and compute in lockstep with it; two requests
/// in flight would batch differently on the ranks and deadlock their collectives.
async fn one_request_at_a_time(
    State(turn): State<Option<Arc<tokio::sync::Semaphore>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(turn) = turn.filter(|_| request.method() == axum::http::Method::POST) else {
        return next.run(request).await;
    };
    let Ok(permit) = turn.acquire_owned().await else {
        return next.run(request).await;
    };
    // Held from here: if this handler is dropped (the client went away before the answer),
    // the turn still waits for the engine to be idle (see [`EngineTurn`]).
    let turn = EngineTurn(Some(permit));
    // A sequence abandoned by an earlier client may still be running on every rank.
    wait_until_engine_idle().await;
    let (parts, body) = next.run(request).await.into_parts();
    // The turn lasts as long as the body, and then until the engine holds no sequence: a
    // client that goes away mid-stream leaves its sequence running to the end on every rank
    // (the mistralrs-core patch keeps the ranks in lockstep), and the next request must not
    // reach rank 0's engine before that.
    let body = Body::from_stream(futures::StreamExt::map(
        body.into_data_stream(),
        move |chunk| {
            let _held = &turn;
            chunk
        },
    ));
    Response::from_parts(parts, body)
}

/// A request's turn at a tensor-parallel engine (see [`one_request_at_a_time`]), given back once
/// the engine holds no sequence.
struct EngineTurn(Option<tokio::sync::OwnedSemaphorePermit>);

impl Drop for EngineTurn {
    fn drop(&mut self) {
        let permit = self.0.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                wait_until_engine_idle().await;
                drop(permit);
            });
        }
    }
}

/// Until no sequence exists in the engine, queued or running (counted from its creation, not
/// from its first forward step as the KV-cache usage is).
async fn wait_until_engine_idle() {
    while mistralrs_core::kv_cache_backend::sequences_in_flight() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Largest request body accepted (prompts up to the context fit many times over).
const MAX_BODY_BYTES: usize = 16 << 20;

/// Reject malformed completion requests with a 4xx in OpenAI's error shape before they reach
/// the engine (bad JSON, an unknown model, no messages or an empty prompt, out-of-range
/// sampling parameters), and bring every answer into OpenAI's shape (see [`openai`]).
async fn validate_request(
    State(engine): State<Arc<MistralRs>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let is_chat = path.ends_with("/chat/completions");
    let is_completion = !is_chat && path.ends_with("/completions");
    if request.method() != axum::http::Method::POST || !(is_chat || is_completion) {
        return next.run(request).await;
    }
    let endpoint = if is_chat {
        Endpoint::Chat
    } else {
        Endpoint::Completion
    };
    let (parts, body) = request.into_parts();
    let (body, checked) = match check_body(&engine, endpoint, body).await {
        Ok(checked) => checked,
        Err(e) => return e.into_response(),
    };
    let request = Request::from_parts(parts, body);
    let response = match checked.seed {
        Some(seed) => mistralrs_core::with_request_seed(seed, next.run(request)).await,
        None => next.run(request).await,
    };
    let model = engine.get_default_model_id().ok().flatten();
    openai::shape_response(endpoint, model, response).await
}

/// The checked (and possibly rewritten) body of a chat or completion request.
async fn check_body(
    engine: &MistralRs,
    endpoint: Endpoint,
    body: Body,
) -> Result<(Body, openai::Checked), ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..ApiError::invalid(format!(
                "request body unreadable or over {MAX_BODY_BYTES} bytes: {e}"
            ))
        })?;
    let mut value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))?;
    let Some(object) = value.as_object_mut() else {
        return Err(ApiError::invalid("request body must be a JSON object"));
    };
    match object.get("model").and_then(|m| m.as_str()) {
        None => {
            return Err(ApiError::field(
                "model",
                "`model` is required (use \"default\" for the served model)",
            ))
        }
        Some(model) => {
            if model != "default" && !engine.model_exists(model).unwrap_or(false) {
                let known = engine.list_models().unwrap_or_default().join(", ");
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    param: Some("model".into()),
                    code: Some("model_not_found"),
                    ..ApiError::invalid(format!(
                        "model `{model}` is not served (available: default, {known})"
                    ))
                });
            }
        }
    }
    match endpoint {
        Endpoint::Chat => {
            let empty = object
                .get("messages")
                .and_then(|m| m.as_array())
                .is_none_or(|m| m.is_empty());
            if empty {
                return Err(ApiError::field(
                    "messages",
                    "`messages` must be a non-empty list",
                ));
            }
        }
        Endpoint::Completion => {
            let empty = match object.get("prompt") {
                Some(serde_json::Value::String(p)) => p.is_empty(),
                Some(serde_json::Value::Array(a)) => a.is_empty(),
                _ => true,
            };
            if empty {
                return Err(ApiError::field(
                    "prompt",
                    "`prompt` must be a non-empty string",
                ));
            }
        }
    }
    let checked = openai::check_request(endpoint, object)?;
    Ok((Body::from(value.to_string()), checked))
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    // Every flag is checked before the model is fetched or loaded.
    let cache = args.cache.resolve()?;
    args.model.validate()?;
    let rank = match &args.rank_config {
        Some(path) => Some(tensor_parallel::install(path)?),
        None => tensor_parallel::active()?,
    };
    if rank
        .as_ref()
        .is_some_and(|r| args.model.model.is_none() && r.config.world_size > 1)
    {
        bail!(
            "tensor parallelism needs --model: a safetensors model directory (the default model \
             is GGUF, which mistral.rs 0.8.1 does not split)"
        );
    }
    let prefix_cache_n = match (&cache, args.prefix_cache_n) {
        (KvCacheChoice::Default, n) => n.unwrap_or(16),
        (_, None | Some(0)) => 0,
        (other, Some(n)) => bail!(
            "--prefix-cache-n {n} needs cache rewinds, which the {} KV cache refuses; use 0",
            other.name()
        ),
    };
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("invalid --host `{}`", args.host))?;
    super::init_logging();
    if let Some(worker) = rank.as_ref().filter(|r| r.config.is_worker()) {
        return serve_as_worker(&args, cache, prefix_cache_n, worker).await;
    }
    // Bind before loading: a busy port is reported at once, not after the model load.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let mut options = args.model.engine_options(cache.clone()).await?;
    options.prefix_cache_n = (prefix_cache_n > 0).then_some(prefix_cache_n);
    if !matches!(cache, KvCacheChoice::Default) {
        tracing::info!(
            "KV cache: {}; prefix cache off (a compressed cache cannot be rewound)",
            cache.label()
        );
    }
    let engine = build_engine(&options).await?;
    let report_choice = Arc::new(cache.clone());
    let report_rank = Arc::new(rank.as_ref().map(|r| r.config.clone()));
    let server_metrics = Arc::new(Metrics::new(&cache));
    let router = MistralRsServerRouterBuilder::new()
        .with_mistralrs(engine.clone())
        .build()
        .await?
        .route(
            "/v1/kv-cache",
            get(move || {
                let (choice, rank) = (report_choice.clone(), report_rank.clone());
                async move { Json(kv_cache_report(&choice, rank.as_ref().as_ref())) }
            }),
        )
        .route(
            "/metrics",
            get(metrics::scrape).with_state(server_metrics.clone()),
        )
        // Tensor parallelism: every rank must run the same batches, and rank 0 hands each
        // request to the workers as it arrives, so requests reach the engine one at a time.
        .layer(middleware::from_fn_with_state(
            rank.as_ref()
                .map(|_| Arc::new(tokio::sync::Semaphore::new(1))),
            one_request_at_a_time,
        ))
        .layer(middleware::from_fn_with_state(engine, validate_request))
        // Outermost: counts every answer, the validation's refusals included.
        .layer(middleware::from_fn_with_state(
            server_metrics,
            metrics::count_requests,
        ));
    let local = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    let split = rank.as_ref().map_or(String::new(), |r| {
        format!(" (rank 0 of {}, tensor parallel)", r.config.world_size)
    });
    println!(
        "Serving {} with the {} KV cache on http://{local}{split}",
        options.model.model_id(),
        cache.label()
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// A rank >= 1: load this rank's share and serve rank 0's requests until killed (mistral.rs's
/// engine build does not return on a worker).
async fn serve_as_worker(
    args: &ServeArgs,
    cache: KvCacheChoice,
    prefix_cache_n: usize,
    worker: &ActiveRank,
) -> Result<()> {
    let config = &worker.config;
    let mut options = args.model.engine_options(cache.clone()).await?;
    options.prefix_cache_n = (prefix_cache_n > 0).then_some(prefix_cache_n);
    println!(
        "Rank {} of {} ({}): tensor-parallel worker for {} with the {} KV cache; rank 0 at {}:{} \
         serves the requests",
        config.rank,
        config.world_size,
        worker.path.display(),
        options.model.model_id(),
        cache.label(),
        config.master_ip.as_deref().unwrap_or("?"),
        config.master_port
    );
    build_engine(&options).await?;
    bail!("the tensor-parallel worker's engine stopped")
}

#[cfg(test)]
mod tests {
    use super::*;
    use mistralrs_logquant::config::LogQuantConfig;

    /// `GET /v1/kv-cache` reports the widths and key group in effect, however they were set.
    #[test]
    fn kv_cache_report_shows_the_widths_in_effect() {
        let choice = KvCacheChoice::LogQuant(LogQuantConfig {
            key_bits: Some(4),
            key_group_size: Some(128),
            rotate: true,
            ..LogQuantConfig::default()
        });
        let report = kv_cache_report(&choice, None);
        let p = &report["parameters"];
        assert_eq!(
            (&p["bits"], &p["key-bits"], &p["value-bits"]),
            (&2.into(), &4.into(), &2.into()),
            "{report}"
        );
        assert_eq!(
            (&p["key-group-size"], &p["rotate"]),
            (&128.into(), &true.into())
        );
        assert_eq!(
            report["description"],
            "logquant W=42, K4V2, G=64 (keys 128), keys per-channel, rotated"
        );
    }
}
