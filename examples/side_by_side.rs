//! The default cache and LogQuant side by side on the same prompt: greedy text and KV bytes.
//!
//! ```sh
//! cargo run --release --example side_by_side
//! cargo run --release --example side_by_side -- --cpu --dtype bf16
//! ```

use anyhow::Result;
use clap::Parser;
use mistralrs_logquant::config::LogQuantConfig;
use mistralrs_logquant::engine::{build_engine, Dtype, EngineOptions, KvCacheChoice};
use mistralrs_logquant::generate::{
    finished_sequences, generate_greedy, special_token_ids, tokenize, usage_of_next_finished,
};
use mistralrs_logquant::model_source::ModelSource;

const PROMPT: &str = "In the beginning God created the heaven and the earth. And the earth was \
without form, and void; and darkness was upon the face of the deep.";

#[derive(Parser)]
struct Args {
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
    let source = ModelSource::default_model()?;
    let suppressed = special_token_ids(&source)?;
    for cache in [
        KvCacheChoice::Default,
        KvCacheChoice::LogQuant(LogQuantConfig {
            window: 8,
            ..Default::default()
        }),
    ] {
        let mut options = EngineOptions::new(source.clone(), cache.clone());
        options.cpu |= args.cpu;
        options.dtype = args.dtype.unwrap_or(Dtype::default_for(options.cpu));
        let engine = build_engine(&options).await?;
        // A long prompt so that LogQuant really quantizes: the text repeated.
        let prompt = tokenize(&engine, &PROMPT.repeat(8)).await?;
        let finished = finished_sequences();
        let tokens = generate_greedy(&engine, prompt, 48, &suppressed).await?;
        let usage = usage_of_next_finished(finished).await.unwrap_or_default();
        println!(
            "== {}\n{:?}\nKV cache: {} bytes for {} tokens ({} quantized)\n",
            cache.label(),
            tokens,
            usage.bytes,
            usage.tokens,
            usage.quantized_tokens
        );
    }
    Ok(())
}
