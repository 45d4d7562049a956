//! `serve`: the OpenAI-compatible server of mistralrs-server-core, plus `GET /v1/kv-cache` and
//! `GET /metrics` (Prometheus, see [`metrics`](super::metrics)).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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

use super::access::{self, AccessPolicy, ApiKey};
use super::listener::{self, ConnectionLimits};
use super::media::{HostFilter, MediaPolicy};
use super::metrics::{self, Metrics};
use super::openai::{self, ApiError, Endpoint};
use super::{CacheArgs, ModelArgs};
use mistralrs_logquant::admission::install_kv_memory_budget;
use mistralrs_logquant::engine::{build_engine, cache_layers, CacheLayers, KvCacheChoice};
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
    /// Finished sequences kept for prefix-cache reuse (0 turns it off): a request that extends
    /// a kept conversation (multi-turn chat) prefills only its new tokens. With LogQuant the
    /// entry is reused as stored; a shorter match (an edited or regenerated turn) is not
    /// served, since quantized tokens cannot be rewound.
    #[arg(long, default_value_t = 16)]
    pub prefix_cache_n: usize,
    /// Most KV bytes the prefix cache keeps, on any device (oldest entries go first).
    #[arg(long, value_name = "SIZE", default_value = "512MiB", value_parser = parse_bytes)]
    pub prefix_cache_bytes: u64,
    /// Admit requests by KV memory: a request starts only while the KV bytes projected for
    /// every started request (prompt plus max_tokens, or the context without it; compressed
    /// bytes for LogQuant) fit SIZE; the others wait in arrival order, none is dropped. A
    /// request larger than SIZE runs alone. [default: no budget, --max-seqs alone]
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub kv_memory: Option<u64>,
    /// Tensor parallelism across processes (a `ring` build, `make build-ring`): this rank's
    /// JSON config (`master_ip`, `master_port`, `port`, `right_ip`, `right_port`, `rank`,
    /// `world_size`; mistral.rs's `RING_CONFIG`, which is read when this flag is absent).
    /// Rank 0 serves; ranks >= 1 run as its workers and open no HTTP port. Every rank needs the
    /// same model (a safetensors directory) and flags; start rank 0 within 10 s of the others.
    #[arg(long, value_name = "FILE")]
    pub rank_config: Option<PathBuf>,
    #[command(flatten)]
    pub exposure: ExposureArgs,
}

/// Who may call the server, and what a request may make it do.
#[derive(Args, Debug, Clone)]
pub struct ExposureArgs {
    /// Require `Authorization: Bearer KEY` on every route but `/health` (401 otherwise).
    /// Read from the MISTRALRS_LOGQUANT_API_KEY environment variable when absent, which keeps
    /// the key out of the process list.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<ApiKey>,
    /// Mount mistral.rs's admin routes (`/v1/models/unload|reload|status|tune`,
    /// `/v1/system/info|doctor`, `/re_isq`), behind the API key. Off: they answer 404.
    #[arg(long)]
    pub enable_admin_routes: bool,
    /// Vision and audio models: local media paths and `file://` URLs are read only under this
    /// directory (symlinks resolved). Without it they are refused.
    #[arg(long, value_name = "DIR")]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Vision and audio models: fetch http(s) media URLs (public addresses only, bounded by
    /// --max-media-bytes, --media-fetch-timeout and --media-max-redirects). Off: refused.
    #[arg(long)]
    pub allow_remote_media: bool,
    /// With --allow-remote-media: also fetch from loopback, private and link-local addresses.
    #[arg(long)]
    pub allow_private_media_hosts: bool,
    /// Largest media file a request may carry or name (e.g. `20MiB`).
    #[arg(long, value_name = "SIZE", default_value = "20MiB", value_parser = parse_bytes)]
    pub max_media_bytes: u64,
    /// Seconds to fetch one remote media URL, redirects included.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub media_fetch_timeout: u64,
    /// Redirects followed per remote media URL.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub media_max_redirects: usize,
    /// Largest request body (e.g. `16MiB`); larger ones get 413.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_bytes)]
    pub max_request_bytes: u64,
    /// Most messages in one chat request.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_messages: usize,
    /// Seconds a client may take to send a request's headers, and then its body (408 for a
    /// body not read in time); a slow client cannot hold a connection open forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub request_read_timeout: u64,
    /// Client connections served at once; more wait in the listen backlog.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_connections: usize,
}

fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    parse_size::parse_size(text).map_err(|e| format!("`{text}` is not a size: {e}"))
}

impl ExposureArgs {
    /// Check the flags against each other and the bind address, before any model is loaded.
    /// The key comes from the environment when the flag is absent.
    fn resolve(&self, host: &str) -> Result<(AccessPolicy, Option<PathBuf>)> {
        let api_key = match &self.api_key {
            Some(key) => Some(key.clone()),
            None => match std::env::var(access::API_KEY_ENV) {
                Ok(text) if !text.is_empty() => Some(
                    text.parse::<ApiKey>()
                        .map_err(|e| anyhow::anyhow!("{}: {e}", access::API_KEY_ENV))?,
                ),
                _ => None,
            },
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if self.enable_admin_routes && api_key.is_none() && !loopback {
            bail!(
                "--enable-admin-routes on {host} needs --api-key (anyone who reaches the port \
                 could unload the model)"
            );
        }
        if self.allow_private_media_hosts && !self.allow_remote_media {
            bail!("--allow-private-media-hosts needs --allow-remote-media");
        }
        for (value, flag) in [
            (self.media_fetch_timeout, "--media-fetch-timeout"),
            (self.request_read_timeout, "--request-read-timeout"),
            (self.max_messages as u64, "--max-messages"),
            (self.max_connections as u64, "--max-connections"),
            (self.max_request_bytes, "--max-request-bytes"),
        ] {
            if value == 0 {
                bail!("invalid value `0` for {flag} (allowed: 1 or more)");
            }
        }
        let local_dir = match &self.allowed_local_media_path {
            None => None,
            Some(dir) => {
                let real = std::fs::canonicalize(dir)
                    .with_context(|| format!("--allowed-local-media-path {}", dir.display()))?;
                if !real.is_dir() {
                    bail!(
                        "--allowed-local-media-path {} is not a directory",
                        dir.display()
                    );
                }
                Some(real)
            }
        };
        if api_key.is_none() && !loopback {
            tracing::warn!(
                "serving on {host} without an API key: anyone who reaches the port can use the \
                 model (--api-key or {})",
                access::API_KEY_ENV
            );
        }
        let policy = AccessPolicy {
            api_key,
            admin_routes: self.enable_admin_routes,
        };
        Ok((policy, local_dir))
    }

    fn media_policy(&self, local_dir: Option<PathBuf>, engine: &MistralRs) -> MediaPolicy {
        let modalities = engine
            .config(None)
            .map(|c| MediaPolicy::modalities_of(&c.category, &c.modalities.input))
            .unwrap_or_else(|_| MediaPolicy::text_only().modalities);
        MediaPolicy {
            modalities,
            local_dir,
            remote: self.allow_remote_media,
            hosts: match self.allow_private_media_hosts {
                true => HostFilter::Any,
                false => HostFilter::PublicOnly,
            },
            max_bytes: self.max_media_bytes,
            fetch_timeout: Duration::from_secs(self.media_fetch_timeout),
            max_redirects: self.media_max_redirects,
        }
    }
}

/// `GET /v1/kv-cache`: the active cache, its parameters and its usage. Under tensor
/// parallelism (`rank`) the usage is this rank's share: its `1 / world_size` of the KV heads.
pub fn kv_cache_report(
    choice: &KvCacheChoice,
    layers: &CacheLayers,
    rank: Option<&RankConfig>,
) -> serde_json::Value {
    let usage = mistralrs_core::kv_cache_backend::kv_cache_usage();
    let prefix = mistralrs_core::kv_cache_backend::prefix_cache_stats();
    let admission = mistralrs_core::kv_cache_backend::kv_admission_stats();
    let layer = |u: &mistralrs_core::kv_cache_backend::LayerUsage| {
        json!({
            "tokens": u.tokens,
            "bytes": u.bytes,
            "default_cache_bytes": u.dense_bytes,
            "full_precision_tokens": mistralrs_logquant::backend::full_precision_tokens(u),
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
        "layers": {
            "backend": layers.backend,
            "stock_full_attention": layers.stock_full_attention,
            "sliding_window": layers.sliding_window,
            "shared": layers.shared,
            "recurrent": layers.recurrent,
            "summary": layers.describe(choice.name()),
        },
        "live_sequences": usage.live_sequences,
        "live": layer(&usage.live),
        "peak_live_bytes": usage.peak_live_bytes,
        "finished_sequences": usage.finished_sequences,
        "last_finished": usage.last_finished.as_ref().map(layer),
        "finished_total": layer(&usage.finished_total),
        "admission": {
            "budget_bytes": admission.budget_bytes,
            "reserved_bytes": admission.reserved_bytes,
            "peak_reserved_bytes": admission.peak_reserved_bytes,
            "waiting_for_memory": admission.waiting_for_memory,
            "peak_waiting_for_memory": admission.peak_waiting_for_memory,
            "admitted": admission.admitted,
        },
        "prefix_cache": {
            "entries": prefix.entries,
            "bytes": prefix.bytes,
            "max_bytes": prefix.max_bytes,
            "hits": prefix.hits,
            "reused_tokens": prefix.reused_tokens,
            "evicted": prefix.evicted,
        },
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

/// What [`validate_request`] checks a request against.
struct RequestPolicy {
    engine: Arc<MistralRs>,
    media: MediaPolicy,
    max_messages: usize,
    /// The model's context in tokens, when mistral.rs knows it.
    context: Option<usize>,
}

/// How long and how large a request body may be (see [`read_body`]).
#[derive(Clone, Copy)]
struct BodyLimits {
    max_bytes: usize,
    timeout: Duration,
}

/// Read every request's body whole before any handler runs: over `max_bytes` is a 413, a body
/// not received within `timeout` a 408, so a slow or endless upload holds no handler.
async fn read_body(State(limits): State<BodyLimits>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, limits.max_bytes));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: Some("request_too_large"),
                ..ApiError::invalid(format!(
                    "request body over {} bytes (serve --max-request-bytes)",
                    limits.max_bytes
                ))
            }
            .into_response()
        }
        Err(_) => {
            return ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                code: Some("request_timeout"),
                ..ApiError::invalid(format!(
                    "request body not received within {} s",
                    limits.timeout.as_secs()
                ))
            }
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Reject malformed completion requests with a 4xx in OpenAI's error shape before they reach
/// the engine (bad JSON, an unknown model, no messages or an empty prompt, out-of-range
/// sampling parameters, media the model or the server does not take), and bring every answer
/// into OpenAI's shape (see [`openai`]).
async fn validate_request(
    State(policy): State<Arc<RequestPolicy>>,
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
    let (body, checked) = match check_body(&policy, endpoint, body).await {
        Ok(checked) => checked,
        Err(e) => return e.into_response(),
    };
    let request = Request::from_parts(parts, body);
    let response = match checked.seed {
        Some(seed) => mistralrs_core::with_request_seed(seed, next.run(request)).await,
        None => next.run(request).await,
    };
    let model = policy.engine.get_default_model_id().ok().flatten();
    openai::shape_response(endpoint, model, checked, response).await
}

/// The checked (and possibly rewritten) body of a chat or completion request.
async fn check_body(
    policy: &RequestPolicy,
    endpoint: Endpoint,
    body: Body,
) -> Result<(Body, openai::Checked), ApiError> {
    let engine = &policy.engine;
    // Already read whole and bounded by [`read_body`].
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::invalid(format!("request body unreadable: {e}")))?;
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
            let count = object["messages"].as_array().map_or(0, Vec::len);
            if count > policy.max_messages {
                return Err(ApiError::field(
                    "messages",
                    format!(
                        "{count} messages, over this server's limit of {} (serve --max-messages)",
                        policy.max_messages
                    ),
                ));
            }
            // mistral.rs would search the web and fetch the pages the model picks.
            if object
                .get("web_search_options")
                .is_some_and(|v| !v.is_null())
            {
                return Err(ApiError::field(
                    "web_search_options",
                    "web search is not available on this server",
                ));
            }
            policy.media.check_messages(object).await?;
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
    if let Some(context) = policy.context {
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(n) = object.get(field).and_then(|v| v.as_u64()) {
                if n > context as u64 {
                    return Err(ApiError {
                        code: Some("context_length_exceeded"),
                        ..ApiError::field(
                            field,
                            format!(
                                "`{field}` is {n}, over the model's context of {context} tokens"
                            ),
                        )
                    });
                }
            }
        }
    }
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
    let prefix_cache_n = args.prefix_cache_n;
    mistralrs_core::kv_cache_backend::set_prefix_cache_max_bytes(Some(
        usize::try_from(args.prefix_cache_bytes).unwrap_or(usize::MAX),
    ));
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("invalid --host `{}`", args.host))?;
    super::init_logging();
    let (access_policy, local_media_dir) = args.exposure.resolve(&args.host)?;
    if let Some(worker) = rank.as_ref().filter(|r| r.config.is_worker()) {
        return serve_as_worker(&args, cache, prefix_cache_n, worker).await;
    }
    // Bind before loading: a busy port is reported at once, not after the model load.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let mut options = args.model.engine_options(cache.clone()).await?;
    options.prefix_cache_n = (prefix_cache_n > 0).then_some(prefix_cache_n);
    let engine = build_engine(&options).await?;
    let context = engine.config(None).ok().and_then(|c| c.max_seq_len);
    if let Some(budget) = args.kv_memory {
        let max_seq_len = context.context("--kv-memory: the model reports no context length")?;
        install_kv_memory_budget(
            &cache,
            options.dtype,
            usize::try_from(budget).unwrap_or(usize::MAX),
            max_seq_len,
        )?;
    }
    let report_choice = Arc::new(cache.clone());
    let report_layers = Arc::new(cache_layers(&options.model.model_id()).unwrap_or_default());
    let report_rank = Arc::new(rank.as_ref().map(|r| r.config.clone()));
    let server_metrics = Arc::new(Metrics::new(
        &cache,
        &cache_layers(&options.model.model_id()).unwrap_or_default(),
    ));
    let request_policy = Arc::new(RequestPolicy {
        media: args.exposure.media_policy(local_media_dir, &engine),
        max_messages: args.exposure.max_messages,
        context,
        engine: engine.clone(),
    });
    let body_limits = BodyLimits {
        max_bytes: usize::try_from(args.exposure.max_request_bytes).unwrap_or(usize::MAX),
        timeout: Duration::from_secs(args.exposure.request_read_timeout),
    };
    let router = MistralRsServerRouterBuilder::new()
        .with_mistralrs(engine.clone())
        .with_max_body_limit(body_limits.max_bytes)
        .build()
        .await?
        .fallback(access::unknown_route)
        .route(
            "/v1/kv-cache",
            get(move || {
                let (choice, rank) = (report_choice.clone(), report_rank.clone());
                let layers = report_layers.clone();
                async move { Json(kv_cache_report(&choice, &layers, rank.as_ref().as_ref())) }
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
        .layer(middleware::from_fn_with_state(
            request_policy,
            validate_request,
        ))
        .layer(middleware::from_fn_with_state(body_limits, read_body))
        // The key and the route policy before anything reads the body.
        .layer(middleware::from_fn_with_state(
            Arc::new(access_policy),
            access::guard,
        ))
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
    let layers = cache_layers(&options.model.model_id()).unwrap_or_default();
    println!(
        "Serving {} with the {} KV cache ({}) on http://{local}{split}",
        options.model.model_id(),
        cache.label(),
        layers.describe(cache.name())
    );
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_secs(args.exposure.request_read_timeout),
        max_connections: args.exposure.max_connections,
    };
    listener::serve(listener, router, limits, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
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
        let report = kv_cache_report(&choice, &CacheLayers::default(), None);
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
