//! `ollama-sim`: a deterministic stand-in for an Ollama server, speaking
//! Ollama's native `/api/*` wire format and its OpenAI-compatible `/v1/*`
//! surface, for testing and benchmarking the gateway without a GPU.
//!
//! # Token rules
//!
//! Everything is deterministic so tests can assert exact numbers.
//!
//! * **Completion.** The number of content chunks streamed equals
//!   `eval_count` (native) = `completion_tokens` (`/v1/chat/completions`,
//!   `/v1/completions`) = `output_tokens` (`/v1/responses`). The count is the
//!   `x-sim-chunks` request header, else `--chunks` (default 8). It is capped
//!   by the request's output limit when that is given and `> 0`:
//!   `options.num_predict` natively, `max_tokens` on `/v1/chat/completions`
//!   and `/v1/completions`, `max_output_tokens` on `/v1/responses`. When the
//!   cap actually cuts the count short, `done_reason`/`finish_reason` is
//!   `"length"`, otherwise `"stop"`. (`/v1/responses` keeps
//!   `status:"completed"` either way, as Ollama does.) Chunk *i* (1-based)
//!   carries the text `"tok<i> "`, so the assembled text of *n* chunks is
//!   `"tok1 tok2 … tok<n> "`.
//! * **Prompt.** `prompt_eval_count` = `prompt_tokens` = `input_tokens` =
//!   `ceil(B / 4)` with a minimum of 1, where `B` is the total UTF-8 byte
//!   length of the prompt text: for `/api/chat` every message's `content`
//!   plus a top-level `system`; for `/v1/chat/completions` every message's
//!   string content or `text` parts; for `/api/generate` `system` + `prompt`;
//!   for `/v1/completions` `prompt`; for `/v1/responses` `instructions` plus
//!   `input` (a string, or the text of every item's `content`/`output`, as a
//!   string or as content parts); for `/api/embed` and `/v1/embeddings` all
//!   input strings summed. Empty embed input reports no count.
//! * **Failures.** With a failure after *K* chunks (`x-sim-fail-after` /
//!   `--fail-after`, only when `K <= n`), exactly *K* content chunks are sent
//!   and there is no final chunk, finish chunk, usage, `response.completed`
//!   or `[DONE]`.
//! * **Durations** (nanoseconds): `load_duration` = 12 345 678,
//!   `prompt_eval_duration` = 250 000 × prompt tokens, `eval_duration` =
//!   20 000 000 × eval count, `total_duration` = their sum + 1 000 000. Zero
//!   values are omitted, like Go's `omitempty`.
//!
//! # Request parsing
//!
//! Bodies are read the way Go's `encoding/json` reads them into Ollama's
//! structs: keys match case-insensitively (with Unicode simple folding),
//! duplicate keys resolve last-wins, `null` is a no-op for plain fields and a
//! reset for pointer/map/slice fields, and repeated objects merge. See
//! [`fields`].

pub mod body;
pub mod catalog;
pub mod clock;
pub mod fields;
pub mod generate;
pub mod native;
pub mod openai;
pub mod respond;
pub mod server;
pub mod tokens;

use clap::Parser;

/// Command line of `ollama-sim`.
#[derive(Debug, Clone, Parser)]
#[command(name = "ollama-sim", version, about = "Deterministic Ollama simulator")]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,

    /// Installed model names, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "llama3.2:latest,qwen2.5:0.5b,nomic-embed-text:latest,gpt-oss:120b-cloud,mistral:7b"
    )]
    pub models: Vec<String>,

    /// Content chunks per completion unless `x-sim-chunks` says otherwise.
    #[arg(long, default_value_t = 8)]
    pub chunks: usize,

    /// Delay between streamed chunks in milliseconds (`x-sim-delay-ms`).
    #[arg(long, default_value_t = 0)]
    pub chunk_delay_ms: u64,

    /// Fail every generation after K content chunks (`x-sim-fail-after`).
    #[arg(long)]
    pub fail_after: Option<usize>,

    /// Require `<token-header>: <token-scheme> TOKEN` on every request.
    #[arg(long)]
    pub require_token: Option<String>,

    /// Header carrying the token.
    #[arg(long, default_value = "Authorization")]
    pub token_header: String,

    /// Scheme before the token; empty means the header holds the bare token.
    #[arg(long, default_value = "Bearer")]
    pub token_scheme: String,

    /// Disable Ollama's Host-header check on loopback listeners.
    #[arg(long)]
    pub no_host_check: bool,

    /// Version reported by `/api/version`.
    #[arg(long, default_value = "0.12.0")]
    pub version_string: String,

    /// Do not keep the request log (`/__sim/requests` stays empty; `/__sim/stats` still
    /// counts). For load tests: the log holds every body and grows without bound.
    #[arg(long)]
    pub no_record: bool,
}

pub use server::run;
