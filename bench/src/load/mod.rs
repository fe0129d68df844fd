//! `nz-bench`: the load generator. One module per concern:
//!
//! * [`scenario`]: the YAML scenario (mode, rate/concurrency, request mix, simulator knobs);
//! * [`client`]: HTTP/1.1 keep-alive connections, first-byte timing, usage from body tails;
//! * [`open`] / [`closed`] / [`hold`]: the three ways of generating load;
//! * [`stats`]: HDR histograms and counts; [`progress`]: the live line on stderr;
//! * [`procstat`]: CPU and memory of a local process; [`stores`]: Redis and Postgres counters;
//! * [`compare`]: simulator vs bare passthrough vs gateway, side by side;
//! * [`report`]: terminal table, JSON, markdown.

pub mod client;
pub mod closed;
pub mod compare;
pub mod hold;
pub mod open;
pub mod procstat;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod stores;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use client::Target;
use scenario::{Mix, Mode, Scenario, SimKnobs};

/// What every request of a run shares.
pub struct Load {
    pub target: Target,
    pub keys: Vec<String>,
    pub mix: Mix,
    pub sim: SimKnobs,
    pub max_inflight: usize,
}

impl Load {
    pub fn new(scenario: &Scenario, target: Target, keys: Vec<String>) -> anyhow::Result<Self> {
        anyhow::ensure!(!keys.is_empty(), "no API key given (--key or --keys-file)");
        Ok(Load {
            target,
            keys,
            mix: Mix::new(&scenario.requests)?,
            sim: scenario.sim,
            max_inflight: scenario.max_inflight,
        })
    }

    /// Keys rotate request by request.
    pub fn key(&self, n: u64) -> &str {
        &self.keys[(n % self.keys.len() as u64) as usize]
    }
}

/// The result of one scenario against one target.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunResult {
    pub scenario: String,
    /// What was measured: `sim`, `passthrough`, `gateway`, or the base URL.
    pub target: String,
    pub mode: Mode,
    pub rate: Option<f64>,
    pub concurrency: Option<usize>,
    pub warmup_s: f64,
    /// Whether the SPEC §14 checks apply to this scenario.
    #[serde(default = "default_true")]
    pub spec_checks: bool,
    /// Which round of a repeated comparison (`nz-bench compare --rounds`), from 1; `None` when
    /// the scenario ran once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    pub summary: stats::Summary,
    /// CPU and memory of the process behind the target, when its pid is known.
    pub process: Option<procstat::ProcessDelta>,
    /// Machine-wide CPU during the measured window (is anything else competing?).
    pub machine: Option<procstat::MachineDelta>,
    /// Hold mode only.
    pub hold: Option<hold::HoldResult>,
    /// Redis/Postgres counters during the run (compare mode, gateway only).
    pub stores: Option<stores::StoreDelta>,
}

fn default_true() -> bool {
    true
}

pub struct RunOptions {
    pub label: String,
    pub progress: bool,
    /// Process to sample for CPU and memory (local targets only).
    pub pid: Option<u32>,
}

/// Runs `scenario` against `load.target` and summarises it.
pub async fn run_scenario(scenario: &Scenario, load: Arc<Load>, opts: &RunOptions) -> RunResult {
    let mut result = RunResult {
        scenario: scenario.name.clone(),
        target: opts.label.clone(),
        mode: scenario.mode,
        rate: scenario.rate,
        concurrency: scenario.concurrency,
        warmup_s: scenario.warmup.as_secs_f64(),
        spec_checks: scenario.spec_checks,
        round: None,
        summary: stats::Summary::default(),
        process: None,
        machine: None,
        hold: None,
        stores: None,
    };
    if scenario.mode == Mode::Hold {
        let before = opts.pid.and_then(procstat::process_cpu);
        let h = hold::run(
            load,
            &scenario.hold_counts,
            scenario.hold_for,
            opts.pid,
            opts.progress,
        )
        .await;
        let streams = scenario.hold_counts.last().copied().unwrap_or(0) as u64;
        result.process = opts
            .pid
            .zip(before)
            .and_then(|(pid, b)| procstat::delta(pid, b, streams));
        result.hold = Some(h);
        return result;
    }
    let start = Instant::now();
    let measure_from = start + scenario.warmup;
    let total = scenario.warmup + scenario.duration;
    let recorder = Arc::new(stats::Recorder::new(measure_from));
    let progress = progress::spawn(opts.label.clone(), recorder.clone(), total, opts.progress);
    // CPU is sampled when the measured window opens, so warm-up work is not charged.
    let cpu_before = {
        let pid = opts.pid;
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            (
                pid.and_then(procstat::process_cpu),
                procstat::machine_sample(),
            )
        })
    };
    match scenario.mode {
        Mode::Open => {
            let rate = scenario.rate.unwrap_or(1.0);
            open::run(load, rate, total, recorder.clone()).await;
        }
        Mode::Closed | Mode::Hold => {
            let c = scenario.concurrency.unwrap_or(1);
            closed::run(load, c, total, scenario.max_requests, recorder.clone()).await;
        }
    }
    let _ = progress.send(());
    let elapsed = measure_from.elapsed().max(Duration::from_millis(1));
    result.summary = recorder.summary(elapsed);
    let (before, machine_before) = cpu_before.await.unwrap_or((None, None));
    result.process = opts
        .pid
        .zip(before)
        .and_then(|(pid, b)| procstat::delta(pid, b, result.summary.requests));
    let target_cpu = result.process.as_ref().map_or(0.0, |p| p.cpu_seconds);
    result.machine = machine_before.and_then(|m| procstat::machine_delta(m, target_cpu));
    // Give the progress task a moment to finish its line before the report prints.
    tokio::time::sleep(Duration::from_millis(20)).await;
    result
}
