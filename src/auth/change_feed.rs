//! Follows the `revocations` change feed so revocation, expiry changes, suspension and any
//! change of a key's or tenant's settings reach every instance's caches within a second
//! (SPEC §3), including changes made directly in the database (triggers feed the table).
//!
//! Every instance reads the table when the trigger's `NOTIFY nz_changes` arrives (`LISTEN` on
//! a connection of its own) and once a second in any case, and, for each new change, evicts
//! the affected principals from its local cache and deletes them from Redis through the
//! per-key and per-tenant index sets. The request path pays nothing for this. Without the
//! listening connection (Postgres unreachable, `LISTEN` refused) it reads every 250 ms and
//! tries to listen again every few seconds.
//!
//! Why listen rather than poll faster: a poll four times a second cost an idle gateway more
//! CPU than anything else it did in the background, and a change still took up to 250 ms to
//! arrive; a notification arrives as its transaction commits. The one-second read stays as
//! the bound SPEC §3 sets, for a notification lost with a connection that died silently.
//!
//! Sequence values are allocated at insert but become visible at commit, so a change can appear
//! with an id below one already seen. The poll therefore re-reads a window below the highest
//! id and remembers which ids it has applied.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::Notify;

use crate::auth::cache::PrincipalCache;
use crate::log_throttle::LogEvery;
use crate::principal::Principal;
use crate::store::Store;
use fred::prelude::Client;

/// How often the table is read while notifications arrive.
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// How often it is read without the listening connection.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often a lost listening connection is tried again.
const RELISTEN_EVERY: Duration = Duration::from_secs(5);
/// The channel the `nz_feed_change` trigger notifies.
const CHANNEL: &str = "nz_changes";
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Changes whose Redis cleanup keeps failing, kept for retry.
const MAX_RETRY: usize = 100_000;
/// How far below the highest applied id a late-committing change is still picked up.
const LATE_COMMIT_WINDOW: i64 = 1000;

pub struct ChangeFollower {
    store: Store,
    cache: Arc<PrincipalCache>,
    /// The background Redis connection (the proxy's own starts with the first request).
    redis: Option<Client>,
    changes: Arc<ChangeLog>,
    /// How far back to replay at start-up: entries other instances cached before this one
    /// started may be stale by changes made in that time.
    replay: Duration,
    errors: LogEvery,
}

/// The recent changes applied per key and per tenant, shared with the authenticator so a
/// cached principal that did not see one of them is treated as a miss (closes the race between
/// a cache fill and an invalidation, here and through Redis on every instance).
#[derive(Default)]
pub struct ChangeLog {
    high: AtomicI64,
    recent: RwLock<Recent>,
    /// Moves after every change recorded: the threads' fronts (`front.rs`) drop what they
    /// found current before it.
    version: AtomicU64,
}

/// Changes remembered per subject (a few; older ones are covered by the cache TTL).
const REMEMBERED_PER_SUBJECT: usize = 32;

#[derive(Default)]
struct Recent {
    // Read by every request; the ids are the operator's, so a fast hash is safe.
    keys: HashMap<i64, Vec<(Change, Instant)>, foldhash::fast::RandomState>,
    tenants: HashMap<i64, Vec<(Change, Instant)>, foldhash::fast::RandomState>,
}

impl ChangeLog {
    /// The version to read before an `outdates` check whose answer a front will keep.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The highest change id applied so far.
    pub fn high(&self) -> i64 {
        self.high.load(Ordering::Acquire)
    }

    /// A change applied to this principal's key or tenant that its read did not see. With the
    /// read's snapshot this is exact, whatever order the changes committed in; without one (an
    /// entry cached by an older version) the change ids decide.
    pub fn outdates(&self, p: &Principal) -> bool {
        let Ok(r) = self.recent.read() else {
            return true;
        };
        let missed = |c: &Change| match (&p.snapshot, c.xid) {
            (Some(snapshot), Some(xid)) => !snapshot.sees(xid),
            _ => c.id > p.feed_seq,
        };
        [r.keys.get(&p.key_id), r.tenants.get(&p.tenant_id)]
            .into_iter()
            .flatten()
            .flatten()
            .any(|(c, _)| missed(c))
    }

    fn record(&self, change: &Change) {
        if let Ok(mut r) = self.recent.write() {
            let map = if change.key_id.is_some() {
                &mut r.keys
            } else {
                &mut r.tenants
            };
            let list = map
                .entry(change.key_id.unwrap_or(change.tenant_id))
                .or_default();
            if list.len() >= REMEMBERED_PER_SUBJECT {
                list.remove(0);
            }
            list.push((*change, Instant::now()));
        }
        self.high.fetch_max(change.id, Ordering::AcqRel);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets changes no cached entry can predate any more.
    fn prune(&self, older_than: Duration) {
        if let Ok(mut r) = self.recent.write() {
            let r = &mut *r;
            for map in [&mut r.keys, &mut r.tenants] {
                map.retain(|_, list| {
                    list.retain(|(_, at)| at.elapsed() < older_than);
                    !list.is_empty()
                });
            }
        }
    }
}

/// One row of the feed: a key (`key_id` set) or a whole tenant changed, in transaction `xid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub id: i64,
    pub tenant_id: i64,
    pub key_id: Option<i64>,
    /// `None` for rows written before the column existed.
    pub xid: Option<i64>,
}

/// Which changes of a poll are new, and the bookkeeping that makes that answer right across
/// out-of-order commits.
pub struct FeedCursor {
    /// The highest id when following started: older changes predate the (empty) caches.
    baseline: i64,
    high: i64,
    applied: BTreeSet<i64>,
    /// The last poll's snapshot xmin: every transaction below it had finished by then.
    horizon: i64,
}

impl FeedCursor {
    pub fn starting_at(high: i64) -> Self {
        Self {
            baseline: high,
            high,
            applied: BTreeSet::new(),
            horizon: 0,
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
    pub fn new(
        store: Store,
        cache: Arc<PrincipalCache>,
        redis: Option<Client>,
        changes: Arc<ChangeLog>,
        cache_ttl: Duration,
    ) -> Self {
        Self {
            store,
            cache,
            redis,
            changes,
            replay: cache_ttl + Duration::from_secs(5),
            errors: LogEvery::new(Duration::from_secs(30)),
        }
    }

    /// Where following starts: before every change recent enough to matter to a cache entry.
    async fn starting_id(&self) -> Result<i64, sqlx::Error> {
        let secs = i64::try_from(self.replay.as_secs()).unwrap_or(i64::MAX);
        sqlx::query_scalar(
            "SELECT COALESCE(max(id), 0) FROM revocations WHERE created_at < now() - make_interval(secs => $1)",
        )
        .bind(secs as f64)
        .fetch_one(self.store.pool().await)
        .await
    }

    /// The changes above `cursor`'s low water that the last poll cannot have seen, and the
    /// snapshot's horizon for the next poll.
    ///
    /// Below the highest id seen, only rows of transactions still running at the last poll
    /// (`xid ≥` that poll's snapshot xmin) can be new: an earlier transaction had committed,
    /// so the last poll read its rows. Without that filter every poll decoded up to the whole
    /// late-commit window again (1 000 rows, four times a second).
    async fn changes_after(&self, cursor: &FeedCursor) -> Result<(Vec<Change>, i64), sqlx::Error> {
        let rows = sqlx::query(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon, \
                    r.id, r.tenant_id, r.key_id, r.xid \
             FROM (SELECT 1) AS one LEFT JOIN LATERAL ( \
                 SELECT id, tenant_id, key_id, xid FROM revocations \
                 WHERE id > $1 AND (id > $2 OR xid IS NULL OR xid >= $3) \
                 ORDER BY id LIMIT 5000) AS r ON true \
             ORDER BY r.id",
        )
        .bind(cursor.low_water())
        .bind(cursor.high)
        .bind(cursor.horizon)
        .fetch_all(self.store.pool().await)
        .await?;
        let horizon = match rows.first() {
            Some(r) => r.try_get("horizon")?,
            None => cursor.horizon,
        };
        let changes = rows
            .iter()
            .filter_map(|r| change_of(r).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        Ok((changes, horizon))
    }

    /// Records the change (so stale copies anywhere are misses from now on) and evicts the
    /// affected principals. `false` when Redis could not be cleaned: the caller retries.
    async fn apply(&self, change: Change) -> bool {
        self.changes.record(&change);
        match self
            .cache
            .invalidate(self.redis.as_ref(), change.tenant_id, change.key_id)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                self.errors.warn(|| {
                    tracing::warn!(error = %e, "could not delete changed keys from the redis cache; will retry")
                });
                false
            }
        }
    }
}

/// A row of [`ChangeFollower::changes_after`]; `None` for the row that only carries the horizon.
fn change_of(r: &sqlx::postgres::PgRow) -> Result<Option<Change>, sqlx::Error> {
    let Some(id) = r.try_get::<Option<i64>, _>("id")? else {
        return Ok(None);
    };
    Ok(Some(Change {
        id,
        tenant_id: r.try_get::<Option<i64>, _>("tenant_id")?.unwrap_or(0),
        key_id: r.try_get("key_id")?,
        xid: r.try_get("xid")?,
    }))
}

/// Wakes the follower for every `NOTIFY nz_changes`, from a task that owns the `LISTEN`
/// connection (a `Notify` permit is never lost, and the connection's read is never cancelled
/// half-way by the follower's other branches).
struct Notifications {
    wake: Arc<Notify>,
    listening: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Notifications {
    fn start(pool: PgPool) -> Self {
        let wake = Arc::new(Notify::new());
        let listening = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(listen(pool, wake.clone(), listening.clone()));
        Self {
            wake,
            listening,
            task,
        }
    }

    /// How long the table may go unread.
    fn poll_every(&self) -> Duration {
        if self.listening.load(Ordering::Acquire) {
            FALLBACK_POLL
        } else {
            POLL_INTERVAL
        }
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on [`CHANNEL`] for as long as the follower runs, connecting again after a loss.
/// Every notification, and every (re)start of listening, wakes the follower: changes made
/// while nobody listened raised no notification here.
async fn listen(pool: PgPool, wake: Arc<Notify>, listening: Arc<AtomicBool>) {
    let errors = LogEvery::new(Duration::from_secs(30));
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut l = match connected.await {
            Ok(l) => l,
            Err(e) => {
                errors.warn(|| tracing::warn!(error = %e, "change feed cannot listen for notifications; reading every 250 ms"));
                tokio::time::sleep(RELISTEN_EVERY).await;
                continue;
            }
        };
        listening.store(true, Ordering::Release);
        wake.notify_one();
        // Ends when the connection is lost (`Ok(None)`) or fails.
        while let Ok(Some(_)) = l.try_recv().await {
            wake.notify_one();
        }
        listening.store(false, Ordering::Release);
        wake.notify_one();
        tokio::time::sleep(RELISTEN_EVERY).await;
    }
}

#[async_trait]
impl BackgroundService for ChangeFollower {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut cursor: Option<FeedCursor> = None;
        let mut retry: Vec<Change> = Vec::new();
        let notes = Notifications::start(self.store.pool().await.clone());
        let mut last_prune = Instant::now();
        loop {
            let next_read = tokio::time::Instant::now() + notes.poll_every();
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = notes.wake.notified() => {}
                _ = tokio::time::sleep_until(next_read) => {}
            }
            let result = match cursor.as_mut() {
                None => self
                    .starting_id()
                    .await
                    .map(|start| cursor = Some(FeedCursor::starting_at(start))),
                Some(c) => self.changes_after(c).await.map(|(rows, horizon)| {
                    retry.extend(c.take_new(rows));
                    c.horizon = horizon;
                }),
            };
            if let Err(e) = result {
                crate::metrics::store_error("postgres", "change_feed");
                self.errors.warn(|| tracing::warn!(error = %e, "change feed unavailable; cached keys keep their state until postgres answers"));
            }
            // Redis cleanup that failed is retried until it succeeds (bounded).
            let pending = std::mem::take(&mut retry);
            for change in pending {
                tracing::debug!(
                    change = change.id,
                    tenant_id = change.tenant_id,
                    key_id = change.key_id,
                    "invalidating cached keys"
                );
                if !self.apply(change).await && retry.len() < MAX_RETRY {
                    retry.push(change);
                }
            }
            if last_prune.elapsed() > PRUNE_EVERY {
                self.changes.prune(self.replay * 2);
                last_prune = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(feed_seq: i64, snapshot: Option<&str>) -> Principal {
        let mut p = Principal::flatten(
            crate::principal::PrincipalIds {
                tenant_id: 1,
                tenant_name: "t".into(),
                key_id: 10,
                key_prefix: "nz_abcdefghi".into(),
                key_name: "k".into(),
            },
            None,
            &Default::default(),
            &Default::default(),
        );
        p.feed_seq = feed_seq;
        p.snapshot = snapshot.and_then(crate::principal::ReadSnapshot::parse);
        p
    }

    #[test]
    fn a_change_the_read_did_not_see_outdates_it() {
        let log = ChangeLog::default();
        assert!(!log.outdates(&principal(0, Some("100:100:"))));
        // Change 5 (xid 103) committed after change 6 (xid 104): a read that saw 6 but not 5
        // has max(id) = 6 and would pass an id comparison; its snapshot says it missed 103.
        log.record(&Change {
            id: 6,
            tenant_id: 1,
            key_id: Some(10),
            xid: Some(104),
        });
        log.record(&Change {
            id: 5,
            tenant_id: 1,
            key_id: Some(10),
            xid: Some(103),
        });
        assert!(log.outdates(&principal(6, Some("103:105:103"))));
        assert!(!log.outdates(&principal(6, Some("105:105:"))));
        // A tenant-wide change covers its keys; old entries without a snapshot compare ids.
        log.record(&Change {
            id: 7,
            tenant_id: 1,
            key_id: None,
            xid: None,
        });
        assert!(log.outdates(&principal(6, None)));
        assert!(!log.outdates(&principal(7, None)));
        assert_eq!(log.high(), 7);
        log.prune(Duration::ZERO);
        assert!(!log.outdates(&principal(0, Some("100:100:"))));
    }

    fn c(id: i64) -> Change {
        Change {
            id,
            tenant_id: 1,
            key_id: Some(id),
            xid: None,
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
