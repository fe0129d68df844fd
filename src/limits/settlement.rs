//! Settlements waiting for their Redis call.
//!
//! A finished request's settlement is queued, not sent on its own: the next admission of this
//! instance carries every queued settlement in its script call (`limits.lua` settles them before
//! it admits), and when no admission comes within [`FLUSH_AFTER`] a flusher task sends them in
//! one call. Under load a request then costs one `EVALSHA`, not two, and an idle instance
//! settles within a few milliseconds. A client's next request on the same instance settles its
//! previous one first, in the same atomic call, so it never meets its own stale reservation.
//!
//! A failed call puts its settlements back with a growing delay; their leases (and so their
//! reservations) stay renewed meanwhile, so nothing lapses into a wrong count.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::keys::AdmissionKeys;
use super::leases::LeaseBook;
use crate::log_throttle::LogEvery;
use crate::redis_script::{Arg, ScriptPool};

/// How long a settlement waits for an admission to carry it before the flusher sends it.
pub const FLUSH_AFTER: Duration = Duration::from_millis(10);
/// Most settlements one admission carries: each adds a few µs to that admission's call.
pub const MAX_CARRIED: usize = 16;
/// Most settlements in one flusher call.
const MAX_FLUSHED: usize = 128;
/// How long a failed settlement is retried (Redis away for longer loses its counters' view of
/// this request; Postgres still has its usage).
const RETRY_FOR: Duration = Duration::from_secs(3600);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(15);
/// How often a flusher whose settlements all wait for a retry looks for new ones.
const IDLE_LOOK: Duration = Duration::from_millis(100);

/// One admitted request's settlement call (see settle.lua for its keys and arguments).
pub struct Settlement {
    keys: Arc<AdmissionKeys>,
    /// Actual tokens minus those reserved (the rate buckets' correction; may be negative).
    delta: i64,
    actual: i64,
    /// The admission's budget periods (`YYYYMMDD`, `YYYYMM`).
    day: i64,
    month: i64,
    /// Names usage settled while the counters are being re-seeded (hyphenated text).
    event_id: [u8; uuid::fmt::Hyphenated::LENGTH],
    now_ms: i64,
    retry: Option<Retry>,
}

struct Retry {
    at: Instant,
    wait: Duration,
    give_up: Instant,
}

/// What a settlement charges: its actual tokens against the admission's reservation.
pub struct Charge {
    pub reserved: u64,
    pub actual: u64,
    pub day: i64,
    pub month: i64,
    pub event_id: uuid::Uuid,
    pub now_ms: u64,
}

impl Settlement {
    pub fn new(keys: Arc<AdmissionKeys>, charge: Charge) -> Self {
        let mut event_id = [0; uuid::fmt::Hyphenated::LENGTH];
        charge.event_id.hyphenated().encode_lower(&mut event_id);
        Self {
            keys,
            delta: charge.actual as i64 - charge.reserved as i64,
            actual: charge.actual as i64,
            day: charge.day,
            month: charge.month,
            event_id,
            now_ms: charge.now_ms as i64,
            retry: None,
        }
    }

    fn ready(&self, now: Instant) -> bool {
        self.retry.as_ref().is_none_or(|r| r.at <= now)
    }

    /// Its arguments, in settle.lua's order.
    fn args(&self) -> [Arg<'_>; SETTLE_ARGS] {
        // Always ASCII: written by `encode_lower`.
        let event_id = std::str::from_utf8(&self.event_id).unwrap_or_default();
        [
            Arg::Int(self.delta),
            Arg::Str(&self.keys.member),
            Arg::Int(self.keys.names.rates() as i64),
            Arg::Int(self.actual),
            Arg::Int(self.day),
            Arg::Int(self.month),
            Arg::Str(event_id),
            Arg::Int(self.now_ms),
        ]
    }
}

const SETTLE_ARGS: usize = 8;

/// The settlements of one script call, written in front of the call's own keys and
/// arguments, as limits.lua reads them.
pub struct Carried {
    items: Vec<Settlement>,
    /// Where they go back when the call is dropped before it answered (its request was
    /// cancelled mid-admission): set while `items` is not empty.
    queue: Option<Arc<SettleQueue>>,
}

impl Drop for Carried {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take()
            && !self.items.is_empty()
        {
            queue.retry_later(std::mem::take(&mut self.items), &"its call was cancelled");
        }
    }
}

impl Carried {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The call's keys and arguments: the settlements', then `keys` and `args`, borrowed.
    pub fn call<'a>(&'a self, keys: &[&'a str], args: &[Arg<'a>]) -> (Vec<&'a str>, Vec<Arg<'a>>) {
        let settle_keys: usize = self
            .items
            .iter()
            .map(|s| s.keys.names.settlement_len())
            .sum();
        let settle_args = self.items.len() * (SETTLE_ARGS + 2);
        let mut all_keys = Vec::with_capacity(settle_keys + keys.len());
        let mut all_args = Vec::with_capacity(settle_args + args.len() + 1);
        all_args.push(Arg::Int(self.items.len() as i64));
        for s in &self.items {
            all_keys.extend(s.keys.names.settlement());
            all_args.push(Arg::Int(s.keys.names.settlement_len() as i64));
            all_args.push(Arg::Int(SETTLE_ARGS as i64));
            all_args.extend(s.args());
        }
        all_keys.extend_from_slice(keys);
        all_args.extend_from_slice(args);
        (all_keys, all_args)
    }
}

pub struct SettleQueue {
    /// Bounds its own calls (`REDIS_TIMEOUT_MS`).
    scripts: Arc<ScriptPool>,
    flush_after: Duration,
    leases: Arc<LeaseBook>,
    pending: Mutex<VecDeque<Settlement>>,
    /// Queued or in a call whose answer has not come yet: shutdown waits for none.
    outstanding: AtomicUsize,
    /// A flusher task is scheduled.
    armed: AtomicBool,
    warning: LogEvery,
}

impl SettleQueue {
    pub fn new(
        scripts: Arc<ScriptPool>,
        flush_after: Duration,
        leases: Arc<LeaseBook>,
    ) -> Arc<Self> {
        Arc::new(Self {
            scripts,
            flush_after,
            leases,
            pending: Mutex::new(VecDeque::new()),
            outstanding: AtomicUsize::new(0),
            armed: AtomicBool::new(false),
            warning: LogEvery::new(Duration::from_secs(30)),
        })
    }

    /// Queues a settlement; the next admission or the flusher sends it.
    pub fn push(self: &Arc<Self>, settlement: Settlement) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        self.requeue(settlement);
    }

    /// The queue, even after a panic elsewhere held its lock: a settlement must never be lost
    /// (its lease would be renewed forever).
    fn queue(&self) -> MutexGuard<'_, VecDeque<Settlement>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn requeue(self: &Arc<Self>, settlement: Settlement) {
        self.queue().push_back(settlement);
        if !self.armed.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().flusher());
        }
    }

    /// Takes up to `max` settlements ready to be sent, for an admission to carry.
    pub fn take(self: &Arc<Self>, max: usize) -> Carried {
        self.take_where(max, true)
    }

    fn take_where(self: &Arc<Self>, max: usize, ready_only: bool) -> Carried {
        let mut items = Vec::new();
        let mut q = self.queue();
        if q.is_empty() {
            return Carried { items, queue: None };
        }
        let now = Instant::now();
        let mut i = 0;
        while i < q.len() && items.len() < max {
            if !ready_only || q[i].ready(now) {
                items.extend(q.remove(i));
            } else {
                i += 1;
            }
        }
        Carried {
            items,
            queue: Some(self.clone()),
        }
    }

    /// The call that carried `carried` answered: Redis has them.
    pub fn done(&self, mut carried: Carried) {
        for s in carried.items.drain(..) {
            self.finish(s.keys.id);
        }
    }

    /// The call that carried `carried` failed or timed out: retry them later.
    pub fn failed(self: &Arc<Self>, mut carried: Carried, error: &dyn std::fmt::Display) {
        self.retry_later(std::mem::take(&mut carried.items), error);
    }

    fn retry_later(self: &Arc<Self>, items: Vec<Settlement>, error: &dyn std::fmt::Display) {
        if items.is_empty() {
            return;
        }
        crate::metrics::store_error("redis", "settle");
        self.warning
            .warn(|| tracing::warn!(error = %error, "limit settlement failed; retrying"));
        let now = Instant::now();
        for mut s in items {
            let retry = match s.retry.take() {
                None => Retry {
                    at: now + FIRST_RETRY,
                    wait: FIRST_RETRY,
                    give_up: now + RETRY_FOR,
                },
                Some(r) if now >= r.give_up => {
                    tracing::warn!("limit settlement given up after an hour of Redis failures");
                    self.finish(s.keys.id);
                    continue;
                }
                Some(r) => {
                    let wait = (r.wait * 2).min(LONGEST_RETRY);
                    Retry {
                        at: now + wait,
                        wait,
                        give_up: r.give_up,
                    }
                }
            };
            s.retry = Some(retry);
            self.requeue(s);
        }
    }

    fn finish(&self, id: u64) {
        self.leases.release(id);
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Sends what no admission has carried after `flush_after`; runs while anything is queued.
    async fn flusher(self: Arc<Self>) {
        tokio::time::sleep(self.flush_after).await;
        loop {
            if self.send_next(true).await.is_some() {
                continue;
            }
            if self.is_empty() {
                self.armed.store(false, Ordering::Release);
                // A push between the look and the store saw the flag still set.
                if self.is_empty() || self.armed.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            // Everything queued waits for a retry.
            tokio::time::sleep(IDLE_LOOK).await;
        }
    }

    fn is_empty(&self) -> bool {
        self.queue().is_empty()
    }

    /// Sends one batch; `None` when there was nothing to take, else whether Redis has it. The
    /// batch is taken once the call has its connection: no connect between take and write.
    async fn send_next(self: &Arc<Self>, ready_only: bool) -> Option<bool> {
        let connection = self.scripts.connection().await;
        let batch = self.take_where(MAX_FLUSHED, ready_only);
        if batch.is_empty() {
            return None;
        }
        let result = match connection {
            Ok(connection) => {
                let (keys, args) = batch.call(&[], &[]);
                connection.call(&keys, &args).await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                self.done(batch);
                Some(true)
            }
            Err(e) => {
                self.failed(batch, &e);
                Some(false)
            }
        }
    }

    /// At shutdown, after the last request: sends everything still queued, those waiting for
    /// a retry included, and returns when Redis has it all, or at `until`.
    pub async fn drain(self: &Arc<Self>, until: Instant) {
        while self.outstanding.load(Ordering::Acquire) > 0 && Instant::now() < until {
            match self.send_next(false).await {
                // In a call of an admission or of the flusher.
                None => tokio::time::sleep(Duration::from_millis(10)).await,
                Some(false) => tokio::time::sleep(Duration::from_millis(200)).await,
                Some(true) => {}
            }
        }
    }

    /// Settlements queued or in a call.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }
}
