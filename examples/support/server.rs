//! A `mistralrs-logquant serve` child process on 127.0.0.1 for the serving examples (soak,
//! chat_turns), found by the line it prints ("... on http://ADDR"); killed on drop. Included
//! with `#[path]`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

/// The release binary the examples start unless told otherwise.
pub const DEFAULT_BIN: &str = "target/release/mistralrs-logquant";

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve -p 0 FLAGS...` from `bin`, once it reports its address.
pub fn start<S: AsRef<std::ffi::OsStr>>(bin: &std::path::Path, flags: &[S]) -> Result<Server> {
    let mut child = Command::new(bin)
        .args(["serve", "-p", "0"])
        .args(flags)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.split("on http://").nth(1) {
                let _ = tx.send(format!("http://{}", url.trim()));
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(600))
        .context("the server did not report its address")?;
    Ok(Server { child, base })
}
