//! Model discovery (SPEC §11): the gateway polls the upstream's `/api/tags`; `/readyz`, the
//! metrics and `list-models` show what it found, and a local alias of a cloud model (listed
//! with a `remote_host`) is treated as a cloud model: `allow_all_models` does not cover it.

mod common;

use std::time::Duration;

use common::http;
use common::{Gateway, Sim, UPSTREAM_TOKEN, fresh_database};

const MODELS: &str = "llama3.2:latest,mybig:latest@gpt-oss:120b-cloud,nomic-embed-text:latest";

fn chat(addr: &str, key: &str, model: &str) -> u16 {
    let auth = format!("Bearer {key}");
    http::post_json(
        addr,
        "/api/chat",
        &[("Authorization", auth.as_str())],
        &format!(
            r#"{{"model":"{model}","stream":false,"messages":[{{"role":"user","content":"hi"}}]}}"#
        ),
    )
    .status
}

fn metric(addr: &str, name: &str) -> Option<f64> {
    let text = http::get(addr, "/metrics", &[]).text();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn discovered_models_feed_readyz_metrics_list_models_and_cloud_detection() {
    let db = fresh_database();
    let mut sim = Some(Sim::start(&[
        "--require-token",
        UPSTREAM_TOKEN,
        "--models",
        MODELS,
    ]));
    let sim_url = sim.as_ref().map(Sim::url).unwrap_or_default();
    let g = Gateway::start(&[
        ("DATABASE_URL", db.as_str()),
        ("OLLAMA_URL", sim_url.as_str()),
        ("OLLAMA_AUTH_TOKEN", UPSTREAM_TOKEN),
        ("DISCOVERY_INTERVAL", "200ms"),
    ]);
    g.cli(&["create-tenant", "--name", "all", "--allow-all-models"]);
    g.cli(&[
        "create-tenant",
        "--name",
        "listed",
        "--models",
        "llama3.2,mybig",
    ]);
    let (all, _) = g.create_key("all", "k", &[]);
    let (listed, _) = g.create_key("listed", "k", &[]);
    std::thread::sleep(Duration::from_millis(600));

    // `mybig` is a local name for a cloud model: allow-all does not reach it, a list entry does.
    assert_eq!(chat(&g.addr, &all, "llama3.2"), 200);
    assert_eq!(chat(&g.addr, &all, "mybig"), 403);
    assert_eq!(chat(&g.addr, &listed, "mybig"), 200);
    let auth = format!("Bearer {all}");
    let tags = http::get(&g.addr, "/api/tags", &[("Authorization", auth.as_str())]).json();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["llama3.2:latest", "nomic-embed-text:latest"]);

    let ready = http::get(&g.addr, "/readyz", &[]);
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["models"]["count"], 3, "{}", ready.text());
    assert_eq!(metric(&g.metrics_addr, "nz_upstream_models"), Some(3.0));
    assert_eq!(metric(&g.metrics_addr, "nz_upstream_up"), Some(1.0));

    let listing: serde_json::Value =
        serde_json::from_str(g.cli(&["list-models", "--json"]).trim()).expect("list-models json");
    let row = |name: &str| {
        listing
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in {listing}"))
    };
    assert_eq!(row("mybig:latest")["remote"], true);
    assert_eq!(
        row("mybig:latest")["tenants"],
        serde_json::json!(["listed"])
    );
    assert_eq!(
        row("llama3.2:latest")["tenants"],
        serde_json::json!(["all", "listed"])
    );
    assert_eq!(
        row("nomic-embed-text:latest")["tenants"],
        serde_json::json!(["all"])
    );
    assert!(g.cli(&["list-models"]).contains("mybig:latest"));

    // The upstream goes away: the metric says so at the next poll.
    sim = None;
    drop(sim);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(metric(&g.metrics_addr, "nz_upstream_up"), Some(0.0));
}
