//! The authenticated caller: a key, its tenant, and the effective settings flattened once from
//! the tenant's and the key's rows (SPEC §4). Cached in-process and in Redis as JSON.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::models::ModelAccess;

/// The settings a tenant and a key can each carry; `None` = unset (inherit / unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectSettings {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
    pub budget_daily: Option<i64>,
    pub budget_monthly: Option<i64>,
    pub budget_total: Option<i64>,
    pub allowed_models: Option<Vec<String>>,
    pub allow_all_models: Option<bool>,
    pub prompt_logging: Option<bool>,
    pub prompt_log_ttl_s: Option<i64>,
    pub allowed_cidrs: Option<Vec<String>>,
    pub max_num_ctx: Option<i64>,
    pub max_num_predict: Option<i64>,
    pub keep_alive_policy: Option<String>,
}

/// Numeric limits of one scope (key or tenant); `None` = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeLimits {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
    pub budget_daily: Option<i64>,
    pub budget_monthly: Option<i64>,
    pub budget_total: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub tenant_id: i64,
    pub tenant_name: String,
    pub key_id: i64,
    pub key_prefix: String,
    pub key_name: String,
    pub expires_at: Option<DateTime<Utc>>,
    /// Key limits: the key's own value where set, else the tenant's.
    pub key_limits: ScopeLimits,
    /// Tenant limits, counted over all of the tenant's keys.
    pub tenant_limits: ScopeLimits,
    pub models: ModelAccess,
    /// Both lists must admit the client IP (restrictions only narrow); `None` = no restriction.
    pub tenant_cidrs: Option<Vec<IpNet>>,
    pub key_cidrs: Option<Vec<IpNet>>,
    pub prompt_logging: bool,
    pub prompt_log_ttl_s: Option<i64>,
    pub max_num_ctx: Option<i64>,
    pub max_num_predict: Option<i64>,
    pub keep_alive_policy: Option<String>,
    /// The change-feed position when this was read from Postgres: a cached copy is stale once
    /// a later change to its key or tenant has been applied.
    #[serde(default)]
    pub feed_seq: i64,
    /// The Postgres snapshot this was read in: a change is known to be reflected here exactly
    /// when the snapshot sees the change's transaction.
    #[serde(default)]
    pub snapshot: Option<ReadSnapshot>,
}

/// `pg_current_snapshot()`: transactions below `xmin` are visible, those from `xmax` on are
/// not, and in between all but the ones in progress (`xip`) are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadSnapshot {
    pub xmin: i64,
    pub xmax: i64,
    pub xip: Vec<i64>,
}

impl ReadSnapshot {
    /// Parses Postgres' text form `xmin:xmax:xip,xip,...`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<i64>>>()?,
        };
        Some(Self { xmin, xmax, xip })
    }

    pub fn sees(&self, xid: i64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

impl Principal {
    pub fn flatten(
        ids: PrincipalIds,
        expires_at: Option<DateTime<Utc>>,
        tenant: &SubjectSettings,
        key: &SubjectSettings,
    ) -> Self {
        let pick = |k: Option<i64>, t: Option<i64>| k.or(t);
        Self {
            tenant_id: ids.tenant_id,
            tenant_name: ids.tenant_name,
            key_id: ids.key_id,
            key_prefix: ids.key_prefix,
            key_name: ids.key_name,
            expires_at,
            key_limits: ScopeLimits {
                rpm: pick(key.rpm, tenant.rpm),
                tpm: pick(key.tpm, tenant.tpm),
                max_concurrent: pick(key.max_concurrent, tenant.max_concurrent),
                budget_daily: pick(key.budget_daily, tenant.budget_daily),
                budget_monthly: pick(key.budget_monthly, tenant.budget_monthly),
                budget_total: pick(key.budget_total, tenant.budget_total),
            },
            tenant_limits: ScopeLimits {
                rpm: tenant.rpm,
                tpm: tenant.tpm,
                max_concurrent: tenant.max_concurrent,
                budget_daily: tenant.budget_daily,
                budget_monthly: tenant.budget_monthly,
                budget_total: tenant.budget_total,
            },
            models: ModelAccess::resolve(
                tenant.allow_all_models,
                tenant.allowed_models.as_deref(),
                key.allow_all_models,
                key.allowed_models.as_deref(),
            ),
            tenant_cidrs: parse_cidrs(tenant.allowed_cidrs.as_deref()),
            key_cidrs: parse_cidrs(key.allowed_cidrs.as_deref()),
            prompt_logging: key
                .prompt_logging
                .or(tenant.prompt_logging)
                .unwrap_or(false),
            prompt_log_ttl_s: pick(key.prompt_log_ttl_s, tenant.prompt_log_ttl_s),
            max_num_ctx: min_set(key.max_num_ctx, tenant.max_num_ctx),
            max_num_predict: min_set(key.max_num_predict, tenant.max_num_predict),
            keep_alive_policy: key
                .keep_alive_policy
                .clone()
                .or_else(|| tenant.keep_alive_policy.clone()),
            feed_seq: 0,
            snapshot: None,
        }
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Source restriction: the IP must be inside both lists where they are set.
    pub fn admits_ip(&self, ip: Option<IpAddr>) -> bool {
        let inside = |list: &Option<Vec<IpNet>>| match (list, ip) {
            (None, _) => true,
            (Some(nets), Some(ip)) => nets.iter().any(|n| n.contains(&ip)),
            (Some(_), None) => false,
        };
        inside(&self.tenant_cidrs) && inside(&self.key_cidrs)
    }
}

pub struct PrincipalIds {
    pub tenant_id: i64,
    pub tenant_name: String,
    pub key_id: i64,
    pub key_prefix: String,
    pub key_name: String,
}

/// Clamps only narrow: a key cannot raise its tenant's clamp.
fn min_set(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// Stored CIDRs were validated on write (the column type is `cidr[]`); anything unparseable is
/// dropped from a list, which can only make the list stricter.
fn parse_cidrs(list: Option<&[String]>) -> Option<Vec<IpNet>> {
    list.map(|items| items.iter().filter_map(|s| s.parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PrincipalIds {
        PrincipalIds {
            tenant_id: 1,
            tenant_name: "t".into(),
            key_id: 2,
            key_prefix: "nz_abcdefghi".into(),
            key_name: "k".into(),
        }
    }

    #[test]
    fn snapshots_see_what_committed_before_them() {
        let s = ReadSnapshot::parse("100:110:103,107").unwrap();
        assert!(s.sees(99));
        assert!(s.sees(104));
        assert!(!s.sees(103), "in progress when read");
        assert!(!s.sees(110), "started after the read");
        assert_eq!(ReadSnapshot::parse("5:5:").unwrap().xip, Vec::<i64>::new());
        assert!(ReadSnapshot::parse("x:1:").is_none());
    }

    #[test]
    fn key_values_override_tenant_values() {
        let tenant = SubjectSettings {
            rpm: Some(100),
            tpm: Some(5000),
            ..Default::default()
        };
        let key = SubjectSettings {
            rpm: Some(10),
            ..Default::default()
        };
        let p = Principal::flatten(ids(), None, &tenant, &key);
        assert_eq!(p.key_limits.rpm, Some(10));
        assert_eq!(p.key_limits.tpm, Some(5000));
        assert_eq!(p.tenant_limits.rpm, Some(100));
        assert_eq!(p.key_limits.max_concurrent, None);
    }

    #[test]
    fn cidrs_must_match_both_lists() {
        let tenant = SubjectSettings {
            allowed_cidrs: Some(vec!["10.0.0.0/8".into()]),
            ..Default::default()
        };
        let key = SubjectSettings {
            allowed_cidrs: Some(vec!["10.1.0.0/16".into()]),
            ..Default::default()
        };
        let p = Principal::flatten(ids(), None, &tenant, &key);
        assert!(p.admits_ip(Some("10.1.2.3".parse().unwrap())));
        assert!(!p.admits_ip(Some("10.2.0.1".parse().unwrap())));
        assert!(!p.admits_ip(None));
        let open = Principal::flatten(
            ids(),
            None,
            &SubjectSettings::default(),
            &SubjectSettings::default(),
        );
        assert!(open.admits_ip(None));
        let none = Principal::flatten(
            ids(),
            None,
            &SubjectSettings {
                allowed_cidrs: Some(vec![]),
                ..Default::default()
            },
            &SubjectSettings::default(),
        );
        assert!(
            !none.admits_ip(Some("127.0.0.1".parse().unwrap())),
            "[] admits nobody"
        );
    }
}
