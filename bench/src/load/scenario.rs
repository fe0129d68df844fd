//! Scenario files: a small YAML description of the load (mode, rate or concurrency, duration,
//! the weighted mix of requests, the simulator knobs and, for `compare`, how many tenants and
//! keys to provision).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// How the load is generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fixed arrival rate; latency counts from the intended start (no coordinated omission).
    Open,
    /// Fixed number of workers, each sending its next request when the previous one ends.
    Closed,
    /// Open `hold_counts` concurrent streams step by step and keep them open (memory per stream).
    Hold,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub name: String,
    pub mode: Mode,
    /// Requests per second (open loop).
    #[serde(default)]
    pub rate: Option<f64>,
    /// Workers (closed loop).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Measured time, after the warm-up.
    #[serde(default = "default_duration", with = "humantime_serde_lite")]
    pub duration: Duration,
    #[serde(default, with = "humantime_serde_lite")]
    pub warmup: Duration,
    /// Stop after this many measured requests (closed loop), even before `duration`.
    #[serde(default)]
    pub max_requests: Option<u64>,
    /// Open loop: most requests in flight at once; beyond it a request waits (and the wait
    /// counts in its latency).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    pub requests: Vec<RequestMix>,
    #[serde(default)]
    pub sim: SimKnobs,
    /// `compare`: tenants to create and keys per tenant; requests rotate over all keys.
    #[serde(default = "one")]
    pub tenants: usize,
    #[serde(default = "one")]
    pub keys_per_tenant: usize,
    /// `compare`: limits set on every key (the tenant gets generous ones). Unset = generous.
    #[serde(default)]
    pub key_limits: Option<Limits>,
    /// `hold` mode: concurrent stream counts to step through, ascending.
    #[serde(default)]
    pub hold_counts: Vec<usize>,
    /// `compare`: check this scenario against the SPEC §14 targets (off for scenarios that
    /// measure something else, like a burst of refusals).
    #[serde(default = "yes")]
    pub spec_checks: bool,
    /// `hold` mode: how long to keep the largest count open before the second sample.
    #[serde(default = "default_hold", with = "humantime_serde_lite")]
    pub hold_for: Duration,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimKnobs {
    /// Sent as `x-sim-chunks`.
    pub chunks: Option<u32>,
    /// Sent as `x-sim-delay-ms`.
    pub chunk_delay_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMix {
    pub route: String,
    #[serde(default)]
    pub stream: bool,
    #[serde(default = "default_prompt_bytes")]
    pub prompt_bytes: usize,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "one_u32")]
    pub weight: u32,
}

fn default_duration() -> Duration {
    Duration::from_secs(30)
}
fn default_hold() -> Duration {
    Duration::from_secs(20)
}
fn default_max_inflight() -> usize {
    20_000
}
fn default_prompt_bytes() -> usize {
    64
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn one_u32() -> u32 {
    1
}

/// Durations written as `30s`, `2m`, `500ms` (humantime), also accepted as a bare number of
/// seconds.
mod humantime_serde_lite {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) if s.is_finite() && s >= 0.0 => Ok(Duration::from_secs_f64(s)),
            Raw::Secs(s) => Err(serde::de::Error::custom(format!("bad duration {s}"))),
            Raw::Text(t) => humantime::parse_duration(&t)
                .map_err(|e| serde::de::Error::custom(format!("bad duration `{t}`: {e}"))),
        }
    }
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        let mut s: Scenario = serde_yaml::from_str(&text)
            .with_context(|| format!("parsing scenario {}", path.display()))?;
        if s.name.is_empty() {
            s.name = path
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "scenario".to_string());
        }
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.requests.is_empty() {
            bail!("scenario {}: `requests` is empty", self.name);
        }
        if self.requests.iter().all(|r| r.weight == 0) {
            bail!("scenario {}: every request weight is 0", self.name);
        }
        for r in &self.requests {
            Route::parse(&r.route)?;
        }
        match self.mode {
            Mode::Open => match self.rate {
                Some(r) if r > 0.0 && r.is_finite() => {}
                _ => bail!("scenario {}: open mode needs `rate` > 0", self.name),
            },
            Mode::Closed => match self.concurrency {
                Some(c) if c > 0 => {}
                _ => bail!(
                    "scenario {}: closed mode needs `concurrency` > 0",
                    self.name
                ),
            },
            Mode::Hold => {
                if self.hold_counts.is_empty() || self.hold_counts.contains(&0) {
                    bail!("scenario {}: hold mode needs `hold_counts` > 0", self.name);
                }
                if !self.hold_counts.is_sorted() {
                    bail!("scenario {}: `hold_counts` must ascend", self.name);
                }
            }
        }
        if self.max_inflight == 0 {
            bail!("scenario {}: `max_inflight` must be > 0", self.name);
        }
        Ok(())
    }

    /// Total keys `compare` provisions.
    pub fn key_count(&self) -> usize {
        self.tenants.max(1) * self.keys_per_tenant.max(1)
    }
}

/// The routes the load generator knows how to build bodies for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    NativeChat,
    NativeGenerate,
    NativeEmbed,
    OpenAiChat,
    OpenAiCompletions,
    OpenAiEmbeddings,
    OpenAiResponses,
}

impl Route {
    pub fn parse(path: &str) -> anyhow::Result<Self> {
        Ok(match path {
            "/api/chat" => Route::NativeChat,
            "/api/generate" => Route::NativeGenerate,
            "/api/embed" => Route::NativeEmbed,
            "/v1/chat/completions" => Route::OpenAiChat,
            "/v1/completions" => Route::OpenAiCompletions,
            "/v1/embeddings" => Route::OpenAiEmbeddings,
            "/v1/responses" => Route::OpenAiResponses,
            other => bail!(
                "unknown route `{other}` (known: /api/chat, /api/generate, /api/embed, \
                 /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses)"
            ),
        })
    }

    pub fn path(self) -> &'static str {
        match self {
            Route::NativeChat => "/api/chat",
            Route::NativeGenerate => "/api/generate",
            Route::NativeEmbed => "/api/embed",
            Route::OpenAiChat => "/v1/chat/completions",
            Route::OpenAiCompletions => "/v1/completions",
            Route::OpenAiEmbeddings => "/v1/embeddings",
            Route::OpenAiResponses => "/v1/responses",
        }
    }

    fn is_embedding(self) -> bool {
        matches!(self, Route::NativeEmbed | Route::OpenAiEmbeddings)
    }
}

/// One prepared request kind: path, body bytes (built once, shared by every request).
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    pub route: Route,
    pub path: &'static str,
    pub body: Bytes,
    pub stream: bool,
}

impl RequestMix {
    pub fn prepare(&self) -> anyhow::Result<PreparedRequest> {
        let route = Route::parse(&self.route)?;
        let model = self.model.clone().unwrap_or_else(|| {
            if route.is_embedding() {
                "nomic-embed-text".to_string()
            } else {
                "llama3.2".to_string()
            }
        });
        let prompt = filler(self.prompt_bytes);
        let stream = self.stream && !route.is_embedding();
        let user = serde_json::json!([{"role": "user", "content": prompt}]);
        let body = match route {
            Route::NativeChat => {
                serde_json::json!({"model": model, "stream": stream, "messages": user})
            }
            Route::NativeGenerate => {
                serde_json::json!({"model": model, "stream": stream, "prompt": prompt})
            }
            Route::NativeEmbed | Route::OpenAiEmbeddings => {
                serde_json::json!({"model": model, "input": prompt})
            }
            Route::OpenAiChat => {
                let mut v = serde_json::json!({"model": model, "stream": stream, "messages": user});
                if stream {
                    v["stream_options"] = serde_json::json!({"include_usage": true});
                }
                v
            }
            Route::OpenAiCompletions => {
                let mut v = serde_json::json!({"model": model, "stream": stream, "prompt": prompt});
                if stream {
                    v["stream_options"] = serde_json::json!({"include_usage": true});
                }
                v
            }
            Route::OpenAiResponses => {
                serde_json::json!({"model": model, "stream": stream, "input": prompt})
            }
        };
        Ok(PreparedRequest {
            route,
            path: route.path(),
            body: Bytes::from(serde_json::to_vec(&body)?),
            stream,
        })
    }
}

/// `n` bytes of plain ASCII words (no escaping needed in JSON).
fn filler(n: usize) -> String {
    const WORDS: &str = "the quick brown fox jumps over the lazy dog ";
    let mut s = String::with_capacity(n);
    while s.len() < n {
        let take = (n - s.len()).min(WORDS.len());
        s.push_str(&WORDS[..take]);
    }
    s
}

/// Picks mix entries by weight with a fixed, evenly spread sequence (deterministic runs).
#[derive(Debug, Clone)]
pub struct Mix {
    slots: Vec<usize>,
    pub prepared: Vec<PreparedRequest>,
}

impl Mix {
    pub fn new(entries: &[RequestMix]) -> anyhow::Result<Self> {
        let prepared = entries
            .iter()
            .map(RequestMix::prepare)
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Smooth weighted round robin over one period of sum(weights) slots.
        let total: i64 = entries.iter().map(|e| i64::from(e.weight)).sum();
        let mut current = vec![0i64; entries.len()];
        let mut slots = Vec::with_capacity(total.max(1) as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, e) in entries.iter().enumerate() {
                current[i] += i64::from(e.weight);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            slots.push(best);
        }
        if slots.is_empty() {
            bail!("request mix has no weight");
        }
        Ok(Mix { slots, prepared })
    }

    pub fn pick(&self, n: u64) -> &PreparedRequest {
        let slot = self.slots[(n % self.slots.len() as u64) as usize];
        &self.prepared[slot]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_example() {
        let s: Scenario = serde_yaml::from_str(
            "mode: open\nrate: 100\nduration: 2s\nrequests:\n  - {route: /api/chat, stream: true, weight: 3}\n  - {route: /v1/embeddings, weight: 1}\nsim: {chunks: 4, chunk_delay_ms: 0}\n",
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.duration, Duration::from_secs(2));
        let mix = Mix::new(&s.requests).unwrap();
        let chats = (0..4)
            .filter(|n| mix.pick(*n).route == Route::NativeChat)
            .count();
        assert_eq!(chats, 3);
    }

    #[test]
    fn refuses_unknown_route_and_fields() {
        assert!(Route::parse("/api/pull").is_err());
        assert!(
            serde_yaml::from_str::<Scenario>("mode: open\nrate: 1\nrequests: []\nbogus: 1\n")
                .is_err()
        );
    }

    #[test]
    fn filler_is_exact() {
        assert_eq!(filler(0).len(), 0);
        assert_eq!(filler(1000).len(), 1000);
        assert_eq!(filler(1_000_000).len(), 1_000_000);
    }
}
