//! `report`: the tables and plot of an earlier `eval --json` or `bench --json` run, without
//! running anything again.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::bench::{self, BenchReport, BenchRow};
use crate::eval::{self, EvalRow, EvalWindow};
use crate::plot::svg;

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// JSON written by `eval --json` or `bench --json`.
    pub input: PathBuf,
    /// Write an SVG plot here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// The JSON shapes this command reads.
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Eval {
        window: EvalWindow,
        rows: Vec<EvalRow>,
    },
    Bench(BenchReport),
    /// `bench --json` before the budget runs existed: a bare list of rows.
    BenchRows(Vec<BenchRow>),
}

pub fn report(args: ReportArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let input: Input = match serde_json::from_str(&text) {
        Ok(input) => input,
        Err(e) => bail!(
            "{} is not the JSON of `eval --json` or `bench --json` ({e})",
            args.input.display()
        ),
    };
    let charts = match input {
        Input::Eval { window, rows } => {
            print!("{}", eval::table(&rows));
            println!();
            print!("{}", eval::segment_table(&rows, window));
            eval::charts(&rows, window)
        }
        Input::Bench(report) => {
            print!("{}", bench::table(&report.rows));
            if !report.budget.is_empty() {
                println!();
                print!("{}", bench::budget_table(&report.budget));
            }
            bench::charts(&report.rows)
        }
        Input::BenchRows(rows) => {
            print!("{}", bench::table(&rows));
            bench::charts(&rows)
        }
    };
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&charts))
            .with_context(|| format!("cannot write --plot {}", path.display()))?;
    }
    Ok(())
}
