//! `report`: the tables and plot of an earlier `eval --json` or `bench --json` run, without
//! running anything again.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use super::{bench, eval};
use crate::cli::plot::svg;
use mistralrs_logquant::bench::{BenchReport, BenchRow};
use mistralrs_logquant::eval::{EvalRow, EvalWindow};
use mistralrs_logquant::needle::{NeedleRow, NeedleSettings};
use mistralrs_logquant::provenance::RunInfo;
use mistralrs_logquant::retrieval::{CopyRow, CopySettings};

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
    /// `eval --task copy --json` (listed first: its fields are a superset of none other).
    Copy {
        #[allow(dead_code)]
        task: String,
        settings: CopySettings,
        rows: Vec<CopyRow>,
        #[serde(default)]
        run: Option<RunInfo>,
    },
    /// `eval --task needle --json` (before `Eval`: its rows hold cells, not perplexities).
    Needle {
        #[allow(dead_code)]
        task: String,
        settings: NeedleSettings,
        rows: Vec<NeedleRow>,
        #[serde(default)]
        run: Option<RunInfo>,
    },
    Eval {
        window: EvalWindow,
        rows: Vec<EvalRow>,
        /// What the run ran on (absent in JSON written before it was recorded).
        #[serde(default)]
        run: Option<RunInfo>,
    },
    Bench(BenchReport),
    /// `bench --json` before the budget runs existed: a bare list of rows.
    BenchRows(Vec<BenchRow>),
}

impl Input {
    /// What the run ran on, when the JSON records it.
    fn run(&self) -> Option<&RunInfo> {
        match self {
            Self::Copy { run, .. } | Self::Needle { run, .. } | Self::Eval { run, .. } => {
                run.as_ref()
            }
            Self::Bench(report) => report.run.as_ref(),
            Self::BenchRows(_) => None,
        }
    }
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
    match input.run() {
        Some(run) => println!("run: {}\n", run.summary()),
        None => println!("run: not recorded\n"),
    }
    let charts = match input {
        Input::Copy { settings, rows, .. } => {
            println!("copy task: {settings:?}\n");
            print!("{}", eval::copy_table(&rows));
            eval::copy_charts(&rows)
        }
        Input::Needle { settings, rows, .. } => {
            println!("needle task: {settings:?}\n");
            print!("{}", eval::needle_table(&rows));
            println!();
            print!("{}", eval::needle_depth_table(&rows));
            eval::needle_charts(&rows)
        }
        Input::Eval { window, rows, .. } => {
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

#[cfg(test)]
mod provenance_tests {
    use super::*;

    /// The results committed in docs/data/ (written before runs recorded their conditions) still
    /// read, and a run's record reads back from bench and eval JSON.
    #[test]
    fn committed_results_and_recorded_runs_both_read() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join("data");
        let mut read = 0;
        for entry in std::fs::read_dir(&docs).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).unwrap();
                serde_json::from_str::<Input>(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                read += 1;
            }
        }
        assert!(read > 0, "no JSON in {}", docs.display());
        let run = RunInfo {
            commit: "abc".into(),
            threads: 2,
            ..RunInfo::default()
        };
        let bench = BenchReport {
            run: Some(run.clone()),
            ..BenchReport::default()
        };
        let back: Input = serde_json::from_str(&serde_json::to_string(&bench).unwrap()).unwrap();
        assert!(matches!(back, Input::Bench(_)));
        assert_eq!(back.run(), Some(&run));
        let eval = serde_json::json!({
            "window": EvalWindow { start: 0, prefill: 1, score: 1 },
            "rows": [],
            "run": run,
        });
        let back: Input = serde_json::from_str(&eval.to_string()).unwrap();
        assert!(matches!(back, Input::Eval { .. }));
        assert_eq!(back.run(), Some(&run));
    }
}
