//! Token accounting on responses as they stream past (SPEC §9): the scanner observes each
//! `Bytes` chunk without copying or holding it, and at the end says how many prompt and
//! completion tokens the request used and whether the stream ended properly.
//!
//! Where counts come from, per surface:
//! - native (`/api/*`, NDJSON or one JSON object): the object carrying `prompt_eval_count` /
//!   `eval_count` (the `done: true` line of a stream);
//! - OpenAI JSON: `usage.prompt_tokens` / `usage.completion_tokens` (`usage.input_tokens` /
//!   `usage.output_tokens` on `/v1/responses`);
//! - OpenAI SSE: the final usage event (`choices: []`); `/v1/completions` puts a zeroed `usage`
//!   on every chunk, which is never taken; `/v1/responses`: `response.completed`.
//!
//! When a stream ends without its counts (client gone, upstream error, no terminator), the
//! documented estimate applies: every content chunk seen counts as one completion token, and
//! the prompt counts as ⌈request body bytes / 4⌉ tokens.

pub mod json_path;
pub(crate) mod plain_line;
pub mod usage_strip;

use json_path::{Event, JsonWalker, Key};

use crate::routes::RouteKind;

/// How the response body is framed and where its counts live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Ollama native: NDJSON stream or a single JSON object.
    Native,
    /// OpenAI JSON body (chat, completions, embeddings, responses).
    OpenAiJson,
    /// OpenAI SSE (`/v1/chat/completions`, `/v1/completions`).
    OpenAiSse,
    /// OpenAI Responses SSE (`/v1/responses`).
    ResponsesSse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// What a finished (or abandoned) response amounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub usage: Usage,
    /// Counts came from the upstream (not estimated).
    pub reported: bool,
    /// The stream reached its terminator (`done: true`, `[DONE]`, `response.completed`).
    pub completed: bool,
    /// An in-band error line/event arrived under a 200 status.
    pub in_band_error: bool,
    pub content_chunks: u64,
}

/// The scanner for a successful response of `route`, chosen by its content type; `None` for
/// routes that carry no tokens.
pub fn scanner_for(route: RouteKind, content_type: &[u8]) -> Option<UsageScanner> {
    let event_stream = content_type.starts_with(b"text/event-stream");
    let format = match route {
        RouteKind::ApiChat
        | RouteKind::ApiGenerate
        | RouteKind::ApiEmbed
        | RouteKind::ApiEmbeddings => Format::Native,
        RouteKind::V1ChatCompletions | RouteKind::V1Completions if event_stream => {
            Format::OpenAiSse
        }
        RouteKind::V1Responses if event_stream => Format::ResponsesSse,
        RouteKind::V1ChatCompletions
        | RouteKind::V1Completions
        | RouteKind::V1Responses
        | RouteKind::V1Embeddings => Format::OpenAiJson,
        _ => return None,
    };
    let embeddings = matches!(
        route,
        RouteKind::ApiEmbed | RouteKind::ApiEmbeddings | RouteKind::V1Embeddings
    );
    Some(UsageScanner::new(format, embeddings))
}

/// What a client gets at the end of a stream the upstream left unfinished (no `done: true`,
/// no `[DONE]`, no `response.completed`, and no error of its own), in the stream's own framing,
/// so SDKs raise an error instead of taking a truncated answer as complete (SPEC §2).
pub fn incomplete_stream_frame(format: Format) -> Option<&'static [u8]> {
    Some(match format {
        Format::Native => b"{\"error\":\"upstream stream ended before it was complete\"}\n",
        Format::OpenAiSse => {
            b"data: {\"error\":{\"message\":\"upstream stream ended before it was complete\",\"type\":\"api_error\",\"param\":null,\"code\":\"upstream_incomplete\"}}\n\n"
        }
        Format::ResponsesSse => {
            b"event: error\ndata: {\"type\":\"error\",\"code\":\"upstream_incomplete\",\"message\":\"upstream stream ended before it was complete\",\"param\":null}\n\n"
        }
        Format::OpenAiJson => return None,
    })
}

/// The documented prompt estimate: ⌈request body bytes / 4⌉.
pub fn estimate_prompt_tokens(request_body_bytes: usize) -> u64 {
    (request_body_bytes as u64).div_ceil(4)
}

/// Per-object facts gathered between a top-level `Begin` and `End`.
#[derive(Default, Clone, Copy)]
struct Current {
    done: bool,
    prompt: Option<u64>,
    completion: Option<u64>,
    error: bool,
    content: bool,
    has_choices: bool,
    kind: EventKind,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    #[default]
    Other,
    TextDelta,
    Completed,
    Failed,
}

/// SSE line framing state, kept across chunks without buffering the bytes.
#[derive(Default)]
struct SseFramer {
    in_value: bool,
    field: [u8; 8],
    field_len: usize,
    field_overflow: bool,
    skipped_space: bool,
    value_started: bool,
    /// The current `data:` value began with `[` (the `[DONE]` sentinel): not JSON.
    sentinel: bool,
}

pub struct UsageScanner {
    walker: JsonWalker,
    framer: SseFramer,
    /// Apart from the walker, so that the walker's callback can borrow it while the walker
    /// runs.
    state: ScanState,
}

/// What the scanner has learnt from the events so far.
struct ScanState {
    format: Format,
    cur: Current,
    usage: Option<Usage>,
    completed: bool,
    in_band_error: bool,
    content_chunks: u64,
    /// Embedding routes produce no completion tokens, whatever the body looks like.
    embeddings: bool,
}

impl UsageScanner {
    pub fn new(format: Format, embeddings: bool) -> Self {
        Self {
            walker: JsonWalker::new(),
            framer: SseFramer::default(),
            state: ScanState {
                format,
                cur: Current::default(),
                usage: None,
                completed: false,
                in_band_error: false,
                content_chunks: 0,
                embeddings,
            },
        }
    }

    pub fn format(&self) -> Format {
        self.state.format
    }

    /// Observes one chunk of the response body (no copy, no allocation).
    pub fn observe(&mut self, chunk: &[u8]) {
        match self.state.format {
            Format::Native => self.observe_native(chunk),
            Format::OpenAiJson => {
                self.walker.feed(chunk, &mut |e| self.state.on_event(e));
            }
            Format::OpenAiSse | Format::ResponsesSse => self.observe_sse(chunk),
        }
    }

    /// NDJSON: a whole line that starts between values and is a plain content frame counts as
    /// one without being walked (see `plain_line`); everything else goes through the walker.
    fn observe_native(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let line_end = memchr::memchr(b'\n', rest);
            if let Some(n) = line_end
                && self.walker.is_idle()
                && plain_line::is_plain_frame(&rest[..n])
            {
                self.state.on_event(json_path::Event::Begin);
                self.state.on_event(json_path::Event::End);
            } else {
                let upto = line_end.map_or(rest.len(), |n| n + 1);
                self.walker
                    .feed(&rest[..upto], &mut |e| self.state.on_event(e));
            }
            rest = line_end.map_or(&[][..], |n| &rest[n + 1..]);
        }
    }

    /// The result so far; call when the body ended or was abandoned.
    pub fn finish(&self, request_body_bytes: usize) -> Outcome {
        self.state.finish(request_body_bytes)
    }

    fn observe_sse(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            if b == b'\n' || b == b'\r' {
                self.end_line();
                i += 1;
                continue;
            }
            if self.framer.in_json() || self.framer.take(b) {
                // The rest of the line is the event's JSON: the walker takes it in one piece.
                let end = memchr::memchr2(b'\n', b'\r', &chunk[i..]).map_or(chunk.len(), |n| i + n);
                self.walker
                    .feed(&chunk[i..end], &mut |e| self.state.on_event(e));
                i = end;
                continue;
            }
            i += 1;
        }
    }

    fn end_line(&mut self) {
        let f = &mut self.framer;
        let was_field_line = f.field_len > 0 || f.in_value;
        if f.sentinel && self.state.format == Format::OpenAiSse {
            // `data: [DONE]`: the stream's terminator.
            self.state.completed = true;
        }
        if !was_field_line && self.walker.depth() != 0 {
            // An event ended inside a JSON value: it was cut; forget the partial value.
            self.walker.reset();
        }
        *f = SseFramer::default();
    }
}

impl SseFramer {
    /// Inside a `data:` line's JSON value (not the `[DONE]` sentinel).
    fn in_json(&self) -> bool {
        self.in_value && self.value_started && !self.sentinel && self.is_data_field()
    }

    /// Takes one byte of a line before its JSON value; true when `b` begins the JSON value of
    /// a `data:` field.
    fn take(&mut self, b: u8) -> bool {
        if !self.in_value {
            if b == b':' {
                self.in_value = true;
                self.skipped_space = false;
                self.value_started = false;
            } else if self.field_len < self.field.len() {
                self.field[self.field_len] = b;
                self.field_len += 1;
            } else {
                self.field_overflow = true;
            }
            return false;
        }
        if !self.skipped_space {
            self.skipped_space = true;
            if b == b' ' {
                return false;
            }
        }
        if !self.is_data_field() {
            return false;
        }
        if !self.value_started {
            self.value_started = true;
            self.sentinel = b == b'[';
        }
        !self.sentinel
    }

    fn is_data_field(&self) -> bool {
        !self.field_overflow && &self.field[..self.field_len] == b"data"
    }
}

impl ScanState {
    fn finish(&self, request_body_bytes: usize) -> Outcome {
        let (usage, reported) = match self.usage {
            Some(u) => (u, true),
            None => (
                Usage {
                    prompt_tokens: estimate_prompt_tokens(request_body_bytes),
                    completion_tokens: if self.embeddings {
                        0
                    } else {
                        self.content_chunks
                    },
                },
                false,
            ),
        };
        Outcome {
            usage,
            reported,
            completed: self.completed,
            in_band_error: self.in_band_error,
            content_chunks: self.content_chunks,
        }
    }

    fn on_event(&mut self, e: Event<'_>) {
        match e {
            Event::Begin => self.cur = Current::default(),
            Event::End => self.end_object(),
            Event::Bool {
                path: [Key::Done],
                value,
            } => self.cur.done = value,
            Event::Number { path, value } => match (self.format, path) {
                (Format::Native, [Key::PromptEvalCount]) => self.cur.prompt = Some(value),
                (Format::Native, [Key::EvalCount]) => self.cur.completion = Some(value),
                (_, [Key::Usage, Key::PromptTokens | Key::InputTokens]) => {
                    self.cur.prompt = Some(value)
                }
                (_, [Key::Usage, Key::CompletionTokens | Key::OutputTokens]) => {
                    self.cur.completion = Some(value)
                }
                (Format::ResponsesSse, [Key::Response, Key::Usage, Key::InputTokens]) => {
                    self.cur.prompt = Some(value)
                }
                (Format::ResponsesSse, [Key::Response, Key::Usage, Key::OutputTokens]) => {
                    self.cur.completion = Some(value)
                }
                (_, [Key::Choices, ..]) => self.cur.has_choices = true,
                _ => {}
            },
            Event::Str { path, len, prefix } => match path {
                [Key::Error] | [Key::Error, Key::Message] => self.cur.error = true,
                [Key::Type] => self.cur.kind = event_kind(prefix),
                [Key::Choices, Key::Item, Key::Delta, Key::Role] => self.cur.has_choices = true,
                [Key::Choices, Key::Item, Key::Delta, ..]
                | [Key::Choices, Key::Item, Key::Text]
                | [Key::Message, Key::Content | Key::Thinking]
                | [Key::Response] => {
                    self.cur.has_choices |= path[0] == Key::Choices;
                    self.cur.content |= len > 0;
                }
                [Key::Choices, ..] => self.cur.has_choices = true,
                _ => {}
            },
            Event::Bool { .. } => {}
        }
    }

    fn end_object(&mut self) {
        let cur = self.cur;
        if cur.error || cur.kind == EventKind::Failed {
            self.in_band_error = true;
            return;
        }
        match self.format {
            Format::Native => {
                if cur.done || cur.prompt.is_some() || cur.completion.is_some() {
                    self.usage = Some(counts(cur));
                    self.completed = true;
                } else {
                    self.content_chunks += 1;
                }
            }
            Format::OpenAiJson => {
                if cur.prompt.is_some() || cur.completion.is_some() {
                    self.usage = Some(counts(cur));
                }
                self.completed = true;
            }
            Format::OpenAiSse => {
                if cur.content {
                    self.content_chunks += 1;
                }
                // Only the final usage event (no choices) counts; `/v1/completions` puts a
                // zeroed usage on every content chunk.
                if !cur.has_choices && (cur.prompt.is_some() || cur.completion.is_some()) {
                    self.usage = Some(counts(cur));
                }
            }
            Format::ResponsesSse => match cur.kind {
                EventKind::TextDelta => self.content_chunks += 1,
                EventKind::Completed => {
                    self.completed = true;
                    if cur.prompt.is_some() || cur.completion.is_some() {
                        self.usage = Some(counts(cur));
                    }
                }
                _ => {}
            },
        }
    }
}

fn counts(cur: Current) -> Usage {
    Usage {
        prompt_tokens: cur.prompt.unwrap_or(0),
        completion_tokens: cur.completion.unwrap_or(0),
    }
}

fn event_kind(prefix: &[u8]) -> EventKind {
    match prefix {
        b"response.output_text.delta" => EventKind::TextDelta,
        b"response.completed" => EventKind::Completed,
        b"response.failed" | b"error" => EventKind::Failed,
        _ => EventKind::Other,
    }
}

#[cfg(test)]
mod tests;
