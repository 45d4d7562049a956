//! The independent Python oracles of `scripts/` (numpy, sentencepiece, llama.cpp's `gguf`
//! reader), run from a virtual environment under the target directory that is created from
//! `scripts/oracle-requirements.txt` on first use (pip, from the configured package index) and
//! recreated when that file changes. `PYTHON` names the interpreter (default `python3`).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn requirements() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/oracle-requirements.txt")
}

fn run(command: &mut Command, what: &str) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}

/// The virtual environment's interpreter, set up on first use.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oracle-venv");
        let bin = venv.join("bin/python");
        let wanted = std::fs::read_to_string(requirements()).expect("oracle requirements");
        let stamp = venv.join("installed-requirements.txt");
        if bin.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
            return bin;
        }
        let _ = std::fs::remove_dir_all(&venv);
        let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(
            Command::new(&system).args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        );
        run(
            Command::new(&bin)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(requirements())
                .stdin(Stdio::null()),
            "pip install -r scripts/oracle-requirements.txt",
        );
        std::fs::write(&stamp, wanted).unwrap();
        bin
    })
}

/// Run `scripts/<script> args...` with `input` as JSON on its standard input; its standard
/// output, parsed as JSON.
pub fn oracle(script: &str, args: &[&str], input: &serde_json::Value) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let mut child = Command::new(python())
        .arg(&path)
        .args(args)
        .env("OMP_NUM_THREADS", "2")
        .env("OPENBLAS_NUM_THREADS", "2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {script}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let body = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(body.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{script} printed no JSON ({e})"))
}
