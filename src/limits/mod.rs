//! Rate limits and budgets (SPEC §5, §6): requests per minute, tokens per minute, concurrent
//! requests and daily/monthly/total token budgets, per key and per tenant, all decided in one
//! atomic Redis round trip (a Lua script via EVALSHA, reloaded on NOSCRIPT) and settled with the
//! actual token count after the response: the settlement is queued and rides on the instance's
//! next admission call, or a flusher sends it after a few milliseconds ([`settlement`]). Several
//! gateway instances sharing one Redis enforce one limit together.
//!
//! Minute windows slide: two 60 s buckets, the previous one weighted by the part of it that
//! still overlaps the last minute (the estimate pingora-limits uses). Tokens cannot be known in
//! advance, so one reservation R = prompt bound + output cap is charged to the TPM windows and
//! the budgets at admission and corrected to the actual count at settlement. In reserve mode the
//! output cap is clamped to what the tightest budget has left after every reservation in
//! flight, so the sum of actual usage never exceeds a budget. Concurrency slots and budget
//! reservations are leases in sorted sets scored by expiry; each instance renews its own every
//! few seconds, so a crashed instance's slots and reservations lapse after [`LEASE_TTL`].
//!
//! Budget counters live in one Redis hash per key and per tenant; Postgres (`budget_usage`,
//! written by the audit sidecar) holds the durable usage they are re-seeded from when Redis
//! has lost them ([`seed`]).

pub mod keys;
pub mod leases;
pub mod local;
pub mod reservation;
pub mod seed;
pub mod settlement;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::{Client, SortedSetsInterface};

use crate::clock::{self, Periods};
use crate::log_throttle::LogEvery;
use crate::principal::{Principal, ScopeLimits};
use crate::redis_link::bounded;
use crate::redis_script::{Arg, ScriptError, ScriptPool};
use crate::settings::BudgetMode;
use keys::{AdmissionKeys, KeyNames, KeySet, MAX_KEYS, ScopeName};
use leases::LeaseBook;
use local::{LocalHold, LocalLimits};
use seed::{SeedOutcome, SeedTarget, Seeder};
use settlement::{Charge, MAX_CARRIED, SettleQueue, Settlement};

/// How long a concurrency lease or budget reservation lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// One script settles and admits: limits.lua calls the functions the two files before it define.
pub const LIMITS_LUA: &str = concat!(
    include_str!("settle.lua"),
    include_str!("admit.lua"),
    include_str!("limits.lua")
);
/// Largest token amount sent to Redis (2^40): far above any real limit, far below where Lua
/// numbers lose integer precision.
const MAX_TOKENS: u64 = 1 << 40;
/// Waits before admitting again when only reservations of requests in flight fill a budget.
const BUSY_RETRIES: [Duration; 3] = [
    Duration::from_millis(20),
    Duration::from_millis(50),
    Duration::from_millis(100),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Tenant,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Tenant => "tenant",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Daily,
    Monthly,
    Total,
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Daily => "daily",
            BudgetPeriod::Monthly => "monthly",
            BudgetPeriod::Total => "total",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    Exceeded {
        scope: Scope,
        kind: LimitKind,
        limit: i64,
        retry_after: Duration,
    },
    /// A budget has no room for this request; `retry_after` is the period's end (none for a
    /// spent total budget).
    Budget {
        scope: Scope,
        period: BudgetPeriod,
        limit: i64,
        retry_after: Option<Duration>,
    },
    /// The budget has room, but requests in flight have reserved it: retry in a moment.
    BudgetBusy { scope: Scope },
    /// Redis lost the budget counters; they are being re-seeded from Postgres.
    Reseeding,
    /// Redis could not decide and limits fail closed (budgets always do).
    Unavailable { budgets: bool },
}

/// OpenAI-style `x-ratelimit-*` values of the tightest applicable limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<(i64, i64)>,
    pub tokens: Option<(i64, i64)>,
    /// Seconds until the current minute bucket rolls over.
    pub reset_secs: u64,
}

/// What a request may consume, known before it is forwarded.
#[derive(Debug, Clone)]
pub struct Demand {
    /// A strict upper bound on its prompt tokens ([`reservation::prompt_bound`]).
    pub prompt_bound: u64,
    /// Its own output cap after the policy clamps; `None` = unlimited, `Some(0)` for routes that
    /// generate nothing.
    pub output_cap: Option<u64>,
    /// The budget periods it is charged to.
    pub periods: Periods,
    /// Names its usage across Redis, the audit row and `budget_usage`.
    pub event_id: uuid::Uuid,
}

/// An admitted request's charges, kept in the CTX until settlement.
#[derive(Debug, Clone)]
pub struct Admission {
    hold: Hold,
    reserved: u64,
    day: i64,
    month: i64,
    event_id: uuid::Uuid,
    /// The output cap a budget imposes, when it is tighter than the request's own: the
    /// forwarded body must carry it.
    pub clamp_output: Option<u64>,
    pub headers: RateHeaders,
}

/// Where an admission's charges are held, for its settlement.
#[derive(Debug, Clone)]
enum Hold {
    /// Keys in Redis, and the leases this instance renews.
    Redis(Arc<AdmissionKeys>),
    /// Counters of this process.
    Local(LocalHold),
}

/// Where the counters live.
enum Backend {
    /// Shared by every instance on that Redis.
    Redis(LimiterRedis),
    /// This process's memory: one instance alone (no `REDIS_URL`).
    Local(Arc<LocalLimits>),
}

/// One admission's inputs, the same whichever backend decides it (admit.lua's arguments).
struct Ask {
    now_ms: u64,
    minute: u64,
    /// Milliseconds elapsed in `minute`.
    into_minute: u64,
    /// The prompt bound, clamped to [`MAX_TOKENS`].
    bound: u64,
    /// The request's own output cap, clamped.
    own_cap: Option<i64>,
    /// The output cap asked for (-1: none).
    requested: i64,
    /// Output reserved against TPM when nothing caps it.
    default_output: u64,
    /// Fewer output tokens than this fitting in a budget is a refusal.
    minimal: u64,
    day: i64,
    month: i64,
    reserve: bool,
}

/// A backend's answer to an admission (admit.lua's reply, typed).
enum Verdict {
    /// Admitted with this output cap (-1: none); `used` holds requests and tokens per rate
    /// scope (of `rates` scopes), for the headers.
    Admitted {
        cap: i64,
        used: [i64; 4],
        rates: usize,
    },
    /// A rate scope refused (`kind` 1 requests, 2 tokens, 3 concurrency).
    Rate {
        index: usize,
        kind: i64,
        current: i64,
        previous: i64,
    },
    /// A budget scope's counters are missing.
    Reseed(usize),
    /// A budget is spent (`period` 1 day, 2 month, 3 total).
    Budget {
        index: usize,
        period: i64,
        limit: i64,
    },
    /// Only reservations of requests in flight fill the budget.
    Busy(usize),
}

impl Verdict {
    /// The script's reply, when it has one of the shapes admit.lua answers with.
    fn from_reply(reply: &[i64]) -> Option<Verdict> {
        let index = |i: &i64| usize::try_from(*i).unwrap_or(0);
        Some(match reply {
            [0, cap, used @ ..] if used.len() <= 4 => {
                let mut all = [0; 4];
                all[..used.len()].copy_from_slice(used);
                Verdict::Admitted {
                    cap: *cap,
                    used: all,
                    rates: used.len() / 2,
                }
            }
            [1, scope, kind, current, previous] => Verdict::Rate {
                index: index(scope),
                kind: *kind,
                current: *current,
                previous: *previous,
            },
            [2, scope] => Verdict::Reseed(index(scope)),
            [4, scope, _period] => Verdict::Busy(index(scope)),
            [3, scope, period, _used, limit] => Verdict::Budget {
                index: index(scope),
                period: *period,
                limit: *limit,
            },
            _ => return None,
        })
    }
}

/// The limiter's ways to Redis: its script on connections of its own (the request path), and
/// fred for the rare rest (giving back an orphaned lease).
#[derive(Clone)]
pub struct LimiterRedis {
    pub client: Client,
    pub scripts: Arc<ScriptPool>,
}

impl LimiterRedis {
    /// The script pool for `url` (the same as the fred client's), its calls bounded by
    /// `timeout`.
    pub fn new(client: Client, url: &str, timeout: Duration) -> Result<Self, ScriptError> {
        let scripts = Arc::new(ScriptPool::from_url(url, LIMITS_LUA, timeout)?);
        Ok(Self { client, scripts })
    }
}

pub struct Limiter {
    backend: Backend,
    /// Present with Redis: settlements wait there for the next admission's call.
    settlements: Option<Arc<SettleQueue>>,
    /// Random per process; with `admissions` it names each admission's leases uniquely
    /// across instances.
    instance: String,
    admissions: std::sync::atomic::AtomicU64,
    leases: Arc<LeaseBook>,
    seeder: Option<Arc<Seeder>>,
    fail_open: bool,
    mode: BudgetMode,
    min_output: u64,
    default_output: u64,
    budget_default_output: u64,
    retry_busy: bool,
    redis_timeout: Duration,
    warning: LogEvery,
    /// Namespace of the Redis keys (`REDIS_KEY_PREFIX`).
    ns: String,
}

/// How the limiter is configured (from the settings).
pub struct LimiterConfig {
    pub fail_open: bool,
    pub mode: BudgetMode,
    /// Fewer output tokens than this fitting in a budget is a refusal.
    pub min_output: u64,
    /// Output reserved against TPM when nothing caps a request's output.
    pub default_output: u64,
    /// The output cap given to a budgeted request that sets none (reserve mode).
    pub budget_default_output: u64,
    pub ns: String,
    /// Retry a few times, briefly, when only reservations in flight fill a budget.
    pub retry_busy: bool,
    /// Bounds each Redis call (the proxy's connection has no timeout of its own).
    pub redis_timeout: Duration,
    /// How long a settlement waits for an admission to carry it ([`settlement::FLUSH_AFTER`]).
    pub settle_after: Duration,
}

struct RateScope<'a> {
    scope: Scope,
    name: ScopeName,
    limits: &'a ScopeLimits,
}

struct BudgetScope<'a> {
    scope: Scope,
    name: ScopeName,
    tenant_id: i64,
    limits: &'a ScopeLimits,
}

impl BudgetScope<'_> {
    /// What the seeder restores when Redis has lost this scope's counters.
    fn target(&self, ns: &str) -> SeedTarget {
        SeedTarget {
            hash: KeyNames::usage_hash(ns, self.name),
            scope: self.scope,
            tenant_id: self.tenant_id,
            key_id: if self.scope == Scope::Key {
                self.name.id
            } else {
                0
            },
        }
    }
}

fn limit_arg(v: Option<i64>) -> i64 {
    v.unwrap_or(-1)
}

fn has_rate(l: &ScopeLimits) -> bool {
    l.rpm.is_some() || l.tpm.is_some() || l.max_concurrent.is_some()
}

fn has_budget(l: &ScopeLimits) -> bool {
    l.budget_daily.is_some() || l.budget_monthly.is_some() || l.budget_total.is_some()
}

/// Whether any TPM limit or budget needs a request's prompt bound.
pub fn counts_tokens(p: &Principal) -> bool {
    [&p.key_limits, &p.tenant_limits]
        .iter()
        .any(|l| l.tpm.is_some() || has_budget(l))
}

impl Limiter {
    /// The limiter on Redis, shared by every instance on it.
    pub fn new(
        redis: LimiterRedis,
        leases: Arc<LeaseBook>,
        seeder: Option<Arc<Seeder>>,
        config: LimiterConfig,
    ) -> Self {
        let settlements =
            SettleQueue::new(redis.scripts.clone(), config.settle_after, leases.clone());
        let backend = Backend::Redis(redis);
        Self::with_backend(backend, Some(settlements), leases, seeder, config)
    }

    /// The limiter on this process's counters, for a gateway running alone without Redis.
    pub fn in_process(local: Arc<LocalLimits>, config: LimiterConfig) -> Self {
        let leases = Arc::new(LeaseBook::default());
        Self::with_backend(Backend::Local(local), None, leases, None, config)
    }

    fn with_backend(
        backend: Backend,
        settlements: Option<Arc<SettleQueue>>,
        leases: Arc<LeaseBook>,
        seeder: Option<Arc<Seeder>>,
        config: LimiterConfig,
    ) -> Self {
        Self {
            backend,
            settlements,
            instance: format!("{:016x}", uuid::Uuid::new_v4().as_u64_pair().0),
            admissions: std::sync::atomic::AtomicU64::new(0),
            leases,
            seeder,
            fail_open: config.fail_open,
            mode: config.mode,
            min_output: config.min_output,
            default_output: config.default_output,
            budget_default_output: config.budget_default_output,
            retry_busy: config.retry_busy,
            redis_timeout: config.redis_timeout,
            warning: LogEvery::new(Duration::from_secs(30)),
            ns: config.ns,
        }
    }

    fn scopes<'a>(&self, p: &'a Principal) -> (Vec<RateScope<'a>>, Vec<BudgetScope<'a>>) {
        let both = [
            (Scope::Key, "k", p.key_id, &p.key_limits),
            (Scope::Tenant, "t", p.tenant_id, &p.tenant_limits),
        ];
        let rates = both
            .iter()
            .filter(|(_, _, _, l)| has_rate(l))
            .map(|(scope, tag, id, limits)| RateScope {
                scope: *scope,
                name: ScopeName { tag, id: *id },
                limits,
            })
            .collect();
        let budgets = both
            .iter()
            .filter(|(_, _, _, l)| has_budget(l))
            .map(|(scope, tag, id, limits)| BudgetScope {
                scope: *scope,
                name: ScopeName { tag, id: *id },
                tenant_id: p.tenant_id,
                limits,
            })
            .collect();
        (rates, budgets)
    }

    /// Checks and charges every limit and budget of the key and its tenant. `Ok(None)`: none
    /// applies (no Redis round trip), or Redis is down and rate limits fail open.
    pub async fn admit(
        &self,
        p: &Principal,
        demand: &Demand,
    ) -> Result<Option<Admission>, LimitError> {
        let (rates, mut budgets) = self.scopes(p);
        // Listings, `/api/show`, `/api/version` spend no tokens: budgets neither refuse nor
        // reserve anything for them (rate limits still count them).
        if demand.prompt_bound == 0 && demand.output_cap == Some(0) {
            budgets.clear();
        }
        if let Backend::Local(local) = &self.backend {
            local.forget(&unbudgeted(p));
        }
        if rates.is_empty() && budgets.is_empty() {
            return Ok(None);
        }
        // Each missing budget scope may need a seed; requests in flight may briefly hold a
        // budget's room (their settlement is under way): a few quick retries, then an answer.
        let mut busy_waits = BUSY_RETRIES.iter().filter(|_| self.retry_busy);
        for _ in 0..=budgets.len() + BUSY_RETRIES.len() {
            let reply = match self.try_admit(&rates, &budgets, demand).await {
                // Boxed, as a rare path: its future would enlarge every admission's.
                Err(Reply::Reseed(index)) => Box::pin(self.reseed(&budgets, index)).await,
                Err(Reply::Busy(index)) => match busy_waits.next() {
                    Some(wait) => {
                        tokio::time::sleep(*wait).await;
                        continue;
                    }
                    None => Err(Reply::Busy(index)),
                },
                other => other,
            };
            match reply {
                Err(Reply::Seeded) => continue,
                Err(Reply::Error(budgets)) => return self.unavailable(budgets, "redis error"),
                other => return other.map_err(|r| self.refusal(r, &rates, &budgets)),
            }
        }
        Err(LimitError::Reseeding)
    }

    /// Counters missing: a scope never used since Redis started is restored right away; after
    /// a real loss the seeder waits for in-flight usage, and this request gets 503.
    async fn reseed(
        &self,
        budgets: &[BudgetScope<'_>],
        index: usize,
    ) -> Result<Option<Admission>, Reply> {
        let Some(b) = budgets.get(index) else {
            return Err(Reply::Reseed(index));
        };
        if let Backend::Local(local) = &self.backend {
            return match local.seed(&b.target(&self.ns), b.name).await {
                Ok(()) => Err(Reply::Seeded),
                Err(seed::SeedError::PipelineBusy) => Err(Reply::Reseed(index)),
                Err(e) => {
                    self.warning
                        .warn(|| tracing::warn!(error = %e, "budget counters could not be read"));
                    Err(Reply::Error(true))
                }
            };
        }
        let Some(seeder) = self.seeder.as_ref() else {
            return Err(Reply::Reseed(index));
        };
        match seeder
            .seed_if_fresh(&b.target(&self.ns), clock::now())
            .await
        {
            SeedOutcome::Seeded => Err(Reply::Seeded),
            SeedOutcome::Pending => Err(Reply::Reseed(index)),
            SeedOutcome::Failed => Err(Reply::Error(true)),
        }
    }

    async fn try_admit(
        &self,
        rates: &[RateScope<'_>],
        budgets: &[BudgetScope<'_>],
        demand: &Demand,
    ) -> Result<Option<Admission>, Reply> {
        let ask = self.ask(demand, !budgets.is_empty());
        match &self.backend {
            Backend::Redis(redis) => {
                self.try_admit_redis(redis, &ask, rates, budgets, demand)
                    .await
            }
            Backend::Local(local) => {
                let (verdict, hold) = local.admit(&ask, rates, budgets);
                self.conclude(&ask, verdict, rates, budgets, demand, || {
                    Hold::Local(hold.unwrap_or_default())
                })
            }
        }
    }

    /// The admission's inputs at this moment.
    fn ask(&self, demand: &Demand, budgeted: bool) -> Ask {
        let now_ms = now_ms();
        let reserve = self.mode == BudgetMode::Reserve;
        let own_cap = demand.output_cap.map(|c| c.min(MAX_TOKENS) as i64);
        // A budgeted request without a cap gets the default one rather than all that is left.
        let requested = match own_cap {
            Some(c) => c,
            None if reserve && budgeted => self.budget_default_output.min(MAX_TOKENS) as i64,
            None => -1,
        };
        Ask {
            now_ms,
            minute: now_ms / 60_000,
            into_minute: now_ms % 60_000,
            // Bounded so integer arithmetic stays exact whatever a client asks for.
            bound: demand.prompt_bound.min(MAX_TOKENS),
            own_cap,
            requested,
            default_output: self.default_output.min(MAX_TOKENS),
            minimal: if requested == 0 { 0 } else { self.min_output },
            day: demand.periods.day_number(),
            month: demand.periods.month_number(),
            reserve,
        }
    }

    async fn try_admit_redis(
        &self,
        redis: &LimiterRedis,
        ask: &Ask,
        rates: &[RateScope<'_>],
        budgets: &[BudgetScope<'_>],
        demand: &Demand,
    ) -> Result<Option<Admission>, Reply> {
        // Unique per admission (not the request id: a client may reuse one for concurrent
        // requests) and short: Redis stores it in up to four sets and hashes per request.
        let n = self
            .admissions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let member = format!("{}:{n:x}", self.instance);
        // A principal has a key scope and a tenant scope; the key layout holds no more.
        debug_assert!(rates.len() <= 2 && budgets.len() <= 2);
        let names = KeyNames::admission(
            &self.ns,
            rates.iter().map(|s| s.name),
            budgets.iter().map(|b| b.name),
            ask.minute,
        );
        // Numbers go to Redis without a string each (`Arg::Int`).
        let mut args = vec![
            Arg::Int(ask.now_ms as i64),
            Arg::Int(ask.into_minute as i64),
            Arg::Int(ask.bound as i64),
            Arg::Int(ask.requested),
            Arg::Int(ask.default_output as i64),
            Arg::Int(ask.minimal as i64),
            Arg::Str(&member),
            Arg::Int((ask.now_ms + LEASE_TTL.as_millis() as u64) as i64),
            Arg::Int(ask.day),
            Arg::Int(ask.month),
            Arg::Int(i64::from(ask.reserve)),
            Arg::Int(rates.len() as i64),
        ];
        for s in rates {
            args.push(Arg::Int(limit_arg(s.limits.rpm)));
            args.push(Arg::Int(limit_arg(s.limits.tpm)));
            args.push(Arg::Int(limit_arg(s.limits.max_concurrent)));
        }
        for b in budgets {
            // Clamped like every other amount, so Lua arithmetic stays in exact integers.
            for limit in [
                b.limits.budget_daily,
                b.limits.budget_monthly,
                b.limits.budget_total,
            ] {
                args.push(Arg::Int(limit_arg(limit.map(|l| l.min(MAX_TOKENS as i64)))));
            }
        }
        let mut refs = [""; MAX_KEYS];
        for (r, k) in refs.iter_mut().zip(names.all()) {
            *r = k;
        }
        let key_refs = &refs[..names.len()];
        // Settlements this instance has queued ride on this call, settled before the checks;
        // taken once the call has its connection, so that no connect comes between the take
        // and the write (see "Settlements" in docs/architecture.md).
        let connection = redis.scripts.connection().await;
        let carried = match &connection {
            Ok(_) => self.settlements.as_ref().map(|q| (q, q.take(MAX_CARRIED))),
            Err(_) => None,
        };
        let result = match (connection, &carried) {
            (Ok(connection), Some((_, c))) => {
                let (all_keys, all_args) = c.call(key_refs, &args);
                connection.call(&all_keys, &all_args).await
            }
            (Ok(connection), None) => connection.call(key_refs, &args).await,
            (Err(e), _) => Err(e),
        };
        // The script answered: it settled what it carried, even when the admission failed.
        if let Some((queue, carried)) = carried {
            match &result {
                Ok(_) => queue.done(carried),
                Err(e) => queue.failed(carried, e),
            }
        }
        let result = result.and_then(|reply| match reply.as_slice() {
            [6] => Err(ScriptError::Redis(
                "the admission script raised an error (see the Redis log)".into(),
            )),
            _ => Ok(reply),
        });
        let reply: Vec<i64> = match result {
            Ok(r) => r,
            Err(e) => {
                crate::metrics::store_error("redis", "limits");
                self.warning
                    .warn(|| tracing::warn!(error = %e, "rate limiter unavailable (redis)"));
                // The script may have run before the reply was lost (a timeout): give back the
                // lease and reservation it may have taken. Its request and token charges stay
                // (over-counting errs on the safe side and expires with the window).
                self.release_orphan(&redis.client, rates, &names, &member);
                return Err(Reply::Error(!budgets.is_empty()));
            }
        };
        let Some(verdict) = Verdict::from_reply(&reply) else {
            return Err(Reply::Error(!budgets.is_empty()));
        };
        self.conclude(ask, verdict, rates, budgets, demand, || {
            let renewed = renewed_sets(&names, rates, ask.reserve);
            let keys = Arc::new(AdmissionKeys {
                names,
                member,
                id: n,
                renewed,
            });
            if !renewed.is_empty() {
                self.leases.hold(&keys);
            }
            Hold::Redis(keys)
        })
    }

    /// The admission a verdict grants (`hold` says where its charges are), or its refusal.
    fn conclude(
        &self,
        ask: &Ask,
        verdict: Verdict,
        rates: &[RateScope<'_>],
        budgets: &[BudgetScope<'_>],
        demand: &Demand,
        hold: impl FnOnce() -> Hold,
    ) -> Result<Option<Admission>, Reply> {
        let refusal = match verdict {
            Verdict::Admitted {
                cap,
                used,
                rates: n,
            } => {
                let output = if cap >= 0 {
                    cap as u64
                } else {
                    ask.default_output
                };
                // The body must carry the cap when the request had none, or a smaller one.
                let clamp_output = (!budgets.is_empty() && ask.reserve && cap >= 0)
                    .then_some(cap as u64)
                    .filter(|c| ask.own_cap.is_none_or(|own| (*c as i64) < own));
                let reset_secs = 60 - ask.into_minute / 1000;
                return Ok(Some(Admission {
                    hold: hold(),
                    reserved: ask.bound + output,
                    day: ask.day,
                    month: ask.month,
                    event_id: demand.event_id,
                    clamp_output,
                    headers: headers(rates, &used[..n * 2], reset_secs),
                }));
            }
            Verdict::Rate {
                index,
                kind,
                current,
                previous,
            } => Reply::Rate {
                index,
                kind,
                current,
                previous,
                frac: ask.into_minute as f64 / 60_000.0,
                reservation: ask.bound,
            },
            Verdict::Reseed(index) => Reply::Reseed(index),
            Verdict::Budget {
                index,
                period,
                limit,
            } => Reply::Budget {
                index,
                period,
                limit,
            },
            Verdict::Busy(index) => Reply::Busy(index),
        };
        Err(refusal)
    }

    fn refusal(
        &self,
        reply: Reply,
        rates: &[RateScope<'_>],
        budgets: &[BudgetScope<'_>],
    ) -> LimitError {
        match reply {
            Reply::Rate {
                index,
                kind,
                current,
                previous,
                frac,
                reservation,
            } => {
                let Some(s) = rates.get(index).or(rates.first()) else {
                    return LimitError::Unavailable { budgets: false };
                };
                let (kind, limit, need) = match kind {
                    1 => (LimitKind::Requests, limit_arg(s.limits.rpm), 1),
                    2 => (
                        LimitKind::Tokens,
                        limit_arg(s.limits.tpm),
                        reservation as i64,
                    ),
                    _ => (
                        LimitKind::Concurrency,
                        limit_arg(s.limits.max_concurrent),
                        1,
                    ),
                };
                let retry_after = match kind {
                    LimitKind::Concurrency => Duration::from_secs(1),
                    _ => window_retry_after(limit, current, previous, frac, need),
                };
                LimitError::Exceeded {
                    scope: s.scope,
                    kind,
                    limit,
                    retry_after,
                }
            }
            Reply::Budget {
                index,
                period,
                limit,
            } => {
                let scope = budgets.get(index).map_or(Scope::Key, |b| b.scope);
                let now = clock::now();
                let (period, retry_after) = match period {
                    1 => (
                        BudgetPeriod::Daily,
                        Some(clock::until_period_end(now, false)),
                    ),
                    2 => (
                        BudgetPeriod::Monthly,
                        Some(clock::until_period_end(now, true)),
                    ),
                    _ => (BudgetPeriod::Total, None),
                };
                LimitError::Budget {
                    scope,
                    period,
                    limit,
                    retry_after,
                }
            }
            Reply::Reseed(_) | Reply::Seeded => LimitError::Reseeding,
            Reply::Busy(index) => LimitError::BudgetBusy {
                scope: budgets.get(index).map_or(Scope::Key, |b| b.scope),
            },
            Reply::Error(budgets) => match self.unavailable(budgets, "redis error") {
                Ok(_) => LimitError::Unavailable { budgets },
                Err(e) => e,
            },
        }
    }

    fn release_orphan(
        &self,
        redis: &Client,
        rates: &[RateScope<'_>],
        names: &KeyNames,
        member: &str,
    ) {
        let sets: Vec<String> = renewed_sets(names, rates, true)
            .iter()
            .map(|k| names.get(k).to_string())
            .collect();
        if sets.is_empty() {
            return;
        }
        // A reservation whose set entry is gone lapses at the next admission on that scope.
        let (redis, member, limit) = (redis.clone(), member.to_string(), self.redis_timeout);
        tokio::spawn(async move {
            // The script call that timed out went over another connection and may still wait
            // in Redis's input: a release that ran first would find nothing, and the lease would
            // stay held until it lapses (`LEASE_TTL`). Giving the call as long again as its
            // timeout orders the two in every case but a Redis stalled for longer.
            tokio::time::sleep(limit).await;
            for set in sets {
                let call = redis.zadd::<(), _, _>(
                    set,
                    Some(fred::types::SetOptions::XX),
                    None::<fred::types::sorted_sets::Ordering>,
                    false,
                    false,
                    (0.0, member.as_str()),
                );
                let _ = bounded(limit, call).await;
            }
        });
    }

    /// Budgets fail closed, always; rate limits unless `LIMITS_FAIL_OPEN`.
    fn unavailable(
        &self,
        budgets: bool,
        why: &'static str,
    ) -> Result<Option<Admission>, LimitError> {
        if self.fail_open && !budgets {
            self.warning
                .warn(|| tracing::warn!(why, "rate limits not enforced (LIMITS_FAIL_OPEN=true)"));
            Ok(None)
        } else {
            Err(LimitError::Unavailable { budgets })
        }
    }

    /// Corrects the token buckets and budgets to `actual` tokens and releases the concurrency
    /// lease and budget reservation: queued for the next admission's Redis call, or the
    /// flusher's ([`settlement`]). The lease, and so the reservation, is renewed until Redis
    /// has the settlement.
    pub fn settle(&self, admission: Admission, actual: u64) {
        let actual = actual.min(MAX_TOKENS);
        let keys = match (admission.hold, &self.backend) {
            (Hold::Local(hold), Backend::Local(local)) => {
                let used = local::Used {
                    reserved: admission.reserved,
                    actual,
                    day: admission.day,
                    month: admission.month,
                    event_id: admission.event_id,
                };
                local.settle(&hold, &used);
                return;
            }
            (Hold::Local(_), _) => return,
            (Hold::Redis(keys), _) => keys,
        };
        let Some(queue) = &self.settlements else {
            self.leases.release(keys.id);
            return;
        };
        let charge = Charge {
            reserved: admission.reserved,
            actual,
            day: admission.day,
            month: admission.month,
            event_id: admission.event_id,
            now_ms: now_ms(),
        };
        queue.push(Settlement::new(keys, charge));
    }

    /// Settlements not yet in Redis: shutdown sends them before it closes the connection.
    pub fn settlements(&self) -> Option<Arc<SettleQueue>> {
        self.settlements.clone()
    }
}

/// The script's answer, before it is turned into a [`LimitError`].
enum Reply {
    Rate {
        index: usize,
        kind: i64,
        current: i64,
        previous: i64,
        frac: f64,
        reservation: u64,
    },
    Budget {
        index: usize,
        period: i64,
        limit: i64,
    },
    Reseed(usize),
    /// The counters were just seeded: admit again.
    Seeded,
    Busy(usize),
    /// Redis failed; `true` when budgets were involved (they always fail closed).
    Error(bool),
}

/// The sets whose entry for an admission the lease renewer keeps alive: the concurrency sets
/// of scopes with a limit, and in reserve mode the budgets' reservation sets.
fn renewed_sets(names: &KeyNames, rates: &[RateScope<'_>], reserve: bool) -> KeySet {
    let mut set = KeySet::default();
    for (i, s) in rates.iter().enumerate() {
        if s.limits.max_concurrent.is_some() {
            set.insert(names.lease_set(i));
        }
    }
    if reserve {
        for j in 0..names.budgets() {
            set.insert(names.reservation_set(j));
        }
    }
    set
}

/// The scopes of `p` without any budget (whose in-process counters go stale).
fn unbudgeted(p: &Principal) -> [Option<ScopeName>; 2] {
    let scope = |tag, id, l: &ScopeLimits| (!has_budget(l)).then_some(ScopeName { tag, id });
    [
        scope("k", p.key_id, &p.key_limits),
        scope("t", p.tenant_id, &p.tenant_limits),
    ]
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The tightest remaining allowance across scopes, for the `x-ratelimit-*` headers.
fn headers(scopes: &[RateScope<'_>], used: &[i64], reset_secs: u64) -> RateHeaders {
    let mut h = RateHeaders {
        reset_secs,
        ..RateHeaders::default()
    };
    for (i, s) in scopes.iter().enumerate() {
        let (ru, tu) = (
            used.get(i * 2).copied().unwrap_or(0),
            used.get(i * 2 + 1).copied().unwrap_or(0),
        );
        if let Some(limit) = s.limits.rpm {
            let rem = (limit - ru).max(0);
            if h.requests.is_none_or(|(_, r)| rem < r) {
                h.requests = Some((limit, rem));
            }
        }
        if let Some(limit) = s.limits.tpm {
            let rem = (limit - tu).max(0);
            if h.tokens.is_none_or(|(_, r)| rem < r) {
                h.tokens = Some((limit, rem));
            }
        }
    }
    h
}

/// When enough of the sliding window frees up for `need` more units. Within the current minute
/// the previous bucket's weight shrinks linearly; if that is not enough, the current bucket has
/// to age into the previous one first.
pub fn window_retry_after(
    limit: i64,
    current: i64,
    previous: i64,
    frac: f64,
    need: i64,
) -> Duration {
    let (limit, cur, prev, need) = (limit as f64, current as f64, previous as f64, need as f64);
    let over = prev * (1.0 - frac) + cur + need - limit;
    let secs = if over <= 0.0 {
        1.0
    } else if prev > 0.0 && over <= prev * (1.0 - frac) {
        over / prev * 60.0
    } else {
        let after_roll = ((cur + need - limit) / cur.max(1.0)).max(0.0) * 60.0;
        (1.0 - frac) * 60.0 + after_roll
    };
    Duration::from_secs(secs.ceil().clamp(1.0, 120.0) as u64)
}

/// `x-ratelimit-reset-*` values use OpenAI's duration style (`6m0s`, `12s`).
pub fn reset_value(secs: u64) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_reset_value(&mut out, secs);
    out
}

/// [`reset_value`] written to `out`.
pub fn write_reset_value(out: &mut impl std::fmt::Write, secs: u64) -> std::fmt::Result {
    if secs >= 60 {
        write!(out, "{}m{}s", secs / 60, secs % 60)
    } else {
        write!(out, "{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_follows_the_sliding_window() {
        // 30 of 30 used in the previous minute, nothing yet in this one: one more fits once the
        // previous bucket's weight has dropped by one request (2 s).
        assert_eq!(
            window_retry_after(30, 0, 30, 0.0, 1),
            Duration::from_secs(2)
        );
        // All used in the current minute: wait for the roll, then part of the next minute.
        let d = window_retry_after(30, 30, 0, 0.5, 1);
        assert!(
            d >= Duration::from_secs(30) && d <= Duration::from_secs(33),
            "{d:?}"
        );
        assert_eq!(window_retry_after(30, 0, 0, 0.0, 1), Duration::from_secs(1));
        assert!(window_retry_after(10, 10, 10, 0.1, 100) <= Duration::from_secs(120));
    }

    #[test]
    fn reset_values_look_like_openai() {
        assert_eq!(reset_value(12), "12s");
        assert_eq!(reset_value(360), "6m0s");
    }
}
