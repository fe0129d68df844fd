//! `nz-bench compare`: starts the simulator, the bare Pingora passthrough and the gateway
//! (all from one build directory, on free loopback ports, against the Postgres and Redis it
//! is given), provisions tenants and keys with the gateway CLI, then runs every scenario
//! against (a) the simulator, (b) the passthrough and (c) the gateway, back to back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::client::Target;
use super::scenario::{Limits, Mode, Scenario};
use super::stores::{Postgres, Redis, StoreDelta};
use super::{Load, RunOptions, RunResult, procstat, run_scenario};

pub struct CompareConfig {
    pub scenarios: Vec<Scenario>,
    /// Holds `ollama-sim`, `nz-passthrough` and `neuronetz-gateway`.
    pub bin_dir: PathBuf,
    pub database_url: String,
    pub redis_url: String,
    /// Which of `sim`, `passthrough`, `gateway` to run, in that order.
    pub targets: Vec<String>,
    /// Runs of each scenario against every target. Rounds alternate the order of the
    /// passthrough and the gateway, so that a drift of the machine over the run (another
    /// tenant's load, the page cache, thermal state) is not charged to one of them.
    pub rounds: u32,
    /// Pingora worker threads, the same for the passthrough and the gateway.
    pub threads: usize,
    /// Pingora's `work_stealing` for both proxies (its default: true).
    pub work_stealing: bool,
    pub progress: bool,
    /// Extra `NAME=VALUE` settings for the gateway.
    pub gateway_env: Vec<(String, String)>,
    /// Pause between targets, so one run's tail does not overlap the next.
    pub settle: Duration,
    /// Count the commands the gateway sends to Redis with MONITOR (costs Redis some CPU).
    pub redis_monitor: bool,
    /// Provision keys and tenants with limits and budgets (false: none, so the gateway makes
    /// no Redis call per request; separates its own cost from the limiter's).
    pub limits: bool,
    /// Keep the temporary directory (logs, conf, audit spool) after a successful run; it is
    /// always kept after a failure.
    pub keep_logs: bool,
    /// Run the passthrough and the gateway at the same time in each round (open-loop
    /// scenarios), so that both see the same state of a drifting machine.
    pub together: bool,
}

/// A child process started here; stopped (SIGTERM, then SIGKILL) by its own pid on drop.
pub struct Proc {
    pub name: &'static str,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

async fn wait_port(
    addr: &str,
    proc_: &mut Proc,
    log: &Path,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if !proc_.alive() || Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "{} did not start listening on {addr}; log {}:\n{tail}",
                proc_.name,
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything started for a comparison, stopped when dropped (gateway first).
pub struct Stack {
    pub dir: PathBuf,
    pub gateway: Option<Proc>,
    pub passthrough: Option<Proc>,
    pub sim: Proc,
    pub sim_addr: String,
    pub passthrough_addr: String,
    pub gateway_addr: String,
    gateway_bin: PathBuf,
    gateway_env: Vec<(String, String)>,
    /// See [`CompareConfig::limits`].
    pub limits: bool,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.gateway.take();
        self.passthrough.take();
    }
}

fn pingora_conf(dir: &Path, threads: usize, work_stealing: bool) -> anyhow::Result<PathBuf> {
    let path = dir.join("pingora.yaml");
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "version: 1\nthreads: {threads}\nwork_stealing: {work_stealing}\ndaemon: false\n\
             pid_file: {d}/pingora.pid\n\
             error_log: {d}/pingora.err.log\nupgrade_sock: {d}/pingora-upgrade.sock\n\
             grace_period_seconds: 0\ngraceful_shutdown_timeout_seconds: 2\n\
             upstream_keepalive_pool_size: 128\nmax_retries: 2\n"
        ),
    )?;
    Ok(path)
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    Ok(Proc { name, child })
}

impl Stack {
    pub async fn start(cfg: &CompareConfig) -> anyhow::Result<Stack> {
        let dir = std::env::temp_dir().join(format!(
            "nz-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir)?;
        let bin = |n: &str| cfg.bin_dir.join(n);
        for n in ["ollama-sim", "nz-passthrough", "neuronetz-gateway"] {
            if !bin(n).exists() {
                bail!(
                    "{} not found; build first: cargo build --release --workspace --bins",
                    bin(n).display()
                );
            }
        }
        let conf = pingora_conf(&dir, cfg.threads, cfg.work_stealing)?;

        // (a) the simulator, on a port it picks and prints.
        let sim_log = dir.join("sim.log");
        let mut sim = spawn(
            "ollama-sim",
            Command::new(bin("ollama-sim")).args(["--listen", "127.0.0.1:0", "--no-record"]),
            &sim_log,
        )?;
        let sim_addr = {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let text = std::fs::read_to_string(&sim_log).unwrap_or_default();
                if let Some(a) = text.lines().find_map(|l| l.strip_prefix("listening on ")) {
                    break a.trim().to_string();
                }
                if !sim.alive() || Instant::now() > deadline {
                    bail!("ollama-sim did not start: {text}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };

        // (b) the bare passthrough.
        let passthrough_addr = format!("127.0.0.1:{}", free_port()?);
        let pass_log = dir.join("passthrough.log");
        let mut passthrough = spawn(
            "nz-passthrough",
            Command::new(bin("nz-passthrough"))
                .arg("-c")
                .arg(&conf)
                .args(["--listen", &passthrough_addr, "--upstream", &sim_addr]),
            &pass_log,
        )?;
        wait_port(
            &passthrough_addr,
            &mut passthrough,
            &pass_log,
            Duration::from_secs(20),
        )
        .await?;

        // (c) the gateway, every feature on.
        let gateway_addr = format!("127.0.0.1:{}", free_port()?);
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let mut env: Vec<(String, String)> = vec![
            ("OLLAMA_URL".into(), format!("http://{sim_addr}")),
            ("DATABASE_URL".into(), cfg.database_url.clone()),
            ("REDIS_URL".into(), cfg.redis_url.clone()),
            ("LISTEN_ADDR".into(), gateway_addr.clone()),
            ("METRICS_ADDR".into(), metrics_addr),
            (
                "REDIS_KEY_PREFIX".into(),
                format!("nzbench{}", std::process::id()),
            ),
            (
                "AUDIT_SPOOL_DIR".into(),
                dir.join("spool").display().to_string(),
            ),
            (
                "KEY_CACHE_SECRET".into(),
                "nz-bench-key-cache-secret-0123456789abcdef".into(),
            ),
            // The scale scenarios hold 10 000 streams; the default would refuse past 1 024.
            ("UPSTREAM_MAX_INFLIGHT".into(), "200000".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        for (k, v) in &cfg.gateway_env {
            env.retain(|(n, _)| n != k);
            env.push((k.clone(), v.clone()));
        }
        let gw_log = dir.join("gateway.log");
        let gateway_bin = bin("neuronetz-gateway");
        let mut gateway = spawn(
            "neuronetz-gateway",
            Command::new(&gateway_bin)
                .args(["serve", "-c"])
                .arg(&conf)
                .envs(env.iter().map(|(k, v)| (k, v))),
            &gw_log,
        )?;
        wait_port(
            &gateway_addr,
            &mut gateway,
            &gw_log,
            Duration::from_secs(90),
        )
        .await?;
        Ok(Stack {
            dir,
            gateway: Some(gateway),
            passthrough: Some(passthrough),
            sim,
            sim_addr,
            passthrough_addr,
            gateway_addr,
            gateway_bin,
            gateway_env: env,
            limits: cfg.limits,
        })
    }

    /// Runs one gateway admin command and returns its stdout.
    fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.gateway_bin)
            .args(args)
            .envs(self.gateway_env.iter().map(|(k, v)| (k, v)))
            .output()
            .with_context(|| format!("running neuronetz-gateway {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "neuronetz-gateway {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates `tenants` tenants with generous limits and budgets, `keys_per_tenant` keys each;
    /// applies `key_limits` to every key. Without [`Stack::limits`], no limits or budgets at
    /// all. Returns the keys.
    pub fn provision(&self, tag: &str, s: &Scenario) -> anyhow::Result<Vec<String>> {
        if !self.limits {
            return self.plain_keys(tag, s);
        }
        let mut keys = Vec::new();
        let generous = [
            "--rpm",
            "100000000",
            "--tpm",
            "100000000000",
            "--max-concurrent",
            "1000000",
        ];
        for t in 0..s.tenants.max(1) {
            let tenant = format!("{tag}-t{t}");
            self.admin(&["create-tenant", "--name", &tenant, "--allow-all-models"])?;
            let mut args = vec!["set-limits", "--tenant", &tenant];
            args.extend(generous);
            self.admin(&args)?;
            // Budgets on too (every feature): far above the load, at tenant level, so every
            // key also carries them as its own and both scopes are checked and reserved.
            self.admin(&[
                "set-budget",
                "--tenant",
                &tenant,
                "--daily",
                "1000000000000",
                "--monthly",
                "10000000000000",
                "--total",
                "100000000000000",
            ])?;
            for k in 0..s.keys_per_tenant.max(1) {
                let (key, prefix) = self.create_key(&tenant, k)?;
                let Limits {
                    rpm,
                    tpm,
                    max_concurrent,
                } = s.key_limits.unwrap_or_default();
                let (rpm, tpm, mc) = (
                    rpm.map(|v| v.to_string()),
                    tpm.map(|v| v.to_string()),
                    max_concurrent.map(|v| v.to_string()),
                );
                let mut args = vec!["set-limits", "--prefix", &prefix];
                if s.key_limits.is_some() {
                    for (flag, v) in [("--rpm", &rpm), ("--tpm", &tpm), ("--max-concurrent", &mc)] {
                        if let Some(v) = v {
                            args.push(flag);
                            args.push(v);
                        }
                    }
                } else {
                    args.extend(generous);
                }
                if args.len() > 3 {
                    self.admin(&args)?;
                }
                keys.push(key);
            }
        }
        Ok(keys)
    }
}

impl Stack {
    /// Tenants allowed every model, with keys, and no limits or budgets anywhere.
    fn plain_keys(&self, tag: &str, s: &Scenario) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        for t in 0..s.tenants.max(1) {
            let tenant = format!("{tag}-t{t}");
            self.admin(&["create-tenant", "--name", &tenant, "--allow-all-models"])?;
            for k in 0..s.keys_per_tenant.max(1) {
                keys.push(self.create_key(&tenant, k)?.0);
            }
        }
        Ok(keys)
    }

    /// Creates key number `k` of `tenant`; returns the key and its prefix.
    fn create_key(&self, tenant: &str, k: usize) -> anyhow::Result<(String, String)> {
        let out = self.admin(&[
            "create-key",
            "--tenant",
            tenant,
            "--name",
            &format!("k{k}"),
            "--json",
        ])?;
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).context("create-key --json output")?;
        let key = v["key"]
            .as_str()
            .context("create-key --json printed no `key`")?
            .to_string();
        let prefix = v["prefix"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| key.chars().take(12).collect());
        Ok((key, prefix))
    }
}

/// Runs the whole comparison and returns one result per scenario and target.
pub async fn run(cfg: CompareConfig) -> anyhow::Result<Vec<RunResult>> {
    let nofile = procstat::raise_nofile();
    if cfg.scenarios.iter().any(|s| s.mode == Mode::Hold) {
        let need = cfg
            .scenarios
            .iter()
            .flat_map(|s| s.hold_counts.iter())
            .max()
            .copied()
            .unwrap_or(0) as u64
            * 2
            + 1000;
        if nofile < need {
            eprintln!(
                "warning: open-file limit {nofile} is below the {need} the hold scenario needs (ulimit -n)"
            );
        }
    }
    let redis = Redis::from_url(&cfg.redis_url)?;
    let pg = Postgres::new(&cfg.database_url);
    redis
        .command(&["PING"])
        .await
        .context("Redis not reachable")?;
    pg.counters()
        .await
        .context("Postgres not reachable with psql")?;

    if !cfg.limits
        && let Some(s) = cfg.scenarios.iter().find(|s| s.key_limits.is_some())
    {
        eprintln!(
            "warning: --no-limits ignores the key limits of scenario `{}`",
            s.name
        );
    }
    let stack = Stack::start(&cfg).await?;
    eprintln!(
        "started: ollama-sim {} (pid {}), nz-passthrough {} (pid {}), neuronetz-gateway {} (pid {}); logs in {}",
        stack.sim_addr,
        stack.sim.pid(),
        stack.passthrough_addr,
        stack.passthrough.as_ref().map_or(0, Proc::pid),
        stack.gateway_addr,
        stack.gateway.as_ref().map_or(0, Proc::pid),
        stack.dir.display()
    );
    let run_tag = format!("bench{}", std::process::id());
    let mut results = Vec::new();
    for (i, scenario) in cfg.scenarios.iter().enumerate() {
        let keys = stack.provision(&format!("{run_tag}-{i}-{}", scenario.name), scenario)?;
        // Holding streams measures memory, not a ratio that noise could move: once is enough.
        let rounds = if scenario.mode == Mode::Hold {
            1
        } else {
            cfg.rounds.max(1)
        };
        let together = cfg.together && scenario.mode == Mode::Open;
        if cfg.together && !together {
            eprintln!(
                "note: scenario `{}` is not open-loop; its targets run one after the other",
                scenario.name
            );
        }
        for round in 1..=rounds {
            let order = round_order(&cfg.targets, round);
            let round = (rounds > 1).then_some(round);
            for batch in batches(&order, together) {
                let runs = batch
                    .iter()
                    .map(|t| run_target(&cfg, &stack, &redis, &pg, scenario, &keys, t));
                for mut result in futures::future::try_join_all(runs).await? {
                    result.round = round;
                    if together && batch.len() > 1 {
                        result.scenario = format!("{} (together)", result.scenario);
                    }
                    if cfg.progress {
                        eprintln!(
                            "{}",
                            super::report::results_table(std::slice::from_ref(&result)).text()
                        );
                    }
                    results.push(result);
                }
                tokio::time::sleep(cfg.settle).await;
            }
        }
    }
    let dir = stack.dir.clone();
    drop(stack);
    if cfg.keep_logs {
        eprintln!("logs kept in {}", dir.display());
    } else if let Err(e) = std::fs::remove_dir_all(&dir) {
        eprintln!("could not remove {}: {e}", dir.display());
    }
    Ok(results)
}

/// The targets of one round: as given in odd rounds; in even rounds the passthrough and the
/// gateway trade places (the simulator, the reference for both, stays first).
fn round_order(targets: &[String], round: u32) -> Vec<&str> {
    let mut order: Vec<&str> = targets.iter().map(String::as_str).collect();
    if round.is_multiple_of(2) {
        let at = |name: &str| order.iter().position(|t| *t == name);
        if let (Some(p), Some(g)) = (at("passthrough"), at("gateway")) {
            order.swap(p, g);
        }
    }
    order
}

/// The targets of a round in the groups that run at the same time: one by one, or with
/// `together` the passthrough and the gateway as one group (anything else alone, first).
fn batches<'a>(order: &[&'a str], together: bool) -> Vec<Vec<&'a str>> {
    if !together {
        return order.iter().map(|t| vec![*t]).collect();
    }
    let (pair, alone): (Vec<&str>, Vec<&str>) = order
        .iter()
        .partition(|t| matches!(**t, "passthrough" | "gateway"));
    let mut out: Vec<Vec<&str>> = alone.into_iter().map(|t| vec![t]).collect();
    if !pair.is_empty() {
        out.push(pair);
    }
    out
}

/// One run of `scenario` against one target, with the stores' counters around it when the
/// target is the gateway.
async fn run_target(
    cfg: &CompareConfig,
    stack: &Stack,
    redis: &Redis,
    pg: &Postgres,
    scenario: &Scenario,
    keys: &[String],
    target: &str,
) -> anyhow::Result<RunResult> {
    let (label, addr, pid) = match target {
        "sim" => ("sim", &stack.sim_addr, Some(stack.sim.pid())),
        "passthrough" => (
            "passthrough",
            &stack.passthrough_addr,
            stack.passthrough.as_ref().map(Proc::pid),
        ),
        "gateway" => (
            "gateway",
            &stack.gateway_addr,
            stack.gateway.as_ref().map(Proc::pid),
        ),
        other => bail!("unknown target `{other}`"),
    };
    let target = Target::parse(&format!("http://{addr}"))?;
    let load = Arc::new(Load::new(scenario, target.clone(), keys.to_vec())?);
    warm(&load, label).await?;
    let is_gateway = label == "gateway";
    let (stop_monitor, monitor_rx) = tokio::sync::watch::channel(false);
    let mut redis_cpu_before = None;
    let (pg_before, monitor) = if is_gateway {
        redis.reset_stats().await?;
        // MONITOR makes Redis echo every command: its CPU would not be the gateway's.
        if !cfg.redis_monitor {
            redis_cpu_before = redis.cpu_seconds().await.ok();
        }
        let monitor = cfg.redis_monitor.then(|| {
            let r = redis.clone();
            tokio::spawn(async move { r.count_round_trips(monitor_rx).await })
        });
        (Some(pg.counters().await?), monitor)
    } else {
        (None, None)
    };
    let opts = RunOptions {
        label: label.to_string(),
        progress: cfg.progress,
        pid,
    };
    let mut result = run_scenario(scenario, load, &opts).await;
    if !cfg.limits {
        // Not the configuration SPEC §14 is about: named as such, no targets checked.
        result.scenario = format!("{} (no limits)", result.scenario);
        result.spec_checks = false;
    }
    if let Some(before) = pg_before {
        // The audit writer batches, and Postgres publishes its counters about once a
        // second: wait for both.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let _ = stop_monitor.send(true);
        let round_trips = match monitor {
            Some(m) => m.await.map_err(anyhow::Error::from).and_then(|r| r)?,
            None => BTreeMap::new(),
        };
        let calls: BTreeMap<String, u64> = redis.command_calls().await?;
        let after = pg.counters().await?;
        let redis_cpu = redis_cpu_before
            .zip(redis.cpu_seconds().await.ok())
            .map(|(b, a)| a - b);
        // Everything sent since the counters were reset, warm-up included.
        let n = if scenario.mode == Mode::Hold {
            scenario.hold_counts.last().copied().unwrap_or(0) as u64
        } else {
            result.summary.sent
        };
        result.stores = Some(StoreDelta::new(
            n,
            calls,
            round_trips,
            before,
            after,
            redis_cpu,
        ));
    }
    Ok(result)
}

/// One request per key before measuring: opens the gateway's key cache (the first use of a
/// key pays for Argon2) and the upstream connection pools.
async fn warm(load: &Load, label: &str) -> anyhow::Result<()> {
    use super::client::{Conn, Outcome, RequestSpec, send};
    let mut sim = load.sim;
    // Warm-up requests should not hold streams open for long.
    sim.chunk_delay_ms = Some(0);
    sim.chunks = Some(1);
    for (i, key) in load.keys.iter().enumerate() {
        let conn = Conn::open(&load.target).await?;
        let spec = RequestSpec {
            target: &load.target,
            key,
            req: load.mix.pick(i as u64),
            sim,
        };
        let (t, _) = send(conn, &spec).await;
        match t.outcome {
            Outcome::Status(s) if (200..300).contains(&s) || s == 429 => {}
            other => bail!("warm-up request to {label} failed: {other:?}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{batches, round_order};

    #[test]
    fn together_groups_the_two_proxies_after_the_simulator() {
        let order = ["sim", "gateway", "passthrough"];
        assert_eq!(
            batches(&order, true),
            vec![vec!["sim"], vec!["gateway", "passthrough"]]
        );
        assert_eq!(
            batches(&order, false),
            vec![vec!["sim"], vec!["gateway"], vec!["passthrough"]]
        );
        assert_eq!(batches(&["gateway"], true), vec![vec!["gateway"]]);
    }

    #[test]
    fn even_rounds_swap_the_passthrough_and_the_gateway() {
        let targets: Vec<String> = ["sim", "passthrough", "gateway"].map(String::from).into();
        assert_eq!(round_order(&targets, 1), ["sim", "passthrough", "gateway"]);
        assert_eq!(round_order(&targets, 2), ["sim", "gateway", "passthrough"]);
        assert_eq!(round_order(&targets, 3), ["sim", "passthrough", "gateway"]);
        let only: Vec<String> = vec!["gateway".into()];
        assert_eq!(round_order(&only, 2), ["gateway"]);
    }
}
