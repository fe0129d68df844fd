//! Opt-in prompt logging (SPEC §9) against real Postgres: only opted-in keys (own setting or
//! inherited from the tenant) get `prompt_log` rows, with the request and the assembled answer
//! of each surface, and the rows vanish once their TTL has passed on the (injected) clock.

mod common;

use std::time::Duration;

use common::http;
use common::{ClockFile, Gateway, Sim, UPSTREAM_TOKEN, fresh_database, sql_scalar_i64};

struct Env {
    db: String,
    sim: Sim,
    clock: ClockFile,
}

fn env() -> Env {
    Env {
        db: fresh_database(),
        sim: Sim::start(&["--require-token", UPSTREAM_TOKEN]),
        clock: ClockFile::new(),
    }
}

fn gateway(e: &Env) -> Gateway {
    let sim = e.sim.url();
    Gateway::start(&[
        ("DATABASE_URL", e.db.as_str()),
        ("OLLAMA_URL", sim.as_str()),
        ("OLLAMA_AUTH_TOKEN", UPSTREAM_TOKEN),
        ("CLOCK_OFFSET_FILE", e.clock.path.as_str()),
        ("PROMPT_LOG_PURGE_INTERVAL", "200ms"),
    ])
}

fn post(addr: &str, key: &str, path: &str, body: &str) -> http::Response {
    let auth = format!("Bearer {key}");
    let r = http::post_json(addr, path, &[("Authorization", auth.as_str())], body);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r
}

fn rows(db: &str, where_: &str) -> i64 {
    sql_scalar_i64(
        db,
        &format!("SELECT count(*)::bigint FROM prompt_log WHERE {where_}"),
    )
}

fn text_of(db: &str, request_id: &str) -> String {
    let n = sql_scalar_i64(
        db,
        &format!(
            "SELECT count(*)::bigint FROM prompt_log WHERE request_id = '{request_id}' \
             AND response = 'tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 '"
        ),
    );
    assert_eq!(n, 1, "assembled answer of {request_id}");
    request_id.to_string()
}

#[test]
fn only_opted_in_keys_are_logged_and_rows_expire() {
    let e = env();
    let g = gateway(&e);
    g.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
    g.cli(&["create-tenant", "--name", "other", "--allow-all-models"]);
    let (logged, lp) = g.create_key("acme", "logged", &[]);
    let (quiet, qp) = g.create_key("acme", "quiet", &[]);
    let (inherits, ip) = g.create_key("other", "inherits", &[]);
    let (opted_out, op) = g.create_key("other", "opted-out", &[]);
    g.cli(&["set-prompt-logging", "--prefix", &lp, "--on", "--ttl", "1h"]);
    g.cli(&[
        "set-prompt-logging",
        "--tenant",
        "other",
        "--on",
        "--ttl",
        "3h",
    ]);
    g.cli(&["set-prompt-logging", "--prefix", &op, "--off"]);
    std::thread::sleep(Duration::from_millis(500));

    let chat = r#"{"model":"llama3.2","messages":[{"role":"user","content":"the secret plan"}]}"#;
    let openai_stream = r#"{"model":"llama3.2","stream":true,"messages":[{"role":"user","content":"the secret plan"}]}"#;
    let generate = r#"{"model":"llama3.2","stream":false,"prompt":"the secret plan"}"#;
    let responses = r#"{"model":"llama3.2","stream":true,"input":"the secret plan"}"#;
    let embed = r#"{"model":"nomic-embed-text","input":"the secret plan"}"#;
    let mut ids = Vec::new();
    for (path, body) in [
        ("/api/chat", chat),
        ("/v1/chat/completions", openai_stream),
        ("/api/generate", generate),
        ("/v1/responses", responses),
        ("/api/embed", embed),
    ] {
        for key in [&logged, &quiet, &inherits, &opted_out] {
            let r = post(&g.addr, key, path, body);
            if key == &logged {
                ids.push(r.header("x-request-id").expect("request id").to_string());
            }
        }
    }
    std::thread::sleep(Duration::from_millis(600));
    let key_rows = |prefix: &str| {
        rows(
            &e.db,
            &format!("key_id = (SELECT id FROM api_keys WHERE prefix = '{prefix}')"),
        )
    };
    assert_eq!(key_rows(&lp), 5, "every request of the opted-in key");
    assert_eq!(key_rows(&ip), 5, "the tenant's setting is inherited");
    assert_eq!(key_rows(&qp), 0, "a key that did not opt in");
    assert_eq!(
        key_rows(&op),
        0,
        "a key's own `--off` wins over its tenant's `--on`"
    );
    for id in &ids[..4] {
        text_of(&e.db, id);
    }
    assert_eq!(
        rows(
            &e.db,
            &format!("request_id = '{}' AND response IS NULL", ids[4])
        ),
        1,
        "embeddings keep the request only"
    );
    assert_eq!(
        rows(
            &e.db,
            "request->'messages'->0->>'content' = 'the secret plan' OR request->>'prompt' = 'the secret plan'"
        ),
        6,
        "the request as sent (chat, stream, generate) for both logging keys"
    );
    assert_eq!(
        sql_scalar_i64(
            &e.db,
            "SELECT count(*)::bigint FROM audit_log WHERE path = '/api/chat' AND status = 200"
        ),
        4,
        "the audit log has every request, prompt logging or not"
    );

    // A prompt with a NUL character (valid JSON, refused by Postgres text/jsonb) is stored
    // without it, and the audit pipeline keeps going.
    post(
        &g.addr,
        &logged,
        "/api/chat",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"nul\u0000here"}]}"#,
    );
    post(&g.addr, &quiet, "/api/chat", chat);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        rows(&e.db, "request->'messages'->0->>'content' = 'nulhere'"),
        1
    );
    assert_eq!(
        sql_scalar_i64(
            &e.db,
            "SELECT count(*)::bigint FROM audit_log WHERE path = '/api/chat' AND status = 200"
        ),
        6,
        "audit rows after the NUL prompt are written"
    );

    // Two hours later the 1 h rows are gone and the 3 h rows are still there.
    e.clock.set_offset(2 * 3600);
    // The purge runs every 200 ms.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(key_rows(&lp), 0, "expired rows are deleted");
    assert_eq!(key_rows(&ip), 5, "rows still within their TTL stay");
    e.clock.set_offset(4 * 3600);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rows(&e.db, "true"), 0);
}
