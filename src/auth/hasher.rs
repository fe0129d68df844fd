//! Argon2id hashing of API keys, run on a bounded blocking pool, never on a proxy worker.

use std::sync::Arc;

use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use tokio::sync::Semaphore;

use crate::settings::Argon2Settings;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("invalid Argon2 parameters: {0}")]
    Params(String),
    #[error("hashing failed")]
    Hash,
    /// Every Argon2 slot is busy: the caller answers 503 rather than queueing unboundedly.
    #[error("argon2 pool saturated")]
    Saturated,
    #[error("argon2 task failed")]
    Join,
}

pub struct Verified {
    pub ok: bool,
    /// The stored hash used other parameters than the configured ones.
    pub needs_rehash: bool,
}

pub struct KeyHasher {
    params: Params,
    /// A hash of a random value with the configured parameters: unknown prefixes are verified
    /// against it so they cost the same Argon2 work as known ones (no timing oracle).
    dummy_hash: String,
    slots: Arc<Semaphore>,
}

impl KeyHasher {
    pub fn new(cfg: &Argon2Settings) -> Result<Self, HashError> {
        let params = Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None)
            .map_err(|e| HashError::Params(e.to_string()))?;
        let mut seed = [0u8; 24];
        getrandom::fill(&mut seed).map_err(|_| HashError::Hash)?;
        let dummy_hash = hash_with(&params, &hex::encode(seed))?;
        Ok(Self {
            params,
            dummy_hash,
            slots: Arc::new(Semaphore::new(cfg.max_concurrency)),
        })
    }

    /// Hashes on the current thread (CLI use).
    pub fn hash_blocking(&self, key: &str) -> Result<String, HashError> {
        hash_with(&self.params, key)
    }

    /// Verifies `key` against `stored` (or against the dummy hash when `stored` is `None`, which
    /// then always fails) on the blocking pool.
    pub async fn verify(&self, key: String, stored: Option<String>) -> Result<Verified, HashError> {
        let dummy = self.dummy_hash.clone();
        self.on_pool(move |params| match stored {
            Some(hash) => verify_with(params, &key, &hash),
            None => {
                let _ = verify_with(params, &key, &dummy);
                Verified {
                    ok: false,
                    needs_rehash: false,
                }
            }
        })
        .await
    }

    /// Hashes on the blocking pool (re-hash after a verify on outdated parameters).
    pub async fn hash(&self, key: String) -> Result<String, HashError> {
        self.on_pool(move |params| hash_with(params, &key)).await?
    }

    /// Runs Argon2 work on the blocking pool, holding one of the bounded slots; a full pool is
    /// reported at once (the caller answers 503) instead of queueing.
    async fn on_pool<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Params) -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| HashError::Saturated)?;
        let params = self.params.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&params)
        })
        .await
        .map_err(|_| HashError::Join)
    }
}

fn argon(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

fn hash_with(params: &Params, key: &str) -> Result<String, HashError> {
    argon(params)
        .hash_password(key.as_bytes())
        .map(|h| h.to_string())
        .map_err(|_| HashError::Hash)
}

fn verify_with(params: &Params, key: &str, stored: &str) -> Verified {
    let Ok(parsed) = PasswordHash::new(stored) else {
        return Verified {
            ok: false,
            needs_rehash: false,
        };
    };
    // Verify with the parameters recorded in the hash itself, then compare them to the
    // configured ones to decide whether to upgrade.
    let ok = Argon2::default()
        .verify_password(key.as_bytes(), &parsed)
        .is_ok();
    let needs_rehash = ok && !same_params(params, &parsed);
    Verified { ok, needs_rehash }
}

fn same_params(configured: &Params, hash: &PasswordHash) -> bool {
    let algorithm_ok = hash.algorithm.as_str() == "argon2id";
    let version_ok = hash.version == Some(0x13);
    match Params::try_from(hash) {
        Ok(p) => {
            algorithm_ok
                && version_ok
                && p.m_cost() == configured.m_cost()
                && p.t_cost() == configured.t_cost()
                && p.p_cost() == configured.p_cost()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(m: u32, t: u32) -> Argon2Settings {
        Argon2Settings {
            memory_kib: m,
            iterations: t,
            parallelism: 1,
            max_concurrency: 2,
        }
    }

    #[tokio::test]
    async fn verify_roundtrip_and_rehash_detection() {
        let old = KeyHasher::new(&cfg(64, 1)).unwrap();
        let new = KeyHasher::new(&cfg(128, 2)).unwrap();
        let hash = old.hash_blocking("nz_secret").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"));
        let v = old
            .verify("nz_secret".into(), Some(hash.clone()))
            .await
            .unwrap();
        assert!(v.ok && !v.needs_rehash);
        let v = new
            .verify("nz_secret".into(), Some(hash.clone()))
            .await
            .unwrap();
        assert!(v.ok && v.needs_rehash, "outdated parameters are upgraded");
        let v = new.verify("nz_wrong".into(), Some(hash)).await.unwrap();
        assert!(!v.ok && !v.needs_rehash);
        let v = new.verify("nz_secret".into(), None).await.unwrap();
        assert!(!v.ok, "the dummy hash never verifies");
        let v = new
            .verify("x".into(), Some("not a phc string".into()))
            .await
            .unwrap();
        assert!(!v.ok);
    }

    #[tokio::test]
    async fn a_full_pool_is_reported_not_queued() {
        let h = KeyHasher::new(&Argon2Settings {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
            max_concurrency: 1,
        })
        .unwrap();
        let _held = h.slots.clone().try_acquire_owned().unwrap();
        assert!(matches!(
            h.verify("k".into(), None).await,
            Err(HashError::Saturated)
        ));
    }
}
