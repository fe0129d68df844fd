//! Every input the fuzzers saved (`fuzz/corpus/<target>/`, grown by `scripts/fuzz`) replayed
//! through the same invariant checks, so what fuzzing found stays covered by the main tests.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .collect();
    assert!(!entries.is_empty(), "empty corpus {}", dir.display());
    for entry in entries {
        let data = std::fs::read(entry.path()).expect("corpus entry");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target}: {} breaks an invariant",
            entry.path().display()
        );
    }
}

#[test]
fn scanner_corpus() {
    replay("scanners", neuronetz_gateway::fuzzing::scanners);
}

#[test]
fn usage_strip_corpus() {
    replay("usage_strip", neuronetz_gateway::fuzzing::usage_strip);
}

#[test]
fn path_corpus() {
    replay("paths", neuronetz_gateway::fuzzing::paths);
}

#[test]
fn key_corpus() {
    replay("keys", neuronetz_gateway::fuzzing::keys);
}

#[test]
fn body_corpus() {
    replay("bodies", neuronetz_gateway::fuzzing::bodies);
}
