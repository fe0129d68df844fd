//! Every error the gateway itself produces, with its status and its body in the caller's surface
//! shape (SPEC §8). Handlers return a `GatewayError`; nothing builds an error body by hand.
//!
//! Messages are fixed strings or carry only caller-supplied, non-secret values (a model name, a
//! limit): never a key, a hash, SQL, a stack trace or the upstream credential.

use std::time::Duration;

use serde::Serialize;

/// The API family a request belongs to; it decides the error body shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Surface {
    /// Ollama's native `/api/*` and the gateway's own endpoints: `{"error": "..."}`.
    Native,
    /// OpenAI-compatible `/v1/*`: `{"error": {"message", "type", "code", "param"}}`.
    OpenAi,
}

impl Surface {
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Native => "native",
            Surface::OpenAi => "openai",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid or missing API key")]
    Unauthorized,
    #[error("too many failed authentication attempts; try again later")]
    AuthThrottled { retry_after: Duration },
    /// RPM, TPM or concurrency; the message names the scope, the limit and the wait.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
    },
    /// A spent daily, monthly or total budget; not retryable before `retry_after` (the period's
    /// end), and never for a total budget.
    #[error("{message}")]
    BudgetExceeded {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("this endpoint is disabled on this gateway")]
    MutationBlocked,
    #[error("model '{0}' is not allowed for this API key")]
    ModelNotAllowed(String),
    #[error("model '{0}' not found")]
    ModelNotFound(String),
    #[error("requests from this address are not allowed for this API key")]
    SourceNotAllowed,
    /// A request option the key's policy forbids (e.g. `keep_alive: 0`).
    #[error("{0}")]
    PolicyRefused(&'static str),
    #[error("origin not allowed")]
    CorsOriginNotAllowed,
    #[error("404 page not found")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    BadRequest(String),
    #[error("request body too large (limit {limit} bytes)")]
    PayloadTooLarge { limit: usize },
    #[error("chunked request bodies over 64 KiB are not accepted; send Content-Length")]
    LengthRequired,
    #[error("compressed request bodies are not accepted")]
    UnsupportedMediaType,
    #[error("request body not received in time")]
    RequestTimeout,
    #[error("service temporarily unavailable: {0}")]
    Unavailable(&'static str),
    #[error("gateway is at its upstream concurrency limit")]
    UpstreamSaturated,
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("upstream protocol error")]
    UpstreamProtocol,
    #[error("internal gateway error")]
    Internal,
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::AuthThrottled { .. } | Self::RateLimited { .. } | Self::BudgetExceeded { .. } => {
                429
            }
            Self::MutationBlocked
            | Self::ModelNotAllowed(_)
            | Self::SourceNotAllowed
            | Self::PolicyRefused(_)
            | Self::CorsOriginNotAllowed => 403,
            Self::ModelNotFound(_) | Self::RouteNotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::BadRequest(_) => 400,
            Self::PayloadTooLarge { .. } => 413,
            Self::LengthRequired => 411,
            Self::UnsupportedMediaType => 415,
            Self::RequestTimeout => 408,
            Self::Unavailable(_) | Self::UpstreamSaturated => 503,
            Self::UpstreamUnreachable | Self::UpstreamProtocol => 502,
            Self::UpstreamTimeout => 504,
            Self::Internal => 500,
        }
    }

    /// Stable machine-readable code: the OpenAI `code` field and the audit log's error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "invalid_api_key",
            Self::AuthThrottled { .. } => "auth_throttled",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::BudgetExceeded { .. } => "budget_exceeded",
            Self::MutationBlocked => "endpoint_disabled",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::ModelNotFound(_) => "model_not_found",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::PolicyRefused(_) => "policy_refused",
            Self::CorsOriginNotAllowed => "cors_origin_not_allowed",
            Self::RouteNotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BadRequest(_) => "invalid_request",
            Self::PayloadTooLarge { .. } => "body_too_large",
            Self::LengthRequired => "length_required",
            Self::UnsupportedMediaType => "unsupported_content_encoding",
            Self::RequestTimeout => "request_timeout",
            Self::Unavailable(_) => "service_unavailable",
            Self::UpstreamSaturated => "upstream_saturated",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamProtocol => "upstream_error",
            Self::Internal => "internal_error",
        }
    }

    /// The OpenAI error `type` the official SDKs expect for this status.
    fn openai_type(&self) -> &'static str {
        if matches!(self, Self::BudgetExceeded { .. }) {
            return "insufficient_quota";
        }
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400 | 405 | 408 | 411 | 413 | 415 => "invalid_request_error",
            _ => "api_error",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::AuthThrottled { retry_after } | Self::RateLimited { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::BudgetExceeded { retry_after, .. } => *retry_after,
            Self::Unavailable(_) | Self::UpstreamSaturated => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// A spent budget will not come back soon: clients (the OpenAI SDK) must not retry it.
    pub fn should_retry(&self) -> Option<bool> {
        matches!(self, Self::BudgetExceeded { .. }).then_some(false)
    }

    /// The JSON body in the shape of `surface`.
    pub fn body(&self, surface: Surface) -> Vec<u8> {
        let message = self.to_string();
        let value = match surface {
            Surface::Native => serde_json::json!({ "error": message }),
            Surface::OpenAi => serde_json::json!({
                "error": {
                    "message": message,
                    "type": self.openai_type(),
                    "param": null,
                    "code": self.code(),
                }
            }),
        };
        // Serialising a `Value` built from strings cannot fail; fall back to a fixed body anyway.
        serde_json::to_vec(&value)
            .unwrap_or_else(|_| br#"{"error":"internal gateway error"}"#.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_shape_is_a_plain_string() {
        let body = GatewayError::Unauthorized.body(Surface::Native);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "invalid or missing API key");
    }

    #[test]
    fn openai_shape_has_type_and_code() {
        let body = GatewayError::ModelNotAllowed("x".into()).body(Surface::OpenAi);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["error"]["code"], "model_not_allowed");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn statuses_follow_the_spec_table() {
        assert_eq!(GatewayError::Unauthorized.status(), 401);
        assert_eq!(GatewayError::MutationBlocked.status(), 403);
        assert_eq!(GatewayError::RouteNotFound.status(), 404);
        assert_eq!(GatewayError::PayloadTooLarge { limit: 1 }.status(), 413);
        assert_eq!(GatewayError::BadRequest("x".into()).status(), 400);
        assert_eq!(GatewayError::UpstreamUnreachable.status(), 502);
        assert_eq!(GatewayError::UpstreamTimeout.status(), 504);
        assert_eq!(GatewayError::Unavailable("store").status(), 503);
    }
}
