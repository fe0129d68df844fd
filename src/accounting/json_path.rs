//! An incremental, allocation-free JSON walker that reports the values found at the key paths
//! accounting cares about (`eval_count`, `usage.prompt_tokens`, `response.usage.input_tokens`,
//! `done`, `type`, ...) while the bytes stream past.
//!
//! It keeps no copy of the input: a value split across two chunks is carried in the walker's
//! fixed-size state (a key buffer per level, a number accumulator), so the same bytes yield
//! the same events whatever the chunking. It trusts its input to be JSON produced by Ollama
//! (it does not validate grammar); on malformed input it simply reports less.

/// Nesting levels tracked; deeper values are walked but never reported.
pub const MAX_DEPTH: usize = 6;
/// Longest key remembered; longer keys never match a path.
const KEY_CAP: usize = 24;
/// Bytes of a string value kept for the `type`-style comparisons.
const STR_CAP: usize = 40;

/// A reported value. `path` holds the keys from the top level down (`"[]"` for array items).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event<'a> {
    /// A top-level value (object) begins.
    Begin,
    /// A top-level value ended.
    End,
    Number {
        path: &'a [&'a str],
        value: u64,
    },
    Bool {
        path: &'a [&'a str],
        value: bool,
    },
    /// A string value: its length in bytes (escapes counted raw) and its first bytes.
    Str {
        path: &'a [&'a str],
        len: usize,
        prefix: &'a [u8],
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Container {
    Object,
    Array,
}

#[derive(Clone, Copy)]
struct Level {
    container: Container,
    /// Inside an object: the next string is a key.
    expect_key: bool,
    key: [u8; KEY_CAP],
    key_len: usize,
    key_overflow: bool,
}

impl Level {
    const fn new(container: Container) -> Self {
        Self {
            container,
            expect_key: matches!(container, Container::Object),
            key: [0; KEY_CAP],
            key_len: 0,
            key_overflow: false,
        }
    }
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
    levels: [Level; MAX_DEPTH + 1],
    /// Current nesting depth (0 = between top-level values). Levels beyond MAX_DEPTH are
    /// counted but not stored.
    depth: usize,
    in_string: bool,
    escape: bool,
    string_is_key: bool,
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
            levels: [Level::new(Container::Array); MAX_DEPTH + 1],
            depth: 0,
            in_string: false,
            escape: false,
            string_is_key: false,
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
            self.step(b, on_event);
            rest = tail;
        }
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
                if self.depth <= MAX_DEPTH {
                    let c = if b == b'{' {
                        Container::Object
                    } else {
                        Container::Array
                    };
                    self.levels[self.depth] = Level::new(c);
                }
            }
            b'}' | b']' if self.depth > 0 => {
                self.depth -= 1;
                if self.depth == 0 {
                    on_event(Event::End);
                }
            }
            b',' => {
                if let Some(level) = self.current_mut()
                    && level.container == Container::Object
                {
                    level.expect_key = true;
                }
            }
            b'"' => {
                self.in_string = true;
                self.escape = false;
                self.str_len = 0;
                self.string_is_key = self
                    .current()
                    .is_some_and(|l| l.container == Container::Object && l.expect_key);
                if self.string_is_key
                    && let Some(level) = self.current_mut()
                {
                    level.key_len = 0;
                    level.key_overflow = false;
                }
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

    fn current(&self) -> Option<&Level> {
        (self.depth >= 1 && self.depth <= MAX_DEPTH).then(|| &self.levels[self.depth])
    }

    fn current_mut(&mut self) -> Option<&mut Level> {
        (self.depth >= 1 && self.depth <= MAX_DEPTH).then(|| &mut self.levels[self.depth])
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
        let mut keys = [""; MAX_DEPTH];
        let Some(path) = self.path(&mut keys) else {
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
                if self.string_is_key
                    && let Some(level) = self.current_mut()
                {
                    level.key_overflow = true;
                }
                self.push_string_byte(b);
            }
            b'"' => {
                self.in_string = false;
                if self.string_is_key {
                    if let Some(level) = self.current_mut() {
                        level.expect_key = false;
                    }
                } else {
                    let (len, prefix) = (self.str_len, self.str_prefix);
                    let mut keys = [""; MAX_DEPTH];
                    if let Some(path) = self.path(&mut keys) {
                        on_event(Event::Str {
                            path,
                            len,
                            prefix: &prefix[..len.min(STR_CAP)],
                        });
                    }
                }
            }
            _ => self.push_string_byte(b),
        }
    }

    /// [`Self::push_string_byte`] for a run of plain string bytes.
    fn push_string_run(&mut self, run: &[u8]) {
        if self.string_is_key {
            if let Some(level) = self.current_mut() {
                let fits = run.len().min(KEY_CAP - level.key_len);
                level.key[level.key_len..level.key_len + fits].copy_from_slice(&run[..fits]);
                level.key_len += fits;
                level.key_overflow |= fits < run.len();
            }
        } else {
            let fits = run.len().min(STR_CAP.saturating_sub(self.str_len));
            if fits > 0 {
                self.str_prefix[self.str_len..self.str_len + fits].copy_from_slice(&run[..fits]);
            }
            self.str_len += run.len();
        }
    }

    fn push_string_byte(&mut self, b: u8) {
        if self.string_is_key {
            if let Some(level) = self.current_mut() {
                if level.key_len < KEY_CAP {
                    level.key[level.key_len] = b;
                    level.key_len += 1;
                } else {
                    level.key_overflow = true;
                }
            }
        } else {
            if self.str_len < STR_CAP {
                self.str_prefix[self.str_len] = b;
            }
            self.str_len += 1;
        }
    }

    /// The key path of the value being completed, or `None` beyond the tracked depth.
    fn path<'k>(&'k self, keys: &'k mut [&'k str; MAX_DEPTH]) -> Option<&'k [&'k str]> {
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return None;
        }
        for d in 1..=self.depth {
            let level = &self.levels[d];
            keys[d - 1] = match level.container {
                Container::Array => "[]",
                Container::Object if level.key_overflow => "\u{0}",
                Container::Object => {
                    std::str::from_utf8(&level.key[..level.key_len]).unwrap_or("\u{0}")
                }
            };
        }
        Some(&keys[..self.depth])
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
            ev.contains(&r#"Bool { path: ["done"], value: true }"#.to_string()),
            "{ev:?}"
        );
        assert!(ev.contains(&r#"Number { path: ["eval_count"], value: 12 }"#.to_string()));
        assert!(
            ev.contains(&r#"Number { path: ["usage", "prompt_tokens"], value: 3 }"#.to_string())
        );
        assert!(
            ev.iter()
                .any(|e| e.starts_with(r#"Str { path: ["x", "[]", "type"], len: 1"#))
        );
        assert!(
            !ev.iter().any(|e| e.contains("\"f\"")),
            "fractional numbers are not counts"
        );
        assert_eq!(ev.first().map(String::as_str), Some("Begin"));
        assert_eq!(ev.last().map(String::as_str), Some("End"));
    }

    #[test]
    fn strings_with_escapes_and_braces_do_not_confuse_it() {
        let input = br#"{"message":{"content":"a \"eval_count\":9 } { ]"},"eval_count":2}"#;
        let ev = events(input, &[]);
        let counts: Vec<&String> = ev.iter().filter(|e| e.contains("eval_count")).collect();
        assert_eq!(
            counts,
            vec![&r#"Number { path: ["eval_count"], value: 2 }"#.to_string()]
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
        let input = br#"{"content":"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ-tail","a_key_longer_than_twenty_four_bytes":5,"eval_count":7}"#;
        let whole = events(input, &[]);
        let prefix = r#"Str { path: ["content"], len: 51, prefix: [48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 65, 66, 67, 68] }"#;
        assert!(whole.contains(&prefix.to_string()), "{whole:?}");
        assert!(whole.contains(&r#"Number { path: ["eval_count"], value: 7 }"#.to_string()));
        assert!(
            !whole.iter().any(|e| e.contains("a_key_longer")),
            "an over-long key matches no path: {whole:?}"
        );
        for i in 0..=input.len() {
            assert_eq!(events(input, &[i]), whole, "cut at {i}");
        }
    }
}
