//! The progress line: once a second on stderr, rewritten in place with `\r`.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::stats::Recorder;

/// Prints until the returned sender is dropped or sent to; then ends the line.
pub fn spawn(
    label: String,
    recorder: Arc<Recorder>,
    total: Duration,
    enabled: bool,
) -> tokio::sync::oneshot::Sender<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    if !enabled {
        return tx;
    }
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last_done = 0u64;
        let mut last_tokens = 0u64;
        loop {
            tokio::select! {
                _ = &mut rx => break,
                _ = tick.tick() => {}
            }
            let live = &recorder.live;
            let done = live.done.load(Ordering::Relaxed);
            let tokens = live.tokens.load(Ordering::Relaxed);
            let line = format!(
                "[{label}] {:>4.0}s/{:.0}s  done {done}  {} req/s  {} tok/s  in flight {}  non-2xx/failed {}",
                start.elapsed().as_secs_f64(),
                total.as_secs_f64(),
                done - last_done,
                tokens - last_tokens,
                live.inflight.load(Ordering::Relaxed),
                live.failed.load(Ordering::Relaxed),
            );
            last_done = done;
            last_tokens = tokens;
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{line:<100}");
            let _ = err.flush();
        }
        let _ = writeln!(std::io::stderr());
    });
    tx
}
