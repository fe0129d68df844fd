//! Follows the `revocations` change feed so revocation, expiry changes, suspension and any
//! change of a key's or tenant's settings reach every instance's caches within a second
//! (SPEC §3), including changes made directly in the database (triggers feed the table).
//!
//! Every instance polls the table (a few hundred ms apart) and, for each new change, evicts the
//! affected principals from its local cache and deletes them from Redis through the per-key
//! and per-tenant index sets. The request path pays nothing for this.
//!
//! Sequence values are allocated at insert but become visible at commit, so a change can appear
//! with an id below one already seen. The poll therefore re-reads a window below the highest
//! id and remembers which ids it has applied.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sqlx::Row;

use crate::auth::cache::PrincipalCache;
use crate::log_throttle::LogEvery;
use crate::store::Store;

const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How far below the highest applied id a late-committing change is still picked up.
const LATE_COMMIT_WINDOW: i64 = 1000;

pub struct ChangeFollower {
    store: Store,
    cache: Arc<PrincipalCache>,
    errors: LogEvery,
}

/// One row of the feed: a key (`key_id` set) or a whole tenant changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub id: i64,
    pub tenant_id: i64,
    pub key_id: Option<i64>,
}

/// Which changes of a poll are new, and the bookkeeping that makes that answer right across
/// out-of-order commits.
pub struct FeedCursor {
    /// The highest id when following started: older changes predate the (empty) caches.
    baseline: i64,
    high: i64,
    applied: BTreeSet<i64>,
}

impl FeedCursor {
    pub fn starting_at(high: i64) -> Self {
        Self {
            baseline: high,
            high,
            applied: BTreeSet::new(),
        }
    }

    /// The id to read above.
    pub fn low_water(&self) -> i64 {
        (self.high - LATE_COMMIT_WINDOW).max(0)
    }

    /// Keeps the changes not applied yet and records them as applied.
    pub fn take_new(&mut self, rows: Vec<Change>) -> Vec<Change> {
        let baseline = self.baseline;
        let fresh: Vec<Change> = rows
            .into_iter()
            .filter(|c| c.id > baseline && self.applied.insert(c.id))
            .collect();
        if let Some(max) = fresh.iter().map(|c| c.id).max() {
            self.high = self.high.max(max);
        }
        let floor = self.low_water();
        self.applied = self.applied.split_off(&floor);
        fresh
    }
}

impl ChangeFollower {
    pub fn new(store: Store, cache: Arc<PrincipalCache>) -> Self {
        Self {
            store,
            cache,
            errors: LogEvery::new(Duration::from_secs(30)),
        }
    }

    async fn highest_id(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM revocations")
            .fetch_one(self.store.pool().await)
            .await
    }

    async fn changes_above(&self, low: i64) -> Result<Vec<Change>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, key_id FROM revocations WHERE id > $1 ORDER BY id LIMIT 5000",
        )
        .bind(low)
        .fetch_all(self.store.pool().await)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Change {
                    id: r.try_get("id")?,
                    tenant_id: r.try_get::<Option<i64>, _>("tenant_id")?.unwrap_or(0),
                    key_id: r.try_get("key_id")?,
                })
            })
            .collect()
    }

    async fn apply(&self, change: Change) {
        if let Err(e) = self.cache.invalidate(change.tenant_id, change.key_id).await {
            // The local cache is already cleared; the Redis entry expires with its TTL.
            self.errors.warn(
                || tracing::warn!(error = %e, "could not delete changed keys from the redis cache"),
            );
        }
    }
}

#[async_trait]
impl BackgroundService for ChangeFollower {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut cursor: Option<FeedCursor> = None;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let result = match cursor.as_mut() {
                None => self
                    .highest_id()
                    .await
                    .map(|high| cursor = Some(FeedCursor::starting_at(high))),
                Some(c) => match self.changes_above(c.low_water()).await {
                    Ok(rows) => {
                        for change in c.take_new(rows) {
                            tracing::debug!(
                                change = change.id,
                                tenant_id = change.tenant_id,
                                key_id = change.key_id,
                                "invalidating cached keys"
                            );
                            self.apply(change).await;
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = result {
                self.errors.warn(|| tracing::warn!(error = %e, "change feed unavailable; cached keys keep their state until postgres answers"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: i64) -> Change {
        Change {
            id,
            tenant_id: 1,
            key_id: Some(id),
        }
    }

    #[test]
    fn applies_each_change_once_even_when_commits_are_out_of_order() {
        let mut cur = FeedCursor::starting_at(10);
        assert!(
            cur.take_new(vec![c(9), c(10)]).is_empty(),
            "history before start is ignored"
        );
        assert_eq!(cur.take_new(vec![c(11), c(13)]), vec![c(11), c(13)]);
        // 12 commits late: still seen, once.
        assert_eq!(cur.take_new(vec![c(11), c(12), c(13)]), vec![c(12)]);
        assert!(cur.take_new(vec![c(11), c(12), c(13)]).is_empty());
        assert_eq!(cur.low_water(), 0);
        let mut far = FeedCursor::starting_at(5000);
        far.take_new(vec![c(5001)]);
        assert_eq!(far.low_water(), 5001 - LATE_COMMIT_WINDOW);
    }
}
