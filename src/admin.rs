//! Operator changes to tenants and keys (the CLI's write side). Every change runs in one
//! transaction together with its `admin_audit` row (who, what, before, after).

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::auth::hasher::KeyHasher;
use crate::auth::key;
use crate::models::ModelName;
use crate::settings::parse_cidr;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    #[error("unknown key prefix `{0}`")]
    UnknownKey(String),
    #[error("a tenant named `{0}` already exists")]
    DuplicateTenant(String),
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("key generation failed: {0}")]
    Key(String),
}

fn invalid(what: &'static str, detail: impl Into<String>) -> AdminError {
    AdminError::Invalid {
        what,
        detail: detail.into(),
    }
}

/// Whose settings a command changes.
#[derive(Debug, Clone)]
pub enum Subject {
    Tenant(String),
    Key(String),
}

#[derive(Debug, Serialize)]
pub struct CreatedKey {
    pub key: String,
    pub prefix: String,
    pub tenant: String,
    pub name: String,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct KeyInfo {
    pub prefix: String,
    pub name: String,
    pub tenant: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked: bool,
    pub status: String,
}

#[derive(Debug, Serialize)]
pub struct TenantInfo {
    pub id: i64,
    pub name: String,
    pub status: String,
}

/// A `set-policy` change: `None` = leave as is, `Some(None)` = clear, `Some(Some(v))` = set.
#[derive(Default)]
pub struct PolicyChange {
    pub allowed_cidrs: Option<Option<Vec<String>>>,
    pub max_num_ctx: Option<Option<i64>>,
    pub max_num_predict: Option<Option<i64>>,
    /// `Some(Some("pass"))` forwards keep_alive as sent; `Some(None)` = clamp (the default).
    pub keep_alive: Option<Option<String>>,
}

impl PolicyChange {
    pub fn is_empty(&self) -> bool {
        self.allowed_cidrs.is_none()
            && self.max_num_ctx.is_none()
            && self.max_num_predict.is_none()
            && self.keep_alive.is_none()
    }
}

/// A `set-limits` change: values given are set, others kept; `clear` unsets all three.
pub struct RateLimitsChange {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
    pub clear: bool,
}

/// A `set-budget` change: values given are set, others kept; `clear` unsets all three.
pub struct BudgetChange {
    pub daily: Option<i64>,
    pub monthly: Option<i64>,
    pub total: Option<i64>,
    pub clear: bool,
}

/// How a model list change is expressed on the command line.
pub enum ModelsChange {
    List(Vec<String>),
    AllowAll(bool),
    /// Back to "inherit" (keys) / "no models" (tenants).
    Clear,
}

pub struct Admin<'a> {
    pub pool: &'a PgPool,
    pub actor: String,
}

impl Admin<'_> {
    async fn audit(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        action: &str,
        target: &str,
        before: Value,
        after: Value,
    ) -> Result<(), AdminError> {
        sqlx::query("INSERT INTO admin_audit (actor, action, target, before, after) VALUES ($1, $2, $3, $4, $5)")
            .bind(&self.actor)
            .bind(action)
            .bind(target)
            .bind(before)
            .bind(after)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub async fn create_tenant(
        &self,
        name: &str,
        allow_all_models: bool,
        models: Option<Vec<String>>,
    ) -> Result<TenantInfo, AdminError> {
        let models = models.map(validate_models).transpose()?;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("INSERT INTO tenants (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id, status")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| AdminError::DuplicateTenant(name.to_string()))?;
        let id: i64 = row.try_get("id")?;
        sqlx::query(
            "INSERT INTO limits (tenant_id, allow_all_models, allowed_models) VALUES ($1, $2, $3)",
        )
        .bind(id)
        .bind(allow_all_models)
        .bind(&models)
        .execute(&mut *tx)
        .await?;
        let after =
            json!({"name": name, "allow_all_models": allow_all_models, "allowed_models": models});
        self.audit(
            &mut tx,
            "create-tenant",
            &format!("tenant:{name}"),
            Value::Null,
            after,
        )
        .await?;
        tx.commit().await?;
        Ok(TenantInfo {
            id,
            name: name.to_string(),
            status: row.try_get("status")?,
        })
    }

    pub async fn set_tenant_status(
        &self,
        name: &str,
        suspended: bool,
    ) -> Result<TenantInfo, AdminError> {
        let status = if suspended { "suspended" } else { "active" };
        let mut tx = self.pool.begin().await?;
        let (id, before) = tenant_row(&mut tx, name).await?;
        sqlx::query("UPDATE tenants SET status = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(status)
            .execute(&mut *tx)
            .await?;
        let action = if suspended {
            "suspend-tenant"
        } else {
            "resume-tenant"
        };
        self.audit(
            &mut tx,
            action,
            &format!("tenant:{name}"),
            json!({"status": before}),
            json!({"status": status}),
        )
        .await?;
        tx.commit().await?;
        Ok(TenantInfo {
            id,
            name: name.to_string(),
            status: status.to_string(),
        })
    }

    pub async fn create_key(
        &self,
        hasher: &KeyHasher,
        tenant: &str,
        name: &str,
        expires_in: Option<std::time::Duration>,
    ) -> Result<CreatedKey, AdminError> {
        let mut tx = self.pool.begin().await?;
        let (tenant_id, _) = tenant_row(&mut tx, tenant).await?;
        let expires_at = expires_in.map(to_deadline).transpose()?;
        let created =
            insert_key(&mut tx, hasher, tenant_id, tenant, name, expires_at, None).await?;
        let after = json!({"prefix": created.prefix, "name": name, "expires_at": expires_at});
        self.audit(
            &mut tx,
            "create-key",
            &format!("tenant:{tenant}"),
            Value::Null,
            after,
        )
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    pub async fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<KeyInfo>, AdminError> {
        let rows = sqlx::query(
            "SELECT k.prefix, k.name, t.name AS tenant, k.created_at, k.expires_at, k.revoked_at, t.status \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             WHERE $1::text IS NULL OR t.name = $1 ORDER BY t.name, k.created_at, k.id",
        )
        .bind(tenant)
        .fetch_all(self.pool)
        .await?;
        if let Some(t) = tenant
            && rows.is_empty()
        {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE name = $1)")
                    .bind(t)
                    .fetch_one(self.pool)
                    .await?;
            if !exists {
                return Err(AdminError::UnknownTenant(t.to_string()));
            }
        }
        let now = Utc::now();
        rows.iter()
            .map(|r| {
                let revoked_at: Option<DateTime<Utc>> = r.try_get("revoked_at")?;
                let expires_at: Option<DateTime<Utc>> = r.try_get("expires_at")?;
                let tenant_status: String = r.try_get("status")?;
                let status = if revoked_at.is_some() {
                    "revoked"
                } else if expires_at.is_some_and(|t| t <= now) {
                    "expired"
                } else if tenant_status != "active" {
                    "tenant_suspended"
                } else {
                    "active"
                };
                Ok(KeyInfo {
                    prefix: r.try_get("prefix")?,
                    name: r.try_get("name")?,
                    tenant: r.try_get("tenant")?,
                    created_at: r.try_get("created_at")?,
                    expires_at,
                    revoked: revoked_at.is_some(),
                    status: status.to_string(),
                })
            })
            .collect()
    }

    pub async fn revoke_key(&self, prefix: &str) -> Result<(), AdminError> {
        let mut tx = self.pool.begin().await?;
        let (key_id, _, _) = key_row(&mut tx, prefix).await?;
        sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()), updated_at = now() WHERE id = $1")
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        self.audit(
            &mut tx,
            "revoke-key",
            &format!("key:{prefix}"),
            json!({"revoked": false}),
            json!({"revoked": true}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Issues a successor (same tenant, name and key-level settings) and lets the old key live
    /// for `grace`, then expire.
    pub async fn rotate_key(
        &self,
        hasher: &KeyHasher,
        prefix: &str,
        grace: std::time::Duration,
    ) -> Result<CreatedKey, AdminError> {
        let mut tx = self.pool.begin().await?;
        let (old_id, tenant_id, name) = key_row(&mut tx, prefix).await?;
        let tenant: String = sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_one(&mut *tx)
            .await?;
        let old_expiry: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT expires_at FROM api_keys WHERE id = $1")
                .bind(old_id)
                .fetch_one(&mut *tx)
                .await?;
        let created = insert_key(
            &mut tx,
            hasher,
            tenant_id,
            &tenant,
            &name,
            old_expiry,
            Some(old_id),
        )
        .await?;
        let new_id: i64 = sqlx::query_scalar("SELECT id FROM api_keys WHERE prefix = $1")
            .bind(&created.prefix)
            .fetch_one(&mut *tx)
            .await?;
        copy_key_settings(&mut tx, tenant_id, old_id, new_id).await?;
        let deadline = to_deadline(grace)?;
        let new_old_expiry = old_expiry.map_or(deadline, |e| e.min(deadline));
        sqlx::query("UPDATE api_keys SET expires_at = $2, updated_at = now() WHERE id = $1")
            .bind(old_id)
            .bind(new_old_expiry)
            .execute(&mut *tx)
            .await?;
        let after = json!({"successor": created.prefix, "old_expires_at": new_old_expiry});
        self.audit(
            &mut tx,
            "rotate-key",
            &format!("key:{prefix}"),
            json!({"expires_at": old_expiry}),
            after,
        )
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    pub async fn set_models(
        &self,
        subject: &Subject,
        change: ModelsChange,
    ) -> Result<(), AdminError> {
        let (column_sql, list, all): (&str, Option<Vec<String>>, Option<bool>) = match change {
            ModelsChange::List(models) => {
                ("allowed_models = $2", Some(validate_models(models)?), None)
            }
            ModelsChange::AllowAll(flag) => ("allow_all_models = $3", None, Some(flag)),
            ModelsChange::Clear => ("allowed_models = NULL, allow_all_models = NULL", None, None),
        };
        let mut tx = self.pool.begin().await?;
        let (limits_id, target) = limits_row(&mut tx, subject).await?;
        let before = snapshot(&mut tx, limits_id, "allowed_models, allow_all_models").await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE limits SET {column_sql}, updated_at = now() WHERE id = $1"
        )))
        .bind(limits_id)
        .bind(&list)
        .bind(all)
        .execute(&mut *tx)
        .await?;
        let after = snapshot(&mut tx, limits_id, "allowed_models, allow_all_models").await?;
        self.audit(&mut tx, "set-models", &target, before, after)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets the given rate limits (others unchanged), or clears all three with `clear`.
    pub async fn set_limits(
        &self,
        subject: &Subject,
        limits: RateLimitsChange,
    ) -> Result<(), AdminError> {
        let cols = "rpm, tpm, max_concurrent";
        let mut tx = self.pool.begin().await?;
        let (limits_id, target) = limits_row(&mut tx, subject).await?;
        let before = snapshot(&mut tx, limits_id, cols).await?;
        let sql = if limits.clear {
            "UPDATE limits SET rpm = NULL, tpm = NULL, max_concurrent = NULL, updated_at = now() WHERE id = $1"
        } else {
            "UPDATE limits SET rpm = COALESCE($2, rpm), tpm = COALESCE($3, tpm), \
             max_concurrent = COALESCE($4, max_concurrent), updated_at = now() WHERE id = $1"
        };
        sqlx::query(sql)
            .bind(limits_id)
            .bind(limits.rpm)
            .bind(limits.tpm)
            .bind(limits.max_concurrent)
            .execute(&mut *tx)
            .await?;
        let after = snapshot(&mut tx, limits_id, cols).await?;
        self.audit(&mut tx, "set-limits", &target, before, after)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_budget(
        &self,
        subject: &Subject,
        change: BudgetChange,
    ) -> Result<(), AdminError> {
        let cols = "budget_daily, budget_monthly, budget_total";
        let mut tx = self.pool.begin().await?;
        let (limits_id, target) = limits_row(&mut tx, subject).await?;
        let before = snapshot(&mut tx, limits_id, cols).await?;
        let sql = if change.clear {
            "UPDATE limits SET budget_daily = NULL, budget_monthly = NULL, budget_total = NULL, \
             updated_at = now() WHERE id = $1"
        } else {
            "UPDATE limits SET budget_daily = COALESCE($2, budget_daily), \
             budget_monthly = COALESCE($3, budget_monthly), budget_total = COALESCE($4, budget_total), \
             updated_at = now() WHERE id = $1"
        };
        sqlx::query(sql)
            .bind(limits_id)
            .bind(change.daily)
            .bind(change.monthly)
            .bind(change.total)
            .execute(&mut *tx)
            .await?;
        let after = snapshot(&mut tx, limits_id, cols).await?;
        self.audit(&mut tx, "set-budget", &target, before, after)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// `Some(true)`/`Some(false)` turns prompt logging on/off, `None` back to inherit (key) or
    /// off (tenant); `ttl_s` sets how long rows are kept (kept as it was when `None`).
    pub async fn set_prompt_logging(
        &self,
        subject: &Subject,
        enabled: Option<bool>,
        ttl_s: Option<i64>,
    ) -> Result<(), AdminError> {
        let cols = "prompt_logging, prompt_log_ttl_s";
        let mut tx = self.pool.begin().await?;
        let (limits_id, target) = limits_row(&mut tx, subject).await?;
        let before = snapshot(&mut tx, limits_id, cols).await?;
        sqlx::query(
            "UPDATE limits SET prompt_logging = $2, \
             prompt_log_ttl_s = COALESCE($3, prompt_log_ttl_s), updated_at = now() WHERE id = $1",
        )
        .bind(limits_id)
        .bind(enabled)
        .bind(ttl_s)
        .execute(&mut *tx)
        .await?;
        let after = snapshot(&mut tx, limits_id, cols).await?;
        self.audit(&mut tx, "set-prompt-logging", &target, before, after)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies the parts of a policy change that are given; the rest stays.
    pub async fn set_policy(
        &self,
        subject: &Subject,
        change: PolicyChange,
    ) -> Result<(), AdminError> {
        let cidrs = match &change.allowed_cidrs {
            Some(Some(list)) => Some(Some(
                list.iter()
                    .map(|c| parse_cidr(c).map(|n| n.trunc().to_string()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid("--allowed-cidrs", e))?,
            )),
            other => other.clone(),
        };
        let cols = "allowed_cidrs::text[] AS allowed_cidrs, max_num_ctx, max_num_predict, keep_alive_policy";
        let mut tx = self.pool.begin().await?;
        let (limits_id, target) = limits_row(&mut tx, subject).await?;
        let before = snapshot(&mut tx, limits_id, cols).await?;
        // Each `$n_set` flag says whether its column changes; `$n` is the new value (NULL clears).
        sqlx::query(
            "UPDATE limits SET \
               allowed_cidrs = CASE WHEN $2 THEN $3::cidr[] ELSE allowed_cidrs END, \
               max_num_ctx = CASE WHEN $4 THEN $5 ELSE max_num_ctx END, \
               max_num_predict = CASE WHEN $6 THEN $7 ELSE max_num_predict END, \
               keep_alive_policy = CASE WHEN $8 THEN $9 ELSE keep_alive_policy END, \
               updated_at = now() WHERE id = $1",
        )
        .bind(limits_id)
        .bind(cidrs.is_some())
        .bind(cidrs.flatten())
        .bind(change.max_num_ctx.is_some())
        .bind(change.max_num_ctx.flatten())
        .bind(change.max_num_predict.is_some())
        .bind(change.max_num_predict.flatten())
        .bind(change.keep_alive.is_some())
        .bind(change.keep_alive.flatten())
        .execute(&mut *tx)
        .await?;
        let after = snapshot(&mut tx, limits_id, cols).await?;
        self.audit(&mut tx, "set-policy", &target, before, after)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

fn validate_models(models: Vec<String>) -> Result<Vec<String>, AdminError> {
    // `--models ""` means an empty list (no models), not a model named "".
    models
        .into_iter()
        .filter(|m| !m.trim().is_empty())
        .map(|m| match ModelName::parse(&m) {
            Some(_) => Ok(m.trim().to_string()),
            None => Err(invalid("model name", m)),
        })
        .collect()
}

fn to_deadline(d: std::time::Duration) -> Result<DateTime<Utc>, AdminError> {
    let d = ChronoDuration::from_std(d).map_err(|_| invalid("duration", "too long"))?;
    Utc::now()
        .checked_add_signed(d)
        .ok_or_else(|| invalid("duration", "too long"))
}

async fn tenant_row(
    tx: &mut Transaction<'_, Postgres>,
    name: &str,
) -> Result<(i64, String), AdminError> {
    let row = sqlx::query("SELECT id, status FROM tenants WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| AdminError::UnknownTenant(name.to_string()))?;
    Ok((row.try_get("id")?, row.try_get("status")?))
}

/// (key id, tenant id, key name)
async fn key_row(
    tx: &mut Transaction<'_, Postgres>,
    prefix: &str,
) -> Result<(i64, i64, String), AdminError> {
    if !key::is_valid_prefix(prefix) {
        return Err(invalid("--prefix", "expected nz_ followed by 9 characters"));
    }
    let row = sqlx::query("SELECT id, tenant_id, name FROM api_keys WHERE prefix = $1")
        .bind(prefix)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| AdminError::UnknownKey(prefix.to_string()))?;
    Ok((
        row.try_get("id")?,
        row.try_get("tenant_id")?,
        row.try_get("name")?,
    ))
}

/// The `limits` row of a tenant or key, created on first use. Returns its id and an audit target.
async fn limits_row(
    tx: &mut Transaction<'_, Postgres>,
    subject: &Subject,
) -> Result<(i64, String), AdminError> {
    let (tenant_id, key_id, target) = match subject {
        Subject::Tenant(name) => (
            tenant_row(tx, name).await?.0,
            None,
            format!("tenant:{name}"),
        ),
        Subject::Key(prefix) => {
            let (key_id, tenant_id, _) = key_row(tx, prefix).await?;
            (tenant_id, Some(key_id), format!("key:{prefix}"))
        }
    };
    let existing: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM limits WHERE tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2",
    )
    .bind(tenant_id)
    .bind(key_id)
    .fetch_optional(&mut **tx)
    .await?;
    let id = match existing {
        Some(id) => id,
        None => {
            sqlx::query_scalar(
                "INSERT INTO limits (tenant_id, key_id) VALUES ($1, $2) RETURNING id",
            )
            .bind(tenant_id)
            .bind(key_id)
            .fetch_one(&mut **tx)
            .await?
        }
    };
    Ok((id, target))
}

async fn snapshot(
    tx: &mut Transaction<'_, Postgres>,
    limits_id: i64,
    columns: &str,
) -> Result<Value, AdminError> {
    let v: Option<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT to_jsonb(s) FROM (SELECT {columns} FROM limits WHERE id = $1) s"
    )))
    .bind(limits_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(v.unwrap_or(Value::Null))
}

async fn insert_key(
    tx: &mut Transaction<'_, Postgres>,
    hasher: &KeyHasher,
    tenant_id: i64,
    tenant: &str,
    name: &str,
    expires_at: Option<DateTime<Utc>>,
    rotated_from: Option<i64>,
) -> Result<CreatedKey, AdminError> {
    let new = key::generate().map_err(|e| AdminError::Key(e.to_string()))?;
    let hash = hasher
        .hash_blocking(key::expose(&new))
        .map_err(|e| AdminError::Key(e.to_string()))?;
    sqlx::query("INSERT INTO api_keys (tenant_id, name, prefix, key_hash, expires_at, rotated_from) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(tenant_id)
        .bind(name)
        .bind(&new.prefix)
        .bind(&hash)
        .bind(expires_at)
        .bind(rotated_from)
        .execute(&mut **tx)
        .await?;
    Ok(CreatedKey {
        key: key::expose(&new).to_string(),
        prefix: new.prefix.clone(),
        tenant: tenant.to_string(),
        name: name.to_string(),
        expires_at,
    })
}

async fn copy_key_settings(
    tx: &mut Transaction<'_, Postgres>,
    tenant_id: i64,
    from: i64,
    to: i64,
) -> Result<(), AdminError> {
    sqlx::query(
        "INSERT INTO limits (tenant_id, key_id, rpm, tpm, max_concurrent, budget_daily, budget_monthly, budget_total, \
            allowed_models, allow_all_models, prompt_logging, prompt_log_ttl_s, allowed_cidrs, max_num_ctx, \
            max_num_predict, keep_alive_policy) \
         SELECT $1, $3, rpm, tpm, max_concurrent, budget_daily, budget_monthly, budget_total, allowed_models, \
            allow_all_models, prompt_logging, prompt_log_ttl_s, allowed_cidrs, max_num_ctx, max_num_predict, \
            keep_alive_policy FROM limits WHERE key_id = $2",
    )
    .bind(tenant_id)
    .bind(from)
    .bind(to)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
