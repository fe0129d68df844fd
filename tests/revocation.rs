//! Changes reach every running gateway within a second (SPEC §3): two gateway processes share
//! Postgres and Redis; a key both have cached is revoked through the CLI, a tenant is
//! suspended, a model list narrowed, or a row changed directly in SQL.

mod common;

use std::time::{Duration, Instant};

use common::http;
use common::{Gateway, Sim, UPSTREAM_TOKEN, fresh_database, require_env};

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
