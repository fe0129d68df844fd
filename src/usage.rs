//! `show-usage` (SPEC §11): durable token usage per tenant and key from `budget_usage`, for the
//! current UTC day and month and in total, next to the budget that applies.
//!
//! The figures are what the audit sidecar has written: requests of the last few milliseconds
//! (or of a Postgres outage, until the spool is replayed) are not in them yet, and neither are
//! reservations of requests still running.

use chrono::NaiveDate;
use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::admin::{AdminError, Subject};
use crate::clock::Periods;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeriodFilter {
    Day,
    Month,
    Total,
}

impl PeriodFilter {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(Self::Day),
            "month" => Some(Self::Month),
            "total" => Some(Self::Total),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
            Self::Total => "total",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct UsageRow {
    pub scope: String,
    pub tenant: String,
    pub prefix: Option<String>,
    pub period: String,
    pub period_start: NaiveDate,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// The budget in force for this scope and period (a key's own, else its tenant's).
    pub budget: Option<i64>,
    pub remaining: Option<i64>,
}

pub async fn show(
    pool: &PgPool,
    subject: Option<&Subject>,
    period: Option<PeriodFilter>,
    periods: Periods,
) -> Result<Vec<UsageRow>, AdminError> {
    let (tenant, prefix) = match subject {
        Some(Subject::Tenant(t)) => (Some(t.as_str()), None),
        Some(Subject::Key(p)) => (None, Some(p.as_str())),
        None => (None, None),
    };
    let rows = sqlx::query(
        "WITH subj AS ( \
           SELECT 'tenant' AS scope, t.id AS tenant_id, 0::bigint AS key_id, t.name AS tenant, \
                  NULL::text AS prefix, tl.budget_daily AS bd, tl.budget_monthly AS bm, tl.budget_total AS bt \
           FROM tenants t LEFT JOIN limits tl ON tl.tenant_id = t.id AND tl.key_id IS NULL \
           WHERE ($1::text IS NULL OR t.name = $1) AND $2::text IS NULL \
           UNION ALL \
           SELECT 'key', t.id, k.id, t.name, k.prefix, \
                  COALESCE(kl.budget_daily, tl.budget_daily), COALESCE(kl.budget_monthly, tl.budget_monthly), \
                  COALESCE(kl.budget_total, tl.budget_total) \
           FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
           LEFT JOIN limits tl ON tl.tenant_id = t.id AND tl.key_id IS NULL \
           LEFT JOIN limits kl ON kl.key_id = k.id \
           WHERE ($1::text IS NULL OR t.name = $1) AND ($2::text IS NULL OR k.prefix = $2)), \
         per AS ( \
           SELECT * FROM (VALUES (1, 'day', $3::date), (2, 'month', $4::date), (3, 'total', DATE '1970-01-01')) \
             AS p(ord, period, period_start) \
           WHERE $5::text IS NULL OR p.period = $5) \
         SELECT s.scope, s.tenant, s.prefix, p.period, p.period_start, \
                COALESCE(u.requests, 0) AS requests, COALESCE(u.prompt_tokens, 0) AS prompt_tokens, \
                COALESCE(u.completion_tokens, 0) AS completion_tokens, \
                CASE p.period WHEN 'day' THEN s.bd WHEN 'month' THEN s.bm ELSE s.bt END AS budget \
         FROM subj s CROSS JOIN per p \
         LEFT JOIN budget_usage u ON u.scope = s.scope AND u.tenant_id = s.tenant_id \
           AND u.key_id = s.key_id AND u.period = p.period AND u.period_start = p.period_start \
         ORDER BY s.tenant, s.scope DESC, s.prefix NULLS FIRST, p.ord",
    )
    .bind(tenant)
    .bind(prefix)
    .bind(periods.day)
    .bind(periods.month_start())
    .bind(period.map(PeriodFilter::as_str))
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        check_subject_exists(pool, subject).await?;
    }
    rows.iter()
        .map(|r| {
            let prompt: i64 = r.try_get("prompt_tokens")?;
            let completion: i64 = r.try_get("completion_tokens")?;
            let budget: Option<i64> = r.try_get("budget")?;
            Ok(UsageRow {
                scope: r.try_get("scope")?,
                tenant: r.try_get("tenant")?,
                prefix: r.try_get("prefix")?,
                period: r.try_get("period")?,
                period_start: r.try_get("period_start")?,
                requests: r.try_get("requests")?,
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt + completion,
                budget,
                remaining: budget.map(|b| (b - prompt - completion).max(0)),
            })
        })
        .collect()
}

async fn check_subject_exists(pool: &PgPool, subject: Option<&Subject>) -> Result<(), AdminError> {
    let (sql, name, err): (&str, &str, fn(String) -> AdminError) = match subject {
        Some(Subject::Tenant(t)) => (
            "SELECT EXISTS (SELECT 1 FROM tenants WHERE name = $1)",
            t,
            AdminError::UnknownTenant,
        ),
        Some(Subject::Key(p)) => (
            "SELECT EXISTS (SELECT 1 FROM api_keys WHERE prefix = $1)",
            p,
            AdminError::UnknownKey,
        ),
        None => return Ok(()),
    };
    let exists: bool = sqlx::query_scalar(sql).bind(name).fetch_one(pool).await?;
    if exists {
        Ok(())
    } else {
        Err(err(name.to_string()))
    }
}

/// The human table of `show-usage`.
pub fn table(rows: &[UsageRow]) -> String {
    let mut out = format!(
        "{:<7} {:<20} {:<13} {:<6} {:<11} {:>9} {:>12} {:>12} {:>12} {:>12}\n",
        "SCOPE",
        "TENANT",
        "PREFIX",
        "PERIOD",
        "START",
        "REQUESTS",
        "PROMPT",
        "COMPLETION",
        "BUDGET",
        "REMAINING"
    );
    let dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
    for r in rows {
        out.push_str(&format!(
            "{:<7} {:<20} {:<13} {:<6} {:<11} {:>9} {:>12} {:>12} {:>12} {:>12}\n",
            r.scope,
            r.tenant,
            r.prefix.as_deref().unwrap_or("-"),
            r.period,
            r.period_start,
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            dash(r.budget),
            dash(r.remaining),
        ));
    }
    out.trim_end().to_string()
}
