//! Where log lines go: standard error, written in batches while the gateway serves.
//!
//! At the default level every request logs one line (SPEC §12). Written as it was formatted,
//! that line cost the proxy thread a `write(2)` of its own per request. While `serve` runs,
//! lines are appended to one shared buffer instead and written by [`LogFlusher`], a background
//! service, every [`FLUSH_EVERY`] (or by the thread whose line fills the buffer past
//! [`FLUSH_BYTES`]): a few hundred lines per system call under load. A line is whole in the
//! buffer, so lines never interleave. Admin commands, start-up and shutdown write each line
//! at once, as before: no line waits behind a process that is about to exit.
//!
//! What buffering costs: a line reaches the log up to [`FLUSH_EVERY`] late, and a process
//! killed with SIGKILL (or aborted) loses the lines of its last [`FLUSH_EVERY`].

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
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
}

impl LogSink {
    const fn new(out: fn(&[u8])) -> Self {
        Self {
            out,
            buffered: AtomicBool::new(false),
            lines: Mutex::new(Vec::new()),
            writing: Mutex::new(()),
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
        let full = {
            let mut lines = lock(&self.lines);
            lines.extend_from_slice(line);
            lines.len() >= FLUSH_BYTES
        };
        if full {
            self.flush();
        }
    }

    /// Writes what is buffered.
    pub fn flush(&self) {
        let _order = lock(&self.writing);
        let batch = {
            let mut lines = lock(&self.lines);
            // The next batch starts at this one's size: no growing it line by line again.
            let room = lines.capacity().min(2 * FLUSH_BYTES);
            std::mem::replace(&mut *lines, Vec::with_capacity(room))
        };
        if !batch.is_empty() {
            (self.out)(&batch);
        }
    }
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

/// Turns buffering on while the server runs and writes the buffer out every [`FLUSH_EVERY`].
/// A Pingora background service, so it runs after a daemon fork (threads do not survive one).
pub struct LogFlusher(pub &'static LogSink);

#[async_trait]
impl BackgroundService for LogFlusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.0.set_buffered(true);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => self.0.flush(),
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
}
