//! Zero-downtime upgrade (SPEC §11, §15): Pingora's graceful upgrade hands the listening sockets
//! from the running gateway to a new process (`serve -u`, then SIGQUIT to the old one) while
//! clients keep sending requests. No request fails, streams in flight on the old process finish,
//! and every request has its audit row (each process spools and drains its own).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http;
use common::{Stack, sql_scalar_i64};

#[test]
fn a_graceful_upgrade_under_load_loses_no_request_and_no_audit_row() {
    let mut s = Stack::start();
    std::thread::sleep(Duration::from_secs(1));
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<Result<u16, String>>>> = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let (addr, key) = (s.gw.addr.clone(), s.key.clone());
            let (stop, results) = (stop.clone(), results.clone());
            std::thread::spawn(move || {
                let auth = format!("Bearer {key}");
                while !stop.load(Ordering::Relaxed) {
                    // Half are streams slow enough to be in flight during the hand-over.
                    let (stream, delay) = if t % 2 == 0 { ("true", "40") } else { ("false", "0") };
                    let body = format!(
                        r#"{{"model":"llama3.2","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
                    );
                    let r = http::try_request(
                        &addr,
                        "POST",
                        "/api/chat",
                        &[
                            ("Authorization", auth.as_str()),
                            ("Content-Type", "application/json"),
                            ("x-sim-delay-ms", delay),
                        ],
                        Some(body.as_bytes()),
                    );
                    let outcome = match r {
                        Ok(r) if r.status == 200 && r.text().contains("\"done\":true") => Ok(200),
                        Ok(r) => Err(format!("{} {}", r.status, r.text())),
                        Err(e) => Err(e.to_string()),
                    };
                    results.lock().expect("lock").push(outcome);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let old = s.gw.pid();
    s.gw.upgrade(Duration::from_secs(20));
    assert_ne!(s.gw.pid(), old);
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let results = results.lock().expect("lock");
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        results.len()
    );
    assert!(results.len() >= 20, "load ran: {} requests", results.len());
    // The new process serves.
    assert_eq!(http::get(&s.gw.addr, "/healthz", &[]).status, 200);
    std::thread::sleep(Duration::from_millis(800));
    let rows = sql_scalar_i64(
        &s.db,
        "SELECT count(*)::bigint FROM audit_log WHERE path = '/api/chat'",
    );
    assert_eq!(
        rows,
        results.len() as i64,
        "one audit row per request, across both processes"
    );
}
