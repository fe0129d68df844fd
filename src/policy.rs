//! Ollama resource clamps (SPEC §4, §7): options that change server state for everyone are
//! bounded before a body goes upstream.
//!
//! - `keep_alive` is parsed as Ollama parses it (a Go duration string, or a number of seconds)
//!   and clamped to [1m, 30m]; `0` (unload the model for everyone) and negative values (pin it
//!   forever) are refused with 403. `set-policy --keep-alive pass` lifts this for a tenant/key.
//! - `options.num_ctx` is clamped to `max_num_ctx` (a different context size reloads the model).
//! - The output cap (`options.num_predict` natively, `max_tokens` on `/v1/chat/completions` and
//!   `/v1/completions`, `max_output_tokens` on `/v1/responses`) is clamped to `max_num_predict`,
//!   and set to it when the request has none (Ollama's default −1 means unlimited).
//! - The runner options `num_batch`, `num_gpu`, `main_gpu`, `num_thread`, `use_mmap` (they
//!   reload the runner) are removed.

use std::time::Duration;

use serde_json::Value;

use crate::body::{Edits, Members};
use crate::errors::GatewayError;
use crate::principal::Principal;
use crate::routes::RouteKind;

const KEEP_ALIVE_MIN: Duration = Duration::from_secs(60);
const KEEP_ALIVE_MAX: Duration = Duration::from_secs(30 * 60);
const RUNNER_OPTIONS: &[&str] = &["num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap"];

/// The body edits a principal's policy requires, and the output cap in force after them.
pub struct Clamped {
    pub edits: Edits,
    pub output_cap: Option<u64>,
}

pub fn clamp(route: RouteKind, raw: &Members<'_>, p: &Principal) -> Result<Clamped, GatewayError> {
    match route {
        RouteKind::ApiChat | RouteKind::ApiGenerate => native(raw, p, true),
        RouteKind::ApiEmbed | RouteKind::ApiEmbeddings => native(raw, p, false),
        RouteKind::V1ChatCompletions | RouteKind::V1Completions => openai_cap(raw, p, "max_tokens"),
        RouteKind::V1Responses => openai_cap(raw, p, "max_output_tokens"),
        // `/api/show` and the listings generate nothing.
        _ => Ok(Clamped {
            edits: Vec::new(),
            output_cap: Some(0),
        }),
    }
}

fn native(raw: &Members<'_>, p: &Principal, generates: bool) -> Result<Clamped, GatewayError> {
    let mut edits: Edits = Vec::new();
    let original = raw.object("options")?;
    let mut options = original.clone().unwrap_or_default();
    for name in RUNNER_OPTIONS {
        options.remove(*name);
    }
    // Ollama takes a float for an integer option (`131072.0`), so compare as a float.
    if let Some(max) = p.max_num_ctx
        && options
            .get("num_ctx")
            .and_then(Value::as_f64)
            .is_some_and(|n| n > max as f64)
    {
        options.insert("num_ctx".into(), Value::from(max));
    }
    let mut output_cap = positive(options.get("num_predict"));
    if generates && let Some(max) = p.max_num_predict {
        let capped = output_cap.map_or(max, |n| n.min(max));
        options.insert("num_predict".into(), Value::from(capped));
        output_cap = Some(capped);
    }
    if !generates {
        output_cap = Some(0);
    }
    if original.as_ref() != Some(&options) && !(original.is_none() && options.is_empty()) {
        edits.push(("options", Some(Value::Object(options))));
    }
    if p.keep_alive_policy.as_deref() != Some("pass")
        && let Some(value) = raw.value("keep_alive")
        && let Some(clamped) = clamp_keep_alive(&value)?
    {
        edits.push(("keep_alive", Some(clamped)));
    }
    Ok(Clamped {
        edits,
        output_cap: output_cap.map(|n| u64::try_from(n).unwrap_or(0)),
    })
}

fn openai_cap(
    raw: &Members<'_>,
    p: &Principal,
    field: &'static str,
) -> Result<Clamped, GatewayError> {
    let requested = positive(raw.value(field).as_ref());
    let Some(max) = p.max_num_predict else {
        return Ok(Clamped {
            edits: Vec::new(),
            output_cap: requested.map(|n| n as u64),
        });
    };
    let capped = requested.map_or(max, |n| n.min(max));
    let edits = if requested == Some(capped) {
        Vec::new()
    } else {
        vec![(field, Some(Value::from(capped)))]
    };
    Ok(Clamped {
        edits,
        output_cap: Some(capped as u64),
    })
}

/// Writes a budget's output cap into the field Ollama reads for `route` (SPEC §6). Routes that
/// generate nothing need no edit.
pub fn output_cap_edit(
    route: RouteKind,
    members: &Members<'_>,
    cap: u64,
) -> Result<Edits, GatewayError> {
    let field = match route {
        RouteKind::ApiChat | RouteKind::ApiGenerate => {
            let mut options = members.object("options")?.unwrap_or_default();
            options.insert("num_predict".into(), Value::from(cap));
            return Ok(vec![("options", Some(Value::Object(options)))]);
        }
        RouteKind::V1ChatCompletions | RouteKind::V1Completions => "max_tokens",
        RouteKind::V1Responses => "max_output_tokens",
        _ => return Ok(Vec::new()),
    };
    Ok(vec![(field, Some(Value::from(cap)))])
}

/// Where a budget's output cap can be written into the body that goes upstream without
/// parsing it again: before the body's closing brace, when the member that carries the cap is
/// in neither the client's body nor the gateway's edits. The result is the body
/// [`output_cap_edit`] and [`Members::edited`] would produce (the cap appended as the last
/// member), except that the client's own bytes, whitespace included, are kept as they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSlot {
    /// Offset of the body's closing `}`.
    at: usize,
    member: CapMember,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CapMember {
    /// `"options":{"num_predict":N}` (native routes).
    NativeOptions,
    /// `"<name>":N` (OpenAI routes).
    Field(&'static str),
}

impl CapSlot {
    /// The slot of `body`, the body going upstream after `edits` were applied to the client's
    /// `members`; `None` when the cap needs the general edit (its member is present, or the
    /// route takes no cap).
    pub fn find(
        route: RouteKind,
        members: &Members<'_>,
        edits: &Edits,
        body: &[u8],
    ) -> Option<Self> {
        let (name, member) = match route {
            RouteKind::ApiChat | RouteKind::ApiGenerate => ("options", CapMember::NativeOptions),
            RouteKind::V1ChatCompletions | RouteKind::V1Completions => {
                ("max_tokens", CapMember::Field("max_tokens"))
            }
            RouteKind::V1Responses => ("max_output_tokens", CapMember::Field("max_output_tokens")),
            _ => return None,
        };
        if members.get(name).is_some() || edits.iter().any(|(edited, _)| *edited == name) {
            return None;
        }
        let at = body.trim_ascii_end().len().checked_sub(1)?;
        // A model route's body has a `model` member, so the cap always follows a comma; a body
        // that is not an object with members takes the general path.
        let before = body[..at].trim_ascii_end();
        (body[at] == b'}' && !matches!(before.last(), None | Some(b'{')))
            .then_some(Self { at, member })
    }

    /// `body` (the one the slot was found in) with the cap written into it.
    pub fn write(&self, body: &[u8], cap: u64) -> Option<bytes::Bytes> {
        let (head, tail) = (body.get(..self.at)?, body.get(self.at..)?);
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(cap).as_bytes();
        let mut out = Vec::with_capacity(body.len() + 48);
        out.extend_from_slice(head);
        match self.member {
            CapMember::NativeOptions => {
                out.extend_from_slice(br#","options":{"num_predict":"#);
                out.extend_from_slice(digits);
                out.push(b'}');
            }
            CapMember::Field(name) => {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
                out.extend_from_slice(digits);
            }
        }
        out.extend_from_slice(tail);
        Some(out.into())
    }
}

fn positive(v: Option<&Value>) -> Option<i64> {
    v.and_then(Value::as_i64).filter(|n| *n > 0)
}

/// `Some(new value)` when the keep-alive must change; refuses unload (0) and pin (negative).
fn clamp_keep_alive(value: &Value) -> Result<Option<Value>, GatewayError> {
    let secs = match value {
        Value::Null => return Ok(None),
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| GatewayError::BadRequest("invalid keep_alive".into()))?,
        Value::String(s) => parse_go_duration(s).ok_or_else(|| {
            GatewayError::BadRequest(format!(
                "invalid keep_alive `{}`",
                s.chars().take(40).collect::<String>()
            ))
        })?,
        _ => {
            return Err(GatewayError::BadRequest(
                "keep_alive must be a duration string or a number of seconds".into(),
            ));
        }
    };
    if secs <= 0.0 {
        return Err(GatewayError::PolicyRefused(
            "keep_alive of 0 or less unloads or pins the model for every user; not allowed for this key",
        ));
    }
    let clamped = secs.clamp(KEEP_ALIVE_MIN.as_secs_f64(), KEEP_ALIVE_MAX.as_secs_f64());
    if (clamped - secs).abs() < f64::EPSILON && value.is_number() {
        return Ok(None);
    }
    // Always forward a plain number of seconds: one spelling, no parser differences.
    Ok(Some(Value::from(clamped.round() as u64)))
}

/// Go's `time.ParseDuration`: `[-+]` then one or more `<number><unit>` (units ns, us, µs, ms,
/// s, m, h), or a bare `0`. Returns seconds.
pub fn parse_go_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    let (sign, mut rest) = match s.strip_prefix('-') {
        Some(r) => (-1.0, r),
        None => (1.0, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_len..];
    }
    Some(sign * total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::{PrincipalIds, SubjectSettings};

    fn principal(ctx: Option<i64>, predict: Option<i64>, keep_alive: Option<&str>) -> Principal {
        let ids = PrincipalIds {
            tenant_id: 1,
            tenant_name: "t".into(),
            key_id: 1,
            key_prefix: "nz_x".into(),
            key_name: "k".into(),
        };
        let tenant = SubjectSettings {
            max_num_ctx: ctx,
            max_num_predict: predict,
            keep_alive_policy: keep_alive.map(String::from),
            ..Default::default()
        };
        Principal::flatten(ids, None, &tenant, &SubjectSettings::default())
    }

    fn apply(
        route: RouteKind,
        body: &str,
        p: &Principal,
    ) -> Result<(Value, Option<u64>), GatewayError> {
        let members = Members::of(body.as_bytes())?;
        let c = clamp(route, &members, p)?;
        let out = members.edited(&c.edits)?;
        Ok((serde_json::from_slice(&out).unwrap(), c.output_cap))
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5m"), Some(300.0));
        assert_eq!(parse_go_duration("1h30m"), Some(5400.0));
        assert_eq!(parse_go_duration("1.5s"), Some(1.5));
        assert_eq!(parse_go_duration("-1m"), Some(-60.0));
        assert_eq!(parse_go_duration("0"), Some(0.0));
        assert_eq!(parse_go_duration("300ms"), Some(0.3));
        for bad in ["", "10", "m", "5x", "1h-3m"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn keep_alive_is_clamped_and_unload_refused() {
        let p = principal(None, None, None);
        let (v, _) = apply(
            RouteKind::ApiChat,
            r#"{"model":"m","keep_alive":"24h"}"#,
            &p,
        )
        .unwrap();
        assert_eq!(v["keep_alive"], 1800);
        let (v, _) = apply(RouteKind::ApiChat, r#"{"model":"m","keep_alive":5}"#, &p).unwrap();
        assert_eq!(v["keep_alive"], 60);
        let (v, _) = apply(
            RouteKind::ApiChat,
            r#"{"model":"m","keep_alive":"10m"}"#,
            &p,
        )
        .unwrap();
        assert_eq!(v["keep_alive"], 600);
        for refused in [
            r#"{"model":"m","keep_alive":0}"#,
            r#"{"model":"m","keep_alive":"0"}"#,
            r#"{"model":"m","keep_alive":-1}"#,
        ] {
            assert!(
                matches!(
                    apply(RouteKind::ApiGenerate, refused, &p),
                    Err(GatewayError::PolicyRefused(_))
                ),
                "{refused}"
            );
        }
        assert!(matches!(
            apply(
                RouteKind::ApiChat,
                r#"{"model":"m","keep_alive":"forever"}"#,
                &p
            ),
            Err(GatewayError::BadRequest(_))
        ));
        let trusted = principal(None, None, Some("pass"));
        let (v, _) = apply(
            RouteKind::ApiChat,
            r#"{"model":"m","keep_alive":0}"#,
            &trusted,
        )
        .unwrap();
        assert_eq!(v["keep_alive"], 0);
    }

    #[test]
    fn options_are_clamped_and_runner_options_stripped() {
        let p = principal(Some(4096), Some(100), None);
        let (v, _) = apply(
            RouteKind::ApiChat,
            r#"{"model":"m","options":{"num_ctx":131072.0}}"#,
            &p,
        )
        .unwrap();
        assert_eq!(v["options"]["num_ctx"], 4096, "floats are clamped too");
        let body = r#"{"model":"m","options":{"num_ctx":32768,"num_gpu":99,"temperature":0.5,"num_predict":-1}}"#;
        let (v, cap) = apply(RouteKind::ApiChat, body, &p).unwrap();
        assert_eq!(
            v["options"],
            serde_json::json!({"num_ctx": 4096, "temperature": 0.5, "num_predict": 100})
        );
        assert_eq!(cap, Some(100));
        let (v, cap) = apply(RouteKind::ApiGenerate, r#"{"model":"m","prompt":"x"}"#, &p).unwrap();
        assert_eq!(v["options"]["num_predict"], 100);
        assert_eq!(cap, Some(100));
        let (v, cap) = apply(
            RouteKind::ApiChat,
            r#"{"model":"m","options":{"num_predict":20}}"#,
            &p,
        )
        .unwrap();
        assert_eq!(
            (v["options"]["num_predict"].as_i64(), cap),
            (Some(20), Some(20))
        );
        let free = principal(None, None, None);
        let (v, cap) = apply(RouteKind::ApiChat, r#"{"model":"m","messages":[]}"#, &free).unwrap();
        assert!(
            v.get("options").is_none(),
            "nothing to change, nothing added"
        );
        assert_eq!(cap, None);
    }

    #[test]
    fn openai_output_caps() {
        let p = principal(None, Some(50), None);
        let (v, cap) = apply(
            RouteKind::V1ChatCompletions,
            r#"{"model":"m","max_tokens":500}"#,
            &p,
        )
        .unwrap();
        assert_eq!((v["max_tokens"].as_i64(), cap), (Some(50), Some(50)));
        let (v, _) = apply(RouteKind::V1Completions, r#"{"model":"m"}"#, &p).unwrap();
        assert_eq!(v["max_tokens"], 50);
        let (v, _) = apply(
            RouteKind::V1Responses,
            r#"{"model":"m","max_output_tokens":10}"#,
            &p,
        )
        .unwrap();
        assert_eq!(v["max_output_tokens"], 10);
    }

    /// The body the general path writes: parse, [`output_cap_edit`], [`Members::edited`].
    fn capped_by_edit(route: RouteKind, body: &[u8], cap: u64) -> Value {
        let members = Members::unchecked(body).unwrap();
        let edits = output_cap_edit(route, &members, cap).unwrap();
        serde_json::from_slice(&members.edited(&edits).unwrap()).unwrap()
    }

    #[test]
    fn a_cap_slot_writes_what_the_general_edit_writes() {
        let p = principal(None, None, None);
        let cases: &[(RouteKind, &str)] = &[
            (
                RouteKind::ApiChat,
                r#"{"model":"m","messages":[{"role":"user","content":"}"}]}"#,
            ),
            (
                RouteKind::ApiGenerate,
                "{ \"model\" : \"m\", \"prompt\":\"x\" } \n ",
            ),
            (
                RouteKind::ApiChat,
                r#"{"model":"m","keep_alive":"0.5s","stream":true}"#,
            ),
            (
                RouteKind::V1ChatCompletions,
                r#"{"model":"m","stream":true,"messages":[]}"#,
            ),
            (RouteKind::V1Completions, r#"{"model":"m","prompt":"a"}"#),
            (
                RouteKind::V1Responses,
                "{\"model\":\"m\",\"input\":\"hi\"}\r\n",
            ),
        ];
        for (route, body) in cases {
            let members = Members::of(body.as_bytes()).unwrap();
            let mut edits = clamp(*route, &members, &p).unwrap().edits;
            if *route == RouteKind::V1ChatCompletions {
                edits.push(members.include_usage_edit().unwrap());
            }
            let sent = if edits.is_empty() {
                bytes::Bytes::copy_from_slice(body.as_bytes())
            } else {
                members.edited(&edits).unwrap()
            };
            let slot = CapSlot::find(*route, &members, &edits, &sent)
                .unwrap_or_else(|| panic!("no slot in {body}"));
            for cap in [0, 7, u64::MAX] {
                let written = slot.write(&sent, cap).unwrap();
                let got: Value = serde_json::from_slice(&written)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&written)));
                assert_eq!(got, capped_by_edit(*route, &sent, cap), "{body}");
            }
        }
    }

    #[test]
    fn a_body_that_carries_the_cap_member_has_no_slot() {
        let p = principal(None, None, None);
        for (route, body) in [
            (
                RouteKind::ApiChat,
                r#"{"model":"m","options":{"temperature":1}}"#,
            ),
            (RouteKind::ApiChat, r#"{"model":"m","options":null}"#),
            (
                RouteKind::V1ChatCompletions,
                r#"{"model":"m","max_tokens":null}"#,
            ),
            (
                RouteKind::V1Responses,
                r#"{"model":"m","max_output_tokens":0}"#,
            ),
            (RouteKind::ApiEmbed, r#"{"model":"m","input":"x"}"#),
            (RouteKind::ApiShow, r#"{"model":"m"}"#),
        ] {
            let members = Members::of(body.as_bytes()).unwrap();
            let edits = clamp(route, &members, &p).unwrap().edits;
            assert_eq!(
                CapSlot::find(route, &members, &edits, body.as_bytes()),
                None,
                "{body}"
            );
        }
        // A policy that writes `options` itself leaves the cap to the general edit.
        let capped = principal(Some(100), None, None);
        let body = r#"{"model":"m","options":{"num_ctx":4096}}"#;
        let members = Members::of(body.as_bytes()).unwrap();
        let edits = clamp(RouteKind::ApiChat, &members, &capped).unwrap().edits;
        assert!(!edits.is_empty());
        let sent = members.edited(&edits).unwrap();
        assert_eq!(
            CapSlot::find(RouteKind::ApiChat, &members, &edits, &sent),
            None
        );
    }
}
