//! The default cache and LogQuant side by side on the same prompt: greedy text and KV bytes.
//!
//! ```sh
//! cargo run --release --example side_by_side
//! ```

use anyhow::Result;
use mistralrs_logquant::config::LogQuantConfig;
use mistralrs_logquant::engine::{build_engine, EngineOptions, KvCacheChoice};
use mistralrs_logquant::generate::{
    finished_sequences, generate_greedy, special_token_ids, tokenize, usage_of_next_finished,
};
use mistralrs_logquant::model_source::ModelSource;

const PROMPT: &str = "In the beginning God created the heaven and the earth. And the earth was \
without form, and void; and darkness was upon the face of the deep.";

#[tokio::main]
async fn main() -> Result<()> {
    let source = ModelSource::default_model()?;
    let suppressed = special_token_ids(&source)?;
    for cache in [
        KvCacheChoice::Default,
        KvCacheChoice::LogQuant(LogQuantConfig {
            window: 8,
            ..Default::default()
        }),
    ] {
        let engine = build_engine(&EngineOptions::new(source.clone(), cache.clone())).await?;
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
