//! The prompt's share of a reservation (SPEC §6): a bound its actual prompt tokens can never
//! exceed, known before the request is forwarded.
//!
//! A token covers at least one byte of text, and JSON only adds bytes around the text (quotes,
//! keys, escapes), so the body's byte length bounds the tokens of every string in it. What the
//! body does not show is added on top: the chat template and a Modelfile system prompt
//! (`BUDGET_TEMPLATE_TOKENS`), and images, which become many tokens however few bytes they take
//! (`BUDGET_IMAGE_TOKENS` each).

use serde_json::Value;

use crate::settings::BudgetSettings;

pub fn prompt_bound(body: &[u8], settings: &BudgetSettings) -> u64 {
    (body.len() as u64)
        .saturating_add(settings.template_tokens)
        .saturating_add(settings.image_tokens.saturating_mul(count_images(body)))
}

/// Images a body carries: native `images` arrays (top level and per message) and OpenAI /
/// Responses content parts of an image type. Counting too many only makes the bound looser.
pub fn count_images(body: &[u8]) -> u64 {
    // Ollama's decoder matches keys case-insensitively and a key may be written with `\u`
    // escapes; a body with neither an `imag` in any case nor an escape names no image.
    let maybe = memchr::memchr2_iter(b'i', b'I', body).any(|at| {
        body.get(at..at + 4)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"imag"))
    }) || memchr::memchr_iter(b'\\', body).any(|at| body.get(at + 1) == Some(&b'u'));
    if !maybe {
        return 0;
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => count_in(&v),
        // The body was parsed before; an unreadable one cannot reach here. Be strict anyway.
        Err(_) => 1,
    }
}

fn count_in(v: &Value) -> u64 {
    match v {
        Value::Array(items) => items.iter().map(count_in).sum(),
        Value::Object(map) => {
            let part = map
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| matches!(t, "image_url" | "input_image" | "image"));
            let own: u64 = map
                .iter()
                .map(|(k, v)| match v {
                    Value::Array(items) if is_images_key(k) => items.len() as u64,
                    _ => count_in(v),
                })
                .sum();
            own + u64::from(part)
        }
        _ => 0,
    }
}

/// `images` as Go's `encoding/json` matches it: ASCII case-insensitive, with `ſ` folding to `s`.
fn is_images_key(k: &str) -> bool {
    let folded: String = k
        .chars()
        .map(|c| {
            if c == 'ſ' {
                's'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    folded == "images"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::BudgetMode;

    fn settings() -> BudgetSettings {
        BudgetSettings {
            mode: BudgetMode::Reserve,
            template_tokens: 10,
            image_tokens: 1000,
            min_output_tokens: 1,
            default_output_tokens: 4096,
            seed_grace: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn bound_is_body_bytes_plus_template_plus_images() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(prompt_bound(body, &settings()), body.len() as u64 + 10);
        let with_images =
            br#"{"model":"m","messages":[{"role":"user","content":"x","IMAGES":["a","b"]}]}"#;
        assert_eq!(count_images(with_images), 2);
        assert_eq!(
            prompt_bound(with_images, &settings()),
            with_images.len() as u64 + 10 + 2000
        );
    }

    #[test]
    fn openai_and_escaped_images_are_counted() {
        let parts = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AA"}}]}]}"#;
        assert_eq!(count_images(parts), 1);
        let responses = br#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"data:x"}]}]}"#;
        assert_eq!(count_images(responses), 1);
        let escaped = br#"{"model":"m","prompt":"p","\u0069mages":["a"]}"#;
        assert_eq!(count_images(escaped), 1);
        let folded = "{\"model\":\"m\",\"prompt\":\"p\",\"imageſ\":[\"a\",\"b\",\"c\"]}";
        assert_eq!(count_images(folded.as_bytes()), 3);
        assert_eq!(count_images(br#"{"model":"m","prompt":"no pictures"}"#), 0);
    }
}
