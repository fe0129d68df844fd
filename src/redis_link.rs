//! Redis connections and who drives them.
//!
//! fred runs one task per connection that writes commands and reads replies; it lives on the
//! runtime that called `connect()`. Started from a background service, that task sat on the
//! service's own thread, and each of a request's two `EVALSHA`s crossed threads twice (request
//! task → connection thread → request task): the profile's largest cost (BENCHMARKS.md). The
//! proxy's connection is therefore started by its first request, on the proxy workers' runtime,
//! where a reply wakes the request task without a hand-off. A second connection, started by a
//! background service, serves what must work before any request: the change feed's cache
//! cleanup and lease renewal.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::prelude::{Client, ClientLike};
use tokio::sync::OnceCell;

use crate::log_throttle::LogEvery;

/// Pause before connecting again after a failed first connection.
const RETRY_EVERY: Duration = Duration::from_millis(500);

pub struct RedisLink {
    client: Client,
    started: OnceCell<()>,
    stopping: AtomicBool,
    /// How long the first user waits for the first connection.
    first_wait: Duration,
}

impl RedisLink {
    pub fn new(client: Client, first_wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            client,
            started: OnceCell::new(),
            stopping: AtomicBool::new(false),
            first_wait,
        })
    }

    /// Starts the connection on the caller's runtime the first time and waits a moment for
    /// it; afterwards one atomic load. While Redis is away, commands fail at once (limits and
    /// budgets answer as the SPEC says for a Redis fault) and the connection keeps retrying.
    pub async fn ensure_connected(self: &Arc<Self>) {
        self.started
            .get_or_init(|| async {
                tokio::spawn(self.clone().keep_connected());
                let waited =
                    tokio::time::timeout(self.first_wait, self.client.wait_for_connect()).await;
                if !matches!(waited, Ok(Ok(()))) {
                    tracing::warn!("redis not reachable yet; retrying in the background");
                }
            })
            .await;
    }

    /// Keeps the connection up until [`RedisLink::quit`]. fred reconnects a connection that
    /// drops, but with `fail_fast` (so commands fail at once while Redis is away) a first
    /// connection that fails ends its task: start it again.
    async fn keep_connected(self: Arc<Self>) {
        let warning = LogEvery::new(Duration::from_secs(30));
        while !self.stopping.load(Ordering::Acquire) {
            match self.client.connect().await {
                Ok(Ok(())) | Err(_) => return,
                Ok(Err(e)) => warning.warn(|| {
                    tracing::warn!(error = %e, "redis not reachable; connecting again");
                }),
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Closes the connection for good (shutdown).
    pub async fn quit(&self) {
        self.stopping.store(true, Ordering::Release);
        if self.started.initialized() {
            let _ = self.client.quit().await;
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Bounds one call on the proxy's connection. That client has no per-command timeout of its
/// own: fred's uses Tokio's timer wheel, whose lock the proxy workers then contended for twice
/// per command (the profile showed the spinning as `sched_yield`). Pingora's timer takes no
/// global lock.
pub async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, fred::error::Error> {
    match pingora_timeout::fast_timeout::fast_timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(fred::error::Error::new(
            fred::error::ErrorKind::Timeout,
            "redis call timed out",
        )),
    }
}
