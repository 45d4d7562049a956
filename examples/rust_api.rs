//! The Rust API: register the LogQuant backend, build a model with mistral.rs, generate.
//!
//! ```sh
//! cargo run --release --example rust_api -- "Why is the sky blue?"
//! cargo run --release --example rust_api -- --cpu --dtype f32 "Why is the sky blue?"
//! ```

use anyhow::Result;
use clap::Parser;
use mistralrs::{Model, TextMessageRole, TextMessages};
use mistralrs_logquant::config::LogQuantConfig;
use mistralrs_logquant::engine::{build_engine, Dtype, EngineOptions, KvCacheChoice};
use mistralrs_logquant::model_source::ModelSource;

#[derive(Parser)]
struct Args {
    /// The question.
    #[arg(default_value = "Name three rivers of Europe.")]
    question: String,
    /// Run on the CPU even when built with an accelerator.
    #[arg(long)]
    cpu: bool,
    /// Activation dtype. [default: f32 on the CPU, auto on an accelerator]
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // The default model (fetched and verified on first use), or pass a GGUF path instead.
    let source = ModelSource::default_model()?;
    let cache = KvCacheChoice::LogQuant(LogQuantConfig::default());
    // The build's best device and its dtype, unless told otherwise.
    let mut options = EngineOptions::new(source, cache);
    options.cpu |= args.cpu;
    options.dtype = args.dtype.unwrap_or(Dtype::default_for(options.cpu));
    // build_engine registers the backend, selects it and loads the model with mistral.rs's
    // loader; the result is an ordinary mistral.rs engine.
    let model = Model::new(build_engine(&options).await?);
    let question = args.question;
    let messages = TextMessages::new().add_message(TextMessageRole::User, question);
    let response = model.send_chat_request(messages).await?;
    println!(
        "{}",
        response.choices[0].message.content.as_deref().unwrap_or("")
    );
    let usage = mistralrs_core::kv_cache_backend::kv_cache_usage();
    eprintln!("KV cache: {usage:?}");
    Ok(())
}
