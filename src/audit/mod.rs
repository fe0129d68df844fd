//! The audit log (SPEC §9): one row for every request, rejected ones included, never prompt
//! content. The proxy's `logging` phase hands an [`AuditEvent`] to the sidecar over a bounded
//! channel ([`AuditSink`]); the sidecar ([`writer`]) writes batches and never loses an event
//! (a local spool takes them while Postgres is away). Every event carries its own id, so a
//! replayed batch cannot double a row.

pub mod writer;

use chrono::{DateTime, Utc};
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
    pub client_ip: Option<String>,
    pub method: String,
    pub path: String,
    pub surface: String,
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
}

/// The proxy's end of the channel.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
    /// Free capacity below which new requests are refused (503 `audit_backlog`) rather than
    /// served unaudited.
    low_water: usize,
}

impl AuditSink {
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<AuditEvent>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Self {
                tx,
                low_water: capacity / 10,
            },
            rx,
        )
    }

    /// Waits for channel space: the client already has its answer, and no event is dropped.
    pub async fn send(&self, event: AuditEvent) {
        if self.tx.send(event).await.is_err() {
            tracing::error!("audit writer has stopped; an audit event was lost");
        }
    }

    /// The backlog is so deep that new requests must wait until the writer catches up.
    pub fn backlogged(&self) -> bool {
        self.tx.capacity() < self.low_water
    }

    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Truncates client-controlled text before it is stored.
pub fn bounded(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
