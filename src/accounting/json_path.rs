//! An incremental, allocation-free JSON walker that reports the values found at the key paths
//! accounting cares about (`eval_count`, `usage.prompt_tokens`, `response.usage.input_tokens`,
//! `done`, `type`, ...) while the bytes stream past.
//!
//! It keeps no copy of the input: a value split across two chunks is carried in the walker's
//! fixed-size state (the key being read, a number accumulator), so the same bytes yield the same
//! events whatever the chunking. Keys are classified into [`Key`] once, when they end, so a path
//! is a slice of small values and matching it compares no bytes. It trusts its input to be JSON
//! produced by Ollama (it does not validate grammar); on malformed input it simply reports less.

/// Nesting levels tracked; deeper values are walked but never reported.
pub const MAX_DEPTH: usize = 6;
/// Longest key remembered; longer keys are [`Key::Other`].
const KEY_CAP: usize = 24;
/// Bytes of a string value kept for the `type`-style comparisons.
const STR_CAP: usize = 40;

/// A step of a value's path: the object keys accounting matches on, an array item, or any
/// other key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// An array item (`[]`).
    Item,
    /// A key no path of ours uses (or one too long, or written with escapes).
    Other,
    Done,
    PromptEvalCount,
    EvalCount,
    Usage,
    PromptTokens,
    CompletionTokens,
    InputTokens,
    OutputTokens,
    Response,
    Choices,
    Delta,
    Role,
    Text,
    Message,
    Content,
    Thinking,
    Error,
    Type,
}

impl Key {
    fn classify(key: &[u8]) -> Key {
        match key {
            b"done" => Key::Done,
            b"prompt_eval_count" => Key::PromptEvalCount,
            b"eval_count" => Key::EvalCount,
            b"usage" => Key::Usage,
            b"prompt_tokens" => Key::PromptTokens,
            b"completion_tokens" => Key::CompletionTokens,
            b"input_tokens" => Key::InputTokens,
            b"output_tokens" => Key::OutputTokens,
            b"response" => Key::Response,
            b"choices" => Key::Choices,
            b"delta" => Key::Delta,
            b"role" => Key::Role,
            b"text" => Key::Text,
            b"message" => Key::Message,
            b"content" => Key::Content,
            b"thinking" => Key::Thinking,
            b"error" => Key::Error,
            b"type" => Key::Type,
            _ => Key::Other,
        }
    }
}

/// A reported value. `path` holds the keys from the top level down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event<'a> {
    /// A top-level value (object) begins.
    Begin,
    /// A top-level value ended.
    End,
    Number {
        path: &'a [Key],
        value: u64,
    },
    Bool {
        path: &'a [Key],
        value: bool,
    },
    /// A string value: its length in bytes (escapes counted raw) and, for a `type` value, its
    /// first bytes (empty for any other).
    Str {
        path: &'a [Key],
        len: usize,
        prefix: &'a [u8],
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scalar {
    None,
    Number,
    /// Negative or fractional numbers are walked, never reported as counts.
    BadNumber,
    True,
    False,
    Null,
}

pub struct JsonWalker {
    /// The path: `path[d - 1]` is the key (or [`Key::Item`]) of the value at depth `d`.
    path: [Key; MAX_DEPTH],
    /// Per tracked depth: the container is an object whose next string is a key.
    expect_key: [bool; MAX_DEPTH],
    /// Per tracked depth: the container is an object (not an array).
    object: [bool; MAX_DEPTH],
    /// Current nesting depth (0 = between top-level values). Levels beyond MAX_DEPTH are
    /// counted but not stored.
    depth: usize,
    in_string: bool,
    escape: bool,
    string_is_key: bool,
    /// The string is a `type` value, whose first bytes the event carries (no other value's
    /// bytes are kept).
    keep_prefix: bool,
    /// The key being read (only one at a time), classified when it ends.
    key: [u8; KEY_CAP],
    key_len: usize,
    key_overflow: bool,
    str_len: usize,
    str_prefix: [u8; STR_CAP],
    scalar: Scalar,
    number: u64,
}

impl Default for JsonWalker {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonWalker {
    pub const fn new() -> Self {
        Self {
            path: [Key::Other; MAX_DEPTH],
            expect_key: [false; MAX_DEPTH],
            object: [false; MAX_DEPTH],
            depth: 0,
            in_string: false,
            escape: false,
            string_is_key: false,
            keep_prefix: false,
            key: [0; KEY_CAP],
            key_len: 0,
            key_overflow: false,
            str_len: 0,
            str_prefix: [0; STR_CAP],
            scalar: Scalar::None,
            number: 0,
        }
    }

    /// Forgets a half-read value (used when a framing layer knows the value was cut off).
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Between top-level values: no container, string or scalar open. What the walker did
    /// before no longer matters to what it makes of the next bytes.
    pub fn is_idle(&self) -> bool {
        self.depth == 0 && !self.in_string && self.scalar == Scalar::None
    }

    /// Feeds bytes; `on_event` receives every value at a tracked depth.
    pub fn feed(&mut self, bytes: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            if self.in_string && !self.escape && b != b'"' && b != b'\\' {
                // Inside a string only its end and escapes matter: most of a chat chunk's
                // bytes are string content, taken as one run instead of byte by byte.
                let run = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
                self.push_string_run(&rest[..run]);
                rest = &rest[run..];
                continue;
            }
            if b == b'"' && !self.in_string && self.scalar == Scalar::None {
                // Most strings (every key, and most values, of an Ollama line) end in the
                // chunk they start in, without escapes: taken whole, with none of the
                // byte-by-byte state a string split across chunks needs.
                if let Some(end) = memchr::memchr2(b'"', b'\\', tail)
                    && tail[end] == b'"'
                {
                    self.whole_string(&tail[..end], on_event);
                    rest = &tail[end + 1..];
                    continue;
                }
            }
            self.step(b, on_event);
            rest = tail;
        }
    }

    /// A string seen from its opening to its closing quote, with no escape in it: the same
    /// effect as walking it byte by byte.
    fn whole_string(&mut self, text: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        let Some(i) = self.tracked() else {
            return;
        };
        if self.object[i] && self.expect_key[i] {
            self.expect_key[i] = false;
            self.path[i] = if text.len() > KEY_CAP {
                Key::Other
            } else {
                Key::classify(text)
            };
            return;
        }
        let kept = if self.path[i] == Key::Type {
            text.len().min(STR_CAP)
        } else {
            0
        };
        on_event(Event::Str {
            path: &self.path[..=i],
            len: text.len(),
            prefix: &text[..kept],
        });
    }

    fn step(&mut self, b: u8, on_event: &mut impl FnMut(Event<'_>)) {
        if self.in_string {
            self.string_byte(b, on_event);
            return;
        }
        if self.scalar != Scalar::None {
            if self.scalar_byte(b) {
                return;
            }
            self.finish_scalar(on_event);
        }
        match b {
            b'{' | b'[' => {
                if self.depth == 0 {
                    on_event(Event::Begin);
                }
                self.depth += 1;
                // The new level's path step: no key until one is read; `[]` for array items.
                if let Some(i) = self.tracked() {
                    self.object[i] = b == b'{';
                    self.expect_key[i] = b == b'{';
                    self.path[i] = if b == b'{' { Key::Other } else { Key::Item };
                }
            }
            b'}' | b']' if self.depth > 0 => {
                self.depth -= 1;
                if self.depth == 0 {
                    on_event(Event::End);
                }
            }
            b',' => {
                if let Some(i) = self.tracked()
                    && self.object[i]
                {
                    self.expect_key[i] = true;
                }
            }
            b'"' => {
                self.in_string = true;
                self.escape = false;
                self.str_len = 0;
                let at = self.tracked();
                self.string_is_key = at.is_some_and(|i| self.object[i] && self.expect_key[i]);
                self.keep_prefix =
                    !self.string_is_key && at.is_some_and(|i| self.path[i] == Key::Type);
                self.key_len = 0;
                self.key_overflow = false;
            }
            b'-' => self.start_scalar(Scalar::BadNumber, 0),
            b'0'..=b'9' => self.start_scalar(Scalar::Number, u64::from(b - b'0')),
            b't' => self.start_scalar(Scalar::True, 0),
            b'f' => self.start_scalar(Scalar::False, 0),
            b'n' => self.start_scalar(Scalar::Null, 0),
            // ':' and whitespace carry no information for us.
            _ => {}
        }
    }

    /// The index of the current level in the per-depth arrays, when it is tracked.
    fn tracked(&self) -> Option<usize> {
        (self.depth >= 1 && self.depth <= MAX_DEPTH).then(|| self.depth - 1)
    }

    fn start_scalar(&mut self, kind: Scalar, number: u64) {
        self.scalar = kind;
        self.number = number;
    }

    /// True while `b` still belongs to the scalar.
    fn scalar_byte(&mut self, b: u8) -> bool {
        match (self.scalar, b) {
            (Scalar::Number, b'0'..=b'9') => {
                self.number = self
                    .number
                    .saturating_mul(10)
                    .saturating_add(u64::from(b - b'0'));
                true
            }
            (Scalar::Number, b'.' | b'e' | b'E' | b'+' | b'-') => {
                self.scalar = Scalar::BadNumber;
                true
            }
            (Scalar::BadNumber, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') => true,
            (Scalar::True | Scalar::False | Scalar::Null, b'a'..=b'z') => true,
            _ => false,
        }
    }

    fn finish_scalar(&mut self, on_event: &mut impl FnMut(Event<'_>)) {
        let scalar = std::mem::replace(&mut self.scalar, Scalar::None);
        let Some(path) = self.value_path() else {
            return;
        };
        match scalar {
            Scalar::Number => on_event(Event::Number {
                path,
                value: self.number,
            }),
            Scalar::True => on_event(Event::Bool { path, value: true }),
            Scalar::False => on_event(Event::Bool { path, value: false }),
            _ => {}
        }
    }

    fn string_byte(&mut self, b: u8, on_event: &mut impl FnMut(Event<'_>)) {
        if self.escape {
            self.escape = false;
            self.push_string_byte(b);
            return;
        }
        match b {
            b'\\' => {
                self.escape = true;
                // A key with escapes never matches a path (ours have none).
                if self.string_is_key {
                    self.key_overflow = true;
                }
                self.push_string_byte(b);
            }
            b'"' => {
                self.in_string = false;
                if self.string_is_key {
                    self.end_key();
                } else if let Some(path) = self.value_path() {
                    let len = self.str_len;
                    let kept = if self.keep_prefix {
                        len.min(STR_CAP)
                    } else {
                        0
                    };
                    on_event(Event::Str {
                        path,
                        len,
                        prefix: &self.str_prefix[..kept],
                    });
                }
            }
            _ => self.push_string_byte(b),
        }
    }

    fn end_key(&mut self) {
        if let Some(i) = self.tracked() {
            self.expect_key[i] = false;
            self.path[i] = if self.key_overflow {
                Key::Other
            } else {
                Key::classify(&self.key[..self.key_len])
            };
        }
    }

    /// [`Self::push_string_byte`] for a run of plain string bytes.
    fn push_string_run(&mut self, run: &[u8]) {
        if self.string_is_key {
            let fits = run.len().min(KEY_CAP - self.key_len);
            self.key[self.key_len..self.key_len + fits].copy_from_slice(&run[..fits]);
            self.key_len += fits;
            self.key_overflow |= fits < run.len();
        } else {
            let fits = run.len().min(STR_CAP.saturating_sub(self.str_len));
            if self.keep_prefix && fits > 0 {
                self.str_prefix[self.str_len..self.str_len + fits].copy_from_slice(&run[..fits]);
            }
            self.str_len += run.len();
        }
    }

    fn push_string_byte(&mut self, b: u8) {
        self.push_string_run(std::slice::from_ref(&b));
    }

    /// The key path of the value being completed, or `None` outside the tracked depths.
    fn value_path(&self) -> Option<&[Key]> {
        self.tracked().map(|i| &self.path[..=i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut w = JsonWalker::new();
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            w.feed(&input[last..c], &mut |e| out.push(format!("{e:?}")));
            last = c;
        }
        out
    }

    #[test]
    fn reports_numbers_bools_and_strings_at_their_paths() {
        let input = br#"{"model":"m","done":true,"eval_count":12,"usage":{"prompt_tokens":3},"x":[{"type":"a"}],"f":-1.5}"#;
        let ev = events(input, &[]);
        assert!(
            ev.contains(&"Bool { path: [Done], value: true }".to_string()),
            "{ev:?}"
        );
        assert!(ev.contains(&"Number { path: [EvalCount], value: 12 }".to_string()));
        assert!(ev.contains(&"Number { path: [Usage, PromptTokens], value: 3 }".to_string()));
        assert!(
            ev.iter()
                .any(|e| e.starts_with("Str { path: [Other, Item, Type], len: 1"))
        );
        assert!(
            !ev.iter().any(|e| e.starts_with("Number { path: [Other]")),
            "fractional numbers are not counts"
        );
        assert_eq!(ev.first().map(String::as_str), Some("Begin"));
        assert_eq!(ev.last().map(String::as_str), Some("End"));
    }

    #[test]
    fn strings_with_escapes_and_braces_do_not_confuse_it() {
        let input = br#"{"message":{"content":"a \"eval_count\":9 } { ]"},"eval_count":2}"#;
        let ev = events(input, &[]);
        let counts: Vec<&String> = ev.iter().filter(|e| e.contains("EvalCount")).collect();
        assert_eq!(
            counts,
            vec![&"Number { path: [EvalCount], value: 2 }".to_string()]
        );
    }

    #[test]
    fn only_whole_unescaped_keys_are_classified() {
        let input = br#"{"done_reason":"stop","d\u006fne":true,"eval_count_x":1,"done":false}"#;
        let ev = events(input, &[]);
        assert_eq!(
            ev,
            vec![
                "Begin",
                "Str { path: [Other], len: 4, prefix: [] }",
                "Bool { path: [Other], value: true }",
                "Number { path: [Other], value: 1 }",
                "Bool { path: [Done], value: false }",
                "End",
            ]
        );
    }

    #[test]
    fn every_split_gives_the_same_events() {
        let input = br#"{"a":{"b":[1,{"c":"x\"y"}],"eval_count":123456},"done":false,"n":null}
{"done":true,"prompt_eval_count":77}"#;
        let whole = events(input, &[]);
        for i in 0..=input.len() {
            assert_eq!(events(input, &[i]), whole, "cut at {i}");
            for j in i..=input.len() {
                assert_eq!(events(input, &[i, j]), whole, "cuts at {i},{j}");
            }
        }
    }

    #[test]
    fn long_strings_and_keys_keep_their_first_bytes_whatever_the_split() {
        let input = br#"{"type":"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ-tail","content":"abc","a_key_longer_than_twenty_four_bytes":5,"eval_count":7}"#;
        let whole = events(input, &[]);
        let prefix = r#"Str { path: [Type], len: 51, prefix: [48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 65, 66, 67, 68] }"#;
        assert!(whole.contains(&prefix.to_string()), "{whole:?}");
        assert!(
            whole.contains(&"Str { path: [Content], len: 3, prefix: [] }".to_string()),
            "only `type` values keep their bytes: {whole:?}"
        );
        assert!(whole.contains(&"Number { path: [EvalCount], value: 7 }".to_string()));
        assert!(
            whole.contains(&"Number { path: [Other], value: 5 }".to_string()),
            "an over-long key matches no path: {whole:?}"
        );
        for i in 0..=input.len() {
            assert_eq!(events(input, &[i]), whole, "cut at {i}");
        }
    }
}
