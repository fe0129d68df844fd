//! The Redis key names of one admission, written into one string: a request's limit keys cost
//! one allocation, shared (behind an `Arc`) by its admission call, the lease renewer and its
//! settlement, instead of a `String` per key and per copy.
//!
//! Layout (see admit.lua): per rate scope 5 keys (requests this minute, requests last minute,
//! tokens this minute, tokens last minute, concurrency lease set), then per budget scope 2
//! (usage hash, reservation set). Key scope before tenant scope.

/// A principal has at most two rate scopes and two budget scopes (its key and its tenant).
pub const MAX_KEYS: usize = 2 * RATE_KEYS + 2 * BUDGET_KEYS;
const RATE_KEYS: usize = 5;
const BUDGET_KEYS: usize = 2;
/// Within a rate scope: the token bucket of this minute and the lease set.
const TOKENS_NOW: usize = 2;
const LEASES: usize = 4;

/// Which scope's keys: its tag in the key name and its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScopeName {
    pub tag: &'static str,
    pub id: i64,
}

#[derive(Debug)]
pub struct KeyNames {
    text: String,
    ends: [u32; MAX_KEYS],
    len: usize,
    rates: usize,
}

impl KeyNames {
    /// The admission's keys for `rates` and `budgets` (at most two each) in `minute`.
    pub fn admission(
        ns: &str,
        rates: impl Iterator<Item = ScopeName>,
        budgets: impl Iterator<Item = ScopeName>,
        minute: u64,
    ) -> Self {
        let mut names = KeyNames {
            text: String::with_capacity((ns.len() + 24) * MAX_KEYS),
            ends: [0; MAX_KEYS],
            len: 0,
            rates: 0,
        };
        // Written piece by piece: `format!` machinery costs more than the rest of the call.
        for scope in rates.take(2) {
            let last = minute.saturating_sub(1);
            for (kind, minute) in [("r", minute), ("r", last), ("t", minute), ("t", last)] {
                names.scope("rl", scope, ns);
                names.text.push(':');
                names.text.push_str(kind);
                names.text.push(':');
                names.text.push_str(itoa::Buffer::new().format(minute));
                names.end();
            }
            names.scope("rl", scope, ns);
            names.text.push_str(":c");
            names.end();
            names.rates += 1;
        }
        for scope in budgets.take(2) {
            names.scope("bu", scope, ns);
            names.end();
            names.scope("bu", scope, ns);
            names.text.push_str(":res");
            names.end();
        }
        names
    }

    /// A budget scope's usage hash alone (what the seeder restores).
    pub fn usage_hash(ns: &str, scope: ScopeName) -> String {
        let mut names = KeyNames {
            text: String::new(),
            ends: [0; MAX_KEYS],
            len: 0,
            rates: 0,
        };
        names.scope("bu", scope, ns);
        names.text
    }

    /// Starts a name with `{ns}:{family}:{tag}:{id}`.
    fn scope(&mut self, family: &str, scope: ScopeName, ns: &str) {
        self.text.push_str(ns);
        self.text.push(':');
        self.text.push_str(family);
        self.text.push(':');
        self.text.push_str(scope.tag);
        self.text.push(':');
        self.text.push_str(itoa::Buffer::new().format(scope.id));
    }

    /// Ends the name being written; `admission` writes at most MAX_KEYS of them.
    fn end(&mut self) {
        if let Some(end) = self.ends.get_mut(self.len) {
            *end = self.text.len() as u32;
            self.len += 1;
        }
    }

    pub fn get(&self, i: usize) -> &str {
        if i >= self.len {
            return "";
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize).unwrap_or("")
    }

    /// Every key, in order, for the admission call.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        (0..self.len).map(|i| self.get(i))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn rates(&self) -> usize {
        self.rates
    }

    /// The concurrency lease set of rate scope `i`.
    pub fn lease_set(&self, i: usize) -> usize {
        i * RATE_KEYS + LEASES
    }

    /// The reservation set of budget scope `j`.
    pub fn reservation_set(&self, j: usize) -> usize {
        self.rates * RATE_KEYS + j * BUDGET_KEYS + 1
    }

    pub fn budgets(&self) -> usize {
        self.len.saturating_sub(self.rates * RATE_KEYS) / BUDGET_KEYS
    }

    /// The settlement's keys (see settle.lua): per rate scope the token bucket the admission
    /// charged and the lease set, then every budget key.
    pub fn settlement(&self) -> impl Iterator<Item = &str> {
        let rates = (0..self.rates)
            .flat_map(|i| [i * RATE_KEYS + TOKENS_NOW, i * RATE_KEYS + LEASES])
            .map(|k| self.get(k));
        let budgets = (self.rates * RATE_KEYS..self.len).map(|k| self.get(k));
        rates.chain(budgets)
    }

    pub fn settlement_len(&self) -> usize {
        self.rates * 2 + (self.len - self.rates * RATE_KEYS)
    }
}

/// An admitted request's names in Redis: its keys, its lease member and which of its sets hold
/// a lease the renewer keeps alive. Shared by the admission, the lease book and the settlement.
#[derive(Debug)]
pub struct AdmissionKeys {
    pub names: KeyNames,
    /// Its entry in the lease and reservation sets (`instance:counter`).
    pub member: String,
    /// The admission's number in this process (the lease book's key).
    pub id: u64,
    pub renewed: KeySet,
}

/// Key indices of one admission, as a bit set (for the lease sets the renewer keeps alive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeySet(u16);

impl KeySet {
    pub fn insert(&mut self, i: usize) {
        if i < MAX_KEYS {
            self.0 |= 1 << i;
        }
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..MAX_KEYS).filter(move |i| self.0 & (1 << i) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_scripts_layout() {
        let key = ScopeName { tag: "k", id: 7 };
        let tenant = ScopeName { tag: "t", id: 3 };
        let n = KeyNames::admission("nz", [key, tenant].into_iter(), [tenant].into_iter(), 100);
        let all: Vec<&str> = n.all().collect();
        assert_eq!(
            all,
            [
                "nz:rl:k:7:r:100",
                "nz:rl:k:7:r:99",
                "nz:rl:k:7:t:100",
                "nz:rl:k:7:t:99",
                "nz:rl:k:7:c",
                "nz:rl:t:3:r:100",
                "nz:rl:t:3:r:99",
                "nz:rl:t:3:t:100",
                "nz:rl:t:3:t:99",
                "nz:rl:t:3:c",
                "nz:bu:t:3",
                "nz:bu:t:3:res",
            ]
        );
        let settle: Vec<&str> = n.settlement().collect();
        assert_eq!(
            settle,
            [
                "nz:rl:k:7:t:100",
                "nz:rl:k:7:c",
                "nz:rl:t:3:t:100",
                "nz:rl:t:3:c",
                "nz:bu:t:3",
                "nz:bu:t:3:res",
            ]
        );
        assert_eq!(n.settlement_len(), settle.len());
        assert_eq!(n.get(n.lease_set(1)), "nz:rl:t:3:c");
        assert_eq!(n.get(n.reservation_set(0)), "nz:bu:t:3:res");
        assert_eq!(KeyNames::usage_hash("nz", tenant), n.get(10));
        assert_eq!(n.budgets(), 1);
        assert_eq!(n.get(12), "");
    }

    #[test]
    fn budgets_alone() {
        let key = ScopeName { tag: "k", id: 1 };
        let n = KeyNames::admission("x", [].into_iter(), [key].into_iter(), 5);
        assert_eq!(n.all().collect::<Vec<_>>(), ["x:bu:k:1", "x:bu:k:1:res"]);
        assert_eq!(
            n.settlement().collect::<Vec<_>>(),
            ["x:bu:k:1", "x:bu:k:1:res"]
        );
        let mut set = KeySet::default();
        set.insert(n.reservation_set(0));
        assert_eq!(set.iter().collect::<Vec<_>>(), [1]);
    }
}
