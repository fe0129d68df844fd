//! Path normalisation and the route table (SPEC §7).
//!
//! Deny by default: only the paths below are forwarded, always under the canonical path they
//! matched (never the raw one). The mutation block list is checked case-insensitively on the
//! normalised path before anything else, so no encoding, case or dot-segment trick reaches the
//! upstream's lenient router.

use http::Method;
use std::borrow::Cow;

use crate::errors::{GatewayError, Surface};

/// What the gateway does with a request, decided from its method and normalised path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Healthz,
    Readyz,
    Root,
    ApiChat,
    ApiGenerate,
    ApiEmbed,
    ApiEmbeddings,
    ApiShow,
    ApiTags,
    ApiPs,
    ApiVersion,
    V1ChatCompletions,
    V1Completions,
    V1Embeddings,
    V1Responses,
    V1Models,
    /// `/v1/models/{model}`: the model comes from the path ([`Route::path_model`]).
    V1Model,
}

impl RouteKind {
    /// Routes a model spends tokens on: text generation and embeddings.
    pub fn consumes_tokens(self) -> bool {
        self.generates_text()
            || matches!(
                self,
                RouteKind::ApiEmbed | RouteKind::ApiEmbeddings | RouteKind::V1Embeddings
            )
    }

    /// Routes whose answer is generated text (chat, generate, completions, responses).
    pub fn generates_text(self) -> bool {
        matches!(
            self,
            RouteKind::ApiChat
                | RouteKind::ApiGenerate
                | RouteKind::V1ChatCompletions
                | RouteKind::V1Completions
                | RouteKind::V1Responses
        )
    }
}

/// How a route's model is named in its JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelField {
    /// `model` only.
    Model,
    /// `model`, falling back to `name` (Ollama's `/api/show`).
    ModelOrName,
}

/// A listing the gateway filters to the caller's effective models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `{"models": [{"name", "model", ...}]}` (`/api/tags`, `/api/ps`).
    OllamaModels,
    /// `{"object": "list", "data": [{"id", ...}]}` (`/v1/models`).
    OpenAiModels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub kind: RouteKind,
    /// The `{model}` segment of `/v1/models/{model}`.
    pub path_model: Option<String>,
    /// The canonical path forwarded upstream: the route table's own text for every route
    /// without a path parameter, so a route is copied without an allocation.
    pub path: std::borrow::Cow<'static, str>,
    pub surface: Surface,
}

impl Route {
    /// Gateway-own endpoints answer without auth and never go upstream.
    pub fn is_gateway_endpoint(&self) -> bool {
        matches!(
            self.kind,
            RouteKind::Healthz | RouteKind::Readyz | RouteKind::Root
        )
    }

    pub fn model_field(&self) -> Option<ModelField> {
        use RouteKind::*;
        match self.kind {
            ApiChat | ApiGenerate | ApiEmbed | ApiEmbeddings | V1ChatCompletions
            | V1Completions | V1Embeddings | V1Responses => Some(ModelField::Model),
            ApiShow => Some(ModelField::ModelOrName),
            _ => None,
        }
    }

    pub fn listing(&self) -> Option<Listing> {
        match self.kind {
            RouteKind::ApiTags | RouteKind::ApiPs => Some(Listing::OllamaModels),
            RouteKind::V1Models => Some(Listing::OpenAiModels),
            _ => None,
        }
    }

    /// A short stable label for logs and metrics (never the raw path).
    pub fn label(&self) -> &'static str {
        use RouteKind::*;
        match self.kind {
            Healthz => "/healthz",
            Readyz => "/readyz",
            Root => "/",
            ApiChat => "/api/chat",
            ApiGenerate => "/api/generate",
            ApiEmbed => "/api/embed",
            ApiEmbeddings => "/api/embeddings",
            ApiShow => "/api/show",
            ApiTags => "/api/tags",
            ApiPs => "/api/ps",
            ApiVersion => "/api/version",
            V1ChatCompletions => "/v1/chat/completions",
            V1Completions => "/v1/completions",
            V1Embeddings => "/v1/embeddings",
            V1Responses => "/v1/responses",
            V1Models => "/v1/models",
            V1Model => "/v1/models/{model}",
        }
    }
}

/// Paths that change server state or act with the server's ollama.com identity. Always 403,
/// any method, before auth; not configurable. Compared case-insensitively, and a path under one
/// of them (`/api/blobs/sha256:..`) is blocked too.
const BLOCKED: &[&str] = &[
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs",
    "/api/me",
    "/api/signout",
    "/api/user/keys",
    "/api/experimental/web_search",
    "/api/experimental/web_fetch",
    "/api/web_search",
    "/api/web_fetch",
];

/// The surface of a path, for errors decided before a route is known.
pub fn surface_of(path: &str) -> Surface {
    let lower = path.trim_start_matches('/');
    if lower.len() >= 2
        && lower[..2].eq_ignore_ascii_case("v1")
        && (lower.len() == 2 || lower.as_bytes()[2] == b'/')
    {
        Surface::OpenAi
    } else {
        Surface::Native
    }
}

/// Normalises a raw request path (no query): one percent-decoding, `//` collapsed, `.` and `..`
/// resolved, trailing slash removed. Refuses what has no business in an API path: encoded
/// slashes or backslashes, NUL and control bytes, backslashes, double encoding, invalid UTF-8.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, GatewayError> {
    if already_canonical(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    normalize_escaped(raw).map(Cow::Owned)
}

/// True for what [`normalize_path`] would give back unchanged: every client sends its paths
/// this way, and they need no copy.
fn already_canonical(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix('/') else {
        return false;
    };
    rest.is_empty()
        || rest.split('/').all(|segment| {
            !matches!(segment, "" | "." | "..") && segment.bytes().all(is_plain_path_byte)
        })
}

/// A byte a canonical path segment holds as it is: RFC 3986 `pchar` without escapes.
fn is_plain_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

fn normalize_escaped(raw: &str) -> Result<String, GatewayError> {
    let bad = |why: &str| GatewayError::BadRequest(format!("invalid request path: {why}"));
    if !raw.starts_with('/') {
        return Err(bad("must start with /"));
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or_else(|| bad("truncated escape"))?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16)
                .map_err(|_| bad("malformed escape"))?;
            if v == b'/' || v == b'\\' {
                return Err(bad("encoded slash"));
            }
            decoded.push(v);
            i += 3;
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    // Only what RFC 3986 allows in a path segment, decoded: nothing that would change meaning
    // when the canonical path is written out again (`?`, `#`, spaces, quotes, backslashes,
    // control bytes, non-ASCII).
    if !decoded
        .iter()
        .all(|&b| is_plain_path_byte(b) || b == b'/' || b == b'%')
    {
        return Err(bad("character not allowed in a path"));
    }
    if decoded.contains(&b'%') {
        // No route contains '%': a second layer of encoding is only ever an evasion attempt.
        return Err(bad("double encoding"));
    }
    let text = String::from_utf8(decoded).map_err(|_| bad("not UTF-8"))?;
    let mut segments: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(text.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// True when the normalised path is, or is under, a blocked mutation/account endpoint.
pub fn is_blocked(normalized: &str) -> bool {
    BLOCKED.iter().any(|blocked| {
        normalized.len() >= blocked.len()
            && normalized[..blocked.len()].eq_ignore_ascii_case(blocked)
            && (normalized.len() == blocked.len() || normalized.as_bytes()[blocked.len()] == b'/')
    })
}

const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];

/// The route table: the only paths the gateway answers or forwards. Matching is exact and
/// case-sensitive like Ollama's router; `{model}` is one path segment.
pub const ROUTE_TABLE: &[(&str, RouteKind, &[Method])] = &[
    ("/healthz", RouteKind::Healthz, GET_HEAD),
    ("/readyz", RouteKind::Readyz, GET_HEAD),
    ("/", RouteKind::Root, GET_HEAD),
    ("/api/chat", RouteKind::ApiChat, POST),
    ("/api/generate", RouteKind::ApiGenerate, POST),
    ("/api/embed", RouteKind::ApiEmbed, POST),
    ("/api/embeddings", RouteKind::ApiEmbeddings, POST),
    ("/api/show", RouteKind::ApiShow, POST),
    ("/api/tags", RouteKind::ApiTags, GET_HEAD),
    ("/api/ps", RouteKind::ApiPs, GET),
    ("/api/version", RouteKind::ApiVersion, GET_HEAD),
    ("/v1/chat/completions", RouteKind::V1ChatCompletions, POST),
    ("/v1/completions", RouteKind::V1Completions, POST),
    ("/v1/embeddings", RouteKind::V1Embeddings, POST),
    ("/v1/responses", RouteKind::V1Responses, POST),
    ("/v1/models", RouteKind::V1Models, GET),
    ("/v1/models/{model}", RouteKind::V1Model, GET),
];

/// Classifies a request on its normalised path.
pub fn classify(method: &Method, normalized: &str) -> Result<Route, GatewayError> {
    let (kind, allowed, path_model, pattern) = ROUTE_TABLE
        .iter()
        .find_map(
            |(pattern, kind, methods)| match pattern.strip_suffix("{model}") {
                None => (*pattern == normalized).then_some((*kind, *methods, None, Some(*pattern))),
                Some(prefix) => normalized
                    .strip_prefix(prefix)
                    .filter(|m| !m.is_empty() && !m.contains('/'))
                    .map(|m| (*kind, *methods, Some(m.to_string()), None)),
            },
        )
        .ok_or(GatewayError::RouteNotFound)?;
    if !allowed.contains(method) {
        return Err(GatewayError::MethodNotAllowed);
    }
    Ok(Route {
        surface: surface_of(normalized),
        path: pattern.map_or_else(|| normalized.to_string().into(), std::borrow::Cow::Borrowed),
        kind,
        path_model,
    })
}

/// Every route the gateway forwards upstream, as (example path, method), derived from the
/// route table: the route-coverage test walks it, so a new route cannot skip the pipeline.
pub fn forwarded_paths() -> Vec<(String, Method)> {
    ROUTE_TABLE
        .iter()
        .flat_map(|(pattern, _, methods)| {
            methods
                .iter()
                .map(move |m| (pattern.replace("{model}", "llama3.2"), m.clone()))
        })
        .filter(|(path, method)| classify(method, path).is_ok_and(|r| !r.is_gateway_endpoint()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_dots_slashes_and_escapes() {
        let cases = [
            ("/api/chat", "/api/chat"),
            ("//api//chat/", "/api/chat"),
            ("/api/./chat", "/api/chat"),
            ("/x/../api/chat", "/api/chat"),
            ("/../../api/chat", "/api/chat"),
            ("/api/%63hat", "/api/chat"),
            ("/", "/"),
            ("//", "/"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw).unwrap(), want, "{raw}");
        }
    }

    /// The shortcut for canonical paths agrees with the full normalisation: on every path of
    /// up to six bytes over an alphabet of separators, dots, escapes and plain characters.
    #[test]
    fn canonical_shortcut_agrees_with_the_full_pass() {
        let alphabet = ["/", ".", "%", "2", "f", "a", ":", " "];
        let mut paths = vec![String::new()];
        let mut shortcut = 0;
        for _ in 0..6 {
            let longer: Vec<String> = paths
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            for p in &longer {
                let full = normalize_escaped(p).ok();
                if already_canonical(p) {
                    shortcut += 1;
                    assert_eq!(full.as_deref(), Some(p.as_str()), "{p:?}");
                } else {
                    assert_ne!(full.as_deref(), Some(p.as_str()), "{p:?} is canonical");
                }
            }
            paths = longer;
        }
        assert!(shortcut > 1000, "{shortcut}");
    }

    #[test]
    fn refuses_evasions() {
        for raw in [
            "/api%2fpull",
            "/api%2Fpull",
            "/api%5cpull",
            "/api\\pull",
            "/api/pull%00",
            "/api/pu%256cl",
            "/api/chat%",
            "/api/chat%zz",
            "/api/\x01chat",
            "/api/%ff",
            "api/chat",
            "/v1/models/gpt-oss:120b-cloud%3F",
            "/v1/models/x%23y",
            "/v1/models/a%20b",
            "/v1/models/a\"b",
            "/v1/models/\u{e9}",
        ] {
            assert!(normalize_path(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn block_list_is_case_insensitive_and_covers_subpaths() {
        for p in [
            "/api/pull",
            "/API/PULL",
            "/api/Pull",
            "/api/blobs/sha256:abc",
            "/api/delete",
            "/api/user/keys/abc",
            "/api/experimental/web_search",
            "/api/me",
        ] {
            assert!(is_blocked(p), "{p}");
        }
        for p in ["/api/pulls", "/api/chat", "/api/meta", "/api/show"] {
            assert!(!is_blocked(p), "{p}");
        }
    }

    #[test]
    fn classification_is_case_sensitive_and_deny_by_default() {
        assert_eq!(
            classify(&Method::POST, "/api/chat").unwrap().kind,
            RouteKind::ApiChat
        );
        assert!(matches!(
            classify(&Method::POST, "/API/chat"),
            Err(GatewayError::RouteNotFound)
        ));
        assert!(matches!(
            classify(&Method::GET, "/api/chat"),
            Err(GatewayError::MethodNotAllowed)
        ));
        assert!(matches!(
            classify(&Method::GET, "/api/unknown"),
            Err(GatewayError::RouteNotFound)
        ));
        assert!(matches!(
            classify(&Method::GET, "/v1/models/a/b"),
            Err(GatewayError::RouteNotFound)
        ));
        let r = classify(&Method::GET, "/v1/models/llama3.2").unwrap();
        assert_eq!(r.kind, RouteKind::V1Model);
        assert_eq!(r.path_model.as_deref(), Some("llama3.2"));
        assert_eq!(r.surface, Surface::OpenAi);
    }

    #[test]
    fn every_forwarded_path_classifies() {
        let paths = forwarded_paths();
        let routes: std::collections::BTreeSet<&str> =
            paths.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            routes.len(),
            ROUTE_TABLE.len() - 3,
            "all but the three gateway endpoints"
        );
        assert!(
            paths
                .iter()
                .any(|(p, m)| p == "/api/tags" && *m == Method::HEAD),
            "every method of a route"
        );
        for (path, method) in paths {
            let r = classify(&method, &path).unwrap();
            assert!(!r.is_gateway_endpoint());
        }
    }
}
