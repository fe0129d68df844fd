//! Graceful shutdown: Pingora keeps finishing in-flight requests (long streams included) for
//! its grace period after the shutdown signal, and their `logging` phase still needs the
//! services behind it (audit writer, Redis for settlements, lease renewal). Those services wait
//! here until no request holds an upstream slot any more, then stop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Longest a service waits for in-flight requests after the shutdown signal.
pub const MAX_WAIT: Duration = Duration::from_secs(120);

/// Returns once no request is in flight, or after `MAX_WAIT`.
pub async fn until_idle(inflight: &AtomicUsize) {
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    while inflight.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
