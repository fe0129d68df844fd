//! Test harness: real Postgres and Redis (private instances started by `scripts/test`, or by a
//! test itself), the project's Ollama simulator and the real `neuronetz-gateway` binary, all on
//! loopback. A missing prerequisite fails loudly; nothing is skipped.
#![allow(dead_code)]

pub mod http;
pub mod resp;
pub mod tcp_fault;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const UPSTREAM_TOKEN: &str = "upstream-secret-token-7f3a9c";
pub const SIM_CHUNKS: usize = 8;

pub fn require_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through ./scripts/test, which starts private Postgres and Redis")
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// target/debug, found from this test executable (target/debug/deps/<test>).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

pub fn gateway_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_neuronetz-gateway"))
}

/// A new empty database on the shared private Postgres; returns its URL.
pub fn fresh_database() -> String {
    let admin = require_env("NZ_TEST_DATABASE_URL");
    let name = format!("nz_{}", uuid::Uuid::new_v4().simple());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("connect to the test postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create database");
        pool.close().await;
    });
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b)
        .expect("database url");
    format!("{base}/{name}")
}

/// Runs `f` with a short-lived pool on a test database.
fn with_pool<T>(db_url: &str, f: impl AsyncFnOnce(&sqlx::PgPool) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(db_url).await.expect("connect");
        let out = f(&pool).await;
        pool.close().await;
        out
    })
}

/// Runs SQL against a test database (for changes the separate console would make).
pub fn sql(db_url: &str, statement: &str) {
    with_pool(db_url, async |pool| {
        sqlx::query(sqlx::AssertSqlSafe(statement.to_string()))
            .execute(pool)
            .await
            .expect("sql");
    });
}

pub fn sql_scalar_i64(db_url: &str, statement: &str) -> i64 {
    with_pool(db_url, async |pool| {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(statement.to_string()))
            .fetch_one(pool)
            .await
            .expect("sql")
    })
}

/// A process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Sim {
    pub addr: String,
    _proc: Proc,
}

impl Sim {
    pub fn start(extra: &[&str]) -> Sim {
        let bin = target_dir().join("ollama-sim");
        assert!(
            bin.exists(),
            "{} missing: build it with `cargo build --workspace --bins` (scripts/test does)",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--chunks",
                &SIM_CHUNKS.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ollama-sim");
        let stdout = child.stdout.take().expect("sim stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("sim banner");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected sim banner {line:?}"))
            .to_string();
        Sim {
            addr,
            _proc: Proc {
                child,
                name: "ollama-sim",
            },
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the simulator received from clients through the gateway, as JSON. The
    /// gateway's own model-discovery polls (`X-Request-ID: nz-discovery`, every
    /// `DISCOVERY_INTERVAL`) are left out: tests count what clients caused.
    pub fn requests(&self) -> serde_json::Value {
        let r = http::get(&self.addr, "/__sim/requests", &[]);
        assert_eq!(r.status, 200);
        let mut all = r.json();
        if let Some(list) = all.as_array_mut() {
            list.retain(|req| {
                !req["headers"].as_array().is_some_and(|h| {
                    h.iter()
                        .any(|kv| kv[0] == "x-request-id" && kv[1] == "nz-discovery")
                })
            });
        }
        all
    }

    pub fn clear(&self) {
        http::request(&self.addr, "DELETE", "/__sim/requests", &[], None);
    }
}

pub struct Redis {
    pub url: String,
    /// The same server over its Unix socket (`redis+unix://…`).
    pub socket_url: String,
    pub port: u16,
    proc: Option<Proc>,
    _socket_dir: tempfile::TempDir,
}

impl Redis {
    /// A private redis-server for a test that stops it.
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> Redis {
        let bin = std::env::var("NZ_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let socket_dir = tempfile::tempdir().expect("tempdir");
        let socket = socket_dir.path().join("redis.sock").display().to_string();
        let child = Command::new(&bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                &socket,
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e} (run via ./scripts/test)"));
        wait_for_port(port, Duration::from_secs(10));
        Redis {
            url: format!("redis://127.0.0.1:{port}"),
            socket_url: format!("redis+unix://{socket}"),
            port,
            proc: Some(Proc {
                child,
                name: "redis",
            }),
            _socket_dir: socket_dir,
        }
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Freezes (`true`) or thaws the server: connections stay open, nothing is answered.
    pub fn freeze(&self, frozen: bool) {
        let pid = self
            .proc
            .as_ref()
            .map(|p| p.child.id())
            .expect("redis runs");
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts an empty Redis again on the same port (it kept nothing: no persistence).
    pub fn restart(&mut self) {
        self.stop();
        *self = Self::start_on(self.port);
    }
}

/// A fresh database, a private Redis a test may stop, a simulator requiring the upstream
/// token and a budget clock: what several gateways of one test share.
pub struct Deployment {
    pub db: String,
    pub redis: Redis,
    pub sim: Sim,
    pub clock: ClockFile,
}

impl Deployment {
    pub fn start() -> Deployment {
        Deployment {
            db: fresh_database(),
            redis: Redis::start(),
            sim: Sim::start(&["--require-token", UPSTREAM_TOKEN]),
            clock: ClockFile::new(),
        }
    }

    /// A gateway on this deployment (every one gets the same cache secret); `extra` wins.
    pub fn gateway(&self, extra: &[(&str, &str)]) -> Gateway {
        let sim = self.sim.url();
        let mut vars = vec![
            ("DATABASE_URL", self.db.as_str()),
            ("REDIS_URL", self.redis.url.as_str()),
            ("OLLAMA_URL", sim.as_str()),
            ("OLLAMA_AUTH_TOKEN", UPSTREAM_TOKEN),
            (
                "KEY_CACHE_SECRET",
                "deployment-test-secret-0123456789abcdef",
            ),
            ("CLOCK_OFFSET_FILE", self.clock.path.as_str()),
        ];
        vars.extend_from_slice(extra);
        Gateway::start(&vars)
    }
}

/// A `CLOCK_OFFSET_FILE` for gateways under test: seconds added to their budget clock (they
/// poll the file every 50 ms), so a test moves to the next day instead of waiting for it.
pub struct ClockFile {
    pub path: String,
    _dir: tempfile::TempDir,
}

impl ClockFile {
    pub fn new() -> ClockFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clock-offset").display().to_string();
        std::fs::write(&path, "0").expect("clock file");
        ClockFile { path, _dir: dir }
    }

    /// Shifts the clock by `secs` and waits until the gateways have read it.
    pub fn set_offset(&self, secs: i64) {
        std::fs::write(&self.path, secs.to_string()).expect("clock file");
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Gateway {
    pub addr: String,
    /// The internal metrics listener.
    pub metrics_addr: String,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
    /// The Pingora conf the process was started with (upgrade socket, grace period).
    conf: PathBuf,
    proc: Option<Proc>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts `neuronetz-gateway serve` with `env` and waits for `/healthz`.
    pub fn start(env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.path().join("gateway.log");
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut full: Vec<(String, String)> = vec![
            ("LISTEN_ADDR".into(), addr.clone()),
            ("METRICS_ADDR".into(), metrics_addr.clone()),
            ("ARGON2_MEMORY_KIB".into(), "1024".into()),
            ("ARGON2_ITERATIONS".into(), "1".into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        // Tests share one Redis: each database (shared by the gateways of one test) gets its
        // own key namespace, as separate deployments would.
        if let Some((_, db)) = env.iter().find(|(k, _)| *k == "DATABASE_URL") {
            let name = db.rsplit('/').next().unwrap_or("db");
            full.push(("REDIS_KEY_PREFIX".into(), format!("t-{name}")));
        }
        full.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let conf = dir.path().join("pingora.yaml");
        std::fs::write(
            &conf,
            format!(
                "version: 1\nthreads: 2\npid_file: {0}/gw.pid\nupgrade_sock: {0}/gw.sock\ngrace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n",
                dir.path().display()
            ),
        )
        .expect("conf");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(gateway_bin())
            .args(["serve", "-c"])
            .arg(&conf)
            .envs(full.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn gateway");
        let mut gw = Gateway {
            addr,
            metrics_addr,
            log,
            env: full,
            conf: conf.clone(),
            proc: Some(Proc {
                child,
                name: "gateway",
            }),
            _dir: dir,
        };
        gw.wait_healthy();
        gw
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(p) = self.proc.as_mut()
                && let Ok(Some(status)) = p.child.try_wait()
            {
                panic!("gateway exited with {status}; log:\n{}", self.log_text());
            }
            if let Ok(r) = http::try_request(&self.addr, "GET", "/healthz", &[], None)
                && r.status == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not healthy; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// SIGTERM (graceful shutdown) and wait up to `within` for the process to exit.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(p) = self.proc.as_mut() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = p.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    /// Pingora's graceful upgrade: a new process started with `-u` waits on the upgrade
    /// socket; SIGQUIT makes this one hand its listening sockets over, finish what it is
    /// serving and exit. Returns once the old process is gone (panics after `within`).
    pub fn upgrade(&mut self, within: Duration) {
        let sock = self
            .conf
            .parent()
            .map(|d| d.join("gw.sock"))
            .expect("conf dir");
        let _ = std::fs::remove_file(&sock);
        let log = self
            .log
            .with_file_name(format!("gateway-{}.log", uuid::Uuid::new_v4().simple()));
        let child = Command::new(gateway_bin())
            .args(["serve", "-u", "-c"])
            .arg(&self.conf)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn the new gateway");
        let deadline = Instant::now() + within;
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "the new process never listened on the upgrade socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut old = self.proc.take().expect("a running gateway");
        let _ = Command::new("kill")
            .args(["-QUIT", &old.child.id().to_string()])
            .status();
        loop {
            if let Ok(Some(status)) = old.child.try_wait() {
                assert!(status.success(), "old gateway exited with {status}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "old gateway still running; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.log = log;
        self.proc = Some(Proc {
            child,
            name: "gateway",
        });
    }

    /// SIGKILL: no graceful shutdown, nothing cleaned up.
    pub fn kill(&mut self) {
        // `Child::kill` sends SIGKILL on Unix; dropping the `Proc` does exactly that.
        self.proc = None;
    }

    /// Runs a CLI command with the same settings; returns stdout, panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_raw(args);
        assert!(
            out.status.success(),
            "cli {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    pub fn cli_raw(&self, args: &[&str]) -> std::process::Output {
        Command::new(gateway_bin())
            .args(args)
            .envs(
                self.env
                    .iter()
                    .filter(|(k, _)| k != "LISTEN_ADDR" && k != "METRICS_ADDR")
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .output()
            .expect("run cli")
    }

    /// Tenant `acme` (every model allowed) with one key `k` under `set-limits` `limits`:
    /// (key, prefix).
    pub fn limited_key(&self, limits: &[&str]) -> (String, String) {
        self.cli(&["create-tenant", "--name", "acme", "--allow-all-models"]);
        let (key, prefix) = self.create_key("acme", "k", &[]);
        let mut args = vec!["set-limits", "--prefix", prefix.as_str()];
        args.extend_from_slice(limits);
        self.cli(&args);
        (key, prefix)
    }

    pub fn create_key(&self, tenant: &str, name: &str, extra: &[&str]) -> (String, String) {
        let mut args = vec!["create-key", "--tenant", tenant, "--name", name, "--json"];
        args.extend_from_slice(extra);
        let out: serde_json::Value =
            serde_json::from_str(self.cli(&args).trim()).expect("create-key json");
        (
            out["key"].as_str().expect("key").to_string(),
            out["prefix"].as_str().expect("prefix").to_string(),
        )
    }
}

/// The usual set-up: a fresh database, a simulator that requires the upstream token, a gateway
/// in front of it, and a tenant `acme` allowed `llama3.2` and `qwen2.5:0.5b` with one key.
pub struct Stack {
    pub db: String,
    pub sim: Sim,
    pub gw: Gateway,
    pub key: String,
    pub prefix: String,
}

pub const ALLOWED: &str = "llama3.2,qwen2.5:0.5b";

impl Stack {
    pub fn start() -> Stack {
        Self::start_with(&[])
    }

    pub fn start_with(extra_env: &[(&str, &str)]) -> Stack {
        let redis = require_env("NZ_TEST_REDIS_URL");
        let mut env: Vec<(&str, &str)> = vec![("REDIS_URL", redis.as_str())];
        env.extend_from_slice(extra_env);
        Self::start_custom(&env, &[])
    }

    pub fn start_custom(env: &[(&str, &str)], sim_args: &[&str]) -> Stack {
        let db = fresh_database();
        let mut args = vec!["--require-token", UPSTREAM_TOKEN];
        args.extend_from_slice(sim_args);
        let sim = Sim::start(&args);
        let sim_url = sim.url();
        let secret = format!("test-cache-secret-{}", uuid::Uuid::new_v4().simple());
        let mut full: Vec<(&str, &str)> = vec![
            ("DATABASE_URL", db.as_str()),
            ("OLLAMA_URL", sim_url.as_str()),
            ("OLLAMA_AUTH_TOKEN", UPSTREAM_TOKEN),
            ("KEY_CACHE_SECRET", secret.as_str()),
        ];
        full.extend_from_slice(env);
        let gw = Gateway::start(&full);
        gw.cli(&["create-tenant", "--name", "acme", "--models", ALLOWED]);
        let (key, prefix) = gw.create_key("acme", "laptop", &[]);
        Stack {
            db,
            sim,
            gw,
            key,
            prefix,
        }
    }

    pub fn auth(&self) -> (&'static str, String) {
        ("Authorization", format!("Bearer {}", self.key))
    }
}
