//! Response bodies: fixed buffers, or a channel fed by a generator task so
//! every NDJSON line / SSE event leaves as its own HTTP/1.1 chunk.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// Counts a request as in flight until its response body is dropped, which
/// hyper does when the body finished *or* the connection went away.
#[derive(Debug)]
pub struct InflightGuard {
    counter: Arc<AtomicU64>,
}

impl InflightGuard {
    pub fn new(counter: Arc<AtomicU64>) -> InflightGuard {
        counter.fetch_add(1, Ordering::SeqCst);
        InflightGuard { counter }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

type Item = Result<Bytes, io::Error>;

enum Inner {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Item>),
}

pub struct SimBody {
    inner: Inner,
    _guard: Option<InflightGuard>,
}

impl SimBody {
    pub fn full(bytes: impl Into<Bytes>) -> SimBody {
        let bytes = bytes.into();
        SimBody {
            inner: Inner::Full((!bytes.is_empty()).then_some(bytes)),
            _guard: None,
        }
    }

    pub fn empty() -> SimBody {
        SimBody::full(Bytes::new())
    }

    pub fn with_guard(mut self, guard: Option<InflightGuard>) -> SimBody {
        self._guard = guard;
        self
    }

    /// A streaming body plus the writer that feeds it. Capacity 1 keeps the
    /// generator in lock-step with the socket, so a slow or vanished client
    /// stops generation instead of letting it run ahead.
    pub fn channel(delay: Duration) -> (SimBody, StreamWriter) {
        let (tx, rx) = mpsc::channel(1);
        (
            SimBody {
                inner: Inner::Channel(rx),
                _guard: None,
            },
            StreamWriter { tx, delay },
        )
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.get_mut().inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Channel(rx) => rx
                .poll_recv(cx)
                .map(|item| item.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(&self.inner, Inner::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Channel(_) => SizeHint::default(),
        }
    }
}

/// Feeds a [`SimBody::channel`]. Every method returns `false` once the
/// client is gone, so generators can stop early.
pub struct StreamWriter {
    tx: mpsc::Sender<Item>,
    delay: Duration,
}

impl StreamWriter {
    pub async fn send(&self, bytes: Bytes) -> bool {
        self.tx.send(Ok(bytes)).await.is_ok()
    }

    pub async fn send_all(&self, frames: Vec<Bytes>) -> bool {
        for f in frames {
            if !self.send(f).await {
                return false;
            }
        }
        true
    }

    /// The simulated time between two tokens; ends early if the client leaves.
    pub async fn pause(&self) -> bool {
        if self.delay.is_zero() {
            return !self.tx.is_closed();
        }
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => true,
            _ = self.tx.closed() => false,
        }
    }

    /// Makes hyper tear the connection down without the chunked terminator.
    pub async fn abort(self) {
        // Let the chunks already queued reach the socket first: an abort "after K chunks"
        // must deliver those K, or the test of what a client saw becomes a race.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let _ = self
            .tx
            .send(Err(io::Error::other("simulated upstream abort")))
            .await;
    }
}
