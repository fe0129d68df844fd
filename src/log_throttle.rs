//! Logs a recurring condition (a store down) once per interval instead of once per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub struct LogEvery {
    interval_ms: u64,
    last_ms: AtomicU64,
}

impl LogEvery {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Runs `log` if the interval has passed since the last time it ran.
    pub fn warn(&self, log: impl FnOnce()) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.interval_ms
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_per_interval() {
        let every = LogEvery::new(Duration::from_secs(60));
        let mut count = 0;
        for _ in 0..100 {
            every.warn(|| count += 1);
        }
        assert_eq!(count, 1);
    }
}
