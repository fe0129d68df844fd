//! A gateway without `REDIS_URL` (SPEC §10: one instance, in-process limiters) enforces the
//! same rate limits and budgets as with Redis: requests and tokens per minute (settled to the
//! actual usage), concurrent requests, and budgets read from Postgres' durable usage, so that a
//! restart does not hand a spent budget out again.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::http::{self, Response};
use common::{ClockFile, Gateway, Sim, UPSTREAM_TOKEN, fresh_database, sql_scalar_i64};

/// 88 bytes: the prompt bound with BUDGET_TEMPLATE_TOKENS=0. The simulator counts its prompt
/// as ⌈11 / 4⌉ = 3 tokens.
const CHAT: &str =
    r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hello world"}]}"#;
const PROMPT_TOKENS: i64 = 3;
/// Admin changes reach the gateway's key cache within a second.
const CHANGE_FEED: Duration = Duration::from_millis(1500);

/// A database, a simulator and a budget clock, and no Redis at all.
struct Alone {
    db: String,
    sim: Sim,
    clock: ClockFile,
}

impl Alone {
    fn start() -> Alone {
        Alone {
            db: fresh_database(),
            sim: Sim::start(&["--require-token", UPSTREAM_TOKEN]),
            clock: ClockFile::new(),
        }
    }

    fn gateway(&self, extra: &[(&str, &str)]) -> Gateway {
        let sim = self.sim.url();
        let mut vars = vec![
            ("DATABASE_URL", self.db.as_str()),
            ("OLLAMA_URL", sim.as_str()),
            ("OLLAMA_AUTH_TOKEN", UPSTREAM_TOKEN),
            ("KEY_CACHE_SECRET", "local-limits-test-secret-0123456789"),
            ("CLOCK_OFFSET_FILE", self.clock.path.as_str()),
            ("BUDGET_TEMPLATE_TOKENS", "0"),
        ];
        vars.extend_from_slice(extra);
        let g = Gateway::start(&vars);
        assert!(
            g.log_text().contains("kept in this process"),
            "the gateway says where its limits live: {}",
            g.log_text()
        );
        g
    }
}

fn chat(addr: &str, key: &str, extra: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {key}");
    let mut h = vec![("Authorization", auth.as_str())];
    h.extend_from_slice(extra);
    http::post_json(addr, "/api/chat", &h, CHAT)
}

fn chunks(addr: &str, key: &str, n: usize) -> Response {
    let n = n.to_string();
    chat(addr, key, &[("x-sim-chunks", n.as_str())])
}

/// Settlement and the audit sidecar run just after the client has its answer.
fn settle() {
    std::thread::sleep(Duration::from_millis(400));
}

#[test]
fn requests_tokens_and_concurrency_are_limited_in_process() {
    let a = Alone::start();
    let g = a.gateway(&[("TPM_DEFAULT_OUTPUT_TOKENS", "50")]);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);

    // Requests per minute, with the OpenAI-style headers counting down.
    let (rpm_key, rpm_prefix) = g.create_key("acme", "rpm", &[]);
    g.cli(&["set-limits", "--prefix", &rpm_prefix, "--rpm", "2"]);
    for remaining in ["1", "0"] {
        let r = chat(&g.addr, &rpm_key, &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(remaining));
    }
    let r = chat(&g.addr, &rpm_key, &[]);
    assert_eq!(r.status, 429, "{}", r.text());
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((1..=120).contains(&retry), "Retry-After {retry}");

    // Concurrent requests: one slot, given back when the stream ends.
    let (slow_key, slow_prefix) = g.create_key("acme", "slow", &[]);
    g.cli(&[
        "set-limits",
        "--prefix",
        &slow_prefix,
        "--max-concurrent",
        "1",
    ]);
    let (addr, k) = (g.addr.clone(), slow_key.clone());
    let slow = std::thread::spawn(move || {
        chat(
            &addr,
            &k,
            &[("x-sim-delay-ms", "150"), ("x-sim-chunks", "6")],
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(300));
    let r = chat(&g.addr, &slow_key, &[]);
    assert_eq!(r.status, 429, "a second concurrent request: {}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(slow.join().expect("slow request"), 200);
    settle();
    let r = chat(&g.addr, &slow_key, &[]);
    assert_eq!(r.status, 200, "the slot came back: {}", r.text());

    // Tokens per minute: each request reserves 88 + 50 and is settled to 3 + 8; without the
    // settlement the third would be refused.
    let (tpm_key, tpm_prefix) = g.create_key("acme", "tpm", &[]);
    g.cli(&["set-limits", "--prefix", &tpm_prefix, "--tpm", "300"]);
    for i in 0..4 {
        let r = chat(&g.addr, &tpm_key, &[]);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("300"));
        settle();
    }
    let r = chunks(&g.addr, &tpm_key, 250);
    assert_eq!(r.status, 200, "{}", r.text());
    settle();
    let r = chat(&g.addr, &tpm_key, &[]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("tokens per minute"),
        "{}",
        r.text()
    );
}

#[test]
fn a_budget_comes_from_postgres_and_stays_spent_across_a_restart() {
    let a = Alone::start();
    let mut g = a.gateway(&[]);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (key, prefix) = g.create_key("acme", "k", &[]);
    g.cli(&["set-budget", "--prefix", &prefix, "--daily", "300"]);
    // Each request reserves 88 (prompt bound) + what is left; 40 chunks use 3 + 40 = 43.
    for i in 0..4 {
        let r = chunks(&g.addr, &key, 40);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        settle();
    }
    // 172 used: 300 - 172 - 88 = 40 output tokens fit, and the answer stops there.
    let r = chunks(&g.addr, &key, 60);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["eval_count"], 40, "{}", r.text());
    assert_eq!(r.json()["done_reason"], "length");
    settle();
    let r = chunks(&g.addr, &key, 1);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert!(r.json()["error"].as_str().unwrap_or("").contains("daily"));

    // A new process knows nothing of it but what Postgres has counted.
    g.stop();
    let g = a.gateway(&[]);
    let used = sql_scalar_i64(
        &a.db,
        "SELECT COALESCE(sum(prompt_tokens + completion_tokens), 0)::bigint FROM budget_usage \
         WHERE scope = 'key' AND period = 'day'",
    );
    assert_eq!(used, 5 * (PROMPT_TOKENS + 40));
    let r = chunks(&g.addr, &key, 1);
    assert_eq!(r.status, 429, "still spent after a restart: {}", r.text());

    // Without a budget the key is served, and its usage still counts: a budget set again
    // starts from what Postgres has (215 + 43), not from the counters it had before.
    g.cli(&["set-budget", "--prefix", &prefix, "--clear"]);
    std::thread::sleep(CHANGE_FEED);
    let r = chunks(&g.addr, &key, 40);
    assert_eq!(r.status, 200, "no budget: {}", r.text());
    settle();
    g.cli(&["set-budget", "--prefix", &prefix, "--daily", "400"]);
    std::thread::sleep(CHANGE_FEED);
    let r = chunks(&g.addr, &key, 60);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["eval_count"],
        400 - 6 * (PROMPT_TOKENS + 40) - 88,
        "{}",
        r.text()
    );

    // Next UTC day: the budget is back.
    let midnight = (Utc::now().date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 1, 0)
        .expect("midnight")
        .and_utc();
    a.clock.set_offset((midnight - Utc::now()).num_seconds());
    let start = Instant::now();
    loop {
        let r = chunks(&g.addr, &key, 40);
        if r.status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the new day's budget: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_tenant_budget_spans_its_keys_in_process() {
    let a = Alone::start();
    let g = a.gateway(&[]);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (k1, _) = g.create_key("acme", "one", &[]);
    let (k2, _) = g.create_key("acme", "two", &[]);
    g.cli(&["set-budget", "--tenant", "acme", "--daily", "250"]);
    // 88 + 40 reserved, 43 used each: the third finds 250 - 86 - 88 = 76 left.
    for (i, key) in [&k1, &k2, &k1].iter().enumerate() {
        let r = chunks(&g.addr, key, 40);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        settle();
    }
    // 129 used: 250 - 129 - 88 = 33 fit.
    let r = chunks(&g.addr, &k2, 60);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["eval_count"], 33, "{}", r.text());
    settle();
    for key in [&k1, &k2] {
        let r = chunks(&g.addr, key, 1);
        assert_eq!(r.status, 429, "{}", r.text());
    }
}
