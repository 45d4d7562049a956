//! `--model org/name`: a model named by its hub id, fetched from a hub on 127.0.0.1 in the hub's
//! URL layout (`support/hub.rs`; `HF_ENDPOINT` points at it, `HF_HOME` starts empty), served by
//! the real server through mistral.rs's auto loader. Oracles: the same checkpoint loaded from
//! its local directory (greedy replies must be equal), the hub's request counter (a second start
//! with the hub gone makes none), and the hub cache's files on disk.

mod common;
#[path = "support/hub.rs"]
mod fake_hub;
#[path = "support/server.rs"]
mod server_process;
mod tiny;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fake_hub::{FakeHub, COMMIT};
use serde_json::{json, Value};
use server_process::{exited_within, Server, BIN};

const REPO: &str = "some-org/tiny-llama";
/// The hub client reads these (ureq ignores NO_PROXY): a proxy must not stand between the
/// server and 127.0.0.1.
const PROXY_VARS: [&str; 6] = [
    "ALL_PROXY",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "all_proxy",
    "https_proxy",
    "http_proxy",
];

/// The hub environment of a start: the endpoint and an own hub home.
fn hub_env(endpoint: &str, home: &Path) -> Vec<(String, String)> {
    vec![
        ("HF_ENDPOINT".into(), endpoint.into()),
        ("HF_HOME".into(), home.display().to_string()),
        (
            "HF_HUB_CACHE".into(),
            home.join("hub").display().to_string(),
        ),
        ("HF_TOKEN".into(), String::new()),
    ]
}

fn start(args: &[&str], env: &[(String, String)]) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_with_env_removed(args, &env, &PROXY_VARS)
}

/// A greedy completion of a fixed word prompt, and the model name the server answered with.
async fn greedy(server: &Server, model: &str) -> (String, String) {
    let prompt: Vec<String> = (10..40).map(|i| format!("w{i}")).collect();
    let (status, body) = server
        .post(
            "/v1/completions",
            json!({"model": model, "prompt": prompt.join(" "), "max_tokens": 12,
                   "temperature": 0})
            .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    (
        v["choices"][0]["text"].as_str().unwrap().to_string(),
        v["model"].as_str().unwrap().to_string(),
    )
}

/// The one line a refused start printed last on stderr.
fn refusal(args: &[&str], env: &[(String, String)]) -> String {
    let mut command = Command::new(BIN);
    for var in PROXY_VARS {
        command.env_remove(var);
    }
    let child = command
        .arg("serve")
        .args(["-p", "0"])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = exited_within(child, Duration::from_secs(120), "a refused hub id");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    stderr.lines().last().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_id_is_fetched_once_then_loads_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = tiny::Arch::Llama.write_safetensors(&tmp.path().join("checkpoint"));
    let home = tmp.path().join("hf-home");

    // The oracle: the checkpoint from its directory.
    let local = Server::start(&["-m", checkpoint.to_str().unwrap(), "--kv-group-size", "16"]);
    let (expected, _) = greedy(&local, "default").await;
    drop(local);
    assert!(!expected.trim().is_empty());

    let hub = FakeHub::start(REPO, "main", &checkpoint);
    let env = hub_env(&hub.endpoint, &home);
    let first = start(&["-m", REPO, "--kv-group-size", "16"], &env);
    let models = first.get_json("/v1/models").await;
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == REPO),
        "{models}"
    );
    let (reply, name) = greedy(&first, REPO).await;
    assert_eq!(reply, expected, "the hub copy must be the same model");
    assert_eq!(name, REPO);
    drop(first);
    let fetched = hub.requests();
    assert!(
        fetched >= 4,
        "info + config + tokenizer + weights: {fetched}"
    );
    let snapshot = home
        .join("hub/models--some-org--tiny-llama/snapshots")
        .join(COMMIT);
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(snapshot.join(file)).unwrap(),
            std::fs::read(checkpoint.join(file)).unwrap(),
            "{file} in the hub cache"
        );
    }

    // With the hub gone, the cache alone serves the model.
    let endpoint = hub.endpoint.clone();
    drop(hub);
    let env = hub_env(&endpoint, &home);
    let second = start(&["-m", REPO, "--kv-group-size", "16"], &env);
    let (reply, _) = greedy(&second, REPO).await;
    assert_eq!(reply, expected, "loaded from the hub cache");
    drop(second);
    // Named by its commit (the cache holds a ref for `main` only): still offline.
    let by_commit = start(
        &["-m", REPO, "--revision", COMMIT, "--kv-group-size", "16"],
        &env,
    );
    let (reply, _) = greedy(&by_commit, REPO).await;
    assert_eq!(reply, expected, "loaded by commit from the hub cache");
    drop(by_commit);

    // --isq quantizes the weights at load (mistral.rs's own log line says so) and answers.
    let mut isq_env = env.clone();
    isq_env.push(("RUST_LOG".into(), "warn,mistralrs_core=info".into()));
    let quantized = start(
        &["-m", REPO, "--kv-group-size", "16", "--isq", "q8_0"],
        &isq_env,
    );
    let (reply, _) = greedy(&quantized, REPO).await;
    assert!(!reply.trim().is_empty());
    let log = quantized.stderr.lock().unwrap().join("\n");
    assert!(
        log.contains("Applying ISQ to Some(Q8_0)"),
        "no ISQ log line in:\n{log}"
    );
}

#[test]
fn unknown_ids_and_revisions_get_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = tiny::Arch::Llama.write_safetensors(&tmp.path().join("checkpoint"));
    let hub = FakeHub::start(REPO, "main", &checkpoint);
    let env = hub_env(&hub.endpoint, &tmp.path().join("hf-home"));

    let line = refusal(&["-m", "some-org/missing"], &env);
    assert!(
        line.contains("no model some-org/missing at revision main on http://127.0.0.1:"),
        "{line}"
    );
    let line = refusal(&["-m", REPO, "--revision", "v9"], &env);
    assert!(
        line.contains("no model some-org/tiny-llama at revision v9"),
        "{line}"
    );

    // Refused before any download: ISQ on a GGUF model, a revision for a local model.
    let before = hub.requests();
    let mistralrs_logquant::model_source::ModelSource::Gguf(gguf) = common::model() else {
        panic!("the default model is a GGUF file")
    };
    let line = refusal(&["-m", gguf.to_str().unwrap(), "--isq", "q8_0"], &env);
    assert!(
        line.contains("--isq q8_0: in-situ quantization applies to safetensors"),
        "{line}"
    );
    let line = refusal(&["-m", REPO, "--isq", "q9z"], &env);
    assert!(line.contains("invalid value `q9z` for --isq"), "{line}");
    let line = refusal(
        &["-m", checkpoint.to_str().unwrap(), "--revision", "main"],
        &env,
    );
    assert!(line.contains("--revision applies to hub ids"), "{line}");
    let line = refusal(&["-m", REPO, "--revision", ""], &env);
    assert!(line.contains("--revision is empty"), "{line}");
    let line = refusal(&["-m", "some-org/tiny/extra"], &env);
    assert!(line.contains("not a hub id"), "{line}");
    let line = refusal(&["-m", ""], &env);
    assert!(line.contains("--model is empty"), "{line}");
    // An architecture mistral.rs 0.8.1 has no loader for: its own one line.
    let unknown = tmp.path().join("unknown-architecture");
    std::fs::create_dir_all(&unknown).unwrap();
    for file in ["tokenizer.json", "model.safetensors"] {
        std::fs::copy(checkpoint.join(file), unknown.join(file)).unwrap();
    }
    std::fs::write(
        unknown.join("config.json"),
        r#"{"architectures": ["FooBarForCausalLM"], "hidden_size": 8}"#,
    )
    .unwrap();
    let line = refusal(
        &["-m", unknown.to_str().unwrap(), "--kv-cache", "default"],
        &env,
    );
    assert!(
        line.contains("cannot load model unknown-architecture")
            && line.contains("`FooBarForCausalLM`"),
        "{line}"
    );
    assert_eq!(hub.requests(), before, "refused before reaching the hub");

    // The hub unreachable, nothing cached: one line naming the endpoint.
    let endpoint = hub.endpoint.clone();
    drop(hub);
    let line = refusal(
        &["-m", REPO],
        &hub_env(&endpoint, &tmp.path().join("empty")),
    );
    assert!(
        line.contains(&format!("cannot reach the hub at {endpoint}")),
        "{line}"
    );
}
