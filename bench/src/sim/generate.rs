//! The shared generation driver: how many chunks, when to fail, and the
//! pacing of a streamed response. Route modules only format frames.

use std::time::Duration;

use bytes::Bytes;

use super::body::{SimBody, StreamWriter};
use super::tokens::{self, Finish};

/// Everything about one simulated generation that does not depend on the
/// wire format.
#[derive(Debug, Clone)]
pub struct Plan {
    pub chunks: usize,
    pub finish: Finish,
    pub prompt_tokens: u64,
    pub fail_after: Option<usize>,
    pub abort: bool,
    pub delay: Duration,
}

impl Plan {
    /// The chunk count after which the generation fails, if it does. A
    /// failure point beyond the natural end never triggers.
    pub fn failure_point(&self) -> Option<usize> {
        self.fail_after.filter(|k| *k <= self.chunks)
    }

    /// Time a non-streamed request takes, mirroring the streamed pacing.
    pub fn total_delay(&self) -> Duration {
        let steps = self.failure_point().unwrap_or(self.chunks);
        self.delay
            .saturating_mul(steps.try_into().unwrap_or(u32::MAX))
    }

    pub fn full_text(&self) -> String {
        tokens::full_text(self.chunks)
    }
}

/// Formats the frames of one streamed response.
pub trait Frames: Send + 'static {
    /// Frames sent before the first token.
    fn start(&mut self) -> Vec<Bytes> {
        Vec::new()
    }
    /// Frames carrying content chunk `index` (1-based).
    fn content(&mut self, index: usize, text: &str) -> Vec<Bytes>;
    /// Frames after the last token (final chunk, usage, terminator).
    fn finish(&mut self) -> Vec<Bytes>;
    /// Frames for an in-band failure; the stream then ends normally.
    fn fail(&mut self) -> Vec<Bytes> {
        Vec::new()
    }
}

/// Creates a streaming body and spawns the task that fills it.
pub fn spawn_stream<F: Frames>(plan: Plan, mut frames: F) -> SimBody {
    let (body, writer) = SimBody::channel(plan.delay);
    tokio::spawn(async move {
        drive(&plan, &mut frames, writer).await;
    });
    body
}

async fn drive<F: Frames>(plan: &Plan, frames: &mut F, writer: StreamWriter) {
    if !writer.send_all(frames.start()).await {
        return;
    }
    let fail_at = plan.failure_point();
    let produce = fail_at.unwrap_or(plan.chunks);
    for i in 1..=produce {
        if i > 1 && !writer.pause().await {
            return;
        }
        let text = tokens::chunk_text(i);
        if !writer.send_all(frames.content(i, &text)).await {
            return;
        }
    }
    if fail_at.is_some() {
        if plan.abort {
            writer.abort().await;
        } else {
            writer.send_all(frames.fail()).await;
        }
        return;
    }
    if produce > 0 && !writer.pause().await {
        return;
    }
    writer.send_all(frames.finish()).await;
}
