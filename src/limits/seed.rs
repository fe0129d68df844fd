//! Re-seeding budget counters that Redis lost (restart without persistence, flush, eviction)
//! from Postgres' durable usage (SPEC §6). A missing counter is never "zero used".
//!
//! The admit script marks a missing usage hash `seeding` (with the time it noticed) and answers
//! 503 for its scope until the seed is done. Usage settled while the mark stands is recorded in
//! the hash as `late:<event id>`. The seed then:
//! 1. waits `BUDGET_SEED_GRACE_MS` after the mark, so usage other instances settled before it
//!    has reached Postgres, and until this instance's own audit pipeline (queue and spool) is
//!    empty;
//! 2. reads, in one statement (one snapshot), the scope's day/month/total usage from
//!    `budget_usage` and which `late:` events that usage already contains;
//! 3. writes the counters in one script: Postgres' usage plus the late events it lacked.
//!
//! A scope Postgres has never seen (a key's first request since its budget was set) needs no
//! grace: it is seeded at once, on the request that found it missing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::{Client, HashesInterface};
use fred::types::scripts::Script;
use sqlx::Row;

use super::Scope;
use crate::audit::Pipeline;
use crate::clock::{self, Periods};
use crate::log_throttle::LogEvery;
use crate::store::Store;

const SEED_LUA: &str = include_str!("seed.lua");
/// How long the seed waits for the local audit pipeline to empty before trying again later.
const PIPELINE_WAIT: Duration = Duration::from_secs(30);
const RETRY_EVERY: Duration = Duration::from_secs(1);
const ATTEMPTS: usize = 60;

/// One scope's usage hash and whose usage it counts.
#[derive(Debug, Clone)]
pub struct SeedTarget {
    pub hash: String,
    pub scope: Scope,
    pub tenant_id: i64,
    /// 0 for a tenant scope (as in `budget_usage`).
    pub key_id: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedOutcome {
    /// The counters are there now: admit again.
    Seeded,
    /// A seed is waiting for in-flight usage; answer 503 meanwhile.
    Pending,
    /// Redis or Postgres failed.
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("the audit pipeline still holds usage")]
    PipelineBusy,
}

/// What Redis and Postgres say about one scope at one moment.
struct Snapshot {
    marker: Option<String>,
    late: Vec<uuid::Uuid>,
    known_to_postgres: bool,
    day: i64,
    month: i64,
    total: i64,
    applied: Vec<String>,
}

pub struct Seeder {
    redis: Client,
    store: Arc<Store>,
    pipeline: Arc<Pipeline>,
    grace: Duration,
    script: Script,
    running: Mutex<HashSet<String>>,
    warning: LogEvery,
}

impl Seeder {
    pub fn new(redis: Client, store: Arc<Store>, pipeline: Arc<Pipeline>, grace: Duration) -> Self {
        Self {
            redis,
            store,
            pipeline,
            grace,
            script: Script::from_lua(SEED_LUA),
            running: Mutex::new(HashSet::new()),
            warning: LogEvery::new(Duration::from_secs(30)),
        }
    }

    /// Seeds a scope Postgres has never counted at once; otherwise starts the patient seed
    /// (once per scope in this instance) and answers `Pending`.
    pub async fn seed_if_fresh(
        self: &Arc<Self>,
        target: &SeedTarget,
        now: DateTime<Utc>,
    ) -> SeedOutcome {
        if self.is_running(&target.hash) {
            return SeedOutcome::Pending;
        }
        let periods = Periods::at(now);
        let snap = match self.snapshot(target, &periods).await {
            Ok(s) => s,
            Err(e) => {
                self.warn(&e);
                return SeedOutcome::Failed;
            }
        };
        if snap.marker.is_none() {
            return SeedOutcome::Seeded;
        }
        if !snap.known_to_postgres && snap.late.is_empty() {
            return match self.write(target, &periods, &snap).await {
                Ok(()) => SeedOutcome::Seeded,
                Err(e) => {
                    self.warn(&e);
                    SeedOutcome::Failed
                }
            };
        }
        self.start_patient(target.clone());
        SeedOutcome::Pending
    }

    fn is_running(&self, hash: &str) -> bool {
        self.running.lock().map_or(true, |r| r.contains(hash))
    }

    fn start_patient(self: &Arc<Self>, target: SeedTarget) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        if !running.insert(target.hash.clone()) {
            return;
        }
        drop(running);
        let this = self.clone();
        tokio::spawn(async move {
            for _ in 0..ATTEMPTS {
                match this.seed_patiently(&target).await {
                    Ok(()) => break,
                    Err(e) => this.warn(&e),
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
            if let Ok(mut running) = this.running.lock() {
                running.remove(&target.hash);
            }
        });
    }

    async fn seed_patiently(&self, target: &SeedTarget) -> Result<(), SeedError> {
        let marker: Option<String> = self.redis.hget(&target.hash, "seeding").await?;
        let Some(marker) = marker else {
            return Ok(());
        };
        let since = marker.parse::<u64>().unwrap_or(0);
        let ready_at = since + self.grace.as_millis() as u64;
        let now = super::now_ms();
        if ready_at > now {
            tokio::time::sleep(Duration::from_millis(ready_at - now)).await;
        }
        wait_for_pipeline(&self.pipeline, PIPELINE_WAIT).await?;
        let periods = Periods::at(clock::now());
        let snap = self.snapshot(target, &periods).await?;
        if snap.marker.is_none() {
            return Ok(());
        }
        self.write(target, &periods, &snap).await?;
        tracing::info!(
            scope = target.scope.as_str(),
            tenant_id = target.tenant_id,
            key_id = target.key_id,
            day = snap.day,
            month = snap.month,
            total = snap.total,
            "budget counters re-seeded from postgres"
        );
        Ok(())
    }

    async fn snapshot(
        &self,
        target: &SeedTarget,
        periods: &Periods,
    ) -> Result<Snapshot, SeedError> {
        let fields: HashMap<String, String> = self.redis.hgetall(&target.hash).await?;
        let late: Vec<uuid::Uuid> = fields
            .keys()
            .filter_map(|f| f.strip_prefix("late:"))
            .filter_map(|id| id.parse().ok())
            .collect();
        let usage = postgres_usage(&self.store, target, periods, &late).await?;
        Ok(Snapshot {
            marker: fields.get("seeding").cloned(),
            late,
            known_to_postgres: usage.known,
            day: usage.day,
            month: usage.month,
            total: usage.total,
            applied: usage.applied,
        })
    }

    async fn write(
        &self,
        target: &SeedTarget,
        periods: &Periods,
        snap: &Snapshot,
    ) -> Result<(), SeedError> {
        let Some(marker) = &snap.marker else {
            return Ok(());
        };
        let mut args = vec![
            marker.clone(),
            periods.day_stamp(),
            periods.month_stamp(),
            snap.day.to_string(),
            snap.month.to_string(),
            snap.total.to_string(),
        ];
        args.extend(snap.applied.iter().cloned());
        self.script
            .evalsha_with_reload::<i64, _, _>(&self.redis, vec![target.hash.clone()], args)
            .await?;
        Ok(())
    }

    fn warn(&self, e: &SeedError) {
        crate::metrics::store_error("budget", "reseed");
        self.warning
            .warn(|| tracing::warn!(error = %e, "budget counters could not be re-seeded yet"));
    }
}

/// Waits, at most `limit`, until every event this instance had queued when the wait began is in
/// Postgres.
pub async fn wait_for_pipeline(pipeline: &Pipeline, limit: Duration) -> Result<(), SeedError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mark = pipeline.mark();
    while !pipeline.has_written(mark) {
        if tokio::time::Instant::now() > deadline {
            return Err(SeedError::PipelineBusy);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A scope's durable usage in `budget_usage` for the periods of `periods`.
pub struct PostgresUsage {
    /// Postgres has counted this scope before.
    pub known: bool,
    pub day: i64,
    pub month: i64,
    pub total: i64,
    /// Which of the `late` events asked about that usage already contains.
    pub applied: Vec<String>,
}

/// Reads a scope's usage, and which of `late` it contains, in one statement (one snapshot, so
/// the two agree).
pub async fn postgres_usage(
    store: &Store,
    target: &SeedTarget,
    periods: &Periods,
    late: &[uuid::Uuid],
) -> Result<PostgresUsage, SeedError> {
    let row = sqlx::query(
        "SELECT \
           EXISTS (SELECT 1 FROM budget_usage WHERE scope = $1 AND tenant_id = $2 AND key_id = $3) AS known, \
           COALESCE((SELECT prompt_tokens + completion_tokens FROM budget_usage WHERE scope = $1 \
             AND tenant_id = $2 AND key_id = $3 AND period = 'day' AND period_start = $4), 0) AS day, \
           COALESCE((SELECT prompt_tokens + completion_tokens FROM budget_usage WHERE scope = $1 \
             AND tenant_id = $2 AND key_id = $3 AND period = 'month' AND period_start = $5), 0) AS month, \
           COALESCE((SELECT prompt_tokens + completion_tokens FROM budget_usage WHERE scope = $1 \
             AND tenant_id = $2 AND key_id = $3 AND period = 'total'), 0) AS total, \
           ARRAY(SELECT event_id::text FROM audit_log WHERE event_id = ANY($6)) AS applied",
    )
    .bind(target.scope.as_str())
    .bind(target.tenant_id)
    .bind(target.key_id)
    .bind(periods.day)
    .bind(periods.month_start())
    .bind(late)
    .fetch_one(store.pool().await)
    .await?;
    Ok(PostgresUsage {
        known: row.try_get("known")?,
        day: row.try_get("day")?,
        month: row.try_get("month")?,
        total: row.try_get("total")?,
        applied: row.try_get("applied")?,
    })
}
