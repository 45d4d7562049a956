//! Media parts of chat requests (`image_url`, `audio_url`, `video_url`, ...), checked before
//! mistralrs-server-core sees them.
//!
//! mistralrs-server-core loads a part's `url` itself: it opens any path or `file://` URL on the
//! server's disk and fetches any http(s) URL, loopback included, and its errors differ between
//! an existing and a missing file. Here, instead:
//! - a model that does not read a part's modality (every text-only model) refuses the part with
//!   one line, before anything is opened or fetched;
//! - for a model that does, every URL is resolved by this module into a `data:` URL, so the
//!   stock loader never touches the disk or the network:
//!   - `data:` URLs pass, up to [`MediaPolicy::max_bytes`];
//!   - local paths and `file://` URLs only under `--allowed-local-media-path DIR`
//!     (checked lexically, then again after resolving symlinks);
//!   - http(s) URLs only with `--allow-remote-media`: bounded in bytes, time and redirects,
//!     every hop's host resolved and checked (no loopback, private, link-local or other
//!     non-public address unless `--allow-private-media-hosts`), and the connection pinned to
//!     the checked address so that a second DNS answer cannot point it elsewhere.
//!
//! The same rules as vLLM's `--allowed-local-media-path` and its SSRF guidance, OWASP's
//! server-side request forgery cheat sheet for the address classes.

use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use mistralrs_core::{ModelCategory, SupportedModality};
use serde_json::{Map, Value};

use super::openai::ApiError;

/// Content part types that carry media, and the modality each needs. mistral.rs reads the
/// first three; the OpenAI forms after them are refused by its parser later, but must not
/// reach a text-only model's handler either.
const MEDIA_PARTS: &[(&str, SupportedModality)] = &[
    ("image_url", SupportedModality::Vision),
    ("audio_url", SupportedModality::Audio),
    ("video_url", SupportedModality::Video),
    ("input_image", SupportedModality::Vision),
    ("input_audio", SupportedModality::Audio),
    ("image", SupportedModality::Vision),
    ("audio", SupportedModality::Audio),
    ("video", SupportedModality::Video),
    ("file", SupportedModality::Vision),
    ("input_file", SupportedModality::Vision),
];

/// Which remote addresses a media fetch may connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostFilter {
    /// Public unicast addresses only (the default with `--allow-remote-media`).
    PublicOnly,
    /// Any address (`--allow-private-media-hosts`).
    Any,
    /// One address only: lets tests tell two loopback listeners apart.
    #[cfg(test)]
    Only(IpAddr),
}

impl HostFilter {
    fn allows(&self, ip: IpAddr) -> bool {
        match self {
            HostFilter::PublicOnly => is_public(ip),
            HostFilter::Any => true,
            #[cfg(test)]
            HostFilter::Only(only) => ip == *only,
        }
    }
}

/// What media a request may carry and where it may come from.
#[derive(Debug, Clone)]
pub struct MediaPolicy {
    /// The input modalities of the served model (text only: every media part is refused).
    pub modalities: Vec<SupportedModality>,
    /// Canonical directory local paths must lie under (`--allowed-local-media-path`).
    pub local_dir: Option<PathBuf>,
    /// `--allow-remote-media`: http(s) URLs are fetched (by this module).
    pub remote: bool,
    pub hosts: HostFilter,
    /// Largest media file, decoded, in bytes (`--max-media-bytes`).
    pub max_bytes: u64,
    /// Whole fetch of one URL, redirects included (`--media-fetch-timeout`).
    pub fetch_timeout: Duration,
    /// Redirects followed per URL (`--media-max-redirects`).
    pub max_redirects: usize,
}

impl MediaPolicy {
    /// The policy for a text-only model: every media part is refused.
    pub fn text_only() -> Self {
        Self {
            modalities: vec![SupportedModality::Text],
            local_dir: None,
            remote: false,
            hosts: HostFilter::PublicOnly,
            max_bytes: 0,
            fetch_timeout: Duration::from_secs(10),
            max_redirects: 0,
        }
    }

    /// The input modalities a model category reads.
    pub fn modalities_of(
        category: &ModelCategory,
        input: &[SupportedModality],
    ) -> Vec<SupportedModality> {
        match category {
            ModelCategory::Multimodal { .. } => input.to_vec(),
            _ => vec![SupportedModality::Text],
        }
    }

    fn reads(&self, modality: &SupportedModality) -> bool {
        self.modalities
            .iter()
            .any(|m| std::mem::discriminant(m) == std::mem::discriminant(modality))
    }

    /// Check every media part of a chat request's `messages`, and rewrite each URL of a part
    /// the model reads into a `data:` URL. Errors name the part (`messages[1].content[0]`).
    pub async fn check_messages(&self, object: &mut Map<String, Value>) -> Result<(), ApiError> {
        let Some(messages) = object.get_mut("messages").and_then(Value::as_array_mut) else {
            return Ok(());
        };
        for (i, message) in messages.iter_mut().enumerate() {
            let Some(parts) = message.get_mut("content").and_then(Value::as_array_mut) else {
                continue;
            };
            for (j, part) in parts.iter_mut().enumerate() {
                let Some(kind) = part.get("type").and_then(Value::as_str).map(str::to_string)
                else {
                    continue;
                };
                let Some((_, modality)) = MEDIA_PARTS.iter().find(|(k, _)| *k == kind) else {
                    continue;
                };
                let at = format!("messages[{i}].content[{j}]");
                if !self.reads(modality) {
                    return Err(ApiError::field(
                        &at,
                        format!("`{at}` is a `{kind}` part, but the served model reads text only"),
                    ));
                }
                let Some(url) = part
                    .get_mut(&kind)
                    .and_then(|inner| inner.get_mut("url"))
                    .filter(|u| u.is_string())
                else {
                    // mistral.rs refuses the shape with its own message; nothing to load.
                    continue;
                };
                let resolved = self
                    .resolve(url.as_str().unwrap_or_default())
                    .await
                    .map_err(|e| ApiError::field(&at, format!("`{at}`: {e}")))?;
                *url = Value::String(resolved);
            }
        }
        Ok(())
    }

    /// A media URL as a `data:` URL, or why it is refused.
    pub async fn resolve(&self, url: &str) -> Result<String, MediaError> {
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        if lower.starts_with("data:") {
            // Base64 takes 4 characters per 3 bytes.
            if url.len() as u64 > self.max_bytes.saturating_mul(4) / 3 + 256 {
                return Err(MediaError::TooLarge(self.max_bytes));
            }
            return Ok(url.to_string());
        }
        if lower.starts_with("http://") || lower.starts_with("https://") {
            if !self.remote {
                return Err(MediaError::RemoteRefused);
            }
            let bytes = tokio::time::timeout(self.fetch_timeout, self.fetch(url))
                .await
                .map_err(|_| {
                    MediaError::Fetch(format!("no answer within {:?}", self.fetch_timeout))
                })??;
            return Ok(data_url(&bytes));
        }
        let path = match lower.starts_with("file:") {
            true => reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .ok_or(MediaError::LocalRefused)?,
            // mistral.rs reads any other string that is not a URL as a path on the server.
            false => PathBuf::from(url),
        };
        let bytes = self.read_local(&path).await?;
        Ok(data_url(&bytes))
    }

    /// A file under the allowed directory, checked before anything touches the disk, and once
    /// more after symlinks are resolved.
    async fn read_local(&self, path: &Path) -> Result<Vec<u8>, MediaError> {
        let Some(dir) = &self.local_dir else {
            return Err(MediaError::LocalRefused);
        };
        let lexically_inside = path.is_absolute()
            && !path.components().any(|c| matches!(c, Component::ParentDir))
            && path.starts_with(dir);
        if !lexically_inside {
            return Err(MediaError::OutsideDir(dir.clone()));
        }
        let real = tokio::fs::canonicalize(path)
            .await
            .map_err(|_| MediaError::NotFound)?;
        if !real.starts_with(dir) {
            return Err(MediaError::OutsideDir(dir.clone()));
        }
        let meta = tokio::fs::metadata(&real)
            .await
            .map_err(|_| MediaError::NotFound)?;
        if !meta.is_file() {
            return Err(MediaError::NotFound);
        }
        if meta.len() > self.max_bytes {
            return Err(MediaError::TooLarge(self.max_bytes));
        }
        tokio::fs::read(&real)
            .await
            .map_err(|_| MediaError::NotFound)
    }

    /// GET `url`, following at most `max_redirects` redirects, each hop's address checked and
    /// pinned, the body cut off at `max_bytes`.
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, MediaError> {
        let mut url = reqwest::Url::parse(url).map_err(|e| MediaError::Fetch(e.to_string()))?;
        for _hop in 0..=self.max_redirects {
            if !matches!(url.scheme(), "http" | "https") {
                return Err(MediaError::Fetch(format!(
                    "redirected to a `{}:` URL",
                    url.scheme()
                )));
            }
            let host = url
                .host_str()
                .ok_or_else(|| MediaError::Fetch("the URL has no host".into()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = url.port_or_known_default().unwrap_or(80);
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| MediaError::Fetch(format!("cannot resolve `{host}`: {e}")))?
                .collect();
            // Every address the name has must be allowed: a resolver may answer differently
            // on the next lookup, so the connection is pinned to the first one below.
            let Some(first) = addrs.first().copied() else {
                return Err(MediaError::Fetch(format!("`{host}` has no address")));
            };
            if let Some(bad) = addrs.iter().find(|a| !self.hosts.allows(a.ip())) {
                return Err(MediaError::PrivateHost(host, bad.ip()));
            }
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .resolve(&host, first)
                .no_proxy()
                .build()
                .map_err(|e| MediaError::Fetch(e.to_string()))?;
            let mut response = client.get(url.clone()).send().await.map_err(fetch_error)?;
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| {
                        MediaError::Fetch(format!("HTTP {status} without a Location"))
                    })?;
                url = url
                    .join(location)
                    .map_err(|e| MediaError::Fetch(format!("bad redirect: {e}")))?;
                continue;
            }
            if !status.is_success() {
                return Err(MediaError::Fetch(format!("HTTP {status}")));
            }
            if response
                .content_length()
                .is_some_and(|n| n > self.max_bytes)
            {
                return Err(MediaError::TooLarge(self.max_bytes));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(fetch_error)? {
                if (body.len() + chunk.len()) as u64 > self.max_bytes {
                    return Err(MediaError::TooLarge(self.max_bytes));
                }
                body.extend_from_slice(&chunk);
            }
            return Ok(body);
        }
        Err(MediaError::Fetch(format!(
            "more than {} redirects",
            self.max_redirects
        )))
    }
}

/// Why a media URL is refused; each is one line for the client.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error(
        "local paths and file:// URLs are refused (serve --allowed-local-media-path DIR allows \
         one directory)"
    )]
    LocalRefused,
    #[error("local media must be an absolute path under {0}")]
    OutsideDir(PathBuf),
    #[error("no such media file under the allowed directory")]
    NotFound,
    #[error("remote media URLs are refused (serve --allow-remote-media allows them)")]
    RemoteRefused,
    #[error(
        "`{0}` resolves to {1}, not a public address (serve --allow-private-media-hosts allows it)"
    )]
    PrivateHost(String, IpAddr),
    #[error("media over {0} bytes")]
    TooLarge(u64),
    #[error("cannot fetch the media URL: {0}")]
    Fetch(String),
}

/// A client error as one line, without the URL (the client sent it; the log need not repeat it).
fn fetch_error(e: reqwest::Error) -> MediaError {
    if e.is_timeout() {
        return MediaError::Fetch("timed out".into());
    }
    if e.is_connect() {
        return MediaError::Fetch("cannot connect".into());
    }
    MediaError::Fetch(e.without_url().to_string())
}

fn data_url(bytes: &[u8]) -> String {
    format!(
        "data:application/octet-stream;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Whether `ip` is a public unicast address: not loopback, private (RFC 1918, RFC 4193),
/// link-local, shared (RFC 6598), unspecified, broadcast, multicast, documentation or
/// benchmarking space. IPv4-mapped IPv6 addresses are judged as their IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn vision(dir: Option<PathBuf>, remote: bool, hosts: HostFilter) -> MediaPolicy {
        MediaPolicy {
            modalities: vec![SupportedModality::Text, SupportedModality::Vision],
            local_dir: dir,
            remote,
            hosts,
            max_bytes: 1000,
            fetch_timeout: Duration::from_secs(5),
            max_redirects: 2,
        }
    }

    /// A one-shot-per-connection HTTP listener on `ip` answering `reply(path)`; counts the
    /// requests it saw.
    fn listener(
        ip: &str,
        reply: impl Fn(&str) -> String + Send + 'static,
    ) -> (String, Arc<AtomicUsize>) {
        let socket = std::net::TcpListener::bind((ip, 0)).unwrap();
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        std::thread::spawn(move || {
            for stream in socket.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let _ = stream.write_all(reply(&path).as_bytes());
            }
        });
        (format!("http://{addr}"), seen)
    }

    fn ok(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    fn decoded(data: &str) -> Vec<u8> {
        let b64 = data.split_once(",").unwrap().1;
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    }

    #[tokio::test]
    async fn a_text_only_model_refuses_every_media_part_by_name() {
        let mut body = serde_json::json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "x"},
                                         {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}
        ]});
        let err = MediaPolicy::text_only()
            .check_messages(body.as_object_mut().unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.status, 400);
        assert_eq!(err.param.as_deref(), Some("messages[1].content[1]"));
        assert_eq!(
            err.message,
            "`messages[1].content[1]` is a `image_url` part, but the served model reads text only"
        );
    }

    #[tokio::test]
    async fn local_files_only_under_the_allowed_directory_without_symlink_escape() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("media");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(allowed.join("a.png"), b"image bytes").unwrap();
        std::fs::write(root.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), allowed.join("link")).unwrap();
        let allowed = std::fs::canonicalize(&allowed).unwrap();
        let policy = vision(Some(allowed.clone()), false, HostFilter::PublicOnly);

        let inside = allowed.join("a.png");
        let data = policy.resolve(inside.to_str().unwrap()).await.unwrap();
        assert_eq!(decoded(&data), b"image bytes");
        let as_url = format!("file://{}", inside.display());
        assert_eq!(
            decoded(&policy.resolve(&as_url).await.unwrap()),
            b"image bytes"
        );

        for escape in [
            allowed.join("link"),
            allowed.join("../secret"),
            root.path().join("secret"),
            PathBuf::from("media/a.png"),
        ] {
            let err = policy.resolve(escape.to_str().unwrap()).await.unwrap_err();
            assert!(
                matches!(err, MediaError::OutsideDir(_)),
                "{escape:?}: {err}"
            );
        }
        // Without the flag, the same message whether or not the file exists.
        let closed = vision(None, false, HostFilter::PublicOnly);
        let missing = closed
            .resolve("/no/such/file")
            .await
            .unwrap_err()
            .to_string();
        let existing = closed
            .resolve(inside.to_str().unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(missing, existing);
    }

    #[tokio::test]
    async fn remote_urls_are_off_by_default_and_never_reach_private_hosts() {
        let (base, seen) = listener("127.0.0.1", |_| ok("remote"));
        let url = format!("{base}/img.png");
        let off = vision(None, false, HostFilter::PublicOnly);
        assert!(matches!(
            off.resolve(&url).await,
            Err(MediaError::RemoteRefused)
        ));
        let public_only = vision(None, true, HostFilter::PublicOnly);
        let err = public_only.resolve(&url).await.unwrap_err();
        assert!(matches!(err, MediaError::PrivateHost(..)), "{err}");
        let by_name = format!("{}/img.png", base.replace("127.0.0.1", "localhost"));
        assert!(matches!(
            public_only.resolve(&by_name).await,
            Err(MediaError::PrivateHost(..))
        ));
        assert_eq!(seen.load(Ordering::SeqCst), 0, "a refused URL was fetched");

        let any = vision(None, true, HostFilter::Any);
        assert_eq!(decoded(&any.resolve(&url).await.unwrap()), b"remote");
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn redirects_are_checked_hop_by_hop_and_bodies_are_bounded() {
        // 127.0.0.2 plays the private host that 127.0.0.1, the "public" one, redirects to.
        let (private, private_seen) = listener("127.0.0.2", |_| ok("private"));
        let target = format!("{private}/inner");
        let (public, _) = listener("127.0.0.1", move |path| match path {
            "/big" => ok(&"x".repeat(1001)),
            "/loop" => "HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n".into(),
            _ => format!("HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n"),
        });
        let only_public = vision(None, true, HostFilter::Only("127.0.0.1".parse().unwrap()));
        let err = only_public
            .resolve(&format!("{public}/redirect"))
            .await
            .unwrap_err();
        assert!(matches!(err, MediaError::PrivateHost(..)), "{err}");
        assert_eq!(private_seen.load(Ordering::SeqCst), 0);
        let err = only_public
            .resolve(&format!("{public}/big"))
            .await
            .unwrap_err();
        assert!(matches!(err, MediaError::TooLarge(1000)), "{err}");
        let err = only_public
            .resolve(&format!("{public}/loop"))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot fetch the media URL: more than 2 redirects"
        );
        let data = "data:image/png;base64,".to_string() + &"A".repeat(2000);
        assert!(matches!(
            only_public.resolve(&data).await,
            Err(MediaError::TooLarge(1000))
        ));
    }

    #[test]
    fn address_classes() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
