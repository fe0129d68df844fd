//! Reports: the same tables rendered for the terminal and as markdown, plus JSON of the raw
//! results.

use std::fmt::Write;

use super::RunResult;
use super::scenario::Mode;

/// A plain table: rendered aligned for the terminal or as a markdown table.
pub struct Table {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn new(title: impl Into<String>, headers: &[&str]) -> Self {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn text(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let line = |cells: &[String]| {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let w = widths.get(i).copied().unwrap_or(0);
                    if i == 0 {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        let mut out = format!("{}\n", self.title);
        out.push_str(&line(&self.headers));
        out.push('\n');
        let total: usize = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("**{}**\n\n| {} |\n|", self.title, self.headers.join(" | "));
        for i in 0..self.headers.len() {
            out.push_str(if i == 0 { " --- |" } else { " ---: |" });
        }
        out.push('\n');
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "-".to_string()
    }
}

fn signed_ms(v: f64) -> String {
    format!("{}{}", if v >= 0.0 { "+" } else { "" }, ms(v))
}

fn mode_label(r: &RunResult) -> String {
    match r.mode {
        Mode::Open => format!("open {} rps", r.rate.unwrap_or(0.0)),
        Mode::Closed => format!("closed c={}", r.concurrency.unwrap_or(0)),
        Mode::Hold => "hold".to_string(),
    }
}

/// A result's name in the tables: the scenario, and its round when it was repeated.
fn label(r: &RunResult) -> String {
    round_name(&r.scenario, r.round)
}

fn round_name(scenario: &str, round: Option<u32>) -> String {
    match round {
        Some(n) => format!("{scenario} #{n}"),
        None => scenario.to_string(),
    }
}

/// Each (scenario, round) that ran, in the order of the results; hold runs are left out.
fn groups(results: &[RunResult]) -> Vec<(&str, Option<u32>)> {
    let mut out: Vec<(&str, Option<u32>)> = Vec::new();
    for r in results.iter().filter(|r| r.mode != Mode::Hold) {
        let g = (r.scenario.as_str(), r.round);
        if !out.contains(&g) {
            out.push(g);
        }
    }
    out
}

fn find<'a>(
    results: &'a [RunResult],
    scenario: &str,
    round: Option<u32>,
    target: &str,
) -> Option<&'a RunResult> {
    results
        .iter()
        .find(|r| r.scenario == scenario && r.round == round && r.target == target)
}

/// One row per result: throughput, latency, TTFB, tokens, errors, process cost.
pub fn results_table(results: &[RunResult]) -> Table {
    let mut t = Table::new(
        "Results (latency in ms; CPU = the target process's CPU clock, all threads)",
        &[
            "scenario / target",
            "mode",
            "requests",
            "req/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "TTFB p50",
            "TTFB p99",
            "tok/s",
            "non-2xx/failed",
            "CPU s/1k req",
            "peak RSS MiB",
            "box CPU s: target/nz-bench/rest",
        ],
    );
    for r in results.iter().filter(|r| r.mode != Mode::Hold) {
        let s = &r.summary;
        let errors = if s.errors_by_status.is_empty() {
            "0".to_string()
        } else {
            s.errors_by_status
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        t.rows.push(vec![
            format!("{} / {}", label(r), r.target),
            mode_label(r),
            s.requests.to_string(),
            format!("{:.0}", s.rps),
            ms(s.latency_ms.p50),
            ms(s.latency_ms.p90),
            ms(s.latency_ms.p99),
            ms(s.latency_ms.p999),
            ms(s.ttfb_ms.p50),
            ms(s.ttfb_ms.p99),
            format!("{:.0}", s.tokens_per_s),
            errors,
            r.process
                .as_ref()
                .map_or("-".to_string(), |p| format!("{:.3}", p.cpu_s_per_1000_req)),
            r.process.as_ref().map_or("-".to_string(), |p| {
                format!("{:.1}", p.peak_rss_kib as f64 / 1024.0)
            }),
        ]);
    }
    t
}

/// For each scenario run against several targets: the passthrough and the gateway as ratios to
/// the simulator (a) and the passthrough (b), and latency added over each.
pub fn comparison_table(results: &[RunResult]) -> Option<Table> {
    let mut t = Table::new(
        "Comparison: ratios to (a) the simulator directly and (b) the bare passthrough; added = this target minus that one, ms",
        &[
            "scenario / target",
            "req/s vs a",
            "req/s vs b",
            "p50 vs a",
            "p99 vs a",
            "p99 vs b",
            "added p50 vs a",
            "added p99 vs a",
            "added p50 vs b",
            "added p99 vs b",
            "added TTFB p50 vs b",
            "added TTFB p99 vs b",
            "CPU/req vs b",
        ],
    );
    for (name, round) in groups(results) {
        let of = |t: &str| find(results, name, round, t);
        let sim = of("sim");
        let pass = of("passthrough");
        let shown = round_name(name, round);
        for target in ["passthrough", "gateway"] {
            let Some(r) = of(target) else { continue };
            let vs = |base: Option<&RunResult>, f: &dyn Fn(&RunResult) -> f64| {
                base.map_or("-".to_string(), |b| ratio(f(r), f(b)))
            };
            let added = |base: Option<&RunResult>, f: &dyn Fn(&RunResult) -> f64| {
                base.map_or("-".to_string(), |b| signed_ms(f(r) - f(b)))
            };
            let is_pass = target == "passthrough";
            let b = if is_pass { None } else { pass };
            let cpu = |x: &RunResult| x.process.as_ref().map_or(0.0, |p| p.cpu_s_per_1000_req);
            t.rows.push(vec![
                format!("{shown} / {target}"),
                vs(sim, &|x| x.summary.rps),
                vs(b, &|x| x.summary.rps),
                vs(sim, &|x| x.summary.latency_ms.p50),
                vs(sim, &|x| x.summary.latency_ms.p99),
                vs(b, &|x| x.summary.latency_ms.p99),
                added(sim, &|x| x.summary.latency_ms.p50),
                added(sim, &|x| x.summary.latency_ms.p99),
                added(b, &|x| x.summary.latency_ms.p50),
                added(b, &|x| x.summary.latency_ms.p99),
                added(b, &|x| x.summary.ttfb_ms.p50),
                added(b, &|x| x.summary.ttfb_ms.p99),
                vs(b, &cpu),
            ]);
        }
    }
    (!t.rows.is_empty()).then_some(t)
}

/// Redis commands and Postgres transactions per request (gateway runs in compare mode).
pub fn stores_table(results: &[RunResult]) -> Option<Table> {
    let mut t = Table::new(
        "Gateway store work per request (Redis: commands clients sent, from MONITOR, and commands executed incl. inside Lua scripts, from INFO commandstats; Postgres: pg_stat_database delta; CPU of the stores from /proc (Postgres, when local) and INFO cpu (Redis); background work included)",
        &[
            "scenario",
            "requests (incl. warm-up)",
            "Redis cmds sent/req",
            "sent by command",
            "Redis cmds/req (incl. in scripts)",
            "by command (per req)",
            "PG xact/req",
            "PG xact",
            "PG rows inserted",
            "PG CPU s/1k req",
            "Redis CPU s/1k req",
        ],
    );
    for r in results {
        let Some(st) = &r.stores else { continue };
        let by = st
            .redis_by_command
            .iter()
            .map(|(k, v)| format!("{k} {v:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        let trips = st
            .redis_client_commands_by_command
            .iter()
            .map(|(k, v)| format!("{k} {v:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        t.rows.push(vec![
            label(r),
            st.requests.to_string(),
            if trips.is_empty() {
                "- (no MONITOR)".to_string()
            } else {
                format!("{:.3}", st.redis_client_commands_per_request)
            },
            if trips.is_empty() {
                "-".to_string()
            } else {
                trips
            },
            format!("{:.3}", st.redis_commands_per_request),
            if by.is_empty() { "-".to_string() } else { by },
            format!("{:.4}", st.pg_xact_per_request),
            st.pg_xact_commit.to_string(),
            st.pg_tup_inserted.to_string(),
            st.pg_cpu_s_per_1000_req
                .map_or("-".to_string(), |v| format!("{v:.3}")),
            st.redis_cpu_s_per_1000_req
                .map_or("-".to_string(), |v| format!("{v:.3}")),
        ]);
    }
    (!t.rows.is_empty()).then_some(t)
}

/// Hold-mode steps: RSS at each stream count and KiB per added stream.
pub fn hold_table(results: &[RunResult]) -> Option<Table> {
    let mut t = Table::new(
        "Concurrent idle streams: RSS of the target process (KiB) and slope per added stream",
        &[
            "scenario / target",
            "streams",
            "open",
            "failed",
            "open time s",
            "RSS MiB",
            "KiB/stream (vs previous step)",
        ],
    );
    for r in results {
        let Some(h) = &r.hold else { continue };
        let label = format!("{} / {}", r.scenario, r.target);
        if let Some(b) = h.rss_before_kib {
            t.rows.push(vec![
                label.clone(),
                "0".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("{:.1}", b as f64 / 1024.0),
                "-".into(),
            ]);
        }
        for s in &h.steps {
            t.rows.push(vec![
                label.clone(),
                s.streams.to_string(),
                s.open.to_string(),
                s.failed.to_string(),
                format!("{:.1}", s.open_seconds),
                s.rss_kib
                    .map_or("-".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
                s.kib_per_stream.map_or("-".into(), |v| format!("{v:.1}")),
            ]);
        }
        if let (Some(after), Some(last)) = (h.rss_after_hold_kib, h.steps.last()) {
            t.rows.push(vec![
                label.clone(),
                format!("{} after {:.0} s held", last.streams, h.held_seconds),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("{:.1}", after as f64 / 1024.0),
                "-".into(),
            ]);
        }
    }
    (!t.rows.is_empty()).then_some(t)
}

/// A SPEC §14 target and how a measurement is held against it.
#[derive(Clone, Copy)]
enum Bound {
    AtMost(f64),
    Below(f64),
    AtLeast(f64),
}

impl Bound {
    fn holds(self, v: f64) -> bool {
        match self {
            Bound::AtMost(b) => v <= b + 1e-9,
            Bound::Below(b) => v < b,
            Bound::AtLeast(b) => v >= b,
        }
    }
}

/// How a check's value is written.
#[derive(Clone, Copy)]
enum Unit {
    Ratio,
    AddedMs,
    PerRequest(usize),
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            // Three decimals: a verdict against 1.2x can hang on the third one.
            Unit::Ratio => format!("{v:.3}x"),
            Unit::AddedMs => format!("{v:+.3} ms"),
            Unit::PerRequest(digits) => format!("{v:.digits$}"),
        }
    }
}

/// One SPEC §14 check of one round of one scenario.
struct Check {
    name: &'static str,
    target: &'static str,
    bound: Bound,
    unit: Unit,
    value: f64,
    /// Said after the value (where a count came from).
    note: Option<String>,
}

/// The checks one pair of runs (passthrough, gateway) of a scenario allows: fixed-rate (open
/// loop) runs for CPU, latency, TTFB and store work; closed-loop runs for saturated throughput.
fn checks(pass: &RunResult, gw: &RunResult) -> Vec<Check> {
    let mut out = Vec::new();
    let (ps, gs) = (&pass.summary, &gw.summary);
    match gw.mode {
        Mode::Open => {
            let cpu = |x: &RunResult| x.process.as_ref().map(|p| p.cpu_s_per_1000_req);
            if let (Some(c_gw), Some(c_pass)) = (cpu(gw), cpu(pass))
                && c_pass > 0.0
            {
                out.push(Check {
                    name: "CPU per request",
                    target: "<= 1.2x",
                    bound: Bound::AtMost(1.2),
                    unit: Unit::Ratio,
                    value: c_gw / c_pass,
                    note: None,
                });
            }
            out.push(Check {
                name: "added p99",
                target: "< 1 ms",
                bound: Bound::Below(1.0),
                unit: Unit::AddedMs,
                value: gs.latency_ms.p99 - ps.latency_ms.p99,
                note: None,
            });
            out.push(Check {
                name: "added TTFB p50",
                target: "<= 0.5 ms",
                bound: Bound::AtMost(0.5),
                unit: Unit::AddedMs,
                value: gs.ttfb_ms.p50 - ps.ttfb_ms.p50,
                note: None,
            });
            if let Some(st) = &gw.stores {
                // Request-path round trips are the EVALSHA calls; background lease renewal
                // adds pipelined ZADD/PEXPIRE, reported but not counted here.
                // Without MONITOR, INFO commandstats still counts the EVALSHA calls
                // (commands run inside the scripts are counted under their own names).
                let (trips, source) = if st.redis_client_commands_by_command.is_empty() {
                    let trips = st.redis_by_command.get("evalsha").copied().unwrap_or(0.0);
                    (trips, "INFO commandstats".to_string())
                } else {
                    let total = st.redis_client_commands_per_request;
                    let trips = st
                        .redis_client_commands_by_command
                        .get("evalsha")
                        .copied()
                        .unwrap_or(total);
                    (trips, format!("all commands sent: {total:.3}"))
                };
                out.push(Check {
                    name: "Redis round trips per request (EVALSHA)",
                    target: "<= 2 (1 before, 1 after)",
                    bound: Bound::AtMost(2.0),
                    unit: Unit::PerRequest(3),
                    value: trips,
                    note: Some(source),
                });
                out.push(Check {
                    name: "Postgres transactions per request",
                    target: "< 0.05",
                    bound: Bound::Below(0.05),
                    unit: Unit::PerRequest(4),
                    value: st.pg_xact_per_request,
                    note: None,
                });
            }
        }
        Mode::Closed if ps.rps > 0.0 => out.push(Check {
            name: "saturated throughput",
            target: ">= 0.85x",
            bound: Bound::AtLeast(0.85),
            unit: Unit::Ratio,
            value: gs.rps / ps.rps,
            note: None,
        }),
        Mode::Closed | Mode::Hold => {}
    }
    out
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if !n.is_multiple_of(2) => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// SPEC §14 targets, checked for every scenario that ran against both the passthrough and the
/// gateway. A scenario repeated over rounds (`compare --rounds`) is judged by the median of
/// its rounds, with their range beside it: on a shared machine one run does not decide.
pub fn targets_table(results: &[RunResult]) -> Option<Table> {
    let mut t = Table::new(
        "SPEC §14 targets (gateway vs passthrough; over several rounds: the median decides)",
        &["scenario", "check", "target", "measured", "verdict"],
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" }.to_string();
    let mut scenarios: Vec<&str> = Vec::new();
    for r in results {
        if r.mode != Mode::Hold && r.spec_checks && !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    for name in scenarios {
        // Each round's checks, in the order `checks` gives them.
        let rounds: Vec<Vec<Check>> = groups(results)
            .into_iter()
            .filter(|(s, _)| *s == name)
            .filter_map(|(s, round)| {
                let pass = find(results, s, round, "passthrough")?;
                let gw = find(results, s, round, "gateway")?;
                Some(checks(pass, gw))
            })
            .collect();
        // Checks by name, in the order they first appear: a round can lack one (no CPU figure,
        // no store counts) without shifting the others.
        let mut names: Vec<&Check> = Vec::new();
        for c in rounds.iter().flatten() {
            if !names.iter().any(|n| n.name == c.name) {
                names.push(c);
            }
        }
        for c in names {
            let mut values: Vec<f64> = rounds
                .iter()
                .filter_map(|r| r.iter().find(|x| x.name == c.name).map(|x| x.value))
                .collect();
            let measured = if rounds.len() == 1 {
                let shown = c.unit.show(c.value);
                match &c.note {
                    Some(n) => format!("{shown} ({n})"),
                    None => shown,
                }
            } else {
                let n = values.len();
                let m = median(&mut values);
                let of = if n == rounds.len() {
                    format!("{n} rounds")
                } else {
                    format!("{n} of {} rounds", rounds.len())
                };
                format!(
                    "median {} ({} to {}, {of})",
                    c.unit.show(m),
                    c.unit.show(values[0]),
                    c.unit.show(values[n - 1])
                )
            };
            let value = median(&mut values);
            t.rows.push(vec![
                name.to_string(),
                c.name.to_string(),
                c.target.to_string(),
                measured,
                verdict(c.bound.holds(value)),
            ]);
        }
    }
    (!t.rows.is_empty()).then_some(t)
}

pub fn all_tables(results: &[RunResult]) -> Vec<Table> {
    let mut v = Vec::new();
    if results.iter().any(|r| r.mode != Mode::Hold) {
        v.push(results_table(results));
    }
    v.extend(comparison_table(results));
    v.extend(targets_table(results));
    v.extend(stores_table(results));
    v.extend(hold_table(results));
    v
}

pub fn text(results: &[RunResult]) -> String {
    all_tables(results)
        .iter()
        .map(Table::text)
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn markdown(results: &[RunResult], header: &str) -> String {
    let mut out = String::from(header);
    for t in all_tables(results) {
        out.push('\n');
        out.push_str(&t.markdown());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::procstat::ProcessDelta;
    use crate::load::stats::{Percentiles, Summary};

    fn result(target: &str, mode: Mode, rps: f64, p99: f64, cpu: f64) -> RunResult {
        RunResult {
            scenario: "s".into(),
            target: target.into(),
            mode,
            rate: Some(100.0),
            concurrency: None,
            warmup_s: 0.0,
            spec_checks: true,
            round: None,
            summary: Summary {
                requests: 100,
                rps,
                latency_ms: Percentiles {
                    p50: 1.0,
                    p99,
                    ..Percentiles::default()
                },
                ttfb_ms: Percentiles {
                    p50: 0.5,
                    ..Percentiles::default()
                },
                ..Summary::default()
            },
            process: Some(ProcessDelta {
                cpu_s_per_1000_req: cpu,
                ..ProcessDelta::default()
            }),
            machine: None,
            hold: None,
            stores: None,
        }
    }

    #[test]
    fn targets_compare_gateway_with_passthrough() {
        let results = vec![
            result("sim", Mode::Open, 100.0, 1.0, 0.1),
            result("passthrough", Mode::Open, 100.0, 2.0, 0.2),
            result("gateway", Mode::Open, 100.0, 3.5, 0.22),
        ];
        let t = targets_table(&results).unwrap();
        let cpu = t.rows.iter().find(|r| r[1] == "CPU per request").unwrap();
        assert_eq!((cpu[3].as_str(), cpu[4].as_str()), ("1.100x", "met"));
        let p99 = t.rows.iter().find(|r| r[1] == "added p99").unwrap();
        assert_eq!((p99[3].as_str(), p99[4].as_str()), ("+1.500 ms", "MISSED"));
        let cmp = comparison_table(&results).unwrap();
        assert_eq!(cmp.rows.len(), 2);
        assert!(cmp.markdown().contains("| s / gateway |"));
    }

    #[test]
    fn closed_loop_checks_throughput_only() {
        let results = vec![
            result("passthrough", Mode::Closed, 1000.0, 2.0, 0.2),
            result("gateway", Mode::Closed, 900.0, 9.0, 0.9),
        ];
        let t = targets_table(&results).unwrap();
        assert_eq!(t.rows.len(), 1);
        assert_eq!(
            (t.rows[0][3].as_str(), t.rows[0][4].as_str()),
            ("0.900x", "met")
        );
    }

    #[test]
    fn rounds_are_judged_by_their_median() {
        let mut results = Vec::new();
        // CPU ratios 1.30, 1.10, 1.15: the median (1.15) meets the target, one round does not.
        for (round, cpu) in [(1, 0.26), (2, 0.22), (3, 0.23)] {
            for (target, c) in [("passthrough", 0.2), ("gateway", cpu)] {
                let mut r = result(target, Mode::Open, 100.0, 2.0, c);
                r.round = Some(round);
                results.push(r);
            }
        }
        let t = targets_table(&results).unwrap();
        let cpu = t.rows.iter().find(|r| r[1] == "CPU per request").unwrap();
        assert_eq!(cpu[3], "median 1.150x (1.100x to 1.300x, 3 rounds)");
        assert_eq!(cpu[4], "met");
        // Each round keeps its own comparison rows.
        let cmp = comparison_table(&results).unwrap();
        assert_eq!(cmp.rows.len(), 6);
        assert!(
            cmp.rows
                .iter()
                .any(|r| r[0] == "s #3 / gateway" && r[12] == "1.15x")
        );
    }

    #[test]
    fn a_round_without_a_check_does_not_shift_the_others() {
        let mut results = Vec::new();
        for (round, cpu) in [(1, None), (2, Some(0.22)), (3, Some(0.26))] {
            for target in ["passthrough", "gateway"] {
                let mut r = result(target, Mode::Open, 100.0, 2.0, 0.2);
                if target == "gateway" {
                    r.process = cpu.map(|c| ProcessDelta {
                        cpu_s_per_1000_req: c,
                        ..ProcessDelta::default()
                    });
                }
                r.round = Some(round);
                results.push(r);
            }
        }
        let t = targets_table(&results).unwrap();
        let cpu = t.rows.iter().find(|r| r[1] == "CPU per request").unwrap();
        assert_eq!(cpu[3], "median 1.200x (1.100x to 1.300x, 2 of 3 rounds)");
        let p99 = t.rows.iter().find(|r| r[1] == "added p99").unwrap();
        assert_eq!(
            p99[3],
            "median +0.000 ms (+0.000 ms to +0.000 ms, 3 rounds)"
        );
    }

    #[test]
    fn an_even_number_of_rounds_takes_the_middle_two() {
        let mut results = Vec::new();
        for (round, rps) in [(1, 700.0), (2, 900.0)] {
            for (target, v) in [("passthrough", 1000.0), ("gateway", rps)] {
                let mut r = result(target, Mode::Closed, v, 2.0, 0.2);
                r.round = Some(round);
                results.push(r);
            }
        }
        let t = targets_table(&results).unwrap();
        assert_eq!(t.rows.len(), 1);
        assert_eq!(t.rows[0][3], "median 0.800x (0.700x to 0.900x, 2 rounds)");
        assert_eq!(t.rows[0][4], "MISSED");
    }
}
