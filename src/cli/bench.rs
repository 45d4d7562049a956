//! `bench`: decode speed and KV memory of cache configurations against the default cache.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::eval::parse_configs;
use super::{CacheArgs, ModelArgs};
use crate::cli::plot::svg;
use mistralrs_logquant::bench::{bench, BenchRow, Budget, BudgetRow};
use mistralrs_logquant::engine::KvCacheChoice;

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
    super::refuse_in_a_ring_build("bench")?;
    let mut configs = parse_configs(&args.configs, &args.cache)?;
    configs.retain(|c| *c != KvCacheChoice::Default);
    configs.insert(0, KvCacheChoice::Default);
    args.model.validate()?;
    // Checked again against the model itself once it is known (below); 0 never fits.
    if args.contexts.contains(&0) {
        bail!("invalid value `0` for --contexts (allowed: 1 token or more)");
    }
    if args.batches.contains(&0) {
        bail!("invalid value `0` for --batches (allowed: integers >= 1)");
    }
    let budget = match &args.kv_budget {
        None => None,
        Some(size) => {
            let bytes = parse_bytes(size).context("invalid value for --kv-budget")?;
            if args.budget_context == 0 {
                bail!("invalid value `0` for --budget-context (allowed: 1 token or more)");
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
    // A run decodes `--decode` tokens past its context: all of it must fit the model's.
    if let Some(limit) = options.model.context_length() {
        let longest = args
            .contexts
            .iter()
            .chain(budget.as_ref().map(|b| &b.context));
        if let Some(&c) = longest.max().filter(|&&c| c + args.decode > limit) {
            bail!(
                "invalid value {c} for --contexts or --budget-context: with --decode {} it \
                 passes the model's context of {limit} tokens",
                args.decode
            );
        }
    }
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

/// A Markdown table with ratios against the default cache's row of the same cell.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| config | context | batch | prefill tok/s | decode tok/s (median) | vs default | KV bytes / seq | KV vs default | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.config == "default" && b.context == r.context && b.batch == r.batch);
        let speed = base.map_or("-".to_string(), |b| {
            format!("{:.2}x", r.decode_tokens_per_s / b.decode_tokens_per_s)
        });
        let mem = base.map_or("-".to_string(), |b| {
            format!(
                "{:.2}x smaller",
                b.cache_bytes as f64 / r.cache_bytes.max(1) as f64
            )
        });
        let rss = r
            .peak_rss_kb
            .map_or("-".to_string(), |kb| format!("{:.0}", kb as f64 / 1024.0));
        // Rows written before prefill was measured read back as 0.
        let prefill = if r.prefill_tokens_per_s > 0.0 {
            format!("{:.1}", r.prefill_tokens_per_s)
        } else {
            "-".to_string()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {} | {} | {} | {} |\n",
            r.config,
            r.context,
            r.batch,
            prefill,
            r.decode_tokens_per_s,
            speed,
            r.cache_bytes,
            mem,
            rss
        ));
    }
    out
}

/// A Markdown table of the budget runs, with ratios against the default cache.
pub fn budget_table(rows: &[BudgetRow]) -> String {
    let mut out = String::from(
        "| config | context | KV budget (bytes) | KV bytes / seq | largest batch | vs default | aggregate decode tok/s | vs default |\n|---|---|---|---|---|---|---|---|\n",
    );
    let base = rows.iter().find(|r| r.config == "default");
    for r in rows {
        let ratio = |x: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", x / b)
            } else {
                "-".to_string()
            }
        };
        let (batch_ratio, speed_ratio) = base.map_or(("-".into(), "-".into()), |b| {
            (
                ratio(r.batch as f64, b.batch as f64),
                ratio(r.aggregate_tokens_per_s, b.aggregate_tokens_per_s),
            )
        });
        out.push_str(&format!(
            "| {} | {} | {} | {} | {}{} | {} | {:.2} | {} |\n",
            r.config,
            r.context,
            r.budget_bytes,
            r.bytes_per_sequence,
            r.batch,
            if r.capped { " (cap)" } else { "" },
            batch_ratio,
            r.aggregate_tokens_per_s,
            speed_ratio
        ));
    }
    out
}

/// Decode throughput and KV bytes against context length, one line per (config, batch).
pub fn charts(rows: &[BenchRow]) -> Vec<crate::cli::plot::Chart> {
    use crate::cli::plot::{Chart, Series};
    let mut keys: Vec<(String, usize)> = Vec::new();
    for r in rows {
        if !keys.contains(&(r.config.clone(), r.batch)) {
            keys.push((r.config.clone(), r.batch));
        }
    }
    let series = |value: &dyn Fn(&BenchRow) -> f64| -> Vec<Series> {
        keys.iter()
            .map(|(config, batch)| Series {
                label: format!("{config}, batch {batch}"),
                points: rows
                    .iter()
                    .filter(|r| &r.config == config && r.batch == *batch)
                    .map(|r| (r.context as f64, value(r)))
                    .collect(),
            })
            .collect()
    };
    vec![
        Chart {
            title: "Decode throughput".into(),
            x_label: "context (tokens)".into(),
            y_label: "decode tokens/s (median)".into(),
            series: series(&|r| r.decode_tokens_per_s),
        },
        Chart {
            title: "KV cache per sequence".into(),
            x_label: "context (tokens)".into(),
            y_label: "bytes".into(),
            series: series(&|r| r.cache_bytes as f64),
        },
    ]
}

/// Parse a byte size: `123`, `96MiB`, `1.5GiB`, `500MB`, `2G`. `KB`/`MB`/`GB` are decimal,
/// `KiB`/`MiB`/`GiB` binary, and a bare `K`/`M`/`G` binary (as dd(1) reads it).
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim();
    // parse-size reads a bare prefix and `MB` in one configured system (`MiB` is always
    // binary), so a size that ends in a bare prefix letter is read in the binary one.
    let bare_prefix = t.ends_with(|c: char| "kKmMgGtTpPeE".contains(c));
    let config = if bare_prefix {
        parse_size::Config::new().with_binary()
    } else {
        parse_size::Config::new().with_decimal()
    };
    let bytes = config.parse_size(t).map_err(|e| {
        anyhow::anyhow!("invalid size `{s}`: {e} (examples: 96MiB, 1.5GiB, 500MB, 2G)")
    })?;
    usize::try_from(bytes).map_err(|_| anyhow::anyhow!("size `{s}` does not fit in memory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_against_the_default_row_of_the_same_cell() {
        let row = |config: &str, tps: f64, bytes| BenchRow {
            config: config.into(),
            context: 1024,
            batch: 1,
            prefill_tokens_per_s: 100.0,
            median_step_s: 1.0 / tps,
            decode_tokens_per_s: tps,
            cache_bytes: bytes,
            dense_cache_bytes: 0,
            peak_rss_kb: None,
        };
        let t = table(&[row("default", 10.0, 1000), row("lq", 15.0, 100)]);
        assert!(
            t.contains("| lq | 1024 | 1 | 100.0 | 15.00 | 1.50x | 100 | 10.00x smaller | - |"),
            "{t}"
        );
    }

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert_eq!(parse_bytes("96MiB").unwrap(), 96 << 20);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_bytes("2G").unwrap(), 2 << 30);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("MiB").is_err());
    }

    #[test]
    fn byte_size_systems_follow_the_suffix() {
        assert_eq!(parse_bytes(" 2 GB ").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("1k").unwrap(), 1024);
        assert_eq!(parse_bytes("1KB").unwrap(), 1000);
        assert_eq!(parse_bytes("0.5KiB").unwrap(), 512);
        assert_eq!(parse_bytes("64B").unwrap(), 64);
        let err = parse_bytes("12 parsecs").unwrap_err().to_string();
        assert!(
            err.starts_with("invalid size `12 parsecs`: ") && err.contains("96MiB"),
            "{err}"
        );
    }
}
