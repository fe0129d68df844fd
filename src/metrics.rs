//! Prometheus metrics (SPEC §12), served on the internal `METRICS_ADDR` listener. Labels are
//! route labels from the route table, statuses, surfaces, reasons and tenant names: never a
//! key, a prefix, a path the client chose, or anything secret.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    register_histogram, register_histogram_vec, register_int_counter_vec, register_int_gauge,
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

fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    register_histogram_vec!(opts.clone(), labels).unwrap_or_else(|_| {
        HistogramVec::new(opts, labels).unwrap_or_else(|_| std::process::abort())
    })
}

fn histogram(name: &str, help: &str) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    register_histogram!(opts.clone())
        .unwrap_or_else(|_| Histogram::with_opts(opts).unwrap_or_else(|_| std::process::abort()))
}

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "nz_requests_total",
        "Requests by surface, route and status",
        &["surface", "route", "status"],
    )
});
pub static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "nz_request_duration_seconds",
        "Total request time by surface and route",
        &["surface", "route"],
    )
});
pub static OVERHEAD_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "nz_gateway_overhead_seconds",
        "Time the gateway itself adds: total time minus the time spent waiting on the upstream",
    )
});
pub static UPSTREAM_TTFB_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "nz_upstream_ttfb_seconds",
        "Time from sending a request upstream to its response headers",
        &["route"],
    )
});
pub static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "nz_tokens_total",
        "Tokens by direction (prompt, completion) and tenant",
        &["direction", "tenant"],
    )
});
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
pub static INFLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("nz_inflight_requests", "Requests holding an upstream slot").unwrap_or_else(
        |_| {
            IntGauge::new("nz_inflight_requests_unregistered", "x")
                .unwrap_or_else(|_| std::process::abort())
        },
    )
});

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

/// A route's labelled series, resolved once per thread: `with_label_values` hashes every
/// label with SipHash and takes a lock, five times per request otherwise.
#[derive(Clone)]
struct RouteSeries {
    requests: IntCounter,
    seconds: Histogram,
}

#[derive(Clone)]
struct TenantSeries {
    prompt: IntCounter,
    completion: IntCounter,
}

/// Above this many entries a thread's cache starts over (tenant names are operator-made, but
/// nothing bounds how many there are).
const SERIES_CACHE_MAX: usize = 4096;

type RouteKey = (&'static str, &'static str, u16);

thread_local! {
    static ROUTES: RefCell<HashMap<RouteKey, RouteSeries, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
    static TTFB: RefCell<HashMap<&'static str, Histogram, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
    static TENANTS: RefCell<HashMap<Box<str>, TenantSeries, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

fn route_series(surface: &'static str, route: &'static str, status: u16) -> RouteSeries {
    let resolve = || {
        let mut digits = itoa::Buffer::new();
        RouteSeries {
            requests: REQUESTS.with_label_values(&[surface, route, digits.format(status)]),
            seconds: REQUEST_SECONDS.with_label_values(&[surface, route]),
        }
    };
    ROUTES.with(|cache| {
        let Ok(mut cache) = cache.try_borrow_mut() else {
            return resolve();
        };
        if cache.len() >= SERIES_CACHE_MAX {
            cache.clear();
        }
        cache
            .entry((surface, route, status))
            .or_insert_with(resolve)
            .clone()
    })
}

/// Only routes that reached an upstream get a TTFB series.
fn ttfb_series(route: &'static str) -> Histogram {
    let resolve = || UPSTREAM_TTFB_SECONDS.with_label_values(&[route]);
    TTFB.with(|cache| match cache.try_borrow_mut() {
        Ok(mut cache) => cache.entry(route).or_insert_with(resolve).clone(),
        Err(_) => resolve(),
    })
}

fn tenant_series(tenant: &str) -> TenantSeries {
    let resolve = || TenantSeries {
        prompt: TOKENS.with_label_values(&["prompt", tenant]),
        completion: TOKENS.with_label_values(&["completion", tenant]),
    };
    TENANTS.with(|cache| {
        let Ok(mut cache) = cache.try_borrow_mut() else {
            return resolve();
        };
        if let Some(series) = cache.get(tenant) {
            return series.clone();
        }
        if cache.len() >= SERIES_CACHE_MAX {
            cache.clear();
        }
        let series = resolve();
        cache.insert(tenant.into(), series.clone());
        series
    })
}

pub fn record(f: &Finished<'_>) {
    let series = route_series(f.surface, f.route, f.status);
    series.requests.inc();
    series.seconds.observe(f.total.as_secs_f64());
    OVERHEAD_SECONDS.observe(
        f.total
            .saturating_sub(f.upstream.unwrap_or_default())
            .as_secs_f64(),
    );
    if let Some(ttfb) = f.upstream_ttfb {
        ttfb_series(f.route).observe(ttfb.as_secs_f64());
    }
    if let (Some(tenant), Some((prompt, completion))) = (f.tenant, f.tokens) {
        let tokens = tenant_series(tenant);
        tokens.prompt.inc_by(prompt);
        tokens.completion.inc_by(completion);
    }
}

pub fn store_error(store: &str, op: &str) {
    STORE_ERRORS.with_label_values(&[store, op]).inc();
}
