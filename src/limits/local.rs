//! The in-process limiter: the same checks and charges as the Redis script (admit.lua,
//! settle.lua), kept in this process's memory, for a gateway that runs without `REDIS_URL`
//! (SPEC §10: single node, in-process limiters).
//!
//! One mutex guards every counter: an admission or settlement is a few hash lookups, far less
//! than the lock's hand-off between two threads would be worth sharding for. Nothing here is
//! shared with another instance, so concurrency slots need no leases (the process that holds
//! them is the one that would crash with them) and a settlement applies at once.
//!
//! Budget counters of a scope are read from Postgres' `budget_usage` on the scope's first
//! budgeted request, once every event this instance had handed to its audit pipeline is in
//! Postgres ([`super::seed::postgres_usage`]); from then on every settlement adds to them here.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::keys::ScopeName;
use super::seed::{self, SeedError, SeedTarget};
use super::{Ask, BudgetScope, RateScope, Verdict};
use crate::audit::Pipeline;
use crate::clock::{self, Periods};
use crate::store::Store;

/// How long a scope's first budgeted request waits for the audit pipeline (one flush window,
/// normally) before it gets 503 and the client retries.
const SEED_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Both minute buckets of one scope's windows, and its requests in flight.
#[derive(Debug, Default)]
struct Window {
    /// The minute the `current` buckets count.
    minute: u64,
    requests: Buckets,
    tokens: Buckets,
    active: i64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Buckets {
    current: i64,
    previous: i64,
}

impl Window {
    /// Moves the buckets on to `minute` (a bucket older than the previous minute is empty).
    fn roll(&mut self, minute: u64) {
        if minute <= self.minute {
            return;
        }
        for b in [&mut self.requests, &mut self.tokens] {
            b.previous = if minute == self.minute + 1 {
                b.current
            } else {
                0
            };
            b.current = 0;
        }
        self.minute = minute;
    }

    /// The token bucket that counted `minute`'s charges, while it is still in a window.
    fn token_bucket(&mut self, minute: u64) -> Option<&mut i64> {
        if minute == self.minute {
            Some(&mut self.tokens.current)
        } else if minute + 1 == self.minute {
            Some(&mut self.tokens.previous)
        } else {
            None
        }
    }
}

/// One scope's budget counters (the Redis usage hash's fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// The day (`YYYYMMDD`) `used_day` counts.
    pub day: i64,
    pub used_day: i64,
    /// The month (`YYYYMM`) `used_month` counts.
    pub month: i64,
    pub used_month: i64,
    pub used_total: i64,
    /// Tokens reserved by requests in flight.
    pub in_flight: i64,
    /// Which seed made these counters: a reservation is only given back to the counters that
    /// took it.
    generation: u64,
}

#[derive(Default)]
struct State {
    windows: HashMap<ScopeName, Window>,
    budgets: HashMap<ScopeName, Counters>,
    generations: u64,
}

/// What an admission charged here, for its settlement.
#[derive(Debug, Clone, Default)]
pub struct LocalHold {
    minute: u64,
    /// Rate scopes charged, and whether each holds a concurrency slot.
    rates: [Option<(ScopeName, bool)>; 2],
    /// Budget scopes charged, and the generation of the counters whose reservation it holds
    /// (`None` in post mode, which reserves nothing).
    budgets: [Option<(ScopeName, Option<u64>)>; 2],
}

/// The in-process counters, and how to read a budget's usage from Postgres.
pub struct LocalLimits {
    state: Mutex<State>,
    store: std::sync::Arc<Store>,
    pipeline: std::sync::Arc<Pipeline>,
    /// One seed at a time: seeds are rare (a scope's first budgeted request) and each waits for
    /// the audit pipeline anyway.
    seeding: tokio::sync::Mutex<()>,
}

impl LocalLimits {
    pub fn new(store: std::sync::Arc<Store>, pipeline: std::sync::Arc<Pipeline>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            store,
            pipeline,
            seeding: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks every limit and budget and, when all pass, charges them (admit.lua's rules).
    pub(super) fn admit(
        &self,
        ask: &Ask,
        rates: &[RateScope<'_>],
        budgets: &[BudgetScope<'_>],
    ) -> (Verdict, Option<LocalHold>) {
        let mut state = self.state();
        let mut cap = ask.requested;
        let mut in_flight_before = [0i64; 2];
        for (j, b) in budgets.iter().enumerate() {
            let Some(c) = state.budgets.get_mut(&b.name) else {
                return (Verdict::Reseed(j), None);
            };
            match check_budget(ask, b, c, &mut cap) {
                Ok(before) => in_flight_before[j] = before,
                Err(refusal) => return (refusal.at(j), None),
            }
        }
        let output = if cap < 0 {
            ask.default_output as i64
        } else {
            cap
        };
        let reservation = ask.bound as i64 + output;
        let mut used = [0i64; 4];
        for (i, s) in rates.iter().enumerate() {
            let w = state.windows.entry(s.name).or_default();
            w.roll(ask.minute);
            if let Some(refusal) = check_rate(ask, s, w, reservation, &mut used[i * 2..i * 2 + 2]) {
                return (refusal.at(i), None);
            }
        }
        // Every check passed: charge them all.
        let mut hold = LocalHold {
            minute: ask.minute,
            rates: [None; 2],
            budgets: [None; 2],
        };
        for (i, s) in rates.iter().enumerate() {
            let w = state.windows.entry(s.name).or_default();
            w.requests.current += 1;
            w.tokens.current += reservation;
            let slot = s.limits.max_concurrent.is_some();
            if slot {
                w.active += 1;
            }
            hold.rates[i] = Some((s.name, slot));
        }
        for (j, b) in budgets.iter().enumerate() {
            let Some(c) = state.budgets.get_mut(&b.name) else {
                continue;
            };
            let generation = ask.reserve.then(|| {
                c.in_flight = in_flight_before[j] + reservation;
                c.generation
            });
            hold.budgets[j] = Some((b.name, generation));
        }
        let verdict = Verdict::Admitted {
            cap,
            used,
            rates: rates.len(),
        };
        (verdict, Some(hold))
    }

    /// Corrects the token bucket charged to `actual` (from `reserved`), frees the concurrency
    /// slot and the budget reservation, and counts `actual` against the budgets (settle.lua).
    pub(super) fn settle(
        &self,
        hold: &LocalHold,
        reserved: u64,
        actual: u64,
        day: i64,
        month: i64,
    ) {
        let delta = actual as i64 - reserved as i64;
        let minute = (super::now_ms() / 60_000).max(hold.minute);
        let mut state = self.state();
        for (name, slot) in hold.rates.iter().flatten() {
            let Some(w) = state.windows.get_mut(name) else {
                continue;
            };
            w.roll(minute);
            if let Some(bucket) = w.token_bucket(hold.minute) {
                *bucket = (*bucket + delta).max(0);
            }
            if *slot {
                w.active = (w.active - 1).max(0);
            }
        }
        let actual = actual as i64;
        for (name, generation) in hold.budgets.iter().flatten() {
            // Counters seeded again since the admission (its budget was removed and set anew)
            // never held this reservation; the usage counts all the same: it is not yet in
            // Postgres, which the new counters were read from.
            let Some(c) = state.budgets.get_mut(name) else {
                continue;
            };
            if *generation == Some(c.generation) {
                c.in_flight = (c.in_flight - reserved as i64).max(0);
            }
            if c.day == day {
                c.used_day += actual;
            }
            if c.month == month {
                c.used_month += actual;
            }
            c.used_total += actual;
        }
    }

    /// A scope's budget counters as they stand (for tests and diagnostics).
    pub fn counters(&self, scope: ScopeName) -> Option<Counters> {
        self.state().budgets.get(&scope).cloned()
    }

    /// Drops the counters of scopes that no longer have a budget, so that a budget set again
    /// later starts from Postgres' usage, which kept counting meanwhile.
    pub(super) fn forget(&self, scopes: &[ScopeName]) {
        let mut state = self.state();
        if state.budgets.is_empty() {
            return;
        }
        for s in scopes {
            state.budgets.remove(s);
        }
    }

    /// Reads one scope's usage from Postgres, once every event this instance has queued is
    /// there, and makes its counters (unless another request made them meanwhile).
    pub(super) async fn seed(&self, target: &SeedTarget, name: ScopeName) -> Result<(), SeedError> {
        let _one_at_a_time = self.seeding.lock().await;
        if self.state().budgets.contains_key(&name) {
            return Ok(());
        }
        seed::wait_for_pipeline(&self.pipeline, SEED_WAIT).await?;
        let periods = Periods::at(clock::now());
        let usage = seed::postgres_usage(&self.store, target, &periods, &[]).await?;
        let mut state = self.state();
        state.generations += 1;
        let generation = state.generations;
        state.budgets.entry(name).or_insert(Counters {
            day: periods.day_number(),
            used_day: usage.day,
            month: periods.month_number(),
            used_month: usage.month,
            used_total: usage.total,
            in_flight: 0,
            generation,
        });
        Ok(())
    }
}

/// A refusal found at one scope, before the scope's index is known.
enum Refusal {
    Rate {
        kind: i64,
        current: i64,
        previous: i64,
    },
    Budget {
        period: i64,
        limit: i64,
    },
    Busy,
}

impl Refusal {
    fn at(self, index: usize) -> Verdict {
        match self {
            Refusal::Rate {
                kind,
                current,
                previous,
            } => Verdict::Rate {
                index,
                kind,
                current,
                previous,
            },
            Refusal::Budget { period, limit } => Verdict::Budget {
                index,
                period,
                limit,
            },
            Refusal::Busy => Verdict::Busy(index),
        }
    }
}

/// One budget scope's checks; narrows `cap` to what the tightest budget leaves (reserve mode).
/// Returns the tokens its requests in flight had reserved.
fn check_budget(
    ask: &Ask,
    b: &BudgetScope<'_>,
    c: &mut Counters,
    cap: &mut i64,
) -> Result<i64, Refusal> {
    // Periods only roll forward, as in the script.
    if c.day < ask.day {
        c.day = ask.day;
        c.used_day = 0;
    }
    if c.month < ask.month {
        c.month = ask.month;
        c.used_month = 0;
    }
    let in_flight = if ask.reserve { c.in_flight } else { 0 };
    let bound = ask.bound as i64;
    let minimal = ask.minimal as i64;
    let periods = [
        (1, b.limits.budget_daily, c.used_day),
        (2, b.limits.budget_monthly, c.used_month),
        (3, b.limits.budget_total, c.used_total),
    ];
    for (period, limit, used) in periods {
        let Some(limit) = limit.map(|l| l.min(super::MAX_TOKENS as i64)) else {
            continue;
        };
        let left = limit - used - in_flight;
        if !ask.reserve {
            if left <= 0 {
                return Err(Refusal::Budget { period, limit });
            }
            continue;
        }
        let room = left - bound;
        if room < minimal {
            if limit - used - bound >= minimal {
                return Err(Refusal::Busy);
            }
            return Err(Refusal::Budget { period, limit });
        }
        if *cap < 0 || room < *cap {
            *cap = room;
        }
    }
    Ok(c.in_flight)
}

/// One rate scope's checks against its sliding windows; fills `used` with the requests and
/// tokens the window will hold with this request (for the `x-ratelimit-*` headers).
fn check_rate(
    ask: &Ask,
    s: &RateScope<'_>,
    w: &Window,
    reservation: i64,
    used: &mut [i64],
) -> Option<Refusal> {
    if let Some(conc) = s.limits.max_concurrent
        && w.active + 1 > conc
    {
        return Some(Refusal::Rate {
            kind: 3,
            current: w.active,
            previous: 0,
        });
    }
    let frac = ask.into_minute as f64 / 60_000.0;
    let estimate = |b: Buckets| b.previous as f64 * (1.0 - frac) + b.current as f64;
    let (requests, tokens) = (estimate(w.requests), estimate(w.tokens));
    if s.limits.rpm.is_some_and(|rpm| requests + 1.0 > rpm as f64) {
        return Some(Refusal::Rate {
            kind: 1,
            current: w.requests.current,
            previous: w.requests.previous,
        });
    }
    if s.limits
        .tpm
        .is_some_and(|tpm| tokens + reservation as f64 > tpm as f64)
    {
        return Some(Refusal::Rate {
            kind: 2,
            current: w.tokens.current,
            previous: w.tokens.previous,
        });
    }
    used[0] = (requests + 1.0).ceil() as i64;
    used[1] = (tokens + reservation as f64).ceil() as i64;
    None
}
