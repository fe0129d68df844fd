//! Rate limits (SPEC §5): requests per minute, tokens per minute and concurrent requests, per
//! key and per tenant, decided for all of them in one atomic Redis round trip (a Lua script via
//! EVALSHA, reloaded on NOSCRIPT) and settled with the actual token count in a second one after
//! the response. Several gateway instances sharing one Redis enforce one limit together.
//!
//! Minute windows slide: two 60 s buckets, the previous one weighted by the part of it that
//! still overlaps the last minute (the estimate pingora-limits uses). Tokens cannot be known in
//! advance, so a reservation R (prompt estimate + output cap) is charged at admission and the
//! charged bucket is corrected to the actual count at settlement. Concurrency slots are leases
//! in a sorted set scored by expiry; each instance renews its leases every few seconds, so a
//! crashed instance's slots lapse after [`LEASE_TTL`].

pub mod leases;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::{Client, SortedSetsInterface};
use fred::types::scripts::Script;

use crate::log_throttle::LogEvery;
use crate::principal::{Principal, ScopeLimits};
use leases::LeaseBook;

/// How long a concurrency lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

const ADMIT_LUA: &str = include_str!("admit.lua");
/// Largest token reservation sent to Redis (2^40): far above any real limit, far below where
/// Lua numbers lose integer precision.
const MAX_RESERVATION: u64 = 1 << 40;
const SETTLE_LUA: &str = include_str!("settle.lua");

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    Exceeded {
        scope: Scope,
        kind: LimitKind,
        limit: i64,
        retry_after: Duration,
    },
    /// Redis could not decide and limits fail closed.
    Unavailable,
}

/// OpenAI-style `x-ratelimit-*` values of the tightest applicable limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<(i64, i64)>,
    pub tokens: Option<(i64, i64)>,
    /// Seconds until the current minute bucket rolls over.
    pub reset_secs: u64,
}

/// An admitted request's charges, kept in the CTX until settlement.
#[derive(Debug, Clone)]
pub struct Admission {
    member: String,
    token_keys: Vec<String>,
    lease_keys: Vec<String>,
    reserved: u64,
    pub headers: RateHeaders,
}

pub struct Limiter {
    redis: Option<Client>,
    admit: Script,
    settle: Script,
    instance: String,
    leases: Arc<LeaseBook>,
    fail_open: bool,
    warning: LogEvery,
    /// Namespace of the Redis keys (`REDIS_KEY_PREFIX`).
    ns: String,
}

struct ScopeArgs<'a> {
    scope: Scope,
    prefix: String,
    limits: &'a ScopeLimits,
}

fn limit_arg(v: Option<i64>) -> i64 {
    v.unwrap_or(-1)
}

impl Limiter {
    pub fn new(redis: Option<Client>, leases: Arc<LeaseBook>, fail_open: bool, ns: &str) -> Self {
        Self {
            redis,
            admit: Script::from_lua(ADMIT_LUA),
            settle: Script::from_lua(SETTLE_LUA),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            leases,
            fail_open,
            warning: LogEvery::new(Duration::from_secs(30)),
            ns: ns.to_string(),
        }
    }

    /// Checks and charges every limit of the key and its tenant. `Ok(None)`: no limit applies
    /// (no Redis round trip), or Redis is down and limits fail open.
    pub async fn admit(
        &self,
        p: &Principal,
        reservation: u64,
        request_id: &str,
    ) -> Result<Option<Admission>, LimitError> {
        let scopes: Vec<ScopeArgs> = [
            (
                Scope::Key,
                format!("{}:rl:k:{}", self.ns, p.key_id),
                &p.key_limits,
            ),
            (
                Scope::Tenant,
                format!("{}:rl:t:{}", self.ns, p.tenant_id),
                &p.tenant_limits,
            ),
        ]
        .into_iter()
        .filter(|(_, _, l)| l.rpm.is_some() || l.tpm.is_some() || l.max_concurrent.is_some())
        .map(|(scope, prefix, limits)| ScopeArgs {
            scope,
            prefix,
            limits,
        })
        .collect();
        if scopes.is_empty() {
            return Ok(None);
        }
        let Some(redis) = &self.redis else {
            return self.unavailable("REDIS_URL is not set");
        };
        let now_ms = now_ms();
        let minute = now_ms / 60_000;
        let frac = (now_ms % 60_000) as f64 / 60_000.0;
        // Unique per admission: a client choosing the same X-Request-ID for concurrent requests
        // must not share one lease.
        let member = format!(
            "{}:{}:{request_id}",
            self.instance,
            uuid::Uuid::new_v4().simple()
        );
        // Bounded so Redis integer arithmetic stays exact whatever cap a client asks for.
        let reservation = reservation.min(MAX_RESERVATION);
        let mut keys = Vec::with_capacity(scopes.len() * 5);
        let mut args: Vec<String> = vec![
            now_ms.to_string(),
            format!("{frac:.6}"),
            reservation.to_string(),
            member.clone(),
            (now_ms + LEASE_TTL.as_millis() as u64).to_string(),
        ];
        for s in &scopes {
            keys.push(format!("{}:r:{minute}", s.prefix));
            keys.push(format!("{}:r:{}", s.prefix, minute - 1));
            keys.push(format!("{}:t:{minute}", s.prefix));
            keys.push(format!("{}:t:{}", s.prefix, minute - 1));
            keys.push(format!("{}:c", s.prefix));
            args.push(limit_arg(s.limits.rpm).to_string());
            args.push(limit_arg(s.limits.tpm).to_string());
            args.push(limit_arg(s.limits.max_concurrent).to_string());
        }
        let reply: Vec<i64> = match self
            .admit
            .evalsha_with_reload(redis, keys.clone(), args)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                crate::metrics::store_error("redis", "limits");
                self.warning
                    .warn(|| tracing::warn!(error = %e, "rate limiter unavailable (redis)"));
                // The script may have run before the reply was lost (a timeout): give back the
                // lease it may have taken. Its request and token charges stay (over-counting
                // errs on the safe side and expires with the window).
                self.release_orphan_lease(redis, &scopes, &member);
                return self.unavailable("redis error");
            }
        };
        let reset_secs = 60 - (now_ms % 60_000) / 1000;
        match reply.as_slice() {
            [0, used @ ..] => {
                let admission = Admission {
                    token_keys: scopes
                        .iter()
                        .map(|s| format!("{}:t:{minute}", s.prefix))
                        .collect(),
                    lease_keys: scopes
                        .iter()
                        .filter(|s| s.limits.max_concurrent.is_some())
                        .map(|s| format!("{}:c", s.prefix))
                        .collect(),
                    member,
                    reserved: reservation,
                    headers: headers(&scopes, used, reset_secs),
                };
                if !admission.lease_keys.is_empty() {
                    self.leases.hold(&admission.member, &admission.lease_keys);
                }
                Ok(Some(admission))
            }
            [1, scope, kind, current, previous] => {
                let s = scopes
                    .get(usize::try_from(*scope).unwrap_or(0))
                    .unwrap_or(&scopes[0]);
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
                    _ => window_retry_after(limit, *current, *previous, frac, need),
                };
                Err(LimitError::Exceeded {
                    scope: s.scope,
                    kind,
                    limit,
                    retry_after,
                })
            }
            _ => self.unavailable("unexpected script reply"),
        }
    }

    fn release_orphan_lease(&self, redis: &Client, scopes: &[ScopeArgs], member: &str) {
        let sets: Vec<String> = scopes
            .iter()
            .filter(|s| s.limits.max_concurrent.is_some())
            .map(|s| format!("{}:c", s.prefix))
            .collect();
        if sets.is_empty() {
            return;
        }
        let (redis, member) = (redis.clone(), member.to_string());
        tokio::spawn(async move {
            for set in sets {
                let _ = redis.zrem::<(), _, _>(set, member.as_str()).await;
            }
        });
    }

    fn unavailable(&self, why: &'static str) -> Result<Option<Admission>, LimitError> {
        if self.fail_open {
            self.warning
                .warn(|| tracing::warn!(why, "rate limits not enforced (LIMITS_FAIL_OPEN=true)"));
            Ok(None)
        } else {
            Err(LimitError::Unavailable)
        }
    }

    /// Corrects the token buckets to `actual` tokens and releases the concurrency lease.
    pub async fn settle(&self, admission: &Admission, actual: u64) {
        self.leases.release(&admission.member);
        let Some(redis) = &self.redis else { return };
        let delta = actual as i64 - admission.reserved as i64;
        if delta == 0 && admission.lease_keys.is_empty() {
            return;
        }
        let mut keys = Vec::with_capacity(admission.token_keys.len() * 2);
        for (i, t) in admission.token_keys.iter().enumerate() {
            keys.push(t.clone());
            // Scopes without a concurrency limit name a set that holds no lease: ZREM is a no-op.
            keys.push(
                admission
                    .lease_keys
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("{t}:none")),
            );
        }
        let args = vec![delta.to_string(), admission.member.clone()];
        if let Err(e) = self
            .settle
            .evalsha_with_reload::<i64, _, _>(redis, keys, args)
            .await
        {
            // The lease lapses by itself; the token bucket keeps the reservation (over-counts).
            crate::metrics::store_error("redis", "settle");
            self.warning
                .warn(|| tracing::warn!(error = %e, "rate limit settlement failed"));
        }
    }

    pub fn redis(&self) -> Option<&Client> {
        self.redis.as_ref()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The tightest remaining allowance across scopes, for the `x-ratelimit-*` headers.
fn headers(scopes: &[ScopeArgs], used: &[i64], reset_secs: u64) -> RateHeaders {
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
    if secs >= 60 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
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
