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
    if !matches!(cli.command, Command::Serve(_)) {
        exit_quietly_on_a_closed_pipe();
    }
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

/// `report x.json | head` closes stdout early: end as the shell expects (killed by SIGPIPE)
/// instead of panicking in `println!`. Rust ignores SIGPIPE at start; the default action is
/// restored for the commands that print results. The server keeps it ignored: a client going
/// away must never stop it.
fn exit_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: `signal` only sets the process's disposition of SIGPIPE to the default action;
    // no handler of ours runs, so no async-signal-safety question arises.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
