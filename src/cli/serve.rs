//! `serve`: the OpenAI-compatible server of mistralrs-server-core, plus `GET /v1/kv-cache`.

use std::net::SocketAddr;
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

use super::{CacheArgs, ModelArgs};
use crate::engine::{build_engine, KvCacheChoice};

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
}

/// `GET /v1/kv-cache`: the active cache, its parameters and its usage.
pub fn kv_cache_report(choice: &KvCacheChoice) -> serde_json::Value {
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
            KvCacheChoice::LogQuant(config) => serde_json::to_value(config).unwrap_or_default(),
            _ => serde_json::Value::Null,
        },
        "description": choice.label(),
        "live_sequences": usage.live_sequences,
        "live": layer(&usage.live),
        "peak_live_bytes": usage.peak_live_bytes,
        "finished_sequences": usage.finished_sequences,
        "last_finished": usage.last_finished.as_ref().map(layer),
        "finished_total": layer(&usage.finished_total),
    })
}

/// Largest request body accepted (prompts up to the context fit many times over).
const MAX_BODY_BYTES: usize = 16 << 20;

/// An OpenAI-style error response.
fn error_response(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(json!({ "error": { "message": message, "type": kind } })),
    )
        .into_response()
}

/// Reject malformed completion requests with a 4xx and an OpenAI-style error body before they
/// reach the engine: bad JSON, an unknown model, no messages or an empty prompt.
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
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("request body unreadable or over {MAX_BODY_BYTES} bytes: {e}"),
            )
        }
    };
    let value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("request body is not valid JSON: {e}"),
            )
        }
    };
    let Some(object) = value.as_object() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "request body must be a JSON object".into(),
        );
    };
    match object.get("model").and_then(|m| m.as_str()) {
        None => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "`model` is required (use \"default\" for the served model)".into(),
            )
        }
        Some(model) => {
            if model != "default" && !engine.model_exists(model).unwrap_or(false) {
                let known = engine.list_models().unwrap_or_default().join(", ");
                return error_response(
                    StatusCode::NOT_FOUND,
                    "model_not_found",
                    format!("model `{model}` is not served (available: default, {known})"),
                );
            }
        }
    }
    if is_chat {
        let empty = object
            .get("messages")
            .and_then(|m| m.as_array())
            .is_none_or(|m| m.is_empty());
        if empty {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "`messages` must be a non-empty list".into(),
            );
        }
    } else {
        let empty = match object.get("prompt") {
            Some(serde_json::Value::String(p)) => p.is_empty(),
            Some(serde_json::Value::Array(a)) => a.is_empty(),
            _ => true,
        };
        if empty {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "`prompt` must be a non-empty string".into(),
            );
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    // Every flag is checked before the model is fetched or loaded.
    let cache = args.cache.resolve()?;
    args.model.validate()?;
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
    let router = MistralRsServerRouterBuilder::new()
        .with_mistralrs(engine.clone())
        .build()
        .await?
        .route(
            "/v1/kv-cache",
            get(move || {
                let choice = report_choice.clone();
                async move { Json(kv_cache_report(&choice)) }
            }),
        )
        .layer(middleware::from_fn_with_state(engine, validate_request));
    let local = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    println!(
        "Serving {} with the {} KV cache on http://{local}",
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
