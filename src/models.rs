//! Model names compared the way Ollama resolves them, and the allow-list decision that both
//! enforcement and listing filters share (SPEC §4, §7).
//!
//! Ollama resolves `host/namespace/model:tag` case-insensitively with defaults
//! `registry.ollama.ai`, `library` and `latest`, and strips a trailing `:cloud`/`:local` source
//! marker. We compare canonical forms, and keep "cloud" as part of a name's identity: a cloud
//! model is forwarded to ollama.com under the server owner's account, so `allow_all_models`
//! never covers it; only an explicit list entry does.

use std::collections::BTreeSet;

const DEFAULT_REGISTRY: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";

/// A model name in canonical form: lower case, default registry/namespace dropped, tag always
/// present, `:cloud` kept as a suffix when the name carried the cloud source marker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelName {
    canonical: String,
    cloud: bool,
}

impl ModelName {
    pub fn parse(raw: &str) -> Option<Self> {
        let mut name = raw.trim().to_ascii_lowercase();
        if name.is_empty()
            || name.len() > 512
            || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return None;
        }
        let mut cloud_marker = false;
        if name.ends_with(":cloud") {
            // `model:cloud` (no tag) and `model:tag:cloud` both carry the marker.
            cloud_marker = true;
            name.truncate(name.len() - ":cloud".len());
        } else if name.ends_with(":local") {
            name.truncate(name.len() - ":local".len());
        }
        let (path, tag) = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => (&name[..i], &name[i + 1..]),
            _ => (name.as_str(), DEFAULT_TAG),
        };
        if path.is_empty()
            || tag.is_empty()
            || path.contains("//")
            || path.starts_with('/')
            || path.ends_with('/')
        {
            return None;
        }
        let mut parts = path.splitn(4, '/');
        let (host, namespace, model) =
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(m), None, None, None) => (DEFAULT_REGISTRY, DEFAULT_NAMESPACE, m),
                (Some(ns), Some(m), None, None) => (DEFAULT_REGISTRY, ns, m),
                (Some(h), Some(ns), Some(m), None) => (h, ns, m),
                _ => return None,
            };
        let mut canonical = String::with_capacity(name.len() + 8);
        if host != DEFAULT_REGISTRY {
            canonical.push_str(host);
            canonical.push('/');
            canonical.push_str(namespace);
            canonical.push('/');
        } else if namespace != DEFAULT_NAMESPACE {
            canonical.push_str(namespace);
            canonical.push('/');
        }
        canonical.push_str(model);
        canonical.push(':');
        canonical.push_str(tag);
        if cloud_marker {
            canonical.push_str(":cloud");
        }
        let cloud = cloud_marker || tag.ends_with("-cloud") || tag == "cloud";
        Some(Self { canonical, cloud })
    }

    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    pub fn into_string(self) -> String {
        self.canonical
    }

    pub fn is_cloud(&self) -> bool {
        self.cloud
    }

    /// The same name, known to be served by ollama.com (discovery saw a `remote_host`).
    pub fn into_cloud(mut self) -> Self {
        self.cloud = true;
        self
    }
}

/// Which models one principal may use, after tenant→key narrowing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelAccess {
    /// Every local (non-cloud) model.
    pub allow_all_local: bool,
    /// Canonical names allowed explicitly (the only way to allow a cloud model).
    pub explicit: BTreeSet<String>,
}

impl ModelAccess {
    pub fn permits(&self, model: &ModelName) -> bool {
        self.explicit.contains(model.as_str()) || (self.allow_all_local && !model.is_cloud())
    }

    /// For a raw name from a listing or a request: unparseable names are never allowed.
    pub fn permits_raw(&self, raw: &str) -> bool {
        ModelName::parse(raw).is_some_and(|m| self.permits(&m))
    }

    /// Tenant→key inheritance (SPEC §4): an unset key list inherits the tenant's access; a key
    /// list (even `[]`) narrows it; a key's `allow_all_models` means "whatever the tenant allows".
    pub fn resolve(
        tenant_all: Option<bool>,
        tenant_models: Option<&[String]>,
        key_all: Option<bool>,
        key_models: Option<&[String]>,
    ) -> Self {
        let tenant = Self {
            allow_all_local: tenant_all.unwrap_or(false),
            explicit: canonical_set(tenant_models.unwrap_or_default()),
        };
        if key_all == Some(true) {
            return tenant;
        }
        match key_models {
            None => tenant,
            Some(list) => {
                let explicit = list
                    .iter()
                    .filter_map(|m| ModelName::parse(m))
                    .filter(|m| tenant.permits(m))
                    .map(|m| m.canonical)
                    .collect();
                Self {
                    allow_all_local: false,
                    explicit,
                }
            }
        }
    }
}

fn canonical_set(models: &[String]) -> BTreeSet<String> {
    models
        .iter()
        .filter_map(|m| ModelName::parse(m))
        .map(|m| m.canonical)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> String {
        ModelName::parse(s).unwrap().as_str().to_string()
    }

    #[test]
    fn aliases_resolve_like_ollama() {
        let same = [
            "llama3.2",
            "llama3.2:latest",
            "LLAMA3.2",
            " llama3.2 ",
            "library/llama3.2",
            "registry.ollama.ai/library/llama3.2:latest",
            "Registry.Ollama.AI/Library/Llama3.2:Latest",
            "llama3.2:local",
        ];
        for s in same {
            assert_eq!(c(s), "llama3.2:latest", "{s}");
        }
        assert_eq!(c("qwen2.5:0.5b"), "qwen2.5:0.5b");
        assert_eq!(c("someone/model:1b"), "someone/model:1b");
        assert_eq!(c("example.com/ns/model"), "example.com/ns/model:latest");
        assert_ne!(c("llama3.2:1b"), c("llama3.2"));
    }

    #[test]
    fn cloud_names_are_flagged() {
        assert!(ModelName::parse("gpt-oss:120b-cloud").unwrap().is_cloud());
        assert!(ModelName::parse("gpt-oss:120b:cloud").unwrap().is_cloud());
        assert!(ModelName::parse("gpt-oss:cloud").unwrap().is_cloud());
        assert!(!ModelName::parse("gpt-oss:120b").unwrap().is_cloud());
        assert_ne!(c("gpt-oss:120b:cloud"), c("gpt-oss:120b"));
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", " ", "a b", "a:", "/a", "a//b", "a/b/c/d", "x\u{0}"] {
            assert!(ModelName::parse(s).is_none(), "{s:?}");
        }
    }

    #[test]
    fn allow_all_never_covers_cloud() {
        let a = ModelAccess::resolve(Some(true), None, None, None);
        assert!(a.permits_raw("mistral:7b"));
        assert!(!a.permits_raw("gpt-oss:120b-cloud"));
        let b = ModelAccess::resolve(Some(true), Some(&["gpt-oss:120b-cloud".into()]), None, None);
        assert!(b.permits_raw("GPT-OSS:120b-cloud"));
    }

    #[test]
    fn key_lists_only_narrow() {
        let tenant = vec!["llama3.2".to_string(), "qwen2.5:0.5b".to_string()];
        let key = vec!["llama3.2:latest".to_string(), "mistral:7b".to_string()];
        let a = ModelAccess::resolve(Some(false), Some(&tenant), None, Some(&key));
        assert!(a.permits_raw("llama3.2"));
        assert!(
            !a.permits_raw("mistral:7b"),
            "key list cannot widen the tenant's"
        );
        assert!(!a.permits_raw("qwen2.5:0.5b"), "key list narrows");
        let empty = ModelAccess::resolve(Some(true), None, None, Some(&[]));
        assert!(!empty.permits_raw("llama3.2"), "[] means none");
        let inherit = ModelAccess::resolve(Some(false), Some(&tenant), Some(true), Some(&key));
        assert!(
            inherit.permits_raw("qwen2.5:0.5b"),
            "key allow_all = tenant's set"
        );
        assert!(!inherit.permits_raw("mistral:7b"));
    }
}
