//! Proxying end to end: streams pass frame by frame, the allow-list holds against every bypass,
//! mutation endpoints never reach Ollama, listings are filtered, errors come in the caller's
//! shape, and the upstream sees the gateway's token, never the client's key.

mod common;

use std::time::Duration;

use common::http::{self, Response};
use common::{SIM_CHUNKS, Stack, UPSTREAM_TOKEN};
use serde_json::Value;

fn assembled_text() -> String {
    (1..=SIM_CHUNKS).map(|i| format!("tok{i} ")).collect()
}

fn post(s: &Stack, path: &str, body: &str, extra: &[(&str, &str)]) -> Response {
    let (k, v) = s.auth();
    let mut h = vec![(k, v.as_str())];
    h.extend_from_slice(extra);
    http::post_json(&s.gw.addr, path, &h, body)
}

fn get(s: &Stack, path: &str, extra: &[(&str, &str)]) -> Response {
    let (k, v) = s.auth();
    let mut h = vec![(k, v.as_str())];
    h.extend_from_slice(extra);
    http::get(&s.gw.addr, path, &h)
}

/// Chunks arrived spread over time (no buffering) and only whole frames are passed on.
fn assert_streamed_per_frame(r: &Response, separator: &str, delay_ms: u64) {
    // Frames the upstream wrote back to back may share a TCP read; frames it spaced out
    // arrive alone, and no chunk ever splits a frame.
    assert!(
        r.chunks.len() >= SIM_CHUNKS,
        "expected a chunk per spaced frame, got {}",
        r.chunks.len()
    );
    for (_, c) in &r.chunks {
        let text = String::from_utf8_lossy(c);
        assert!(
            text.ends_with(separator),
            "a chunk is not whole frames: {text:?}"
        );
    }
    let first = r
        .chunks
        .first()
        .map(|c| c.0)
        .unwrap_or_else(std::time::Instant::now);
    let last = r.chunks.last().map(|c| c.0).unwrap_or(first);
    let spread = last - first;
    assert!(
        spread >= Duration::from_millis(delay_ms * (SIM_CHUNKS as u64 - 2)),
        "stream was buffered: spread {spread:?}"
    );
}

#[test]
fn native_streams_pass_frame_by_frame() {
    let s = Stack::start();
    for (path, body, field) in [
        (
            "/api/chat",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
            "message",
        ),
        (
            "/api/generate",
            r#"{"model":"qwen2.5:0.5b","prompt":"hi"}"#,
            "response",
        ),
    ] {
        let r = post(&s, path, body, &[("x-sim-delay-ms", "30")]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.header("content-type")
                .unwrap_or("")
                .starts_with("application/x-ndjson")
        );
        assert!(r.header("x-request-id").is_some());
        assert_streamed_per_frame(&r, "\n", 30);
        let lines: Vec<Value> = r
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("ndjson line"))
            .collect();
        assert_eq!(lines.len(), SIM_CHUNKS + 1);
        let text: String = lines
            .iter()
            .map(|l| {
                if field == "message" {
                    l["message"]["content"].as_str().unwrap_or("")
                } else {
                    l["response"].as_str().unwrap_or("")
                }
            })
            .collect();
        assert_eq!(text, assembled_text());
        let last = lines.last().expect("final");
        assert_eq!(last["done"], true);
        assert_eq!(last["eval_count"], SIM_CHUNKS);
    }
}

#[test]
fn openai_stream_passes_untouched() {
    let s = Stack::start();
    let body = r#"{"model":"llama3.2","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(
        &s,
        "/v1/chat/completions",
        body,
        &[("x-sim-delay-ms", "30")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/event-stream")
    );
    assert_streamed_per_frame(&r, "\n\n", 30);
    let text = r.text();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let content: String = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).expect("event json"))
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(content, assembled_text());
    // non-streaming JSON on both surfaces
    let r = post(
        &s,
        "/v1/chat/completions",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], SIM_CHUNKS);
    let r = post(
        &s,
        "/api/chat",
        r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["eval_count"], SIM_CHUNKS);
}

#[test]
fn upstream_sees_gateway_token_never_client_key() {
    let s = Stack::start();
    let r = post(
        &s,
        "/api/chat",
        r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}"#,
        &[
            ("Cookie", "session=abc"),
            ("Connection", "x-hop"),
            ("x-hop", "1"),
            ("Origin", "https://app.example"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/api/version", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let reqs = s.sim.requests();
    let reqs = reqs.as_array().expect("array");
    assert!(reqs.len() >= 2);
    for req in reqs {
        let dump = req.to_string();
        assert!(
            !dump.contains(&s.key),
            "client key reached the upstream: {dump}"
        );
        assert!(
            !dump.contains(&s.key[12..]),
            "key secret reached the upstream"
        );
        let headers: Vec<(String, String)> =
            serde_json::from_value(req["headers"].clone()).expect("headers");
        let find = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            find("authorization").as_deref(),
            Some(format!("Bearer {UPSTREAM_TOKEN}").as_str())
        );
        assert!(find("cookie").is_none());
        assert!(find("x-hop").is_none());
        assert!(find("origin").is_none(), "CORS is the gateway's business");
        let host = find("host").expect("host");
        assert_eq!(host, s.sim.addr, "Host rewritten to the upstream address");
        assert!(find("x-request-id").is_some());
    }
}

#[test]
fn mutation_endpoints_are_refused_before_auth_in_every_spelling() {
    let s = Stack::start();
    let paths = [
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
        "/api/blobs/sha256:0123",
        "/api/me",
        "/api/signout",
        "/api/user/keys/abc",
        "/api/experimental/web_search",
        "/api/experimental/web_fetch",
        "/API/PULL",
        "/api/Pull",
        "/api/%70ull",
        "/api/%50ULL",
        "//api//pull",
        "/api/./pull",
        "/x/../api/pull",
        "/api/pull/",
        "/api/blobs/../blobs/x",
        "/./api/delete",
    ];
    for path in paths {
        for method in ["GET", "POST", "DELETE", "HEAD", "PUT", "PATCH"] {
            for with_key in [false, true] {
                let auth = format!("Bearer {}", s.key);
                let h: Vec<(&str, &str)> = if with_key {
                    vec![("Authorization", auth.as_str())]
                } else {
                    vec![]
                };
                let r = http::request(
                    &s.gw.addr,
                    method,
                    path,
                    &h,
                    Some(br#"{"model":"llama3.2"}"#),
                );
                assert_eq!(r.status, 403, "{method} {path} (key: {with_key})");
                if method != "HEAD" {
                    assert!(
                        r.json()["error"].is_string(),
                        "native error shape for {path}"
                    );
                }
                assert!(r.header("x-request-id").is_some());
            }
        }
    }
    // Encoded slashes, NUL, backslashes and characters that would change the forwarded URI
    // are refused outright.
    for path in [
        "/api%2Fpull",
        "/api%2fpull",
        "/api/pull%00",
        "/api\\pull",
        "/api/pu%256cl",
        "/v1/models/gpt-oss:120b-cloud%3F",
        "/v1/models/gpt-oss:120b-cloud%23x",
        "/v1/models/a%20b",
    ] {
        let r = http::request(&s.gw.addr, "POST", path, &[], Some(b"{}"));
        assert_eq!(r.status, 400, "{path}");
    }
    let reqs = s.sim.requests();
    assert_eq!(
        reqs.as_array().map(Vec::len),
        Some(0),
        "nothing reached the upstream: {reqs}"
    );
}

#[test]
fn unknown_routes_and_methods() {
    let s = Stack::start();
    let r = get(&s, "/api/nonexistent", &[]);
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let r = get(&s, "/v1/nonexistent", &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let r = get(&s, "/API/chat", &[]);
    assert_eq!(r.status, 404, "routes match case-sensitively");
    let r = get(&s, "/api/chat", &[]);
    assert_eq!(r.status, 405);
    let r = http::get(&s.gw.addr, "/healthz", &[]);
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    let r = http::request(&s.gw.addr, "HEAD", "/", &[], None);
    assert_eq!(r.status, 200);
    let r = http::get(&s.gw.addr, "/", &[]);
    assert_eq!(r.text(), "Ollama is running");
    let r = http::get(&s.gw.addr, "/readyz", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["checks"]["ollama"], "ok");
}

#[test]
fn disallowed_models_are_refused_in_both_shapes() {
    let s = Stack::start();
    let r = post(
        &s,
        "/api/chat",
        r#"{"model":"mistral:7b","messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    );
    assert_eq!(r.status, 403);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("not allowed")
    );
    let r = post(
        &s,
        "/v1/chat/completions",
        r#"{"model":"mistral:7b","messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["type"], "permission_error");
    assert_eq!(r.json()["error"]["code"], "model_not_allowed");
    let r = get(&s, "/v1/models/mistral:7b", &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let r = get(&s, "/v1/models/llama3.2", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let recorded = s.sim.requests();
    assert!(
        recorded
            .as_array()
            .expect("array")
            .iter()
            .all(|r| r["model"] != "mistral:7b"),
        "a refused model reached the upstream: {recorded}"
    );
}

#[test]
fn allow_list_bypasses_are_closed() {
    let s = Stack::start();
    s.gw.cli(&["create-tenant", "--name", "open", "--allow-all-models"]);
    let (open_key, _) = s.gw.create_key("open", "k", &[]);
    let refused_400 = [
        r#"{"model":"llama3.2","model":"mistral:7b","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"llama3.2","MODEL":"mistral:7b","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"llama3.2","Model":"mistral:7b","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"MODEL":"mistral:7b","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"llama3.2","\u006dodel":"mistral:7b","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"llama3.2","stream":false,"Stream":true}"#,
        // Go folds U+017F (long s) to 's' and U+212A (Kelvin) to 'k' when matching fields.
        r#"{"model":"llama3.2","stream":false,"\u017ftream":true,"messages":[]}"#,
        "{\"model\":\"llama3.2\",\"\u{17F}tream\":true}",
        r#"{"model":"llama3.2","options":{"num_ctx":1,"NUM_CTX":9}}"#,
    ];
    for body in refused_400 {
        let r = post(&s, "/api/chat", body, &[]);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
    }
    // /api/show: `name` is the fallback; disagreeing fields are refused.
    assert_eq!(
        post(
            &s,
            "/api/show",
            r#"{"model":"llama3.2","name":"mistral:7b"}"#,
            &[]
        )
        .status,
        400
    );
    assert_eq!(
        post(&s, "/api/show", r#"{"name":"mistral:7b"}"#, &[]).status,
        403
    );
    assert_eq!(
        post(&s, "/api/show", r#"{"name":"llama3.2"}"#, &[]).status,
        200
    );
    // Aliases resolve like Ollama.
    for alias in [
        "llama3.2",
        "llama3.2:latest",
        "LLAMA3.2",
        "library/llama3.2",
        "registry.ollama.ai/library/llama3.2:latest",
    ] {
        let body = format!(
            r#"{{"model":"{alias}","stream":false,"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        let r = post(&s, "/api/chat", &body, &[]);
        assert_ne!(r.status, 403, "{alias} is the allowed model");
    }
    for other in [
        "llama3.2:1b",
        "someone/llama3.2",
        "mistral",
        "gpt-oss:120b-cloud",
        "llama3.2:cloud",
    ] {
        let body =
            format!(r#"{{"model":"{other}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        assert_eq!(post(&s, "/api/chat", &body, &[]).status, 403, "{other}");
    }
    // allow_all_models never covers cloud models.
    let auth = format!("Bearer {open_key}");
    let r = http::post_json(
        &s.gw.addr,
        "/api/chat",
        &[("Authorization", auth.as_str())],
        r#"{"model":"gpt-oss:120b-cloud","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 403);
    let r = http::post_json(
        &s.gw.addr,
        "/api/chat",
        &[("Authorization", auth.as_str())],
        r#"{"model":"mistral:7b","stream":false,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // What the upstream resolved is exactly what was checked.
    for req in s.sim.requests().as_array().expect("array") {
        let m = req["model"].as_str().unwrap_or("");
        assert!(!m.contains("cloud"), "cloud model reached upstream: {req}");
    }
}

#[test]
fn listings_are_filtered() {
    let s = Stack::start();
    let names = |v: &Value, list: &str, field: &str| -> Vec<String> {
        let mut n: Vec<String> = v[list]
            .as_array()
            .expect("list")
            .iter()
            .map(|m| m[field].as_str().unwrap_or("").to_string())
            .collect();
        n.sort();
        n
    };
    let r = get(&s, "/api/tags", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        names(&r.json(), "models", "name"),
        vec!["llama3.2:latest", "qwen2.5:0.5b"]
    );
    let r = get(&s, "/api/ps", &[("x-sim-ps-all", "1")]);
    assert_eq!(r.status, 200);
    assert_eq!(
        names(&r.json(), "models", "name"),
        vec!["llama3.2:latest", "qwen2.5:0.5b"]
    );
    let r = get(&s, "/v1/models", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        names(&r.json(), "data", "id"),
        vec!["llama3.2:latest", "qwen2.5:0.5b"]
    );
    // A key with no models sees empty lists, `data: []` not null.
    s.gw.cli(&["set-models", "--prefix", &s.prefix, "--models", ""]);
    let (k2, p2) = s.gw.create_key("acme", "narrow", &[]);
    s.gw.cli(&["set-models", "--prefix", &p2, "--models", "qwen2.5:0.5b"]);
    let auth = format!("Bearer {k2}");
    let r = http::get(
        &s.gw.addr,
        "/v1/models",
        &[("Authorization", auth.as_str())],
    );
    assert_eq!(names(&r.json(), "data", "id"), vec!["qwen2.5:0.5b"]);
}

#[test]
fn route_coverage_every_forwarded_path_is_behind_auth_and_allow_list() {
    let s = Stack::start();
    for (path, method) in neuronetz_gateway::routes::forwarded_paths() {
        let body = br#"{"model":"mistral:7b","input":"x","prompt":"x","messages":[{"role":"user","content":"hi"}]}"#;
        let path = path.as_str();
        let r = http::request(&s.gw.addr, method.as_str(), path, &[], Some(body));
        assert_eq!(r.status, 401, "{method} {path} without a key");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let route = neuronetz_gateway::routes::classify(&method, path).expect("route");
        if route.model_field().is_some() {
            let auth = format!("Bearer {}", s.key);
            let r = http::request(
                &s.gw.addr,
                method.as_str(),
                path,
                &[
                    ("Authorization", auth.as_str()),
                    ("Content-Type", "application/json"),
                ],
                Some(body),
            );
            assert_eq!(r.status, 403, "{method} {path} with a disallowed model");
        }
    }
    assert_eq!(
        s.sim.requests().as_array().map(Vec::len),
        Some(0),
        "nothing unauthorised was forwarded"
    );
}

#[test]
fn bodies_are_bounded_and_validated() {
    let s = Stack::start_with(&[("MAX_REQUEST_BODY_BYTES", "200000")]);
    let auth = format!("Bearer {}", s.key);
    let a = ("Authorization", auth.as_str());
    // declared too large: 413 before reading
    let r = http::request(
        &s.gw.addr,
        "POST",
        "/api/chat",
        &[a, ("Content-Length", "300000")],
        Some(b""),
    );
    assert_eq!(r.status, 413);
    let r = post(&s, "/v1/chat/completions", "{not json", &[]);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(
        post(
            &s,
            "/api/chat",
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            &[]
        )
        .status,
        400
    );
    assert_eq!(post(&s, "/api/chat", r#"{"model":7}"#, &[]).status, 400);
    let r = http::request(
        &s.gw.addr,
        "POST",
        "/api/chat",
        &[a, ("Content-Encoding", "gzip")],
        Some(b"\x1f\x8b"),
    );
    assert_eq!(r.status, 415);
    // chunked bodies: small ones work, large ones need Content-Length
    let small =
        r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = http::request(
        &s.gw.addr,
        "POST",
        "/api/chat",
        &[a, ("Transfer-Encoding", "chunked")],
        Some(small.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let big = format!(
        r#"{{"model":"llama3.2","stream":false,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(100_000)
    );
    let r = http::request(
        &s.gw.addr,
        "POST",
        "/api/chat",
        &[a, ("Transfer-Encoding", "chunked")],
        Some(big.as_bytes()),
    );
    assert_eq!(r.status, 411);
    // a large body with Content-Length is forwarded whole
    s.sim.clear();
    let r = post(&s, "/api/chat", &big, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let recorded = s.sim.requests();
    assert_eq!(recorded[0]["body"].as_str().map(str::len), Some(big.len()));
}

#[test]
fn upstream_faults_map_to_502_and_504_in_the_callers_shape() {
    let s = Stack::start_with(&[("UPSTREAM_READ_TIMEOUT", "1")]);
    let r = post(
        &s,
        "/api/chat",
        r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}"#,
        &[("x-sim-headers-delay-ms", "3000")],
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.json()["error"].is_string());
    let r = post(
        &s,
        "/v1/chat/completions",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        &[("x-sim-headers-delay-ms", "3000")],
    );
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    // An upstream that is not there: 502.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let db = common::fresh_database();
    let gw =
        common::Gateway::start(&[("DATABASE_URL", db.as_str()), ("OLLAMA_URL", dead.as_str())]);
    gw.cli(&["create-tenant", "--name", "t", "--allow-all-models"]);
    let (key, _) = gw.create_key("t", "k", &[]);
    let auth = format!("Bearer {key}");
    let r = http::post_json(
        &gw.addr,
        "/v1/chat/completions",
        &[("Authorization", auth.as_str())],
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["type"], "api_error");
    assert!(r.header("x-request-id").is_some());
    let r = http::get(&gw.addr, "/readyz", &[]);
    assert_eq!(r.status, 503);
    assert!(r.json()["error"].as_str().unwrap_or("").contains("ollama"));
}

#[test]
fn request_ids_are_kept_or_minted() {
    let s = Stack::start();
    let r = get(&s, "/api/version", &[("X-Request-ID", "abc-123.x_y")]);
    assert_eq!(r.header("x-request-id"), Some("abc-123.x_y"));
    let r = get(
        &s,
        "/api/version",
        &[("X-Request-ID", "bad id with spaces")],
    );
    let id = r.header("x-request-id").expect("id");
    assert!(id.starts_with("req_"));
    let r = http::get(&s.gw.addr, "/api/tags", &[("X-Request-ID", "err-1")]);
    assert_eq!((r.status, r.header("x-request-id")), (401, Some("err-1")));
    let recorded = s.sim.requests();
    assert_eq!(
        recorded[0]["headers"]
            .as_array()
            .expect("h")
            .iter()
            .filter(|h| h[0]
                .as_str()
                .is_some_and(|k| k.eq_ignore_ascii_case("x-request-id")))
            .count(),
        1
    );
}

#[test]
fn a_client_that_goes_away_closes_the_upstream_request() {
    use std::io::{Read, Write};
    let s = Stack::start();
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
    let mut stream = std::net::TcpStream::connect(&s.gw.addr).expect("connect");
    let req = format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nx-sim-chunks: 50\r\nx-sim-delay-ms: 200\r\nContent-Length: {}\r\n\r\n{body}",
        s.key,
        body.len()
    );
    stream.write_all(req.as_bytes()).expect("write");
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let stats = |s: &Stack| http::get(&s.sim.addr, "/__sim/stats", &[]).json();
    assert_eq!(stats(&s)["inflight"], 1, "the stream is running upstream");
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while stats(&s)["inflight"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "upstream request still running after the client left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn upstream_concurrency_cap_answers_503() {
    let s = Stack::start_with(&[("UPSTREAM_MAX_INFLIGHT", "1")]);
    let addr = s.gw.addr.clone();
    let auth = format!("Bearer {}", s.key);
    let slow = std::thread::spawn(move || {
        http::post_json(
            &addr,
            "/api/chat",
            &[("Authorization", auth.as_str()), ("x-sim-delay-ms", "100")],
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let r = post(
        &s,
        "/v1/chat/completions",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "upstream_saturated");
    assert_eq!(slow.join().expect("slow request").status, 200);
    let r = post(
        &s,
        "/v1/chat/completions",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    );
    assert_eq!(r.status, 200, "the slot was released");
}

#[test]
fn cors_preflights_follow_the_allowed_origins() {
    let s = Stack::start_with(&[("CORS_ALLOWED_ORIGINS", "https://app.example")]);
    let pre = |origin: &str| {
        http::request(
            &s.gw.addr,
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, content-type",
                ),
            ],
            None,
        )
    };
    let r = pre("https://app.example");
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(
        r.header("access-control-allow-headers")
            .unwrap_or("")
            .contains("authorization")
    );
    assert_eq!(pre("https://evil.example").status, 403);
    let r = get(&s, "/v1/models", &[("Origin", "https://app.example")]);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let r = get(&s, "/v1/models", &[("Origin", "https://evil.example")]);
    assert!(r.header("access-control-allow-origin").is_none());
}

#[test]
fn option_policy_is_applied_to_what_ollama_receives() {
    let s = Stack::start();
    let last_body = |s: &Stack| -> Value {
        let reqs = s.sim.requests();
        let body = reqs
            .as_array()
            .and_then(|a| a.last())
            .map(|r| r["body"].as_str().unwrap_or("").to_string())
            .unwrap_or_default();
        serde_json::from_str(&body).expect("recorded body is JSON")
    };
    // Default policy: keep_alive clamped to [1m, 30m], runner options stripped, unload refused.
    let r = post(
        &s,
        "/api/chat",
        r#"{"model":"llama3.2","stream":false,"keep_alive":"24h","options":{"num_gpu":99,"temperature":0.2},"messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = last_body(&s);
    assert_eq!(sent["keep_alive"], 1800);
    assert_eq!(sent["options"], serde_json::json!({"temperature": 0.2}));
    let r = post(
        &s,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"","keep_alive":0}"#,
        &[],
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("keep_alive")
    );

    // A key with clamps: num_ctx and the output are bounded, on both surfaces.
    let (key, prefix) = s.gw.create_key("acme", "clamped", &[]);
    s.gw.cli(&[
        "set-policy",
        "--prefix",
        &prefix,
        "--max-num-ctx",
        "2048",
        "--max-num-predict",
        "3",
    ]);
    let auth = format!("Bearer {key}");
    let r = http::post_json(
        &s.gw.addr,
        "/api/chat",
        &[("Authorization", auth.as_str())],
        r#"{"model":"llama3.2","stream":false,"options":{"num_ctx":8192},"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["eval_count"],
        3,
        "the simulator honoured the clamped num_predict"
    );
    let sent = last_body(&s);
    assert_eq!(
        (
            sent["options"]["num_ctx"].as_i64(),
            sent["options"]["num_predict"].as_i64()
        ),
        (Some(2048), Some(3))
    );
    let r = http::post_json(
        &s.gw.addr,
        "/v1/chat/completions",
        &[("Authorization", auth.as_str())],
        r#"{"model":"llama3.2","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    assert_eq!(last_body(&s)["max_tokens"], 3);

    // A trusted key may pass keep_alive through.
    let (trusted, tp) = s.gw.create_key("acme", "trusted", &[]);
    s.gw.cli(&["set-policy", "--prefix", &tp, "--keep-alive", "pass"]);
    let auth = format!("Bearer {trusted}");
    let r = http::post_json(
        &s.gw.addr,
        "/api/chat",
        &[("Authorization", auth.as_str())],
        r#"{"model":"llama3.2","stream":false,"keep_alive":0,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(last_body(&s)["keep_alive"], 0);
}
