//! `/metrics` on the internal listener counts what was sent, and carries no secret.

mod common;

use common::http;
use common::{Stack, UPSTREAM_TOKEN};

/// The value of one sample line, e.g. `nz_requests_total{route="/api/chat",status="200",surface="native"}`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[test]
fn metrics_match_the_requests_sent_and_hold_no_secret() {
    let s = Stack::start();
    let auth = format!("Bearer {}", s.key);
    let chat = r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hello world"}]}"#;
    for _ in 0..3 {
        assert_eq!(
            http::post_json(
                &s.gw.addr,
                "/api/chat",
                &[("Authorization", auth.as_str())],
                chat
            )
            .status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            http::post_json(
                &s.gw.addr,
                "/v1/chat/completions",
                &[(
                    "Authorization",
                    "Bearer nz_wrongwrongwrongwrongwrongwrongwrongwrong"
                )],
                chat
            )
            .status,
            401
        );
    }
    assert_eq!(http::get(&s.gw.addr, "/nope", &[]).status, 404);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = http::get(&s.gw.metrics_addr, "/metrics", &[]);
    assert_eq!(r.status, 200);
    let text = r.text();
    assert_eq!(
        sample(
            &text,
            "nz_requests_total",
            &[
                ("route", "/api/chat"),
                ("status", "200"),
                ("surface", "native")
            ]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "nz_requests_total",
            &[
                ("route", "/v1/chat/completions"),
                ("status", "401"),
                ("surface", "openai")
            ]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            "nz_requests_total",
            &[("route", "-"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "nz_auth_failures_total", &[("reason", "malformed")]),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            "nz_tokens_total",
            &[("direction", "completion"), ("tenant", "acme")]
        ),
        24.0
    );
    assert_eq!(
        sample(
            &text,
            "nz_tokens_total",
            &[("direction", "prompt"), ("tenant", "acme")]
        ),
        9.0
    );
    assert!(sample(&text, "nz_gateway_overhead_seconds_count", &[]) >= 6.0);
    assert!(
        sample(
            &text,
            "nz_upstream_ttfb_seconds_count",
            &[("route", "/api/chat")]
        ) >= 3.0
    );
    assert_eq!(sample(&text, "nz_inflight_requests", &[]), 0.0);
    for secret in [
        s.key.as_str(),
        &s.key[12..],
        UPSTREAM_TOKEN,
        s.prefix.as_str(),
        "nz_wrong",
    ] {
        assert!(!text.contains(secret), "{secret:?} in /metrics");
    }
    // The public listener does not serve metrics.
    assert_eq!(http::get(&s.gw.addr, "/metrics", &[]).status, 404);
}
