//! A per-thread front for the shared principal cache: what a worker thread has already
//! resolved, answered from its own memory.
//!
//! The shared cache is a lock and a map, and the principal it returns is one `Arc` for every
//! thread; each request then writes the lock's counter, the change log's lock and the `Arc`'s
//! reference count, all cache lines the other worker thread wrote a moment before. A front hit
//! writes nothing shared: it reads two version counters, which only change when the cache or
//! the change log does, and hands out this thread's own copy of the principal.
//!
//! Correctness rests on the versions: an entry is copied here with the versions read *before*
//! the shared lookup that found it current, and the whole front is dropped as soon as either
//! version has moved. Every write to the shared cache (a fill, an eviction) and every change
//! the feed applies moves one, so the front never answers with anything the shared path would
//! refuse, and it keeps the shared entry's expiry.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::cache::TokenDigest;
use crate::principal::Principal;

/// Keys a thread remembers before it starts over (a front only ever holds valid keys, so this
/// bounds what a client cycling through many valid keys can make it hold).
const FRONT_MAX_ENTRIES: usize = 1024;

/// Identifies one authenticator (tests run several in a process) and its state's versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub owner: u64,
    pub cache: u64,
    pub changes: u64,
}

/// Hands out authenticator ids.
static OWNERS: AtomicU64 = AtomicU64::new(1);

pub fn new_owner() -> u64 {
    OWNERS.fetch_add(1, Ordering::Relaxed)
}

struct Entry {
    principal: Arc<Principal>,
    until: Instant,
}

#[derive(Default)]
struct Front {
    stamp: Option<Stamp>,
    entries: HashMap<TokenDigest, Entry, foldhash::fast::RandomState>,
}

impl Front {
    /// Drops everything learnt under another stamp.
    fn adopt(&mut self, stamp: Stamp) {
        if self.stamp != Some(stamp) {
            self.entries.clear();
            self.stamp = Some(stamp);
        }
    }
}

thread_local! {
    static FRONT: RefCell<Front> = RefCell::new(Front::default());
}

/// This thread's copy of the principal of `digest`, if it has one that is still good under
/// `stamp` (the versions as they are now).
pub fn get(stamp: Stamp, digest: &TokenDigest, now: Instant) -> Option<Arc<Principal>> {
    FRONT
        .try_with(|front| {
            let mut front = front.try_borrow_mut().ok()?;
            front.adopt(stamp);
            front
                .entries
                .get(digest)
                .filter(|e| e.until > now)
                .map(|e| e.principal.clone())
        })
        .ok()
        .flatten()
}

/// Keeps a copy of `principal`, found current in the shared cache under `stamp` (read before
/// that lookup), until `until`. Returns the copy, which the caller should use from then on.
pub fn remember(
    stamp: Stamp,
    digest: TokenDigest,
    principal: &Principal,
    until: Instant,
) -> Option<Arc<Principal>> {
    FRONT
        .try_with(|front| {
            let mut front = front.try_borrow_mut().ok()?;
            front.adopt(stamp);
            if front.entries.len() >= FRONT_MAX_ENTRIES {
                front.entries.clear();
            }
            let copy = Arc::new(principal.clone());
            front.entries.insert(
                digest,
                Entry {
                    principal: copy.clone(),
                    until,
                },
            );
            Some(copy)
        })
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn principal(key_id: i64) -> Principal {
        Principal::flatten(
            crate::principal::PrincipalIds {
                tenant_id: 1,
                tenant_name: "t".into(),
                key_id,
                key_prefix: "nz_abcdefghi".into(),
                key_name: "k".into(),
            },
            None,
            &Default::default(),
            &Default::default(),
        )
    }

    #[test]
    fn answers_only_under_the_stamp_it_learnt_under() {
        let owner = new_owner();
        let stamp = Stamp {
            owner,
            cache: 3,
            changes: 7,
        };
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let copy = remember(stamp, [1; 32], &principal(11), later).unwrap();
        assert_eq!(copy.key_id, 11);
        assert!(Arc::ptr_eq(&get(stamp, &[1; 32], now).unwrap(), &copy));
        assert!(get(stamp, &[2; 32], now).is_none(), "another digest");
        assert!(get(stamp, &[1; 32], later).is_none(), "expired");
        for moved in [
            Stamp { cache: 4, ..stamp },
            Stamp {
                changes: 8,
                ..stamp
            },
            Stamp {
                owner: new_owner(),
                ..stamp
            },
        ] {
            remember(stamp, [1; 32], &principal(11), later);
            assert!(get(moved, &[1; 32], now).is_none(), "{moved:?}");
            // Dropped, not hidden: going back does not bring the entry back.
            assert!(get(stamp, &[1; 32], now).is_none(), "{moved:?}");
        }
    }

    #[test]
    fn an_entry_learnt_under_an_older_stamp_is_not_kept() {
        let owner = new_owner();
        let old = Stamp {
            owner,
            cache: 1,
            changes: 1,
        };
        let new = Stamp { cache: 2, ..old };
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        remember(new, [5; 32], &principal(5), later);
        // A lookup that started before the cache moved finishes after: its copy is kept only
        // under its own stamp, which the next lookup no longer matches.
        remember(old, [6; 32], &principal(6), later);
        assert!(get(new, &[6; 32], now).is_none());
        assert!(get(new, &[5; 32], now).is_none());
    }

    #[test]
    fn the_front_stays_bounded() {
        let stamp = Stamp {
            owner: new_owner(),
            cache: 0,
            changes: 0,
        };
        let later = Instant::now() + Duration::from_secs(60);
        for i in 0..(FRONT_MAX_ENTRIES as u32 + 10) {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&i.to_le_bytes());
            remember(stamp, digest, &principal(1), later);
        }
        let len = FRONT.with(|f| f.borrow().entries.len());
        assert!(len <= FRONT_MAX_ENTRIES, "{len}");
    }
}
