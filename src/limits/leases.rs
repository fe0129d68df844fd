//! Concurrency leases this instance holds, renewed every few seconds by a background service so
//! that a live instance keeps its slots and a crashed one loses them within `LEASE_TTL`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{Client, KeysInterface, SortedSetsInterface};
use fred::types::sorted_sets::Ordering as ZOrdering;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::LEASE_TTL;
use super::keys::AdmissionKeys;
use crate::log_throttle::LogEvery;

const RENEW_EVERY: Duration = Duration::from_secs(3);

/// Keyed by the admission's number in its [`super::Limiter`]: a book serves one limiter.
#[derive(Default)]
pub struct LeaseBook {
    held: Mutex<HashMap<u64, Arc<AdmissionKeys>>>,
}

impl LeaseBook {
    pub fn hold(&self, keys: &Arc<AdmissionKeys>) {
        if let Ok(mut h) = self.held.lock() {
            h.insert(keys.id, keys.clone());
        }
    }

    pub fn release(&self, id: u64) {
        if let Ok(mut h) = self.held.lock() {
            h.remove(&id);
        }
    }

    fn snapshot(&self) -> Vec<Arc<AdmissionKeys>> {
        self.held
            .lock()
            .map(|h| h.values().cloned().collect())
            .unwrap_or_default()
    }
}

pub struct LeaseRenewer {
    pub redis: Client,
    pub book: Arc<LeaseBook>,
    /// Requests in flight: after the shutdown signal, leases are renewed until they are done.
    pub inflight: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl BackgroundService for LeaseRenewer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let warning = LogEvery::new(Duration::from_secs(30));
        let mut tick = tokio::time::interval(RENEW_EVERY);
        let mut stopping = false;
        loop {
            tokio::select! {
                _ = shutdown.changed(), if !stopping => stopping = true,
                _ = tick.tick() => {}
            }
            // Streams still finishing after the signal keep their slots until they end.
            if stopping && self.inflight.load(std::sync::atomic::Ordering::Acquire) == 0 {
                break;
            }
            let held = self.book.snapshot();
            if held.is_empty() {
                continue;
            }
            let until = super::now_ms() as f64 + LEASE_TTL.as_millis() as f64;
            // One command per set, not per lease: idle streams cost O(sets) per tick.
            let mut by_set: HashMap<&str, Vec<(f64, &str)>> = HashMap::new();
            for keys in &held {
                for set in keys.renewed.iter() {
                    by_set
                        .entry(keys.names.get(set))
                        .or_default()
                        .push((until, keys.member.as_str()));
                }
            }
            let pipe = self.redis.pipeline();
            for (set, members) in by_set {
                // XX: only renew a lease that still exists (a settled one stays released).
                let _ = pipe
                    .zadd::<(), _, _>(
                        set,
                        Some(fred::types::SetOptions::XX),
                        None::<ZOrdering>,
                        false,
                        false,
                        members,
                    )
                    .await;
                // The set itself must outlive its longest-running lease.
                let _ = pipe.pexpire::<(), _>(set, 600_000, None).await;
            }
            if let Err(e) = pipe.all::<()>().await {
                warning.warn(|| tracing::warn!(error = %e, "could not renew concurrency leases"));
            }
        }
    }
}
