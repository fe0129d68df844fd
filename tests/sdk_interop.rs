//! The official `openai` and `ollama` Python SDKs as clients of the real gateway
//! (tests/python/*.py), run by pytest from the venv `scripts/test` prepares.

mod common;

use std::process::Command;

use common::{SIM_CHUNKS, Stack, require_env};

/// Runs one pytest file against the stack with the given environment; fails with the log.
fn run_pytest(s: &Stack, file: &str, env: &[(&str, String)]) {
    let python = require_env("NZ_TEST_PYTHON");
    let status = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", file])
        .env("NZ_GATEWAY_URL", format!("http://{}", s.gw.addr))
        .env("NZ_MODEL", "llama3.2")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        status.success(),
        "pytest {file} failed; gateway log:\n{}",
        s.gw.log_text()
    );
}

#[test]
fn official_python_sdks_work_through_the_gateway() {
    let s = Stack::start();
    run_pytest(
        &s,
        "tests/python/test_sdk_interop.py",
        &[
            ("NZ_API_KEY", s.key.clone()),
            ("NZ_DENIED_MODEL", "mistral:7b".into()),
            ("NZ_SIM_CHUNKS", SIM_CHUNKS.to_string()),
            ("NZ_SIM_URL", s.sim.url()),
        ],
    );
}

#[test]
fn the_openai_sdk_sees_rate_limits_as_it_expects() {
    let s = Stack::start();
    let (rpm_key, rpm_prefix) = s.gw.create_key("acme", "rpm", &[]);
    s.gw.cli(&["set-limits", "--prefix", &rpm_prefix, "--rpm", "1"]);
    let (conc_key, conc_prefix) = s.gw.create_key("acme", "conc", &[]);
    s.gw.cli(&[
        "set-limits",
        "--prefix",
        &conc_prefix,
        "--max-concurrent",
        "1",
    ]);
    let (budget_key, budget_prefix) = s.gw.create_key("acme", "budget", &[]);
    s.gw.cli(&["set-budget", "--prefix", &budget_prefix, "--daily", "400"]);
    run_pytest(
        &s,
        "tests/python/test_sdk_limits.py",
        &[
            ("NZ_RPM_KEY", rpm_key),
            ("NZ_CONCURRENT_KEY", conc_key),
            ("NZ_BUDGET_KEY", budget_key),
        ],
    );
}
