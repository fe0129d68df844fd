//! The native stream's fast path: most lines of an Ollama NDJSON stream are content frames
//! (`{"model":…,"message":{…},"done":false}`) that tell accounting nothing but "one more
//! chunk". [`is_plain_frame`] recognises such a line with one pass over its bytes,
//! instead of the walker's full state machine with a key lookup and an event per value.
//!
//! The test is conservative: it answers `true` only for a line the walker would read as
//! exactly one top-level object carrying none of the members native accounting looks at, so
//! that walking it could only have counted one content chunk. Anything else (a count, an
//! error, `done` other than `false`, two objects on one line, an unbalanced or unterminated
//! line) goes to the walker, and the outcome does not depend on which path a line took, nor
//! on how the stream was cut into chunks (`fuzzing::scanners` checks both).

/// What a byte can be to [`is_plain_frame`]: most bytes are nothing to it.
const OTHER: u8 = 0;
const QUOTE: u8 = 1;
const BACKSLASH: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;

static CLASS: [u8; 256] = {
    let mut t = [OTHER; 256];
    t[b'"' as usize] = QUOTE;
    t[b'\\' as usize] = BACKSLASH;
    t[b'{' as usize] = OPEN;
    t[b'[' as usize] = OPEN;
    t[b'}' as usize] = CLOSE;
    t[b']' as usize] = CLOSE;
    t
};

/// True when `line` (without its `\n`) is one JSON object that the walker would report as a
/// plain content chunk of a native stream.
///
/// One byte loop with a class table: a frame's strings are short, and a search call per
/// string (memchr) cost more than it saved.
pub fn is_plain_frame(line: &[u8]) -> bool {
    let line = line.trim_ascii_end();
    let len = line.len();
    if line.first() != Some(&b'{') || line.last() != Some(&b'}') {
        return false;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut start = 0;
    let mut i = 0;
    while i < len {
        let class = CLASS[usize::from(line[i])];
        i += 1;
        if class == OTHER {
            continue;
        }
        if in_string {
            match class {
                QUOTE => {
                    in_string = false;
                    if !harmless_string(&line[start..i - 1], &line[i..]) {
                        return false;
                    }
                }
                // The escaped byte is string content whatever it is, as for the walker.
                BACKSLASH => i += 1,
                _ => {}
            }
            continue;
        }
        match class {
            QUOTE => {
                in_string = true;
                start = i;
            }
            OPEN => depth += 1,
            CLOSE => {
                // The walker ignores a closer at depth 0 and ends the object when depth
                // returns to 0: both must happen only at the line's last byte.
                if depth == 0 {
                    return false;
                }
                depth -= 1;
                if depth == 0 && i != len {
                    return false;
                }
            }
            // A backslash outside a string means nothing to the walker either.
            _ => {}
        }
    }
    !in_string && depth == 0
}

/// False for a string that names a member native accounting reads (as a key or not: the
/// walker decides what is a key from its own state, and this test need not agree with it),
/// except `done` with the value `false` that every content frame carries. The walker checks
/// no grammar: whatever follows `false` up to the next key is read as more values of `done`
/// (a bare `t` as `true`), so only the end of the object or a comma and the next key may.
fn harmless_string(text: &[u8], after: &[u8]) -> bool {
    match text {
        b"done" => after.starts_with(b":false}") || after.starts_with(b":false,\""),
        b"error" | b"type" | b"usage" | b"eval_count" | b"prompt_eval_count" => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_frames_are_plain() {
        for line in [
            r#"{"model":"llama3.2","created_at":"2026-11-23T09:00:00.1Z","message":{"role":"assistant","content":"tok1 "},"done":false}"#,
            r#"{"model":"m","response":"a \"quoted\" \\ word\n","done":false}  "#,
            r#"{"model":"m","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":{"x":[1,{"y":"}"}]}}}]},"done":false}"#,
            r#"{"model":"m","message":{"content":"the word \"done\" and \"error\""},"done":false}"#,
        ] {
            assert!(is_plain_frame(line.as_bytes()), "{line}");
        }
    }

    #[test]
    fn anything_accounting_reads_is_not() {
        for line in [
            r#"{"model":"m","done":true,"eval_count":3}"#,
            r#"{"model":"m","done": false}"#,
            r#"{"model":"m","done":false,"prompt_eval_count":1}"#,
            r#"{"error":"boom"}"#,
            r#"{"type":"x","done":false}"#,
            r#"{"usage":{"prompt_tokens":1}}"#,
            r#"{"done",true}"#,
            r#"{"a":"done","x":1}"#,
            r#"{"done":false role":"assistant"}"#,
            r#"{"done":false,t}"#,
            r#"{"a":1}{"b":2}"#,
            r#"{"a":{"b":1}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":"ends in an escape\"}"#,
            r#"}{"a":1}"#,
            r#" {"a":1}"#,
            r#"{"a":1} x"#,
            "",
            "{",
        ] {
            assert!(!is_plain_frame(line.as_bytes()), "{line}");
        }
    }
}
