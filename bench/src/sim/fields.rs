//! Request-body field resolution with Go `encoding/json` semantics.
//!
//! Ollama decodes request bodies into Go structs. That decoder matches object
//! keys to struct fields case-insensitively (using Unicode simple case folding,
//! so `ſ` matches `s` and the Kelvin sign matches `k`), applies duplicate keys
//! in order so the last occurrence wins, treats `null` as "leave unchanged" for
//! plain strings/bools but as "reset" for pointers, maps and slices, and merges
//! repeated objects into an existing map or struct pointer. The simulator must
//! reproduce this, because a gateway that reads the first exact `"model"` key
//! could otherwise be bypassed without the test suite noticing.

use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Why a body could not be decoded at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Empty (or whitespace-only) body; Go's decoder reports `io.EOF`.
    Missing,
    /// Syntax error or a top-level value that is not an object.
    Invalid(String),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Missing => f.write_str("missing request body"),
            BodyError::Invalid(msg) => f.write_str(msg),
        }
    }
}

/// A field held a JSON value of the wrong type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeError {
    pub field: String,
    pub found: &'static str,
    pub expected: &'static str,
}

impl fmt::Display for TypeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "json: cannot unmarshal {} into Go struct field .{} of type {}",
            self.found, self.field, self.expected
        )
    }
}

/// The top-level members of one JSON object, in document order, duplicates kept.
#[derive(Debug, Default)]
pub struct Fields {
    entries: Vec<(String, Box<RawValue>)>,
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Vec<(String, Box<RawValue>)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<Box<RawValue>>()?;
            out.push((key, value));
        }
        Ok(out)
    }

    // Go leaves the target untouched for a top-level `null`.
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
}

/// The JSON kind of a raw value, named the way Go's error messages name it.
pub fn kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "string",
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b't' | b'f') => "bool",
        Some(b'n') => "null",
        _ => "number",
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// Go's key matching: ASCII letters fold to upper case; the only non-ASCII
/// code points whose fold orbit reaches an ASCII letter are U+017F (ſ → S)
/// and U+212A (Kelvin sign → K). Field names here are all ASCII.
pub fn key_matches(key: &str, field: &str) -> bool {
    let mut field_chars = field.chars();
    for c in key.chars() {
        let folded = match c {
            '\u{017F}' => 'S',
            '\u{212A}' => 'K',
            c if c.is_ascii() => c.to_ascii_uppercase(),
            _ => return false,
        };
        match field_chars.next() {
            Some(f) if f.to_ascii_uppercase() == folded => {}
            _ => return false,
        }
    }
    field_chars.next().is_none()
}

impl Fields {
    /// Decodes a request body. Trailing bytes after the first value are
    /// ignored, as Go's `json.Decoder.Decode` does.
    pub fn parse(body: &[u8]) -> Result<Fields, BodyError> {
        if body.trim_ascii().is_empty() {
            return Err(BodyError::Missing);
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        de.deserialize_any(EntriesVisitor)
            .map(|entries| Fields { entries })
            .map_err(|e| BodyError::Invalid(e.to_string()))
    }

    /// Decodes a nested value that Go would decode into a struct.
    /// `Ok(None)` for `null`.
    pub fn from_raw(raw: &RawValue, field: &str) -> Result<Option<Fields>, TypeError> {
        if is_null(raw) {
            return Ok(None);
        }
        if kind(raw) != "object" {
            return Err(TypeError {
                field: field.to_string(),
                found: kind(raw),
                expected: "object",
            });
        }
        let mut de = serde_json::Deserializer::from_str(raw.get());
        // A RawValue is already validated JSON, so this cannot fail on syntax.
        de.deserialize_any(EntriesVisitor)
            .map(|entries| Some(Fields { entries }))
            .map_err(|_| TypeError {
                field: field.to_string(),
                found: kind(raw),
                expected: "object",
            })
    }

    /// Every occurrence of a struct field, in document order.
    pub fn all<'a, 'f>(
        &'a self,
        field: &'f str,
    ) -> impl Iterator<Item = &'a RawValue> + use<'a, 'f> {
        self.entries
            .iter()
            .filter(move |(k, _)| key_matches(k, field))
            .map(|(_, v)| v.as_ref())
    }

    /// Map semantics (`map[string]any`): keys compare exactly, last wins.
    pub fn get_exact(&self, key: &str) -> Option<&RawValue> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    fn type_error(field: &str, raw: &RawValue, expected: &'static str) -> TypeError {
        TypeError {
            field: field.to_string(),
            found: kind(raw),
            expected,
        }
    }

    /// A Go `string` field: `null` leaves the previous value, last string wins.
    pub fn string(&self, field: &str) -> Result<Option<String>, TypeError> {
        let mut out = None;
        for raw in self.all(field) {
            if is_null(raw) {
                continue;
            }
            match serde_json::from_str::<String>(raw.get()) {
                Ok(s) => out = Some(s),
                Err(_) => return Err(Self::type_error(field, raw, "string")),
            }
        }
        Ok(out)
    }

    /// A Go `string` field read as "" when absent.
    pub fn string_or_empty(&self, field: &str) -> Result<String, TypeError> {
        Ok(self.string(field)?.unwrap_or_default())
    }

    /// A Go `bool` field: `null` leaves the previous value.
    pub fn bool(&self, field: &str) -> Result<Option<bool>, TypeError> {
        let mut out = None;
        for raw in self.all(field) {
            match raw.get() {
                "null" => {}
                "true" => out = Some(true),
                "false" => out = Some(false),
                _ => return Err(Self::type_error(field, raw, "bool")),
            }
        }
        Ok(out)
    }

    /// A Go `*bool` field: `null` resets it to absent.
    pub fn ptr_bool(&self, field: &str) -> Result<Option<bool>, TypeError> {
        let mut out = None;
        for raw in self.all(field) {
            match raw.get() {
                "null" => out = None,
                "true" => out = Some(true),
                "false" => out = Some(false),
                _ => return Err(Self::type_error(field, raw, "*bool")),
            }
        }
        Ok(out)
    }

    /// A Go `*int` field: `null` resets it; fractions and exponents are
    /// rejected like Go rejects them for integer targets.
    pub fn ptr_int(&self, field: &str) -> Result<Option<i64>, TypeError> {
        let mut out = None;
        for raw in self.all(field) {
            if is_null(raw) {
                out = None;
                continue;
            }
            match serde_json::from_str::<i64>(raw.get()) {
                Ok(n) => out = Some(n),
                Err(_) => return Err(Self::type_error(field, raw, "*int")),
            }
        }
        Ok(out)
    }

    /// A Go map or struct-pointer field holding an object. Go decodes a
    /// repeated object into the existing map/struct, so members merge; a
    /// `null` resets it. Concatenating entries gives exactly that, because
    /// lookups on the result are last-wins.
    pub fn object(&self, field: &str) -> Result<Option<Fields>, TypeError> {
        let mut out: Option<Fields> = None;
        for raw in self.all(field) {
            match Fields::from_raw(raw, field)? {
                None => out = None,
                Some(inner) => match out.as_mut() {
                    Some(existing) => existing.entries.extend(inner.entries),
                    None => out = Some(inner),
                },
            }
        }
        Ok(out)
    }

    /// A slice or interface field: the last occurrence replaces earlier ones,
    /// `null` resets it to absent.
    pub fn last_raw(&self, field: &str) -> Option<&RawValue> {
        match self.all(field).last() {
            Some(raw) if !is_null(raw) => Some(raw),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Fields {
        match Fields::parse(s.as_bytes()) {
            Ok(f) => f,
            Err(e) => panic!("parse {s}: {e}"),
        }
    }

    #[test]
    fn case_insensitive_last_wins() {
        let f = parse(r#"{"model":"a","MODEL":"b"}"#);
        assert_eq!(f.string("model"), Ok(Some("b".to_string())));
        let f = parse(r#"{"Model":"a","model":"b","mOdEl":"c"}"#);
        assert_eq!(f.string("model"), Ok(Some("c".to_string())));
        let f = parse(r#"{"MODEL":"b","model":"a"}"#);
        assert_eq!(f.string("model"), Ok(Some("a".to_string())));
    }

    #[test]
    fn unicode_folds_like_go() {
        // U+017F LATIN SMALL LETTER LONG S folds to 's'.
        let f = parse("{\"\u{017F}tream\":false,\"stream\":true,\"\u{017F}TREAM\":false}");
        assert_eq!(f.ptr_bool("stream"), Ok(Some(false)));
        // U+212A KELVIN SIGN folds to 'k'.
        let f = parse("{\"max_to\u{212A}ens\":7}");
        assert_eq!(f.ptr_int("max_tokens"), Ok(Some(7)));
        // Other non-ASCII letters never match.
        let f = parse("{\"mod\u{00E9}l\":\"x\"}");
        assert_eq!(f.string("model"), Ok(None));
    }

    #[test]
    fn null_semantics() {
        // Plain string: null is a no-op.
        let f = parse(r#"{"model":"a","model":null}"#);
        assert_eq!(f.string("model"), Ok(Some("a".to_string())));
        // Pointer: null resets.
        let f = parse(r#"{"stream":false,"Stream":null}"#);
        assert_eq!(f.ptr_bool("stream"), Ok(None));
        let f = parse(r#"{"max_tokens":3,"max_tokens":null}"#);
        assert_eq!(f.ptr_int("max_tokens"), Ok(None));
    }

    #[test]
    fn type_errors_on_any_occurrence() {
        let f = parse(r#"{"model":1,"model":"a"}"#);
        assert!(f.string("model").is_err());
        let f = parse(r#"{"max_tokens":1.5}"#);
        assert!(f.ptr_int("max_tokens").is_err());
        let f = parse(r#"{"stream":"yes"}"#);
        assert!(f.ptr_bool("stream").is_err());
    }

    #[test]
    fn objects_merge() {
        let f = parse(r#"{"options":{"num_predict":5},"OPTIONS":{"temperature":1}}"#);
        let o = f.object("options").ok().flatten();
        let o = match o {
            Some(o) => o,
            None => panic!("options missing"),
        };
        assert_eq!(o.get_exact("num_predict").map(|r| r.get()), Some("5"));
        assert_eq!(o.get_exact("temperature").map(|r| r.get()), Some("1"));
        // Map keys are exact.
        let f = parse(r#"{"options":{"NUM_PREDICT":5}}"#);
        let o = f.object("options").ok().flatten();
        assert!(o.is_some_and(|o| o.get_exact("num_predict").is_none()));
        // null resets, later object starts fresh.
        let f = parse(r#"{"stream_options":{"include_usage":true},"stream_options":null}"#);
        assert!(matches!(f.object("stream_options"), Ok(None)));
    }

    #[test]
    fn body_errors() {
        assert_eq!(Fields::parse(b"  ").err(), Some(BodyError::Missing));
        assert!(matches!(
            Fields::parse(b"{\"model\":"),
            Err(BodyError::Invalid(_))
        ));
        assert!(matches!(Fields::parse(b"[1]"), Err(BodyError::Invalid(_))));
        // Trailing data after the first value is ignored, like json.Decoder.
        let f = parse(r#"{"model":"a"} trailing"#);
        assert_eq!(f.string("model"), Ok(Some("a".to_string())));
        // Top-level null decodes to an empty request.
        assert_eq!(parse("null").string("model"), Ok(None));
    }
}
