//! Rate limits against a real (private) Redis: two gateway processes enforce one limit
//! together, concurrency slots are leases that a killed gateway cannot leak, TPM reservations
//! are settled to actual usage, tenant limits span keys, and Redis outages fail closed.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{self, Response};
use common::{Deployment, Gateway, resp};

fn env() -> Deployment {
    Deployment::start()
}

fn gateway(e: &Deployment, extra: &[(&str, &str)]) -> Gateway {
    e.gateway(extra)
}

fn get(addr: &str, key: &str, path: &str) -> Response {
    let auth = format!("Bearer {key}");
    http::get(addr, path, &[("Authorization", auth.as_str())])
}

fn chat(addr: &str, key: &str, extra: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {key}");
    let mut h = vec![("Authorization", auth.as_str())];
    h.extend_from_slice(extra);
    http::post_json(
        addr,
        "/api/chat",
        &h,
        r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hello world"}]}"#,
    )
}

/// Retries a request until it is answered 200, for at most 10 s.
fn until_admitted(addr: &str, key: &str, failure: &str) {
    let start = Instant::now();
    while chat(addr, key, &[]).status != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "{failure}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_gateways_enforce_one_rpm_limit_together() {
    let e = env();
    let (a, b) = (gateway(&e, &[]), gateway(&e, &[]));
    let (key, _) = a.limited_key(&["--rpm", "30"]);
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (addrs, key, results) = (
                [a.addr.clone(), b.addr.clone()],
                key.clone(),
                results.clone(),
            );
            std::thread::spawn(move || {
                for i in 0..10 {
                    let path = if (t + i) % 2 == 0 {
                        "/api/version"
                    } else {
                        "/v1/models"
                    };
                    let r = get(&addrs[(t + i) % 2], &key, path);
                    results.lock().expect("lock").push((path, r));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let results = results.lock().expect("lock");
    let ok = results.iter().filter(|(_, r)| r.status == 200).count();
    let limited: Vec<&(&str, Response)> = results.iter().filter(|(_, r)| r.status == 429).collect();
    let others: Vec<String> = results
        .iter()
        .filter(|(_, r)| r.status != 200 && r.status != 429)
        .map(|(p, r)| format!("{p} {} {}", r.status, r.text()))
        .collect();
    assert_eq!(
        (ok, limited.len()),
        (30, 30),
        "exactly the limit got through; others: {others:?}"
    );
    for (path, r) in &limited {
        let retry: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!((1..=120).contains(&retry));
        if path.starts_with("/v1") {
            assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
            assert_eq!(r.json()["error"]["type"], "rate_limit_error");
        } else {
            assert!(
                r.json()["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("requests per minute")
            );
        }
    }
    for (_, r) in results.iter().filter(|(_, r)| r.status == 200) {
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("30"));
        assert!(r.header("x-ratelimit-remaining-requests").is_some());
        assert!(
            r.header("x-ratelimit-reset-requests")
                .is_some_and(|v| v.ends_with('s'))
        );
    }
}

#[test]
fn concurrency_slots_are_leases_a_killed_gateway_cannot_leak() {
    let e = env();
    let (mut a, b) = (gateway(&e, &[]), gateway(&e, &[]));
    let (key, prefix) = a.limited_key(&["--max-concurrent", "2"]);
    let slow = |addr: String, key: String| {
        std::thread::spawn(move || {
            chat(
                &addr,
                &key,
                &[("x-sim-delay-ms", "150"), ("x-sim-chunks", "10")],
            )
            .status
        })
    };
    let s1 = slow(a.addr.clone(), key.clone());
    let s2 = slow(b.addr.clone(), key.clone());
    std::thread::sleep(Duration::from_millis(400));
    let r = chat(&b.addr, &key, &[]);
    assert_eq!(r.status, 429, "a third concurrent request: {}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!((s1.join().expect("s1"), s2.join().expect("s2")), (200, 200));
    // Leases are released in the logging phase, just after the clients have their answers.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        chat(&b.addr, &key, &[]).status,
        200,
        "slots come back when streams end"
    );

    // A gateway killed mid-stream: its leases lapse once it stops renewing them.
    a.cli(&["set-limits", "--prefix", &prefix, "--max-concurrent", "1"]);
    std::thread::sleep(Duration::from_millis(600));
    let addr = a.addr.clone();
    let k = key.clone();
    let _orphan = std::thread::spawn(move || {
        let _ = http::try_request(
            &addr,
            "POST",
            "/api/chat",
            &[
                ("Authorization", &format!("Bearer {k}")),
                ("x-sim-delay-ms", "1000"),
                ("x-sim-chunks", "60"),
            ],
            Some(br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#),
        );
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        chat(&b.addr, &key, &[]).status,
        429,
        "the stream on A holds the only slot"
    );
    a.kill();
    let start = Instant::now();
    loop {
        if chat(&b.addr, &key, &[]).status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the dead gateway's slot never came back"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        start.elapsed() <= Duration::from_secs(12),
        "slot came back after {:?}",
        start.elapsed()
    );
}

#[test]
fn tpm_reservations_are_settled_to_actual_usage() {
    let e = env();
    let g = gateway(&e, &[("TPM_DEFAULT_OUTPUT_TOKENS", "50")]);
    let (key, _) = g.limited_key(&["--tpm", "400"]);
    // Each request reserves its prompt bound (88 body bytes + the 128-token template allowance)
    // + 50 = 266 tokens and uses 3 + 8 = 11. Without settlement the second would already be
    // refused.
    for i in 0..4 {
        // Settlement runs just after the client has its answer.
        std::thread::sleep(Duration::from_millis(300));
        let r = chat(&g.addr, &key, &[]);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("400"));
    }
    // A long answer (nothing caps it) is charged what it used: 3 + 300.
    std::thread::sleep(Duration::from_millis(300));
    let r = chat(&g.addr, &key, &[("x-sim-chunks", "300")]);
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(Duration::from_millis(300));
    let r = chat(&g.addr, &key, &[]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("tokens per minute")
    );
}

#[test]
fn tenant_limits_span_its_keys() {
    let e = env();
    let g = gateway(&e, &[]);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (k1, _) = g.create_key("acme", "one", &[]);
    let (k2, _) = g.create_key("acme", "two", &[]);
    g.cli(&["set-limits", "--tenant", "acme", "--rpm", "4"]);
    let statuses: Vec<u16> = (0..8)
        .map(|i| get(&g.addr, if i % 2 == 0 { &k1 } else { &k2 }, "/api/version").status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    let r = get(&g.addr, &k1, "/v1/models");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("tenant")
    );
}

#[test]
fn redis_outage_fails_closed_unless_configured_open() {
    let mut e = env();
    let closed = gateway(&e, &[]);
    let open = gateway(&e, &[("LIMITS_FAIL_OPEN", "true")]);
    closed.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (limited, prefix) = closed.create_key("acme", "limited", &[]);
    let (free, _) = closed.create_key("acme", "free", &[]);
    closed.cli(&["set-limits", "--prefix", &prefix, "--rpm", "1000"]);
    for g in [&closed, &open] {
        assert_eq!(chat(&g.addr, &limited, &[]).status, 200);
        assert_eq!(chat(&g.addr, &free, &[]).status, 200);
    }
    e.redis.stop();
    let r = chat(&closed.addr, &limited, &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("rate limiter")
    );
    assert_eq!(
        chat(&closed.addr, &free, &[]).status,
        200,
        "no limit, no Redis needed"
    );
    assert_eq!(
        chat(&open.addr, &limited, &[]).status,
        200,
        "LIMITS_FAIL_OPEN=true"
    );
}

#[test]
fn a_refusal_after_admission_tells_the_client_the_connection_closes() {
    let e = env();
    let g = gateway(&e, &[]);
    let (key, _) = g.limited_key(&["--rpm", "1"]);
    assert_eq!(chat(&g.addr, &key, &[]).status, 200);
    // Asked by a keep-alive client: Pingora drops the connection after a refusal decided once
    // the upstream was chosen, so the client must not send its next request into it.
    let r = chat(&g.addr, &key, &[("Connection", "keep-alive")]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("connection"), Some("close"));
}

/// A gateway that starts while Redis is down connects once it is up: its request-path
/// connection (started by a request) and its background one (lease renewal) both retry a first
/// connection that failed.
#[test]
fn a_gateway_started_before_redis_connects_once_it_is_up() {
    let mut e = env();
    e.redis.stop();
    let g = gateway(&e, &[]);
    let (key, prefix) = g.limited_key(&["--max-concurrent", "1"]);
    assert_eq!(
        chat(&g.addr, &key, &[]).status,
        503,
        "Redis down: limits fail closed"
    );
    e.redis.restart();
    until_admitted(&g.addr, &key, "the request path never connected to Redis");
    // That request's lease is released just after its answer; then a stream holds the key's
    // only slot, and the renewer must push its lease's expiry forward.
    std::thread::sleep(Duration::from_millis(300));
    let addr = g.addr.clone();
    let k = key.clone();
    let stream = std::thread::spawn(move || {
        chat(
            &addr,
            &k,
            &[("x-sim-delay-ms", "500"), ("x-sim-chunks", "12")],
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(500));
    let db_name = e.db.rsplit('/').next().unwrap_or("");
    let key_id = common::sql_scalar_i64(
        &e.db,
        &format!("SELECT id FROM api_keys WHERE prefix = '{prefix}'"),
    );
    let set = format!("t-{db_name}:rl:k:{key_id}:c");
    let expiry = || match resp::cmd(&e.redis.url, &["ZRANGE", &set, "0", "-1", "WITHSCORES"]) {
        resp::Value::Array(v) => v.get(1).and_then(resp::Value::as_i64),
        other => panic!("ZRANGE {set}: {other:?}"),
    };
    let first = expiry().expect("the stream holds a lease");
    std::thread::sleep(Duration::from_millis(4000));
    let renewed = expiry().expect("the lease is still held");
    assert!(
        renewed > first,
        "the background connection never renewed the lease ({first} -> {renewed})"
    );
    assert_eq!(stream.join().expect("stream"), 200);
}

/// A Redis that hangs (connections open, nothing answered) is a fault like one that is gone:
/// the request is answered after `REDIS_TIMEOUT_MS`, not when the client gives up.
#[test]
fn a_hanging_redis_fails_closed_after_the_timeout() {
    let e = env();
    let g = gateway(&e, &[("REDIS_TIMEOUT_MS", "300")]);
    let (key, _) = g.limited_key(&["--rpm", "1000"]);
    assert_eq!(chat(&g.addr, &key, &[]).status, 200);
    e.redis.freeze(true);
    let started = Instant::now();
    let r = chat(&g.addr, &key, &[]);
    let took = started.elapsed();
    e.redis.freeze(false);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "answered after {took:?}"
    );
    until_admitted(&g.addr, &key, "limits never came back after Redis thawed");
}

#[test]
fn limits_work_over_a_redis_unix_socket() {
    let e = env();
    let g = gateway(&e, &[("REDIS_URL", e.redis.socket_url.as_str())]);
    let (key, _) = g.limited_key(&["--rpm", "2"]);
    for i in 0..2 {
        let r = chat(&g.addr, &key, &[]);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
    }
    assert_eq!(chat(&g.addr, &key, &[]).status, 429);
    // The gateway's connections came over the socket (Redis lists them with its path).
    let resp::Value::Str(clients) = resp::cmd(&e.redis.url, &["CLIENT", "LIST"]) else {
        panic!("CLIENT LIST answered no text");
    };
    assert!(
        clients.lines().any(|l| l.contains("redis.sock")),
        "no client on the Unix socket: {clients}"
    );
}
