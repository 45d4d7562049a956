//! `bench`: decode speed and KV memory of cache configurations against the default cache.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::eval::parse_configs;
use super::{CacheArgs, ModelArgs};
use crate::bench::{bench, budget_table, charts, parse_bytes, table, Budget};
use crate::engine::KvCacheChoice;
use crate::plot::svg;

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
    /// KV-memory budget (e.g. 96MiB, 1GiB): also run each configuration at the largest batch
    /// whose caches fit it and report the aggregate decode throughput there.
    #[arg(long)]
    pub kv_budget: Option<String>,
    /// Prompt length of the budget runs.
    #[arg(long, default_value_t = 1024)]
    pub budget_context: usize,
    /// Largest batch the budget search may pick (bounds the run time).
    #[arg(long, default_value_t = 32)]
    pub budget_max_batch: usize,
    /// Also write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write an SVG plot of throughput and KV bytes against context length here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
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
    let budget = match &args.kv_budget {
        None => None,
        Some(size) => {
            let bytes = parse_bytes(size).context("invalid value for --kv-budget")?;
            if args.budget_context == 0 || args.budget_context >= 8192 {
                bail!("invalid value for --budget-context (allowed: 1 to 8191 tokens)");
            }
            if args.budget_max_batch == 0 {
                bail!("invalid value `0` for --budget-max-batch (allowed: integers >= 1)");
            }
            Some(Budget {
                bytes,
                context: args.budget_context,
                max_batch: args.budget_max_batch,
            })
        }
    };
    let options = args.model.engine_options(KvCacheChoice::Default).await?;
    let total =
        configs.len() * (args.contexts.len() * args.batches.len() + usize::from(budget.is_some()));
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(500));
    let report = bench(
        &options,
        &configs,
        &args.contexts,
        &args.batches,
        args.decode,
        budget,
        |msg| {
            // One message per cell (and per budget search), sent as it starts.
            if !msg.starts_with("loading") && !msg.contains("budget batch") {
                bar.inc(1);
            }
            bar.set_message(msg.to_string())
        },
    )
    .await?;
    bar.finish_and_clear();
    print!("{}", table(&report.rows));
    if !report.budget.is_empty() {
        println!();
        print!("{}", budget_table(&report.budget));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&charts(&report.rows)))
            .with_context(|| format!("cannot write --plot {}", path.display()))?;
    }
    Ok(())
}
