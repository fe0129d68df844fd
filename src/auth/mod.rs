//! Bearer authentication (SPEC §3). The verification path, cheapest first:
//!
//! ```text
//! Authorization → local cache → shape check → Redis cache → [throttle] → Postgres by prefix
//!               → Argon2 verify (blocking pool) → cache the Principal (local + Redis)
//! ```
//!
//! A cached valid key costs one map lookup: no Argon2, no Postgres, no Redis. Every failure is
//! the same 401 to the caller; the reason only reaches the (secret-free) log. When no store can
//! answer for an uncached key the result is 503, never "allow".

pub mod cache;
pub mod change_feed;
pub mod client_ip;
mod front;
pub mod hasher;
pub mod key;
pub mod throttle;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::principal::Principal;
use crate::store::Store;
use cache::{DigestKey, LocalHit, PrincipalCache};
use change_feed::ChangeLog;
use hasher::{HashError, KeyHasher};
use throttle::FailureThrottle;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Missing, malformed, unknown, wrong, revoked, expired or suspended: one answer for all.
    #[error("unauthorized ({0})")]
    Rejected(RejectReason),
    #[error("too many failed attempts from this address")]
    Throttled(Duration),
    /// No store could resolve an uncached key, or the Argon2 pool is full.
    #[error("authentication backend unavailable")]
    Unavailable,
}

/// Why a key was refused; for logs and metrics only, never for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Missing,
    Malformed,
    UnknownOrWrong,
    Revoked,
    Expired,
    Suspended,
    NegativeCached,
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnknownOrWrong => "unknown_or_wrong",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Suspended => "suspended",
            Self::NegativeCached => "recently_failed",
        })
    }
}

pub struct Authenticator {
    digest_key: DigestKey,
    cache: Arc<PrincipalCache>,
    hasher: Arc<KeyHasher>,
    store: Arc<Store>,
    throttle: FailureThrottle,
    changes: Arc<ChangeLog>,
    flights: std::sync::Mutex<
        std::collections::HashMap<cache::TokenDigest, Arc<tokio::sync::Mutex<()>>>,
    >,
    redis_warning: crate::log_throttle::LogEvery,
    /// This authenticator's id in the threads' fronts.
    front_owner: u64,
}

/// Extracts the token from `Authorization: Bearer <token>` (scheme case-insensitive).
pub fn bearer_token(header: Option<&[u8]>) -> Option<&str> {
    let value = std::str::from_utf8(header?).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Authenticator {
    pub fn new(
        digest_key: DigestKey,
        cache: Arc<PrincipalCache>,
        hasher: Arc<KeyHasher>,
        store: Arc<Store>,
        changes: Arc<ChangeLog>,
        failures_per_min: u32,
    ) -> Self {
        Self {
            digest_key,
            cache,
            hasher,
            store,
            throttle: FailureThrottle::new(failures_per_min),
            changes,
            flights: std::sync::Mutex::default(),
            redis_warning: crate::log_throttle::LogEvery::new(std::time::Duration::from_secs(30)),
            front_owner: front::new_owner(),
        }
    }

    pub fn cache(&self) -> &Arc<PrincipalCache> {
        &self.cache
    }

    pub async fn authenticate(
        &self,
        token: Option<&str>,
        ip: Option<IpAddr>,
    ) -> Result<Arc<Principal>, AuthError> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(self.fail(ip, RejectReason::Missing));
        };
        if token.len() > 256 {
            return Err(self.fail(ip, RejectReason::Malformed));
        }
        let digest = self.digest_key.digest(token);
        // Read before the lookups below: what they find current is current at this stamp.
        let stamp = self.stamp();
        let now = std::time::Instant::now();
        if let Some(p) = front::get(stamp, &digest, now) {
            return check_still_valid(p);
        }
        match self.cache.local(&digest) {
            LocalHit::Valid(p, until) if self.is_current(&p) => {
                let p = front::remember(stamp, digest, &p, until).unwrap_or(p);
                return check_still_valid(p);
            }
            LocalHit::Invalid => return Err(self.fail(ip, RejectReason::NegativeCached)),
            LocalHit::Valid(..) | LocalHit::Miss => {}
        }
        if !key::is_well_formed(token) {
            return Err(self.fail(ip, RejectReason::Malformed));
        }
        // Single flight: a client opening many connections with a new key costs one lookup and
        // one Argon2 verification, not one per connection (which would also exhaust the pool).
        let flight = self.flight(digest);
        let result = {
            let _turn = flight.lock().await;
            match self.cache.local(&digest) {
                LocalHit::Valid(p, _) if self.is_current(&p) => check_still_valid(p),
                LocalHit::Invalid => Err(self.fail(ip, RejectReason::NegativeCached)),
                // Boxed: with its Redis and Postgres calls this future is about 10 KB, which
                // every request's future would otherwise carry (allocated and copied each time).
                LocalHit::Valid(..) | LocalHit::Miss => {
                    Box::pin(self.resolve_uncached(token, digest, ip)).await
                }
            }
        };
        self.land(digest, &flight);
        result
    }

    /// The versions a front entry is only good under.
    fn stamp(&self) -> front::Stamp {
        front::Stamp {
            owner: self.front_owner,
            cache: self.cache.version(),
            changes: self.changes.version(),
        }
    }

    fn flight(&self, digest: cache::TokenDigest) -> Arc<tokio::sync::Mutex<()>> {
        match self.flights.lock() {
            Ok(mut m) => m.entry(digest).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Forgets the flight once nobody else waits on it.
    fn land(&self, digest: cache::TokenDigest, flight: &Arc<tokio::sync::Mutex<()>>) {
        if let Ok(mut m) = self.flights.lock()
            && Arc::strong_count(flight) <= 2
        {
            m.remove(&digest);
        }
    }

    /// Redis, then Postgres + Argon2, for a token no local entry answers.
    async fn resolve_uncached(
        &self,
        token: &str,
        digest: cache::TokenDigest,
        ip: Option<IpAddr>,
    ) -> Result<Arc<Principal>, AuthError> {
        match self.cache.redis_get(&digest).await {
            Ok(Some(principal)) if self.is_current(&principal) => {
                let p = Arc::new(principal);
                self.cache.remember_valid(digest, p.clone());
                return check_still_valid(p);
            }
            Ok(_) => {}
            // Postgres can still answer; the outage is logged once per interval, not per request.
            Err(e) => {
                crate::metrics::store_error("redis", "key_cache");
                self.redis_warning.warn(|| tracing::warn!(error = %e, "redis key cache unavailable; resolving keys from postgres"));
            }
        }
        // Only here, after both caches missed, may other clients' failures slow this one down.
        if let Some(retry) = ip.and_then(|ip| self.throttle.blocked(ip)) {
            return Err(AuthError::Throttled(retry));
        }
        // A change applied here that the read did not see (it committed after the read's
        // snapshot) makes what we read suspect: read again.
        for _ in 0..3 {
            let principal = self.resolve_from_store(token, digest, ip).await?;
            if !self.changes.outdates(&principal) {
                let principal = Arc::new(principal);
                self.cache.remember_valid(digest, principal.clone());
                self.spawn_cache_fill(digest, principal.clone());
                return Ok(principal);
            }
        }
        Err(AuthError::Unavailable)
    }

    /// A cached principal is current unless a change to its key or tenant that its read did
    /// not see has been applied.
    fn is_current(&self, p: &Principal) -> bool {
        !self.changes.outdates(p)
    }

    async fn resolve_from_store(
        &self,
        token: &str,
        digest: cache::TokenDigest,
        ip: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        let record = match self.store.key_by_prefix(key::prefix_of(token)).await {
            Ok(r) => r,
            Err(e) => {
                crate::metrics::store_error("postgres", "key_lookup");
                tracing::error!(error = %e, "key lookup failed; refusing (fail closed)");
                return Err(AuthError::Unavailable);
            }
        };
        let stored_hash = record.as_ref().map(|r| r.key_hash.clone());
        let verified = match self.hasher.verify(token.to_string(), stored_hash).await {
            Ok(v) => v,
            Err(HashError::Saturated) => return Err(AuthError::Unavailable),
            Err(e) => {
                tracing::error!(error = %e, "argon2 verification failed");
                return Err(AuthError::Unavailable);
            }
        };
        let Some(record) = record.filter(|_| verified.ok) else {
            self.cache.remember_invalid(digest);
            return Err(self.fail(ip, RejectReason::UnknownOrWrong));
        };
        let reason = if record.revoked_at.is_some_and(|t| t <= Utc::now()) {
            Some(RejectReason::Revoked)
        } else if record.tenant_suspended {
            Some(RejectReason::Suspended)
        } else if record.principal.is_expired(Utc::now()) {
            Some(RejectReason::Expired)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.cache.remember_invalid(digest);
            return Err(self.fail(ip, reason));
        }
        if verified.needs_rehash {
            self.spawn_rehash(token.to_string(), record.principal.key_id);
        }
        Ok(record.principal)
    }

    fn fail(&self, ip: Option<IpAddr>, reason: RejectReason) -> AuthError {
        if let Some(ip) = ip {
            self.throttle.record_failure(ip);
        }
        AuthError::Rejected(reason)
    }

    fn spawn_cache_fill(&self, digest: cache::TokenDigest, principal: Arc<Principal>) {
        if !self.cache.has_redis() {
            return;
        }
        let cache = self.cache.clone();
        tokio::spawn(async move {
            if let Err(e) = cache.redis_put(&digest, &principal).await {
                tracing::debug!(error = %e, "could not fill the redis key cache");
            }
        });
    }

    /// Stores a hash with the configured parameters after a verify on outdated ones.
    fn spawn_rehash(&self, token: String, key_id: i64) {
        let hasher = self.hasher.clone();
        let store = self.store.clone();
        tokio::spawn(async move {
            match hasher.hash(token).await {
                Ok(hash) => {
                    if let Err(e) = store.update_key_hash(key_id, &hash).await {
                        tracing::warn!(key_id, error = %e, "re-hash not stored");
                    } else {
                        tracing::info!(
                            key_id,
                            "key re-hashed with the configured argon2 parameters"
                        );
                    }
                }
                Err(e) => tracing::debug!(key_id, error = %e, "re-hash skipped"),
            }
        });
    }
}

/// A cached principal still expires on time (the cache TTL may outlive `expires_at`).
fn check_still_valid(p: Arc<Principal>) -> Result<Arc<Principal>, AuthError> {
    // Most keys never expire: no clock read for them.
    if p.expires_at.is_some() && p.is_expired(Utc::now()) {
        Err(AuthError::Rejected(RejectReason::Expired))
    } else {
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_extraction() {
        assert_eq!(bearer_token(Some(b"Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some(b"bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(Some(b"Basic abc")), None);
        assert_eq!(bearer_token(Some(b"Bearer")), None);
        assert_eq!(bearer_token(None), None);
        assert_eq!(bearer_token(Some(b"Bearer \xff")), None);
    }
}
