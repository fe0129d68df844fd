//! Model listings filtered to the caller's effective models (`/api/tags`, `/api/ps`,
//! `/v1/models`). The upstream body is buffered (bounded), filtered and re-serialised; entries
//! keep every field the upstream sent.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::models::{ModelAccess, ModelName};
use crate::routes::Listing;

/// Listings are small; anything bigger is not a listing we can vouch for.
pub const MAX_LISTING_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ListingError {
    #[error("upstream listing exceeds {MAX_LISTING_BYTES} bytes")]
    TooLarge,
    #[error("upstream listing is not the expected JSON")]
    Malformed,
}

/// Collects a listing body across chunks.
#[derive(Default)]
pub struct ListingBuffer {
    buf: BytesMut,
}

impl ListingBuffer {
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ListingError> {
        if self.buf.len() + chunk.len() > MAX_LISTING_BYTES {
            return Err(ListingError::TooLarge);
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    pub fn finish(
        &mut self,
        kind: Listing,
        access: &ModelAccess,
        remote: &dyn Fn(&ModelName) -> bool,
    ) -> Result<Bytes, ListingError> {
        let body = std::mem::take(&mut self.buf);
        filter(&body, kind, access, remote)
    }
}

/// Keeps the entries `access` permits. `remote` says which models discovery saw served from
/// ollama.com (cloud models whatever their name), for listings that do not say so themselves.
pub fn filter(
    body: &[u8],
    kind: Listing,
    access: &ModelAccess,
    remote: &dyn Fn(&ModelName) -> bool,
) -> Result<Bytes, ListingError> {
    let mut doc: Value = serde_json::from_slice(body).map_err(|_| ListingError::Malformed)?;
    let (field, name_keys): (&str, &[&str]) = match kind {
        Listing::OllamaModels => ("models", &["name", "model"]),
        Listing::OpenAiModels => ("data", &["id"]),
    };
    let obj = doc.as_object_mut().ok_or(ListingError::Malformed)?;
    let items = match obj.remove(field) {
        Some(Value::Array(items)) => items,
        // Ollama sends `null` for an empty list; clients expect an array.
        Some(Value::Null) | None => Vec::new(),
        Some(_) => return Err(ListingError::Malformed),
    };
    let kept: Vec<Value> = items
        .into_iter()
        .filter(|item| {
            // Every name an entry carries must be allowed, so an entry cannot smuggle a
            // forbidden model under an allowed alias.
            let names: Vec<&str> = name_keys
                .iter()
                .filter_map(|k| item.get(*k).and_then(Value::as_str))
                .collect();
            // An entry Ollama serves from ollama.com is a cloud model whatever its name.
            let is_remote = remote;
            let remote = crate::discovery::is_remote_entry(item);
            !names.is_empty()
                && names.iter().all(|n| {
                    ModelName::parse(n)
                        .map(|m| {
                            if remote || is_remote(&m) {
                                m.into_cloud()
                            } else {
                                m
                            }
                        })
                        .is_some_and(|m| access.permits(&m))
                })
        })
        .collect();
    obj.insert(field.to_string(), Value::Array(kept));
    serde_json::to_vec(&doc)
        .map(Bytes::from)
        .map_err(|_| ListingError::Malformed)
}

/// The empty listing of `kind`, answered when the upstream's is unusable (fail closed).
pub fn empty(kind: Listing) -> Bytes {
    match kind {
        Listing::OllamaModels => Bytes::from_static(br#"{"models":[]}"#),
        Listing::OpenAiModels => Bytes::from_static(br#"{"object":"list","data":[]}"#),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(models: &[&str]) -> ModelAccess {
        let list: Vec<String> = models.iter().map(|s| s.to_string()).collect();
        ModelAccess::resolve(Some(false), Some(&list), None, None)
    }

    #[test]
    fn filters_ollama_tags() {
        let body = br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":1},{"name":"mistral:7b","model":"mistral:7b"},{"name":"llama3.2:latest","model":"mistral:7b"}]}"#;
        let out = filter(body, Listing::OllamaModels, &access(&["llama3.2"]), &|_| {
            false
        })
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["models"].as_array().unwrap().len(), 1);
        assert_eq!(v["models"][0]["size"], 1);
    }

    #[test]
    fn filters_openai_models_and_fixes_null() {
        let body = br#"{"object":"list","data":[{"id":"llama3.2:latest"},{"id":"qwen2.5:0.5b"}]}"#;
        let out = filter(
            body,
            Listing::OpenAiModels,
            &access(&["qwen2.5:0.5b"]),
            &|_| false,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"][0]["id"], "qwen2.5:0.5b");
        assert_eq!(v["object"], "list");
        let out = filter(
            br#"{"object":"list","data":null}"#,
            Listing::OpenAiModels,
            &access(&[]),
            &|_| false,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"], serde_json::json!([]));
    }

    #[test]
    fn malformed_and_oversized() {
        assert!(filter(b"[]", Listing::OllamaModels, &access(&[]), &|_| false).is_err());
        assert!(
            filter(
                br#"{"models":5}"#,
                Listing::OllamaModels,
                &access(&[]),
                &|_| false
            )
            .is_err()
        );
        let mut b = ListingBuffer::default();
        assert!(b.push(&vec![b' '; MAX_LISTING_BYTES + 1]).is_err());
    }
}
