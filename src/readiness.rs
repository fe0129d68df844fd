//! `/readyz`: 200 when Postgres, Redis (if configured) and at least one Ollama backend answer;
//! otherwise 503 naming what failed. The checks run concurrently with short timeouts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{Client, ClientLike};
use serde::Serialize;

use crate::store::Store;
use crate::upstream::Upstreams;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Readiness {
    store: Arc<Store>,
    redis: Option<Client>,
}

#[derive(Serialize)]
pub struct Report {
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    status: &'static str,
    checks: Checks,
    /// What model discovery last saw: how many models and when.
    #[serde(skip_serializing_if = "Option::is_none")]
    models: Option<ModelsSeen>,
}

#[derive(Serialize)]
struct ModelsSeen {
    count: usize,
    fetched_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Serialize)]
struct Checks {
    postgres: &'static str,
    redis: &'static str,
    ollama: &'static str,
}

impl Report {
    pub fn status(&self) -> u16 {
        if self.error.is_none() { 200 } else { 503 }
    }

    pub fn body(&self) -> Bytes {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from_static(br#"{"error":"not ready"}"#))
    }
}

fn word(ok: bool) -> &'static str {
    if ok { "ok" } else { "down" }
}

impl Readiness {
    pub fn new(store: Arc<Store>, redis: Option<Client>) -> Self {
        Self { store, redis }
    }

    pub async fn check(
        &self,
        upstreams: &Upstreams,
        catalog: Option<Arc<crate::discovery::Catalog>>,
    ) -> Report {
        let pg = async {
            tokio::time::timeout(CHECK_TIMEOUT, self.store.ping())
                .await
                .is_ok_and(|r| r.is_ok())
        };
        let redis = async {
            match &self.redis {
                None => None,
                Some(c) => Some(
                    tokio::time::timeout(CHECK_TIMEOUT, c.ping::<String>(None))
                        .await
                        .is_ok_and(|r| r.is_ok()),
                ),
            }
        };
        let ollama = async {
            for target in upstreams.targets() {
                if let Ok(resp) = upstreams.probe(target, "/api/version", CHECK_TIMEOUT).await
                    && resp.status == 200
                {
                    return true;
                }
            }
            false
        };
        let (pg, redis, ollama) = tokio::join!(pg, redis, ollama);
        let failed: Vec<&str> = [
            ("postgres", Some(pg)),
            ("redis", redis),
            ("ollama", Some(ollama)),
        ]
        .into_iter()
        .filter(|(_, ok)| *ok == Some(false))
        .map(|(name, _)| name)
        .collect();
        Report {
            error: (!failed.is_empty())
                .then(|| format!("not ready: {} unavailable", failed.join(", "))),
            status: if failed.is_empty() {
                "ready"
            } else {
                "unavailable"
            },
            checks: Checks {
                postgres: word(pg),
                redis: redis.map_or("not_configured", word),
                ollama: word(ollama),
            },
            models: catalog.map(|c| ModelsSeen {
                count: c.models.len(),
                fetched_at: c.fetched_at,
            }),
        }
    }
}
