//! End-to-end tests of `nz-bench run` and `nz-passthrough` against the real simulator.
//! Nothing here asserts on timings: only counts and bytes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;
use support::{Running, start_sim};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A scenario file in a directory of its own, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn scenario(name: &str, yaml: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("nz-bench-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let file = dir.join("scenario.yaml");
        std::fs::write(&file, yaml).expect("write scenario");
        Scratch(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and the de-chunked body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size line");
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..nl]).expect("utf8").trim(), 16)
                    .expect("chunk size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 2 + size + 2..];
        }
        body = out;
    }
    (status, body)
}

#[test]
fn run_counts_requests_and_tokens_against_the_simulator() {
    let (_sim, addr) = start_sim(&[]);
    let chunks = 5;
    let scenario = Scratch::scenario(
        "mix",
        &format!(
            "mode: open\nrate: 100\nduration: 2s\nwarmup: 0s\nrequests:\n  \
             - {{route: /api/chat, stream: true, weight: 2}}\n  \
             - {{route: /api/generate, stream: false}}\n  \
             - {{route: /v1/chat/completions, stream: true}}\n  \
             - {{route: /v1/completions, stream: false}}\n  \
             - {{route: /v1/responses, stream: true}}\nsim: {{chunks: {chunks}, chunk_delay_ms: 0}}\n"
        ),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_nz-bench"))
        .args(["run", "--scenario"])
        .arg(&scenario.0)
        .args([
            "--base-url",
            &format!("http://{addr}"),
            "--key",
            "k1,k2",
            "--json",
            "--quiet",
        ])
        .output()
        .expect("run nz-bench");
    assert!(
        out.status.success(),
        "nz-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let s = &v[0]["summary"];
    let requests = s["requests"].as_u64().expect("requests");
    assert!(requests > 0, "no requests: {v}");
    assert_eq!(s["errors"].as_u64(), Some(0), "errors: {v}");
    assert_eq!(s["ok"].as_u64(), Some(requests));
    assert_eq!(s["tokens"].as_u64(), Some(requests * chunks), "tokens: {v}");
    assert!(s["latency_ms"]["p99"].as_f64().expect("p99") > 0.0);
    assert!(s["ttfb_ms"]["p50"].as_f64().expect("ttfb") > 0.0);
}

#[test]
fn closed_loop_stops_at_max_requests() {
    let (_sim, addr) = start_sim(&[]);
    let scenario = Scratch::scenario(
        "closed",
        "mode: closed\nconcurrency: 4\nduration: 60s\nmax_requests: 50\nrequests:\n  - {route: /api/embed}\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_nz-bench"))
        .args(["run", "--scenario"])
        .arg(&scenario.0)
        .args([
            "--base-url",
            &format!("http://{addr}"),
            "--key",
            "k",
            "--json",
            "--quiet",
        ])
        .output()
        .expect("run nz-bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let n = v[0]["summary"]["requests"].as_u64().expect("requests");
    // Each of the 4 workers may have one request in flight when the limit is reached.
    assert!((50..=54).contains(&n), "requests {n}");
    assert_eq!(v[0]["summary"]["errors"].as_u64(), Some(0));
}

#[test]
fn passthrough_forwards_byte_identical() {
    let (_sim, sim_addr) = start_sim(&[]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_nz-passthrough"))
        .args(["--listen", &listen, "--upstream", &sim_addr])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn nz-passthrough");
    let _pass = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&listen).is_err() {
        assert!(
            Instant::now() < deadline,
            "nz-passthrough did not listen on {listen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let embed = r#"{"model":"nomic-embed-text","input":["hello","world"]}"#;
    let direct = http(&sim_addr, "POST", "/api/embed", embed);
    let proxied = http(&listen, "POST", "/api/embed", embed);
    assert_eq!(direct.0, 200);
    assert_eq!(proxied.0, direct.0);
    assert_eq!(proxied.1, direct.1, "bodies differ");
    let version = http(&listen, "GET", "/api/version", "");
    assert_eq!(version, http(&sim_addr, "GET", "/api/version", ""));
    // A streamed answer arrives whole: 8 content chunks (the default) and the final object.
    let (status, body) = http(
        &listen,
        "POST",
        "/api/chat",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200);
    let lines: Vec<Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("ndjson"))
        .collect();
    assert_eq!(lines.last().expect("last")["done"], Value::Bool(true));
    assert_eq!(lines.last().expect("last")["eval_count"].as_u64(), Some(8));
}

#[test]
fn sim_without_recording_still_counts() {
    let (_sim, addr) = start_sim(&["--no-record"]);
    let embed = r#"{"model":"nomic-embed-text","input":"hello"}"#;
    assert_eq!(http(&addr, "POST", "/api/embed", embed).0, 200);
    let (status, log) = http(&addr, "GET", "/__sim/requests", "");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&log).expect("log"),
        serde_json::json!([])
    );
    let (_, stats) = http(&addr, "GET", "/__sim/stats", "");
    let stats: Value = serde_json::from_slice(&stats).expect("stats");
    assert_eq!(stats["requests"].as_u64(), Some(1), "{stats}");
}
