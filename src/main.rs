//! `mistralrs-logquant`: serve a model over the OpenAI-compatible API with a chosen KV cache.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mistralrs_logquant::engine::{build_engine, Dtype, EngineOptions, KvCacheChoice};
use mistralrs_logquant::model_source::ModelSource;
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;

#[derive(Parser, Debug)]
#[command(name = "mistralrs-logquant", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// A GGUF file or a safetensors model directory. Default: SmolLM2-135M-Instruct, fetched
    /// and verified on first use.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// KV cache: `default` (mistral.rs's own) or a registered backend.
    #[arg(long, default_value = "default", value_parser = parse_kv_cache)]
    kv_cache: KvCacheChoice,
    /// Activation dtype: auto, f32, f16, bf16.
    #[arg(short, long, default_value = "f32", value_parser = parse_dtype)]
    dtype: Dtype,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    serve_ip: String,
    /// Port to listen on (0 picks a free one).
    #[arg(short, long, default_value_t = 1234)]
    port: u16,
    /// Most sequences scheduled at once.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Run on the CPU even when an accelerator is available.
    #[arg(long, default_value_t = true)]
    cpu: bool,
}

fn parse_kv_cache(s: &str) -> Result<KvCacheChoice, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

fn parse_dtype(s: &str) -> Result<Dtype, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

#[tokio::main]
async fn main() {
    if let Err(err) = run().await {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

async fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let addr: SocketAddr = format!("{}:{}", args.serve_ip, args.port)
        .parse()
        .with_context(|| format!("invalid --serve-ip `{}`", args.serve_ip))?;
    // Bind first: a busy port is reported before minutes of model loading.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let model = match &args.model {
        Some(path) => ModelSource::from_path(path)?,
        None => tokio::task::spawn_blocking(ModelSource::default_model).await??,
    };
    let mut options = EngineOptions::new(model, args.kv_cache);
    options.dtype = args.dtype;
    options.max_seqs = args.max_seqs;
    options.cpu = args.cpu;
    let engine = build_engine(&options).await?;
    let router = MistralRsServerRouterBuilder::new()
        .with_mistralrs(engine)
        .build()
        .await?;
    let local = listener.local_addr()?;
    eprintln!(
        "Serving {} with the {} KV cache on http://{local}",
        options.model.model_id(),
        options.kv_cache.name()
    );
    axum::serve(listener, router).await?;
    Ok(())
}
