//! Writing the gateway's own responses (errors, health, CORS preflights) to the client, always
//! as JSON with `X-Request-ID`, keeping the connection reusable where Pingora allows it.

use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::errors::{GatewayError, Surface};

/// Extra headers for one response (CORS, `Allow`, ...).
pub type ExtraHeaders = Vec<(http::HeaderName, http::HeaderValue)>;

pub async fn json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    extra: &ExtraHeaders,
) -> pingora::Result<()> {
    write(session, status, "application/json", body, request_id, extra).await
}

pub async fn write(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Bytes,
    request_id: &str,
    extra: &ExtraHeaders,
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
    resp.insert_header(header::CONTENT_TYPE, content_type)?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header("x-request-id", request_id)?;
    for (k, v) in extra {
        resp.append_header(k.clone(), v.clone())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD || body.is_empty();
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

pub async fn error(
    session: &mut Session,
    err: &GatewayError,
    surface: Surface,
    request_id: &str,
    mut extra: ExtraHeaders,
) -> pingora::Result<()> {
    if err.status() == 401 {
        extra.push((
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        ));
    }
    if let Some(retry) = err.retry_after() {
        extra.push((header::RETRY_AFTER, seconds_header(retry)));
    }
    if err.should_retry() == Some(false) {
        extra.push((
            http::HeaderName::from_static("x-should-retry"),
            http::HeaderValue::from_static("false"),
        ));
    }
    json(
        session,
        err.status(),
        Bytes::from(err.body(surface)),
        request_id,
        &extra,
    )
    .await
}

/// Whole seconds, rounded up, at least 1.
pub fn seconds_header(d: Duration) -> http::HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    http::HeaderValue::from(secs.max(1))
}
