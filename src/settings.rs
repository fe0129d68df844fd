//! The one typed settings model. Sources: an optional YAML file (flat map of the same names as
//! the environment variables, upper or lower case) overlaid by the process environment. Nothing
//! else in the crate reads raw configuration; a bad value stops start-up with one message that
//! names the setting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::SecretString;

/// Every setting name the gateway understands. Anything else in the YAML file is refused, so a
/// typo does not silently fall back to a default.
const KNOWN: &[&str] = &[
    "LISTEN_ADDR",
    "METRICS_ADDR",
    "OLLAMA_URL",
    "OLLAMA_AUTH_TOKEN",
    "OLLAMA_AUTH_HEADER",
    "OLLAMA_AUTH_SCHEME",
    "DATABASE_URL",
    "DATABASE_MAX_CONNECTIONS",
    "REDIS_URL",
    "REDIS_KEY_CACHE_TTL_S",
    "REDIS_TIMEOUT_MS",
    "REDIS_KEY_PREFIX",
    "ARGON2_MEMORY_KIB",
    "ARGON2_ITERATIONS",
    "ARGON2_PARALLELISM",
    "ARGON2_MAX_CONCURRENCY",
    "TRUSTED_PROXIES",
    "MAX_REQUEST_BODY_BYTES",
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_READ_TIMEOUT",
    "UPSTREAM_MAX_INFLIGHT",
    "KEY_CACHE_SECRET",
    "CORS_ALLOWED_ORIGINS",
    "AUTH_FAILURE_LIMIT_PER_MIN",
    "BUDGET_MODE",
    "BUDGET_TEMPLATE_TOKENS",
    "BUDGET_IMAGE_TOKENS",
    "BUDGET_MIN_OUTPUT_TOKENS",
    "BUDGET_DEFAULT_OUTPUT_TOKENS",
    "BUDGET_SEED_GRACE_MS",
    "CLOCK_OFFSET_FILE",
    "PROMPT_LOG_PURGE_INTERVAL",
    "DISCOVERY_INTERVAL",
    "NEGATIVE_CACHE_TTL_S",
    "LIMITS_FAIL_OPEN",
    "TPM_DEFAULT_OUTPUT_TOKENS",
    "AUDIT_SPOOL_DIR",
    "AUDIT_QUEUE_CAPACITY",
    "AUDIT_RETENTION_DAYS",
    "LOG_FORMAT",
];

/// The most Argon2 memory a hash may ask for (4 GiB), configured or stored.
pub const MAX_ARGON2_MEMORY_KIB: u32 = 4 << 20;

#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {reason}")]
pub struct SettingsError {
    pub name: String,
    pub reason: String,
}

fn invalid(name: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// One Ollama backend. Ollama serves plain HTTP only, so there is no TLS here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
}

impl UpstreamTarget {
    /// The value the gateway puts in `Host` (Ollama on loopback refuses foreign hosts).
    pub fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy)]
pub struct Argon2Settings {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Size of the blocking pool Argon2 runs on; past it the gateway answers 503.
    pub max_concurrency: usize,
}

/// How budgets are charged (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetMode {
    /// Reserve the prompt bound plus the output cap before forwarding and clamp the output to
    /// what is left: the sum of usage never exceeds a budget.
    Reserve,
    /// Charge after the fact: cheaper, but requests in flight can overrun a budget.
    Post,
}

#[derive(Debug, Clone)]
pub struct BudgetSettings {
    pub mode: BudgetMode,
    /// Tokens a chat template and a Modelfile system prompt may add to a prompt.
    pub template_tokens: u64,
    /// The most tokens one image can become.
    pub image_tokens: u64,
    /// A request is refused when fewer output tokens than this fit in a budget.
    pub min_output_tokens: u64,
    /// The output cap of a budgeted request that sets none (reserve mode): without one it would
    /// reserve all that is left and hold the budget against every concurrent request.
    pub default_output_tokens: u64,
    /// How long budget counters lost by Redis wait before they are re-seeded from Postgres, so
    /// usage other instances are still writing has arrived.
    pub seed_grace: Duration,
}

#[derive(Debug)]
pub struct Settings {
    pub listen_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub upstreams: Vec<UpstreamTarget>,
    pub upstream_auth_token: Option<SecretString>,
    pub upstream_auth_header: http::HeaderName,
    pub upstream_auth_scheme: String,
    pub database_url: Option<SecretString>,
    pub database_max_connections: u32,
    pub redis_url: Option<SecretString>,
    pub key_cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    pub redis_timeout: Duration,
    /// Namespace of every Redis key the gateway writes (deployments sharing one Redis).
    pub redis_key_prefix: String,
    pub argon2: Argon2Settings,
    pub trusted_proxies: Vec<IpNet>,
    pub max_request_body_bytes: usize,
    pub upstream_connect_timeout: Duration,
    pub upstream_read_timeout: Duration,
    pub upstream_max_inflight: usize,
    /// `None` when not configured: the process then makes one up (single-node use).
    pub key_cache_secret: Option<SecretString>,
    pub cors_allowed_origins: Vec<String>,
    pub auth_failure_limit_per_min: u32,
    /// RPM/TPM/concurrency are not enforced (instead of 503) while Redis cannot answer.
    pub limits_fail_open: bool,
    /// Output tokens reserved against TPM for a request that sets no output cap.
    pub tpm_default_output_tokens: u64,
    pub budgets: BudgetSettings,
    /// Testing aid: a file holding a number of seconds added to the clock that decides budget
    /// periods, so a test can move to the next day without waiting for it.
    pub clock_offset_file: Option<std::path::PathBuf>,
    /// Where audit batches wait while Postgres is away (one file per process).
    pub audit_spool_dir: std::path::PathBuf,
    /// Audit events queued between the proxy and the sidecar.
    pub audit_queue_capacity: usize,
    /// Audit rows are kept this long, in monthly partitions dropped whole.
    pub audit_retention_days: u32,
    /// How often expired prompt-log rows are deleted.
    pub prompt_log_purge_interval: Duration,
    /// How often the upstreams' model lists are polled.
    pub discovery_interval: Duration,
    pub log_format: LogFormat,
}

impl Settings {
    /// Reads the YAML file (if any), overlays the environment and validates everything.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut raw = match file {
            Some(path) => read_yaml(path)?,
            None => HashMap::new(),
        };
        for name in KNOWN {
            if let Ok(value) = std::env::var(name) {
                raw.insert((*name).to_string(), value);
            }
        }
        Self::from_map(&raw)
    }

    pub fn from_map(raw: &HashMap<String, String>) -> Result<Self, SettingsError> {
        let r = Reader(raw);
        Ok(Self {
            listen_addr: r.socket_addr("LISTEN_ADDR", "0.0.0.0:8080")?,
            metrics_addr: r.socket_addr("METRICS_ADDR", "127.0.0.1:9464")?,
            upstreams: parse_upstreams(r.get("OLLAMA_URL").unwrap_or("http://127.0.0.1:11434"))?,
            upstream_auth_token: r.secret("OLLAMA_AUTH_TOKEN"),
            upstream_auth_header: r.header_name("OLLAMA_AUTH_HEADER", "Authorization")?,
            // Present but empty means "send the raw token": read unfiltered.
            upstream_auth_scheme: r
                .0
                .get("OLLAMA_AUTH_SCHEME")
                .map_or("Bearer", String::as_str)
                .trim()
                .to_string(),
            database_url: r
                .get("DATABASE_URL")
                .map(normalize_database_url)
                .map(SecretString::from),
            database_max_connections: r.number("DATABASE_MAX_CONNECTIONS", 8, 1, 1000)?,
            redis_url: r.secret("REDIS_URL"),
            key_cache_ttl: Duration::from_secs(r.number("REDIS_KEY_CACHE_TTL_S", 60, 1, 86_400)?),
            negative_cache_ttl: Duration::from_secs(r.number(
                "NEGATIVE_CACHE_TTL_S",
                5,
                0,
                3600,
            )?),
            redis_timeout: Duration::from_millis(r.number("REDIS_TIMEOUT_MS", 250, 10, 60_000)?),
            redis_key_prefix: r.key_prefix("REDIS_KEY_PREFIX", "nz")?,
            argon2: Argon2Settings {
                memory_kib: r.number("ARGON2_MEMORY_KIB", 19_456, 8, MAX_ARGON2_MEMORY_KIB)?,
                iterations: r.number("ARGON2_ITERATIONS", 2, 1, 100)?,
                parallelism: r.number("ARGON2_PARALLELISM", 1, 1, 64)?,
                max_concurrency: r.number(
                    "ARGON2_MAX_CONCURRENCY",
                    default_argon2_pool(),
                    1,
                    1024,
                )?,
            },
            trusted_proxies: r.cidr_list("TRUSTED_PROXIES")?,
            max_request_body_bytes: r.number("MAX_REQUEST_BODY_BYTES", 32 << 20, 1024, 1 << 30)?,
            upstream_connect_timeout: r
                .duration("UPSTREAM_CONNECT_TIMEOUT", Duration::from_secs(5))?,
            upstream_read_timeout: r.duration("UPSTREAM_READ_TIMEOUT", Duration::from_secs(600))?,
            upstream_max_inflight: r.number("UPSTREAM_MAX_INFLIGHT", 1024, 1, 1_000_000)?,
            key_cache_secret: r.key_cache_secret()?,
            cors_allowed_origins: r.list("CORS_ALLOWED_ORIGINS"),
            auth_failure_limit_per_min: r.number("AUTH_FAILURE_LIMIT_PER_MIN", 30, 1, 1_000_000)?,
            limits_fail_open: r.boolean("LIMITS_FAIL_OPEN", false)?,
            tpm_default_output_tokens: r.number(
                "TPM_DEFAULT_OUTPUT_TOKENS",
                1024,
                0,
                10_000_000,
            )?,
            budgets: BudgetSettings {
                mode: match r.get("BUDGET_MODE").unwrap_or("reserve") {
                    "reserve" => BudgetMode::Reserve,
                    "post" => BudgetMode::Post,
                    other => {
                        return Err(invalid(
                            "BUDGET_MODE",
                            format!("`{other}` is not reserve or post"),
                        ));
                    }
                },
                template_tokens: r.number("BUDGET_TEMPLATE_TOKENS", 128, 0, 1_000_000)?,
                image_tokens: r.number("BUDGET_IMAGE_TOKENS", 2048, 0, 1_000_000)?,
                min_output_tokens: r.number("BUDGET_MIN_OUTPUT_TOKENS", 1, 1, 1_000_000)?,
                default_output_tokens: r.number(
                    "BUDGET_DEFAULT_OUTPUT_TOKENS",
                    4096,
                    1,
                    1_000_000_000,
                )?,
                seed_grace: Duration::from_millis(r.number(
                    "BUDGET_SEED_GRACE_MS",
                    1000,
                    0,
                    600_000,
                )?),
            },
            clock_offset_file: r.get("CLOCK_OFFSET_FILE").map(std::path::PathBuf::from),
            audit_spool_dir: r.get("AUDIT_SPOOL_DIR").map_or_else(
                || std::env::temp_dir().join("neuronetz-spool"),
                std::path::PathBuf::from,
            ),
            audit_queue_capacity: r.number("AUDIT_QUEUE_CAPACITY", 65_536, 64, 10_000_000)?,
            audit_retention_days: r.number("AUDIT_RETENTION_DAYS", 90, 1, 36_500)?,
            discovery_interval: r
                .duration("DISCOVERY_INTERVAL", Duration::from_secs(30))?
                .max(Duration::from_millis(100)),
            prompt_log_purge_interval: r
                .duration("PROMPT_LOG_PURGE_INTERVAL", Duration::from_secs(60))?
                .max(Duration::from_millis(50)),
            log_format: match r.get("LOG_FORMAT").unwrap_or("text") {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(invalid(
                        "LOG_FORMAT",
                        format!("`{other}` is not text or json"),
                    ));
                }
            },
        })
    }

    /// The database URL, which is required until the embedded default lands.
    pub fn require_database_url(&self) -> Result<&SecretString, SettingsError> {
        self.database_url.as_ref().ok_or_else(|| {
            invalid(
                "DATABASE_URL",
                "is required (postgres://user:pass@host:port/db)",
            )
        })
    }
}

fn default_argon2_pool() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn read_yaml(path: &Path) -> Result<HashMap<String, String>, SettingsError> {
    let name = "--config";
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(name, format!("cannot read {}: {e}", path.display())))?;
    let doc: HashMap<String, serde_yaml::Value> = serde_yaml::from_str(&text).map_err(|e| {
        invalid(
            name,
            format!("{} is not a flat YAML map: {e}", path.display()),
        )
    })?;
    let mut out = HashMap::new();
    for (key, value) in doc {
        let upper = key.to_ascii_uppercase();
        if !KNOWN.contains(&upper.as_str()) {
            return Err(invalid(
                &key,
                format!("unknown setting in {}", path.display()),
            ));
        }
        let text = match value {
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            serde_yaml::Value::Sequence(items) => items
                .iter()
                .map(|v| match v {
                    serde_yaml::Value::String(s) => Ok(s.clone()),
                    serde_yaml::Value::Number(n) => Ok(n.to_string()),
                    _ => Err(invalid(&upper, "list items must be strings")),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            serde_yaml::Value::Null => continue,
            _ => return Err(invalid(&upper, "must be a string, number, boolean or list")),
        };
        out.insert(upper, text);
    }
    Ok(out)
}

/// The earlier (Python) service used SQLAlchemy URLs such as `postgresql+asyncpg://`.
fn normalize_database_url(url: &str) -> String {
    let trimmed = url.trim();
    for scheme in [
        "postgresql+asyncpg://",
        "postgresql+psycopg://",
        "postgresql+psycopg2://",
    ] {
        if let Some(rest) = trimmed.strip_prefix(scheme) {
            return format!("postgres://{rest}");
        }
    }
    trimmed.to_string()
}

fn parse_upstreams(value: &str) -> Result<Vec<UpstreamTarget>, SettingsError> {
    let name = "OLLAMA_URL";
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let rest = item.strip_prefix("http://").ok_or_else(|| {
            invalid(
                name,
                format!("`{item}` must start with http:// (Ollama serves plain HTTP)"),
            )
        })?;
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('@') {
            return Err(invalid(
                name,
                format!("`{item}` must be http://host[:port] without a path"),
            ));
        }
        let (host, port) = split_host_port(authority)
            .ok_or_else(|| invalid(name, format!("`{item}` has no valid host/port")))?;
        out.push(UpstreamTarget { host, port });
    }
    if out.is_empty() {
        return Err(invalid(name, "names no upstream"));
    }
    Ok(out)
}

fn split_host_port(authority: &str) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if tail.is_empty() => 11434,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host.to_string(), port.parse().ok()?)),
        Some(_) => None,
        None if !authority.is_empty() => Some((authority.to_string(), 11434)),
        None => None,
    }
}

struct Reader<'a>(&'a HashMap<String, String>);

impl Reader<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    fn secret(&self, name: &str) -> Option<SecretString> {
        self.get(name)
            .map(|v| SecretString::from(v.trim().to_string()))
    }

    fn socket_addr(&self, name: &str, default: &str) -> Result<SocketAddr, SettingsError> {
        let v = self.get(name).unwrap_or(default).trim();
        v.parse()
            .map_err(|_| invalid(name, format!("`{v}` is not an ip:port address")))
    }

    fn number<T>(&self, name: &str, default: T, min: T, max: T) -> Result<T, SettingsError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        let n: T = v
            .trim()
            .parse()
            .map_err(|_| invalid(name, format!("`{v}` is not a whole number")))?;
        if n < min || n > max {
            return Err(invalid(name, format!("{n} is outside {min}..={max}")));
        }
        Ok(n)
    }

    /// Durations accept `5s`, `600s`, `2m`, or a bare number of seconds.
    fn duration(&self, name: &str, default: Duration) -> Result<Duration, SettingsError> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        let v = v.trim();
        let d = match v.parse::<f64>() {
            Ok(secs) if secs > 0.0 => {
                Duration::try_from_secs_f64(secs).map_err(|_| invalid(name, "is too large"))?
            }
            Ok(_) => return Err(invalid(name, "must be positive")),
            Err(_) => humantime::parse_duration(v)
                .map_err(|_| invalid(name, format!("`{v}` is not a duration like 5s or 10m")))?,
        };
        if d.is_zero() {
            return Err(invalid(name, "must be positive"));
        }
        Ok(d)
    }

    fn key_prefix(&self, name: &str, default: &str) -> Result<String, SettingsError> {
        let v = self.get(name).unwrap_or(default).trim();
        if v.is_empty()
            || v.len() > 64
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(invalid(name, "must be 1-64 of [A-Za-z0-9._-]"));
        }
        Ok(v.to_string())
    }

    fn boolean(&self, name: &str, default: bool) -> Result<bool, SettingsError> {
        match self.get(name).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if ["true", "1", "yes", "on"].contains(&v.as_str()) => Ok(true),
            Some(v) if ["false", "0", "no", "off"].contains(&v.as_str()) => Ok(false),
            Some(v) => Err(invalid(name, format!("`{v}` is not true or false"))),
        }
    }

    fn header_name(&self, name: &str, default: &str) -> Result<http::HeaderName, SettingsError> {
        let v = self.get(name).unwrap_or(default).trim();
        http::HeaderName::from_bytes(v.as_bytes())
            .map_err(|_| invalid(name, format!("`{v}` is not a valid header name")))
    }

    fn list(&self, name: &str) -> Vec<String> {
        self.get(name)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cidr_list(&self, name: &str) -> Result<Vec<IpNet>, SettingsError> {
        self.list(name)
            .iter()
            .map(|item| parse_cidr(item).map_err(|reason| invalid(name, reason)))
            .collect()
    }

    fn key_cache_secret(&self) -> Result<Option<SecretString>, SettingsError> {
        match self.get("KEY_CACHE_SECRET") {
            None => Ok(None),
            Some(v) if v.trim().len() < 16 => Err(invalid(
                "KEY_CACHE_SECRET",
                "must be at least 16 characters",
            )),
            Some(v) => Ok(Some(SecretString::from(v.trim().to_string()))),
        }
    }
}

/// A CIDR or a bare address (taken as a single-host network).
pub fn parse_cidr(item: &str) -> Result<IpNet, String> {
    let item = item.trim();
    item.parse::<IpNet>()
        .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{item}` is not an IP address or CIDR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = Settings::from_map(&HashMap::new()).unwrap();
        assert_eq!(s.listen_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(s.metrics_addr.to_string(), "127.0.0.1:9464");
        assert_eq!(
            s.upstreams,
            vec![UpstreamTarget {
                host: "127.0.0.1".into(),
                port: 11434
            }]
        );
        assert_eq!(s.key_cache_ttl, Duration::from_secs(60));
        assert_eq!(s.upstream_connect_timeout, Duration::from_secs(5));
        assert_eq!(s.upstream_read_timeout, Duration::from_secs(600));
        assert_eq!(s.upstream_auth_header.as_str(), "authorization");
        assert_eq!(s.upstream_auth_scheme, "Bearer");
        assert_eq!(s.max_request_body_bytes, 32 << 20);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases = [
            ("OLLAMA_URL", "https://x"),
            ("LISTEN_ADDR", "nope"),
            ("UPSTREAM_READ_TIMEOUT", "soon"),
            ("TRUSTED_PROXIES", "10.0.0.0/99"),
            ("KEY_CACHE_SECRET", "short"),
            ("REDIS_KEY_CACHE_TTL_S", "-1"),
            ("UPSTREAM_READ_TIMEOUT", "1e30"),
        ];
        for (name, value) in cases {
            let err = Settings::from_map(&map(&[(name, value)])).unwrap_err();
            assert_eq!(err.name, name, "{err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid setting {name}"))
            );
        }
    }

    #[test]
    fn earlier_service_database_url_is_accepted() {
        let s = Settings::from_map(&map(&[(
            "DATABASE_URL",
            "postgresql+asyncpg://u:p@h:5432/d",
        )]))
        .unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(
            s.database_url.unwrap().expose_secret(),
            "postgres://u:p@h:5432/d"
        );
    }

    #[test]
    fn upstream_lists_and_durations_parse() {
        let s = Settings::from_map(&map(&[
            ("OLLAMA_URL", "http://a:1, http://[::1]:2,http://b/"),
            ("UPSTREAM_CONNECT_TIMEOUT", "2.5"),
            ("UPSTREAM_READ_TIMEOUT", "2m"),
        ]))
        .unwrap();
        assert_eq!(s.upstreams.len(), 3);
        assert_eq!(s.upstreams[1].host_header(), "[::1]:2");
        assert_eq!(s.upstreams[2].port, 11434);
        assert_eq!(s.upstream_connect_timeout, Duration::from_millis(2500));
        let raw = Settings::from_map(&map(&[("OLLAMA_AUTH_SCHEME", "")])).unwrap();
        assert_eq!(raw.upstream_auth_scheme, "", "empty scheme = raw token");
        assert_eq!(s.upstream_read_timeout, Duration::from_secs(120));
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let s = Settings::from_map(&map(&[
            ("OLLAMA_AUTH_TOKEN", "upstream-token-value"),
            ("DATABASE_URL", "postgres://u:pw-secret@h/d"),
        ]))
        .unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("upstream-token-value"));
        assert!(!dbg.contains("pw-secret"));
    }
}
