//! Postgres: the durable home of tenants, keys and settings. On the request path the gateway
//! only ever *reads* here, and only on a key-cache miss (one join query by prefix).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Row};
use tokio::sync::OnceCell;

use crate::principal::{Principal, PrincipalIds, SubjectSettings};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error. The message is sqlx's,
    /// which never includes the password of the connection URL.
    #[error("database unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    #[error("invalid DATABASE_URL: {0}")]
    BadUrl(String),
    #[error(
        "this database holds the earlier Python service's schema (table alembic_version); \
         neuronetz-gateway will not mix schemas. Point DATABASE_URL at a new database and \
         move tenants and keys over (see docs/operations.md, \"Migrating from the earlier service\")"
    )]
    EarlierServiceSchema,
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

/// The columns of `limits` that make up [`SubjectSettings`], in one place so the select list and
/// the decoder cannot drift apart. CIDRs are read as text (validated by the `cidr[]` column).
const SETTING_COLUMNS: &[&str] = &[
    "rpm",
    "tpm",
    "max_concurrent",
    "budget_daily",
    "budget_monthly",
    "budget_total",
    "allowed_models",
    "allow_all_models",
    "prompt_logging",
    "prompt_log_ttl_s",
    "allowed_cidrs",
    "max_num_ctx",
    "max_num_predict",
    "keep_alive_policy",
];

/// Everything auth needs about one key, from one query.
pub struct KeyRecord {
    pub key_hash: String,
    pub revoked_at: Option<DateTime<Utc>>,
    pub tenant_suspended: bool,
    pub principal: Principal,
}

pub fn connect_options(url: &SecretString) -> Result<PgConnectOptions, StoreError> {
    let opts = PgConnectOptions::from_str(url.expose_secret())
        .map_err(|_| StoreError::BadUrl("not a postgres:// URL".into()))?;
    // Statement logging would print SQL at info for every query; keep it for slow ones only.
    Ok(opts
        .log_statements(log::LevelFilter::Debug)
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(1)))
}

/// A pool created on first use, so its connections belong to the runtime that uses them
/// (Pingora runs each service on its own Tokio runtime).
pub struct Store {
    options: PgConnectOptions,
    max_connections: u32,
    /// sqlx's ping of a pooled connection before handing it out: a round trip per use.
    ping_before_use: bool,
    pool: OnceCell<PgPool>,
}

impl Store {
    pub fn new(url: &SecretString, max_connections: u32) -> Result<Self, StoreError> {
        Ok(Self {
            options: connect_options(url)?,
            max_connections,
            ping_before_use: true,
            pool: OnceCell::new(),
        })
    }

    /// A pool for a background service that retries what fails (the audit writer, the change
    /// follower): no ping before each use, since a dead connection costs it one failed
    /// attempt, while the ping costs a round trip on every batch.
    pub fn for_background(url: &SecretString, max_connections: u32) -> Result<Self, StoreError> {
        Ok(Self {
            ping_before_use: false,
            ..Self::new(url, max_connections)?
        })
    }

    pub async fn pool(&self) -> &PgPool {
        self.pool
            .get_or_init(|| async {
                PgPoolOptions::new()
                    .max_connections(self.max_connections)
                    // Fail fast: a request waiting on a dead database answers 503 quickly.
                    .acquire_timeout(Duration::from_secs(2))
                    .test_before_acquire(self.ping_before_use)
                    .connect_lazy_with(self.options.clone())
            })
            .await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.pool().await).await?;
        Ok(())
    }

    pub async fn key_by_prefix(&self, prefix: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(key_lookup_sql()))
            .bind(prefix)
            .fetch_optional(self.pool().await)
            .await?;
        row.map(|r| decode_key_record(&r)).transpose()
    }

    pub async fn update_key_hash(&self, key_id: i64, hash: &str) -> Result<(), StoreError> {
        // Same key, new parameters: not a change for anyone's cache, so the change-feed trigger
        // is told to skip this transaction (a re-key from the console is still fed).
        let mut tx = self.pool().await.begin().await?;
        sqlx::query("SET LOCAL nz.internal_rehash = 'on'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE api_keys SET key_hash = $2 WHERE id = $1")
            .bind(key_id)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Opens a pool right away (CLI, migrations), on the current runtime.
pub async fn connect_now(url: &SecretString) -> Result<PgPool, StoreError> {
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(connect_options(url)?)
        .await?)
}

/// Applies pending migrations, refusing a database that holds the earlier service's schema.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let earlier: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public.alembic_version')::text")
            .fetch_one(pool)
            .await?;
    if earlier.is_some() {
        return Err(StoreError::EarlierServiceSchema);
    }
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

fn settings_select(alias: &str, prefix: &str) -> String {
    SETTING_COLUMNS
        .iter()
        .map(|c| {
            if *c == "allowed_cidrs" {
                format!("{alias}.{c}::text[] AS {prefix}{c}")
            } else {
                format!("{alias}.{c} AS {prefix}{c}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_lookup_sql() -> String {
    format!(
        "SELECT k.id AS key_id, k.prefix, k.name AS key_name, k.key_hash, k.expires_at, k.revoked_at, \
                t.id AS tenant_id, t.name AS tenant_name, t.status AS tenant_status, {}, {}, \
                (SELECT COALESCE(max(id), 0) FROM revocations) AS feed_high, \
                pg_current_snapshot()::text AS snap \
         FROM api_keys k \
         JOIN tenants t ON t.id = k.tenant_id \
         LEFT JOIN limits tl ON tl.tenant_id = t.id AND tl.key_id IS NULL \
         LEFT JOIN limits kl ON kl.key_id = k.id \
         WHERE k.prefix = $1",
        settings_select("tl", "t_"),
        settings_select("kl", "k_")
    )
}

pub fn decode_settings(row: &PgRow, prefix: &str) -> Result<SubjectSettings, sqlx::Error> {
    let col = |c: &str| format!("{prefix}{c}");
    Ok(SubjectSettings {
        rpm: row.try_get(col("rpm").as_str())?,
        tpm: row.try_get(col("tpm").as_str())?,
        max_concurrent: row.try_get(col("max_concurrent").as_str())?,
        budget_daily: row.try_get(col("budget_daily").as_str())?,
        budget_monthly: row.try_get(col("budget_monthly").as_str())?,
        budget_total: row.try_get(col("budget_total").as_str())?,
        allowed_models: row.try_get(col("allowed_models").as_str())?,
        allow_all_models: row.try_get(col("allow_all_models").as_str())?,
        prompt_logging: row.try_get(col("prompt_logging").as_str())?,
        prompt_log_ttl_s: row.try_get(col("prompt_log_ttl_s").as_str())?,
        allowed_cidrs: row.try_get(col("allowed_cidrs").as_str())?,
        max_num_ctx: row.try_get(col("max_num_ctx").as_str())?,
        max_num_predict: row.try_get(col("max_num_predict").as_str())?,
        keep_alive_policy: row.try_get(col("keep_alive_policy").as_str())?,
    })
}

fn decode_key_record(row: &PgRow) -> Result<KeyRecord, StoreError> {
    let tenant = decode_settings(row, "t_")?;
    let key = decode_settings(row, "k_")?;
    let ids = PrincipalIds {
        tenant_id: row.try_get("tenant_id")?,
        tenant_name: row.try_get("tenant_name")?,
        key_id: row.try_get("key_id")?,
        key_prefix: row.try_get("prefix")?,
        key_name: row.try_get("key_name")?,
    };
    let status: String = row.try_get("tenant_status")?;
    let revoked_at: Option<DateTime<Utc>> = row.try_get("revoked_at")?;
    let feed_high: i64 = row.try_get("feed_high")?;
    let expires_at: Option<DateTime<Utc>> = row.try_get("expires_at")?;
    // A revocation scheduled for later is an expiry as far as a cached key is concerned.
    let ends_at = match (expires_at, revoked_at) {
        (Some(e), Some(r)) => Some(e.min(r)),
        (e, r) => e.or(r),
    };
    Ok(KeyRecord {
        key_hash: row.try_get("key_hash")?,
        revoked_at,
        tenant_suspended: status != "active",
        principal: Principal {
            // Every change up to here was visible to this read.
            feed_seq: feed_high,
            snapshot: row
                .try_get::<String, _>("snap")
                .ok()
                .and_then(|s| crate::principal::ReadSnapshot::parse(&s)),
            ..Principal::flatten(ids, ends_at, &tenant, &key)
        },
    })
}
