//! Authentication end to end against real Postgres and Redis: uniform 401s, revoked, expired
//! and suspended keys, rotation, source restrictions, the failure throttle, secrets kept out of
//! logs, and fail-closed behaviour when stores go away.

mod common;

use std::time::Duration;

use common::http::{self, Response};
use common::tcp_fault::FaultProxy;
use common::{Gateway, Redis, Sim, Stack, UPSTREAM_TOKEN, fresh_database};

const CHAT: &str =
    r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}"#;

fn chat(addr: &str, key: &str) -> Response {
    let auth = format!("Bearer {key}");
    http::post_json(addr, "/api/chat", &[("Authorization", auth.as_str())], CHAT)
}

fn assert_uniform_401(r: &Response, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}");
    assert_eq!(
        r.json(),
        serde_json::json!({"error": "invalid or missing API key"}),
        "{what}"
    );
    assert!(r.header("x-request-id").is_some());
}

#[test]
fn every_kind_of_bad_key_gets_the_same_401() {
    let s = Stack::start();
    assert_eq!(chat(&s.gw.addr, &s.key).status, 200);
    let mut wrong_secret = s.key.clone();
    let last = wrong_secret.pop().expect("char");
    wrong_secret.push(if last == 'A' { 'B' } else { 'A' });
    assert_uniform_401(
        &chat(&s.gw.addr, &wrong_secret),
        "right prefix, wrong secret",
    );
    assert_uniform_401(
        &chat(&s.gw.addr, "nz_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        "unknown prefix",
    );
    assert_uniform_401(&chat(&s.gw.addr, "not-a-key"), "malformed");
    assert_uniform_401(
        &http::post_json(&s.gw.addr, "/api/chat", &[], CHAT),
        "missing",
    );
    assert_uniform_401(
        &http::post_json(
            &s.gw.addr,
            "/api/chat",
            &[("Authorization", "Basic Zm9vOmJhcg==")],
            CHAT,
        ),
        "basic",
    );
    let long = format!("Bearer {}", "x".repeat(8000));
    assert_uniform_401(
        &http::post_json(
            &s.gw.addr,
            "/api/chat",
            &[("Authorization", long.as_str())],
            CHAT,
        ),
        "over-long",
    );
    let r = http::post_json(
        &s.gw.addr,
        "/v1/chat/completions",
        &[],
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");

    // revoked
    let (k, p) = s.gw.create_key("acme", "to-revoke", &[]);
    s.gw.cli(&["revoke-key", "--prefix", &p]);
    assert_uniform_401(&chat(&s.gw.addr, &k), "revoked");
    // expired
    let (k, _) = s.gw.create_key("acme", "short", &["--expires-in", "1s"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_uniform_401(&chat(&s.gw.addr, &k), "expired");
    // suspended tenant
    s.gw.cli(&["create-tenant", "--name", "sus", "--allow-all-models"]);
    let (k, _) = s.gw.create_key("sus", "k", &[]);
    s.gw.cli(&["suspend-tenant", "--name", "sus"]);
    assert_uniform_401(&chat(&s.gw.addr, &k), "suspended tenant");
    s.gw.cli(&["suspend-tenant", "--name", "sus", "--resume"]);
    std::thread::sleep(Duration::from_millis(5100)); // the negative cache entry lapses
    assert_eq!(chat(&s.gw.addr, &k).status, 200, "resumed tenant");
}

#[test]
fn a_cached_key_expires_on_time() {
    let s = Stack::start();
    let (k, _) = s.gw.create_key("acme", "brief", &["--expires-in", "2s"]);
    assert_eq!(chat(&s.gw.addr, &k).status, 200);
    std::thread::sleep(Duration::from_millis(2200));
    assert_uniform_401(&chat(&s.gw.addr, &k), "expired while cached");
}

#[test]
fn rotation_keeps_the_old_key_for_the_grace_period() {
    let s = Stack::start();
    let out: serde_json::Value = serde_json::from_str(
        s.gw.cli(&[
            "rotate-key",
            "--prefix",
            &s.prefix,
            "--grace",
            "2s",
            "--json",
        ])
        .trim(),
    )
    .expect("json");
    let new_key = out["key"].as_str().expect("key").to_string();
    assert_ne!(new_key, s.key);
    assert_eq!(out["tenant"], "acme");
    assert_eq!(chat(&s.gw.addr, &new_key).status, 200);
    assert_eq!(chat(&s.gw.addr, &s.key).status, 200, "old key within grace");
    std::thread::sleep(Duration::from_millis(2200));
    assert_uniform_401(&chat(&s.gw.addr, &s.key), "old key after grace");
    assert_eq!(chat(&s.gw.addr, &new_key).status, 200);
    let keys: serde_json::Value = serde_json::from_str(
        s.gw.cli(&["list-keys", "--tenant", "acme", "--json"])
            .trim(),
    )
    .expect("json");
    let keys = keys.as_array().expect("array");
    assert_eq!(keys.len(), 2);
    for k in keys {
        for field in [
            "prefix",
            "name",
            "tenant",
            "created_at",
            "expires_at",
            "revoked",
        ] {
            assert!(k.get(field).is_some(), "list-keys --json lacks {field}");
        }
    }
}

#[test]
fn source_restrictions_narrow_access() {
    let s = Stack::start();
    assert_eq!(chat(&s.gw.addr, &s.key).status, 200);
    s.gw.cli(&[
        "set-policy",
        "--tenant",
        "acme",
        "--allowed-cidrs",
        "127.0.0.0/8",
    ]);
    let (k, p) = s.gw.create_key("acme", "cidr", &[]);
    assert_eq!(chat(&s.gw.addr, &k).status, 200);
    s.gw.cli(&[
        "set-policy",
        "--prefix",
        &p,
        "--allowed-cidrs",
        "10.0.0.0/8",
    ]);
    let (k2, p2) = s.gw.create_key("acme", "cidr2", &[]);
    s.gw.cli(&[
        "set-policy",
        "--prefix",
        &p2,
        "--allowed-cidrs",
        "10.0.0.0/8",
    ]);
    let r = chat(&s.gw.addr, &k2);
    assert_eq!(r.status, 403, "{}", r.text());
    let _ = k;
}

#[test]
fn failure_throttle_slows_brute_force_but_not_cached_keys() {
    let s = Stack::start_with(&[("AUTH_FAILURE_LIMIT_PER_MIN", "5")]);
    // Let the change feed apply the set-up's own changes (they evict the tenant's keys) before
    // the key is cached.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        chat(&s.gw.addr, &s.key).status,
        200,
        "cache the good key first"
    );
    for i in 0..5 {
        let bad = format!("nz_BBBBBBBBB{:0>32}", i).replace('0', "C");
        assert_eq!(chat(&s.gw.addr, &bad).status, 401);
    }
    let r = chat(&s.gw.addr, "nz_BBBBBBBBBDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD");
    assert_eq!(r.status, 429, "{}", r.text());
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry));
    assert_eq!(
        chat(&s.gw.addr, &s.key).status,
        200,
        "a cached valid key is never throttled"
    );
}

#[test]
fn secrets_never_reach_the_log() {
    let s = Stack::start();
    assert_eq!(chat(&s.gw.addr, &s.key).status, 200);
    let mut wrong = s.key.clone();
    let last = wrong.pop();
    wrong.push(if last == Some('Z') { 'Y' } else { 'Z' });
    assert_eq!(chat(&s.gw.addr, &wrong).status, 401);
    let r = http::post_json(
        &s.gw.addr,
        "/api/chat",
        &[("Authorization", "Bearer nz_short")],
        CHAT,
    );
    assert_eq!(r.status, 401);
    let (_, p) = s.gw.create_key("acme", "other", &[]);
    s.gw.cli(&["revoke-key", "--prefix", &p]);
    let hash = common::sql_scalar_i64(&s.db, "SELECT count(*) FROM api_keys");
    assert!(hash >= 2);
    std::thread::sleep(Duration::from_millis(300));
    let log = s.gw.log_text();
    assert!(log.contains("request"), "the gateway logs requests: {log}");
    for secret in [
        s.key.as_str(),
        &s.key[12..],
        wrong.as_str(),
        &wrong[12..],
        UPSTREAM_TOKEN,
        "nz_short",
        "$argon2id$",
    ] {
        assert!(!log.contains(secret), "secret {secret:?} found in the log");
    }
    let listed = s.gw.cli(&["list-keys", "--json"]);
    assert!(
        !listed.contains(&s.key[12..]) && !listed.contains("$argon2"),
        "list-keys shows no secret or hash"
    );
}

#[test]
fn redis_down_serves_cached_keys_and_postgres_answers_uncached_ones() {
    let mut redis = Redis::start();
    let s = Stack::start_custom(&[("REDIS_URL", redis.url.as_str())], &[]);
    assert_eq!(chat(&s.gw.addr, &s.key).status, 200);
    let (uncached, _) = s.gw.create_key("acme", "later", &[]);
    redis.stop();
    assert_eq!(
        chat(&s.gw.addr, &s.key).status,
        200,
        "cached key with Redis down"
    );
    assert_eq!(
        chat(&s.gw.addr, &uncached).status,
        200,
        "Redis down, Postgres up: resolved from Postgres"
    );
    let r = http::get(&s.gw.addr, "/readyz", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["checks"]["redis"], "down");
}

#[test]
fn both_stores_down_fails_closed_for_uncached_keys() {
    let mut redis = Redis::start();
    let db = fresh_database();
    let admin = common::require_env("NZ_TEST_DATABASE_URL");
    let pg_target = admin
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("host:port")
        .to_string();
    let proxy = FaultProxy::start(pg_target.clone());
    let proxied_db = db.replace(&pg_target, &format!("127.0.0.1:{}", proxy.port));
    let sim = Sim::start(&["--require-token", UPSTREAM_TOKEN]);
    let sim_url = sim.url();
    let gw = Gateway::start(&[
        ("DATABASE_URL", proxied_db.as_str()),
        ("REDIS_URL", redis.url.as_str()),
        ("OLLAMA_URL", sim_url.as_str()),
        ("OLLAMA_AUTH_TOKEN", UPSTREAM_TOKEN),
        ("KEY_CACHE_SECRET", "both-down-test-secret-0123456789"),
    ]);
    gw.cli(&["create-tenant", "--name", "acme", "--models", "llama3.2"]);
    let (cached, _) = gw.create_key("acme", "a", &[]);
    let (uncached, _) = gw.create_key("acme", "b", &[]);
    // The change feed applies the tenant's creation (evicting its cached keys) within 250 ms.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(chat(&gw.addr, &cached).status, 200);
    redis.stop();
    proxy.cut();
    assert_eq!(
        chat(&gw.addr, &cached).status,
        200,
        "locally cached key still serves"
    );
    let r = chat(&gw.addr, &uncached);
    assert_eq!(
        r.status,
        503,
        "uncached key with both stores down: {}",
        r.text()
    );
    assert!(r.header("retry-after").is_some());
    assert!(r.json()["error"].is_string());
    let r = chat(&gw.addr, "nz_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(r.status, 503, "unknown keys are not 'allowed' either");
    proxy.restore();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        chat(&gw.addr, &uncached).status,
        200,
        "back once Postgres returns"
    );
}

#[test]
fn cli_errors_are_one_clear_line() {
    let s = Stack::start();
    let out =
        s.gw.cli_raw(&["create-key", "--tenant", "nope", "--name", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown tenant `nope`"), "{err}");
    let out = s.gw.cli_raw(&["create-tenant", "--name", "acme"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = s.gw.cli_raw(&[
        "create-key",
        "--tenant",
        "acme",
        "--name",
        "x",
        "--expires-in",
        "soon",
    ]);
    assert!(!out.status.success());
    let audit = common::sql_scalar_i64(
        &s.db,
        "SELECT count(*) FROM admin_audit WHERE action IN ('create-tenant','create-key')",
    );
    assert!(audit >= 2, "admin changes are audited");
    // A bad setting stops start-up naming it.
    let out = std::process::Command::new(common::gateway_bin())
        .args(["serve"])
        .env("OLLAMA_URL", "https://nope")
        .env("DATABASE_URL", &s.db)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid setting OLLAMA_URL"));
}

#[test]
fn probe_ollama_reports_without_revealing_the_token() {
    let s = Stack::start();
    let out = s.gw.cli(&["probe-ollama", "--json"]);
    assert!(!out.contains(UPSTREAM_TOKEN));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v[0]["ok"], true);
    assert_eq!(v[0]["token_attached"], true);
    let out = s.gw.cli_raw(&["probe-ollama"]);
    assert!(out.status.success());
    // A wrong token: the simulator refuses, the probe fails with exit 1.
    let out = std::process::Command::new(common::gateway_bin())
        .args(["probe-ollama"])
        .env("OLLAMA_URL", s.sim.url())
        .env("OLLAMA_AUTH_TOKEN", "wrong-token")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("HTTP 401") && !text.contains("wrong-token"),
        "{text}"
    );
}

#[test]
fn outdated_argon2_parameters_are_upgraded_on_use() {
    let s = Stack::start_with(&[("ARGON2_MEMORY_KIB", "2048")]);
    // A key hashed with older, cheaper parameters (as an earlier configuration would have).
    let out = std::process::Command::new(common::gateway_bin())
        .args(["create-key", "--tenant", "acme", "--name", "old", "--json"])
        .env("DATABASE_URL", &s.db)
        .env("ARGON2_MEMORY_KIB", "1024")
        .env("ARGON2_ITERATIONS", "1")
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let (key, prefix) = (
        v["key"].as_str().expect("key").to_string(),
        v["prefix"].as_str().expect("prefix").to_string(),
    );
    let count = |m: &str| {
        common::sql_scalar_i64(
            &s.db,
            &format!(
                "SELECT count(*) FROM api_keys WHERE prefix = '{prefix}' AND key_hash LIKE '%m={m},%'"
            ),
        )
    };
    assert_eq!(count("1024"), 1);
    assert_eq!(chat(&s.gw.addr, &key).status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count("2048") != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "hash was not upgraded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let trusted = Stack::start_with(&[("TRUSTED_PROXIES", "127.0.0.1/32")]);
    trusted.gw.cli(&[
        "set-policy",
        "--prefix",
        &trusted.prefix,
        "--allowed-cidrs",
        "10.0.0.0/8",
    ]);
    let auth = format!("Bearer {}", trusted.key);
    let via = |addr: &str, xff: Option<&str>| {
        let mut h = vec![("Authorization", auth.as_str())];
        if let Some(x) = xff {
            h.push(("X-Forwarded-For", x));
        }
        http::post_json(addr, "/api/chat", &h, CHAT).status
    };
    assert_eq!(
        via(&trusted.gw.addr, Some("10.1.2.3")),
        200,
        "client behind a trusted proxy"
    );
    assert_eq!(
        via(&trusted.gw.addr, Some("10.1.2.3, 192.0.2.7")),
        403,
        "rightmost untrusted hop decides"
    );
    assert_eq!(via(&trusted.gw.addr, None), 403);

    let untrusted = Stack::start();
    untrusted.gw.cli(&[
        "set-policy",
        "--prefix",
        &untrusted.prefix,
        "--allowed-cidrs",
        "10.0.0.0/8",
    ]);
    let auth = format!("Bearer {}", untrusted.key);
    let r = http::post_json(
        &untrusted.gw.addr,
        "/api/chat",
        &[
            ("Authorization", auth.as_str()),
            ("X-Forwarded-For", "10.1.2.3"),
        ],
        CHAT,
    );
    assert_eq!(
        r.status, 403,
        "X-Forwarded-For from an untrusted peer is ignored"
    );
}

#[test]
fn earlier_service_schema_is_refused_and_config_files_work() {
    let db = fresh_database();
    common::sql(&db, "CREATE TABLE alembic_version (version_num text)");
    let out = std::process::Command::new(common::gateway_bin())
        .args(["migrate"])
        .env("DATABASE_URL", &db)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("alembic_version"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().expect("tmp");
    let db2 = fresh_database();
    let file = dir.path().join("gw.yaml");
    std::fs::write(
        &file,
        format!("database_url: {db2}\nARGON2_MEMORY_KIB: 1024\nARGON2_ITERATIONS: 1\n"),
    )
    .expect("write");
    let run = |args: &[&str]| {
        std::process::Command::new(common::gateway_bin())
            .arg("--config")
            .arg(&file)
            .args(args)
            .output()
            .expect("run")
    };
    assert!(run(&["migrate"]).status.success());
    assert!(
        run(&["create-tenant", "--name", "from-file"])
            .status
            .success()
    );
    std::fs::write(&file, format!("database_url: {db2}\nOLAMA_URL: http://x\n")).expect("write");
    let out = run(&["list-keys"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid setting OLAMA_URL: unknown setting")
    );
}
