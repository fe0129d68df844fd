//! Resolved principals, cached per process and in Redis, keyed by a keyed digest of the *full*
//! token (HMAC-SHA256 under `KEY_CACHE_SECRET`), never by prefix: a right prefix with a wrong
//! secret has a different digest and cannot hit. The digest is useless without the secret, so
//! a Redis dump does not reveal keys either.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fred::prelude::{Client, Expiration, KeysInterface, SetsInterface};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::principal::Principal;

pub type TokenDigest = [u8; 32];

/// Local entries above this count are pruned (expired first, then everything): a flood of
/// distinct bad tokens cannot grow memory without bound.
const LOCAL_MAX_ENTRIES: usize = 100_000;

pub struct DigestKey(Hmac<Sha256>);

impl DigestKey {
    pub fn new(secret: &SecretString) -> Self {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
            .unwrap_or_else(|_| unreachable_hmac());
        Self(mac)
    }

    pub fn digest(&self, token: &str) -> TokenDigest {
        let mut mac = self.0.clone();
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

#[cold]
fn unreachable_hmac() -> Hmac<Sha256> {
    // HMAC-SHA256 takes any key length; this only exists to avoid an `expect` on a hot path.
    match Hmac::<Sha256>::new_from_slice(b"neuronetz") {
        Ok(m) => m,
        Err(_) => std::process::abort(),
    }
}

enum Entry {
    Valid {
        principal: Arc<Principal>,
        until: Instant,
    },
    Invalid {
        until: Instant,
    },
}

/// What the local cache knows about a digest.
pub enum LocalHit {
    /// Valid until the instant given.
    Valid(Arc<Principal>, Instant),
    Invalid,
    Miss,
}

pub struct PrincipalCache {
    /// foldhash, not SipHash: a digest is an HMAC the caller cannot aim at a bucket.
    local: RwLock<HashMap<TokenDigest, Entry, foldhash::fast::RandomState>>,
    /// Moves after every write to `local`: the threads' fronts (`front.rs`) drop what they
    /// copied before it.
    version: AtomicU64,
    ttl: Duration,
    negative_ttl: Duration,
    redis: Option<Client>,
    /// Bounds each call on `redis` (the proxy's connection has no timeout of its own).
    redis_timeout: Duration,
    /// Namespace of the Redis keys (`REDIS_KEY_PREFIX`).
    ns: String,
}

impl PrincipalCache {
    pub fn new(
        ttl: Duration,
        negative_ttl: Duration,
        redis: Option<Client>,
        redis_timeout: Duration,
        ns: &str,
    ) -> Self {
        Self {
            local: RwLock::new(HashMap::default()),
            version: AtomicU64::new(0),
            ttl,
            negative_ttl,
            redis,
            redis_timeout,
            ns: ns.to_string(),
        }
    }

    /// The version to read before a lookup whose answer a front will keep.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn local(&self, digest: &TokenDigest) -> LocalHit {
        let now = Instant::now();
        let Ok(map) = self.local.read() else {
            return LocalHit::Miss;
        };
        match map.get(digest) {
            Some(Entry::Valid { principal, until }) if *until > now => {
                LocalHit::Valid(principal.clone(), *until)
            }
            Some(Entry::Invalid { until }) if *until > now => LocalHit::Invalid,
            _ => LocalHit::Miss,
        }
    }

    pub fn remember_valid(&self, digest: TokenDigest, principal: Arc<Principal>) {
        self.insert(
            digest,
            Entry::Valid {
                principal,
                until: Instant::now() + self.ttl,
            },
        );
    }

    pub fn remember_invalid(&self, digest: TokenDigest) {
        if self.negative_ttl.is_zero() {
            return;
        }
        self.insert(
            digest,
            Entry::Invalid {
                until: Instant::now() + self.negative_ttl,
            },
        );
    }

    /// Drops every local entry of one key or tenant (revocation and policy changes), and every
    /// negative entry: a resumed tenant or un-revoked key must not stay refused.
    pub fn evict_where(&self, pred: impl Fn(&Principal) -> bool) {
        if let Ok(mut map) = self.local.write() {
            map.retain(|_, e| match e {
                Entry::Valid { principal, .. } => !pred(principal),
                Entry::Invalid { .. } => false,
            });
        }
        // After the write: a front that read the old version drops its copies.
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    fn insert(&self, digest: TokenDigest, entry: Entry) {
        let Ok(mut map) = self.local.write() else {
            return;
        };
        if map.len() >= LOCAL_MAX_ENTRIES {
            let now = Instant::now();
            map.retain(|_, e| match e {
                Entry::Valid { until, .. } | Entry::Invalid { until } => *until > now,
            });
            if map.len() >= LOCAL_MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(digest, entry);
        drop(map);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// One GET. `Err` means Redis could not answer (down, slow, or garbage in the entry).
    pub async fn redis_get(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<Principal>, fred::error::Error> {
        let Some(redis) = &self.redis else {
            return Ok(None);
        };
        let raw: Option<String> =
            crate::redis_link::bounded(self.redis_timeout, redis.get(self.redis_key(digest)))
                .await?;
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// One pipelined round trip, off the request path (the caller spawns it): the entry, plus
    /// its digest in per-key and per-tenant index sets so a change can find and delete it.
    pub async fn redis_put(
        &self,
        digest: &TokenDigest,
        principal: &Principal,
    ) -> Result<(), fred::error::Error> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let Ok(json) = serde_json::to_string(principal) else {
            return Ok(());
        };
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(60).max(1);
        let member = hex::encode(digest);
        let (by_key, by_tenant) = (
            self.key_index(principal.key_id),
            self.tenant_index(principal.tenant_id),
        );
        let pipe = redis.pipeline();
        pipe.set::<(), _, _>(
            self.redis_key(digest),
            json,
            Some(Expiration::EX(ttl)),
            None,
            false,
        )
        .await?;
        for index in [&by_key, &by_tenant] {
            pipe.sadd::<(), _, _>(index.as_str(), member.as_str())
                .await?;
            // The index outlives its newest entry by a little; stale members point at nothing.
            pipe.expire::<(), _>(index.as_str(), ttl + 5, None).await?;
        }
        crate::redis_link::bounded(self.redis_timeout, pipe.all::<()>()).await
    }

    /// Forgets every cached principal of one key (or, with `key_id = None`, of a whole tenant),
    /// here and, through `redis` (the background connection, alive before any request), in
    /// Redis.
    pub async fn invalidate(
        &self,
        redis: Option<&Client>,
        tenant_id: i64,
        key_id: Option<i64>,
    ) -> Result<(), fred::error::Error> {
        self.evict_where(|p| match key_id {
            Some(k) => p.key_id == k,
            None => p.tenant_id == tenant_id,
        });
        let Some(redis) = redis else {
            return Ok(());
        };
        let index = key_id.map_or_else(|| self.tenant_index(tenant_id), |k| self.key_index(k));
        let members: Vec<String> = redis.smembers(index.as_str()).await?;
        let mut keys: Vec<String> = members
            .iter()
            .map(|m| format!("{}:principal:{m}", self.ns))
            .collect();
        keys.push(index);
        redis.del::<(), _>(keys).await
    }
}

impl PrincipalCache {
    fn key_index(&self, key_id: i64) -> String {
        format!("{}:principal-index:key:{key_id}", self.ns)
    }

    fn tenant_index(&self, tenant_id: i64) -> String {
        format!("{}:principal-index:tenant:{tenant_id}", self.ns)
    }

    fn redis_key(&self, digest: &TokenDigest) -> String {
        format!("{}:principal:{}", self.ns, hex::encode(digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_depend_on_the_whole_token_and_the_secret() {
        let a = DigestKey::new(&SecretString::from("secret-one-0123456789".to_string()));
        let b = DigestKey::new(&SecretString::from("secret-two-0123456789".to_string()));
        let t1 = "nz_AAAAAAAAAsecretsecretsecretsecretsecretse";
        let t2 = "nz_AAAAAAAAAsecretsecretsecretsecretsecretsX";
        assert_ne!(a.digest(t1), a.digest(t2), "same prefix, different secret");
        assert_ne!(a.digest(t1), b.digest(t1), "different cache secret");
        assert_eq!(a.digest(t1), a.digest(t1));
    }
}
