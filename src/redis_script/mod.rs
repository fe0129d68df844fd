//! One Lua script, run on Redis connections that the calling task drives itself.
//!
//! The limiter's script is the gateway's only Redis call on the request path. Through fred each
//! call went to the client's router task over a channel, was encoded there into fred's own
//! values, and its reply came back through another channel: two task hand-offs and a dozen
//! allocations per call, about a fifth of the gateway's CPU per request at 400 req/s
//! (BENCHMARKS.md, round 4). Here the request's own task takes an idle connection from a small
//! pool, writes `EVALSHA` into the connection's reused buffer and reads the reply itself, so the
//! reply's arrival is the only wake-up. fred still serves every other command.
//!
//! A connection whose call failed or was cancelled (the timeout) is closed, never pooled again:
//! its reply may still be on the way. A pooled connection found closed before any reply byte
//! (Redis restarted, or dropped idle clients) is replaced once; if the server ran the script
//! before it went away, the call counts twice, the same over-count as a call that timed out
//! (docs/architecture.md, "Settlements").

mod resp;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fred::types::config::{Config, ServerConfig};
use redis_protocol::resp2::types::{OwnedFrame, Resp2Frame};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::{Handle, Id as RuntimeId};

/// Idle connections kept: enough for the admissions in flight at once under heavy load.
const MAX_IDLE: usize = 64;
/// After a failed connection attempt, calls fail at once for this long (as fred's `fail_fast`
/// client did) instead of each waiting for its own attempt.
const RETRY_CONNECT_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("redis connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis closed the connection")]
    Closed,
    #[error("redis answered with an error: {0}")]
    Redis(String),
    #[error("unexpected redis reply: {0}")]
    Protocol(String),
    #[error("redis call timed out")]
    Timeout,
    #[error("redis not reachable (the last connection attempt failed moments ago)")]
    Down,
    #[error("invalid setting REDIS_URL: {0}")]
    Config(&'static str),
}

/// One argument of a script call. Numbers are written as they are, without a string each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg<'a> {
    Str(&'a str),
    Int(i64),
}

enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// Runs one script; shared by every request of the process.
pub struct ScriptPool {
    endpoint: Endpoint,
    username: Option<String>,
    password: Option<SecretString>,
    database: Option<u8>,
    sha: String,
    body: &'static str,
    timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    /// Milliseconds after `epoch` before which no connection is attempted.
    down_until: AtomicU64,
    epoch: Instant,
}

impl ScriptPool {
    /// `url` as fred reads it (`redis://` or `redis+unix://`, with user, password and database);
    /// every call is bounded by `timeout`. Connects on first use.
    pub fn from_url(url: &str, body: &'static str, timeout: Duration) -> Result<Self, ScriptError> {
        // fred's error may quote the URL, password included: not passed on.
        let config = Config::from_url(url)
            .map_err(|_| ScriptError::Config("not a redis:// or redis+unix:// URL"))?;
        let endpoint = match config.server {
            ServerConfig::Centralized { server } => Endpoint::Tcp {
                host: server.host.to_string(),
                port: server.port,
            },
            ServerConfig::Unix { path } => Endpoint::Unix(path),
            _ => {
                return Err(ScriptError::Config(
                    "only a single Redis server is supported",
                ));
            }
        };
        Ok(Self {
            endpoint,
            username: config.username,
            password: config.password.map(SecretString::from),
            database: config.database,
            sha: fred::util::sha1_hash(body),
            body,
            timeout,
            idle: Mutex::new(Vec::new()),
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Runs the script with `keys` and `args`; its reply must be a list of integers.
    pub async fn call(&self, keys: &[&str], args: &[Arg<'_>]) -> Result<Vec<i64>, ScriptError> {
        self.connection().await?.call(keys, args).await
    }

    /// A connection for one call: a caller that takes work from a queue for its call (the
    /// limiter's settlements) takes it after this, right before the write. The call's
    /// timeout runs from here.
    pub async fn connection(&self) -> Result<Connection<'_>, ScriptError> {
        let started = Instant::now();
        let runtime = current_runtime();
        let (conn, pooled) = match self.take_idle(runtime) {
            Some(conn) => (conn, true),
            // Boxed, as the rare path: connecting would enlarge every call's future.
            None => (Box::pin(self.connect(runtime, self.timeout)).await?, false),
        };
        Ok(Connection {
            pool: self,
            conn: Some(conn),
            pooled,
            started,
        })
    }

    /// Idle connections in the pool.
    pub fn idle_count(&self) -> usize {
        self.idle().len()
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection of the caller's runtime: a connection's socket is
    /// driven by the runtime that opened it, which may be gone (shutdown runs elsewhere).
    fn take_idle(&self, runtime: Option<RuntimeId>) -> Option<Conn> {
        let mut idle = self.idle();
        let at = idle.iter().rposition(|c| c.runtime == runtime)?;
        Some(idle.swap_remove(at))
    }

    fn put_idle(&self, conn: Conn) {
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Opens a connection within `limit`. Any failure, a timeout included, makes calls fail
    /// at once for [`RETRY_CONNECT_AFTER`]: a Redis that drops packets would otherwise cost
    /// every call its full timeout.
    async fn connect(
        &self,
        runtime: Option<RuntimeId>,
        limit: Duration,
    ) -> Result<Conn, ScriptError> {
        if self.millis() < self.down_until.load(Ordering::Relaxed) {
            return Err(ScriptError::Down);
        }
        let opened = bounded(limit, self.open(runtime)).await;
        if opened.is_err() {
            let until = self.millis() + RETRY_CONNECT_AFTER.as_millis() as u64;
            self.down_until.store(until, Ordering::Relaxed);
        }
        opened
    }

    async fn open(&self, runtime: Option<RuntimeId>) -> Result<Conn, ScriptError> {
        let stream = match &self.endpoint {
            Endpoint::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
        };
        let mut conn = Conn {
            stream,
            out: Vec::with_capacity(1024),
            input: Vec::with_capacity(256),
            runtime,
        };
        if let Some(password) = &self.password {
            let password = password.expose_secret();
            match &self.username {
                Some(user) => conn.expect_ok(&["AUTH", user, password]).await?,
                None => conn.expect_ok(&["AUTH", password]).await?,
            }
        }
        if let Some(db) = self.database.filter(|db| *db != 0) {
            conn.expect_ok(&["SELECT", &db.to_string()]).await?;
        }
        Ok(conn)
    }

    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

fn current_runtime() -> Option<RuntimeId> {
    Handle::try_current().ok().map(|h| h.id())
}

/// Pingora's timer takes no global lock (see `redis_link::bounded`).
async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, ScriptError>>,
) -> Result<T, ScriptError> {
    pingora_timeout::fast_timeout::fast_timeout(limit, call)
        .await
        .unwrap_or(Err(ScriptError::Timeout))
}

/// One call's connection; back to the pool once its reply was read in full, or unused.
pub struct Connection<'a> {
    pool: &'a ScriptPool,
    /// Taken out for the call: a call that fails or is cancelled drops (closes) it.
    conn: Option<Conn>,
    /// Taken from the pool (it may have been closed meanwhile), not just opened.
    pooled: bool,
    /// When [`ScriptPool::connection`] was asked: one timeout covers connecting and the call.
    started: Instant,
}

impl Connection<'_> {
    /// Runs the script with `keys` and `args`; its reply must be a list of integers. Bounded
    /// by what is left of the pool's timeout.
    pub async fn call(self, keys: &[&str], args: &[Arg<'_>]) -> Result<Vec<i64>, ScriptError> {
        let left = self.pool.timeout.saturating_sub(self.started.elapsed());
        bounded(left, self.run(keys, args)).await
    }

    async fn run(mut self, keys: &[&str], args: &[Arg<'_>]) -> Result<Vec<i64>, ScriptError> {
        let (pool, pooled, started) = (self.pool, self.pooled, self.started);
        let Some(mut conn) = self.conn.take() else {
            return Err(ScriptError::Closed);
        };
        let sha = Source::Sha(&pool.sha);
        let mut frame = match conn.run(sha, keys, args).await {
            Err(ScriptError::Closed) if pooled => {
                let left = pool.timeout.saturating_sub(started.elapsed());
                conn = Box::pin(pool.connect(conn.runtime, left)).await?;
                conn.run(Source::Sha(&pool.sha), keys, args).await?
            }
            other => other?,
        };
        // A Redis that restarted has forgotten the script: EVAL also caches it again.
        if matches!(&frame, OwnedFrame::Error(e) if e.starts_with("NOSCRIPT")) {
            frame = conn.run(Source::Body(pool.body), keys, args).await?;
        }
        // The whole reply was read: the connection is clean for the next call.
        pool.put_idle(conn);
        match frame {
            OwnedFrame::Error(e) => Err(ScriptError::Redis(e)),
            other => resp::integers(other).map_err(ScriptError::Protocol),
        }
    }
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_idle(conn);
        }
    }
}

enum Source<'a> {
    Sha(&'a str),
    Body(&'a str),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

struct Conn {
    stream: Stream,
    /// Reused for every command: no allocation per call once warm.
    out: Vec<u8>,
    input: Vec<u8>,
    runtime: Option<RuntimeId>,
}

impl Drop for Conn {
    /// The buffer held the password when an `AUTH` was cut short by the timeout.
    fn drop(&mut self) {
        self.out.fill(0);
    }
}

impl Conn {
    async fn run(
        &mut self,
        source: Source<'_>,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<OwnedFrame, ScriptError> {
        let (verb, script) = match source {
            Source::Sha(sha) => ("EVALSHA", sha),
            Source::Body(body) => ("EVAL", body),
        };
        let head = [
            Arg::Str(verb),
            Arg::Str(script),
            Arg::Int(keys.len() as i64),
        ];
        let parts = head
            .into_iter()
            .chain(keys.iter().map(|k| Arg::Str(k)))
            .chain(args.iter().copied());
        self.out.clear();
        resp::command(&mut self.out, 3 + keys.len() + args.len(), parts);
        self.exchange().await
    }

    /// AUTH and SELECT: anything but `+OK` is an error.
    async fn expect_ok(&mut self, parts: &[&str]) -> Result<(), ScriptError> {
        self.out.clear();
        resp::command(
            &mut self.out,
            parts.len(),
            parts.iter().map(|p| Arg::Str(p)),
        );
        let reply = self.exchange().await;
        // The buffer held the password.
        self.out.fill(0);
        match reply? {
            OwnedFrame::SimpleString(s) if s == b"OK" => Ok(()),
            OwnedFrame::Error(e) => Err(ScriptError::Redis(e)),
            other => Err(ScriptError::Protocol(format!("{:?}", other.kind()))),
        }
    }

    /// Writes `out` and reads one whole reply.
    async fn exchange(&mut self) -> Result<OwnedFrame, ScriptError> {
        let written = match &mut self.stream {
            Stream::Tcp(s) => s.write_all(&self.out).await,
            Stream::Unix(s) => s.write_all(&self.out).await,
        };
        written.map_err(closed_or_io)?;
        self.input.clear();
        loop {
            if let Some((frame, used)) = resp::reply(&self.input).map_err(ScriptError::Protocol)? {
                if used != self.input.len() {
                    return Err(ScriptError::Protocol("more than one reply".into()));
                }
                return Ok(frame);
            }
            self.input.reserve(256);
            let read = match &mut self.stream {
                Stream::Tcp(s) => s.read_buf(&mut self.input).await,
                Stream::Unix(s) => s.read_buf(&mut self.input).await,
            };
            match read {
                Ok(0) if self.input.is_empty() => return Err(ScriptError::Closed),
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                Ok(_) => {}
                Err(e) if self.input.is_empty() => return Err(closed_or_io(e)),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A peer that went away before answering (the only case a pooled connection is retried).
fn closed_or_io(e: std::io::Error) -> ScriptError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    match e.kind() {
        BrokenPipe | ConnectionReset | ConnectionAborted => ScriptError::Closed,
        _ => ScriptError::Io(e),
    }
}
