//! Model discovery (SPEC §11): a background service polls every upstream's `/api/tags` and keeps
//! the union of the models they have. It feeds `/readyz` (how many models, how fresh), the
//! `nz_upstream_models` / `nz_upstream_up` metrics, and cloud detection: a model Ollama lists
//! with a `remote_host` (a local alias made with `ollama cp` of a cloud model) is a cloud model
//! whatever its name, so `allow_all_models` does not cover it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use serde_json::Value;

use crate::models::ModelName;
use crate::upstream::Upstreams;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The `X-Request-ID` of discovery polls, so they are told apart from client traffic upstream.
pub const DISCOVERY_REQUEST_ID: &str = "nz-discovery";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiscoveredModel {
    pub name: String,
    /// Served by ollama.com through the upstream (`remote_host` set), not by local weights.
    pub remote: bool,
}

/// What the last successful poll found.
#[derive(Debug, Clone, Serialize)]
pub struct Catalog {
    pub models: Vec<DiscoveredModel>,
    pub fetched_at: DateTime<Utc>,
}

/// Canonical names of remote models. Names are hashed only to be looked up (the set is built
/// from the upstream's listing), so a fast hash is safe.
type RemoteSet = std::collections::HashSet<String, foldhash::fast::RandomState>;

#[derive(Default)]
pub struct Discovery {
    current: RwLock<Option<Arc<Catalog>>>,
    /// Read by every model request: swapped whole by the poller, read without a lock (a
    /// lock's counter would be written by every worker thread in turn).
    remote: ArcSwap<RemoteSet>,
}

impl Discovery {
    pub fn current(&self) -> Option<Arc<Catalog>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    /// A model the upstream serves from ollama.com, whatever its name says.
    pub fn is_remote(&self, model: &ModelName) -> bool {
        let remote = self.remote.load();
        !remote.is_empty() && remote.contains(model.as_str())
    }

    fn replace(&self, catalog: Catalog) {
        let remote: RemoteSet = catalog
            .models
            .iter()
            .filter(|m| m.remote)
            .filter_map(|m| ModelName::parse(&m.name))
            .map(ModelName::into_string)
            .collect();
        self.remote.store(Arc::new(remote));
        if let Ok(mut c) = self.current.write() {
            *c = Some(Arc::new(catalog));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("no upstream answered /api/tags")]
    NoUpstream,
}

/// The union of every answering upstream's `/api/tags`, sorted by name.
pub async fn fetch(upstreams: &Upstreams) -> Result<Catalog, DiscoveryError> {
    let mut found: BTreeMap<String, bool> = BTreeMap::new();
    let mut answered = false;
    for target in upstreams.targets() {
        let Ok(resp) = upstreams
            .probe_as(target, "/api/tags", FETCH_TIMEOUT, DISCOVERY_REQUEST_ID)
            .await
        else {
            continue;
        };
        if resp.status != 200 {
            continue;
        }
        let Some(models) = parse_tags(&resp.body) else {
            continue;
        };
        answered = true;
        for m in models {
            *found.entry(m.name).or_default() |= m.remote;
        }
    }
    if !answered {
        return Err(DiscoveryError::NoUpstream);
    }
    Ok(Catalog {
        models: found
            .into_iter()
            .map(|(name, remote)| DiscoveredModel { name, remote })
            .collect(),
        fetched_at: Utc::now(),
    })
}

/// `{"models": [{"name", "model", "remote_host"?, "remote_model"?}, ...]}`.
pub fn parse_tags(body: &[u8]) -> Option<Vec<DiscoveredModel>> {
    let doc: Value = serde_json::from_slice(body).ok()?;
    let items = match doc.get("models")? {
        Value::Array(items) => items.as_slice(),
        Value::Null => &[],
        _ => return None,
    };
    Some(
        items
            .iter()
            .filter_map(|m| {
                let name = m
                    .get("name")
                    .or_else(|| m.get("model"))
                    .and_then(Value::as_str)?;
                Some(DiscoveredModel {
                    name: name.to_string(),
                    remote: is_remote_entry(m),
                })
            })
            .collect(),
    )
}

/// A listing entry Ollama serves from a remote host.
pub fn is_remote_entry(entry: &Value) -> bool {
    ["remote_host", "remote_model"].iter().any(|k| {
        entry
            .get(*k)
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty())
    })
}

/// Polls the upstreams while the server runs.
pub struct DiscoveryPoller {
    pub upstreams: Upstreams,
    pub discovery: Arc<Discovery>,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for DiscoveryPoller {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.interval);
        let warning = crate::log_throttle::LogEvery::new(Duration::from_secs(300));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.upstreams.resolve().await;
            match fetch(&self.upstreams).await {
                Ok(catalog) => {
                    crate::metrics::UPSTREAM_UP.set(1);
                    crate::metrics::UPSTREAM_MODELS.set(catalog.models.len() as i64);
                    self.discovery.replace(catalog);
                }
                Err(e) => {
                    crate::metrics::UPSTREAM_UP.set(0);
                    warning.warn(|| tracing::warn!(error = %e, "model discovery failed"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_with_remote_hosts_are_cloud_models() {
        let body = br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"},
            {"name":"mybig:latest","model":"mybig:latest","remote_model":"gpt-oss:120b","remote_host":"https://ollama.com:443"}]}"#;
        let models = parse_tags(body).unwrap();
        assert_eq!(
            models,
            vec![
                DiscoveredModel {
                    name: "llama3.2:latest".into(),
                    remote: false
                },
                DiscoveredModel {
                    name: "mybig:latest".into(),
                    remote: true
                },
            ]
        );
        let d = Discovery::default();
        d.replace(Catalog {
            models,
            fetched_at: Utc::now(),
        });
        assert!(d.is_remote(&ModelName::parse("mybig").unwrap()));
        assert!(!d.is_remote(&ModelName::parse("llama3.2").unwrap()));
        assert_eq!(parse_tags(br#"{"models":null}"#), Some(vec![]));
        assert_eq!(parse_tags(b"nope"), None);
    }
}
