//! End to end: `nz-bench compare` starts the simulator, the passthrough and the gateway (the
//! debug builds next to nz-bench) against the private Postgres and Redis of `scripts/test`,
//! provisions keys with limits and budgets, and runs a scenario in several rounds. Nothing here
//! asserts on timings: only which runs happened, in which order, and what they counted.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Each comparison resets and reads Redis's global command counters: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn require_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through ./scripts/test, which starts private Postgres and Redis")
    })
}

/// A new empty database on the private Postgres (through psql, as nz-bench reads its counters).
fn fresh_database() -> String {
    let admin = require_env("NZ_TEST_DATABASE_URL");
    let name = format!(
        "nz_bench_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    // As nz-bench finds it: Postgres's own bin directory first, then PATH.
    let psql = std::env::var("NZ_PG_BIN")
        .ok()
        .map(|d| Path::new(&d).join("psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("psql"));
    let out = Command::new(psql)
        .args([&admin, "-v", "ON_ERROR_STOP=1", "-qc"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .expect("psql (installed by scripts/test)");
    assert!(
        out.status.success(),
        "CREATE DATABASE failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (base, _) = admin.rsplit_once('/').expect("database url");
    format!("{base}/{name}")
}

/// The directory of this build's binaries (nz-bench, ollama-sim, nz-passthrough and, built by
/// `cargo build --workspace --bins` first, neuronetz-gateway).
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_nz-bench"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

/// `nz-bench compare` on this build against a fresh database and the private Redis, with
/// cheap key hashing (debug builds, as the other integration tests use) and `args` added;
/// its JSON results.
fn compare(scenario: &Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_nz-bench"))
        .arg("compare")
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(["--database-url", &fresh_database()])
        .args(["--redis-url", &require_env("NZ_TEST_REDIS_URL")])
        .args(["--settle", "100ms", "--quiet", "--json"])
        .args(["--gateway-env", "ARGON2_MEMORY_KIB=1024"])
        .args(["--gateway-env", "ARGON2_ITERATIONS=1"])
        .arg("--scenario")
        .arg(scenario)
        .args(args)
        .output()
        .expect("run nz-bench compare");
    assert!(
        out.status.success(),
        "nz-bench compare {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON results")
}

#[test]
fn compare_runs_rounds_in_alternating_order_and_judges_the_median() {
    let _serial = one_at_a_time();
    let dir = tempfile_dir();
    let scenario = chat_scenario(&dir, "rounds", 3, 2);
    let markdown = dir.join("report.md");
    let markdown_arg = markdown.to_string_lossy().into_owned();
    let v = compare(
        &scenario,
        &[
            "--targets",
            "passthrough,gateway",
            "--rounds",
            "3",
            "--markdown",
            &markdown_arg,
        ],
    );
    let runs: Vec<(u64, &str)> = runs(&v)
        .into_iter()
        .map(|(round, target, _)| (round, target))
        .collect();
    assert_eq!(
        runs,
        [
            (1, "passthrough"),
            (1, "gateway"),
            (2, "gateway"),
            (2, "passthrough"),
            (3, "passthrough"),
            (3, "gateway"),
        ]
    );
    for r in v.as_array().into_iter().flatten() {
        let s = &r["summary"];
        let requests = s["requests"].as_u64().expect("requests");
        assert!(requests > 0, "no requests measured: {r}");
        assert_eq!(s["errors"].as_u64(), Some(0), "errors: {r}");
        assert_eq!(s["tokens"].as_u64(), Some(requests * 3), "tokens: {r}");
        if r["target"] == "gateway" {
            // Each gateway run counted its own store work: limits in Redis, an admission per
            // request and a settlement (alone at this low rate, where no next admission comes
            // soon enough to carry it), plus a warm-up request's settlement at most.
            let stores = &r["stores"];
            let evalsha = stores["redis_by_command"]["evalsha"]
                .as_f64()
                .expect("EVALSHA per request");
            assert!((0.9..=2.5).contains(&evalsha), "EVALSHA/req {evalsha}: {r}");
        }
    }
    let report = std::fs::read_to_string(&markdown).expect("markdown report");
    assert!(report.contains("| rounds #2 / gateway |"), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.contains("| Postgres transactions per request |")
                && l.contains("median")
                && l.contains("3 rounds")),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn together_loads_both_proxies_in_each_round() {
    let _serial = one_at_a_time();
    let dir = tempfile_dir().join("together");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let scenario = chat_scenario(&dir, "pair", 2, 1);
    let v = compare(
        &scenario,
        &[
            "--targets",
            "sim,passthrough,gateway",
            "--rounds",
            "2",
            "--together",
        ],
    );
    let runs = runs(&v);
    // The simulator alone first; the two proxies as one pair, named for it.
    assert_eq!(
        runs,
        [
            (1, "sim", "pair"),
            (1, "passthrough", "pair (together)"),
            (1, "gateway", "pair (together)"),
            (2, "sim", "pair"),
            (2, "gateway", "pair (together)"),
            (2, "passthrough", "pair (together)"),
        ]
    );
    for r in v.as_array().into_iter().flatten() {
        let s = &r["summary"];
        assert!(s["requests"].as_u64().expect("requests") > 0, "{r}");
        assert_eq!(s["errors"].as_u64(), Some(0), "errors: {r}");
        let cpu = r["process"]["cpu_seconds"].as_f64().expect("CPU seconds");
        assert!(cpu > 0.0, "the process clock counted this run: {r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each result's round, target and scenario, in the order they ran.
fn runs(v: &Value) -> Vec<(u64, &str, &str)> {
    v.as_array()
        .expect("an array of results")
        .iter()
        .map(|r| {
            (
                r["round"].as_u64().expect("round"),
                r["target"].as_str().expect("target"),
                r["scenario"].as_str().expect("scenario"),
            )
        })
        .collect()
}

/// A one-second open-loop scenario at 20 req/s of streamed `/api/chat`, written to
/// `dir/<name>.yaml`.
fn chat_scenario(dir: &Path, name: &str, chunks: u32, keys_per_tenant: u32) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "name: {name}\nmode: open\nrate: 20\nduration: 1s\nwarmup: 1s\n\
             requests:\n  - {{route: /api/chat, stream: true, prompt_bytes: 64}}\n\
             sim: {{chunks: {chunks}, chunk_delay_ms: 0}}\ntenants: 1\n\
             keys_per_tenant: {keys_per_tenant}\n"
        ),
    )
    .expect("write scenario");
    path
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nz-bench-compare-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
