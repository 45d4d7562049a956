//! Models named by their Hugging Face hub id (`-m org/name`, `--revision`): the repository's
//! safetensors snapshot is fetched once into the standard hub cache, with a progress bar per
//! file, and the engine then loads it as a local directory, so mistral.rs itself never reaches
//! the network from a request or a load.
//!
//! Environment, as the hub's own clients read it: `HF_ENDPOINT` (the hub's base URL),
//! `HF_HUB_CACHE` > `HF_HOME/hub` > the per-user default (the cache directory, in the hub's
//! `models--org--name/{blobs,refs,snapshots}` layout), `HF_TOKEN` > `HF_HUB_TOKEN` > the token
//! file in `HF_HOME` (gated and private models).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};

/// The revision a hub id names when `--revision` is not given.
pub const DEFAULT_REVISION: &str = "main";

/// Whether `name` reads as a hub id (`name` or `org/name`, of the hub's characters) rather
/// than a path. A name that is also an existing path is a path: the caller checks that first.
pub fn looks_like_hub_id(name: &str) -> bool {
    let valid_part = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && !part.starts_with(['.', '-'])
            && !part.ends_with(['.', '-'])
            && !part.contains("..")
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = name.split('/').collect();
    matches!(parts.len(), 1 | 2)
        && parts.iter().all(|p| valid_part(p))
        && !name.to_ascii_lowercase().ends_with(".gguf")
}

/// Whether `name`, which is no hub id, was probably meant as one: it has a `/` but does not
/// start like a path (`/`, `.`, `~`) nor end like a file (`.gguf`, `.safetensors`, `.json`).
pub fn tries_a_hub_id(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.contains('/')
        && !name.starts_with(['/', '.', '~'])
        && ![".gguf", ".safetensors", ".json"]
            .iter()
            .any(|ext| lower.ends_with(ext))
}

/// The hub cache directory, as mistral.rs 0.8.1 resolves it (`pipeline/hf.rs`).
fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
        _ => Cache::from_env(),
    }
}

/// The token for gated or private models: `HF_TOKEN`, `HF_HUB_TOKEN`, then the token file.
fn hub_token(cache: &Cache) -> Option<String> {
    ["HF_TOKEN", "HF_HUB_TOKEN"]
        .iter()
        .filter_map(|var| std::env::var(var).ok())
        .map(|t| t.trim().to_string())
        .find(|t| !t.is_empty())
        .or_else(|| cache.token())
}

/// Files of a repository the loaders read: configuration, tokenizer, chat template, image
/// processor and safetensors weights. Other weight formats (`*.bin`, `*.gguf`, `*.onnx`) and
/// everything else are left on the hub.
pub fn wanted_file(name: &str) -> bool {
    if name.contains('/') {
        return false;
    }
    name.ends_with(".json")
        || name.ends_with(".safetensors")
        || name.ends_with(".jinja")
        || name == "tokenizer.model"
}

/// The snapshot directory of `repo` if every file the loaders need is in the cache: the
/// configuration, the tokenizer, and every weight file the index names (or one weight file).
fn complete_snapshot(repo: &CacheRepo) -> Option<PathBuf> {
    let dir = repo.get("config.json")?.parent()?.to_path_buf();
    is_complete(&dir).then_some(dir)
}

/// Whether snapshot directory `dir` holds the configuration, the tokenizer, and every weight
/// file the index names (or one weight file without an index).
fn is_complete(dir: &Path) -> bool {
    let has = |file: &str| dir.join(file).is_file();
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.is_file() {
        index_shards(&index).is_ok_and(|shards| shards.iter().all(|shard| has(shard)))
    } else {
        has("model.safetensors")
    };
    has("config.json") && has("tokenizer.json") && weights
}

/// A revision given as a full commit hash names its snapshot directory directly, whether or not
/// the cache has a ref for it (the hub's Python client stores a download by commit without one).
fn commit_snapshot(cache: &Cache, repo: &Repo, revision: &str) -> Option<PathBuf> {
    if revision.len() != 40 || !revision.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let dir = cache
        .path()
        .join(repo.folder_name())
        .join("snapshots")
        .join(revision);
    is_complete(&dir).then_some(dir)
}

/// The weight files a `model.safetensors.index.json` names.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// The local snapshot directory of hub model `id` at `revision`: taken from the cache when it
/// is complete there (no network), else fetched (progress bars on stderr) and then returned.
///
/// Errors, one line each: an unknown id or revision, a gated model without a token, an
/// unreachable hub, a repository without safetensors weights.
pub fn resolve_hub_model(id: &str, revision: &str) -> Result<PathBuf> {
    let cache = hub_cache();
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    if let Some(dir) = complete_snapshot(&cache.repo(repo.clone()))
        .or_else(|| commit_snapshot(&cache, &repo, revision))
    {
        tracing::info!(
            "model {id} ({revision}) found in the hub cache: {}",
            dir.display()
        );
        return Ok(dir);
    }
    let token = hub_token(&cache);
    let mut builder = ApiBuilder::from_cache(cache.clone())
        .with_token(token)
        .with_progress(true)
        .with_retries(2);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    let api = builder
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the hub client: {e}"))?;
    let remote = api.repo(repo.clone());
    let endpoint = endpoint_of(&remote, id);
    let info = remote
        .info()
        .map_err(|e| hub_error(e, id, revision, &endpoint))?;
    let files: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| wanted_file(f))
        .collect();
    for required in ["config.json", "tokenizer.json"] {
        if !files.iter().any(|f| f == required) {
            bail!("hub model {id} ({revision}) has no {required}: it is not a model mistral.rs loads from safetensors");
        }
    }
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        bail!(
            "hub model {id} ({revision}) has no *.safetensors weights (for a GGUF file, download \
             it and give its path to --model)"
        );
    }
    eprintln!(
        "Fetching {id} ({revision}, commit {}) from {endpoint}: {} files",
        info.sha,
        files.len()
    );
    for file in &files {
        remote
            .get(file)
            .map_err(|e| hub_error(e, id, revision, &endpoint))
            .with_context(|| format!("cannot fetch {file} of {id}"))?;
    }
    complete_snapshot(&cache.repo(repo)).with_context(|| {
        format!("hub model {id} ({revision}): the fetched snapshot is incomplete (a weight file the index names is missing on the hub)")
    })
}

/// The hub's base URL, from a file URL (`{endpoint}/{id}/resolve/{revision}/{file}`).
fn endpoint_of(remote: &ApiRepo, id: &str) -> String {
    let url = remote.url("config.json");
    url.split("/resolve/")
        .next()
        .and_then(|prefix| prefix.strip_suffix(&format!("/{id}")))
        .map(str::to_string)
        .unwrap_or(url)
}

/// One line for a hub client error, naming what the user can change.
fn hub_error(error: ApiError, id: &str, revision: &str, endpoint: &str) -> anyhow::Error {
    if let ApiError::RequestError(request) = &error {
        match request.as_ref() {
            ureq::Error::Status(401 | 403, _) => {
                let token_set = ["HF_TOKEN", "HF_HUB_TOKEN"]
                    .iter()
                    .any(|v| std::env::var(v).is_ok_and(|t| !t.trim().is_empty()));
                return if token_set {
                    anyhow::anyhow!(
                        "hub model {id} at {endpoint} refused the token in HF_TOKEN/HF_HUB_TOKEN \
                         (gated or private: the token's account needs access)"
                    )
                } else {
                    anyhow::anyhow!(
                        "hub model {id} is gated or private at {endpoint}: set HF_TOKEN to a \
                         token that may read it"
                    )
                };
            }
            ureq::Error::Status(404, _) => {
                return anyhow::anyhow!(
                    "no model {id} at revision {revision} on {endpoint} (check the id and \
                     --revision)"
                )
            }
            ureq::Error::Status(code, _) => {
                return anyhow::anyhow!("the hub at {endpoint} answered {code} for {id}")
            }
            ureq::Error::Transport(transport) => {
                let hint = if std::env::var_os("HF_ENDPOINT").is_some() {
                    "check HF_ENDPOINT"
                } else {
                    "set HF_ENDPOINT for a mirror"
                };
                return anyhow::anyhow!(
                    "cannot reach the hub at {endpoint} for {id} ({}; {hint}; a model already in \
                     the hub cache loads offline)",
                    transport.kind().to_string().to_lowercase()
                );
            }
        }
    }
    anyhow::anyhow!("hub model {id}: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        for id in ["google/gemma-3-270m", "gpt2", "some-org/tiny_model.v2"] {
            assert!(looks_like_hub_id(id), "{id}");
        }
        for not_id in [
            "./model",
            "/abs/path",
            "a/b/c",
            "model.gguf",
            "org/Model.GGUF",
            "",
            "org/",
            "../x",
            "org/..",
            "~/models/x",
        ] {
            assert!(!looks_like_hub_id(not_id), "{not_id}");
        }
    }

    #[test]
    fn a_mistyped_hub_id_is_told_from_a_path() {
        for meant_as_id in ["org/name/extra", "org/", "/name", "org//name"] {
            assert!(!looks_like_hub_id(meant_as_id), "{meant_as_id}");
        }
        for id_like in ["org/name/extra", "org/", "org//name"] {
            assert!(tries_a_hub_id(id_like), "{id_like}");
        }
        for path in [
            "/abs/model",
            "./dir/model",
            "~/m/x",
            "dir/model.gguf",
            "a/b.json",
        ] {
            assert!(!tries_a_hub_id(path), "{path}");
        }
    }

    #[test]
    fn only_loader_files_are_fetched() {
        for f in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "chat_template.jinja",
            "tokenizer.model",
        ] {
            assert!(wanted_file(f), "{f}");
        }
        for f in [
            "pytorch_model.bin",
            "model.gguf",
            "onnx/model.onnx",
            "README.md",
        ] {
            assert!(!wanted_file(f), "{f}");
        }
    }
}
