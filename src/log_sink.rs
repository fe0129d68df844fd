//! Where log lines go: standard error, written in batches while the gateway serves.
//!
//! At the default level every request logs one line (SPEC §12). Written as it was formatted,
//! that line cost the proxy thread a `write(2)` of its own per request. While `serve` runs,
//! lines are appended to one shared buffer instead and written by [`LogFlusher`], a background
//! service, every [`FLUSH_EVERY`] (or by the thread whose line fills the buffer past
//! [`FLUSH_BYTES`]), cut at line ends into writes of at most 4 KiB, which a pipe keeps whole
//! even while another process (the old one, during a graceful upgrade) writes to it too. Admin
//! commands, start-up and a graceful shutdown (from its signal on) write each line at once;
//! after a fast shutdown (SIGINT) the buffer is written when the server has stopped.
//!
//! What buffering costs: a line reaches the log up to [`FLUSH_EVERY`] late, and a process
//! killed with SIGKILL (or aborted) loses the lines of its last [`FLUSH_EVERY`].
//!
//! The flusher sleeps until a line lands in an empty buffer, then waits [`FLUSH_EVERY`] and
//! writes: a gateway that logs nothing (`RUST_LOG=warn` under load) never wakes it. A timer
//! ticking ten times a second cost an idle thread a wake-up each time, which on a small VM is
//! more CPU than the write it guards.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::Notify;
use tracing_subscriber::fmt::MakeWriter;

pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
pub const FLUSH_BYTES: usize = 64 * 1024;

/// The process's log sink (one: standard error is one file).
pub static STDERR: LogSink = LogSink::new(write_stderr);

fn write_stderr(bytes: &[u8]) {
    // Nowhere to report a failed write to standard error.
    let _ = std::io::stderr().lock().write_all(bytes);
}

pub struct LogSink {
    /// Where lines end up.
    out: fn(&[u8]),
    buffered: AtomicBool,
    lines: Mutex<Vec<u8>>,
    /// Held from taking the buffer until its bytes are written, so batches reach the file in
    /// the order their lines were logged.
    writing: Mutex<()>,
    /// Told when a line lands in an empty buffer.
    pending: Notify,
}

impl LogSink {
    const fn new(out: fn(&[u8])) -> Self {
        Self {
            out,
            buffered: AtomicBool::new(false),
            lines: Mutex::new(Vec::new()),
            writing: Mutex::new(()),
            pending: Notify::const_new(),
        }
    }

    /// From now on lines wait in the buffer (`true`) or are written at once (`false`, after
    /// what was buffered).
    pub fn set_buffered(&self, on: bool) {
        self.buffered.store(on, Ordering::Release);
        if !on {
            self.flush();
        }
    }

    fn append(&self, line: &[u8]) {
        let (first, full) = {
            let mut lines = lock(&self.lines);
            let first = lines.is_empty();
            lines.extend_from_slice(line);
            (first, lines.len() >= FLUSH_BYTES)
        };
        if first {
            // A permit is kept if the flusher is not waiting yet: this line is not forgotten.
            self.pending.notify_one();
        }
        // Buffering may have ended between the caller's check and the append, after the last
        // flush: the line must not wait for one that may never come.
        if full || !self.buffered.load(Ordering::Acquire) {
            self.flush();
        }
    }

    /// Writes what is buffered.
    pub fn flush(&self) {
        let _order = lock(&self.writing);
        let batch = {
            let mut lines = lock(&self.lines);
            if lines.is_empty() {
                return;
            }
            // The next batch starts at this one's size: no growing it line by line again.
            let room = lines.capacity().min(2 * FLUSH_BYTES);
            std::mem::replace(&mut *lines, Vec::with_capacity(room))
        };
        for piece in pieces(&batch) {
            (self.out)(piece);
        }
    }
}

/// Writes to a pipe are atomic up to this size (POSIX `PIPE_BUF` on Linux): another process
/// writing to the same standard error (the old one during a graceful upgrade) cannot cut a line
/// of a piece this long.
const ATOMIC_WRITE: usize = 4096;

/// A batch cut at line ends into pieces of at most [`ATOMIC_WRITE`] bytes; a longer line is
/// a piece of its own, as it was a write of its own before batching.
fn pieces(batch: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = &rest[..rest.len().min(ATOMIC_WRITE)];
        let end = if window.len() == rest.len() {
            rest.len()
        } else {
            match memchr::memrchr(b'\n', window) {
                Some(at) => at + 1,
                // One line longer than the window: up to its own end.
                None => memchr::memchr(b'\n', rest).map_or(rest.len(), |at| at + 1),
            }
        };
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while a line was appended leaves at worst a torn line: keep logging.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One formatted event; tracing-subscriber writes each event with one `write_all`.
pub struct LineWriter(&'static LogSink);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.buffered.load(Ordering::Acquire) {
            self.0.append(buf);
            Ok(buf.len())
        } else {
            // Anything still buffered goes first, so lines keep their order.
            self.0.flush();
            (self.0.out)(buf);
            Ok(buf.len())
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for &'static LogSink {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter(self)
    }
}

/// Turns buffering on while the server runs and writes the buffer out [`FLUSH_EVERY`] after a
/// line arrives in an empty buffer. A Pingora background service, so it runs after a daemon
/// fork (threads do not survive one).
pub struct LogFlusher(pub &'static LogSink);

#[async_trait]
impl BackgroundService for LogFlusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.0.set_buffered(true);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.0.pending.notified() => {}
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(FLUSH_EVERY) => self.0.flush(),
            }
        }
        // Shutting down: the drain's lines, and the last ones, are written as they come.
        self.0.set_buffered(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static WRITTEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    fn remember(bytes: &[u8]) {
        lock(&WRITTEN).extend_from_slice(bytes);
    }

    fn sink() -> &'static LogSink {
        Box::leak(Box::new(LogSink::new(remember)))
    }

    #[test]
    fn lines_wait_while_buffered_and_keep_their_order() {
        let sink = sink();
        sink.make_writer().write_all(b"before\n").unwrap_or(());
        sink.set_buffered(true);
        for n in 0..3 {
            let line = format!("line {n}\n");
            sink.make_writer().write_all(line.as_bytes()).unwrap_or(());
        }
        assert_eq!(lock(&sink.lines).as_slice(), b"line 0\nline 1\nline 2\n");
        sink.set_buffered(false);
        assert!(lock(&sink.lines).is_empty());
        sink.make_writer().write_all(b"after\n").unwrap_or(());
        let written = String::from_utf8_lossy(&lock(&WRITTEN)).into_owned();
        let at = |s: &str| written.find(s).unwrap_or(usize::MAX);
        assert!(at("before") < at("line 0") && at("line 0") < at("line 2"));
        assert!(
            at("line 2") < at("after") && at("after") < usize::MAX,
            "{written}"
        );
    }

    #[test]
    fn batches_are_cut_at_line_ends_into_atomic_writes() {
        let line = |n: usize| {
            let mut l = vec![b'a'; n - 1];
            l.push(b'\n');
            l
        };
        let mut batch = Vec::new();
        for _ in 0..10 {
            batch.extend(line(1000));
        }
        batch.extend(line(5000));
        batch.extend(line(10));
        let cut: Vec<&[u8]> = pieces(&batch).collect();
        assert_eq!(cut.concat(), batch);
        assert!(cut.iter().all(|p| p.ends_with(b"\n")));
        // 4 lines of 1 000 fit in 4 096; the 5 000-byte line goes alone.
        let sizes: Vec<usize> = cut.iter().map(|p| p.len()).collect();
        assert_eq!(sizes, [4000, 4000, 2000, 5000, 10]);
    }

    #[test]
    fn a_full_buffer_is_written_by_the_line_that_fills_it() {
        let sink = sink();
        sink.set_buffered(true);
        let line = vec![b'x'; 1000];
        for _ in 0..FLUSH_BYTES / 1000 {
            sink.make_writer().write_all(&line).unwrap_or(());
        }
        assert!(lock(&sink.lines).len() >= FLUSH_BYTES - 1000);
        sink.make_writer().write_all(&line).unwrap_or(());
        assert!(
            lock(&sink.lines).is_empty(),
            "the line past the limit flushed"
        );
    }

    #[tokio::test]
    async fn the_flusher_writes_each_line_within_its_window() {
        let sink = sink();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let flusher = tokio::spawn(async move { LogFlusher(sink).start(shutdown).await });
        while !sink.buffered.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        // Twice: the second line lands in a buffer the first flush emptied.
        for line in [b"first\n", b"again\n"] {
            sink.make_writer().write_all(line).unwrap_or(());
            assert!(!lock(&sink.lines).is_empty(), "buffered at first");
            tokio::time::sleep(FLUSH_EVERY * 4).await;
            assert!(lock(&sink.lines).is_empty(), "written within the window");
        }
        stop.send(true).unwrap_or(());
        flusher.await.unwrap_or(());
        assert!(!sink.buffered.load(Ordering::Acquire));
    }
}
