//! The Redis connection, driven from the proxy's own runtime.
//!
//! fred runs one task per connection that writes commands and reads replies; it lives on the
//! runtime that called `connect()`. Started from a background service, that task sat on the
//! service's own thread, and each of a request's two `EVALSHA`s crossed threads twice (request
//! task → connection thread → request task): the profile's largest cost (BENCHMARKS.md,
//! "Where the time goes"). Connecting from the first request instead puts the task on the proxy
//! workers, where a reply wakes the request task on the same thread.

use std::time::Duration;

use fred::prelude::{Client, ClientLike};
use tokio::sync::OnceCell;

pub struct RedisLink {
    client: Client,
    connected: OnceCell<()>,
    /// How long the first request waits for the first connection.
    first_wait: Duration,
}

impl RedisLink {
    pub fn new(client: Client, first_wait: Duration) -> Self {
        Self {
            client,
            connected: OnceCell::new(),
            first_wait,
        }
    }

    /// Connects on the caller's runtime the first time; afterwards one atomic load. A Redis that
    /// is away at the first request is retried by fred's reconnect policy, on the same runtime.
    pub async fn ensure_connected(&self) {
        self.connected
            .get_or_init(|| async {
                let _task = self.client.connect();
                let waited =
                    tokio::time::timeout(self.first_wait, self.client.wait_for_connect()).await;
                if !matches!(waited, Ok(Ok(()))) {
                    tracing::warn!(
                        "redis not reachable yet; retried in the background (limits and budgets answer as when Redis is down meanwhile)"
                    );
                }
            })
            .await;
    }

    pub fn is_started(&self) -> bool {
        self.connected.initialized()
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}
