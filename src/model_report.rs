//! `list-models` (SPEC §11): the models the upstreams have (the discovery fetch) and which
//! active tenants may use each, by their tenant-level allow-list (a key can only narrow it).

use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::discovery::{self, DiscoveredModel};
use crate::models::{ModelAccess, ModelName};
use crate::upstream::Upstreams;

#[derive(Debug, Serialize)]
pub struct ModelRow {
    pub name: String,
    /// Served by ollama.com through the upstream: only an explicit list entry allows it.
    pub remote: bool,
    pub tenants: Vec<String>,
}

pub async fn list(pool: &PgPool, upstreams: &Upstreams) -> anyhow::Result<Vec<ModelRow>> {
    let catalog = discovery::fetch(upstreams).await?;
    let tenants = sqlx::query(
        "SELECT t.name, l.allow_all_models, l.allowed_models FROM tenants t \
         LEFT JOIN limits l ON l.tenant_id = t.id AND l.key_id IS NULL \
         WHERE t.status = 'active' ORDER BY t.name",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| {
        let models: Option<Vec<String>> = r.try_get("allowed_models")?;
        Ok((
            r.try_get::<String, _>("name")?,
            ModelAccess::resolve(
                r.try_get("allow_all_models")?,
                models.as_deref(),
                None,
                None,
            ),
        ))
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(catalog
        .models
        .into_iter()
        .map(|DiscoveredModel { name, remote }| {
            let parsed = ModelName::parse(&name).map(|m| if remote { m.into_cloud() } else { m });
            let tenants = tenants
                .iter()
                .filter(|(_, access)| parsed.as_ref().is_some_and(|m| access.permits(m)))
                .map(|(t, _)| t.clone())
                .collect();
            ModelRow {
                name,
                remote,
                tenants,
            }
        })
        .collect())
}

pub fn table(rows: &[ModelRow]) -> String {
    let mut out = format!("{:<40} {:<7} {}\n", "MODEL", "REMOTE", "TENANTS");
    for r in rows {
        out.push_str(&format!(
            "{:<40} {:<7} {}\n",
            r.name,
            if r.remote { "yes" } else { "no" },
            if r.tenants.is_empty() {
                "-".to_string()
            } else {
                r.tenants.join(",")
            }
        ));
    }
    out.trim_end().to_string()
}
