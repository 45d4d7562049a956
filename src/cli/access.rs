//! Who may call which route of `serve`: the API key (`--api-key`) and the route policy.
//!
//! mistralrs-server-core's router mounts every route it has: the OpenAI endpoints, but also
//! admin routes that change what the server serves (`POST /v1/models/unload` unloads the model
//! for good, `/re_isq` requantizes it) or tell any client about the host (`/v1/system/info`).
//! Here each path is one of:
//! - [`RouteClass::Open`]: `/health` and `/`, for load balancers; no key needed.
//! - [`RouteClass::Api`]: the inference and reporting routes; behind the key when one is set.
//! - [`RouteClass::Admin`]: off (404) unless `--enable-admin-routes`, and then behind the key.
//! - [`RouteClass::NotServed`]: routes of the stock router this server does not offer
//!   (the stateful Responses API, image and speech generation, embeddings); 404 with one line.
//!
//! The key is compared in constant time: both sides are hashed with SHA-256 first, so neither
//! the length nor a common prefix of a wrong key shows in the answer's timing.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::openai::ApiError;

/// Where the key is read from when `--api-key` is absent.
pub const API_KEY_ENV: &str = "MISTRALRS_LOGQUANT_API_KEY";

/// The API key clients must send as `Authorization: Bearer KEY`. Only its SHA-256 digest is
/// kept; `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;

    fn from_str(key: &str) -> Result<Self, String> {
        if key.is_empty() {
            return Err("the API key is empty".into());
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the API key contains whitespace or control characters".into());
        }
        Ok(Self {
            digest: Sha256::digest(key.as_bytes()).into(),
        })
    }
}

impl ApiKey {
    /// Whether an `Authorization` header value carries this key (`Bearer KEY`, scheme case
    /// insensitive as RFC 9110 says). Constant time in the key.
    pub fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(value) = authorization.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some((scheme, token)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let offered: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        // XOR-fold instead of `==`: no early exit on the first differing byte.
        offered
            .iter()
            .zip(self.digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// How the server treats a request path (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    Open,
    Api,
    Admin,
    NotServed,
}

/// mistralrs-server-core's admin routes: they change what is served or describe the host.
const ADMIN_ROUTES: &[&str] = &[
    "/v1/models/unload",
    "/v1/models/reload",
    "/v1/models/status",
    "/v1/models/tune",
    "/v1/system/info",
    "/v1/system/doctor",
    "/re_isq",
];

/// Stock routes this server does not offer: the Responses API keeps conversations in server
/// memory and takes media and web-search requests this server does not check; the others need
/// a model category `serve` does not load.
const NOT_SERVED_PREFIXES: &[&str] = &[
    "/v1/responses",
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/embeddings",
];

pub fn classify(path: &str) -> RouteClass {
    // axum routes `/health/` and `/health` apart; compare the path as given.
    if path == "/health" || path == "/" {
        return RouteClass::Open;
    }
    if ADMIN_ROUTES.contains(&path) {
        return RouteClass::Admin;
    }
    let served_elsewhere = NOT_SERVED_PREFIXES
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")));
    if served_elsewhere {
        return RouteClass::NotServed;
    }
    RouteClass::Api
}

/// What [`guard`] enforces.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    pub api_key: Option<ApiKey>,
    pub admin_routes: bool,
}

/// The outer gate of every request: the API key first (so an unauthenticated client learns
/// nothing about which routes exist), then the route policy.
pub async fn guard(
    State(policy): State<Arc<AccessPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let class = classify(&path);
    if class == RouteClass::Open {
        return next.run(request).await;
    }
    if let Some(key) = &policy.api_key {
        if !key.accepts(request.headers().get(header::AUTHORIZATION)) {
            let mut response = ApiError {
                status: StatusCode::UNAUTHORIZED,
                code: Some("invalid_api_key"),
                ..ApiError::invalid(
                    "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                )
            }
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    match class {
        RouteClass::Admin if !policy.admin_routes => not_found(format!(
            "`{path}` is an admin route, off on this server (serve --enable-admin-routes)"
        )),
        RouteClass::NotServed => not_found(format!(
            "`{path}` is not served here (use /v1/chat/completions or /v1/completions)"
        )),
        _ => next.run(request).await,
    }
}

/// The router's fallback: an unknown path is a 404 with one line, not an empty body.
pub async fn unknown_route(request: Request) -> Response {
    not_found(format!(
        "no route {} {} (routes: /v1/chat/completions, /v1/completions, /v1/models, \
         /v1/kv-cache, /metrics, /health)",
        request.method(),
        request.uri().path()
    ))
}

fn not_found(message: String) -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("not_found"),
        ..ApiError::invalid(message)
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn the_key_is_accepted_only_as_a_bearer_token() {
        let key: ApiKey = "s3cret-key".parse().unwrap();
        assert!(key.accepts(Some(&header("Bearer s3cret-key"))));
        assert!(key.accepts(Some(&header("bearer s3cret-key"))));
        for wrong in [
            "Bearer s3cret-kez",
            "Bearer s3cret-key2",
            "Bearer s3cret",
            "Bearer ",
            "Basic s3cret-key",
            "s3cret-key",
            "",
        ] {
            assert!(!key.accepts(Some(&header(wrong))), "{wrong:?} accepted");
        }
        assert!(!key.accepts(None));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key: ApiKey = "s3cret-key".parse().unwrap();
        let shown = format!("{key:?} {:?}", Some(key.clone()));
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn empty_or_spaced_keys_are_refused() {
        assert!("".parse::<ApiKey>().is_err());
        assert!("a b".parse::<ApiKey>().is_err());
        assert!("a\n".parse::<ApiKey>().is_err());
    }

    #[test]
    fn routes_fall_into_their_classes() {
        assert_eq!(classify("/health"), RouteClass::Open);
        assert_eq!(classify("/"), RouteClass::Open);
        assert_eq!(classify("/v1/chat/completions"), RouteClass::Api);
        assert_eq!(classify("/v1/kv-cache"), RouteClass::Api);
        assert_eq!(classify("/v1/models"), RouteClass::Api);
        for admin in ADMIN_ROUTES {
            assert_eq!(classify(admin), RouteClass::Admin, "{admin}");
        }
        assert_eq!(classify("/v1/responses/abc/cancel"), RouteClass::NotServed);
        assert_eq!(classify("/v1/embeddings"), RouteClass::NotServed);
        assert_eq!(classify("/v1/responsesX"), RouteClass::Api);
    }
}
