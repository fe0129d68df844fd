//! Response construction in the two error/content dialects the server speaks.

use bytes::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use super::body::SimBody;
use super::fields::{BodyError, TypeError};

pub type Resp = Response<SimBody>;

pub const JSON: &str = "application/json; charset=utf-8";
pub const NDJSON: &str = "application/x-ndjson";
pub const SSE: &str = "text/event-stream";
pub const TEXT: &str = "text/plain; charset=utf-8";

pub fn with_type(status: StatusCode, content_type: &'static str, body: SimBody) -> Resp {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Serialises a value as one compact JSON document.
pub fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(v) => Bytes::from(v),
        // Only reachable for non-string map keys, which none of our types have.
        Err(_) => Bytes::from_static(br#"{"error":"internal serialization failure"}"#),
    }
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    with_type(status, JSON, SimBody::full(to_bytes(value)))
}

pub fn text(status: StatusCode, content_type: &'static str, body: &'static str) -> Resp {
    with_type(
        status,
        content_type,
        SimBody::full(Bytes::from_static(body.as_bytes())),
    )
}

pub fn empty(status: StatusCode) -> Resp {
    let mut resp = Response::new(SimBody::empty());
    *resp.status_mut() = status;
    resp
}

/// One NDJSON line.
pub fn ndjson_line<T: Serialize>(value: &T) -> Bytes {
    let mut v = to_bytes(value).to_vec();
    v.push(b'\n');
    Bytes::from(v)
}

/// One `data:` SSE event.
pub fn sse_data<T: Serialize>(value: &T) -> Bytes {
    let mut v = b"data: ".to_vec();
    v.extend_from_slice(&to_bytes(value));
    v.extend_from_slice(b"\n\n");
    Bytes::from(v)
}

/// One SSE event with an `event:` line, as `/v1/responses` sends them.
pub fn sse_event<T: Serialize>(event: &str, value: &T) -> Bytes {
    let mut v = format!("event: {event}\ndata: ").into_bytes();
    v.extend_from_slice(&to_bytes(value));
    v.extend_from_slice(b"\n\n");
    Bytes::from(v)
}

pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// Which API dialect a route belongs to; decides error shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Native,
    OpenAi,
}

impl Surface {
    pub fn error(self, status: StatusCode, message: &str) -> Resp {
        match self {
            Surface::Native => json(status, &json!({ "error": message })),
            Surface::OpenAi => {
                let kind = match status {
                    StatusCode::BAD_REQUEST => "invalid_request_error",
                    StatusCode::NOT_FOUND => "not_found_error",
                    _ => "api_error",
                };
                #[derive(Serialize)]
                struct Detail<'a> {
                    message: &'a str,
                    r#type: &'static str,
                    param: Option<()>,
                    code: Option<()>,
                }
                #[derive(Serialize)]
                struct Envelope<'a> {
                    error: Detail<'a>,
                }
                json(
                    status,
                    &Envelope {
                        error: Detail {
                            message,
                            r#type: kind,
                            param: None,
                            code: None,
                        },
                    },
                )
            }
        }
    }
}

/// A request rejected before any content was produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    pub status: StatusCode,
    pub message: String,
}

impl Fail {
    pub fn bad(message: impl Into<String>) -> Fail {
        Fail {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Fail {
        Fail {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    pub fn into_resp(self, surface: Surface) -> Resp {
        surface.error(self.status, &self.message)
    }
}

impl From<TypeError> for Fail {
    fn from(e: TypeError) -> Fail {
        Fail::bad(e.to_string())
    }
}

impl Fail {
    /// Native handlers report a missing body by name; the `/v1` middleware
    /// passes Go's decoder error through, which is just `EOF`.
    pub fn from_body(e: BodyError, surface: Surface) -> Fail {
        match (e, surface) {
            (BodyError::Missing, Surface::OpenAi) => Fail::bad("EOF"),
            (e, _) => Fail::bad(e.to_string()),
        }
    }
}
