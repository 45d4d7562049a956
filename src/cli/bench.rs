//! `bench`: decode speed and KV memory of cache configurations against the default cache.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::eval::parse_configs;
use super::{CacheArgs, ModelArgs};
use crate::bench::{bench, table};
use crate::engine::KvCacheChoice;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// LogQuant options shared by the configurations (the --kv-cache flag is ignored here).
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Configurations, comma-separated (as in `eval`); the default cache always runs first.
    #[arg(
        long,
        default_value = "default,logquant-portable,logquant",
        value_delimiter = ','
    )]
    pub configs: Vec<String>,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, default_value = "1024,4096", value_delimiter = ',')]
    pub contexts: Vec<usize>,
    /// Batch sizes (equal-length sequences decoded together), comma-separated.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Tokens decoded per run; the median step time is reported.
    #[arg(long, default_value_t = 32)]
    pub decode: usize,
    /// Also write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let mut configs = parse_configs(&args.configs, &args.cache)?;
    configs.retain(|c| *c != KvCacheChoice::Default);
    configs.insert(0, KvCacheChoice::Default);
    args.model.validate()?;
    if args.contexts.iter().any(|&c| c == 0 || c >= 8192) {
        bail!(
            "invalid value for --contexts (allowed: 1 to 8191 tokens: the model's context is 8192)"
        );
    }
    if args.batches.contains(&0) {
        bail!("invalid value `0` for --batches (allowed: integers >= 1)");
    }
    let options = args.model.engine_options(KvCacheChoice::Default).await?;
    let total = configs.len() * args.contexts.len() * args.batches.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(500));
    let rows = bench(
        &options.model,
        &configs,
        &args.contexts,
        &args.batches,
        args.decode,
        |msg| {
            // One message per cell, sent as the cell starts.
            if !msg.starts_with("loading") {
                bar.inc(1);
            }
            bar.set_message(msg.to_string())
        },
    )
    .await?;
    bar.finish_and_clear();
    print!("{}", table(&rows));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
