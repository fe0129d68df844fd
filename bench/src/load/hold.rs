//! Hold mode: open streams step by step up to each of `hold_counts`, keep them all open (they
//! trickle chunks as slowly as the scenario's `sim.chunk_delay_ms` says) and sample the proxy's
//! RSS at each step and again after `hold_for`, which shows memory per stream and whether
//! memory stays flat while streams run long.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, Semaphore, watch};

use super::Load;
use super::client::{self, Conn, RequestSpec};
use super::procstat;

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct HoldStep {
    /// Streams asked for at this step.
    pub streams: usize,
    /// Streams that got their first body byte (the rest failed).
    pub open: u64,
    pub failed: u64,
    /// Seconds to open this step's new streams.
    pub open_seconds: f64,
    /// The proxy's RSS after the step settled, KiB (when a pid was given).
    pub rss_kib: Option<u64>,
    /// (RSS now - RSS at the previous step) / (streams now - streams then), KiB per stream.
    pub kib_per_stream: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct HoldResult {
    pub steps: Vec<HoldStep>,
    /// RSS of the proxy after the largest step was held for `held_seconds`, KiB.
    pub rss_after_hold_kib: Option<u64>,
    pub held_seconds: f64,
    /// The proxy's RSS before any stream was opened, KiB.
    pub rss_before_kib: Option<u64>,
}

/// Opens at most this many streams at once (a burst larger than the listen backlog would only
/// measure SYN retries).
const OPENING: usize = 256;

pub async fn run(
    load: Arc<Load>,
    counts: &[usize],
    hold_for: Duration,
    pid: Option<u32>,
    progress: bool,
) -> HoldResult {
    let rss = || pid.and_then(procstat::memory).map(|(rss, _)| rss);
    let (stop_tx, stop_rx) = watch::channel(false);
    let opening = Arc::new(Semaphore::new(OPENING));
    let open = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let changed = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    let mut result = HoldResult {
        rss_before_kib: rss(),
        ..HoldResult::default()
    };
    let mut prev: Option<(usize, u64)> = result.rss_before_kib.map(|r| (0, r));
    let mut started = 0usize;
    for &count in counts {
        let step_start = Instant::now();
        while started < count {
            let Ok(permit) = opening.clone().acquire_owned().await else {
                break;
            };
            let n = started as u64;
            let (load, open, failed, changed, stop) = (
                load.clone(),
                open.clone(),
                failed.clone(),
                changed.clone(),
                stop_rx.clone(),
            );
            tasks.spawn(async move {
                let spec = RequestSpec {
                    target: &load.target,
                    key: load.key(n),
                    req: load.mix.pick(n),
                    sim: load.sim,
                };
                let ready = |ok: bool| {
                    if ok { &open } else { &failed }.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    changed.notify_one();
                };
                match Conn::open(&load.target).await {
                    Ok(mut conn) => {
                        let r = client::hold_stream(
                            &mut conn,
                            &spec,
                            ready,
                            stop,
                            Duration::from_secs(60),
                        )
                        .await;
                        drop(r);
                    }
                    Err(_) => ready(false),
                }
            });
            started += 1;
        }
        // Wait until every stream of this step is open or failed.
        loop {
            let settled = open.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
            if settled >= count as u64 {
                break;
            }
            if progress {
                eprint!("\r[hold] {settled}/{count} streams open   ");
            }
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        let open_seconds = step_start.elapsed().as_secs_f64();
        // Let allocator and buffers settle before sampling.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = rss();
        let kib_per_stream = match (prev, now) {
            (Some((n0, r0)), Some(r1)) if count > n0 => {
                Some((r1 as f64 - r0 as f64) / (count - n0) as f64)
            }
            _ => None,
        };
        if let Some(r) = now {
            prev = Some((count, r));
        }
        if progress {
            eprintln!(
                "\r[hold] {count} streams: open {} failed {} rss {} KiB   ",
                open.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed),
                now.map_or_else(|| "?".to_string(), |r| r.to_string())
            );
        }
        result.steps.push(HoldStep {
            streams: count,
            open: open.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            open_seconds,
            rss_kib: now,
            kib_per_stream,
        });
    }
    tokio::time::sleep(hold_for).await;
    result.held_seconds = hold_for.as_secs_f64();
    result.rss_after_hold_kib = rss();
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    result
}
