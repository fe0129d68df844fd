//! Changes reach every running gateway within a second (SPEC §3): two gateway processes share
//! Postgres and Redis; a key both have cached is revoked through the CLI, a tenant is
//! suspended, a model list narrowed, or a row changed directly in SQL.

mod common;

use std::time::{Duration, Instant};

use common::http;
use common::{Gateway, Sim, UPSTREAM_TOKEN, fresh_database, require_env};
use sqlx::Connection;

const CHAT: &str =
    r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}"#;

fn chat(addr: &str, key: &str, body: &str) -> u16 {
    let auth = format!("Bearer {key}");
    http::post_json(addr, "/api/chat", &[("Authorization", auth.as_str())], body).status
}

struct Pair {
    db: String,
    a: Gateway,
    b: Gateway,
    _sim: Sim,
}

fn pair() -> Pair {
    let db = fresh_database();
    let redis = require_env("NZ_TEST_REDIS_URL");
    let sim = Sim::start(&["--require-token", UPSTREAM_TOKEN]);
    let sim_url = sim.url();
    let secret = format!("shared-secret-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("OLLAMA_URL", sim_url.as_str()),
        ("OLLAMA_AUTH_TOKEN", UPSTREAM_TOKEN),
        ("KEY_CACHE_SECRET", secret.as_str()),
        // Long cache lifetimes: only the change feed can explain a refusal within a second.
        ("REDIS_KEY_CACHE_TTL_S", "3600"),
    ];
    let a = Gateway::start(&env);
    let b = Gateway::start(&env);
    a.cli(&[
        "create-tenant",
        "--name",
        "acme",
        "--models",
        "llama3.2,qwen2.5:0.5b",
    ]);
    Pair {
        db,
        a,
        b,
        _sim: sim,
    }
}

/// Waits until both gateways answer `want`; returns how long that took.
fn until_both(p: &Pair, key: &str, body: &str, want: u16) -> Duration {
    let start = Instant::now();
    loop {
        if chat(&p.a.addr, key, body) == want && chat(&p.b.addr, key, body) == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "not every gateway answers {want} after 3 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn warm(p: &Pair, key: &str) {
    for _ in 0..3 {
        assert_eq!(chat(&p.a.addr, key, CHAT), 200);
        assert_eq!(chat(&p.b.addr, key, CHAT), 200);
    }
}

#[test]
fn revocation_reaches_every_gateway_within_a_second() {
    let p = pair();
    let (key, prefix) = p.a.create_key("acme", "k", &[]);
    warm(&p, &key);
    p.a.cli(&["revoke-key", "--prefix", &prefix]);
    let took = until_both(&p, &key, CHAT, 401);
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
}

#[test]
fn suspension_model_changes_and_direct_sql_reach_every_gateway() {
    let p = pair();
    let (key, prefix) = p.a.create_key("acme", "k", &[]);
    warm(&p, &key);
    p.a.cli(&[
        "set-models",
        "--prefix",
        &prefix,
        "--models",
        "qwen2.5:0.5b",
    ]);
    let took = until_both(&p, &key, CHAT, 403);
    assert!(took < Duration::from_secs(1), "model change took {took:?}");

    let (key2, _) = p.a.create_key("acme", "k2", &[]);
    warm(&p, &key2);
    p.a.cli(&["suspend-tenant", "--name", "acme"]);
    let took = until_both(&p, &key2, CHAT, 401);
    assert!(took < Duration::from_secs(1), "suspension took {took:?}");
    // ... and resuming is just as quick (refusals are not remembered past a change).
    p.a.cli(&["suspend-tenant", "--name", "acme", "--resume"]);
    let took = until_both(&p, &key2, CHAT, 200);
    assert!(took < Duration::from_secs(1), "resume took {took:?}");

    // The separate console changes rows directly.
    p.a.cli(&["create-tenant", "--name", "other", "--allow-all-models"]);
    let (key3, prefix3) = p.a.create_key("other", "k3", &[]);
    warm(&p, &key3);
    common::sql(
        &p.db,
        &format!("UPDATE api_keys SET revoked_at = now() WHERE prefix = '{prefix3}'"),
    );
    let took = until_both(&p, &key3, CHAT, 401);
    assert!(
        took < Duration::from_secs(1),
        "direct SQL revocation took {took:?}"
    );
}

/// A change whose transaction took its feed id first but commits after a later change was
/// already seen: the feed must still pick it up (it re-reads only rows of transactions that
/// were running at its last poll).
#[test]
fn a_change_committed_after_a_later_one_still_reaches_every_gateway() {
    let p = pair();
    p.a.cli(&["create-tenant", "--name", "other", "--allow-all-models"]);
    let (slow_key, slow_prefix) = p.a.create_key("other", "slow", &[]);
    let (fast_key, fast_prefix) = p.a.create_key("other", "fast", &[]);
    warm(&p, &slow_key);
    warm(&p, &fast_key);
    let revoke =
        |prefix: &str| format!("UPDATE api_keys SET revoked_at = now() WHERE prefix = '{prefix}'");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut slow = rt
        .block_on(sqlx::PgConnection::connect(&p.db))
        .expect("connect");
    rt.block_on(async {
        sqlx::query("BEGIN").execute(&mut slow).await?;
        sqlx::query(sqlx::AssertSqlSafe(revoke(&slow_prefix)))
            .execute(&mut slow)
            .await
    })
    .expect("revoke in an open transaction");
    common::sql(&p.db, &revoke(&fast_prefix));
    until_both(&p, &fast_key, CHAT, 401);
    // A few polls see the later change while the earlier one is still uncommitted.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(chat(&p.a.addr, &slow_key, CHAT), 200, "not committed yet");
    rt.block_on(sqlx::query("COMMIT").execute(&mut slow))
        .expect("commit");
    let took = until_both(&p, &slow_key, CHAT, 401);
    assert!(took < Duration::from_secs(1), "late commit took {took:?}");
}
