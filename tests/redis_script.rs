//! The script pool (`redis_script`) against private Redis servers: replies, connection reuse,
//! a forgotten script, closed and frozen connections, a stopped server, AUTH and SELECT, the
//! Unix socket. The limiter's own behaviour over it is in limits.rs and budget_property.rs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Redis, resp};
use neuronetz_gateway::redis_script::{Arg, ScriptError, ScriptPool};

const ECHO: &str = "return {#KEYS, #ARGV, tonumber(ARGV[1]) + 1}";
const WRITE: &str = "redis.call('SET', KEYS[1], ARGV[1]) return {1}";
const FAIL: &str = "return redis.error_reply('boom')";

fn pool(url: &str, script: &'static str, timeout_ms: u64) -> ScriptPool {
    ScriptPool::from_url(url, script, Duration::from_millis(timeout_ms)).expect("pool")
}

async fn echo(pool: &ScriptPool, n: i64) -> Result<Vec<i64>, ScriptError> {
    pool.call(&["k1", "k2"], &[Arg::Int(n)]).await
}

/// Connections that last ran the given command (`CLIENT LIST`).
fn clients_after(url: &str, command: &str) -> usize {
    let resp::Value::Str(list) = resp::cmd(url, &["CLIENT", "LIST"]) else {
        panic!("CLIENT LIST");
    };
    list.lines()
        .filter(|l| l.contains(&format!("cmd={command} ")))
        .count()
}

#[tokio::test]
async fn runs_the_script_on_one_reused_connection() {
    let redis = Redis::start();
    let pool = pool(&redis.url, ECHO, 2000);
    for n in 0..20 {
        assert_eq!(echo(&pool, n).await.expect("call"), vec![2, 1, n + 1]);
    }
    assert_eq!(pool.idle_count(), 1);
    assert_eq!(clients_after(&redis.url, "evalsha"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_open_more_connections_and_keep_them() {
    let redis = Redis::start();
    let pool = Arc::new(pool(&redis.url, ECHO, 2000));
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..8 {
        let pool = pool.clone();
        calls.spawn(async move { (n, echo(&pool, n).await) });
    }
    while let Some(done) = calls.join_next().await {
        let (n, reply) = done.expect("task");
        assert_eq!(reply.expect("call"), vec![2, 1, n + 1]);
    }
    let idle = pool.idle_count();
    assert!((1..=8).contains(&idle), "{idle} idle connections");
}

#[tokio::test]
async fn a_forgotten_script_is_loaded_again() {
    let redis = Redis::start();
    let pool = pool(&redis.url, ECHO, 2000);
    echo(&pool, 1).await.expect("first call");
    assert_eq!(
        resp::cmd(&redis.url, &["SCRIPT", "FLUSH"]),
        resp::Value::Str("OK".into())
    );
    assert_eq!(echo(&pool, 2).await.expect("after flush"), vec![2, 1, 3]);
    // Cached again by the EVAL: the next call is an EVALSHA that succeeds.
    assert_eq!(echo(&pool, 3).await.expect("after reload"), vec![2, 1, 4]);
    assert_eq!(clients_after(&redis.url, "evalsha"), 1);
}

#[tokio::test]
async fn a_connection_redis_closed_is_replaced() {
    let redis = Redis::start();
    let pool = pool(&redis.url, ECHO, 2000);
    echo(&pool, 1).await.expect("first call");
    resp::cmd(&redis.url, &["CLIENT", "KILL", "TYPE", "normal"]);
    assert_eq!(
        echo(&pool, 2).await.expect("on a new connection"),
        vec![2, 1, 3]
    );
    assert_eq!(pool.idle_count(), 1);
}

#[tokio::test]
async fn a_restarted_redis_is_used_again_at_once() {
    let mut redis = Redis::start();
    let pool = pool(&redis.url, ECHO, 2000);
    echo(&pool, 1).await.expect("first call");
    redis.restart();
    assert_eq!(echo(&pool, 2).await.expect("after restart"), vec![2, 1, 3]);
}

#[tokio::test]
async fn a_frozen_redis_times_out_and_its_connection_is_dropped() {
    let redis = Redis::start();
    let pool = pool(&redis.url, ECHO, 300);
    echo(&pool, 1).await.expect("first call");
    redis.freeze(true);
    let started = Instant::now();
    let result = echo(&pool, 2).await;
    let waited = started.elapsed();
    redis.freeze(false);
    assert!(matches!(result, Err(ScriptError::Timeout)), "{result:?}");
    assert!(
        waited < Duration::from_secs(2),
        "timed out after {waited:?}"
    );
    // The late reply of the abandoned call must not be read as this call's.
    assert_eq!(pool.idle_count(), 0);
    assert_eq!(echo(&pool, 5).await.expect("after thaw"), vec![2, 1, 6]);
}

#[tokio::test]
async fn a_stopped_redis_fails_fast_until_a_retry_succeeds() {
    let mut redis = Redis::start();
    let pool = pool(&redis.url, ECHO, 2000);
    redis.stop();
    let first = echo(&pool, 1).await;
    assert!(matches!(first, Err(ScriptError::Io(_))), "{first:?}");
    let second = echo(&pool, 1).await;
    assert!(matches!(second, Err(ScriptError::Down)), "{second:?}");
    redis.restart();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(echo(&pool, 1).await.expect("after restart"), vec![2, 1, 2]);
}

#[tokio::test]
async fn authenticates_selects_the_database_and_keeps_the_password_out_of_errors() {
    let redis = Redis::start();
    let acl = [
        "ACL",
        "SETUSER",
        "limiter",
        "on",
        ">s3cret-pass",
        "~*",
        "&*",
        "+@all",
    ];
    assert_eq!(resp::cmd(&redis.url, &acl), resp::Value::Str("OK".into()));
    let base = redis.url.trim_start_matches("redis://");
    let good = pool(
        &format!("redis://limiter:s3cret-pass@{base}/3"),
        WRITE,
        2000,
    );
    let reply = good.call(&["written"], &[Arg::Str("x")]).await;
    assert_eq!(reply.expect("authenticated call"), vec![1]);
    let resp::Value::Str(keyspace) = resp::cmd(&redis.url, &["INFO", "keyspace"]) else {
        panic!("INFO keyspace");
    };
    assert!(keyspace.contains("db3:keys=1"), "{keyspace}");

    let bad = pool(
        &format!("redis://limiter:wrong-pass-xyz@{base}/3"),
        WRITE,
        2000,
    );
    let err = bad
        .call(&["written"], &[Arg::Str("y")])
        .await
        .expect_err("wrong password");
    assert!(matches!(err, ScriptError::Redis(_)), "{err:?}");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains("wrong-pass-xyz"), "{text}");
    }
    let invalid = ScriptPool::from_url(
        "redis://u:wrong-pass-xyz@h:port",
        WRITE,
        Duration::from_secs(1),
    );
    let text = invalid
        .err()
        .map(|e| e.to_string())
        .expect("not a redis url");
    assert!(!text.contains("wrong-pass-xyz"), "{text}");
}

#[tokio::test]
async fn works_over_the_unix_socket() {
    let redis = Redis::start();
    let pool = pool(&redis.socket_url, ECHO, 2000);
    assert_eq!(echo(&pool, 7).await.expect("call"), vec![2, 1, 8]);
}

#[tokio::test]
async fn an_error_reply_is_an_error_and_the_connection_stays_usable() {
    let redis = Redis::start();
    let pool = pool(&redis.url, FAIL, 2000);
    let err = pool.call(&[], &[]).await.expect_err("error reply");
    assert!(
        matches!(&err, ScriptError::Redis(m) if m.contains("boom")),
        "{err:?}"
    );
    assert_eq!(pool.idle_count(), 1);
}

#[test]
fn only_a_single_server_is_accepted() {
    for url in [
        "redis-cluster://127.0.0.1:7000",
        "redis-sentinel://127.0.0.1:26379/mymaster",
    ] {
        let result = ScriptPool::from_url(url, ECHO, Duration::from_secs(1));
        assert!(
            matches!(result, Err(ScriptError::Config(_))),
            "{url}: {:?}",
            result.err()
        );
    }
}

#[tokio::test]
async fn a_connection_attempt_that_times_out_makes_the_next_calls_fail_fast() {
    // Accepts connections (the kernel's backlog) and never answers: AUTH hangs.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr");
    let pool = pool(&format!("redis://:secret@{addr}"), ECHO, 200);
    let first = echo(&pool, 1).await;
    assert!(matches!(first, Err(ScriptError::Timeout)), "{first:?}");
    let started = Instant::now();
    let second = echo(&pool, 1).await;
    assert!(matches!(second, Err(ScriptError::Down)), "{second:?}");
    assert!(started.elapsed() < Duration::from_millis(100));
}
