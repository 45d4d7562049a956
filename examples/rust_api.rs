//! The Rust API: register the LogQuant backend, build a model with mistral.rs, generate.
//!
//! ```sh
//! cargo run --release --example rust_api -- "Why is the sky blue?"
//! ```

use anyhow::Result;
use mistralrs::{Model, TextMessageRole, TextMessages};
use mistralrs_logquant::config::LogQuantConfig;
use mistralrs_logquant::engine::{build_engine, EngineOptions, KvCacheChoice};
use mistralrs_logquant::model_source::ModelSource;

#[tokio::main]
async fn main() -> Result<()> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Name three rivers of Europe.".into());
    // The default model (fetched and verified on first use), or pass a GGUF path instead.
    let source = ModelSource::default_model()?;
    // The paper's setting: 2 bits, W = 42, G = 64, keys per channel.
    let cache = KvCacheChoice::LogQuant(LogQuantConfig::default());
    // build_engine registers the backend, selects it and loads the model with mistral.rs's
    // loader; the result is an ordinary mistral.rs engine.
    let model = Model::new(build_engine(&EngineOptions::new(source, cache)).await?);
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
