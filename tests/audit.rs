//! The audit log: exactly one row per request of every kind, written by the sidecar in
//! batches; a Postgres outage during a load loses nothing and doubles nothing.

mod common;

use std::time::{Duration, Instant};

use common::http;
use common::tcp_fault::FaultProxy;
use common::{Gateway, Sim, Stack, UPSTREAM_TOKEN, fresh_database, require_env, sql_scalar_i64};
use neuronetz_gateway::audit::AuditEvent;

const CHAT: &str =
    r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hello world"}]}"#;

fn wait_for_rows(db: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = sql_scalar_i64(db, "SELECT count(*) FROM audit_log");
        if n == want {
            return;
        }
        assert!(n < want, "more audit rows ({n}) than requests ({want})");
        assert!(
            Instant::now() < deadline,
            "only {n} of {want} audit rows arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A gateway on `db` with its own simulator and spool directory, and a tenant `acme` that may
/// use `llama3.2`. The simulator and the directory live as long as the returned values.
fn spooled_gateway(db: &str) -> (Sim, tempfile::TempDir, Gateway) {
    let sim = Sim::start(&["--require-token", UPSTREAM_TOKEN]);
    let sim_url = sim.url();
    let spool = tempfile::tempdir().expect("spool dir");
    let spool_dir = spool.path().to_string_lossy().to_string();
    let gw = Gateway::start(&[
        ("DATABASE_URL", db),
        ("OLLAMA_URL", sim_url.as_str()),
        ("OLLAMA_AUTH_TOKEN", UPSTREAM_TOKEN),
        ("AUDIT_SPOOL_DIR", spool_dir.as_str()),
    ]);
    gw.cli(&["create-tenant", "--name", "acme", "--models", "llama3.2"]);
    (sim, spool, gw)
}

#[test]
fn every_request_gets_exactly_one_audit_row() {
    let s = Stack::start();
    let (limited, lp) = s.gw.create_key("acme", "limited", &[]);
    s.gw.cli(&["set-limits", "--prefix", &lp, "--rpm", "1"]);
    let auth = format!("Bearer {}", s.key);
    let lauth = format!("Bearer {limited}");
    let a = ("Authorization", auth.as_str());
    let mut sent = 0;
    let mut expect = |status: u16, r: http::Response| {
        assert_eq!(r.status, status, "{}", r.text());
        sent += 1;
    };
    for _ in 0..3 {
        expect(
            200,
            http::post_json(
                &s.gw.addr,
                "/api/chat",
                &[a, ("User-Agent", "audit-test/1")],
                CHAT,
            ),
        );
    }
    expect(401, http::post_json(&s.gw.addr, "/api/chat", &[], CHAT));
    expect(
        401,
        http::post_json(
            &s.gw.addr,
            "/v1/chat/completions",
            &[("Authorization", "Bearer nope")],
            CHAT,
        ),
    );
    expect(
        403,
        http::post_json(&s.gw.addr, "/api/pull", &[a], r#"{"model":"x"}"#),
    );
    expect(
        403,
        http::post_json(
            &s.gw.addr,
            "/api/chat",
            &[a],
            r#"{"model":"mistral:7b","messages":[]}"#,
        ),
    );
    expect(404, http::get(&s.gw.addr, "/api/nothing-here", &[a]));
    expect(
        200,
        http::post_json(
            &s.gw.addr,
            "/api/chat",
            &[("Authorization", lauth.as_str())],
            CHAT,
        ),
    );
    expect(
        429,
        http::post_json(
            &s.gw.addr,
            "/api/chat",
            &[("Authorization", lauth.as_str())],
            CHAT,
        ),
    );
    expect(
        500,
        http::post_json(&s.gw.addr, "/api/chat", &[a, ("x-sim-status", "500")], CHAT),
    );
    wait_for_rows(&s.db, sent);
    let by_status = |status: i64| {
        sql_scalar_i64(
            &s.db,
            &format!("SELECT count(*) FROM audit_log WHERE status = {status}"),
        )
    };
    assert_eq!(
        (
            by_status(200),
            by_status(401),
            by_status(403),
            by_status(404),
            by_status(429),
            by_status(500)
        ),
        (4, 2, 2, 1, 1, 1)
    );
    let q = |sql: &str| sql_scalar_i64(&s.db, sql);
    assert_eq!(
        q(
            "SELECT count(*) FROM audit_log WHERE status = 200 AND path = '/api/chat' AND model = 'llama3.2:latest' \
           AND prompt_tokens = 3 AND completion_tokens = 8 AND tenant_id IS NOT NULL AND key_prefix IS NOT NULL \
           AND client_ip = '127.0.0.1' AND surface = 'native' AND upstream_status = 200 AND latency_ms > 0 AND bytes_out > 0"
        ),
        4
    );
    assert_eq!(
        q("SELECT count(*) FROM audit_log WHERE user_agent = 'audit-test/1'"),
        3
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM audit_log WHERE status = 429 AND error_code = 'rate_limit_exceeded'"
        ),
        1
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM audit_log WHERE status = 401 AND error_code = 'invalid_api_key' AND key_id IS NULL"
        ),
        2
    );
    assert_eq!(
        q("SELECT count(*) FROM audit_log WHERE status = 500 AND upstream_status = 500"),
        1
    );
    assert_eq!(q("SELECT count(DISTINCT request_id) FROM audit_log"), sent);
    assert_eq!(
        q(
            "SELECT count(*) FROM audit_log WHERE tableoid::regclass::text ~ '^audit_log_[0-9]{4}_[0-9]{2}$'"
        ),
        sent,
        "rows land in the month's partition"
    );
    // Never prompt content, never the key.
    let dump: String = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let pool = sqlx::PgPool::connect(&s.db).await.expect("connect");
            let v: String =
                sqlx::query_scalar("SELECT string_agg(to_jsonb(a)::text, ' ') FROM audit_log a")
                    .fetch_one(&pool)
                    .await
                    .expect("dump");
            v
        })
    };
    assert!(
        !dump.contains("hello world") && !dump.contains(&s.key[12..]),
        "audit rows hold no prompt or secret"
    );
}

#[test]
fn a_postgres_outage_loses_and_doubles_nothing() {
    let db = fresh_database();
    let admin = require_env("NZ_TEST_DATABASE_URL");
    let pg = admin
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("host:port")
        .to_string();
    let proxy = FaultProxy::start(pg.clone());
    let through_proxy = db.replace(&pg, &format!("127.0.0.1:{}", proxy.port));
    let (_sim, spool, gw) = spooled_gateway(&through_proxy);
    let (key, _) = gw.create_key("acme", "k", &[]);
    // Let the change feed apply the tenant's creation first: applying it later would evict the
    // tenant's cached keys (correctly), and the cut below would then refuse them (fail closed).
    std::thread::sleep(Duration::from_millis(1000));
    let auth = format!("Bearer {key}");
    let mut sent = 0;
    for _ in 0..5 {
        assert_eq!(
            http::post_json(
                &gw.addr,
                "/api/chat",
                &[("Authorization", auth.as_str())],
                CHAT
            )
            .status,
            200
        );
        sent += 1;
    }
    wait_for_rows(&db, sent);
    proxy.cut();
    for _ in 0..30 {
        // The key is cached: traffic goes on while Postgres is away.
        let r = http::post_json(
            &gw.addr,
            "/api/chat",
            &[("Authorization", auth.as_str())],
            CHAT,
        );
        assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log_text());
        sent += 1;
    }
    std::thread::sleep(Duration::from_millis(500));
    let spooled = std::fs::read_dir(spool.path()).expect("spool").count();
    assert!(spooled >= 1, "batches were spooled while Postgres was away");
    proxy.restore();
    wait_for_rows(&db, sent);
    assert_eq!(
        sql_scalar_i64(&db, "SELECT count(DISTINCT event_id) FROM audit_log"),
        sent,
        "nothing doubled"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        sql_scalar_i64(&db, "SELECT count(*) FROM audit_log"),
        sent,
        "and nothing replayed twice"
    );
    let left: Vec<_> = std::fs::read_dir(spool.path()).expect("spool").collect();
    assert!(left.is_empty(), "the spool is removed once replayed");
}

/// A spool holding a batch Postgres already took (the writer lost the acknowledgement, or the
/// process died before deleting the file) is replayed by whoever adopts it: the audit rows and
/// the budget usage of those events must count once, however often the batch comes back. The
/// first round writes two of the three events (a batch of new events: its usage summed before
/// the statement), the second all three (one new among two written: the new one counts, event
/// by event), the third all three again (nothing new).
#[test]
fn a_batch_replayed_after_it_was_written_counts_once() {
    let db = fresh_database();
    let (_sim, spool, gw) = spooled_gateway(&db);
    gw.create_key("acme", "k", &[]);
    let tenant = sql_scalar_i64(&db, "SELECT id FROM tenants WHERE name = 'acme'");
    let key = sql_scalar_i64(&db, "SELECT id FROM api_keys");
    let now = chrono::Utc::now();
    let events: Vec<AuditEvent> = (0..3)
        .map(|n| AuditEvent {
            event_id: uuid::Uuid::now_v7(),
            ts: now,
            request_id: format!("req_replayed_{n}"),
            tenant_id: Some(tenant),
            key_id: Some(key),
            key_prefix: None,
            client_ip: None,
            method: "POST".into(),
            path: "/api/chat".into(),
            surface: "native".into(),
            model: Some("llama3.2".into()),
            stream: Some(false),
            status: 200,
            upstream_status: Some(200),
            error_code: None,
            prompt_tokens: Some(10),
            completion_tokens: Some(5),
            bytes_in: None,
            bytes_out: None,
            ttfb_ms: None,
            latency_ms: 1.0,
            user_agent: None,
            usage_day: Some(now.date_naive()),
            prompt: None,
        })
        .collect();
    let spooled = |events: &[AuditEvent]| {
        let mut lines = String::new();
        for e in events {
            lines.push_str(&serde_json::to_string(e).expect("event json"));
            lines.push('\n');
        }
        lines
    };
    let usage = format!(
        "SELECT COALESCE(sum(requests * 1000 + prompt_tokens + completion_tokens), 0)::bigint \
         FROM budget_usage WHERE scope = 'key' AND key_id = {key} AND period = 'total'"
    );
    for round in 1..=3 {
        let batch = if round == 1 {
            &events[..2]
        } else {
            &events[..]
        };
        // Named for a process that has exited, so the running gateway adopts it.
        let mut gone = std::process::Command::new("true").spawn().expect("spawn");
        gone.wait().expect("wait");
        let file = spool.path().join(format!("audit-{}.jsonl", gone.id()));
        std::fs::write(&file, spooled(batch)).expect("write spool");
        let deadline = Instant::now() + Duration::from_secs(15);
        while file.exists() {
            assert!(
                Instant::now() < deadline,
                "spool not replayed\n{}",
                gw.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let n = batch.len() as i64;
        assert_eq!(
            sql_scalar_i64(&db, "SELECT count(*) FROM audit_log"),
            n,
            "round {round}: one audit row per event"
        );
        assert_eq!(
            sql_scalar_i64(&db, &usage),
            n * 1000 + n * 15,
            "round {round}: the events' usage counted once"
        );
    }
}

#[test]
fn partitions_past_retention_are_dropped_whole() {
    let db = fresh_database();
    let out = std::process::Command::new(common::gateway_bin())
        .args(["migrate"])
        .env("DATABASE_URL", &db)
        .output()
        .expect("migrate");
    assert!(out.status.success());
    common::sql(
        &db,
        "CREATE TABLE audit_log_2020_01 PARTITION OF audit_log FOR VALUES FROM ('2020-01-01') TO ('2020-02-01')",
    );
    let sim = Sim::start(&[]);
    let sim_url = sim.url();
    let _gw = Gateway::start(&[
        ("DATABASE_URL", db.as_str()),
        ("OLLAMA_URL", sim_url.as_str()),
        ("AUDIT_RETENTION_DAYS", "90"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let count = |pattern: &str| {
        sql_scalar_i64(
            &db,
            &format!("SELECT count(*) FROM pg_class WHERE relname ~ '{pattern}'"),
        )
    };
    while count("^audit_log_2020_01$") != 0 {
        assert!(Instant::now() < deadline, "old partition not dropped");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        count("^audit_log_[0-9]{4}_[0-9]{2}$") >= 2,
        "this month's and next month's partitions exist"
    );
}

#[test]
fn a_graceful_shutdown_loses_no_row() {
    let db = fresh_database();
    let sim = Sim::start(&["--require-token", UPSTREAM_TOKEN]);
    let sim_url = sim.url();
    let mut gw = Gateway::start(&[
        ("DATABASE_URL", db.as_str()),
        ("OLLAMA_URL", sim_url.as_str()),
        ("OLLAMA_AUTH_TOKEN", UPSTREAM_TOKEN),
    ]);
    gw.cli(&["create-tenant", "--name", "acme", "--models", "llama3.2"]);
    let (key, _) = gw.create_key("acme", "k", &[]);
    let auth = format!("Bearer {key}");
    for _ in 0..3 {
        assert_eq!(
            http::post_json(
                &gw.addr,
                "/api/chat",
                &[("Authorization", auth.as_str())],
                CHAT
            )
            .status,
            200
        );
    }
    // A stream still running when the signal comes finishes, and is audited.
    let addr = gw.addr.clone();
    let a = auth.clone();
    let streaming = std::thread::spawn(move || {
        http::post_json(
            &addr,
            "/api/chat",
            &[("Authorization", a.as_str()), ("x-sim-delay-ms", "100")],
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        )
    });
    std::thread::sleep(Duration::from_millis(250));
    assert!(
        gw.terminate(Duration::from_secs(20)),
        "the gateway did not exit after SIGTERM"
    );
    let r = streaming.join().expect("stream");
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("\"done\":true"),
        "the stream was allowed to finish"
    );
    assert_eq!(
        sql_scalar_i64(&db, "SELECT count(*) FROM audit_log"),
        4,
        "every request, the last one included, was written before exit"
    );
}
