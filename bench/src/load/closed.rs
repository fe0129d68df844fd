//! Closed loop: `concurrency` workers, each on its own keep-alive connection, sending the next
//! request as soon as the previous one ends. Measures saturated throughput; latency here hides
//! queueing (use the open loop for latency).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Load;
use super::client::{self, Conn, RequestSpec};
use super::stats::Recorder;

pub async fn run(
    load: Arc<Load>,
    concurrency: usize,
    total: Duration,
    max_requests: Option<u64>,
    recorder: Arc<Recorder>,
) {
    let deadline = Instant::now() + total;
    let counter = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let load = load.clone();
        let recorder = recorder.clone();
        let counter = counter.clone();
        workers.spawn(async move {
            let mut conn: Option<Conn> = None;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let n = counter.fetch_add(1, Ordering::Relaxed);
                // Only measured requests count toward the limit; warm-up ones are free.
                if let Some(max) = max_requests {
                    let measured_before = now >= recorder.measure_from();
                    if measured_before && recorder.summary_count() >= max {
                        break;
                    }
                }
                let spec = RequestSpec {
                    target: &load.target,
                    key: load.key(n),
                    req: load.mix.pick(n),
                    sim: load.sim,
                };
                recorder.live.inflight.fetch_add(1, Ordering::Relaxed);
                let c = match conn.take() {
                    Some(c) => Ok(c),
                    None => Conn::open(&load.target).await,
                };
                let (timing, back) = match c {
                    Ok(c) => client::send(c, &spec).await,
                    Err(_) => (client::failed(), None),
                };
                recorder.live.inflight.fetch_sub(1, Ordering::Relaxed);
                recorder.record(now, &timing);
                conn = back;
                if back_off_needed(&timing) {
                    // A refused connection would otherwise spin a core.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

fn back_off_needed(t: &client::Timing) -> bool {
    matches!(t.outcome, client::Outcome::Transport)
}
