//! Open loop: requests start on a fixed schedule (`rate` per second) whatever the server does.
//! Each request's latency counts from its intended start, so a stalled server shows up as
//! latency instead of as fewer requests (coordinated omission is corrected).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Semaphore};

use super::Load;
use super::client::{self, Conn, RequestSpec};
use super::stats::Recorder;

pub async fn run(load: Arc<Load>, rate: f64, total: Duration, recorder: Arc<Recorder>) {
    let start = Instant::now();
    let idle: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::new()));
    let slots = Arc::new(Semaphore::new(load.max_inflight));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    loop {
        let intended = start + interval.mul_f64(n as f64);
        if intended.saturating_duration_since(start) >= total {
            break;
        }
        tokio::time::sleep_until(intended.into()).await;
        let load = load.clone();
        let idle = idle.clone();
        let slots = slots.clone();
        let recorder = recorder.clone();
        tasks.spawn(async move {
            // Waiting for a slot is part of the latency (it starts at `intended`).
            let Ok(_permit) = slots.acquire().await else {
                return;
            };
            recorder.live.inflight.fetch_add(1, Ordering::Relaxed);
            let spec = RequestSpec {
                target: &load.target,
                key: load.key(n),
                req: load.mix.pick(n),
                sim: load.sim,
            };
            let pooled = idle.lock().await.pop();
            let conn = match pooled {
                Some(c) => Ok(c),
                None => Conn::open(&load.target).await,
            };
            let (timing, back) = match conn {
                Ok(c) => client::send(c, &spec).await,
                Err(_) => (client::failed(), None),
            };
            recorder.live.inflight.fetch_sub(1, Ordering::Relaxed);
            recorder.record(intended, &timing);
            if let Some(c) = back {
                idle.lock().await.push(c);
            }
        });
        // Reap finished tasks so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
        n += 1;
    }
    while tasks.join_next().await.is_some() {}
}
