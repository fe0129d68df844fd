//! Prometheus metrics (SPEC §12), served on the internal `METRICS_ADDR` listener. Labels are
//! route labels from the route table, statuses, surfaces, reasons and tenant names: never a
//! key, a prefix, a path the client chose, or anything secret.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, register_histogram,
    register_int_counter_vec, register_int_gauge,
};

/// Latency buckets from 100 µs (the gateway's own cost) to 10 min (a long generation).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Registration only fails for a duplicate name, which would be a bug caught by every test run;
/// a fallback unregistered metric keeps the request path free of panics anyway.
fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register_int_counter_vec!(Opts::new(name, help), labels).unwrap_or_else(|_| {
        IntCounterVec::new(Opts::new(format!("{name}_unregistered"), help), labels)
            .unwrap_or_else(|_| std::process::abort())
    })
}

/// The per-request series. They are registered through [`PerThread`], which first adds what
/// each thread has counted since the last scrape.
static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    unregistered(IntCounterVec::new(
        Opts::new("nz_requests_total", "Requests by surface, route and status"),
        &["surface", "route", "status"],
    ))
});
static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    unregistered(HistogramVec::new(
        latency_opts(
            "nz_request_duration_seconds",
            "Total request time by surface and route",
        ),
        &["surface", "route"],
    ))
});
static OVERHEAD_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    unregistered(Histogram::with_opts(latency_opts(
        "nz_gateway_overhead_seconds",
        "Time the gateway itself adds: total time minus the time spent waiting on the upstream",
    )))
});
static UPSTREAM_TTFB_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    unregistered(HistogramVec::new(
        latency_opts(
            "nz_upstream_ttfb_seconds",
            "Time from sending a request upstream to its response headers",
        ),
        &["route"],
    ))
});
static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    unregistered(IntCounterVec::new(
        Opts::new(
            "nz_tokens_total",
            "Tokens by direction (prompt, completion) and tenant",
        ),
        &["direction", "tenant"],
    ))
});

fn latency_opts(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
}

/// Building a metric only fails on invalid names or labels, fixed above and exercised by
/// every test run.
fn unregistered<T>(metric: prometheus::Result<T>) -> T {
    metric.unwrap_or_else(|_| std::process::abort())
}

pub static RATE_LIMITED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "nz_rate_limit_rejections_total",
        "Requests refused by a rate limit, by scope and kind",
        &["scope", "kind"],
    )
});
pub static AUTH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "nz_auth_failures_total",
        "Refused authentications by reason",
        &["reason"],
    )
});
pub static STORE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "nz_store_errors_total",
        "Redis and Postgres errors by store and operation",
        &["store", "op"],
    )
});
/// `nz_inflight_requests`: read from the proxy's own slot counter at each scrape, so a
/// request does not also write a gauge every worker thread shares.
pub fn register_inflight(slots: Arc<std::sync::atomic::AtomicUsize>) {
    let gauge = prometheus::PullingGauge::new(
        "nz_inflight_requests",
        "Requests holding an upstream slot",
        Box::new(move || slots.load(std::sync::atomic::Ordering::Relaxed) as f64),
    );
    match gauge.map(|g| prometheus::register(Box::new(g))) {
        Ok(Ok(())) => {}
        // A second server in one process (tests) keeps the first one's gauge.
        Ok(Err(e)) | Err(e) => tracing::debug!(error = %e, "inflight gauge not registered"),
    }
}

pub static AUDIT_QUEUE: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "nz_audit_queue_depth",
        "Audit events waiting for the writer",
    )
});
pub static AUDIT_SPOOL_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "nz_audit_spool_bytes",
        "Bytes of audit events spooled while Postgres is away",
    )
});
pub static UPSTREAM_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "nz_upstream_up",
        "1 when the last model discovery poll reached an upstream, else 0",
    )
});
pub static UPSTREAM_MODELS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "nz_upstream_models",
        "Models the upstreams listed at the last successful discovery poll",
    )
});
pub static AUDIT_BATCH: LazyLock<Histogram> = LazyLock::new(|| {
    let opts = HistogramOpts::new("nz_audit_batch_size", "Audit events per written batch")
        .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 512.0]);
    register_histogram!(opts.clone())
        .unwrap_or_else(|_| Histogram::with_opts(opts).unwrap_or_else(|_| std::process::abort()))
});

fn gauge(name: &str, help: &str) -> IntGauge {
    register_int_gauge!(name, help).unwrap_or_else(|_| {
        IntGauge::new(format!("{name}_unregistered"), help)
            .unwrap_or_else(|_| std::process::abort())
    })
}

/// Everything the `logging` phase knows about a finished request.
pub struct Finished<'a> {
    pub surface: &'static str,
    pub route: &'static str,
    pub status: u16,
    pub total: Duration,
    pub upstream: Option<Duration>,
    pub upstream_ttfb: Option<Duration>,
    pub tenant: Option<&'a str>,
    pub tokens: Option<(u64, u64)>,
}

/// Above this many series a thread's table is flushed and starts over (tenant names are
/// operator-made, but nothing bounds how many there are).
const SERIES_CACHE_MAX: usize = 4096;

type RouteKey = (&'static str, &'static str, u16);
type Fast = foldhash::fast::RandomState;

struct RouteSeries {
    requests: LocalIntCounter,
    seconds: LocalHistogram,
}

struct TenantSeries {
    prompt: LocalIntCounter,
    completion: LocalIntCounter,
}

/// One thread's counts since the last scrape. Shared series are atomics that every worker
/// thread writes in turn, each write taking the cache line from the other core; here a
/// request only touches its own thread's memory (`with_label_values` would also hash every
/// label with SipHash and take a lock, five times per request). The mutex is only ever
/// contended by a scrape.
#[derive(Default)]
struct ThreadSeries {
    routes: HashMap<RouteKey, RouteSeries, Fast>,
    ttfb: HashMap<&'static str, LocalHistogram, Fast>,
    tenants: HashMap<Box<str>, TenantSeries, Fast>,
    overhead: Option<LocalHistogram>,
}

impl ThreadSeries {
    fn flush(&mut self) {
        for s in self.routes.values() {
            s.requests.flush();
            s.seconds.flush();
        }
        for h in self.ttfb.values() {
            h.flush();
        }
        for s in self.tenants.values() {
            s.prompt.flush();
            s.completion.flush();
        }
        if let Some(h) = &self.overhead {
            h.flush();
        }
    }

    fn record(&mut self, f: &Finished<'_>) {
        if self.routes.len() >= SERIES_CACHE_MAX || self.tenants.len() >= SERIES_CACHE_MAX {
            self.flush();
            self.routes.clear();
            self.tenants.clear();
        }
        let route = self
            .routes
            .entry((f.surface, f.route, f.status))
            .or_insert_with(|| {
                let mut digits = itoa::Buffer::new();
                RouteSeries {
                    requests: REQUESTS
                        .with_label_values(&[f.surface, f.route, digits.format(f.status)])
                        .local(),
                    seconds: REQUEST_SECONDS
                        .with_label_values(&[f.surface, f.route])
                        .local(),
                }
            });
        route.requests.inc();
        route.seconds.observe(f.total.as_secs_f64());
        self.overhead
            .get_or_insert_with(|| OVERHEAD_SECONDS.local())
            .observe(overhead(f).as_secs_f64());
        if let Some(ttfb) = f.upstream_ttfb {
            self.ttfb
                .entry(f.route)
                .or_insert_with(|| UPSTREAM_TTFB_SECONDS.with_label_values(&[f.route]).local())
                .observe(ttfb.as_secs_f64());
        }
        if let (Some(tenant), Some((prompt, completion))) = (f.tenant, f.tokens) {
            let series = match self.tenants.get(tenant) {
                Some(series) => series,
                None => self
                    .tenants
                    .entry(tenant.into())
                    .or_insert_with(|| TenantSeries {
                        prompt: TOKENS.with_label_values(&["prompt", tenant]).local(),
                        completion: TOKENS.with_label_values(&["completion", tenant]).local(),
                    }),
            };
            series.prompt.inc_by(prompt);
            series.completion.inc_by(completion);
        }
    }
}

impl Drop for ThreadSeries {
    /// A thread that ends (a runtime shutting down) hands over what it counted.
    fn drop(&mut self) {
        self.flush();
    }
}

fn overhead(f: &Finished<'_>) -> Duration {
    f.total.saturating_sub(f.upstream.unwrap_or_default())
}

/// Every thread's [`ThreadSeries`], for the scrape to flush.
static THREADS: Mutex<Vec<Weak<Mutex<ThreadSeries>>>> = Mutex::new(Vec::new());

thread_local! {
    static MINE: Arc<Mutex<ThreadSeries>> = {
        let mine = Arc::new(Mutex::new(ThreadSeries::default()));
        let mut threads = THREADS.lock().unwrap_or_else(PoisonError::into_inner);
        threads.retain(|t| t.strong_count() > 0);
        threads.push(Arc::downgrade(&mine));
        mine
    };
}

/// The per-request series in the registry: a scrape first adds every thread's counts, so what
/// it reads is exact.
struct PerThread;

/// The shared series behind [`PerThread`].
fn per_request_series() -> [&'static dyn Collector; 5] {
    [
        &*REQUESTS,
        &*REQUEST_SECONDS,
        &*OVERHEAD_SECONDS,
        &*UPSTREAM_TTFB_SECONDS,
        &*TOKENS,
    ]
}

impl Collector for PerThread {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        per_request_series()
            .into_iter()
            .flat_map(Collector::desc)
            .collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let threads: Vec<_> = THREADS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for t in threads {
            t.lock().unwrap_or_else(PoisonError::into_inner).flush();
        }
        per_request_series()
            .into_iter()
            .flat_map(Collector::collect)
            .collect()
    }
}

static PER_THREAD: LazyLock<()> = LazyLock::new(|| {
    // Registration only fails for a duplicate name: a bug every test run would show.
    if let Err(e) = prometheus::register(Box::new(PerThread)) {
        tracing::error!(error = %e, "per-request metrics not registered");
    }
});

pub fn record(f: &Finished<'_>) {
    LazyLock::force(&PER_THREAD);
    let counted = MINE.try_with(|mine| {
        mine.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(f)
    });
    if counted.is_err() {
        // This thread is ending: count straight into the shared series.
        record_shared(f);
    }
}

fn record_shared(f: &Finished<'_>) {
    let mut digits = itoa::Buffer::new();
    REQUESTS
        .with_label_values(&[f.surface, f.route, digits.format(f.status)])
        .inc();
    REQUEST_SECONDS
        .with_label_values(&[f.surface, f.route])
        .observe(f.total.as_secs_f64());
    OVERHEAD_SECONDS.observe(overhead(f).as_secs_f64());
    if let Some(ttfb) = f.upstream_ttfb {
        UPSTREAM_TTFB_SECONDS
            .with_label_values(&[f.route])
            .observe(ttfb.as_secs_f64());
    }
    if let (Some(tenant), Some((prompt, completion))) = (f.tenant, f.tokens) {
        TOKENS.with_label_values(&["prompt", tenant]).inc_by(prompt);
        TOKENS
            .with_label_values(&["completion", tenant])
            .inc_by(completion);
    }
}

pub fn store_error(store: &str, op: &str) {
    STORE_ERRORS.with_label_values(&[store, op]).inc();
}
