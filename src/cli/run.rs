//! `run`: answer one prompt (`-i`) or chat in the terminal, streaming the reply.

use std::io::{BufRead, Write};

use anyhow::{bail, Result};
use clap::Args;
use mistralrs::{Model, RequestBuilder, Response, TextMessageRole};

use super::{CacheArgs, ModelArgs};
use mistralrs_logquant::engine::build_engine;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// One prompt: print the reply and exit. Without it, chat until end of input.
    #[arg(short = 'i', long)]
    pub input: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
}

pub async fn run(args: RunArgs) -> Result<()> {
    let cache = args.cache.resolve()?;
    args.model.validate()?;
    if args.max_tokens == 0 {
        bail!("invalid value `0` for --max-tokens (allowed: an integer >= 1)");
    }
    if !(0.0..=2.0).contains(&args.temperature) {
        bail!(
            "invalid value `{}` for --temperature (allowed: 0 to 2)",
            args.temperature
        );
    }
    let options = args.model.engine_options(cache.clone()).await?;
    let model = Model::new(build_engine(&options).await?);
    eprintln!(
        "{} with the {} KV cache",
        options.model.model_id(),
        cache.label()
    );

    let mut history: Vec<(TextMessageRole, String)> = Vec::new();
    if let Some(prompt) = &args.input {
        history.push((TextMessageRole::User, prompt.clone()));
        reply(&model, &history, &args).await?;
        return Ok(());
    }
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/exit" || line == "/quit" {
            return Ok(());
        }
        history.push((TextMessageRole::User, line.to_string()));
        let answer = reply(&model, &history, &args).await?;
        history.push((TextMessageRole::Assistant, answer));
    }
}

/// Stream one reply to stdout and return it.
async fn reply(
    model: &Model,
    history: &[(TextMessageRole, String)],
    args: &RunArgs,
) -> Result<String> {
    // The length limit goes last: `set_deterministic_sampler` replaces every sampling
    // parameter, the limit included.
    let request = if args.temperature == 0.0 {
        RequestBuilder::new().set_deterministic_sampler()
    } else {
        RequestBuilder::new().set_sampler_temperature(args.temperature)
    };
    let mut request = request.set_sampler_max_len(args.max_tokens);
    for (role, text) in history {
        request = request.add_message(role.clone(), text);
    }
    let mut stream = model.stream_chat_request(request).await?;
    let mut answer = String::new();
    let mut out = std::io::stdout();
    while let Some(response) = stream.next().await {
        match response {
            Response::Chunk(chunk) => {
                if let Some(text) = chunk.choices.first().and_then(|c| c.delta.content.as_ref()) {
                    answer.push_str(text);
                    out.write_all(text.as_bytes())?;
                    out.flush()?;
                }
                if chunk.choices.iter().any(|c| c.finish_reason.is_some()) {
                    break;
                }
            }
            Response::ModelError(msg, _) => bail!("model error: {msg}"),
            Response::InternalError(e) => bail!("engine error: {e}"),
            Response::ValidationError(e) => bail!("invalid request: {e}"),
            _ => {}
        }
    }
    writeln!(out)?;
    Ok(answer)
}
