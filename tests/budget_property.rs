//! Property test of the budget scripts against a real Redis: random interleavings of
//! reservations and settlements, by two gateway instances (two limiters), for two keys sharing
//! a tenant; and of the in-process limiter (no Redis, counters read from Postgres). Whatever the order, the sum of actual usage never exceeds a key's or the tenant's
//! budget, and once everything has settled the counters equal the usage and no reservation is
//! left behind.
//!
//! Each case is replayable from its seed (printed on failure).
//!
//! Also here: how settlements reach Redis (carried by the instance's next admission, or sent by
//! the flusher when none comes).

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Builder, Client, ClientLike, Config, HashesInterface, KeysInterface};
use neuronetz_gateway::audit::Pipeline;
use neuronetz_gateway::clock::Periods;
use neuronetz_gateway::limits::keys::ScopeName;
use neuronetz_gateway::limits::leases::LeaseBook;
use neuronetz_gateway::limits::local::LocalLimits;
use neuronetz_gateway::limits::settlement::{FLUSH_AFTER, SettleQueue};
use neuronetz_gateway::limits::{
    Admission, Demand, LimitError, Limiter, LimiterConfig, LimiterRedis,
};
use neuronetz_gateway::principal::{Principal, PrincipalIds, SubjectSettings};
use neuronetz_gateway::settings::BudgetMode;
use neuronetz_gateway::store::Store;
use secrecy::SecretString;

const CASES: u64 = 40;
const STEPS: usize = 120;

/// xorshift64*: small, deterministic, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

fn principal(key_id: i64, key_daily: i64, tenant_daily: i64) -> Principal {
    let tenant = SubjectSettings {
        budget_daily: Some(tenant_daily),
        budget_total: Some(tenant_daily * 3),
        ..Default::default()
    };
    let key = SubjectSettings {
        budget_daily: Some(key_daily),
        ..Default::default()
    };
    Principal::flatten(
        PrincipalIds {
            tenant_id: 1,
            tenant_name: "t".into(),
            key_id,
            key_prefix: format!("nz_{key_id:09}"),
            key_name: "k".into(),
        },
        None,
        &tenant,
        &key,
    )
}

async fn redis() -> Client {
    redis_at(&common::require_env("NZ_TEST_REDIS_URL")).await
}

async fn redis_at(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).expect("redis url"))
        .build()
        .expect("redis client");
    client.init().await.expect("connect to the test redis");
    client
}

/// Counters as a seed would leave them: known, zero.
async fn fresh_counters(redis: &Client, hash: &str, periods: &Periods) {
    let fields: Vec<(String, String)> = vec![
        ("ds".into(), periods.day_stamp()),
        ("d".into(), "0".into()),
        ("ms".into(), periods.month_stamp()),
        ("m".into(), "0".into()),
        ("t".into(), "0".into()),
        ("rsum".into(), "0".into()),
    ];
    let _: () = redis.hset(hash, fields).await.expect("hset");
}

struct Open {
    key: usize,
    limiter: usize,
    admission: Admission,
    bound: u64,
    cap: u64,
}

fn limiter(redis: &Client, ns: &str, min_output: u64, settle_after: Duration) -> Limiter {
    let url = common::require_env("NZ_TEST_REDIS_URL");
    limiter_on(&url, redis, ns, min_output, settle_after)
}

/// [`limiter`] on the Redis at `url` (`redis` is a client of the same server).
fn limiter_on(
    url: &str,
    redis: &Client,
    ns: &str,
    min_output: u64,
    settle_after: Duration,
) -> Limiter {
    let config = config(ns, min_output, settle_after);
    let redis = LimiterRedis::new(redis.clone(), url, config.redis_timeout).expect("script pool");
    Limiter::new(redis, Arc::new(LeaseBook::default()), None, config)
}

fn config(ns: &str, min_output: u64, settle_after: Duration) -> LimiterConfig {
    LimiterConfig {
        fail_open: false,
        mode: BudgetMode::Reserve,
        min_output,
        default_output: 64,
        budget_default_output: 200,
        ns: ns.to_string(),
        retry_busy: false,
        redis_timeout: Duration::from_secs(2),
        settle_after,
    }
}

/// Key 21: one concurrent request allowed, and a daily budget.
fn one_at_a_time(daily: i64) -> Principal {
    one_at_a_time_key(21, daily)
}

fn one_at_a_time_key(key_id: i64, daily: i64) -> Principal {
    let key = SubjectSettings {
        max_concurrent: Some(1),
        budget_daily: Some(daily),
        ..Default::default()
    };
    Principal::flatten(
        PrincipalIds {
            tenant_id: 2,
            tenant_name: "t".into(),
            key_id,
            key_prefix: format!("nz_{key_id:09}"),
            key_name: "k".into(),
        },
        None,
        &SubjectSettings::default(),
        &key,
    )
}

fn demand(periods: Periods) -> Demand {
    Demand {
        prompt_bound: 10,
        output_cap: Some(20),
        periods,
        event_id: uuid::Uuid::new_v4(),
    }
}

async fn used_today(redis: &Client, hash: &str) -> (Option<i64>, Option<i64>) {
    let fields: std::collections::HashMap<String, String> =
        redis.hgetall(hash).await.expect("hgetall");
    let get = |f: &str| fields.get(f).and_then(|v| v.parse::<i64>().ok());
    (get("d"), get("rsum"))
}

/// A limiter in a namespace of its own, whose flusher waits `settle_after`, and key 21's fresh
/// budget hash.
struct Carrying {
    redis: Client,
    periods: Periods,
    ns: String,
    hash: String,
    limiter: Limiter,
    queue: Arc<SettleQueue>,
}

async fn carrying(settle_after: Duration) -> Carrying {
    let redis = redis().await;
    let periods = Periods::at(chrono::Utc::now());
    let ns = format!("carry-{}", uuid::Uuid::new_v4().simple());
    let hash = format!("{ns}:bu:k:21");
    fresh_counters(&redis, &hash, &periods).await;
    let limiter = limiter(&redis, &ns, 1, settle_after);
    let queue = limiter.settlements().expect("queue");
    Carrying {
        redis,
        periods,
        ns,
        hash,
        limiter,
        queue,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_admission_puts_its_carried_settlement_back() {
    // A private Redis, frozen while the admission waits: its reply cannot come early.
    let server = common::Redis::start();
    let redis = redis_at(&server.url).await;
    let periods = Periods::at(chrono::Utc::now());
    fresh_counters(&redis, "cancel:bu:k:21", &periods).await;
    let limiter = limiter_on(&server.url, &redis, "cancel", 1, Duration::from_secs(600));
    let queue = limiter.settlements().expect("queue");
    let key = one_at_a_time(1000);
    let first = limiter.admit(&key, &demand(periods)).await;
    limiter.settle(first.expect("admitted").expect("limits apply"), 7);
    server.freeze(true);
    // Polled once, the next admission takes the settlement, writes its call and waits for the
    // reply; dropped there, it is a request cancelled mid-admission.
    let second = demand(periods);
    let mut next = Box::pin(limiter.admit(&key, &second));
    let waiting =
        std::future::poll_fn(|cx| std::task::Poll::Ready(next.as_mut().poll(cx).is_pending()))
            .await;
    assert!(
        waiting,
        "Redis is frozen: the admission waits for its reply"
    );
    drop(next);
    server.freeze(false);
    assert_eq!(queue.outstanding(), 1, "the settlement is not lost");
    // Queued again: the shutdown drain sends it.
    flush(&limiter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_admission_carries_the_previous_settlement() {
    // No flusher within the test: only an admission can send the settlement.
    let c = carrying(Duration::from_secs(600)).await;
    let key = one_at_a_time(1000);
    let first = c.limiter.admit(&key, &demand(c.periods)).await;
    let first = first.expect("admitted").expect("limits apply");
    c.limiter.settle(first, 7);
    assert_eq!(c.queue.outstanding(), 1);
    // Still in the queue: the slot and the reservation (10 + 20) are held in Redis.
    assert_eq!(used_today(&c.redis, &c.hash).await, (Some(0), Some(30)));
    // The one concurrency slot is free for the second request only because its own call
    // settled the first before checking.
    let second = c.limiter.admit(&key, &demand(c.periods)).await;
    let second = second.expect("admitted after the carried settlement");
    assert_eq!(
        c.queue.outstanding(),
        0,
        "the admission carried the settlement"
    );
    assert_eq!(used_today(&c.redis, &c.hash).await, (Some(7), Some(30)));
    c.limiter.settle(second.expect("limits apply"), 3);
    flush(&c.limiter).await;
    assert_eq!(used_today(&c.redis, &c.hash).await, (Some(10), Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_admission_still_settles_what_it_carried_once() {
    let c = carrying(Duration::from_secs(600)).await;
    fresh_counters(&c.redis, &format!("{}:bu:k:22", c.ns), &c.periods).await;
    let first = c
        .limiter
        .admit(&one_at_a_time(1000), &demand(c.periods))
        .await;
    c.limiter
        .settle(first.expect("admitted").expect("limits apply"), 7);
    // Key 22's lease set is not a sorted set: its admission raises inside the script, after
    // the call has settled key 21's request.
    let _: () = c
        .redis
        .set(format!("{}:rl:k:22:c", c.ns), "broken", None, None, false)
        .await
        .expect("set");
    let refused = c
        .limiter
        .admit(&one_at_a_time_key(22, 1000), &demand(c.periods))
        .await;
    assert!(
        matches!(refused, Err(LimitError::Unavailable { budgets: true })),
        "{refused:?}"
    );
    assert_eq!(
        c.queue.outstanding(),
        0,
        "the script answered: nothing to resend"
    );
    assert_eq!(used_today(&c.redis, &c.hash).await, (Some(7), Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instance_settles_within_moments() {
    let c = carrying(FLUSH_AFTER).await;
    let key = one_at_a_time(1000);
    for used in [5, 9] {
        let admission = c.limiter.admit(&key, &demand(c.periods)).await;
        c.limiter
            .settle(admission.expect("admitted").expect("limits apply"), used);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while c.queue.outstanding() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        c.queue.outstanding(),
        0,
        "the flusher sent the last settlement"
    );
    assert_eq!(used_today(&c.redis, &c.hash).await, (Some(14), Some(0)));
}

/// Sends the limiter's queued settlements and returns once Redis has them.
async fn flush(limiter: &Limiter) {
    // The in-process limiter settles at once.
    let Some(queue) = limiter.settlements() else {
        return;
    };
    queue
        .drain(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(queue.outstanding(), 0, "settlements left unsent");
}

/// Budgets of one case and what each key used.
struct Case {
    key_budgets: [i64; 2],
    tenant_budget: i64,
    used: [i64; 2],
}

/// Random admissions and settlements of two keys of one tenant over `limiters` (any of them
/// admits, the one that admitted settles); after every step, asserts that no budget is
/// overshot. Ends with everything settled.
async fn interleave(seed: u64, rng: &mut Rng, limiters: &[Limiter], periods: Periods) -> Case {
    let tenant_budget = rng.range(150, 1200) as i64;
    let key_budgets = [rng.range(100, 900) as i64, rng.range(100, 900) as i64];
    let keys = [
        principal(11, key_budgets[0], tenant_budget),
        principal(12, key_budgets[1], tenant_budget),
    ];
    let mut open: Vec<Open> = Vec::new();
    let mut used = [0i64; 2];
    let (mut admitted, mut refused) = (0, 0);
    let n = limiters.len() as u64;
    for step in 0..STEPS {
        let admit = open.is_empty() || (rng.below(100) < 55 && open.len() < 12);
        if admit {
            let key = rng.below(2) as usize;
            let limiter = rng.below(n) as usize;
            let bound = rng.range(1, 60);
            let requested = (rng.below(10) >= 3).then(|| rng.range(1, 120));
            let demand = Demand {
                prompt_bound: bound,
                output_cap: requested,
                periods,
                event_id: uuid::Uuid::new_v4(),
            };
            match limiters[limiter].admit(&keys[key], &demand).await {
                Ok(Some(admission)) => {
                    let cap = admission
                        .clamp_output
                        .or(requested)
                        .expect("a budgeted request always has a cap");
                    admitted += 1;
                    open.push(Open {
                        key,
                        limiter,
                        admission,
                        bound,
                        cap,
                    });
                }
                Err(LimitError::Budget { .. } | LimitError::BudgetBusy { .. }) => refused += 1,
                other => panic!("seed {seed} step {step}: unexpected {other:?}"),
            }
        } else {
            let o = open.swap_remove(rng.below(open.len() as u64) as usize);
            // What Ollama may use: at most the prompt bound and the cap it was given.
            let actual = rng.range(0, o.bound) + rng.range(0, o.cap);
            limiters[o.limiter].settle(o.admission, actual);
            used[o.key] += actual as i64;
        }
        // Settlements to Redis wait for the next admission of their instance, or the flusher;
        // now and then this sends them at once, so every order of the two gets tried.
        if rng.below(4) == 0 {
            flush(&limiters[rng.below(n) as usize]).await;
        }
        for k in 0..2 {
            assert!(
                used[k] <= key_budgets[k],
                "seed {seed} step {step}: key {k} used {} of {}",
                used[k],
                key_budgets[k]
            );
        }
        assert!(
            used[0] + used[1] <= tenant_budget,
            "seed {seed} step {step}: tenant used {} of {tenant_budget}",
            used[0] + used[1]
        );
    }
    for o in open.drain(..) {
        let actual = rng.range(0, o.bound) + rng.range(0, o.cap);
        limiters[o.limiter].settle(o.admission, actual);
        used[o.key] += actual as i64;
    }
    for limiter in limiters {
        flush(limiter).await;
    }
    assert!(
        admitted > 0 && refused > 0,
        "seed {seed}: both outcomes exercised ({admitted}/{refused})"
    );
    Case {
        key_budgets,
        tenant_budget,
        used,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_interleaving_of_reserve_and_settle_overshoots_a_budget() {
    let redis = redis().await;
    let periods = Periods::at(chrono::Utc::now());
    for seed in 1..=CASES {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let ns = format!("prop-{}", uuid::Uuid::new_v4().simple());
        let limiters: Vec<Limiter> = (0..2)
            .map(|_| limiter(&redis, &ns, rng.range(1, 4), FLUSH_AFTER))
            .collect();
        for hash in ["k:11", "k:12", "t:1"] {
            fresh_counters(&redis, &format!("{ns}:bu:{hash}"), &periods).await;
        }
        let case = interleave(seed, &mut rng, &limiters, periods).await;
        let used = case.used;
        for (hash, expect) in [
            ("k:11", used[0]),
            ("k:12", used[1]),
            ("t:1", used[0] + used[1]),
        ] {
            let h = format!("{ns}:bu:{hash}");
            let fields: std::collections::HashMap<String, String> =
                redis.hgetall(&h).await.expect("hgetall");
            let get = |f: &str| fields.get(f).and_then(|v| v.parse::<i64>().ok());
            assert_eq!(get("d"), Some(expect), "seed {seed}: {h} {fields:?}");
            assert_eq!(get("t"), Some(expect), "seed {seed}: {h} {fields:?}");
            assert_eq!(
                get("rsum"),
                Some(0),
                "seed {seed}: reservations left in {h}"
            );
            assert!(
                !fields.keys().any(|f| f.starts_with("r:")),
                "seed {seed}: reservation entries left in {h}: {fields:?}"
            );
        }
    }
}

/// The in-process limiter (no Redis) under the same interleavings: its counters start from a
/// real Postgres (an empty `budget_usage`) and end equal to the usage, with nothing reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_interleaving_overshoots_a_budget_in_process() {
    let db = tokio::task::spawn_blocking(common::fresh_database)
        .await
        .expect("fresh database");
    let db = SecretString::from(db);
    let pool = neuronetz_gateway::store::connect_now(&db)
        .await
        .expect("connect");
    neuronetz_gateway::store::migrate(&pool)
        .await
        .expect("migrations");
    let store = Arc::new(Store::new(&db, 2).expect("store"));
    let spool = tempfile::tempdir().expect("spool dir");
    let pipeline = Arc::new(Pipeline::new(spool.path().to_path_buf()));
    let periods = Periods::at(chrono::Utc::now());
    for seed in 1..=CASES {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let local = Arc::new(LocalLimits::new(store.clone(), pipeline.clone()));
        let config = config("local", rng.range(1, 4), FLUSH_AFTER);
        let limiters = [Limiter::in_process(local.clone(), config)];
        let case = interleave(seed, &mut rng, &limiters, periods).await;
        let used = case.used;
        assert!(used[0] <= case.key_budgets[0] && used[1] <= case.key_budgets[1]);
        assert!(used[0] + used[1] <= case.tenant_budget);
        for (scope, expect) in [
            (ScopeName { tag: "k", id: 11 }, used[0]),
            (ScopeName { tag: "k", id: 12 }, used[1]),
            (ScopeName { tag: "t", id: 1 }, used[0] + used[1]),
        ] {
            let c = local.counters(scope).expect("seeded counters");
            assert_eq!(c.used_day, expect, "seed {seed}: {scope:?} {c:?}");
            assert_eq!(c.used_total, expect, "seed {seed}: {scope:?} {c:?}");
            assert_eq!(
                c.in_flight, 0,
                "seed {seed}: reservations left in {scope:?}"
            );
        }
    }
}
