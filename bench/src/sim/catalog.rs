//! The simulated set of installed models and their static metadata.

use serde::Serialize;

use super::clock;

/// Names installed when `--models` is not given.
pub const DEFAULT_MODELS: [&str; 5] = [
    "llama3.2:latest",
    "qwen2.5:0.5b",
    "nomic-embed-text:latest",
    "gpt-oss:120b-cloud",
    "mistral:7b",
];

/// Host reported for cloud-style models, as Ollama reports ollama.com.
pub const REMOTE_HOST: &str = "https://ollama.com:443";

/// Fixed base so listings are reproducible across runs.
const MODIFIED_BASE_UNIX: i64 = 1_735_689_600;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Details {
    pub parent_model: String,
    pub format: String,
    pub family: String,
    pub families: Vec<String>,
    pub parameter_size: String,
    pub quantization_level: String,
}

#[derive(Debug, Clone)]
pub struct Model {
    /// Shortest listing form, always with a tag.
    pub name: String,
    pub digest: String,
    pub size: u64,
    pub modified_unix: i64,
    pub details: Details,
    pub embedding_only: bool,
    /// Upstream name for cloud-style models (`-cloud`/`:cloud` tags).
    pub remote_model: Option<String>,
    pub context_length: u64,
}

impl Model {
    pub fn modified_at(&self) -> String {
        clock::rfc3339(self.modified_unix, 0)
    }

    pub fn capabilities(&self) -> Vec<&'static str> {
        if self.embedding_only {
            vec!["embedding"]
        } else {
            vec!["completion", "tools"]
        }
    }
}

/// Namespace as Ollama's name parser reports it (`library` by default).
pub fn owned_by(name: &str) -> String {
    let path = name.rsplit_once(':').map_or(name, |(p, _)| p);
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() >= 2 {
        parts[parts.len() - 2].to_string()
    } else {
        "library".to_string()
    }
}

/// 64-bit FNV-1a, enough for stable, well-spread fake digests.
fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Deterministic 64-hex-digit digest derived from a name.
pub fn digest(name: &str) -> String {
    (0..4u64)
        .map(|i| format!("{:016x}", fnv1a(i + 1, name.as_bytes())))
        .collect()
}

/// Deterministic pseudo-random stream for embedding values.
pub fn hash(seed: u64, data: &[u8]) -> u64 {
    fnv1a(seed, data)
}

/// Canonical lookup key: trimmed, lower-cased, default registry/namespace
/// stripped, `:latest` added when there is no tag. Ollama resolves names the
/// same way before matching installed models.
pub fn canonical(name: &str) -> String {
    let mut n = name.trim().to_ascii_lowercase();
    if let Some(rest) = n.strip_prefix("registry.ollama.ai/") {
        n = rest.to_string();
    }
    if let Some(rest) = n.strip_prefix("library/") {
        n = rest.to_string();
    }
    let last = n.rsplit('/').next().unwrap_or_default();
    if !last.contains(':') {
        n.push_str(":latest");
    }
    n
}

fn is_cloud(name: &str) -> bool {
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
    tag == "cloud" || tag.ends_with("-cloud")
}

/// Known families for the default names; anything else gets plausible
/// values derived from its name.
fn details_for(name: &str) -> (Details, u64, bool, u64) {
    let base = name.split(':').next().unwrap_or(name);
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let d = |family: &str, params: &str, quant: &str, format: &str| Details {
        parent_model: String::new(),
        format: format.to_string(),
        family: family.to_string(),
        families: vec![family.to_string()],
        parameter_size: params.to_string(),
        quantization_level: quant.to_string(),
    };
    match base {
        "llama3.2" => (
            d("llama", "3.2B", "Q4_K_M", "gguf"),
            2_019_393_189,
            false,
            131_072,
        ),
        "qwen2.5" => (
            d("qwen2", "494.03M", "Q4_K_M", "gguf"),
            397_821_319,
            false,
            32_768,
        ),
        "nomic-embed-text" => (
            d("nomic-bert", "137M", "F16", "gguf"),
            274_302_450,
            true,
            2_048,
        ),
        "gpt-oss" if is_cloud(name) => (d("gptoss", "116.8B", "MXFP4", ""), 384, false, 131_072),
        "mistral" => (
            d("llama", "7.2B", "Q4_0", "gguf"),
            4_113_301_824,
            false,
            32_768,
        ),
        _ => {
            let family: String = base
                .rsplit('/')
                .next()
                .unwrap_or(base)
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            let family = if family.is_empty() {
                "llama".to_string()
            } else {
                family
            };
            let params = tag
                .split('-')
                .next()
                .filter(|t| {
                    t.len() > 1
                        && (t.ends_with('b') || t.ends_with('m'))
                        && t[..t.len() - 1]
                            .chars()
                            .all(|c| c.is_ascii_digit() || c == '.')
                })
                .map_or_else(|| "7B".to_string(), |t| t.to_ascii_uppercase());
            let embedding = base.contains("embed");
            let size = if is_cloud(name) {
                384
            } else {
                1_000_000_000 + hash(9, name.as_bytes()) % 4_000_000_000
            };
            let format = if is_cloud(name) { "" } else { "gguf" };
            (
                d(&family, &params, "Q4_K_M", format),
                size,
                embedding,
                8_192,
            )
        }
    }
}

impl Model {
    /// `name`, or `alias@remote` for a local alias of a cloud model (what `ollama cp` of a
    /// cloud model makes): listed under the alias, with the remote model and host.
    pub fn new(name: &str, index: usize) -> Model {
        if let Some((alias, remote)) = name.trim().split_once('@') {
            let mut m = Model::new(remote, index);
            m.name = alias.to_string();
            m.digest = digest(alias);
            m.remote_model = Some(remote.trim_end_matches("-cloud").to_string());
            return m;
        }
        let name = name.trim().to_string();
        let (details, size, embedding_only, context_length) = details_for(&name);
        let remote_model = is_cloud(&name).then(|| {
            let (base, tag) = name.rsplit_once(':').unwrap_or((name.as_str(), ""));
            let tag = tag.trim_end_matches("cloud").trim_end_matches('-');
            if tag.is_empty() {
                base.to_string()
            } else {
                format!("{base}:{tag}")
            }
        });
        Model {
            digest: digest(&name),
            size,
            modified_unix: MODIFIED_BASE_UNIX + (index as i64) * 86_400 + 3_600,
            details,
            embedding_only,
            remote_model,
            context_length,
            name,
        }
    }
}

/// The installed models.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub models: Vec<Model>,
}

impl Catalog {
    pub fn new<S: AsRef<str>>(names: &[S]) -> Catalog {
        let models = names
            .iter()
            .map(|n| n.as_ref().trim())
            .filter(|n| !n.is_empty())
            .enumerate()
            .map(|(i, n)| Model::new(n, i))
            .collect();
        Catalog { models }
    }

    pub fn find(&self, name: &str) -> Option<&Model> {
        let key = canonical(name);
        self.models.iter().find(|m| canonical(&m.name) == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_normalises() {
        let c = Catalog::new(&DEFAULT_MODELS);
        for n in [
            "llama3.2",
            "llama3.2:latest",
            "Llama3.2",
            "library/llama3.2",
            "registry.ollama.ai/library/llama3.2:latest",
            " llama3.2 ",
        ] {
            assert_eq!(c.find(n).map(|m| m.name.as_str()), Some("llama3.2:latest"));
        }
        assert!(c.find("llama3.2:cloud").is_none());
        assert!(c.find("gpt-oss:120b").is_none());
        assert!(c.find("gpt-oss:120b-cloud").is_some());
    }

    #[test]
    fn digests_are_stable_hex() {
        let d = digest("llama3.2:latest");
        assert_eq!(d.len(), 64);
        assert!(d.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(d, digest("llama3.2:latest"));
        assert_ne!(d, digest("mistral:7b"));
    }

    #[test]
    fn local_alias_of_a_cloud_model() {
        let m = Model::new("mybig:latest@gpt-oss:120b-cloud", 0);
        assert_eq!(m.name, "mybig:latest");
        assert_eq!(m.remote_model.as_deref(), Some("gpt-oss:120b"));
    }

    #[test]
    fn cloud_and_namespace() {
        let m = Model::new("gpt-oss:120b-cloud", 0);
        assert_eq!(m.remote_model.as_deref(), Some("gpt-oss:120b"));
        assert_eq!(owned_by("llama3.2:latest"), "library");
        assert_eq!(owned_by("acme/model:1b"), "acme");
    }
}
