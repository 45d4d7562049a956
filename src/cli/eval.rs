//! `eval`: teacher-forced perplexity, KL and top-1 agreement through the decode path.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{CacheArgs, ModelArgs};
use crate::engine::KvCacheChoice;
use crate::eval::{charts, evaluate, segment_table, table, EvalWindow};
use crate::plot::svg;

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// LogQuant options shared by the configurations (the --kv-cache flag is ignored here).
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The text to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Cache configurations, comma-separated: default, logquant, recent, sink-recent, none,
    /// passthrough; `NAME:BITS` sets the bit width (e.g. logquant:8). The default cache is
    /// always measured first, as the reference.
    #[arg(
        long,
        default_value = "default,logquant,recent,none",
        value_delimiter = ','
    )]
    pub configs: Vec<String>,
    /// Tokens of the text to skip before the window.
    #[arg(long, default_value_t = 20000)]
    pub start: usize,
    /// Tokens prefilled exactly before scoring.
    #[arg(long, default_value_t = 1024)]
    pub prefill: usize,
    /// Tokens scored, one decode step each.
    #[arg(long, default_value_t = 256)]
    pub score: usize,
    /// Also write the rows (with per-token negative log-likelihoods) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write an SVG plot of log-perplexity against position here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Parse `NAME[:BITS]` against the shared LogQuant options.
pub fn parse_configs(names: &[String], cache: &CacheArgs) -> Result<Vec<KvCacheChoice>> {
    let mut out = Vec::new();
    for entry in names {
        let (name, bits) = match entry.split_once(':') {
            Some((n, b)) => (n.trim(), Some(b.trim())),
            None => (entry.trim(), None),
        };
        let mut args = cache.clone();
        args.kv_cache = Some(name.to_string());
        match name {
            "logquant-portable" => {
                args.kv_cache = Some("logquant".into());
                args.kv_kernel = Some("portable".into());
            }
            "logquant" | "recent" | "sink-recent" | "none" => {
                args.kv_cache = Some("logquant".into());
                if name != "logquant" {
                    args.kv_policy = Some(name.to_string());
                } else if args.kv_policy.is_none() {
                    args.kv_policy = Some("logquant".into());
                }
            }
            "default" | "passthrough" => {}
            other => bail!(
                "invalid value `{other}` for --configs (allowed: default, logquant, \
                 logquant-portable, recent, sink-recent, none, passthrough, optionally with :BITS)"
            ),
        }
        if let Some(bits) = bits {
            let bits: u8 = bits.parse().map_err(|_| {
                anyhow::anyhow!("invalid bits `{bits}` in --configs entry `{entry}`")
            })?;
            args.kv_bits = Some(bits);
        }
        out.push(args.resolve()?);
    }
    Ok(out)
}

pub async fn eval(args: EvalArgs) -> Result<()> {
    let configs = parse_configs(&args.configs, &args.cache)?;
    args.model.validate()?;
    if !args.text.is_file() {
        bail!("--text {} does not exist", args.text.display());
    }
    if args.prefill == 0 || args.score == 0 {
        bail!("--prefill and --score must be at least 1");
    }
    let options = args.model.engine_options(KvCacheChoice::Default).await?;
    let window = EvalWindow {
        start: args.start,
        prefill: args.prefill,
        score: args.score,
    };
    // The default cache is always measured too (first), as the reference.
    let measured = configs
        .iter()
        .filter(|c| **c != KvCacheChoice::Default)
        .count()
        + 1;
    let bar = indicatif::ProgressBar::new((measured * args.score) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30} {pos}/{len} tokens scored, eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(500));
    let counter = bar.clone();
    let rows = evaluate(
        &options.model,
        &args.text,
        window,
        &configs,
        |msg| bar.set_message(msg.to_string()),
        Some(std::sync::Arc::new(move |n| counter.set_position(n as u64))),
    )
    .await?;
    bar.finish_and_clear();
    println!(
        "{} tokens scored after a {}-token exact prefill, starting at token {} of {}\n",
        args.score,
        args.prefill,
        args.start,
        args.text.display()
    );
    print!("{}", table(&rows));
    println!();
    print!("{}", segment_table(&rows, window));
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "window": window, "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&charts(&rows, window)))
            .with_context(|| format!("cannot write --plot {}", path.display()))?;
    }
    Ok(())
}
