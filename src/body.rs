//! Request bodies of routes that name a model: read whole (bounded) in `request_filter`, parsed
//! once, kept in the CTX and replayed upstream (see reference/pingora-notes.md §10).
//!
//! Ollama's Go JSON decoder matches keys case-insensitively and lets the last duplicate win, so
//! a gateway that checked the first exact `"model"` could be bypassed with `"MODEL"`. We refuse
//! any body in which a field the gateway decides on could be read two ways, so the bytes we
//! forward name exactly the model we checked.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::errors::GatewayError;
use crate::routes::ModelField;

/// Pingora's retry buffer holds at most this much; see the recipe in the reference notes.
const REPLAY_CAP: usize = 64 << 10;
/// A slow client gets this long to deliver its body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What the gateway learned from a request body.
#[derive(Debug, Clone)]
pub struct ParsedBody {
    pub model: String,
    pub stream: Option<bool>,
    /// `stream_options.include_usage` is `true`.
    pub include_usage: bool,
}

/// Reads the whole request body, bounded by `limit`, leaving Pingora able to replay it.
pub async fn read_whole(session: &mut Session, limit: usize) -> Result<Bytes, GatewayError> {
    let chunked = session
        .req_header()
        .headers
        .get(http::header::TRANSFER_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let declared = if chunked {
        None
    } else {
        declared_length(session)?
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let keepalive = session.get_keepalive();
    if expects_continue {
        session
            .write_continue_response()
            .await
            .map_err(|_| GatewayError::BadRequest("client went away".into()))?;
    }
    let read = within(BODY_READ_TIMEOUT, read_loop(session, declared, limit)).await;
    if expects_continue {
        // Writing the 100 turned keep-alive off (response before body); the body is read now.
        session.set_keepalive(keepalive);
    }
    read.map_err(|_| GatewayError::RequestTimeout)?
}

/// `tokio::time::timeout`, armed only if `read` has to wait: a body that came with its head
/// is read at once, and a timer registered and cancelled per request would cost more than the
/// read.
async fn within<T>(
    limit: Duration,
    read: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    let mut read = std::pin::pin!(read);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(done) => Ok(done),
        std::task::Poll::Pending => tokio::time::timeout(limit, read).await,
    }
}

fn declared_length(session: &Session) -> Result<Option<usize>, GatewayError> {
    match session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
    {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .map(Some)
            .ok_or_else(|| GatewayError::BadRequest("invalid Content-Length".into())),
    }
}

async fn read_loop(
    session: &mut Session,
    declared: Option<usize>,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut total = 0usize;
    let mut armed_at: Option<usize> = None;
    loop {
        // Arm retry buffering only for the last ≤ 64 KiB so Pingora's replay buffer is never
        // truncated; its content only triggers `request_body_filter`, the bytes come from CTX.
        if armed_at.is_none() && declared.is_none_or(|n| n.saturating_sub(total) <= REPLAY_CAP) {
            session.enable_retry_buffering();
            armed_at = Some(total);
        }
        let chunk = session
            .read_request_body()
            .await
            .map_err(|_| GatewayError::BadRequest("request body could not be read".into()))?;
        let Some(chunk) = chunk else { break };
        total += chunk.len();
        if total > limit {
            return Err(GatewayError::PayloadTooLarge { limit });
        }
        if declared.is_none() && total > REPLAY_CAP {
            return Err(GatewayError::LengthRequired);
        }
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            earlier => {
                if let Some(f) = earlier {
                    buf.reserve(declared.unwrap_or(0).max(f.len() + chunk.len()));
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    let replayable = armed_at.is_some_and(|a| total > a) && !session.retry_buffer_truncated();
    if total > 0 && !replayable {
        // Pingora would not replay this body; failing beats hanging the upstream.
        return Err(GatewayError::LengthRequired);
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// Top-level members in document order, duplicates kept (serde_json's `Map` would merge them).
struct MemberList<'a>(Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for MemberList<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MemberList<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // Room for a typical request's members without growing.
                let mut out = Vec::with_capacity(8);
                while let Some(MemberKey(k)) = map.next_key::<MemberKey<'de>>()? {
                    out.push((k, map.next_value::<&'de RawValue>()?));
                }
                Ok(MemberList(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A member's key, borrowed from the body unless it holds escapes (serde's own `Cow<str>`
/// always copies).
struct MemberKey<'a>(std::borrow::Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for MemberKey<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MemberKey<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(MemberKey(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MemberKey(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(MemberKey(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Refuses keys Ollama's decoder could read differently from us. Go's `encoding/json` matches
/// field names case-insensitively under Unicode simple folding, where `ſ` (U+017F) folds to
/// `s` and the Kelvin sign (U+212A) to `k`, and lets the last duplicate win. Every field Ollama
/// reads is lower-case ASCII, so a key with an ASCII capital or one of those two letters can
/// only be an attempt to be read as another field; exact duplicates are refused too.
fn check_keys(members: &MemberList<'_>) -> Result<(), GatewayError> {
    for (i, (k, _)) in members.0.iter().enumerate() {
        if k.chars()
            .any(|c| c.is_ascii_uppercase() || c == '\u{17F}' || c == '\u{212A}')
        {
            return Err(GatewayError::BadRequest(format!(
                "field names must be lower case (found `{}`)",
                k.chars().take(64).collect::<String>()
            )));
        }
        if members.0[..i].iter().any(|(earlier, _)| earlier == k) {
            return Err(GatewayError::BadRequest(format!(
                "duplicate field `{}` in request body",
                k.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(())
}

/// A request body's top-level members, parsed once (a full pass over a body that may be
/// megabytes) and shared by the model check, the policy clamps and the edits.
pub struct Members<'a> {
    list: MemberList<'a>,
    len: usize,
}

impl<'a> Members<'a> {
    /// Parses `body` as a JSON object, refusing keys Ollama's decoder could read differently
    /// (here and in `options` / `stream_options`).
    pub fn of(body: &'a [u8]) -> Result<Self, GatewayError> {
        let bad = |m: &str| GatewayError::BadRequest(m.to_string());
        let list: MemberList = serde_json::from_slice(body)
            .map_err(|_| bad("request body is not a valid JSON object"))?;
        check_keys(&list)?;
        let members = Self {
            list,
            len: body.len(),
        };
        for nested in ["options", "stream_options"] {
            if let Some(v) = members.get(nested)
                && v.get().starts_with('{')
            {
                let inner: MemberList = serde_json::from_str(v.get())
                    .map_err(|_| bad("request body is not valid JSON"))?;
                check_keys(&inner)?;
            }
        }
        Ok(members)
    }

    /// Parsed without the key checks: for a body the gateway itself wrote from checked ones.
    pub fn unchecked(body: &'a [u8]) -> Result<Self, GatewayError> {
        let list: MemberList = serde_json::from_slice(body).map_err(|_| {
            GatewayError::BadRequest("request body is not a valid JSON object".into())
        })?;
        Ok(Self {
            list,
            len: body.len(),
        })
    }

    /// The raw text of the member `name`.
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.list
            .0
            .iter()
            .find(|(k, _)| k.as_ref() == name)
            .map(|(_, v)| *v)
    }

    /// The member `name` as a JSON object (`None` when absent or `null`).
    pub fn object(
        &self,
        name: &str,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, GatewayError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => serde_json::from_str::<Option<_>>(v.get())
                .map_err(|_| GatewayError::BadRequest(format!("`{name}` must be an object"))),
        }
    }

    /// The member `name` as a JSON value (`None` when absent).
    pub fn value(&self, name: &str) -> Option<serde_json::Value> {
        self.get(name)
            .and_then(|v| serde_json::from_str(v.get()).ok())
    }

    /// Extracts the model the body names, refusing ambiguity.
    pub fn read(&self, field: ModelField) -> Result<ParsedBody, GatewayError> {
        let bad = |m: &str| GatewayError::BadRequest(m.to_string());
        let as_string = |name: &str, v: &RawValue| -> Result<Option<String>, GatewayError> {
            match serde_json::from_str::<Option<String>>(v.get()) {
                Ok(s) => Ok(s.filter(|s| !s.is_empty())),
                Err(_) => Err(GatewayError::BadRequest(format!(
                    "`{name}` must be a string"
                ))),
            }
        };
        let model = self
            .get("model")
            .map(|v| as_string("model", v))
            .transpose()?
            .flatten();
        let name = match field {
            ModelField::ModelOrName => self
                .get("name")
                .map(|v| as_string("name", v))
                .transpose()?
                .flatten(),
            ModelField::Model => None,
        };
        let model = match (model, name) {
            (Some(m), Some(n)) if m != n => {
                return Err(bad("`model` and `name` name different models"));
            }
            (Some(m), _) => m,
            (None, Some(n)) => n,
            (None, None) => return Err(bad("model is required")),
        };
        let stream = match self.get("stream") {
            None => None,
            Some(v) => serde_json::from_str::<Option<bool>>(v.get())
                .map_err(|_| bad("`stream` must be a boolean"))?,
        };
        let include_usage = match self.get("stream_options") {
            None => false,
            Some(v) => {
                match serde_json::from_str::<Option<serde_json::Map<String, serde_json::Value>>>(
                    v.get(),
                ) {
                    Ok(m) => m.is_some_and(|m| {
                        m.get("include_usage") == Some(&serde_json::Value::Bool(true))
                    }),
                    Err(_) => return Err(bad("`stream_options` must be an object")),
                }
            }
        };
        Ok(ParsedBody {
            model,
            stream,
            include_usage,
        })
    }

    /// The body with `edits` applied, every other member copied verbatim (numbers, images and
    /// escapes keep their exact text, no re-escaping of large prompts). Set members keep their
    /// place; new ones are appended.
    pub fn edited(&self, edits: &Edits) -> Result<Bytes, GatewayError> {
        let bad = || GatewayError::BadRequest("request body is not a valid JSON object".into());
        let mut out = Vec::with_capacity(self.len + 64);
        out.push(b'{');
        let mut first = true;
        let mut write_member =
            |out: &mut Vec<u8>, key: &str, raw: Option<&str>, value: Option<&serde_json::Value>| {
                if !first {
                    out.push(b',');
                }
                first = false;
                serde_json::to_writer(&mut *out, key).map_err(|_| bad())?;
                out.push(b':');
                match (raw, value) {
                    (Some(r), _) => out.extend_from_slice(r.as_bytes()),
                    (None, Some(v)) => serde_json::to_writer(&mut *out, v).map_err(|_| bad())?,
                    (None, None) => out.extend_from_slice(b"null"),
                }
                Ok::<(), GatewayError>(())
            };
        for (k, v) in &self.list.0 {
            match edits.iter().find(|(name, _)| *name == k.as_ref()) {
                None => write_member(&mut out, k, Some(v.get()), None)?,
                Some((_, Some(value))) => write_member(&mut out, k, None, Some(value))?,
                Some((_, None)) => {}
            }
        }
        for (name, value) in edits {
            if let Some(value) = value
                && self.get(name).is_none()
            {
                write_member(&mut out, name, None, Some(value))?;
            }
        }
        out.push(b'}');
        Ok(Bytes::from(out))
    }

    /// The edit that sets `stream_options.include_usage` to `true` (keeping other stream
    /// options), so an OpenAI stream ends with its usage.
    pub fn include_usage_edit(
        &self,
    ) -> Result<(&'static str, Option<serde_json::Value>), GatewayError> {
        let mut options = self.object("stream_options")?.unwrap_or_default();
        options.insert("include_usage".into(), serde_json::Value::Bool(true));
        Ok(("stream_options", Some(serde_json::Value::Object(options))))
    }
}

/// Parses a request body and extracts the model it names, refusing ambiguity.
pub fn parse(body: &[u8], field: ModelField) -> Result<ParsedBody, GatewayError> {
    Members::of(body)?.read(field)
}

/// Changes to a request body's top-level members: `Some(value)` sets, `None` removes.
pub type Edits = Vec<(&'static str, Option<serde_json::Value>)>;

/// Applies `edits` to a body the gateway has already checked (see [`Members::edited`]).
pub fn apply_edits(body: &[u8], edits: &Edits) -> Result<Bytes, GatewayError> {
    Members::unchecked(body)?.edited(edits)
}

/// The body with `stream_options.include_usage` set (the fuzz targets' entry point).
pub fn with_include_usage(body: &[u8]) -> Result<Bytes, GatewayError> {
    let members = Members::of(body)?;
    members.edited(&vec![members.include_usage_edit()?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_read_deadline_holds_only_for_a_read_that_waits() {
        assert_eq!(within(Duration::ZERO, async { 7 }).await.ok(), Some(7));
        let waits = async {
            tokio::task::yield_now().await;
            8
        };
        assert_eq!(within(Duration::from_secs(5), waits).await.ok(), Some(8));
        let never = std::future::pending::<()>();
        assert!(within(Duration::from_millis(20), never).await.is_err());
    }

    fn model_of(body: &str) -> Result<String, GatewayError> {
        parse(body.as_bytes(), ModelField::Model).map(|p| p.model)
    }

    #[test]
    fn reads_the_model() {
        assert_eq!(
            model_of(r#"{"model":"llama3.2","messages":[]}"#).unwrap(),
            "llama3.2"
        );
        let p = parse(br#"{"model":"x","stream":false}"#, ModelField::Model).unwrap();
        assert_eq!(p.stream, Some(false));
    }

    #[test]
    fn refuses_every_ambiguity() {
        for body in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"model":"a","MODEL":"b"}"#,
            r#"{"Model":"b"}"#,
            r#"{"model":"a","Stream":true}"#,
            r#"{"model":"a","stream":true,"stream":false}"#,
            r#"{"model":"a","messages":[],"Messages":[]}"#,
            "{\"model\":\"a\",\"stream\":false,\"\u{17F}tream\":true}",
            r#"{"model":"a","stream":false,"\u017ftream":true}"#,
            "{\"model\":\"a\",\"\u{212A}eep_alive\":0}",
            r#"{"model":"a","MAX_TOKENS":5}"#,
            r#"{"model":"a","options":{"num_predict":5,"NUM_PREDICT":-1}}"#,
            r#"{"model":"a","options":{"num_predict":5,"num_predict":-1}}"#,
            r#"{"model":"a","stream_options":{"include_usage":false,"Include_Usage":true}}"#,
        ] {
            assert!(
                matches!(model_of(body), Err(GatewayError::BadRequest(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn refuses_bad_shapes() {
        for body in [
            "",
            "[]",
            "null",
            "{",
            r#"{"model":5}"#,
            r#"{"model":""}"#,
            r#"{"messages":[]}"#,
            r#"{"model":"a","stream":"yes"}"#,
        ] {
            assert!(model_of(body).is_err(), "{body}");
        }
    }

    #[test]
    fn show_falls_back_to_name_but_never_disagrees() {
        let p = parse(br#"{"name":"llama3.2"}"#, ModelField::ModelOrName).unwrap();
        assert_eq!(p.model, "llama3.2");
        let p = parse(br#"{"model":"a","name":"a"}"#, ModelField::ModelOrName).unwrap();
        assert_eq!(p.model, "a");
        assert!(parse(br#"{"model":"a","name":"b"}"#, ModelField::ModelOrName).is_err());
        assert!(parse(br#"{"model":"","name":"b"}"#, ModelField::ModelOrName).is_ok());
        // `name` is not a model field on other routes.
        assert!(parse(br#"{"name":"b"}"#, ModelField::Model).is_err());
    }

    #[test]
    fn include_usage_is_added_and_everything_else_kept() {
        let body = br#"{"model":"m","stream":true,"messages":[{"content":"\u00e9 \"q\""}],"temperature":0.10}"#;
        let out = with_include_usage(body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.contains(r#""messages":[{"content":"\u00e9 \"q\""}]"#),
            "verbatim: {text}"
        );
        assert!(
            text.contains(r#""temperature":0.10"#),
            "number text kept: {text}"
        );
        let out =
            with_include_usage(br#"{"model":"m","stream_options":{"include_usage":false,"x":1}}"#)
                .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        let out = with_include_usage(br#"{"model":"m","stream_options":null}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let p = parse(&out, ModelField::Model).unwrap();
        assert!(p.include_usage);
        assert!(parse(br#"{"model":"m","stream_options":5}"#, ModelField::Model).is_err());
    }

    #[test]
    fn escaped_keys_are_compared_decoded() {
        // "\u006dodel" is "model": a duplicate the raw bytes would hide.
        assert!(model_of(r#"{"model":"a","\u006dodel":"b"}"#).is_err());
    }
}
