//! CORS for browser clients (SPEC §7): preflights are answered before auth according to
//! `CORS_ALLOWED_ORIGINS` (default: none), and allowed origins get the response headers.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, header};
use pingora::http::RequestHeader;
use pingora::proxy::Session;

use crate::errors::GatewayError;
use crate::respond::{self, ExtraHeaders};
use crate::settings::Settings;

const ALLOWED_METHODS: &str = "GET, HEAD, POST, OPTIONS";
const DEFAULT_ALLOWED_HEADERS: &str = "authorization, content-type, x-request-id";
const EXPOSED: &str = "x-request-id, retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, \
x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens";

fn allowed_origin<'a>(settings: &Settings, req: &'a RequestHeader) -> Option<&'a HeaderValue> {
    let origin = req.headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    settings
        .cors_allowed_origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(text))
        .then_some(origin)
}

/// Headers for an ordinary response to an allowed origin; empty otherwise.
pub fn response_headers(settings: &Settings, req: &RequestHeader) -> ExtraHeaders {
    let Some(origin) = allowed_origin(settings, req) else {
        return Vec::new();
    };
    vec![
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()),
        (header::VARY, HeaderValue::from_static("Origin")),
        (
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED),
        ),
    ]
}

pub fn check_preflight(settings: &Settings, req: &RequestHeader) -> Result<(), GatewayError> {
    match allowed_origin(settings, req) {
        Some(_) => Ok(()),
        None => Err(GatewayError::CorsOriginNotAllowed),
    }
}

pub async fn write_preflight(
    session: &mut Session,
    settings: &Settings,
    request_id: &str,
) -> pingora::Result<()> {
    let req = session.req_header();
    let mut extra = response_headers(settings, req);
    let requested = req
        .headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(DEFAULT_ALLOWED_HEADERS));
    extra.push((
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOWED_METHODS),
    ));
    extra.push((header::ACCESS_CONTROL_ALLOW_HEADERS, requested));
    extra.push((
        HeaderName::from_static("access-control-max-age"),
        HeaderValue::from_static("600"),
    ));
    respond::json(session, 204, Bytes::new(), request_id, &extra).await
}
