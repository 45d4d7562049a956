//! `mistralrs-logquant`: mistral.rs with a LogQuant KV cache.

mod cli;

use clap::Parser;
use cli::{Cli, Command};

#[tokio::main]
async fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return;
        }
        Err(e) => {
            eprintln!("error: {}", cli::clap_error_line(&e));
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => cli::serve::serve(args).await,
        Command::Run(args) => cli::run::run(args).await,
        Command::Eval(args) => cli::eval::eval(args).await,
        Command::Bench(args) => cli::bench::run(args).await,
        Command::Report(args) => cli::report::report(args),
    };
    if let Err(err) = result {
        let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}
