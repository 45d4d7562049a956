//! `eval`: teacher-forced perplexity, KL and top-1 agreement through the decode path
//! (`--task ppl`), or long-range retrieval (`--task copy`, see [`mistralrs_logquant::retrieval`]).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{CacheArgs, ModelArgs};
use crate::cli::plot::svg;
use mistralrs_logquant::bootstrap::{
    mean_interval, mean_ratio_interval, perplexity_interval, perplexity_ratio_interval, Interval,
};
use mistralrs_logquant::config::{allowed_names, AttentionKernel, PolicyKind};
use mistralrs_logquant::engine::KvCacheChoice;
use mistralrs_logquant::eval::{
    context_segments, evaluate_window, segment_perplexities, EvalRow, EvalWindow,
};
use mistralrs_logquant::needle::{evaluate_needle, NeedleRow, NeedleSettings};
use mistralrs_logquant::retrieval::{evaluate_copy, CopyRow, CopySettings, RowMemory};

/// What `eval` measures.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Teacher-forced perplexity, KL and top-1 agreement against the default cache.
    Ppl,
    /// Copy a passage seen `--fillers` tokens earlier (greedy; words right before the first
    /// error).
    Copy,
    /// Find a five-digit pass key hidden at `--depths` of prompts of `--lengths` tokens
    /// (greedy; digits right before the first error).
    Needle,
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// LogQuant options shared by the configurations (the --kv-cache flag is ignored here).
    #[command(flatten)]
    pub cache: CacheArgs,
    /// A UTF-8 text file to score (or to take passages and fillers from).
    #[arg(long)]
    pub text: PathBuf,
    /// What to measure: ppl (perplexity, KL, top-1 vs default) or copy (retrieval).
    #[arg(long, value_enum, default_value_t = Task::Ppl)]
    pub task: Task,
    /// Cache configurations, comma-separated: default, passthrough, logquant-portable, paper
    /// (LogQuant with the paper's 2-bit setting), or a --kv-policy value (a LogQuant cache with
    /// that policy and the shared settings), each optionally followed by `:`-separated options:
    /// `BITS` (both widths), `kKvV` (key and value bits, e.g. k4v2), `gN` (group size), `kgN`
    /// (key group size), `wN` (window), `rN` (recent), `rot` / `norot` (Hadamard rotation),
    /// e.g. `logquant:k4v2`. The default cache is always measured first, as the reference.
    #[arg(
        long,
        default_value = "default,logquant,paper,recent",
        value_delimiter = ','
    )]
    pub configs: Vec<String>,
    /// Tokens of the text to skip before the window (copy: before the first passage).
    #[arg(long, default_value_t = 20000)]
    pub start: usize,
    /// copy: filler lengths in tokens, comma-separated (the model's context bounds them).
    #[arg(long, default_value = "1000,3000", value_delimiter = ',')]
    pub fillers: Vec<usize>,
    /// copy: passages per filler length; needle: keys per (length, depth).
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    /// needle: prompt lengths in tokens, comma-separated (the model's context bounds them).
    #[arg(long, default_value = "1024,4096", value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// needle: depths of the key, in percent of the text before it, comma-separated.
    #[arg(long, default_value = "0,25,50,75,100", value_delimiter = ',')]
    pub depths: Vec<usize>,
    /// copy: tokens per passage.
    #[arg(long, default_value_t = 160)]
    pub passage: usize,
    /// copy: percent of the passage repeated after the filler.
    #[arg(long, default_value_t = 40)]
    pub prefix_percent: usize,
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

/// One `:`-separated option of a `--configs` entry (see [`EvalArgs::configs`]).
fn apply_config_option(args: &mut CacheArgs, option: &str) -> Result<()> {
    let number = |s: &str| -> Result<usize> {
        s.parse()
            .map_err(|_| anyhow::anyhow!("`{s}` is not a number"))
    };
    if option == "rot" || option == "norot" {
        args.kv_rotate = Some(option == "rot");
    } else if let Ok(bits) = option.parse::<u8>() {
        args.kv_bits = Some(bits);
        args.kv_key_bits = None;
        args.kv_value_bits = None;
    } else if let Some(rest) = option.strip_prefix("kg") {
        args.kv_key_group_size = Some(number(rest)?);
    } else if let Some((k, v)) = option.strip_prefix('k').and_then(|r| r.split_once('v')) {
        args.kv_key_bits = Some(number(k)? as u8);
        args.kv_value_bits = Some(number(v)? as u8);
    } else if let Some(rest) = option.strip_prefix('g') {
        args.kv_group_size = Some(number(rest)?);
    } else if let Some(rest) = option.strip_prefix('w') {
        args.kv_window = Some(number(rest)?);
    } else if let Some(rest) = option.strip_prefix('r') {
        args.kv_recent = Some(number(rest)?);
    } else {
        bail!("allowed: BITS, kKvV, gN, kgN, wN, rN, rot, norot");
    }
    Ok(())
}

/// Parse `NAME[:OPTION...]` against the shared LogQuant options.
pub fn parse_configs(names: &[String], cache: &CacheArgs) -> Result<Vec<KvCacheChoice>> {
    let mut out = Vec::new();
    for entry in names {
        let mut parts = entry.split(':').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let options: Vec<&str> = parts.collect();
        let mut args = cache.clone();
        args.kv_cache = Some(name.to_string());
        // A policy's name is a LogQuant cache with that policy (`logquant` keeps a --kv-policy
        // given beside it).
        let policy = name.parse::<PolicyKind>().ok();
        match (name, policy) {
            ("logquant-portable", _) => {
                args.kv_cache = Some("logquant".into());
                args.kv_kernel = Some(AttentionKernel::Portable);
            }
            ("paper", _) => {
                // The paper's setting (LogQuantConfig::paper) in flags, before the options.
                args.kv_cache = Some("logquant".into());
                args.kv_bits = Some(2);
                args.kv_key_bits = None;
                args.kv_value_bits = None;
                args.kv_key_group_size = Some(64);
                args.kv_group_size = Some(64);
                args.kv_rotate = Some(false);
            }
            (_, Some(policy)) => {
                args.kv_cache = Some("logquant".into());
                if policy != PolicyKind::Logquant || args.kv_policy.is_none() {
                    args.kv_policy = Some(policy);
                }
            }
            ("default" | "passthrough", None) => {
                // The shared LogQuant flags are for the LogQuant entries: no warning here.
                args = CacheArgs {
                    kv_cache: Some(name.to_string()),
                    ..Default::default()
                };
            }
            (other, None) => bail!(
                "invalid value `{other}` for --configs (allowed: default, passthrough, \
                 logquant-portable, paper, {}, optionally with :OPTIONS)",
                allowed_names::<PolicyKind>()
            ),
        }
        for option in options {
            apply_config_option(&mut args, option).with_context(|| {
                format!("invalid option `{option}` in --configs entry `{entry}`")
            })?;
        }
        out.push(args.resolve()?);
    }
    Ok(out)
}

pub async fn eval(args: EvalArgs) -> Result<()> {
    super::refuse_in_a_ring_build("eval")?;
    let configs = parse_configs(&args.configs, &args.cache)?;
    args.model.validate()?;
    if !args.text.is_file() {
        bail!("--text {} does not exist", args.text.display());
    }
    match args.task {
        Task::Copy => return eval_copy(args, configs).await,
        Task::Needle => return eval_needle(args, configs).await,
        Task::Ppl => {}
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
    let evaluation = evaluate_window(
        &options,
        &args.text,
        window,
        &configs,
        |msg| bar.set_message(msg.to_string()),
        Some(std::sync::Arc::new(move |n| counter.set_position(n as u64))),
    )
    .await?;
    let rows = evaluation.rows;
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
        let run = mistralrs_logquant::provenance::RunInfo::collect(&options);
        let json = serde_json::json!({
            "window": window, "rows": rows, "tokens": evaluation.tokens, "run": run,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&charts(&rows, window)))
            .with_context(|| format!("cannot write --plot {}", path.display()))?;
    }
    Ok(())
}

/// `eval --task copy`.
async fn eval_copy(args: EvalArgs, configs: Vec<KvCacheChoice>) -> Result<()> {
    if args.passage < 2 || args.prompts == 0 || args.fillers.is_empty() {
        bail!("--passage must be at least 2, --prompts at least 1, --fillers not empty");
    }
    if !(1..100).contains(&args.prefix_percent) {
        bail!(
            "invalid value `{}` for --prefix-percent (allowed: 1 to 99)",
            args.prefix_percent
        );
    }
    let options = args.model.engine_options(KvCacheChoice::Default).await?;
    let settings = CopySettings {
        start: args.start,
        passage: args.passage,
        prefix_percent: args.prefix_percent,
        prompts: args.prompts,
        fillers: args.fillers.clone(),
    };
    let measured = configs
        .iter()
        .filter(|c| **c != KvCacheChoice::Default)
        .count()
        + 1;
    let bar = prompt_bar(measured * settings.prompts * settings.fillers.len());
    let counter = bar.clone();
    let rows = evaluate_copy(
        &options,
        &args.text,
        &settings,
        &configs,
        |msg| bar.set_message(msg.to_string()),
        move |n| counter.set_position(n as u64),
    )
    .await?;
    bar.finish_and_clear();
    println!(
        "copy task: {} passages of {} tokens from token {} of {}, the first {}% repeated after \
         each filler, continued greedily\n",
        settings.prompts,
        settings.passage,
        settings.start,
        args.text.display(),
        settings.prefix_percent
    );
    print!("{}", copy_table(&rows));
    if let Some(path) = &args.json {
        let run = mistralrs_logquant::provenance::RunInfo::collect(&options);
        let json =
            serde_json::json!({ "task": "copy", "settings": settings, "rows": rows, "run": run });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&copy_charts(&rows)))
            .with_context(|| format!("cannot write --plot {}", path.display()))?;
    }
    Ok(())
}

/// `eval --task needle`.
async fn eval_needle(args: EvalArgs, configs: Vec<KvCacheChoice>) -> Result<()> {
    if args.prompts == 0 || args.lengths.is_empty() || args.depths.is_empty() {
        bail!("--prompts must be at least 1, --lengths and --depths not empty");
    }
    if let Some(d) = args.depths.iter().find(|&&d| d > 100) {
        bail!("invalid value `{d}` for --depths (allowed: 0 to 100)");
    }
    let options = args.model.engine_options(KvCacheChoice::Default).await?;
    if let Some(context) = options.model.context_length() {
        if let Some(l) = args.lengths.iter().find(|&&l| l + 8 > context) {
            bail!("--lengths {l} leaves no room to answer in the model's {context}-token context");
        }
    }
    let settings = NeedleSettings {
        start: args.start,
        prompts: args.prompts,
        lengths: args.lengths.clone(),
        depths: args.depths.clone(),
    };
    let measured = configs
        .iter()
        .filter(|c| **c != KvCacheChoice::Default)
        .count()
        + 1;
    let total = measured * settings.prompts * settings.lengths.len() * settings.depths.len();
    let bar = prompt_bar(total);
    let counter = bar.clone();
    let rows = evaluate_needle(
        &options,
        &args.text,
        &settings,
        &configs,
        |msg| bar.set_message(msg.to_string()),
        move |n| counter.set_position(n as u64),
    )
    .await?;
    bar.finish_and_clear();
    println!(
        "needle task: {} five-digit keys per length and depth, in text from token {} of {}, \
         asked for at the end, answered greedily\n",
        settings.prompts,
        settings.start,
        args.text.display()
    );
    print!("{}", needle_table(&rows));
    println!();
    print!("{}", needle_depth_table(&rows));
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&needle_charts(&rows)))
            .with_context(|| format!("cannot write --plot {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        let run = mistralrs_logquant::provenance::RunInfo::collect(&options);
        let json =
            serde_json::json!({ "task": "needle", "settings": settings, "rows": rows, "run": run });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    Ok(())
}

/// A progress bar over `total` prompts.
fn prompt_bar(total: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30} {pos}/{len} prompts, eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(500));
    bar
}

/// Perplexity per context range, one row per configuration.
pub fn segment_table(rows: &[EvalRow], window: EvalWindow) -> String {
    let segments = context_segments(window.prefill, window.score);
    let mut out = String::from("| config |");
    for (from, to) in &segments {
        out.push_str(&format!(" ppl, context {from}-{to} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(segments.len()));
    out.push('\n');
    for r in rows {
        out.push_str(&format!("| {} |", r.config));
        for p in segment_perplexities(&r.nll, window.prefill, &segments) {
            out.push_str(&format!(" {p:.3} |"));
        }
        out.push('\n');
    }
    out
}

/// Mean negative log-likelihood in bins of scored positions, against context length, and the
/// same minus the default cache's (the first row): what `eval --plot` draws.
pub fn charts(rows: &[EvalRow], window: EvalWindow) -> Vec<crate::cli::plot::Chart> {
    use crate::cli::plot::{Chart, Series};
    let bin = (window.score / 100).max(16);
    let binned = |nll: &[f64]| -> Vec<(f64, f64)> {
        nll.chunks(bin)
            .enumerate()
            .map(|(i, c)| {
                let center = window.prefill + i * bin + c.len() / 2;
                (center as f64, c.iter().sum::<f64>() / c.len() as f64)
            })
            .collect()
    };
    let reference = rows.first().map(|r| binned(&r.nll)).unwrap_or_default();
    let mut absolute = Vec::new();
    let mut excess = Vec::new();
    for r in rows {
        let points = binned(&r.nll);
        excess.push(Series {
            label: r.config.clone(),
            points: points
                .iter()
                .zip(&reference)
                .map(|(&(x, y), &(_, d))| (x, y - d))
                .collect(),
        });
        absolute.push(Series {
            label: r.config.clone(),
            points,
        });
    }
    let mut charts = vec![
        Chart {
            title: format!("Log-perplexity by position (bins of {bin} tokens)"),
            x_label: "context (tokens cached before the scored token)".into(),
            y_label: "mean negative log-likelihood (nats)".into(),
            series: absolute,
        },
        Chart {
            title: "Excess over the default cache".into(),
            x_label: "context (tokens cached before the scored token)".into(),
            y_label: "nats per token above default".into(),
            series: excess,
        },
    ];
    let default_perplexity = rows.first().map(|r| r.perplexity);
    let quality: Vec<(String, Option<f64>, f64)> = rows
        .iter()
        .skip(1)
        .map(|r| {
            let excess = default_perplexity.map_or(f64::NAN, |d| 100.0 * (r.perplexity / d - 1.0));
            (r.config.clone(), r.bits_per_value_4k, excess)
        })
        .collect();
    if let Some(chart) = pareto_chart(
        "Perplexity excess against memory",
        "perplexity above the default cache (%)",
        &quality,
        false,
        None,
    ) {
        charts.push(chart);
    }
    charts
}

/// Quality against bits per cached value at 4k tokens: one point per configuration that
/// records its bits, and the Pareto front through those no other point beats on both (fewer
/// or equal bits and better quality). `None` when fewer than one point has its bits.
/// `reference`, if given, is drawn as a horizontal line across the points (the default cache).
fn pareto_chart(
    title: &str,
    y_label: &str,
    points: &[(String, Option<f64>, f64)],
    higher_is_better: bool,
    reference: Option<(String, f64)>,
) -> Option<crate::cli::plot::Chart> {
    use crate::cli::plot::{Chart, Series};
    let mut placed: Vec<(&str, f64, f64)> = points
        .iter()
        .filter_map(|(label, bits, y)| Some((label.as_str(), (*bits)?, *y)))
        .filter(|(_, x, y)| x.is_finite() && y.is_finite())
        .collect();
    if placed.is_empty() {
        return None;
    }
    placed.sort_by(|a, b| a.1.total_cmp(&b.1));
    let better = |a: f64, b: f64| if higher_is_better { a > b } else { a < b };
    let mut front: Vec<(f64, f64)> = Vec::new();
    for &(_, x, y) in &placed {
        if front.last().is_none_or(|&(_, best)| better(y, best)) {
            front.push((x, y));
        }
    }
    let (lo, hi) = (placed[0].1, placed[placed.len() - 1].1);
    let mut series = vec![Series {
        label: "Pareto front".into(),
        points: front,
    }];
    if let Some((label, y)) = reference {
        series.push(Series {
            label,
            points: vec![(lo, y), (hi, y)],
        });
    }
    series.extend(points.iter().filter_map(|(label, bits, y)| {
        Some(Series {
            label: format!("{label} ({:.2} bits)", (*bits)?),
            points: vec![((*bits)?, *y)],
        })
    }));
    Some(Chart {
        title: title.into(),
        x_label: "bits per cached value at 4k tokens (16-bit model, all overhead)".into(),
        y_label: y_label.into(),
        series,
    })
}

/// A table cell for bits per value: two decimals, or "-" where the run did not record them.
fn bits_cell(bits: Option<f64>) -> String {
    bits.map_or_else(|| "-".into(), |b| format!("{b:.2}"))
}

/// A Markdown table of the rows, with bootstrap 95% intervals (blocks of 32 scored tokens; the
/// ratio paired by position against the first row, the default cache).
pub fn table(rows: &[EvalRow]) -> String {
    let mut out = String::from(
        "| config | bits/value at 4k | full precision | perplexity [95% CI] | vs default [95% CI] | KL vs default | top-1 agreement | cache bytes | vs default |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let Some(first) = rows.first() else {
        return out;
    };
    let reference = first.nll.as_slice();
    for r in rows {
        let ppl_ci = interval_cell(perplexity_interval(&r.nll));
        let ratio = r.perplexity / first.perplexity;
        let ratio_ci = interval_cell(perplexity_ratio_interval(&r.nll, reference));
        out.push_str(&format!(
            "| {} | {} | {} | {:.3} {ppl_ci} | {:.4} {ratio_ci} | {:.4} | {:.3} | {} | {:.2}x smaller |\n",
            r.config,
            bits_cell(r.bits_per_value_4k),
            fraction_cell(r.full_precision_fraction),
            r.perplexity,
            ratio,
            r.kl_vs_default,
            r.top1_agreement,
            r.cache_bytes,
            r.dense_cache_bytes as f64 / r.cache_bytes.max(1) as f64
        ));
    }
    out
}

/// A bootstrap interval, or `-` where there was nothing to resample.
fn interval_cell(interval: Option<Interval>) -> String {
    interval.map_or("-".into(), |i| format!("{i:.3}"))
}

/// A fraction of cached tokens as a percentage, `-` where the cache did not report it.
fn fraction_cell(fraction: Option<f64>) -> String {
    fraction.map_or("-".into(), |f| format!("{:.1}%", 100.0 * f))
}

/// One configuration's row of a retrieval table: its memory and its scores, column by column.
struct ScoreRow<'a> {
    config: &'a str,
    memory: &'a RowMemory,
    columns: Vec<Vec<f64>>,
}

/// A Markdown table of retrieval scores: per column, the mean score with its interval (how many
/// scored 1, called `whole`), and its ratio to the first row's (the default cache), paired.
fn score_table(headers: &[String], whole: &str, rows: &[ScoreRow<'_>]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let mut out = String::from("| config | bits/value at 4k | full precision (last prompt) |");
    for h in headers {
        out.push_str(&format!(" {h} [95% CI] | vs default [95% CI] |"));
    }
    out.push_str(" KV bytes (last prompt) | vs default |\n|---|---|---|");
    out.push_str(&"---|---|".repeat(headers.len()));
    out.push_str("---|---|\n");
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} |",
            r.config,
            bits_cell(r.memory.bits_per_value_4k),
            fraction_cell(r.memory.full_precision_fraction)
        ));
        for (scores, reference) in r.columns.iter().zip(&first.columns) {
            let ratio = if mean(reference) > 0.0 {
                format!(
                    "{:.2} {}",
                    mean(scores) / mean(reference),
                    mean_ratio_interval(scores, reference)
                        .map_or("-".into(), |i| format!("{i:.2}"))
                )
            } else {
                "-".into()
            };
            out.push_str(&format!(
                " {:.3} {} ({}/{} {whole}) | {ratio} |",
                mean(scores),
                interval_cell(mean_interval(scores)),
                scores.iter().filter(|&&s| s == 1.0).count(),
                scores.len()
            ));
        }
        out.push_str(&format!(
            " {} | {:.2}x smaller |\n",
            r.memory.cache_bytes,
            r.memory.dense_cache_bytes as f64 / r.memory.cache_bytes.max(1) as f64
        ));
    }
    out
}

/// A Markdown table: mean score (verbatim copies) per filler length, and its ratio to the
/// default cache's (the first row).
pub fn copy_table(rows: &[CopyRow]) -> String {
    let headers: Vec<String> = rows.first().map_or(Vec::new(), |r| {
        r.cells
            .iter()
            .map(|c| format!("copy, {} filler", c.filler))
            .collect()
    });
    let rows: Vec<ScoreRow<'_>> = rows
        .iter()
        .map(|r| ScoreRow {
            config: &r.config,
            memory: &r.memory,
            columns: r.cells.iter().map(|c| c.scores.clone()).collect(),
        })
        .collect();
    score_table(&headers, "verbatim", &rows)
}

/// The lengths of a needle run, in order.
fn needle_lengths(row: &NeedleRow) -> Vec<usize> {
    let mut lengths: Vec<usize> = row.cells.iter().map(|c| c.length).collect();
    lengths.dedup();
    lengths
}

/// A Markdown table of the needle task: mean score over every depth (keys found whole) per
/// length, and its ratio to the default cache's (the first row), with intervals.
pub fn needle_table(rows: &[NeedleRow]) -> String {
    let lengths = rows.first().map(needle_lengths).unwrap_or_default();
    let headers: Vec<String> = lengths.iter().map(|l| format!("key, {l} tokens")).collect();
    let rows: Vec<ScoreRow<'_>> = rows
        .iter()
        .map(|r| ScoreRow {
            config: &r.config,
            memory: &r.memory,
            columns: lengths.iter().map(|&l| r.scores_at_length(l)).collect(),
        })
        .collect();
    score_table(&headers, "whole", &rows)
}

/// The needle task by depth: one row per (configuration, length), the mean score at each depth.
pub fn needle_depth_table(rows: &[NeedleRow]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let mut depths: Vec<usize> = first.cells.iter().map(|c| c.depth).collect();
    depths.sort_unstable();
    depths.dedup();
    let mut out = String::from("| config | length |");
    for d in &depths {
        out.push_str(&format!(" depth {d}% |"));
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(depths.len()));
    out.push('\n');
    for r in rows {
        for l in needle_lengths(r) {
            out.push_str(&format!("| {} | {l} |", r.config));
            for &d in &depths {
                match r.cells.iter().find(|c| c.length == l && c.depth == d) {
                    Some(c) => out.push_str(&format!(" {:.2} |", c.mean)),
                    None => out.push_str(" - |"),
                }
            }
            out.push('\n');
        }
    }
    out
}

/// Mean needle score (all depths) against prompt length, one line per configuration.
pub fn needle_charts(rows: &[NeedleRow]) -> Vec<crate::cli::plot::Chart> {
    use crate::cli::plot::{Chart, Series};
    vec![Chart {
        title: "Pass key found, all depths".into(),
        x_label: "prompt length (tokens)".into(),
        y_label: "fraction of the key's digits right before the first error".into(),
        series: rows
            .iter()
            .map(|r| {
                let points = needle_lengths(r)
                    .into_iter()
                    .map(|l| {
                        let scores = r.scores_at_length(l);
                        let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
                        (l as f64, mean)
                    })
                    .collect();
                Series {
                    label: r.config.clone(),
                    points,
                }
            })
            .collect(),
    }]
}

/// Mean copy score against filler length, one line per configuration.
pub fn copy_charts(rows: &[CopyRow]) -> Vec<crate::cli::plot::Chart> {
    use crate::cli::plot::{Chart, Series};
    let mut charts = vec![Chart {
        title: "Copy score after a filler".into(),
        x_label: "filler (tokens between the passage and its repetition)".into(),
        y_label: "fraction of words copied before the first error".into(),
        series: rows
            .iter()
            .map(|r| Series {
                label: r.config.clone(),
                points: r.cells.iter().map(|c| (c.filler as f64, c.mean)).collect(),
            })
            .collect(),
    }];
    // The Pareto panel at the longest filler: where quantization error hurts retrieval most.
    let at_longest = |r: &CopyRow| r.cells.last().map(|c| (c.filler, c.mean));
    if let Some((filler, default_score)) = rows.first().and_then(at_longest) {
        let quality: Vec<(String, Option<f64>, f64)> = rows
            .iter()
            .skip(1)
            .filter_map(|r| {
                Some((
                    r.config.clone(),
                    r.memory.bits_per_value_4k,
                    at_longest(r)?.1,
                ))
            })
            .collect();
        let reference = (format!("{} (16 bits)", rows[0].config), default_score);
        if let Some(chart) = pareto_chart(
            &format!("Copy score at {filler} filler against memory"),
            "fraction of words copied before the first error",
            &quality,
            true,
            Some(reference),
        ) {
            charts.push(chart);
        }
    }
    charts
}

#[cfg(test)]
mod tests {
    use super::*;
    use mistralrs_logquant::config::LogQuantConfig;

    /// Hand-made points: the front keeps each point that beats every one with fewer bits.
    #[test]
    fn the_pareto_front_keeps_the_undominated_points() {
        let points = vec![
            ("c".to_string(), Some(4.0), 0.9),
            ("a".to_string(), Some(3.0), 0.5),
            ("b".to_string(), Some(3.5), 0.4),
            ("no bits".to_string(), None, 1.0),
        ];
        let chart = pareto_chart("t", "y", &points, true, Some(("ref".into(), 0.8))).unwrap();
        assert_eq!(chart.series[0].points, vec![(3.0, 0.5), (4.0, 0.9)]);
        assert_eq!(chart.series[1].points, vec![(3.0, 0.8), (4.0, 0.8)]);
        // One single-point series per configuration with bits, labelled with them.
        let labels: Vec<&str> = chart.series[2..].iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["c (4.00 bits)", "a (3.00 bits)", "b (3.50 bits)"]);
        // Lower is better (perplexity excess): the dominated point is now 'c'.
        let chart = pareto_chart("t", "y", &points, false, None).unwrap();
        assert_eq!(chart.series[0].points, vec![(3.0, 0.5), (3.5, 0.4)]);
        assert!(pareto_chart("t", "y", &points[3..], true, None).is_none());
    }

    #[test]
    fn config_entries_take_colon_separated_options() {
        let cache = CacheArgs::default();
        let parse = |entry: &str| parse_configs(&[entry.to_string()], &cache);
        let KvCacheChoice::LogQuant(c) = parse("logquant:k3v2:kg128:rot").unwrap().remove(0) else {
            panic!("not logquant")
        };
        assert_eq!(
            (c.key_bits(), c.value_bits(), c.key_group_size()),
            (3, 2, 128)
        );
        assert!(c.rotate);
        let KvCacheChoice::LogQuant(c) = parse("recent:8:r64:g32").unwrap().remove(0) else {
            panic!("not logquant")
        };
        assert_eq!(
            (c.key_bits(), c.value_bits(), c.recent, c.group_size),
            (8, 8, 64, 32)
        );
        assert_eq!(parse("default").unwrap(), vec![KvCacheChoice::Default]);
        // `paper` is the paper's setting; options apply on top of it.
        let KvCacheChoice::LogQuant(c) = parse("paper").unwrap().remove(0) else {
            panic!("not logquant")
        };
        assert_eq!(c.describe(), LogQuantConfig::paper().describe());
        let KvCacheChoice::LogQuant(c) = parse("logquant:norot").unwrap().remove(0) else {
            panic!("not logquant")
        };
        assert_eq!((c.key_bits(), c.rotate), (4, false));
        for bad in ["logquant:k9v2", "logquant:zz", "logquant:kxv2", "nope"] {
            let err = format!("{:#}", parse(bad).unwrap_err());
            assert!(
                err.contains("--configs") || err.contains("--kv-"),
                "{bad}: {err}"
            );
        }
    }
}
