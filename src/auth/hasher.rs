//! Argon2id hashing of API keys, run on a bounded blocking pool, never on a proxy worker.
//!
//! A verification needs `ARGON2_MEMORY_KIB` of working memory (19 MiB by default). Allocated
//! per call, glibc keeps each freed block for reuse in the arena of the blocking thread that
//! used it, so the resident size grew by that much for every thread a verification had run on
//! (BENCHMARKS.md, round 6). Verifications therefore run in memory taken from a small pool, at
//! most one block set per concurrent verification (`ARGON2_MAX_CONCURRENCY`), zeroed after use.

use std::sync::{Arc, Mutex, PoisonError};

use argon2::password_hash::phc::{Output, PasswordHash};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHasher, Version};
use tokio::sync::Semaphore;

use crate::settings::{Argon2Settings, MAX_ARGON2_MEMORY_KIB};

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
    /// Working memory of finished verifications, for the next ones.
    memory: Arc<MemoryPool>,
}

/// Block sets of the configured size, zeroed, one per verification that ran at once.
struct MemoryPool {
    sets: Mutex<Vec<Vec<Block>>>,
    /// The configured block count: a set grown beyond it (a stored hash with more memory than
    /// the settings) is dropped after use, not kept.
    keep: usize,
}

impl MemoryPool {
    fn take(&self) -> WorkingMemory<'_> {
        let blocks = self
            .sets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        WorkingMemory { pool: self, blocks }
    }
}

/// One verification's blocks: zeroed and given back to the pool when dropped, on every path
/// (a panic included), since they hold material derived from the key.
struct WorkingMemory<'a> {
    pool: &'a MemoryPool,
    blocks: Vec<Block>,
}

impl Drop for WorkingMemory<'_> {
    fn drop(&mut self) {
        self.blocks.fill(Block::new());
        if self.blocks.len() <= self.pool.keep {
            let blocks = std::mem::take(&mut self.blocks);
            self.pool
                .sets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(blocks);
        }
    }
}

impl KeyHasher {
    pub fn new(cfg: &Argon2Settings) -> Result<Self, HashError> {
        let params = Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None)
            .map_err(|e| HashError::Params(e.to_string()))?;
        let mut seed = [0u8; 24];
        getrandom::fill(&mut seed).map_err(|_| HashError::Hash)?;
        let dummy_hash = hash_with(&params, &hex::encode(seed))?;
        let memory = Arc::new(MemoryPool {
            sets: Mutex::new(Vec::new()),
            keep: params.block_count(),
        });
        Ok(Self {
            params,
            dummy_hash,
            slots: Arc::new(Semaphore::new(cfg.max_concurrency)),
            memory,
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
        let pool = self.memory.clone();
        self.on_pool(move |params| {
            let mut memory = pool.take();
            match stored {
                Some(hash) => verify_with(params, &key, &hash, &mut memory.blocks),
                None => {
                    let _ = verify_with(params, &key, &dummy, &mut memory.blocks);
                    Verified {
                        ok: false,
                        needs_rehash: false,
                    }
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

fn verify_with(params: &Params, key: &str, stored: &str, memory: &mut Vec<Block>) -> Verified {
    let Ok(parsed) = PasswordHash::new(stored) else {
        return Verified {
            ok: false,
            needs_rehash: false,
        };
    };
    // Verify with the parameters recorded in the hash itself, then compare them to the
    // configured ones to decide whether to upgrade.
    let ok = matches_hash(key.as_bytes(), &parsed, memory);
    let needs_rehash = ok && !same_params(params, &parsed);
    Verified { ok, needs_rehash }
}

/// What `PasswordVerifier::verify_password` does, in `memory` (grown to the hash's cost when
/// it is smaller) instead of a fresh allocation: Argon2 writes every block before it reads it.
fn matches_hash(key: &[u8], hash: &PasswordHash, memory: &mut Vec<Block>) -> bool {
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return false;
    };
    let Ok(params) = Params::try_from(hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm.as_str()) else {
        return false;
    };
    let version = match hash.version.map(Version::try_from) {
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
        None => Version::default(),
    };
    // A stored hash asking for more memory than any setting allows is refused, and memory
    // that cannot be had fails this verification instead of aborting the process.
    let blocks = params.block_count();
    if blocks > MAX_ARGON2_MEMORY_KIB as usize {
        return false;
    }
    if memory.len() < blocks {
        if memory.try_reserve_exact(blocks - memory.len()).is_err() {
            return false;
        }
        memory.resize(blocks, Block::new());
    }
    let mut buffer = [0u8; Output::MAX_LENGTH];
    let Some(out) = buffer.get_mut(..expected.len()) else {
        return false;
    };
    let argon = Argon2::new(algorithm, version, params);
    if argon
        .hash_password_into_with_memory(key, salt, out, &mut memory[..blocks])
        .is_err()
    {
        return false;
    }
    // `Output`'s equality is constant-time.
    Output::new(out).is_ok_and(|computed| computed == *expected)
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

    #[test]
    fn pooled_verification_agrees_with_the_crate() {
        use argon2::PasswordVerifier;
        for (m, t, p) in [(64, 1, 1), (128, 2, 2)] {
            let params = Params::new(m, t, p, None).unwrap();
            let stored = hash_with(&params, "nz_key_one").unwrap();
            let parsed = PasswordHash::new(&stored).unwrap();
            let mut memory = Vec::new();
            for key in ["nz_key_one", "nz_key_two", ""] {
                assert_eq!(
                    matches_hash(key.as_bytes(), &parsed, &mut memory),
                    Argon2::default()
                        .verify_password(key.as_bytes(), &parsed)
                        .is_ok(),
                    "m={m} t={t} p={p} key={key:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn verifications_reuse_zeroed_memory_from_a_bounded_pool() {
        let h = KeyHasher::new(&cfg(64, 1)).unwrap();
        let small = h.hash_blocking("nz_secret").unwrap();
        let large = KeyHasher::new(&cfg(256, 1))
            .unwrap()
            .hash_blocking("nz_secret")
            .unwrap();
        for _ in 0..4 {
            let v = h.verify("nz_secret".into(), Some(small.clone())).await;
            assert!(v.unwrap().ok);
            // A hash with more memory than the pooled blocks grows them, for that call.
            let v = h.verify("nz_secret".into(), Some(large.clone())).await;
            assert!(v.unwrap().ok);
            let v = h.verify("nz_wrong".into(), Some(large.clone())).await;
            assert!(!v.unwrap().ok);
        }
        let v = h.verify("nz_secret".into(), Some(small.clone())).await;
        assert!(v.unwrap().ok);
        // A stored hash asking for more memory than any setting allows fails, without an
        // attempt to allocate it.
        let huge = small.replace("m=64,", "m=4294967295,");
        assert_ne!(huge, small);
        let v = h.verify("nz_secret".into(), Some(huge)).await;
        assert!(!v.unwrap().ok);
        let pool = h.memory.sets.lock().unwrap();
        assert_eq!(
            pool.len(),
            1,
            "one verification at a time used one block set"
        );
        assert!(
            pool.iter().all(|m| m.len() == 64),
            "a set grown for a larger stored hash is not kept"
        );
        assert!(
            pool.iter()
                .flatten()
                .all(|b| AsRef::<[u64]>::as_ref(b).iter().all(|w| *w == 0)),
            "the blocks are zeroed after use"
        );
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
