//! `nz-bench`: load generator for neuronetz-gateway (and any Ollama/OpenAI-compatible
//! endpoint). `nz-bench run` loads one base URL; `nz-bench compare` measures the simulator, a
//! bare Pingora passthrough and the gateway side by side. See bench/README.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use neuronetz_bench::load::client::Target;
use neuronetz_bench::load::compare::{self, CompareConfig};
use neuronetz_bench::load::scenario::{Mode, Scenario};
use neuronetz_bench::load::{Load, RunOptions, RunResult, procstat, report, run_scenario};

#[derive(Parser)]
#[command(
    name = "nz-bench",
    version,
    about = "Load generator for neuronetz-gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Overrides of the scenario file, shared by both subcommands.
#[derive(clap::Args, Clone)]
struct Overrides {
    /// Measured time (e.g. 30s, 2m), after the warm-up.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Warm-up time, not measured.
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Open loop at this many requests per second.
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Closed loop with this many workers.
    #[arg(long)]
    concurrency: Option<usize>,
}

#[derive(clap::Args)]
struct Output {
    /// Print the results as JSON on stdout (instead of the table).
    #[arg(long)]
    json: bool,
    /// Also write the JSON results to this file.
    #[arg(long)]
    json_file: Option<PathBuf>,
    /// Also write a markdown report to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios against one base URL with your own key(s).
    Run {
        /// Scenario YAML file (repeat for several, run one after the other).
        #[arg(long, required = true)]
        scenario: Vec<PathBuf>,
        /// e.g. http://127.0.0.1:8080 (plain HTTP).
        #[arg(long, env = "NZ_BENCH_BASE_URL")]
        base_url: String,
        /// API key(s), comma-separated; requests rotate over them.
        #[arg(
            long,
            env = "NZ_BENCH_KEY",
            value_delimiter = ',',
            hide_env_values = true
        )]
        key: Vec<String>,
        /// File with one API key per line (added to --key).
        #[arg(long)]
        keys_file: Option<PathBuf>,
        /// Pid of the server process, when local: adds its CPU time per request and RSS.
        #[arg(long)]
        pid: Option<u32>,
        /// Label of the target in reports (default: the base URL).
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        overrides: Overrides,
        #[command(flatten)]
        output: Output,
    },
    /// Re-render the tables (terminal, markdown, SPEC §14 checks) from JSON results saved with
    /// --json-file or --json.
    Report {
        /// JSON result files; their results are shown together.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        output: Output,
    },
    /// Start the simulator, the bare passthrough and the gateway and run the scenarios against
    /// each, back to back; print ratios. Needs Postgres and Redis (DATABASE_URL, REDIS_URL).
    Compare {
        #[arg(long, required = true)]
        scenario: Vec<PathBuf>,
        /// Directory with ollama-sim, nz-passthrough and neuronetz-gateway.
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        #[arg(long, env = "REDIS_URL", hide_env_values = true)]
        redis_url: Option<String>,
        /// Read DATABASE_URL / REDIS_URL from this file (`export NAME=value` lines, as
        /// scripts/run writes .nz-dev/env) when they are not given otherwise.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// Targets to run, in order.
        #[arg(long, value_delimiter = ',', default_value = "sim,passthrough,gateway")]
        targets: Vec<String>,
        /// Runs of each scenario against every target. With more than one, the passthrough and
        /// the gateway trade places every other round and the SPEC §14 checks take the median
        /// of the rounds (hold scenarios run once).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
        /// Pingora worker threads for the passthrough and the gateway.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Run both proxies with Pingora's `work_stealing: false` (one single-threaded runtime
        /// per worker thread; connections stay on the thread that accepted them).
        #[arg(long)]
        no_work_stealing: bool,
        /// Extra gateway setting NAME=VALUE (repeatable).
        #[arg(long = "gateway-env")]
        gateway_env: Vec<String>,
        /// Also count the commands clients send to Redis with MONITOR. Off by default: MONITOR
        /// echoes every command, those inside scripts included, and cost Redis (on the same
        /// cores as the gateway) enough to cut the gateway's saturated throughput by a third.
        /// INFO commandstats (EVALSHA calls, commands inside scripts) is always read.
        #[arg(long)]
        redis_monitor: bool,
        /// Provision the gateway's keys and tenants without any limit or budget, so it makes
        /// no Redis call per request: what the limiter costs is the difference to a normal run.
        #[arg(long)]
        no_limits: bool,
        /// Keep the temporary directory with the processes' logs after a successful run (it
        /// is always kept when the comparison fails).
        #[arg(long)]
        keep_logs: bool,
        /// Pause between runs.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        settle: Duration,
        /// Load the passthrough and the gateway at the same time in each round, each at the
        /// scenario's own rate from its own client (the simulator, if listed, still runs
        /// alone first). On a shared machine whose speed drifts, both then see the same drift,
        /// so their CPU-per-request ratio is steadier; both also share the cores, so absolute
        /// figures are higher than when each runs alone. Open-loop scenarios only.
        #[arg(long)]
        together: bool,
        #[command(flatten)]
        overrides: Overrides,
        #[command(flatten)]
        output: Output,
    },
}

fn load_scenarios(paths: &[PathBuf], o: &Overrides) -> anyhow::Result<Vec<Scenario>> {
    paths
        .iter()
        .map(|p| {
            let mut s = Scenario::load(p)?;
            if let Some(d) = o.duration {
                s.duration = d;
            }
            if let Some(w) = o.warmup {
                s.warmup = w;
            }
            if s.mode != Mode::Hold {
                if let Some(r) = o.rate {
                    s.mode = Mode::Open;
                    s.rate = Some(r);
                }
                if let Some(c) = o.concurrency {
                    s.mode = Mode::Closed;
                    s.concurrency = Some(c);
                }
            }
            s.validate()?;
            Ok(s)
        })
        .collect()
}

fn env_file_value(path: &PathBuf, name: &str) -> anyhow::Result<Option<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().find_map(|l| {
        let l = l.trim().strip_prefix("export ").unwrap_or(l.trim());
        let v = l.strip_prefix(name)?.strip_prefix('=')?;
        Some(v.trim_matches(|c| c == '\'' || c == '"').to_string())
    }))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
        })
        .map_or("?".to_string(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1048576.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores ({cpu}), {mem} RAM, Linux {}", kernel.trim())
}

fn emit(results: &[RunResult], output: &Output) -> anyhow::Result<()> {
    if output.json {
        println!("{}", serde_json::to_string_pretty(results)?);
    } else {
        println!("{}", report::text(results));
    }
    if let Some(path) = &output.json_file {
        std::fs::write(path, serde_json::to_string_pretty(results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &output.markdown {
        let args: Vec<String> = std::env::args().collect();
        let header = format!(
            "# nz-bench report\n\n- date: {}\n- machine: {}\n- command: `{}`\n- load generator, proxies and simulator share this machine\n",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            machine(),
            args.join(" ")
        );
        std::fs::write(path, report::markdown(results, &header))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("markdown report written to {}", path.display());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run {
            scenario,
            base_url,
            mut key,
            keys_file,
            pid,
            label,
            overrides,
            output,
        } => {
            let scenarios = load_scenarios(&scenario, &overrides)?;
            if let Some(f) = keys_file {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?;
                key.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                );
            }
            key.retain(|k| !k.is_empty());
            if key.is_empty() {
                bail!("no API key: pass --key KEY[,KEY...], --keys-file FILE or NZ_BENCH_KEY");
            }
            procstat::raise_nofile();
            let target = Target::parse(&base_url)?;
            let mut results = Vec::new();
            for s in &scenarios {
                let load = Arc::new(Load::new(s, target.clone(), key.clone())?);
                let opts = RunOptions {
                    label: label.clone().unwrap_or_else(|| base_url.clone()),
                    progress: !output.quiet,
                    pid,
                };
                results.push(run_scenario(s, load, &opts).await);
            }
            emit(&results, &output)
        }
        Cmd::Report { files, output } => {
            let mut results: Vec<RunResult> = Vec::new();
            for f in &files {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                let mut r: Vec<RunResult> = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not nz-bench JSON results", f.display()))?;
                results.append(&mut r);
            }
            emit(&results, &output)
        }
        Cmd::Compare {
            scenario,
            bin_dir,
            database_url,
            redis_url,
            env_file,
            targets,
            rounds,
            threads,
            no_work_stealing,
            gateway_env,
            settle,
            redis_monitor,
            no_limits,
            keep_logs,
            together,
            overrides,
            output,
        } => {
            let scenarios = load_scenarios(&scenario, &overrides)?;
            let from_file = |name: &str| -> anyhow::Result<Option<String>> {
                match &env_file {
                    Some(f) => env_file_value(f, name),
                    None => Ok(None),
                }
            };
            let database_url = match database_url {
                Some(u) => u,
                None => from_file("DATABASE_URL")?
                    .context("DATABASE_URL not set (flag, env or --env-file)")?,
            };
            let redis_url = match redis_url {
                Some(u) => u,
                None => from_file("REDIS_URL")?
                    .context("REDIS_URL not set (flag, env or --env-file)")?,
            };
            let gateway_env = gateway_env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("--gateway-env `{kv}`: expected NAME=VALUE"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            for t in &targets {
                if !["sim", "passthrough", "gateway"].contains(&t.as_str()) {
                    bail!("unknown target `{t}` (sim, passthrough, gateway)");
                }
            }
            let results = compare::run(CompareConfig {
                scenarios,
                bin_dir,
                database_url,
                redis_url,
                targets,
                rounds,
                threads,
                work_stealing: !no_work_stealing,
                progress: !output.quiet,
                gateway_env,
                settle,
                redis_monitor,
                limits: !no_limits,
                keep_logs,
                together,
            })
            .await?;
            emit(&results, &output)
        }
    }
}
