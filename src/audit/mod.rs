//! The audit log (SPEC §9): one row for every request, rejected ones included, never prompt
//! content. The proxy's `logging` phase hands an [`AuditEvent`] to the sidecar over a bounded
//! channel ([`AuditSink`]); the sidecar ([`writer`]) writes batches and never loses an event
//! (a local spool takes them while Postgres is away). Every event carries its own id, so a
//! replayed batch cannot double a row.

pub mod transcript;
pub mod writer;

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEvent {
    pub event_id: Uuid,
    pub ts: DateTime<Utc>,
    pub request_id: String,
    pub tenant_id: Option<i64>,
    pub key_id: Option<i64>,
    pub key_prefix: Option<String>,
    /// Serialised as text in a spool, bound as `inet` in Postgres: the request path never
    /// formats it.
    pub client_ip: Option<IpAddr>,
    pub method: String,
    /// The route's own path (borrowed from the route table) or, for what matched no route,
    /// the bounded raw path.
    pub path: Cow<'static, str>,
    pub surface: Cow<'static, str>,
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub status: i32,
    pub upstream_status: Option<i32>,
    pub error_code: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub bytes_in: Option<i64>,
    pub bytes_out: Option<i64>,
    pub ttfb_ms: Option<f64>,
    pub latency_ms: f64,
    pub user_agent: Option<String>,
    /// The UTC day whose budgets the request was charged to; set for every request that went
    /// upstream, so its usage reaches `budget_usage`. Absent in spools of older versions.
    #[serde(default)]
    pub usage_day: Option<NaiveDate>,
    /// Opted-in keys only: what was asked and answered (`prompt_log`, with an expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Box<transcript::PromptRecord>>,
}

thread_local! {
    /// One per thread: `Uuid::now_v7` shares a single locked context between all threads.
    static EVENT_IDS: uuid::ContextV7 = const { uuid::ContextV7::new() };
}

/// The id of an event that started at `at`: time-ordered (UUIDv7), so the audit rows'
/// primary-key index grows at its right edge instead of taking inserts on random pages. Ids
/// from one thread are strictly ordered; ids of two threads in the same millisecond differ in
/// their 74 counter and random bits.
pub fn new_event_id(at: std::time::SystemTime) -> Uuid {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    EVENT_IDS.with(|context| {
        Uuid::new_v7(uuid::Timestamp::from_unix(
            context,
            since.as_secs(),
            since.subsec_nanos(),
        ))
    })
}

/// How much the sidecar still holds: events queued or being written, and spool files waiting
/// for Postgres. Budget re-seeding waits until this instance's pipeline is empty.
pub struct Pipeline {
    /// Events handed to the channel so far, and events that left the writer (written, or
    /// spooled while Postgres is away): a watermark, since the pipeline is never idle at load.
    enqueued: AtomicU64,
    written: AtomicU64,
    spool_dir: PathBuf,
    /// Told when a batch's worth of events is queued. The writer is not woken per event: each
    /// wake is a hand-off to its thread that the proxy pays for.
    batch_ready: tokio::sync::Notify,
}

impl Pipeline {
    pub fn new(spool_dir: PathBuf) -> Self {
        Self {
            enqueued: AtomicU64::new(0),
            written: AtomicU64::new(0),
            spool_dir,
            batch_ready: tokio::sync::Notify::new(),
        }
    }

    /// `n` events left the writer (written or spooled).
    pub fn done(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// How many events have been handed over so far: the mark to wait for.
    pub fn mark(&self) -> u64 {
        self.enqueued.load(Ordering::Acquire)
    }

    /// Every event handed over up to `mark` is in Postgres (written, and no spool waits).
    pub fn has_written(&self, mark: u64) -> bool {
        self.written.load(Ordering::Acquire) >= mark
            && writer::spool_files(&self.spool_dir).is_empty()
    }

    pub fn spool_dir(&self) -> &std::path::Path {
        &self.spool_dir
    }
}

/// The proxy's end of the channel.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
    pipeline: Arc<Pipeline>,
    /// Free capacity below which new requests are refused (503 `audit_backlog`) rather than
    /// served unaudited.
    low_water: usize,
    /// Queue depth at which the writer is woken before its window closes: a full batch, or
    /// less when the backlog limit comes first.
    wake_at: usize,
}

impl AuditSink {
    pub fn channel(capacity: usize, pipeline: Arc<Pipeline>) -> (Self, mpsc::Receiver<AuditEvent>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Self {
                tx,
                pipeline,
                low_water: capacity / 10,
                wake_at: writer::FLUSH_AT.min(capacity - capacity / 10).max(1),
            },
            rx,
        )
    }

    /// Waits for channel space: the client already has its answer, and no event is dropped.
    pub async fn send(&self, event: AuditEvent) {
        self.pipeline.enqueued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(event).await.is_err() {
            self.pipeline.done(1);
            tracing::error!("audit writer has stopped; an audit event was lost");
        } else if self.queue_depth() >= self.wake_at {
            self.pipeline.batch_ready.notify_one();
        }
    }

    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.pipeline.clone()
    }

    /// The backlog is so deep that new requests must wait until the writer catches up.
    pub fn backlogged(&self) -> bool {
        self.tx.capacity() < self.low_water
    }

    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Truncates client-controlled text to `max` characters before it is stored.
pub fn bounded(s: &str, max: usize) -> String {
    // A character is at least a byte: most values are shorter than `max` bytes and are copied
    // whole, without walking their characters.
    let end = if s.len() <= max {
        s.len()
    } else {
        s.char_indices().nth(max).map_or(s.len(), |(at, _)| at)
    };
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_keeps_at_most_max_characters() {
        assert_eq!(bounded("curl/8.5", 16), "curl/8.5");
        assert_eq!(bounded("abcdef", 3), "abc");
        assert_eq!(bounded("abc", 3), "abc");
        // Multi-byte characters count once and are never cut in half.
        assert_eq!(bounded("ééééé", 3), "ééé");
        assert_eq!(bounded("aé", 2), "aé");
        assert_eq!(bounded("", 0), "");
        assert_eq!(bounded("x", 0), "");
    }
}
