//! Connection handling, routing, request checks, knobs and recording.

use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, HOST, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use super::Args;
use super::body::{InflightGuard, SimBody};
use super::catalog::{Catalog, Model};
use super::fields::Fields;
use super::generate::Plan;
use super::respond::{self, Fail, Resp, Surface, TEXT};
use super::tokens::plan_chunks;
use super::{native, openai};

/// Upper bound on buffered request bodies; far above anything tests send.
const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub model: Option<String>,
}

/// Shared server state.
pub struct State {
    pub args: Args,
    pub catalog: Catalog,
    host_check: bool,
    log: Mutex<Vec<Recorded>>,
    total: AtomicU64,
    inflight: Arc<AtomicU64>,
    loaded: Mutex<Vec<String>>,
    seq: AtomicU64,
}

/// A poisoned lock only means another request panicked mid-update; the
/// plain data inside is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    pub fn new(args: Args, bound: SocketAddr) -> State {
        let catalog = Catalog::new(&args.models);
        State {
            // Ollama only checks Host when it listens on loopback.
            host_check: !args.no_host_check && bound.ip().is_loopback(),
            catalog,
            args,
            log: Mutex::new(Vec::new()),
            total: AtomicU64::new(0),
            inflight: Arc::new(AtomicU64::new(0)),
            loaded: Mutex::new(Vec::new()),
            seq: AtomicU64::new(0),
        }
    }

    pub fn next_id(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    pub fn mark_loaded(&self, name: &str) {
        let mut loaded = lock(&self.loaded);
        if !loaded.iter().any(|n| n == name) {
            loaded.push(name.to_string());
        }
    }

    pub fn unload(&self, name: &str) {
        lock(&self.loaded).retain(|n| n != name);
    }

    pub fn loaded(&self) -> Vec<String> {
        lock(&self.loaded).clone()
    }

    fn record(&self, entry: Recorded) {
        self.total.fetch_add(1, Ordering::SeqCst);
        lock(&self.log).push(entry);
    }
}

/// Per-request behaviour, from `x-sim-*` headers with CLI fallbacks.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub chunks: usize,
    pub delay: Duration,
    pub fail_after: Option<usize>,
    pub abort: bool,
    pub status: Option<StatusCode>,
    pub headers_delay: Duration,
    pub ps_all: bool,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn header_num<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    header_str(headers, name).and_then(|v| v.parse().ok())
}

impl Knobs {
    pub fn from_headers(headers: &HeaderMap, args: &Args) -> Knobs {
        Knobs {
            chunks: header_num(headers, "x-sim-chunks").unwrap_or(args.chunks),
            delay: Duration::from_millis(
                header_num(headers, "x-sim-delay-ms").unwrap_or(args.chunk_delay_ms),
            ),
            fail_after: header_num(headers, "x-sim-fail-after").or(args.fail_after),
            abort: header_str(headers, "x-sim-fail-mode")
                .is_some_and(|m| m.eq_ignore_ascii_case("abort")),
            status: header_num::<u16>(headers, "x-sim-status")
                .filter(|c| (400..=599).contains(c))
                .and_then(|c| StatusCode::from_u16(c).ok()),
            headers_delay: Duration::from_millis(
                header_num(headers, "x-sim-headers-delay-ms").unwrap_or(0),
            ),
            ps_all: header_str(headers, "x-sim-ps-all")
                .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        }
    }

    pub fn plan(&self, prompt_tokens: u64, cap: Option<i64>) -> Plan {
        let (chunks, finish) = plan_chunks(self.chunks, cap);
        Plan {
            chunks,
            finish,
            prompt_tokens,
            fail_after: self.fail_after,
            abort: self.abort,
            delay: self.delay,
        }
    }
}

/// What a route handler gets to see.
pub struct Ctx<'a> {
    pub st: &'a State,
    pub knobs: &'a Knobs,
    pub body: &'a [u8],
    pub method: &'a Method,
}

/// Resolves a request's model the way Ollama's handlers do.
pub fn require_model<'a>(st: &'a State, name: &str) -> Result<&'a Model, Fail> {
    if name.trim().is_empty() {
        return Err(Fail::bad("model is required"));
    }
    st.catalog
        .find(name)
        .ok_or_else(|| Fail::not_found(format!("model '{name}' not found")))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Root,
    Version,
    Status,
    Tags,
    Ps,
    Show,
    Generate,
    Chat,
    Embed,
    Embeddings,
    Pull,
    Push,
    Create,
    Copy,
    Delete,
    Blobs,
    Me,
    Signout,
    UserKeys,
    WebSearch,
    WebFetch,
    V1Chat,
    V1Completions,
    V1Embeddings,
    V1Models,
    V1Model(String),
    V1Responses,
}

impl Route {
    fn surface(&self) -> Surface {
        match self {
            Route::V1Chat
            | Route::V1Completions
            | Route::V1Embeddings
            | Route::V1Models
            | Route::V1Model(_)
            | Route::V1Responses => Surface::OpenAi,
            _ => Surface::Native,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (
                (bytes[i + 1] as char).to_digit(16),
                (bytes[i + 2] as char).to_digit(16),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One non-empty path segment after `prefix`, as a router parameter.
fn param<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
}

fn match_route(path: &str) -> Option<(Route, &'static [Method])> {
    const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
    const GET: &[Method] = &[Method::GET];
    const POST: &[Method] = &[Method::POST];
    const DELETE: &[Method] = &[Method::DELETE];
    const HEAD_POST: &[Method] = &[Method::HEAD, Method::POST];
    let r = match path {
        "/" => (Route::Root, GET_HEAD),
        "/api/version" => (Route::Version, GET_HEAD),
        "/api/status" => (Route::Status, GET),
        "/api/tags" => (Route::Tags, GET_HEAD),
        "/api/ps" => (Route::Ps, GET),
        "/api/show" => (Route::Show, POST),
        "/api/generate" => (Route::Generate, POST),
        "/api/chat" => (Route::Chat, POST),
        "/api/embed" => (Route::Embed, POST),
        "/api/embeddings" => (Route::Embeddings, POST),
        "/api/pull" => (Route::Pull, POST),
        "/api/push" => (Route::Push, POST),
        "/api/create" => (Route::Create, POST),
        "/api/copy" => (Route::Copy, POST),
        "/api/delete" => (Route::Delete, DELETE),
        "/api/me" => (Route::Me, POST),
        "/api/signout" => (Route::Signout, POST),
        "/api/experimental/web_search" => (Route::WebSearch, POST),
        "/api/experimental/web_fetch" => (Route::WebFetch, POST),
        "/v1/chat/completions" => (Route::V1Chat, POST),
        "/v1/completions" => (Route::V1Completions, POST),
        "/v1/embeddings" => (Route::V1Embeddings, POST),
        "/v1/models" => (Route::V1Models, GET),
        "/v1/responses" => (Route::V1Responses, POST),
        _ => {
            if param(path, "/api/blobs/").is_some() {
                (Route::Blobs, HEAD_POST)
            } else if param(path, "/api/user/keys/").is_some() {
                (Route::UserKeys, DELETE)
            } else if let Some(id) = param(path, "/v1/models/") {
                (Route::V1Model(percent_decode(id)), GET)
            } else {
                return None;
            }
        }
    };
    Some(r)
}

/// The model a request names, for the recording log: route-specific the
/// same way the handlers read it.
fn recorded_model(route: Option<&Route>, fields: Option<&Fields>) -> Option<String> {
    let get = |name: &str| {
        fields
            .and_then(|f| f.string(name).ok().flatten())
            .filter(|s| !s.is_empty())
    };
    match route {
        Some(Route::V1Model(id)) => Some(id.clone()),
        Some(Route::Copy) => get("source"),
        Some(
            Route::Chat
            | Route::Generate
            | Route::Embed
            | Route::Embeddings
            | Route::V1Chat
            | Route::V1Completions
            | Route::V1Embeddings
            | Route::V1Responses,
        ) => get("model"),
        _ => get("model").or_else(|| get("name")),
    }
}

/// Splits `host[:port]` / `[v6][:port]` like Go's `net.SplitHostPort`,
/// falling back to the whole value.
fn host_only(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(h, _)| h);
    }
    match host.split_once(':') {
        Some((h, port)) if !port.contains(':') => h,
        _ => host,
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Ollama's Host allow-list for loopback listeners.
pub fn host_allowed(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let h = host_only(&host);
    if let Ok(ip) = h.parse::<IpAddr>() {
        return ip.is_loopback() || is_private(ip) || ip.is_unspecified();
    }
    h.is_empty()
        || h == "localhost"
        || h.ends_with(".localhost")
        || h.ends_with(".local")
        || h.ends_with(".internal")
}

fn not_found() -> Resp {
    // Ollama's router (gin) answers unknown paths with this exact body.
    respond::text(StatusCode::NOT_FOUND, "text/plain", "404 page not found")
}

fn method_not_allowed(methods: &[Method]) -> Resp {
    let mut resp = respond::text(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain",
        "405 method not allowed",
    );
    let allow = methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = HeaderValue::from_str(&allow) {
        resp.headers_mut().insert(ALLOW, v);
    }
    resp
}

fn sim_endpoint(st: &State, method: &Method, path: &str) -> Resp {
    match (path, method) {
        ("/__sim/requests", &Method::GET) => {
            let log = lock(&st.log).clone();
            respond::json(StatusCode::OK, &log)
        }
        ("/__sim/requests", &Method::DELETE) => {
            lock(&st.log).clear();
            respond::empty(StatusCode::NO_CONTENT)
        }
        ("/__sim/requests", _) => method_not_allowed(&[Method::GET, Method::DELETE]),
        ("/__sim/stats", &Method::GET) => respond::json(
            StatusCode::OK,
            &json!({
                "requests": st.total.load(Ordering::SeqCst),
                "inflight": st.inflight.load(Ordering::SeqCst),
                "logged": lock(&st.log).len(),
                "loaded": st.loaded(),
            }),
        ),
        ("/__sim/stats", _) => method_not_allowed(&[Method::GET]),
        _ => not_found(),
    }
}

fn token_ok(st: &State, headers: &HeaderMap) -> bool {
    let Some(token) = &st.args.require_token else {
        return true;
    };
    let expected = if st.args.token_scheme.is_empty() {
        token.clone()
    } else {
        format!("{} {}", st.args.token_scheme, token)
    };
    headers
        .get_all(st.args.token_header.as_str())
        .iter()
        .any(|v| v.as_bytes() == expected.as_bytes())
}

async fn respond(
    st: &State,
    method: &Method,
    headers: &HeaderMap,
    host: &str,
    body: &[u8],
    route: Option<(Route, &'static [Method])>,
) -> Result<Resp, io::Error> {
    if st.host_check && !host_allowed(host) {
        return Ok(respond::empty(StatusCode::FORBIDDEN));
    }
    if !token_ok(st, headers) {
        return Ok(respond::json(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "unauthorized"}),
        ));
    }
    let Some((route, methods)) = route else {
        return Ok(not_found());
    };
    if !methods.contains(method) {
        return Ok(method_not_allowed(methods));
    }
    let knobs = Knobs::from_headers(headers, &st.args);
    if !knobs.headers_delay.is_zero() {
        tokio::time::sleep(knobs.headers_delay).await;
    }
    if let Some(status) = knobs.status {
        let msg = format!("simulated upstream status {}", status.as_u16());
        return Ok(route.surface().error(status, &msg));
    }
    let ctx = Ctx {
        st,
        knobs: &knobs,
        body,
        method,
    };
    let resp = match route {
        Route::Root => respond::text(StatusCode::OK, TEXT, "Ollama is running"),
        Route::Version => {
            respond::json(StatusCode::OK, &json!({"version": st.args.version_string}))
        }
        Route::Status => native::status(),
        Route::Tags => native::tags(&ctx),
        Route::Ps => native::ps(&ctx),
        Route::Show => native::show(&ctx),
        Route::Generate => return native::generate(&ctx).await,
        Route::Chat => return native::chat(&ctx).await,
        Route::Embed => native::embed(&ctx),
        Route::Embeddings => native::embeddings(&ctx),
        Route::Pull => native::pull(&ctx),
        Route::Push => native::push(&ctx),
        Route::Create => native::create(&ctx),
        Route::Copy => native::copy(&ctx),
        Route::Delete => native::delete(&ctx),
        Route::Blobs => native::blobs(&ctx),
        Route::Me => native::me(),
        Route::Signout | Route::UserKeys => respond::empty(StatusCode::OK),
        Route::WebSearch | Route::WebFetch => native::web(),
        Route::V1Chat => return openai::chat_completions(&ctx).await,
        Route::V1Completions => return openai::completions(&ctx).await,
        Route::V1Embeddings => openai::embeddings(&ctx),
        Route::V1Models => openai::models(&ctx),
        Route::V1Model(id) => openai::model(&ctx, &id),
        Route::V1Responses => return openai::responses(&ctx).await,
    };
    Ok(resp)
}

/// Serves one request. An `Err` makes hyper drop the connection without a
/// response, which is how the `abort` failure mode looks for non-streams.
pub async fn handle(
    st: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<SimBody>, io::Error> {
    let (parts, body) = req.into_parts();
    let body: Bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(respond::text(
                StatusCode::PAYLOAD_TOO_LARGE,
                TEXT,
                "request body too large",
            ));
        }
    };
    let path = parts.uri.path();
    if path == "/__sim" || path.starts_with("/__sim/") {
        return Ok(sim_endpoint(&st, &parts.method, path));
    }
    let route = match_route(path);
    let fields = Fields::parse(&body).ok();
    if st.args.no_record {
        st.total.fetch_add(1, Ordering::SeqCst);
    } else {
        st.record(Recorded {
            method: parts.method.to_string(),
            path: path.to_string(),
            query: parts.uri.query().map(str::to_string),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
            model: recorded_model(route.as_ref().map(|(r, _)| r), fields.as_ref()),
        });
    }
    // Created before any awaiting so a client that leaves while we wait
    // (headers delay, non-stream generation) is still counted correctly.
    let guard = InflightGuard::new(st.inflight.clone());
    let host = parts
        .headers
        .get(HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let resp = respond(&st, &parts.method, &parts.headers, &host, &body, route).await?;
    Ok(resp.map(|b| b.with_guard(Some(guard))))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Binds, announces the address on stdout, and serves until SIGINT/SIGTERM.
pub async fn run(args: Args) -> io::Result<()> {
    let listener = TcpListener::bind(args.listen.as_str()).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State::new(args, addr));
    {
        let mut out = io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Typically fd exhaustion; back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let st = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    // Ollama sets no server timeouts; idle pooled connections
                    // must stay open for the gateway.
                    let _ = http1::Builder::new()
                        .header_read_timeout(None)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rules() {
        for ok in [
            "",
            "localhost",
            "localhost:11434",
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]:11434",
            "::1",
            "10.1.2.3:80",
            "192.168.0.5",
            "172.16.0.1",
            "0.0.0.0:11434",
            "foo.localhost",
            "printer.local:631",
            "ollama.internal:11434",
            "LOCALHOST",
        ] {
            assert!(host_allowed(ok), "{ok} should be allowed");
        }
        for bad in [
            "example.com",
            "example.com:11434",
            "8.8.8.8",
            "gateway.example.org",
            "localhost.example.com",
            "[2001:db8::1]:80",
        ] {
            assert!(!host_allowed(bad), "{bad} should be rejected");
        }
    }

    #[test]
    fn routes() {
        assert!(match_route("/api/chat").is_some());
        assert!(match_route("/api/chat/").is_none());
        assert!(match_route("/nope").is_none());
        assert_eq!(
            match_route("/v1/models/llama3.2%3Alatest").map(|r| r.0),
            Some(Route::V1Model("llama3.2:latest".to_string()))
        );
        assert!(match_route("/v1/models/a/b").is_none());
        assert!(match_route("/v1/models/").is_none());
        assert_eq!(
            match_route("/api/blobs/sha256:abc").map(|r| r.0),
            Some(Route::Blobs)
        );
    }

    #[test]
    fn recorded_model_follows_go_semantics() {
        let f = Fields::parse(br#"{"model":"a","MODEL":"b"}"#).ok();
        assert_eq!(
            recorded_model(Some(&Route::Chat), f.as_ref()),
            Some("b".to_string())
        );
        let f = Fields::parse(br#"{"name":"n"}"#).ok();
        assert_eq!(
            recorded_model(Some(&Route::Show), f.as_ref()),
            Some("n".to_string())
        );
        assert_eq!(recorded_model(Some(&Route::Chat), f.as_ref()), None);
    }
}
