//! Deterministic token accounting (see the module docs of [`crate::sim`]).

/// `prompt_eval_count` for a prompt of `bytes` UTF-8 bytes: ceil(bytes / 4),
/// at least 1.
pub fn prompt_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

/// Text of the `i`-th content chunk (1-based).
pub fn chunk_text(i: usize) -> String {
    format!("tok{i} ")
}

/// The text a complete generation of `n` chunks assembles to.
pub fn full_text(n: usize) -> String {
    (1..=n).map(chunk_text).collect()
}

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// How many content chunks to produce, given the configured count and the
/// request's output cap. A cap applies only when positive (Ollama treats
/// `num_predict <= 0` as unlimited) and reports `length` only when it actually
/// cut the output short.
pub fn plan_chunks(configured: usize, cap: Option<i64>) -> (usize, Finish) {
    match cap {
        Some(cap) if cap > 0 && (cap as u64) < configured as u64 => (cap as usize, Finish::Length),
        _ => (configured, Finish::Stop),
    }
}

/// Deterministic, plausible durations in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub total: u64,
    pub load: u64,
    pub prompt_eval: u64,
    pub eval: u64,
}

impl Timings {
    pub fn new(prompt_tokens: u64, eval_count: u64) -> Timings {
        let load = 12_345_678;
        let prompt_eval = prompt_tokens * 250_000;
        let eval = eval_count * 20_000_000;
        Timings {
            total: load + prompt_eval + eval + 1_000_000,
            load,
            prompt_eval,
            eval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_rule() {
        assert_eq!(prompt_tokens(0), 1);
        assert_eq!(prompt_tokens(1), 1);
        assert_eq!(prompt_tokens(4), 1);
        assert_eq!(prompt_tokens(5), 2);
        assert_eq!(prompt_tokens(8), 2);
        assert_eq!(prompt_tokens(9), 3);
        // Multi-byte characters count by bytes, not chars.
        assert_eq!(prompt_tokens("héllo".len()), 2);
        assert_eq!(prompt_tokens("日本語".len()), 3);
    }

    #[test]
    fn chunk_plan() {
        assert_eq!(plan_chunks(8, None), (8, Finish::Stop));
        assert_eq!(plan_chunks(8, Some(3)), (3, Finish::Length));
        assert_eq!(plan_chunks(8, Some(8)), (8, Finish::Stop));
        assert_eq!(plan_chunks(8, Some(20)), (8, Finish::Stop));
        assert_eq!(plan_chunks(8, Some(0)), (8, Finish::Stop));
        assert_eq!(plan_chunks(8, Some(-1)), (8, Finish::Stop));
    }

    #[test]
    fn text() {
        assert_eq!(full_text(3), "tok1 tok2 tok3 ");
        assert_eq!(full_text(0), "");
    }
}
