//! Invariants the fuzz targets (`fuzz/`, run by `scripts/fuzz`) check on arbitrary input, kept
//! here so that `tests/fuzz_corpus.rs` replays every saved corpus entry through the same checks
//! in the main test command. Each function panics when an invariant breaks.

use bytes::Bytes;

use crate::accounting::usage_strip::UsageStripper;
use crate::accounting::{Format, Outcome, UsageScanner};
use crate::auth::{bearer_token, key};
use crate::body;
use crate::routes::{self, ModelField};

const FORMATS: [Format; 4] = [
    Format::Native,
    Format::OpenAiJson,
    Format::OpenAiSse,
    Format::ResponsesSse,
];

fn scan(format: Format, embeddings: bool, pieces: &[&[u8]]) -> Outcome {
    let mut s = UsageScanner::new(format, embeddings);
    for p in pieces {
        s.observe(p);
    }
    s.finish(123)
}

/// `[format selector, piece size, cut, body...]`: the counts do not depend on how the body is
/// cut into chunks (whole, fixed-size pieces, one arbitrary cut).
pub fn scanners(data: &[u8]) {
    let [selector, step, cut, body @ ..] = data else {
        return;
    };
    let format = FORMATS[usize::from(*selector) % FORMATS.len()];
    let embeddings = selector & 0x80 != 0;
    let whole = scan(format, embeddings, &[body]);
    let step = usize::from(*step % 31) + 1;
    let pieces: Vec<&[u8]> = body.chunks(step).collect();
    assert_eq!(whole, scan(format, embeddings, &pieces), "chunks of {step}");
    let at = usize::from(*cut).min(body.len());
    let (a, b) = body.split_at(at);
    assert_eq!(whole, scan(format, embeddings, &[a, b]), "cut at {at}");
}

fn strip(completions: bool, pieces: &[&[u8]]) -> Vec<u8> {
    let mut s = UsageStripper::new(completions);
    let mut out = Vec::new();
    for p in pieces {
        out.extend_from_slice(&s.push(Bytes::copy_from_slice(p)));
    }
    if let Some(tail) = s.finish() {
        out.extend_from_slice(&tail);
    }
    out
}

/// `[selector, piece size, stream...]`: the usage-event filter's output does not depend on how
/// the stream arrived, and never grows it by more than a line end.
pub fn usage_strip(data: &[u8]) {
    let [selector, step, body @ ..] = data else {
        return;
    };
    let completions = selector & 1 == 1;
    let whole = strip(completions, &[body]);
    let step = usize::from(*step % 29) + 1;
    let pieces: Vec<&[u8]> = body.chunks(step).collect();
    assert_eq!(whole, strip(completions, &pieces), "chunks of {step}");
    assert!(whole.len() <= body.len() + 2, "stripping added bytes");
}

/// An accepted path is canonical (a second pass changes nothing) and absolute, and a blocked
/// path is never routed.
pub fn paths(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = routes::normalize_path(raw) else {
        return;
    };
    assert!(path.starts_with('/'), "{path:?}");
    assert_eq!(
        routes::normalize_path(&path).ok().as_deref(),
        Some(path.as_ref()),
        "normalising twice"
    );
    let blocked = routes::is_blocked(&path);
    for method in [http::Method::GET, http::Method::POST, http::Method::DELETE] {
        if routes::classify(&method, &path).is_ok() {
            assert!(!blocked, "a blocked path was routed: {path:?}");
        }
    }
}

/// Whatever passes the key shape check has a well-formed prefix.
pub fn keys(data: &[u8]) {
    if let Some(token) = bearer_token(Some(data))
        && key::is_well_formed(token)
    {
        assert!(key::is_valid_prefix(key::prefix_of(token)), "{token:?}");
    }
}

/// A body the model extraction accepts names the same model after the gateway's rewrites.
pub fn bodies(data: &[u8]) {
    let Ok(parsed) = body::parse(data, ModelField::Model) else {
        return;
    };
    if let Ok(rewritten) = body::with_include_usage(data) {
        let again = body::parse(&rewritten, ModelField::Model);
        assert!(
            again
                .as_ref()
                .is_ok_and(|a| a.model == parsed.model && a.include_usage),
            "include_usage rewrite: {again:?}"
        );
    }
    let cap = vec![("max_tokens", Some(serde_json::Value::from(7)))];
    if let Ok(capped) = body::apply_edits(data, &cap) {
        let again = body::parse(&capped, ModelField::Model);
        assert!(
            again.as_ref().is_ok_and(|a| a.model == parsed.model),
            "output cap rewrite: {again:?}"
        );
    }
}
