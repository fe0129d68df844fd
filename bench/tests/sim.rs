//! End-to-end tests of the `ollama-sim` binary over real TCP, with a tiny
//! HTTP/1.1 client that keeps chunk boundaries visible.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

mod support;

struct Sim {
    _proc: support::Running,
    addr: String,
}

impl Sim {
    fn start(args: &[&str]) -> Sim {
        let (proc, addr) = support::start_sim(args);
        Sim { _proc: proc, addr }
    }

    fn conn(&self) -> Conn {
        let stream = TcpStream::connect(&self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Conn {
            reader: BufReader::new(stream),
            host: self.addr.clone(),
        }
    }

    fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        self.conn().send(method, path, headers, body)
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        self.req("POST", path, headers, body)
    }

    fn json(&self, method: &str, path: &str) -> Value {
        self.req(method, path, &[], "").json()
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Chunk payloads when the body was chunked.
    chunks: Option<Vec<Vec<u8>>>,
    /// False when a chunked body ended without its terminator.
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    fn chunk_strings(&self) -> Vec<String> {
        self.chunks
            .as_ref()
            .expect("chunked body")
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    }

    /// NDJSON lines, asserting one line per chunk.
    fn ndjson(&self) -> Vec<Value> {
        self.chunk_strings()
            .iter()
            .map(|c| {
                assert!(c.ends_with('\n'), "chunk is not one line: {c:?}");
                assert_eq!(c.matches('\n').count(), 1, "chunk has several lines: {c:?}");
                serde_json::from_str(c.trim_end()).expect("json line")
            })
            .collect()
    }

    /// SSE `data:` payloads, asserting one event per chunk.
    fn sse(&self) -> Vec<String> {
        self.chunk_strings()
            .iter()
            .map(|c| {
                assert!(c.ends_with("\n\n"), "chunk is not one event: {c:?}");
                assert_eq!(c.matches("\n\n").count(), 1, "several events: {c:?}");
                let data = c
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .expect("data line");
                data.to_string()
            })
            .collect()
    }
}

struct Conn {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Conn {
    fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let mut req = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {}\r\n", self.host));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        self.reader
            .get_mut()
            .write_all(req.as_bytes())
            .expect("write request");
        self.read_response(method == "HEAD")
    }

    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_string()),
        }
    }

    fn read_response(&mut self, head: bool) -> Resp {
        let status_line = self.line().expect("status line");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        while let Some(line) = self.line() {
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').expect("header line");
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
            chunks: None,
            complete: true,
        };
        if head || status == 204 || status == 304 {
            return resp;
        }
        if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            let mut chunks = Vec::new();
            resp.complete = false;
            while let Some(size_line) = self.line() {
                let Ok(size) = usize::from_str_radix(size_line.trim(), 16) else {
                    break;
                };
                if size == 0 {
                    resp.complete = self.line().is_some_and(|l| l.is_empty());
                    break;
                }
                let mut data = vec![0; size];
                if self.reader.read_exact(&mut data).is_err() {
                    break;
                }
                if self.line().is_none() {
                    break;
                }
                resp.body.extend_from_slice(&data);
                chunks.push(data);
            }
            resp.chunks = Some(chunks);
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            let mut data = vec![0; len];
            self.reader.read_exact(&mut data).expect("body");
            resp.body = data;
        } else {
            let _ = self.reader.read_to_end(&mut resp.body);
        }
        resp
    }
}

const CHAT: &str = r#"{"model":"llama3.2","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello there"}]}"#;

#[test]
fn native_chat_stream_frames_and_counts() {
    let sim = Sim::start(&["--chunks", "4"]);
    let r = sim.post("/api/chat", &[], CHAT);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    assert!(r.header("content-length").is_none());
    assert!(r.complete);
    let lines = r.ndjson();
    assert_eq!(lines.len(), 5);
    let mut text = String::new();
    for (i, l) in lines[..4].iter().enumerate() {
        assert_eq!(l["model"], "llama3.2");
        assert_eq!(l["done"], false);
        assert_eq!(l["message"]["role"], "assistant");
        assert!(l.get("eval_count").is_none());
        assert!(l.get("done_reason").is_none());
        assert!(l["created_at"].as_str().is_some_and(|s| s.ends_with('Z')));
        assert_eq!(l["message"]["content"], format!("tok{} ", i + 1));
        text.push_str(l["message"]["content"].as_str().unwrap_or_default());
    }
    assert_eq!(text, "tok1 tok2 tok3 tok4 ");
    let last = &lines[4];
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["message"]["content"], "");
    // "Be brief." (9) + "Hello there" (11) = 20 bytes -> 5 tokens.
    assert_eq!(last["prompt_eval_count"], 5);
    assert_eq!(last["eval_count"], 4);
    for k in [
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    ] {
        assert!(last[k].as_u64().is_some_and(|v| v > 0), "{k}");
    }

    // Header knob, output cap, and stream:false.
    let r = sim.post(
        "/api/chat",
        &[("x-sim-chunks", "6")],
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":2},"stream":false}"#,
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let v = r.json();
    assert_eq!(v["message"]["content"], "tok1 tok2 ");
    assert_eq!(v["done_reason"], "length");
    assert_eq!(v["eval_count"], 2);
    assert_eq!(v["prompt_eval_count"], 1);
}

#[test]
fn native_generate_and_keep_alive() {
    let sim = Sim::start(&[]);
    let mut conn = sim.conn();
    let body = r#"{"model":"qwen2.5:0.5b","prompt":"abcdefghi","system":"xyz","stream":true}"#;
    let r = conn.send("POST", "/api/generate", &[("x-sim-chunks", "2")], body);
    let lines = r.ndjson();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["response"], "tok1 ");
    assert_eq!(lines[2]["prompt_eval_count"], 3);
    assert!(lines[2]["context"].is_array());
    // Same connection again: keep-alive works after a chunked stream.
    let r = conn.send("GET", "/api/version", &[], "");
    assert_eq!(r.json()["version"], "0.12.0");
    let r = conn.send(
        "POST",
        "/api/generate",
        &[],
        r#"{"model":"qwen2.5:0.5b","prompt":"a","raw":true,"stream":false}"#,
    );
    assert!(r.json().get("context").is_none());
}

#[test]
fn v1_chat_stream_with_and_without_usage() {
    let sim = Sim::start(&[]);
    let base =
        r#""model":"llama3.2","messages":[{"role":"user","content":"abcdefgh"}],"stream":true"#;
    let r = sim.post(
        "/v1/chat/completions",
        &[("x-sim-chunks", "3")],
        &format!("{{{base}}}"),
    );
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = r.sse();
    assert_eq!(events.len(), 5, "3 content + finish + DONE: {events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["system_fingerprint"], "fp_ollama");
    assert!(
        chunks[0]["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("chatcmpl-"))
    );
    assert!(chunks[0]["choices"][0]["finish_reason"].is_null());
    assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "tok3 ");
    assert_eq!(chunks[3]["choices"][0]["delta"], serde_json::json!({}));
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));

    let with = format!(r#"{{{base},"stream_options":{{"include_usage":true}},"max_tokens":2}}"#);
    let events = sim
        .post("/v1/chat/completions", &[("x-sim-chunks", "3")], &with)
        .sse();
    assert_eq!(events.len(), 5, "2 content + finish + usage + DONE");
    let finish: Value = serde_json::from_str(&events[2]).expect("json");
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage: Value = serde_json::from_str(&events[3]).expect("json");
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert_eq!(
        usage["usage"],
        serde_json::json!({"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4})
    );
    assert_eq!(events[4], "[DONE]");

    // Non-streaming always has usage.
    let v = sim
        .post(
            "/v1/chat/completions",
            &[],
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn v1_completions_zeroed_usage_on_every_chunk() {
    let sim = Sim::start(&["--chunks", "2"]);
    let events = sim
        .post(
            "/v1/completions",
            &[],
            r#"{"model":"llama3.2","prompt":"12345","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .sse();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    let (last, rest) = chunks.split_last().expect("chunks");
    assert_eq!(rest.len(), 3, "2 content + finish");
    for c in rest {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(
            c["usage"],
            serde_json::json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
        );
    }
    assert_eq!(rest[0]["choices"][0]["text"], "tok1 ");
    assert_eq!(rest[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"], serde_json::json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 2);
    assert_eq!(last["usage"]["completion_tokens"], 2);

    let r = sim.post(
        "/v1/completions",
        &[],
        r#"{"model":"llama3.2","prompt":["not","a","string"]}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}

#[test]
fn v1_responses_stream_events() {
    let sim = Sim::start(&["--chunks", "2"]);
    let r = sim.post(
        "/v1/responses",
        &[],
        r#"{"model":"llama3.2","instructions":"abcd","input":[{"role":"user","content":[{"type":"input_text","text":"efgh"}]}],"stream":true}"#,
    );
    let names: Vec<String> = r
        .chunk_strings()
        .iter()
        .map(|c| {
            c.lines()
                .next()
                .and_then(|l| l.strip_prefix("event: "))
                .expect("event line")
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let events = r.sse();
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let done: Value = serde_json::from_str(events.last().expect("event")).expect("json");
    let usage = &done["response"]["usage"];
    assert_eq!(usage["input_tokens"], 2);
    assert_eq!(usage["output_tokens"], 2);
    assert_eq!(usage["total_tokens"], 4);
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        done["response"]["output"][0]["content"][0]["text"],
        "tok1 tok2 "
    );
}

#[test]
fn mid_stream_failures() {
    let sim = Sim::start(&[]);
    let fail = [("x-sim-fail-after", "2")];
    // Native: K chunks, then an in-band error line; the stream ends cleanly.
    let r = sim.post("/api/chat", &fail, CHAT);
    assert_eq!(r.status, 200);
    assert!(r.complete);
    let lines = r.ndjson();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[2],
        serde_json::json!({"error": "simulated upstream failure"})
    );
    assert!(!lines.iter().any(|l| l["done"] == true));

    // /v1: K chunks, then the stream just ends - no finish, usage or [DONE].
    let r = sim.post(
        "/v1/chat/completions",
        &fail,
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    assert!(r.complete);
    let events = r.sse();
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| !e.contains("finish_reason\":\"") && !e.contains("usage"))
    );

    // Abort: the connection closes without the chunked terminator.
    let r = sim.post(
        "/api/generate",
        &[("x-sim-fail-after", "1"), ("x-sim-fail-mode", "abort")],
        r#"{"model":"llama3.2","prompt":"x"}"#,
    );
    assert!(!r.complete);
    assert_eq!(r.chunks.as_ref().map(Vec::len), Some(1));

    // Non-streaming failure is a 500 in the route's error shape.
    let r = sim.post(
        "/v1/chat/completions",
        &fail,
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["type"], "api_error");

    // x-sim-status answers before anything streams.
    let r = sim.post("/api/chat", &[("x-sim-status", "503")], CHAT);
    assert_eq!(r.status, 503);
    assert!(r.json()["error"].is_string());
}

#[test]
fn client_disconnect_stops_stream() {
    let sim = Sim::start(&[]);
    {
        let mut conn = sim.conn();
        let body = CHAT;
        let req = format!(
            "POST /api/chat HTTP/1.1\r\nHost: {}\r\nx-sim-chunks: 1000\r\nx-sim-delay-ms: 50\r\nContent-Length: {}\r\n\r\n{body}",
            sim.addr,
            body.len()
        );
        conn.reader
            .get_mut()
            .write_all(req.as_bytes())
            .expect("write");
        let mut first = String::new();
        conn.reader.read_line(&mut first).expect("status");
        assert!(first.contains("200"));
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(sim.json("GET", "/__sim/stats")["inflight"], 1);
    }
    let mut inflight = Value::Null;
    for _ in 0..50 {
        inflight = sim.json("GET", "/__sim/stats")["inflight"].clone();
        if inflight == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(inflight, 0);
}

#[test]
fn require_token() {
    let sim = Sim::start(&["--require-token", "s3cret"]);
    let r = sim.req("GET", "/api/tags", &[], "");
    assert_eq!(r.status, 401);
    assert_eq!(r.json(), serde_json::json!({"error": "unauthorized"}));
    let r = sim.req("GET", "/api/tags", &[("Authorization", "Bearer wrong")], "");
    assert_eq!(r.status, 401);
    let r = sim.req(
        "GET",
        "/api/tags",
        &[("Authorization", "Bearer s3cret")],
        "",
    );
    assert_eq!(r.status, 200);
    // /__sim is exempt.
    assert_eq!(sim.req("GET", "/__sim/stats", &[], "").status, 200);

    let sim = Sim::start(&[
        "--require-token",
        "k",
        "--token-header",
        "x-api-key",
        "--token-scheme",
        "",
    ]);
    assert_eq!(sim.req("GET", "/", &[("x-api-key", "k")], "").status, 200);
    assert_eq!(
        sim.req("GET", "/", &[("x-api-key", "Bearer k")], "").status,
        401
    );
}

#[test]
fn host_check() {
    let sim = Sim::start(&[]);
    for ok in [
        "localhost:11434",
        "127.0.0.1",
        "ollama.internal",
        "10.0.0.2:80",
    ] {
        assert_eq!(sim.req("GET", "/", &[("Host", ok)], "").status, 200, "{ok}");
    }
    let r = sim.req(
        "GET",
        "/api/version",
        &[("Host", "gateway.example.com")],
        "",
    );
    assert_eq!(r.status, 403);
    assert!(r.body.is_empty());
    assert_eq!(
        sim.req("GET", "/__sim/stats", &[("Host", "evil.example")], "")
            .status,
        200
    );

    let sim = Sim::start(&["--no-host-check"]);
    let r = sim.req("GET", "/", &[("Host", "gateway.example.com")], "");
    assert_eq!(r.status, 200);
}

#[test]
fn routing_errors_and_listings() {
    let sim = Sim::start(&[]);
    let r = sim.req("GET", "/nope", &[], "");
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "404 page not found");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain"))
    );
    let r = sim.req("GET", "/api/chat", &[], "");
    assert_eq!(r.status, 405);
    let r = sim.req("POST", "/api/tags", &[], "");
    assert_eq!(r.status, 405);

    let r = sim.req("GET", "/", &[], "");
    assert_eq!(r.text(), "Ollama is running");
    let r = sim.req("HEAD", "/", &[], "");
    assert_eq!(r.status, 200);

    let tags = sim.json("GET", "/api/tags");
    let models = tags["models"].as_array().expect("models");
    assert_eq!(models.len(), 5);
    assert!(
        models
            .iter()
            .all(|m| m["digest"].as_str().is_some_and(|d| d.len() == 64))
    );
    assert!(models.iter().any(|m| m["remote_host"].is_string()));

    let list = sim.json("GET", "/v1/models");
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["object"], "model");
    let r = sim.req("GET", "/v1/models/unknown", &[], "");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");

    let r = sim.post(
        "/api/chat",
        &[],
        r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        serde_json::json!({"error": "model 'nope' not found"})
    );
    let r = sim.post("/api/generate", &[], r#"{"prompt":"x"}"#);
    assert_eq!(r.status, 400);
    assert_eq!(r.json(), serde_json::json!({"error": "model is required"}));
    let r = sim.post("/api/chat", &[], "{not json");
    assert_eq!(r.status, 400);
    let r = sim.post("/v1/embeddings", &[], r#"{"model":"missing","input":"x"}"#);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["param"], Value::Null);

    // /api/ps lists only models that served a request, unless asked for all.
    assert_eq!(sim.json("GET", "/api/ps")["models"], serde_json::json!([]));
    let r = sim.post(
        "/api/embed",
        &[],
        r#"{"model":"nomic-embed-text","input":["abcd","e"]}"#,
    );
    let v = r.json();
    assert_eq!(v["prompt_eval_count"], 2);
    assert_eq!(v["embeddings"].as_array().map(Vec::len), Some(2));
    let ps = sim.json("GET", "/api/ps");
    assert_eq!(ps["models"][0]["name"], "nomic-embed-text:latest");
    let all = sim
        .req("GET", "/api/ps", &[("x-sim-ps-all", "1")], "")
        .json();
    assert_eq!(all["models"].as_array().map(Vec::len), Some(5));
}

#[test]
fn recording_log() {
    let sim = Sim::start(&["--require-token", "t"]);
    let auth = ("Authorization", "Bearer t");
    // Case-insensitive, last-wins: the simulator serves model "llama3.2".
    let r = sim.post(
        "/api/chat?x=1",
        &[auth],
        r#"{"model":"nope","MODEL":"llama3.2","messages":[{"role":"user","content":"x"}],"Stream":false}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["model"], "llama3.2");
    // Rejected requests are recorded too.
    assert_eq!(sim.post("/api/pull", &[], r#"{"name":"evil"}"#).status, 401);
    let log = sim.json("GET", "/__sim/requests");
    let log = log.as_array().expect("array");
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["method"], "POST");
    assert_eq!(log[0]["path"], "/api/chat");
    assert_eq!(log[0]["query"], "x=1");
    assert_eq!(log[0]["model"], "llama3.2");
    assert!(log[0]["body"].as_str().is_some_and(|b| b.contains("MODEL")));
    assert!(
        log[0]["headers"]
            .as_array()
            .is_some_and(|h| h.iter().any(|kv| kv[0] == "authorization"))
    );
    assert_eq!(log[1]["path"], "/api/pull");
    assert_eq!(log[1]["model"], "evil");

    let stats = sim.json("GET", "/__sim/stats");
    assert_eq!(stats["requests"], 2);
    assert_eq!(stats["inflight"], 0);

    assert_eq!(sim.req("DELETE", "/__sim/requests", &[], "").status, 204);
    assert_eq!(sim.json("GET", "/__sim/requests"), serde_json::json!([]));
}
