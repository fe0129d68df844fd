//! Latency and outcome accounting: HDR histograms (microseconds) for the whole request and the
//! first body byte, counts by status, completion tokens; live counters for the progress line.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::client::{Outcome, Timing};

/// Highest latency the histograms track: one hour.
const MAX_US: u64 = 3_600_000_000;

pub struct Recorder {
    inner: Mutex<Inner>,
    pub live: Live,
    /// Requests whose intended start is before this are not recorded (warm-up).
    measure_from: Instant,
    measured: AtomicU64,
}

/// Lock-free counters the progress line reads.
#[derive(Default)]
pub struct Live {
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub inflight: AtomicU64,
    pub tokens: AtomicU64,
}

struct Inner {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    by_status: BTreeMap<String, u64>,
    ok: u64,
    requests: u64,
    tokens: u64,
    body_bytes: u64,
    first_measured: Option<Instant>,
    last_done: Option<Instant>,
}

fn histogram() -> Histogram<u64> {
    // 3 significant digits over 1 us .. 1 h: constant, valid bounds.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid")
}

impl Recorder {
    pub fn new(measure_from: Instant) -> Self {
        Recorder {
            inner: Mutex::new(Inner {
                latency: histogram(),
                ttfb: histogram(),
                by_status: BTreeMap::new(),
                ok: 0,
                requests: 0,
                tokens: 0,
                body_bytes: 0,
                first_measured: None,
                last_done: None,
            }),
            live: Live::default(),
            measure_from,
            measured: AtomicU64::new(0),
        }
    }

    pub fn measure_from(&self) -> Instant {
        self.measure_from
    }

    /// Measured (post-warm-up) requests so far.
    pub fn summary_count(&self) -> u64 {
        self.measured.load(Ordering::Relaxed)
    }

    /// Records one finished request that was meant to start at `intended`.
    pub fn record(&self, intended: Instant, t: &Timing) {
        let ok = matches!(t.outcome, Outcome::Status(s) if (200..300).contains(&s));
        self.live.done.fetch_add(1, Ordering::Relaxed);
        self.live
            .tokens
            .fetch_add(t.completion_tokens, Ordering::Relaxed);
        if !ok {
            self.live.failed.fetch_add(1, Ordering::Relaxed);
        }
        if intended < self.measure_from {
            return;
        }
        self.measured.fetch_add(1, Ordering::Relaxed);
        let us = |d: Duration| (d.as_micros() as u64).clamp(1, MAX_US);
        let Ok(mut g) = self.inner.lock() else { return };
        g.requests += 1;
        g.first_measured.get_or_insert(intended);
        g.last_done = Some(g.last_done.map_or(t.done, |l| l.max(t.done)));
        let _ = g
            .latency
            .record(us(t.done.saturating_duration_since(intended)));
        if let Some(fb) = t.first_byte {
            let _ = g.ttfb.record(us(fb.saturating_duration_since(intended)));
        }
        g.tokens += t.completion_tokens;
        g.body_bytes += t.body_bytes;
        if ok {
            g.ok += 1;
        }
        let key = match t.outcome {
            Outcome::Status(s) => s.to_string(),
            Outcome::Transport => "transport".to_string(),
        };
        *g.by_status.entry(key).or_default() += 1;
    }

    /// Summary over the measured window `elapsed` (wall time of the measured part).
    pub fn summary(&self, elapsed: Duration) -> Summary {
        let Ok(g) = self.inner.lock() else {
            return Summary::default();
        };
        let secs = elapsed.as_secs_f64().max(1e-9);
        let q = |h: &Histogram<u64>, p: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(p) as f64 / 1000.0
            }
        };
        let errors: BTreeMap<String, u64> = g
            .by_status
            .iter()
            .filter(|(k, _)| !k.starts_with('2'))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        Summary {
            requests: g.requests,
            sent: self.live.done.load(Ordering::Relaxed),
            ok: g.ok,
            errors: g.requests - g.ok,
            by_status: g.by_status.clone(),
            errors_by_status: errors,
            seconds: secs,
            rps: g.requests as f64 / secs,
            tokens: g.tokens,
            tokens_per_s: g.tokens as f64 / secs,
            body_bytes: g.body_bytes,
            latency_ms: Percentiles {
                p50: q(&g.latency, 0.5),
                p90: q(&g.latency, 0.9),
                p99: q(&g.latency, 0.99),
                p999: q(&g.latency, 0.999),
                max: g.latency.max() as f64 / 1000.0,
                mean: g.latency.mean() / 1000.0,
            },
            ttfb_ms: Percentiles {
                p50: q(&g.ttfb, 0.5),
                p90: q(&g.ttfb, 0.9),
                p99: q(&g.ttfb, 0.99),
                p999: q(&g.ttfb, 0.999),
                max: g.ttfb.max() as f64 / 1000.0,
                mean: g.ttfb.mean() / 1000.0,
            },
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Summary {
    /// Requests measured (after the warm-up).
    pub requests: u64,
    /// Requests finished in total, warm-up included.
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    /// Every outcome: HTTP status code, or `transport` (connect/read/write failure).
    pub by_status: BTreeMap<String, u64>,
    /// The non-2xx part of `by_status`.
    pub errors_by_status: BTreeMap<String, u64>,
    pub seconds: f64,
    pub rps: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub body_bytes: u64,
    pub latency_ms: Percentiles,
    pub ttfb_ms: Percentiles,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_not_recorded() {
        let start = Instant::now();
        let r = Recorder::new(start + Duration::from_secs(1));
        let t = Timing {
            outcome: Outcome::Status(200),
            first_byte: Some(start + Duration::from_millis(1)),
            done: start + Duration::from_millis(2),
            completion_tokens: 8,
            body_bytes: 10,
        };
        r.record(start, &t);
        let later = start + Duration::from_secs(2);
        let t2 = Timing {
            first_byte: Some(later + Duration::from_millis(1)),
            done: later + Duration::from_millis(3),
            ..t
        };
        r.record(later, &t2);
        let s = r.summary(Duration::from_secs(1));
        assert_eq!(s.requests, 1);
        assert_eq!(s.tokens, 8);
        assert!((s.latency_ms.p50 - 3.0).abs() < 0.01);
        assert!((s.ttfb_ms.p50 - 1.0).abs() < 0.01);
        assert_eq!(r.live.done.load(Ordering::Relaxed), 2);
    }
}
