//! Removes what the gateway added to an OpenAI stream so the client gets exactly the stream it
//! asked for (SPEC §7): when the gateway injected `stream_options.include_usage` to be able to
//! count tokens, the usage event (`choices: []` + `usage`) is cut out, and on
//! `/v1/completions` the zeroed `"usage":{…}` member Ollama then puts on every chunk is removed.
//!
//! Complete events pass through as the same `Bytes` (no copy) when nothing in them changes;
//! only a partial event at the end of a chunk is carried to the next one.

use bytes::{Bytes, BytesMut};
use memchr::memmem;

pub struct UsageStripper {
    carry: BytesMut,
    /// `/v1/completions`: also strip the per-chunk zeroed usage member.
    completions: bool,
}

impl UsageStripper {
    pub fn new(completions: bool) -> Self {
        Self {
            carry: BytesMut::new(),
            completions,
        }
    }

    /// Takes one upstream chunk, returns what goes to the client now (possibly empty).
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.carry.is_empty() {
            let end = complete_prefix(&chunk);
            if end < chunk.len() {
                self.carry.extend_from_slice(&chunk[end..]);
            }
            let complete = chunk.slice(..end);
            return self.filter(complete);
        }
        self.carry.extend_from_slice(&chunk);
        let end = complete_prefix(&self.carry);
        let complete = self.carry.split_to(end).freeze();
        self.filter(complete)
    }

    /// The stream ended: whatever partial event is left goes out unchanged.
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.carry.is_empty()).then(|| self.carry.split().freeze())
    }

    /// Filters whole events; returns `events` itself when nothing changes.
    fn filter(&self, events: Bytes) -> Bytes {
        if !needs_change(&events, self.completions) {
            return events;
        }
        let mut out = BytesMut::with_capacity(events.len());
        for event in split_events(&events) {
            if is_usage_event(event) {
                continue;
            }
            match self.completions.then(|| zeroed_usage_span(event)).flatten() {
                Some((from, to)) => {
                    out.extend_from_slice(&event[..from]);
                    out.extend_from_slice(&event[to..]);
                }
                None => out.extend_from_slice(event),
            }
        }
        out.freeze()
    }
}

fn needs_change(events: &[u8], completions: bool) -> bool {
    memmem::find(events, b"\"usage\":").is_some()
        && (completions || memmem::find(events, b"\"choices\":[]").is_some())
}

/// Length of the prefix made of complete events (each ends with a blank line).
fn complete_prefix(buf: &[u8]) -> usize {
    let mut end = 0;
    while let Some(e) = first_event_end(&buf[end..]) {
        end += e;
    }
    end
}

/// Splits complete events, each with its terminating blank line.
fn split_events(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= buf.len() {
            return None;
        }
        let end = first_event_end(&buf[start..]).map_or(buf.len(), |e| start + e);
        let event = &buf[start..end];
        start = end;
        Some(event)
    })
}

/// End of the first complete event (after its blank line: `\n\n` or `\n\r\n`).
fn first_event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(pos) = memchr::memchr(b'\n', &buf[i..]) {
        let nl = i + pos;
        let rest = &buf[nl + 1..];
        if rest.first() == Some(&b'\n') {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

/// The event the gateway asked for: no choices, a usage object.
fn is_usage_event(event: &[u8]) -> bool {
    memmem::find(event, b"\"choices\":[]").is_some()
        && memmem::find(event, b"\"usage\":{").is_some()
}

/// The byte span of `,"usage":{…}` (a flat object) in a completions chunk. The pattern cannot
/// occur inside a JSON string, where a quote is always escaped.
fn zeroed_usage_span(event: &[u8]) -> Option<(usize, usize)> {
    let from = memmem::find(event, b",\"usage\":{")?;
    let body_start = from + b",\"usage\":{".len();
    let close = memchr::memchr(b'}', &event[body_start..])? + body_start;
    if memchr::memchr(b'{', &event[body_start..close]).is_some() {
        return None;
    }
    Some((from, close + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"a\"}}]}\n\n";
    const FINISH: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    const USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn run(s: &mut UsageStripper, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            out.extend_from_slice(&s.push(Bytes::copy_from_slice(&input[last..c])));
            last = c;
        }
        if let Some(t) = s.finish() {
            out.extend_from_slice(&t);
        }
        out
    }

    #[test]
    fn chat_usage_event_is_cut_out_for_every_split() {
        let input = format!("{ROLE}{FINISH}{USAGE}{DONE}");
        let want = format!("{ROLE}{FINISH}{DONE}");
        for i in 0..=input.len() {
            for j in (i..=input.len()).step_by(7) {
                let got = run(&mut UsageStripper::new(false), input.as_bytes(), &[i, j]);
                assert_eq!(String::from_utf8(got).unwrap(), want, "cuts {i},{j}");
            }
        }
    }

    #[test]
    fn untouched_events_are_passed_without_copy() {
        let mut s = UsageStripper::new(false);
        let chunk = Bytes::from(ROLE);
        let out = s.push(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr(), "same buffer, no copy");
        assert_eq!(out.len(), chunk.len());
    }

    #[test]
    fn completions_lose_the_zeroed_usage_member() {
        let chunk = "data: {\"id\":\"cmpl-1\",\"choices\":[{\"text\":\"a,\\\"usage\\\":{x}\",\"index\":0}],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0,\"total_tokens\":0}}\n\n";
        let clean = "data: {\"id\":\"cmpl-1\",\"choices\":[{\"text\":\"a,\\\"usage\\\":{x}\",\"index\":0}]}\n\n";
        let input = format!("{chunk}{chunk}{USAGE}{DONE}");
        let want = format!("{clean}{clean}{DONE}");
        for i in 0..=input.len() {
            let got = run(&mut UsageStripper::new(true), input.as_bytes(), &[i]);
            assert_eq!(String::from_utf8(got).unwrap(), want, "cut {i}");
        }
    }

    #[test]
    fn crlf_events_and_a_cut_tail() {
        let input = format!("{ROLE}{USAGE}").replace("\n\n", "\r\n\r\n");
        let got = run(&mut UsageStripper::new(false), input.as_bytes(), &[5]);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            ROLE.replace("\n\n", "\r\n\r\n")
        );
        let mut s = UsageStripper::new(false);
        assert!(s.push(Bytes::from_static(b"data: {\"partial")).is_empty());
        assert_eq!(s.finish().as_deref(), Some(&b"data: {\"partial"[..]));
    }
}
