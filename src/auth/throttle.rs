//! Per-IP auth-failure throttle (SPEC §3): past a number of failures per minute an address gets
//! 429 until the window passes. Only tokens that missed the positive cache are counted, so a
//! cached valid key is never slowed down by someone else's failures.

use std::net::IpAddr;
use std::time::Duration;

use pingora_limits::rate::Rate;

const WINDOW: Duration = Duration::from_secs(60);

/// Count-min sketch size: 4 × 64 Ki slots (about 4 MiB for both windows). The sketch only
/// over-counts on collisions; this size keeps that rare even when many addresses fail at once
/// (the default 4 × 1024 would let ~2000 failing addresses push everyone over the limit).
const HASHES: usize = 4;
const SLOTS: usize = 64 * 1024;

pub struct FailureThrottle {
    rate: Rate,
    limit: f64,
}

/// IPv6 clients get a /64 each, so one host cannot rotate through its prefix to dodge the
/// throttle or to fill the sketch.
fn subject(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
        v4 => v4,
    }
}

impl FailureThrottle {
    pub fn new(limit_per_min: u32) -> Self {
        Self {
            rate: Rate::new_with_estimator_config(WINDOW, HASHES, SLOTS),
            limit: f64::from(limit_per_min),
        }
    }

    /// `Some(retry_after)` when this address is over its failure budget.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let (estimate, fraction) = self.rate.rate_with(&subject(ip), |c| {
            // Sliding window: the previous minute weighted by how much of it still overlaps.
            let prev = c.prev_samples as f64 * (1.0 - c.current_interval_fraction);
            (prev + c.curr_samples as f64, c.current_interval_fraction)
        });
        if estimate < self.limit {
            return None;
        }
        let left = WINDOW.as_secs_f64() * (1.0 - fraction);
        Some(Duration::from_secs(left.ceil().max(1.0) as u64))
    }

    pub fn record_failure(&self, ip: IpAddr) {
        self.rate.observe(&subject(ip), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_and_only_that_address() {
        let t = FailureThrottle::new(3);
        let bad: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..2 {
            t.record_failure(bad);
            assert!(t.blocked(bad).is_none());
        }
        t.record_failure(bad);
        let retry = t.blocked(bad).expect("blocked at the limit");
        assert!(retry <= Duration::from_secs(60) && retry >= Duration::from_secs(1));
        assert!(t.blocked(other).is_none());
    }

    #[test]
    fn ipv6_hosts_share_their_64() {
        let t = FailureThrottle::new(2);
        t.record_failure("2001:db8::1".parse().unwrap());
        t.record_failure("2001:db8::ffff:2".parse().unwrap());
        assert!(t.blocked("2001:db8::3".parse().unwrap()).is_some());
        assert!(t.blocked("2001:db8:0:1::3".parse().unwrap()).is_none());
    }
}
