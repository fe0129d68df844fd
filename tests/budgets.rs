//! Token budgets (SPEC §6) against real Redis, Postgres and the simulator: the output cap is
//! clamped to what is left, a spent budget answers 429 until its UTC period rolls (moved with
//! `CLOCK_OFFSET_FILE`, not by waiting), a tenant budget spans its keys, two gateways under a
//! concurrent load never overshoot, and a Redis that lost its data is re-seeded from Postgres.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{Datelike, NaiveDate, Utc};
use common::http::{self, Response};
use common::{Deployment, Gateway, resp, sql_scalar_i64};

/// 88 bytes: the prompt bound with BUDGET_TEMPLATE_TOKENS=0. The simulator counts its prompt
/// as ⌈11 / 4⌉ = 3 tokens.
const CHAT: &str =
    r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hello world"}]}"#;
const PROMPT_TOKENS: i64 = 3;

type Env = Deployment;

fn env() -> Env {
    Deployment::start()
}

/// Budget settings that make the arithmetic of these tests exact: no template allowance, a
/// short re-seed grace.
fn gateway(e: &Env, extra: &[(&str, &str)]) -> Gateway {
    let mut vars = vec![
        ("BUDGET_TEMPLATE_TOKENS", "0"),
        ("BUDGET_SEED_GRACE_MS", "300"),
    ];
    vars.extend_from_slice(extra);
    e.gateway(&vars)
}

/// Moves the gateways' budget clock to `t`.
fn set_clock(e: &Env, t: chrono::DateTime<Utc>) {
    e.clock.set_offset((t - Utc::now()).num_seconds());
}

fn chat(addr: &str, key: &str, chunks: usize) -> Response {
    post(addr, key, "/api/chat", CHAT, chunks)
}

fn post(addr: &str, key: &str, path: &str, body: &str, chunks: usize) -> Response {
    let auth = format!("Bearer {key}");
    let chunks = chunks.to_string();
    http::post_json(
        addr,
        path,
        &[
            ("Authorization", auth.as_str()),
            ("x-sim-chunks", chunks.as_str()),
        ],
        body,
    )
}

/// Settlement and the audit sidecar run just after the client has its answer.
fn settle() {
    std::thread::sleep(Duration::from_millis(400));
}

fn key_id(db: &str, prefix: &str) -> i64 {
    sql_scalar_i64(
        db,
        &format!("SELECT id FROM api_keys WHERE prefix = '{prefix}'"),
    )
}

/// Tokens the audit log recorded for a key.
fn audited_tokens(db: &str, prefix: &str) -> i64 {
    sql_scalar_i64(
        db,
        &format!(
            "SELECT COALESCE(sum(prompt_tokens + completion_tokens), 0)::bigint FROM audit_log \
             WHERE key_prefix = '{prefix}'"
        ),
    )
}

fn next_midnight(t: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    (t.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
}

fn next_month(t: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    let d = t.date_naive();
    let (y, m) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("first of month")
        .and_utc()
}

#[test]
fn a_spent_daily_budget_refuses_until_the_utc_day_rolls() {
    let e = env();
    let g = gateway(&e, &[]);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (key, prefix) = g.create_key("acme", "k", &[]);
    g.cli(&["set-budget", "--prefix", &prefix, "--daily", "300"]);
    // Each request reserves 88 (prompt bound) + what is left; 40 chunks use 3 + 40 = 43.
    for i in 0..4 {
        let r = chat(&g.addr, &key, 40);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.json()["eval_count"], 40);
        settle();
    }
    // 172 used: 300 - 172 - 88 = 40 output tokens fit. The body upstream carries that cap and
    // the answer stops there.
    let r = chat(&g.addr, &key, 60);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["eval_count"], 40, "{}", r.text());
    assert_eq!(r.json()["done_reason"], "length");
    let sent = e.sim.requests();
    let last = sent
        .as_array()
        .and_then(|a| a.last())
        .expect("sim saw requests");
    let forwarded: serde_json::Value =
        serde_json::from_str(last["body"].as_str().unwrap_or("")).expect("forwarded body");
    assert_eq!(
        forwarded["options"]["num_predict"], 40,
        "clamped cap forwarded: {forwarded}"
    );
    settle();
    // 215 used: not even the prompt fits any more.
    let r = chat(&g.addr, &key, 1);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    let to_midnight = (next_midnight(Utc::now()) - Utc::now()).num_seconds() as u64;
    assert!(
        retry.abs_diff(to_midnight) <= 5,
        "Retry-After {retry} is the day's end ({to_midnight})"
    );
    assert!(r.json()["error"].as_str().unwrap_or("").contains("daily"));
    // What spends no tokens is not a budget's business.
    let auth = format!("Bearer {key}");
    for path in ["/api/tags", "/v1/models", "/api/version"] {
        let r = http::get(&g.addr, path, &[("Authorization", auth.as_str())]);
        assert_eq!(r.status, 200, "{path} with a spent budget: {}", r.text());
    }
    let r = post(&g.addr, &key, "/api/show", r#"{"model":"llama3.2"}"#, 1);
    assert_eq!(r.status, 200, "/api/show with a spent budget: {}", r.text());
    // The OpenAI surface says `insufficient_quota`, which the SDKs know.
    let r = post(
        &g.addr,
        &key,
        "/v1/chat/completions",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hello world, hello world, hello"}]}"#,
        1,
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "insufficient_quota");
    assert_eq!(r.json()["error"]["code"], "budget_exceeded");
    assert_eq!(
        audited_tokens(&e.db, &prefix),
        5 * (PROMPT_TOKENS + 40),
        "refused requests use nothing"
    );
    // Next UTC day: the budget is back.
    set_clock(&e, next_midnight(Utc::now()) + chrono::Duration::minutes(1));
    let r = chat(&g.addr, &key, 40);
    assert_eq!(r.status, 200, "{}", r.text());
    settle();
    let usage: serde_json::Value =
        serde_json::from_str(g.cli(&["show-usage", "--prefix", &prefix, "--json"]).trim())
            .expect("show-usage json");
    let rows = usage.as_array().expect("array");
    let row = |period: &str| {
        rows.iter()
            .find(|r| r["period"] == period)
            .unwrap_or_else(|| panic!("no {period} row in {usage}"))
    };
    assert_eq!(row("day")["total_tokens"], PROMPT_TOKENS + 40);
    assert_eq!(row("day")["budget"], 300);
    assert_eq!(row("day")["scope"], "key");
    assert_eq!(row("day")["prefix"], prefix.as_str());
    assert_eq!(
        row("total")["total_tokens"],
        audited_tokens(&e.db, &prefix),
        "{usage}"
    );
    // Six model requests and the four that spent nothing: every request that went upstream.
    assert_eq!(row("total")["requests"], 10);
}

#[test]
fn a_tenant_budget_spans_its_keys_and_a_monthly_one_waits_for_the_month() {
    let e = env();
    let g = gateway(&e, &[]);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (k1, _) = g.create_key("acme", "one", &[]);
    let (k2, p2) = g.create_key("acme", "two", &[]);
    g.cli(&["set-budget", "--tenant", "acme", "--monthly", "300"]);
    // Keys inherit the tenant's budget as their own too; the second key's is lifted so the
    // tenant's is the one that bites.
    g.cli(&["set-budget", "--prefix", &p2, "--monthly", "100000"]);
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..5 {
        assert_eq!(chat(&g.addr, &k1, 40).status, 200);
        settle();
    }
    let r = chat(&g.addr, &k2, 1);
    assert_eq!(r.status, 429, "{}", r.text());
    // The tenant's durable counter is the sum of its keys'.
    let month = |scope: &str| {
        sql_scalar_i64(
            &e.db,
            &format!(
                "SELECT COALESCE(sum(prompt_tokens + completion_tokens), 0)::bigint FROM budget_usage \
                 WHERE scope = '{scope}' AND period = 'month'"
            ),
        )
    };
    assert_eq!(month("tenant"), 5 * (PROMPT_TOKENS + 40));
    assert_eq!(month("key"), month("tenant"));
    let msg = r.json()["error"].as_str().unwrap_or("").to_string();
    assert!(msg.contains("monthly") && msg.contains("tenant"), "{msg}");
    // A day later, still the same month (unless today is the month's last day).
    let tomorrow = next_midnight(Utc::now()) + chrono::Duration::minutes(1);
    if tomorrow.month() == Utc::now().month() {
        set_clock(&e, tomorrow);
        assert_eq!(chat(&g.addr, &k2, 1).status, 429);
    }
    set_clock(&e, next_month(Utc::now()) + chrono::Duration::minutes(1));
    assert_eq!(chat(&g.addr, &k2, 1).status, 200);
    assert_eq!(chat(&g.addr, &k1, 1).status, 200);
}

#[test]
fn two_gateways_under_concurrent_load_never_overshoot_a_budget() {
    let e = env();
    let (a, b) = (gateway(&e, &[]), gateway(&e, &[]));
    a.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (key, prefix) = a.create_key("acme", "k", &[]);
    const BUDGET: i64 = 2000;
    a.cli(&[
        "set-budget",
        "--prefix",
        &prefix,
        "--daily",
        &BUDGET.to_string(),
    ]);
    let capped = r#"{"model":"llama3.2","stream":false,"options":{"num_predict":30},"messages":[{"role":"user","content":"hello world"}]}"#;
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..40)
        .map(|t| {
            let addr = [a.addr.clone(), b.addr.clone()][t % 2].clone();
            let (key, statuses) = (key.clone(), statuses.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    let auth = format!("Bearer {key}");
                    let body = if t % 4 == 0 { CHAT } else { capped };
                    let r = http::post_json(
                        &addr,
                        "/api/chat",
                        &[
                            ("Authorization", auth.as_str()),
                            ("x-sim-chunks", "40"),
                            ("x-sim-delay-ms", "5"),
                        ],
                        body,
                    );
                    let spent = r.status == 429 && r.header("x-should-retry") == Some("false");
                    statuses.lock().expect("lock").push(r.status);
                    if spent {
                        return;
                    }
                    if r.status == 429 {
                        assert_eq!(r.header("retry-after"), Some("1"), "{}", r.text());
                        std::thread::sleep(Duration::from_millis(20));
                    } else {
                        assert_eq!(r.status, 200, "{}", r.text());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    settle();
    let used = audited_tokens(&e.db, &prefix);
    let ok = statuses
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| **s == 200)
        .count();
    assert!(used <= BUDGET, "used {used} of {BUDGET}");
    assert!(
        used >= BUDGET - 200,
        "the budget is used, not wasted on refusals: {used} of {BUDGET} in {ok} requests"
    );
    let durable = sql_scalar_i64(
        &e.db,
        &format!(
            "SELECT (prompt_tokens + completion_tokens)::bigint FROM budget_usage \
             WHERE scope = 'key' AND key_id = {} AND period = 'day'",
            key_id(&e.db, &prefix)
        ),
    );
    assert_eq!(durable, used, "budget_usage agrees with the audit log");
}

#[test]
fn post_mode_charges_after_the_fact_and_may_overrun() {
    let e = env();
    let g = gateway(&e, &[("BUDGET_MODE", "post")]);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (key, prefix) = g.create_key("acme", "k", &[]);
    g.cli(&["set-budget", "--prefix", &prefix, "--total", "100"]);
    let r = chat(&g.addr, &key, 200);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["eval_count"], 200, "no clamp in post mode");
    settle();
    let r = chat(&g.addr, &key, 1);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert!(
        r.header("retry-after").is_none(),
        "a total budget does not renew"
    );
}

#[test]
fn redis_losing_its_data_fails_closed_then_reseeds_from_postgres() {
    let mut e = env();
    let g = gateway(&e, &[]);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (key, prefix) = g.create_key("acme", "k", &[]);
    g.cli(&["set-budget", "--prefix", &prefix, "--daily", "100000"]);
    for _ in 0..3 {
        assert_eq!(chat(&g.addr, &key, 40).status, 200);
    }
    settle();
    let before = audited_tokens(&e.db, &prefix);
    assert_eq!(before, 3 * (PROMPT_TOKENS + 40));

    e.redis.stop();
    let r = chat(&g.addr, &key, 1);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("budget store"),
        "{}",
        r.text()
    );

    e.redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut refusals = Vec::new();
    loop {
        let r = chat(&g.addr, &key, 40);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        refusals.push(r.text());
        assert!(
            Instant::now() < deadline,
            "traffic did not resume: {refusals:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        refusals.iter().any(|t| t.contains("being restored")),
        "the re-seed answered 503 while it waited: {refusals:?}"
    );
    settle();
    let hash = format!(
        "t-{}:bu:k:{}",
        e.db.rsplit('/').next().unwrap_or(""),
        key_id(&e.db, &prefix)
    );
    let day = resp::cmd(&e.redis.url, &["HGET", &hash, "d"]).as_i64();
    assert_eq!(
        day,
        Some(audited_tokens(&e.db, &prefix)),
        "the counter continues from Postgres' {before}, not from zero"
    );
}

#[test]
fn uncapped_requests_share_a_budget_instead_of_holding_all_of_it() {
    let e = env();
    let g = gateway(&e, &[("BUDGET_DEFAULT_OUTPUT_TOKENS", "500")]);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    let (key, prefix) = g.create_key("acme", "k", &[]);
    g.cli(&["set-budget", "--tenant", "acme", "--daily", "100000"]);
    std::thread::sleep(Duration::from_millis(500));
    // Four slow streams at once, none with a cap of its own: each reserves prompt + 500.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, key) = (g.addr.clone(), key.clone());
            std::thread::spawn(move || {
                let auth = format!("Bearer {key}");
                http::post_json(
                    &addr,
                    "/api/chat",
                    &[
                        ("Authorization", auth.as_str()),
                        ("x-sim-chunks", "5"),
                        ("x-sim-delay-ms", "100"),
                    ],
                    CHAT,
                )
                .status
            })
        })
        .collect();
    let statuses: Vec<u16> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200]);
    let sent = e.sim.requests();
    let caps: Vec<serde_json::Value> = sent
        .as_array()
        .expect("requests")
        .iter()
        .filter_map(|r| serde_json::from_str::<serde_json::Value>(r["body"].as_str()?).ok())
        .map(|b| b["options"]["num_predict"].clone())
        .collect();
    assert_eq!(
        caps,
        vec![serde_json::json!(500); 4],
        "the default cap is forwarded"
    );
    let _ = prefix;
}
