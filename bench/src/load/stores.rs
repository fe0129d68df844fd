//! Counters of the gateway's stores around a run: Redis `INFO commandstats` (after
//! `CONFIG RESETSTAT`) and `INFO cpu` over a minimal RESP connection, Postgres
//! `pg_stat_database` through `psql`, and the CPU time of a Postgres on this machine from
//! `/proc`. On a small deployment the stores share the gateway's cores, so what they spend per
//! request is part of what a request costs.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A Redis server named by a `redis://[:password@]host:port[/db]` URL.
#[derive(Debug, Clone)]
pub struct Redis {
    addr: String,
    password: Option<String>,
}

impl Redis {
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("redis://")
            .with_context(|| format!("REDIS_URL must start with redis:// (got `{url}`)"))?;
        let rest = rest.split('/').next().unwrap_or(rest);
        let (auth, host) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let password = auth.map(|a| a.rsplit(':').next().unwrap_or(a).to_string());
        let addr = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:6379")
        };
        Ok(Redis {
            addr,
            password: password.filter(|p| !p.is_empty()),
        })
    }

    /// Runs one command and returns its reply as text (bulk/simple strings, integers).
    pub async fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&self.addr))
            .await
            .context("Redis connect timed out")??;
        let mut conn = BufReader::new(stream);
        if let Some(p) = &self.password {
            send(&mut conn, &["AUTH", p]).await?;
            read_reply(&mut conn).await?;
        }
        send(&mut conn, args).await?;
        tokio::time::timeout(Duration::from_secs(5), read_reply(&mut conn))
            .await
            .context("Redis reply timed out")?
    }

    pub async fn reset_stats(&self) -> anyhow::Result<()> {
        self.command(&["CONFIG", "RESETSTAT"]).await.map(drop)
    }

    /// Calls per command since the last reset (`cmdstat_evalsha` -> `evalsha`), without the
    /// commands this module itself sends.
    pub async fn command_calls(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let info = self.command(&["INFO", "commandstats"]).await?;
        Ok(parse_commandstats(&info))
    }

    /// CPU seconds the server has used since it started (`used_cpu_sys` + `used_cpu_user`).
    pub async fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let info = self.command(&["INFO", "cpu"]).await?;
        parse_cpu(&info).context("INFO cpu without used_cpu_sys/used_cpu_user")
    }
}

impl Redis {
    /// Counts the commands clients send (round trips; commands run inside Lua scripts are
    /// not counted) with `MONITOR` until `stop` fires. Returns calls by command name.
    pub async fn count_round_trips(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<BTreeMap<String, u64>> {
        let stream = TcpStream::connect(&self.addr).await?;
        let mut conn = BufReader::new(stream);
        if let Some(p) = &self.password {
            send(&mut conn, &["AUTH", p]).await?;
            read_reply(&mut conn).await?;
        }
        send(&mut conn, &["MONITOR"]).await?;
        read_reply(&mut conn).await?;
        let mut counts = BTreeMap::new();
        let mut line = String::new();
        loop {
            line.clear();
            tokio::select! {
                _ = stop.changed() => break,
                n = conn.read_line(&mut line) => {
                    if n? == 0 {
                        break;
                    }
                    if let Some(cmd) = monitor_command(&line) {
                        *counts.entry(cmd).or_insert(0) += 1;
                    }
                }
            }
        }
        Ok(counts)
    }
}

/// The command of one `MONITOR` line (`+1700000000.1 [0 127.0.0.1:5000] "EVALSHA" ...`),
/// lower-cased; `None` for commands run by a script (`[0 lua]`) and for the INFO/CONFIG this
/// module sends.
fn monitor_command(line: &str) -> Option<String> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    if line[open..close].contains("lua") {
        return None;
    }
    let rest = &line[close + 1..];
    let start = rest.find('"')? + 1;
    let end = start + rest[start..].find('"')?;
    let cmd = rest[start..end].to_ascii_lowercase();
    (cmd != "info" && cmd != "config").then_some(cmd)
}

async fn send(conn: &mut BufReader<TcpStream>, args: &[&str]) -> anyhow::Result<()> {
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.get_mut().write_all(out.as_bytes()).await?;
    Ok(())
}

async fn read_reply(conn: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).context("empty Redis reply")?;
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => bail!("Redis error: {rest}"),
        "$" => {
            let n: i64 = rest.parse().context("bad Redis bulk length")?;
            if n < 0 {
                return Ok(String::new());
            }
            // INFO replies are a few KiB; refuse anything absurd instead of allocating it.
            if n > 64 << 20 {
                bail!("Redis bulk reply of {n} bytes is too large");
            }
            let mut buf = vec![0u8; n as usize + 2];
            conn.read_exact(&mut buf).await?;
            buf.truncate(n as usize);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        other => bail!("unsupported Redis reply type `{other}`"),
    }
}

fn parse_cpu(info: &str) -> Option<f64> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(field("used_cpu_sys")? + field("used_cpu_user")?)
}

pub fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .filter(|(name, _)| name != "info" && !name.starts_with("config"))
        .collect()
}

/// `pg_stat_database` of the current database, read with `psql`.
#[derive(Debug, Clone)]
pub struct Postgres {
    url: String,
    psql: String,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PgCounters {
    pub xact_commit: i64,
    pub tup_inserted: i64,
    /// CPU seconds of the whole server (postmaster and every backend), when it runs here.
    pub cpu_s: Option<f64>,
}

impl Postgres {
    pub fn new(url: &str) -> Self {
        let psql = std::env::var("NZ_PG_BIN")
            .ok()
            .map(|d| format!("{d}/psql"))
            .filter(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| "psql".to_string());
        Postgres {
            url: url.to_string(),
            psql,
        }
    }

    pub async fn counters(&self) -> anyhow::Result<PgCounters> {
        let out = tokio::process::Command::new(&self.psql)
            .arg(&self.url)
            .args([
                "-Atc",
                "SELECT xact_commit, tup_inserted, \
                   (SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer') \
                 FROM pg_stat_database WHERE datname = current_database()",
            ])
            .output()
            .await
            .with_context(|| format!("running {}", self.psql))?;
        if !out.status.success() {
            bail!(
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut parts = text.trim().split('|');
        let mut next = || -> anyhow::Result<i64> {
            Ok(parts.next().context("short psql output")?.trim().parse()?)
        };
        let xact_commit = next()?;
        let tup_inserted = next()?;
        let checkpointer = next().ok().and_then(|p| u32::try_from(p).ok());
        Ok(PgCounters {
            xact_commit,
            tup_inserted,
            cpu_s: checkpointer.and_then(local_server_cpu),
        })
    }
}

/// CPU seconds of the Postgres whose checkpointer has this pid, if that process runs on this
/// machine (a remote server's pid means nothing here: the name must be `postgres`).
fn local_server_cpu(checkpointer: u32) -> Option<f64> {
    let comm = std::fs::read_to_string(format!("/proc/{checkpointer}/comm")).ok()?;
    if comm.trim() != "postgres" {
        return None;
    }
    let postmaster = super::procstat::parent(checkpointer)?;
    Some(super::procstat::ticks_to_secs(
        super::procstat::tree_cpu(postmaster)?.ticks,
    ))
}

/// Store work during a run, per measured request.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct StoreDelta {
    pub requests: u64,
    pub redis_commands: u64,
    pub redis_commands_per_request: f64,
    /// Calls per request by command.
    pub redis_by_command: BTreeMap<String, f64>,
    /// Commands clients sent (MONITOR; script-internal commands excluded) per request. On the
    /// request path these are the gateway's Redis round trips; background work that pipelines
    /// several commands counts each of them.
    pub redis_client_commands_per_request: f64,
    pub redis_client_commands_by_command: BTreeMap<String, f64>,
    /// Committed transactions (our own `psql` reads subtracted).
    pub pg_xact_commit: i64,
    pub pg_xact_per_request: f64,
    pub pg_tup_inserted: i64,
    /// Postgres CPU seconds per 1 000 requests (postmaster and every backend; only when it
    /// runs on this machine).
    #[serde(default)]
    pub pg_cpu_s_per_1000_req: Option<f64>,
    /// Redis CPU seconds per 1 000 requests (`INFO cpu`).
    #[serde(default)]
    pub redis_cpu_s_per_1000_req: Option<f64>,
}

impl StoreDelta {
    pub fn new(
        requests: u64,
        redis: BTreeMap<String, u64>,
        round_trips: BTreeMap<String, u64>,
        pg_before: PgCounters,
        pg_after: PgCounters,
        redis_cpu_s: Option<f64>,
    ) -> Self {
        let per = |n: f64| {
            if requests > 0 {
                n / requests as f64
            } else {
                0.0
            }
        };
        let total: u64 = redis.values().sum();
        // The `psql` that read `pg_before` committed one transaction of its own.
        let xact = (pg_after.xact_commit - pg_before.xact_commit - 1).max(0);
        StoreDelta {
            requests,
            redis_commands: total,
            redis_commands_per_request: per(total as f64),
            redis_by_command: redis.into_iter().map(|(k, v)| (k, per(v as f64))).collect(),
            redis_client_commands_per_request: per(round_trips.values().sum::<u64>() as f64),
            redis_client_commands_by_command: round_trips
                .into_iter()
                .map(|(k, v)| (k, per(v as f64)))
                .collect(),
            pg_xact_commit: xact,
            pg_xact_per_request: per(xact as f64),
            pg_tup_inserted: pg_after.tup_inserted - pg_before.tup_inserted,
            pg_cpu_s_per_1000_req: pg_after
                .cpu_s
                .zip(pg_before.cpu_s)
                .map(|(a, b)| per((a - b).max(0.0) * 1000.0)),
            redis_cpu_s_per_1000_req: redis_cpu_s.map(|s| per(s.max(0.0) * 1000.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commandstats() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=400,usec=900,usec_per_call=2.25,rejected_calls=0,failed_calls=0\r\ncmdstat_get:calls=3,usec=1\r\ncmdstat_info:calls=1,usec=5\r\ncmdstat_config|resetstat:calls=1,usec=5\r\n";
        let m = parse_commandstats(info);
        assert_eq!(m.get("evalsha"), Some(&400));
        assert_eq!(m.get("get"), Some(&3));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn parses_cpu() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:9.0\r\n";
        assert_eq!(parse_cpu(info), Some(3.75));
        assert_eq!(parse_cpu("# CPU\r\n"), None);
    }

    #[test]
    fn reads_monitor_lines() {
        let top = "+1700000000.123456 [0 127.0.0.1:51234] \"EVALSHA\" \"abc\" \"2\"\r\n";
        assert_eq!(monitor_command(top).as_deref(), Some("evalsha"));
        let inner = "+1700000000.123460 [0 lua] \"GET\" \"k\"\r\n";
        assert_eq!(monitor_command(inner), None);
        assert_eq!(
            monitor_command("+1.0 [0 127.0.0.1:1] \"INFO\" \"commandstats\""),
            None
        );
    }

    #[test]
    fn parses_redis_urls() {
        assert_eq!(
            Redis::from_url("redis://127.0.0.1:57379").unwrap().addr,
            "127.0.0.1:57379"
        );
        let r = Redis::from_url("redis://:pw@h:1/0").unwrap();
        assert_eq!(
            (r.addr.as_str(), r.password.as_deref()),
            ("h:1", Some("pw"))
        );
        assert!(Redis::from_url("http://x").is_err());
    }
}
