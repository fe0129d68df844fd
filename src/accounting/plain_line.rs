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
/// Visits only the bytes that matter to it (quotes, backslashes, brackets and braces), found
/// eight at a time ([`structural`]): a content frame is mostly text between them.
pub fn is_plain_frame(line: &[u8]) -> bool {
    let line = line.trim_ascii_end();
    let len = line.len();
    if line.first() != Some(&b'{') || line.last() != Some(&b'}') {
        return false;
    }
    if is_ollama_content_frame(line) {
        return true;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut start = 0;
    // Bytes before this were consumed (an escape's second byte may fall in the next word).
    let mut from = 0;
    let mut word_start = 0;
    while word_start < len {
        let mut mask = structural(word_at(line, word_start));
        if from > word_start {
            mask &= u64::MAX
                .checked_shl(8 * (from - word_start) as u32)
                .unwrap_or(0);
        }
        while mask != 0 {
            let at = word_start + (mask.trailing_zeros() / 8) as usize;
            mask &= mask - 1;
            let next = at + 1;
            let class = CLASS[usize::from(line[at])];
            if in_string {
                match class {
                    QUOTE => {
                        in_string = false;
                        if !harmless_string(&line[start..at], &line[next..]) {
                            return false;
                        }
                    }
                    // The escaped byte is string content whatever it is, as for the walker.
                    BACKSLASH => {
                        from = next + 1;
                        mask &= 0xFFu64
                            .checked_shl(8 * (next - word_start) as u32)
                            .map_or(u64::MAX, |escaped| !escaped);
                    }
                    _ => {}
                }
                continue;
            }
            match class {
                QUOTE => {
                    in_string = true;
                    start = next;
                }
                OPEN => depth += 1,
                CLOSE => {
                    // The walker ignores a closer at depth 0 and ends the object when depth
                    // returns to 0: both must happen only at the line's last byte.
                    if depth == 0 {
                        return false;
                    }
                    depth -= 1;
                    if depth == 0 && next != len {
                        return false;
                    }
                }
                // A backslash outside a string (or a `|`, see `structural`) means nothing.
                _ => {}
            }
        }
        word_start += 8;
    }
    !in_string && depth == 0
}

/// Ollama's own content frames, members in the order its encoder writes them:
/// `{"model":M,"created_at":T,"message":{"role":"assistant","content":C},"done":false}` and
/// `{"model":M,"created_at":T,"response":C,"done":false}`. The fixed parts are compared whole
/// and each string value is found with one search, so such a line costs a few comparisons
/// instead of a visit to every quote and bracket. A line matching neither shape takes the
/// general test below; a line that matches is one the general test accepts too (the tests
/// check both on generated lines).
fn is_ollama_content_frame(line: &[u8]) -> bool {
    let content_frame = || {
        let rest = string_value(line.strip_prefix(br#"{"model":""#)?)?;
        let rest = string_value(rest.strip_prefix(br#","created_at":""#)?)?;
        let rest = match rest.strip_prefix(br#","message":{"role":"assistant","content":""#) {
            Some(chat) => string_value(chat)?.strip_prefix(b"}")?,
            None => string_value(rest.strip_prefix(br#","response":""#)?)?,
        };
        Some(rest == br#","done":false}"#)
    };
    content_frame() == Some(true)
}

/// `rest` starts inside a string: the bytes after its closing quote, when the string is one
/// [`harmless_string`] lets pass.
fn string_value(rest: &[u8]) -> Option<&[u8]> {
    let mut from = 0;
    loop {
        let at = from + memchr::memchr2(b'"', b'\\', rest.get(from..)?)?;
        if rest[at] == b'"' {
            let after = &rest[at + 1..];
            return harmless_string(&rest[..at], after).then_some(after);
        }
        // The escaped byte is string content whatever it is.
        from = at + 2;
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The eight bytes of `line` from `at`, the first in the lowest bits; past the end, zeros
/// (which are nothing to [`is_plain_frame`]).
fn word_at(line: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    let rest = &line[at..];
    let n = rest.len().min(8);
    word[..n].copy_from_slice(&rest[..n]);
    u64::from_le_bytes(word)
}

/// The high bit of every byte of `word` equal to `byte`. Exact: no carry crosses bytes.
fn equal_bytes(word: u64, byte: u8) -> u64 {
    let x = word ^ (ONES * u64::from(byte));
    !(((x & !HIGH) + !HIGH) | x) & HIGH
}

/// The high bit of every quote, backslash, bracket and brace of `word`, and of `|`: clearing
/// bit 5 folds `{`, `|`, `}` onto `[`, `\`, `]`, three tests instead of six, and the class
/// table then reads `|` as nothing.
fn structural(word: u64) -> u64 {
    let folded = word & (ONES * 0xDF);
    equal_bytes(word, b'"')
        | equal_bytes(folded, b'[')
        | equal_bytes(folded, b'\\')
        | equal_bytes(folded, b']')
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

    /// The byte-at-a-time version [`is_plain_frame`] replaced: the reference it must agree with.
    fn bytewise(line: &[u8]) -> bool {
        let line = line.trim_ascii_end();
        let len = line.len();
        if line.first() != Some(&b'{') || line.last() != Some(&b'}') {
            return false;
        }
        let (mut depth, mut in_string, mut start, mut i) = (0usize, false, 0, 0);
        while i < len {
            let class = CLASS[usize::from(line[i])];
            i += 1;
            if in_string {
                match class {
                    QUOTE => {
                        in_string = false;
                        if !harmless_string(&line[start..i - 1], &line[i..]) {
                            return false;
                        }
                    }
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
                    if depth == 0 {
                        return false;
                    }
                    depth -= 1;
                    if depth == 0 && i != len {
                        return false;
                    }
                }
                _ => {}
            }
        }
        !in_string && depth == 0
    }

    #[test]
    fn agrees_with_the_bytewise_reference() {
        // Lines built from the pieces that matter, at every alignment to the 8-byte words.
        const PIECES: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b"\\",
            b"\\\"",
            b"|",
            b"a",
            b"  ",
            b":",
            b",",
            b"\"done\":false}",
            b"\"done\":false,\"",
            b"\"done\"",
            b"\"error\"",
            b"\xc3\xa9",
            b"\"content\":\"tok \"",
            b"{\"model\":\"m\",",
            b"\x00",
            b"\x7f",
            b"\xfb",
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut plain = 0;
        for _ in 0..200_000 {
            let mut line = vec![b'{'];
            for _ in 0..next() % 24 {
                line.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            if next() % 2 == 0 {
                line.extend_from_slice(b"\"done\":false}");
            } else {
                line.push(b'}');
            }
            let expected = bytewise(&line);
            plain += usize::from(expected);
            assert_eq!(
                is_plain_frame(&line),
                expected,
                "{}",
                String::from_utf8_lossy(&line)
            );
        }
        // The generator reaches both answers.
        assert!(plain > 1_000, "{plain}");
        // Ollama's own shapes, with every piece in every string.
        let mut fast = 0;
        for _ in 0..100_000 {
            // Some values are exactly a name accounting reads.
            const WORDS: &[&[u8]] = &[b"done", b"error", b"type", b"usage", b"eval_count"];
            let mut value = || {
                if next() % 8 == 0 {
                    return WORDS[(next() % WORDS.len() as u64) as usize].to_vec();
                }
                let mut v = Vec::new();
                for _ in 0..next() % 4 {
                    v.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
                }
                v
            };
            let (model, at, content) = (value(), value(), value());
            let mut line = br#"{"model":""#.to_vec();
            line.extend_from_slice(&model);
            line.extend_from_slice(br#"","created_at":""#);
            line.extend_from_slice(&at);
            if next() % 2 == 0 {
                line.extend_from_slice(br#"","message":{"role":"assistant","content":""#);
                line.extend_from_slice(&content);
                line.extend_from_slice(br#""},"done":false}"#);
            } else {
                line.extend_from_slice(br#"","response":""#);
                line.extend_from_slice(&content);
                line.extend_from_slice(br#"","done":false}"#);
            }
            let expected = bytewise(&line);
            fast += usize::from(is_ollama_content_frame(&line));
            assert_eq!(
                is_plain_frame(&line),
                expected,
                "{}",
                String::from_utf8_lossy(&line)
            );
            assert!(!is_ollama_content_frame(&line) || expected);
        }
        assert!(fast > 10_000, "{fast}");
    }

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
