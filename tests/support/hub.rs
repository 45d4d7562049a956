//! A model hub on 127.0.0.1 in the Hugging Face hub's URL layout, serving the files of one
//! local directory as one repository at one revision: what the hub client (hf-hub 0.4.3, sync)
//! asks for, and nothing more.
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}`: `{"sha": COMMIT, "siblings": [{"rfilename"}]}`
//! - `GET /{org}/{name}/resolve/{rev}/{file}`, with `Range: bytes=a-b` or `bytes=a-` answered
//!   206 with `Content-Range`, and the `x-repo-commit` and `etag` headers the client requires.
//!
//! Anything else is a 404. Every request is counted, so a test can show that a start made none.
#![allow(dead_code)]

#[path = "local_http.rs"]
mod local_http;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use local_http::LocalHttp;
use sha2::{Digest, Sha256};

/// The commit every file of the repository is served at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct Repo {
    id: String,
    revision: String,
    /// File name -> (content, sha256 hex: the etag).
    files: HashMap<String, (Vec<u8>, String)>,
    requests: AtomicUsize,
}

/// A running hub; stops when dropped.
pub struct FakeHub {
    pub endpoint: String,
    repo: Arc<Repo>,
    _server: LocalHttp,
}

impl FakeHub {
    /// Serve every file of `dir` as repository `id` at `revision`.
    pub fn start(id: &str, revision: &str, dir: &Path) -> Self {
        let files = std::fs::read_dir(dir)
            .expect("model dir")
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                let etag = hex::encode(Sha256::digest(&bytes));
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, (bytes, etag))
            })
            .collect();
        let repo = Arc::new(Repo {
            id: id.to_string(),
            revision: revision.to_string(),
            files,
            requests: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/{*path}", get(answer))
            .with_state(repo.clone());
        let server = LocalHttp::start(app);
        Self {
            endpoint: server.base.clone(),
            repo,
            _server: server,
        }
    }

    /// Requests answered so far (any path, any status).
    pub fn requests(&self) -> usize {
        self.repo.requests.load(Ordering::SeqCst)
    }
}

fn not_found() -> Response {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from("{\"error\":\"Repository not found\"}"))
        .unwrap()
}

async fn answer(
    State(repo): State<Arc<Repo>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    repo.requests.fetch_add(1, Ordering::SeqCst);
    let info_prefix = format!("api/models/{}/revision/", repo.id);
    if let Some(revision) = path.strip_prefix(&info_prefix) {
        if revision != repo.revision {
            return not_found();
        }
        let mut names: Vec<&String> = repo.files.keys().collect();
        names.sort();
        let siblings: Vec<serde_json::Value> = names
            .iter()
            .map(|n| serde_json::json!({ "rfilename": n }))
            .collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
    }
    let file_prefix = format!("{}/resolve/{}/", repo.id, repo.revision);
    let Some((bytes, etag)) = path
        .strip_prefix(&file_prefix)
        .and_then(|name| repo.files.get(name))
    else {
        return not_found();
    };
    let total = bytes.len();
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(start, end)| {
            let start: usize = start.parse().ok()?;
            let end = if end.is_empty() {
                total.checked_sub(1)?
            } else {
                end.parse::<usize>().ok()?.min(total.checked_sub(1)?)
            };
            (start <= end).then_some((start, end))
        });
    let builder = Response::builder()
        .header("x-repo-commit", COMMIT)
        .header("etag", format!("\"{etag}\""));
    match range {
        Some((start, end)) => builder
            .status(StatusCode::PARTIAL_CONTENT)
            .header("content-range", format!("bytes {start}-{end}/{total}"))
            .body(Body::from(bytes[start..=end].to_vec()))
            .unwrap(),
        None => builder.body(Body::from(bytes.clone())).unwrap(),
    }
}
