//! Opt-in prompt logging (SPEC §9): what a request asked and the text its response assembled
//! to. The proxy keeps a bounded copy of the response bytes for opted-in keys only; the text is
//! assembled here, in the sidecar, off the request path.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::accounting::Format;

/// At most this much of a response is kept for its transcript.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptRecord {
    /// The request body as the client sent it (JSON).
    pub request: String,
    /// The response body as it streamed (bounded), when the route answers with text.
    pub response: Option<String>,
    pub format: Option<String>,
    pub truncated: bool,
    pub expires_at: DateTime<Utc>,
}

impl PromptRecord {
    /// The request as JSON for the `jsonb` column; a body that is not JSON (it was checked
    /// before forwarding, so this does not happen) is kept as a string.
    pub fn request_json(&self) -> Value {
        let mut v = serde_json::from_str(&self.request)
            .unwrap_or_else(|_| Value::String(self.request.clone()));
        strip_nul_in(&mut v);
        v
    }

    /// The text the response streamed, assembled from its frames.
    pub fn response_text(&self) -> Option<String> {
        let raw = self.response.as_deref()?;
        let format = self.format.as_deref().and_then(format_from_str)?;
        Some(strip_nul(assemble(format, raw)))
    }
}

pub fn format_name(f: Format) -> &'static str {
    match f {
        Format::Native => "native",
        Format::OpenAiJson => "openai_json",
        Format::OpenAiSse => "openai_sse",
        Format::ResponsesSse => "responses_sse",
    }
}

fn format_from_str(s: &str) -> Option<Format> {
    Some(match s {
        "native" => Format::Native,
        "openai_json" => Format::OpenAiJson,
        "openai_sse" => Format::OpenAiSse,
        "responses_sse" => Format::ResponsesSse,
        _ => return None,
    })
}

/// Concatenates the text of every frame: NDJSON lines (or one object) natively, `data:` events
/// of an SSE stream, or the one JSON object of a non-streamed OpenAI answer.
pub fn assemble(format: Format, raw: &str) -> String {
    let mut out = String::new();
    match format {
        Format::Native => {
            for v in raw
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            {
                push(&mut out, &v["message"]["content"]);
                push(&mut out, &v["response"]);
            }
        }
        Format::OpenAiJson => {
            if let Ok(v) = serde_json::from_str::<Value>(raw) {
                for choice in v["choices"].as_array().into_iter().flatten() {
                    push(&mut out, &choice["message"]["content"]);
                    push(&mut out, &choice["text"]);
                }
                for item in v["output"].as_array().into_iter().flatten() {
                    for part in item["content"].as_array().into_iter().flatten() {
                        if part["type"] == "output_text" {
                            push(&mut out, &part["text"]);
                        }
                    }
                }
            }
        }
        Format::OpenAiSse | Format::ResponsesSse => {
            for v in raw
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .filter_map(|d| serde_json::from_str::<Value>(d.trim_start()).ok())
            {
                for choice in v["choices"].as_array().into_iter().flatten() {
                    push(&mut out, &choice["delta"]["content"]);
                    push(&mut out, &choice["text"]);
                }
                if v["type"] == "response.output_text.delta" {
                    push(&mut out, &v["delta"]);
                }
            }
        }
    }
    out
}

/// Postgres `text` and `jsonb` refuse U+0000; a client's prompt may contain it (`\u0000` is
/// valid JSON). One such row must not stop the batch it is in: it is dropped from the text.
fn strip_nul(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s
    }
}

fn strip_nul_in(v: &mut Value) {
    match v {
        Value::String(s) => *s = strip_nul(std::mem::take(s)),
        Value::Array(items) => items.iter_mut().for_each(strip_nul_in),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                *map = old
                    .into_iter()
                    .map(|(k, mut v)| {
                        strip_nul_in(&mut v);
                        (strip_nul(k), v)
                    })
                    .collect();
            } else {
                map.values_mut().for_each(strip_nul_in);
            }
        }
        _ => {}
    }
}

fn push(out: &mut String, v: &Value) {
    if let Some(s) = v.as_str() {
        out.push_str(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_never_reach_postgres() {
        let r = PromptRecord {
            request: r#"{"messages":[{"content":"a\u0000b"}],"k\u0000":1}"#.into(),
            response: Some("{\"response\":\"x\\u0000y\",\"done\":true}".into()),
            format: Some("native".into()),
            truncated: false,
            expires_at: chrono::Utc::now(),
        };
        let req = r.request_json().to_string();
        assert!(!req.contains("\\u0000"), "{req}");
        assert_eq!(r.response_text().as_deref(), Some("xy"));
    }

    #[test]
    fn assembles_every_surface() {
        let ndjson = "{\"message\":{\"role\":\"assistant\",\"content\":\"tok1 \"},\"done\":false}\n\
                      {\"message\":{\"role\":\"assistant\",\"content\":\"tok2 \"},\"done\":false}\n\
                      {\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true}\n";
        assert_eq!(assemble(Format::Native, ndjson), "tok1 tok2 ");
        assert_eq!(
            assemble(Format::Native, r#"{"response":"a b ","done":true}"#),
            "a b "
        );
        let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"tok1 \"}}]}\n\n\
                   data: {\"choices\":[{\"delta\":{\"content\":\"tok2 \"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(assemble(Format::OpenAiSse, sse), "tok1 tok2 ");
        let responses = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x \"}\n\n";
        assert_eq!(assemble(Format::ResponsesSse, responses), "x ");
        let json = r#"{"choices":[{"message":{"role":"assistant","content":"hello"}}]}"#;
        assert_eq!(assemble(Format::OpenAiJson, json), "hello");
        let resp =
            r#"{"output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}]}"#;
        assert_eq!(assemble(Format::OpenAiJson, resp), "hi");
    }
}
