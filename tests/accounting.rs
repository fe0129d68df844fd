//! Token accounting is exact on every route family, streamed or not, and streams cut short are
//! charged what was seen. The counts are read from the gateway's per-request log line (JSON),
//! and compared with the simulator's documented rule: completion = content chunks,
//! prompt = ⌈prompt text bytes / 4⌉ ("hello world" = 3).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use common::http;
use common::{SIM_CHUNKS, Stack};
use serde_json::Value;

const N: u64 = SIM_CHUNKS as u64;

/// The `request` log line of one request id, waiting for the logging phase.
fn logged(s: &Stack, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for line in s.gw.log_text().lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line)
                && v["fields"]["message"] == "request"
                && v["fields"]["request_id"] == request_id
            {
                return v["fields"].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no log line for {request_id}:\n{}",
            s.gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stack() -> (Stack, String) {
    let s = Stack::start_with(&[("LOG_FORMAT", "json")]);
    s.gw.cli(&["create-tenant", "--name", "all", "--allow-all-models"]);
    let (key, _) = s.gw.create_key("all", "k", &[]);
    (s, key)
}

#[test]
fn usage_is_exact_for_every_route_family() {
    let (s, key) = stack();
    let chat = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hello world"}]"#;
    let cases: Vec<(&str, String, u64, u64)> = vec![
        ("/api/chat", format!("{chat}}}"), 3, N),
        ("/api/chat", format!(r#"{chat},"stream":false}}"#), 3, N),
        (
            "/api/generate",
            r#"{"model":"qwen2.5:0.5b","prompt":"hello world"}"#.into(),
            3,
            N,
        ),
        (
            "/api/generate",
            r#"{"model":"qwen2.5:0.5b","prompt":"hello world","stream":false}"#.into(),
            3,
            N,
        ),
        (
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":"hello world"}"#.into(),
            3,
            0,
        ),
        ("/v1/chat/completions", format!("{chat}}}"), 3, N),
        (
            "/v1/chat/completions",
            format!(r#"{chat},"stream":true}}"#),
            3,
            N,
        ),
        (
            "/v1/chat/completions",
            format!(r#"{chat},"stream":true,"stream_options":{{"include_usage":true}}}}"#),
            3,
            N,
        ),
        (
            "/v1/completions",
            r#"{"model":"llama3.2","prompt":"hello world","stream":true}"#.into(),
            3,
            N,
        ),
        (
            "/v1/completions",
            r#"{"model":"llama3.2","prompt":"hello world"}"#.into(),
            3,
            N,
        ),
        (
            "/v1/responses",
            r#"{"model":"llama3.2","input":"hello world","stream":true}"#.into(),
            3,
            N,
        ),
        (
            "/v1/responses",
            r#"{"model":"llama3.2","input":"hello world"}"#.into(),
            3,
            N,
        ),
        (
            "/v1/embeddings",
            r#"{"model":"nomic-embed-text","input":"hello world"}"#.into(),
            3,
            0,
        ),
    ];
    let auth = format!("Bearer {key}");
    for (i, (path, body, prompt, completion)) in cases.iter().enumerate() {
        let id = format!("acct-{i}");
        let r = http::post_json(
            &s.gw.addr,
            path,
            &[
                ("Authorization", auth.as_str()),
                ("X-Request-ID", id.as_str()),
            ],
            body,
        );
        assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
        let line = logged(&s, &id);
        assert_eq!(line["prompt_tokens"], *prompt, "{path} {body}: {line}");
        assert_eq!(
            line["completion_tokens"], *completion,
            "{path} {body}: {line}"
        );
        assert_eq!(line["usage_reported"], true, "{path} {body}");
    }
    // The legacy endpoint reports no counts: the documented estimate applies.
    let body = r#"{"model":"nomic-embed-text","prompt":"hello world"}"#;
    let r = http::post_json(
        &s.gw.addr,
        "/api/embeddings",
        &[("Authorization", auth.as_str()), ("X-Request-ID", "legacy")],
        body,
    );
    assert_eq!(r.status, 200);
    let line = logged(&s, "legacy");
    assert_eq!(
        (
            line["prompt_tokens"].as_u64(),
            line["completion_tokens"].as_u64()
        ),
        (Some(body.len().div_ceil(4) as u64), Some(0))
    );
    assert_eq!(line["usage_reported"], false);
}

#[test]
fn the_client_gets_exactly_the_stream_it_asked_for() {
    let (s, key) = stack();
    let auth = format!("Bearer {key}");
    let chat = r#"{"model":"llama3.2","stream":true,"messages":[{"role":"user","content":"hello world"}]}"#;
    let r = http::post_json(
        &s.gw.addr,
        "/v1/chat/completions",
        &[("Authorization", auth.as_str())],
        chat,
    );
    let text = r.text();
    assert!(
        !text.contains("\"usage\""),
        "no usage event unless asked: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        text.matches("data: ").count(),
        N as usize + 2,
        "content chunks (the first carries the role) + finish + [DONE]"
    );
    let asked = chat.replace(
        "\"stream\":true",
        "\"stream\":true,\"stream_options\":{\"include_usage\":true}",
    );
    let r = http::post_json(
        &s.gw.addr,
        "/v1/chat/completions",
        &[("Authorization", auth.as_str())],
        &asked,
    );
    assert!(r.text().contains("\"usage\":{"), "usage event when asked");
    let r = http::post_json(
        &s.gw.addr,
        "/v1/completions",
        &[("Authorization", auth.as_str())],
        r#"{"model":"llama3.2","prompt":"hello world","stream":true}"#,
    );
    let text = r.text();
    assert!(
        !text.contains("usage"),
        "completions chunks lose the zeroed usage: {text}"
    );
    for event in text.split("\n\n").filter(|e| e.starts_with("data: {")) {
        serde_json::from_str::<Value>(&event["data: ".len()..])
            .expect("every event is still valid JSON");
    }
    // The upstream was asked for usage both times.
    let recorded = s.sim.requests();
    let asked_upstream = recorded
        .as_array()
        .expect("array")
        .iter()
        .filter(|r| {
            r["body"]
                .as_str()
                .is_some_and(|b| b.contains("\"include_usage\":true"))
        })
        .count();
    assert_eq!(asked_upstream, 3);
}

#[test]
fn cut_streams_are_charged_what_was_seen() {
    let (s, key) = stack();
    // A client that goes away after 3 chunks.
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hello world"}]}"#;
    let mut stream = std::net::TcpStream::connect(&s.gw.addr).expect("connect");
    write!(
        stream,
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Request-ID: gone\r\nx-sim-chunks: 20\r\nx-sim-delay-ms: 300\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut seen = 0;
    let mut line = String::new();
    while seen < 3 {
        line.clear();
        reader.read_line(&mut line).expect("read");
        if line.starts_with("{\"model\"") {
            seen += 1;
        }
    }
    drop(reader);
    drop(stream);
    let l = logged(&s, "gone");
    assert_eq!(l["completion_tokens"], 3, "{l}");
    assert_eq!(
        l["prompt_tokens"],
        body.len().div_ceil(4) as u64,
        "estimated from the request size"
    );
    assert_eq!(l["stream_completed"], false);
    assert_eq!(l["client_gone"], true);

    // An upstream that fails mid-stream (in-band error line under 200).
    let auth = format!("Bearer {key}");
    let r = http::post_json(
        &s.gw.addr,
        "/api/chat",
        &[
            ("Authorization", auth.as_str()),
            ("X-Request-ID", "failed"),
            ("x-sim-fail-after", "4"),
        ],
        body,
    );
    assert_eq!(r.status, 200);
    let failed_body = r.text();
    let l = logged(&s, "failed");
    assert_eq!(l["completion_tokens"], 4);
    assert_eq!(l["stream_completed"], false);

    // An OpenAI stream that just stops: the chunks seen are charged.
    let r = http::post_json(
        &s.gw.addr,
        "/v1/chat/completions",
        &[
            ("Authorization", auth.as_str()),
            ("X-Request-ID", "stopped"),
            ("x-sim-fail-after", "5"),
        ],
        r#"{"model":"llama3.2","stream":true,"messages":[{"role":"user","content":"hello world"}]}"#,
    );
    assert_eq!(r.status, 200);
    let l = logged(&s, "stopped");
    assert_eq!(l["completion_tokens"], 5);
    assert_eq!(l["usage_reported"], false);
    // The client is told: the stream closes with an error event in its own framing.
    assert!(
        r.text().ends_with(
            "data: {\"error\":{\"message\":\"upstream stream ended before it was complete\",\"type\":\"api_error\",\"param\":null,\"code\":\"upstream_incomplete\"}}\n\n"
        ),
        "{}",
        r.text()
    );

    // The native stream above brought its own error line: nothing is added.
    assert_eq!(failed_body.matches("\"error\"").count(), 1, "{failed_body}");

    // An upstream that drops the connection mid-stream: the client still gets a closed
    // stream ending in an error line, and the chunks seen are charged.
    let r = http::post_json(
        &s.gw.addr,
        "/api/chat",
        &[
            ("Authorization", auth.as_str()),
            ("X-Request-ID", "aborted"),
            ("x-sim-fail-after", "3"),
            ("x-sim-fail-mode", "abort"),
        ],
        body,
    );
    assert_eq!(r.status, 200);
    assert!(
        r.text()
            .ends_with("{\"error\":\"upstream stream ended before it was complete\"}\n"),
        "{}",
        r.text()
    );
    let l = logged(&s, "aborted");
    assert_eq!(l["completion_tokens"], 3);
    assert_eq!(l["stream_completed"], false);
}
