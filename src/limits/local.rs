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
//! Usage settled while a seed is under way is kept aside as late (like the script's `late:`
//! fields) and added unless Postgres already has it. A scope whose budgets are removed keeps its
//! counters, marked stale: requests in flight still give their reservations back to them, and a
//! budget set again later re-reads the usage from Postgres, which kept counting meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::keys::ScopeName;
use super::seed::{self, SeedError, SeedTarget};
use super::{Ask, BudgetScope, RateScope, Verdict};
use crate::audit::Pipeline;
use crate::clock::{self, Periods};
use crate::store::Store;

/// How long a scope's first budgeted request waits for its counters (the audit pipeline is
/// normally written within one flush window) before it gets 503 and the client retries.
const SEED_WAIT: Duration = Duration::from_secs(2);
/// How often a request waiting for another request's seed looks again.
const SEED_POLL: Duration = Duration::from_millis(20);

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

    /// Counts nothing any window could still see, and holds no slot.
    fn idle(&self, minute: u64) -> bool {
        self.active == 0 && self.minute + 1 < minute
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
    /// The usage must be read from Postgres again before a budget is checked against it (never
    /// read, or its budgets were removed meanwhile).
    pub stale: bool,
    /// A seed is reading Postgres: settlements go to `late`.
    seeding: bool,
    late: Vec<Late>,
}

impl Counters {
    fn unread() -> Self {
        Counters {
            day: 0,
            used_day: 0,
            month: 0,
            used_month: 0,
            used_total: 0,
            in_flight: 0,
            stale: true,
            seeding: false,
            late: Vec::new(),
        }
    }

    fn add(&mut self, actual: i64, day: i64, month: i64) {
        if self.day == day {
            self.used_day += actual;
        }
        if self.month == month {
            self.used_month += actual;
        }
        self.used_total += actual;
    }
}

/// Usage settled while its scope's counters were being read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Late {
    event_id: uuid::Uuid,
    actual: i64,
    day: i64,
    month: i64,
}

#[derive(Default)]
struct State {
    // Scopes are the operator's tenants and keys: a fast hash is safe.
    windows: HashMap<ScopeName, Window, foldhash::fast::RandomState>,
    budgets: HashMap<ScopeName, Counters, foldhash::fast::RandomState>,
    /// The minute idle windows were last dropped.
    swept: u64,
}

/// What an admission charged here, for its settlement.
#[derive(Debug, Clone, Default)]
pub struct LocalHold {
    /// Rate scopes charged: the minute whose token bucket took the reservation, and whether it
    /// holds a concurrency slot.
    rates: [Option<(ScopeName, u64, bool)>; 2],
    /// Budget scopes charged, and whether the admission reserved its tokens there.
    budgets: [Option<(ScopeName, bool)>; 2],
}

/// The in-process counters, and how to read a budget's usage from Postgres.
pub struct LocalLimits {
    state: Mutex<State>,
    /// Some scope has budget counters (so an admission has stale ones to mark).
    any_budgets: AtomicBool,
    store: Arc<Store>,
    pipeline: Arc<Pipeline>,
}

/// What a settlement corrects: the charge at admission and what the request used.
pub(super) struct Used {
    pub reserved: u64,
    pub actual: u64,
    pub day: i64,
    pub month: i64,
    pub event_id: uuid::Uuid,
}

impl LocalLimits {
    pub fn new(store: Arc<Store>, pipeline: Arc<Pipeline>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            any_budgets: AtomicBool::new(false),
            store,
            pipeline,
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
        state.sweep(ask.minute);
        let mut cap = ask.requested;
        let mut in_flight_before = [0i64; 2];
        for (j, b) in budgets.iter().enumerate() {
            let Some(c) = state.budgets.get_mut(&b.name).filter(|c| !c.stale) else {
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
        let mut minutes = [ask.minute; 2];
        for (i, s) in rates.iter().enumerate() {
            let w = state.windows.entry(s.name).or_default();
            // Another thread may have read a later clock and moved the window on: this
            // request then counts in that minute, from its start.
            let minute = ask.minute.max(w.minute);
            let frac = if minute == ask.minute {
                ask.into_minute as f64 / 60_000.0
            } else {
                0.0
            };
            w.roll(minute);
            minutes[i] = minute;
            if let Some(refusal) = check_rate(s, w, frac, reservation, &mut used[i * 2..i * 2 + 2])
            {
                return (refusal.at(i), None);
            }
        }
        // Every check passed: charge them all.
        let mut hold = LocalHold::default();
        for (i, s) in rates.iter().enumerate() {
            let w = state.windows.entry(s.name).or_default();
            w.requests.current += 1;
            w.tokens.current += reservation;
            let slot = s.limits.max_concurrent.is_some();
            if slot {
                w.active += 1;
            }
            hold.rates[i] = Some((s.name, minutes[i], slot));
        }
        for (j, b) in budgets.iter().enumerate() {
            if let Some(c) = state.budgets.get_mut(&b.name)
                && ask.reserve
            {
                c.in_flight = in_flight_before[j] + reservation;
            }
            hold.budgets[j] = Some((b.name, ask.reserve));
        }
        let verdict = Verdict::Admitted {
            cap,
            used,
            rates: rates.len(),
        };
        (verdict, Some(hold))
    }

    /// Corrects the token bucket charged to the actual count, frees the concurrency slot and
    /// the budget reservation, and counts the usage against the budgets (settle.lua).
    pub(super) fn settle(&self, hold: &LocalHold, used: &Used) {
        let delta = used.actual as i64 - used.reserved as i64;
        let mut state = self.state();
        for (name, minute, slot) in hold.rates.iter().flatten() {
            let Some(w) = state.windows.get_mut(name) else {
                continue;
            };
            if let Some(bucket) = w.token_bucket(*minute) {
                *bucket = (*bucket + delta).max(0);
            }
            if *slot {
                w.active = (w.active - 1).max(0);
            }
        }
        let actual = used.actual as i64;
        for (name, reserved) in hold.budgets.iter().flatten() {
            let Some(c) = state.budgets.get_mut(name) else {
                continue;
            };
            if *reserved {
                c.in_flight = (c.in_flight - used.reserved as i64).max(0);
            }
            if c.seeding {
                c.late.push(Late {
                    event_id: used.event_id,
                    actual,
                    day: used.day,
                    month: used.month,
                });
            } else {
                c.add(actual, used.day, used.month);
            }
        }
    }

    /// Marks the counters of scopes that no longer have a budget stale: a budget set again
    /// later starts from Postgres' usage, which kept counting meanwhile.
    pub(super) fn forget(&self, scopes: &[Option<ScopeName>; 2]) {
        if !self.any_budgets.load(Ordering::Relaxed) {
            return;
        }
        let mut state = self.state();
        for s in scopes.iter().flatten() {
            if let Some(c) = state.budgets.get_mut(s) {
                c.stale = true;
            }
        }
    }

    /// Reads one scope's usage from Postgres, once every event this instance has queued is
    /// there, into its counters; or waits for the request already doing so.
    pub(super) async fn seed(&self, target: &SeedTarget, name: ScopeName) -> Result<(), SeedError> {
        if !self.begin_seed(name) {
            return self.await_seed(name).await;
        }
        let result = self.read_usage(target, name).await;
        if result.is_err() {
            // The next request tries again; late usage stays for that seed to check.
            let mut state = self.state();
            if let Some(c) = state.budgets.get_mut(&name) {
                c.seeding = false;
            }
        }
        result
    }

    /// True when this caller is to seed `name` (nobody else is, and its counters are stale).
    fn begin_seed(&self, name: ScopeName) -> bool {
        self.any_budgets.store(true, Ordering::Relaxed);
        let mut state = self.state();
        let c = state.budgets.entry(name).or_insert_with(Counters::unread);
        if !c.stale || c.seeding {
            return false;
        }
        c.seeding = true;
        true
    }

    async fn await_seed(&self, name: ScopeName) -> Result<(), SeedError> {
        let deadline = tokio::time::Instant::now() + SEED_WAIT;
        loop {
            if self.state().budgets.get(&name).is_some_and(|c| !c.seeding) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SeedError::PipelineBusy);
            }
            tokio::time::sleep(SEED_POLL).await;
        }
    }

    async fn read_usage(&self, target: &SeedTarget, name: ScopeName) -> Result<(), SeedError> {
        // Usage settled from here on is late; what was settled before is in the pipeline
        // before this mark, and so in Postgres once the wait is over.
        seed::wait_for_pipeline(&self.pipeline, SEED_WAIT).await?;
        let periods = Periods::at(clock::now());
        let asked: Vec<uuid::Uuid> = self
            .state()
            .budgets
            .get(&name)
            .map(|c| c.late.iter().map(|l| l.event_id).collect())
            .unwrap_or_default();
        let read = seed::postgres_usage(&self.store, target, &periods, &asked);
        let usage = tokio::time::timeout(SEED_WAIT, read)
            .await
            .map_err(|_| SeedError::PipelineBusy)??;
        let mut state = self.state();
        let c = state.budgets.entry(name).or_insert_with(Counters::unread);
        c.day = periods.day_number();
        c.month = periods.month_number();
        c.used_day = usage.day;
        c.used_month = usage.month;
        c.used_total = usage.total;
        // Late usage Postgres did not have at the read is added; late usage settled after the
        // read was not asked about and is added too: it may reach Postgres meanwhile and so
        // count twice, an over-count (the safe side, as with the script's seed).
        for late in std::mem::take(&mut c.late) {
            let id = late.event_id.to_string();
            if !usage.applied.contains(&id) {
                c.add(late.actual, late.day, late.month);
            }
        }
        c.stale = false;
        c.seeding = false;
        Ok(())
    }

    /// A scope's budget counters as they stand (for tests and diagnostics).
    pub fn counters(&self, scope: ScopeName) -> Option<Counters> {
        self.state().budgets.get(&scope).cloned()
    }
}

impl State {
    /// Once a minute, drops the windows that count nothing any more (their scopes are seen
    /// again as new), so keys that come and go do not grow the table.
    fn sweep(&mut self, minute: u64) {
        if minute <= self.swept {
            return;
        }
        self.swept = minute;
        self.windows.retain(|_, w| !w.idle(minute));
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
    s: &RateScope<'_>,
    w: &Window,
    frac: f64,
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
