//! The gateway's `ProxyHttp`: one short method per Pingora phase, each delegating to the module
//! named for its concern (SPEC §2).
//!
//! ```text
//! request_filter            request id → path normalisation → mutation block (403, before auth)
//!                           → CORS preflight → route table (404/405) → gateway endpoints
//!                           → client IP → auth (401/429/503) → CIDR (403) → upstream slot (503)
//!                           → body read + model allow-list (413/411/400/403) or /v1/models/{m} (404)
//! upstream_peer             round-robin backend, next one after a connect failure
//! upstream_request_filter   canonical path, strip client credentials + hop-by-hop, Host,
//!                           upstream auth header, X-Request-ID, replayed body's Content-Length
//! request_body_filter       the body held in the CTX goes upstream
//! upstream_response_filter  listings: drop Content-Length (the body is rewritten)
//! response_filter           X-Request-ID, CORS
//! response_body_filter      streams pass untouched; listings are buffered and filtered
//! fail_to_proxy             upstream faults → 502/504 in the caller's surface shape
//! logging                   one line per request; the upstream slot is released with the CTX
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};

use crate::accounting::usage_strip::UsageStripper;
use crate::accounting::{self, Outcome, UsageScanner};
use crate::audit::transcript::{self, PromptRecord};
use crate::audit::{self, AuditEvent, AuditSink};
use crate::auth::{AuthError, Authenticator, bearer_token, client_ip::client_ip};
use crate::body;
use crate::clock;
use crate::cors;
use crate::errors::{GatewayError, Surface};
use crate::limits::{self, Admission, BudgetPeriod, Demand, LimitError, LimitKind, Limiter};
use crate::listing::ListingBuffer;
use crate::metrics;
use crate::models::ModelName;
use crate::policy;
use crate::principal::Principal;
use crate::readiness::Readiness;
use crate::request_id;
use crate::respond::{self, ExtraHeaders};
use crate::routes::{self, Route, RouteKind};
use crate::settings::Settings;
use crate::upstream::Upstreams;

/// Everything the proxy shares across requests.
pub struct AppState {
    pub audit: AuditSink,
    pub settings: Settings,
    pub limiter: Limiter,
    pub auth: Authenticator,
    pub upstreams: Upstreams,
    pub readiness: Readiness,
    pub discovery: Arc<crate::discovery::Discovery>,
    pub inflight: Arc<AtomicUsize>,
    /// The proxy's Redis connection, connected on this runtime by the first request.
    pub redis: Option<Arc<crate::redis_link::RedisLink>>,
}

pub struct Gateway {
    pub state: Arc<AppState>,
}

/// Per-request state: the one place it lives.
pub struct RequestCtx {
    pub request_id: String,
    pub started: Instant,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub surface: Surface,
    pub route: Option<Route>,
    pub path_and_query: std::borrow::Cow<'static, str>,
    pub client_ip: Option<IpAddr>,
    pub principal: Option<Arc<Principal>>,
    pub body: Option<Bytes>,
    pub model: Option<String>,
    pub stream: Option<bool>,
    /// The index of the upstream chosen (`Upstreams::pick`).
    pub target: Option<usize>,
    pub attempt: usize,
    /// This request's place in the round robin (kept across connect retries).
    pub upstream_start: Option<usize>,
    pub listing: Option<ListingBuffer>,
    /// Token accounting over the response body (successful model responses).
    pub scanner: Option<UsageScanner>,
    /// The gateway added `include_usage` upstream; this takes it back out of the stream.
    pub stripper: Option<UsageStripper>,
    strip_usage: bool,
    /// Bytes of the client's own request body (the prompt estimate's basis).
    pub request_body_len: usize,
    /// A strict bound on the prompt's tokens (0 when no TPM limit or budget needs it).
    pub prompt_bound: u64,
    /// The request's own output cap after the policy clamps (`None`: unlimited).
    pub output_cap: Option<u64>,
    /// Where a budget's cap goes in `body` without a second parse (see [`policy::CapSlot`]).
    cap_slot: Option<policy::CapSlot>,
    /// Names this request's usage in Redis, the audit row and `budget_usage`.
    pub event_id: uuid::Uuid,
    /// The UTC day the request was charged to, once it was admitted upstream.
    pub usage_day: Option<chrono::NaiveDate>,
    pub admission: Option<Admission>,
    /// The upstream answered with a stream (NDJSON or SSE), which must end properly.
    streaming_response: bool,
    /// Opted-in keys: the request and a bounded copy of the response, for `prompt_log`.
    pub prompt: Option<PromptCapture>,
    limits_checked: bool,
    pub outcome: Option<Outcome>,
    pub upstream_slot: Option<UpstreamSlot>,
    pub upstream_status: Option<u16>,
    pub first_byte_at: Option<Instant>,
    /// When the request went upstream and when its response ended: the upstream's share of
    /// the total time, for the gateway-overhead metric.
    pub upstream_sent_at: Option<Instant>,
    pub upstream_done_at: Option<Instant>,
    /// The gateway's own refusal, when it produced one (for `fail_to_proxy` and the log).
    pub error: Option<GatewayError>,
    pub cors: ExtraHeaders,
}

/// What prompt logging keeps of one request while it runs.
pub struct PromptCapture {
    request: Bytes,
    response: Vec<u8>,
    /// Set once a text response starts; routes without text (embeddings) keep none.
    format: Option<accounting::Format>,
    truncated: bool,
}

impl PromptCapture {
    fn push(&mut self, chunk: &[u8]) {
        if self.format.is_none() || self.truncated {
            return;
        }
        let room = transcript::MAX_RESPONSE_BYTES.saturating_sub(self.response.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.response
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    fn record(self, ttl_s: i64) -> PromptRecord {
        PromptRecord {
            request: String::from_utf8_lossy(&self.request).into_owned(),
            response: self
                .format
                .map(|_| String::from_utf8_lossy(&self.response).into_owned()),
            format: self.format.map(|f| transcript::format_name(f).to_string()),
            truncated: self.truncated,
            // A TTL beyond chrono's range keeps the row as long as it can be kept.
            expires_at: chrono::TimeDelta::try_seconds(ttl_s)
                .and_then(|d| clock::now().checked_add_signed(d))
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC),
        }
    }
}

/// Prompt-log rows live this long unless `set-prompt-logging --ttl` says otherwise.
const DEFAULT_PROMPT_LOG_TTL_S: i64 = 7 * 86_400;

enum Arrival {
    Route(Route),
    /// An `OPTIONS` preflight, answered before auth.
    Preflight,
}

/// One of `UPSTREAM_MAX_INFLIGHT` slots, released when the CTX is dropped after `logging`.
pub struct UpstreamSlot(Arc<AtomicUsize>);

impl Drop for UpstreamSlot {
    fn drop(&mut self) {
        // Release: shutdown reads 0 here and then expects this request's settlement queued.
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl Gateway {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// Sends the gateway's own error and marks the request as answered.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: GatewayError,
    ) -> pingora::Result<bool> {
        respond::error(
            session,
            &err,
            ctx.surface,
            &ctx.request_id,
            ctx.cors.clone(),
        )
        .await?;
        ctx.error = Some(err);
        Ok(true)
    }

    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Arrival, GatewayError> {
        let req = session.req_header();
        let normalized = routes::normalize_path(req.uri.path())?;
        ctx.surface = routes::surface_of(&normalized);
        if routes::is_blocked(&normalized) {
            return Err(GatewayError::MutationBlocked);
        }
        ctx.cors = cors::response_headers(&self.state.settings, req);
        if req.method == http::Method::OPTIONS {
            return Ok(Arrival::Preflight);
        }
        let route = routes::classify(&req.method, &normalized)?;
        ctx.path_and_query = match req.uri.query() {
            Some(q) => format!("{}?{q}", route.path).into(),
            None => route.path.clone(),
        };
        Ok(Arrival::Route(route))
    }

    /// The client address (SPEC §3), needed by the throttle, CIDR policies and the audit log.
    fn find_client_ip(&self, session: &Session) -> Option<IpAddr> {
        let forwarded = session
            .req_header()
            .headers
            .get_all(X_FORWARDED_FOR)
            .into_iter()
            .filter_map(|v| v.to_str().ok());
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        client_ip(peer, forwarded, &self.state.settings.trusted_proxies)
    }

    async fn authenticate(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<Arc<Principal>, GatewayError> {
        let req = session.req_header();
        let token = bearer_token(
            req.headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        let principal = match self.state.auth.authenticate(token, ctx.client_ip).await {
            Ok(p) => p,
            Err(AuthError::Rejected(reason)) => {
                metrics::AUTH_FAILURES
                    .with_label_values(&[reason.to_string().as_str()])
                    .inc();
                tracing::info!(request_id = %ctx.request_id, %reason, "authentication refused");
                return Err(GatewayError::Unauthorized);
            }
            Err(AuthError::Throttled(retry_after)) => {
                metrics::AUTH_FAILURES
                    .with_label_values(&["throttled"])
                    .inc();
                return Err(GatewayError::AuthThrottled { retry_after });
            }
            Err(AuthError::Unavailable) => {
                return Err(GatewayError::Unavailable("authentication store"));
            }
        };
        if !principal.admits_ip(ctx.client_ip) {
            return Err(GatewayError::SourceNotAllowed);
        }
        Ok(principal)
    }

    fn take_upstream_slot(&self) -> Result<UpstreamSlot, GatewayError> {
        let inflight = &self.state.inflight;
        let before = inflight.fetch_add(1, Ordering::Relaxed);
        let slot = UpstreamSlot(inflight.clone());
        if before >= self.state.settings.upstream_max_inflight {
            return Err(GatewayError::UpstreamSaturated);
        }
        Ok(slot)
    }

    /// Reads the body where the route names a model and enforces the allow-list.
    async fn check_model(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &Route,
        principal: &Principal,
    ) -> Result<(), GatewayError> {
        if let Some(model) = &route.path_model {
            return match ModelName::parse(model) {
                Some(m) if principal.models.permits(&m) => Ok(()),
                _ => Err(GatewayError::ModelNotFound(truncate(model))),
            };
        }
        let Some(field) = route.model_field() else {
            return Ok(());
        };
        if session
            .req_header()
            .headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() != b"identity")
        {
            return Err(GatewayError::UnsupportedMediaType);
        }
        let bytes = body::read_whole(session, self.state.settings.max_request_body_bytes).await?;
        // One parse of the body serves the model check, the clamps and the edits.
        let members = body::Members::of(&bytes)?;
        let parsed = members.read(field)?;
        let mut name = ModelName::parse(&parsed.model)
            .ok_or_else(|| GatewayError::BadRequest("invalid model name".into()))?;
        if self.state.discovery.is_remote(&name) {
            // A local alias of a cloud model: only an explicit list entry allows it.
            name = name.into_cloud();
        }
        if !principal.models.permits(&name) {
            return Err(GatewayError::ModelNotAllowed(truncate(&parsed.model)));
        }
        ctx.request_body_len = bytes.len();
        if principal.prompt_logging && route.kind != RouteKind::ApiShow {
            ctx.prompt = Some(PromptCapture {
                request: bytes.clone(),
                response: Vec::new(),
                format: None,
                truncated: false,
            });
        }
        let clamped = policy::clamp(route.kind, &members, principal)?;
        let mut edits = clamped.edits;
        // OpenAI streams carry usage only when asked: ask upstream, hide it from the client.
        if matches!(
            route.kind,
            RouteKind::V1ChatCompletions | RouteKind::V1Completions
        ) && parsed.stream == Some(true)
            && !parsed.include_usage
        {
            ctx.strip_usage = true;
            edits.push(members.include_usage_edit()?);
        }
        let edited = (!edits.is_empty())
            .then(|| members.edited(&edits))
            .transpose()?;
        if clamped.output_cap.is_none() {
            ctx.cap_slot = policy::CapSlot::find(
                route.kind,
                &members,
                &edits,
                edited.as_deref().unwrap_or(&bytes),
            );
        }
        drop(members);
        let bytes = edited.unwrap_or(bytes);
        if limits::counts_tokens(principal) && route.kind.consumes_tokens() {
            ctx.prompt_bound =
                limits::reservation::prompt_bound(&bytes, &self.state.settings.budgets);
        }
        ctx.output_cap = clamped.output_cap;
        ctx.model = Some(name.into_string());
        ctx.stream = parsed.stream;
        ctx.body = Some(bytes);
        Ok(())
    }

    /// Charges the request to every limit and budget in one Redis round trip, and writes a
    /// budget's output cap into the body that goes upstream.
    async fn admit_limits(&self, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
        let Some(principal) = ctx.principal.clone() else {
            return Ok(());
        };
        let periods = clock::periods_now();
        let demand = Demand {
            prompt_bound: ctx.prompt_bound,
            output_cap: ctx.output_cap,
            periods,
            event_id: ctx.event_id,
        };
        let admission = self
            .state
            .limiter
            .admit(&principal, &demand)
            .await
            .map_err(limit_refusal)?;
        ctx.usage_day = Some(periods.day);
        let clamp = admission.as_ref().and_then(|a| a.clamp_output);
        // Held by the CTX first: whatever happens next, `logging` settles it.
        ctx.admission = admission;
        if let (Some(cap), Some(slot), Some(body)) = (clamp, ctx.cap_slot, ctx.body.as_ref())
            && let Some(capped) = slot.write(body, cap)
        {
            ctx.body = Some(capped);
        } else if let (Some(cap), Some(route), Some(body)) =
            (clamp, ctx.route.as_ref(), ctx.body.as_ref())
        {
            // One parse serves the edit's `options` and the rewrite.
            let members = body::Members::unchecked(body)?;
            let edits = policy::output_cap_edit(route.kind, &members, cap)?;
            if !edits.is_empty() {
                let capped = members.edited(&edits)?;
                ctx.body = Some(capped);
            }
        }
        Ok(())
    }

    /// Settles as soon as the upstream's body has ended, while its last bytes go out, so the
    /// settlement is queued before the client can send its next request (which then carries
    /// it to Redis). Shutdown sends what is still queued before it closes Redis.
    fn settle_early(&self, ctx: &mut RequestCtx) {
        let Some(admission) = ctx.admission.take() else {
            return;
        };
        let actual = ctx.outcome.as_ref().map_or(0, |o| o.usage.total());
        self.state.limiter.settle(admission, actual);
    }

    async fn serve_gateway_endpoint(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        kind: &RouteKind,
    ) -> pingora::Result<bool> {
        match kind {
            RouteKind::Healthz => {
                respond::json(
                    session,
                    200,
                    Bytes::from_static(br#"{"status":"ok"}"#),
                    &ctx.request_id,
                    &ctx.cors,
                )
                .await?;
            }
            RouteKind::Root => {
                // Ollama clients probe `/` and some compare the text.
                respond::write(
                    session,
                    200,
                    "text/plain; charset=utf-8",
                    Bytes::from_static(b"Ollama is running"),
                    &ctx.request_id,
                    &ctx.cors,
                )
                .await?;
            }
            _ => {
                let report = self
                    .state
                    .readiness
                    .check(&self.state.upstreams, self.state.discovery.current())
                    .await;
                respond::json(
                    session,
                    report.status(),
                    report.body(),
                    &ctx.request_id,
                    &ctx.cors,
                )
                .await?;
            }
        }
        Ok(true)
    }
}

/// The audit row of a finished request (SPEC §9): never prompt content, nothing secret. Takes
/// the CTX's strings instead of copying them: it is the request's last use of them.
fn audit_event(
    session: &Session,
    ctx: &mut RequestCtx,
    status: u16,
    total: Duration,
) -> AuditEvent {
    let req = session.req_header();
    let principal = ctx.principal.as_deref();
    let outcome = ctx.outcome.as_ref();
    let header = |name: http::HeaderName| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| audit::bounded(v, 256))
    };
    AuditEvent {
        event_id: ctx.event_id,
        ts: ctx.started_at,
        request_id: std::mem::take(&mut ctx.request_id),
        tenant_id: principal.map(|p| p.tenant_id),
        key_id: principal.map(|p| p.key_id),
        key_prefix: principal.map(|p| p.key_prefix.clone()),
        client_ip: ctx.client_ip,
        method: audit::bounded(req.method.as_str(), 16),
        path: ctx
            .route
            .take()
            .map_or_else(|| audit::bounded(req.uri.path(), 512).into(), |r| r.path),
        surface: ctx.surface.as_str().into(),
        model: ctx.model.take(),
        stream: ctx.stream,
        status: i32::from(status),
        upstream_status: ctx.upstream_status.map(i32::from),
        error_code: ctx.error.as_ref().map(|e| e.code().to_string()),
        prompt_tokens: outcome.map(|o| o.usage.prompt_tokens as i64),
        completion_tokens: outcome.map(|o| o.usage.completion_tokens as i64),
        bytes_in: (ctx.request_body_len > 0).then_some(ctx.request_body_len as i64),
        bytes_out: Some(session.body_bytes_sent() as i64),
        ttfb_ms: ctx
            .first_byte_at
            .map(|t| (t - ctx.started).as_secs_f64() * 1e3),
        latency_ms: total.as_secs_f64() * 1e3,
        user_agent: header(http::header::USER_AGENT),
        usage_day: ctx.usage_day,
        prompt: None,
    }
}

const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// OpenAI's rate-limit header names: limit, remaining, reset.
const RATE_HEADERS_REQUESTS: [http::HeaderName; 3] = [
    http::HeaderName::from_static("x-ratelimit-limit-requests"),
    http::HeaderName::from_static("x-ratelimit-remaining-requests"),
    http::HeaderName::from_static("x-ratelimit-reset-requests"),
];
const RATE_HEADERS_TOKENS: [http::HeaderName; 3] = [
    http::HeaderName::from_static("x-ratelimit-limit-tokens"),
    http::HeaderName::from_static("x-ratelimit-remaining-tokens"),
    http::HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// Writes the `x-ratelimit-*` headers. Their values are slices of one buffer instead of an
/// allocation each.
fn rate_limit_headers(
    resp: &mut http::HeaderMap,
    h: &crate::limits::RateHeaders,
) -> pingora::Result<()> {
    let mut buf = BytesMut::with_capacity(64);
    let mut digits = itoa::Buffer::new();
    let value = |buf: &mut BytesMut| {
        http::HeaderValue::from_maybe_shared(buf.split().freeze()).map_err(|e| {
            pingora::Error::because(ErrorType::InternalError, "rate-limit header value", e)
        })
    };
    // Writing to a BytesMut cannot fail.
    let _ = crate::limits::write_reset_value(&mut buf, h.reset_secs);
    let reset = value(&mut buf)?;
    for ([limit_name, remaining_name, reset_name], values) in [
        (RATE_HEADERS_REQUESTS, h.requests),
        (RATE_HEADERS_TOKENS, h.tokens),
    ] {
        let Some((limit, remaining)) = values else {
            continue;
        };
        for (name, n) in [(limit_name, limit), (remaining_name, remaining)] {
            buf.extend_from_slice(digits.format(n).as_bytes());
            resp.insert(name, value(&mut buf)?);
        }
        resp.insert(reset_name, reset.clone());
    }
    Ok(())
}

fn limit_refusal(e: LimitError) -> GatewayError {
    match e {
        LimitError::Unavailable { budgets: false } => GatewayError::Unavailable("rate limiter"),
        LimitError::Unavailable { budgets: true } => {
            GatewayError::Unavailable("rate limiter and budget store")
        }
        LimitError::BudgetBusy { scope } => {
            metrics::RATE_LIMITED
                .with_label_values(&[scope.as_str(), "budget_in_flight"])
                .inc();
            GatewayError::RateLimited {
                message: format!(
                    "The token budget of this {} is held by requests in flight. Please try again in 1s.",
                    scope.as_str()
                ),
                retry_after: std::time::Duration::from_secs(1),
            }
        }
        LimitError::Reseeding => {
            metrics::RATE_LIMITED
                .with_label_values(&["any", "budget_reseeding"])
                .inc();
            GatewayError::Unavailable("budget counters are being restored")
        }
        LimitError::Budget {
            scope,
            period,
            limit,
            retry_after,
        } => {
            let kind = match period {
                BudgetPeriod::Daily => "budget_daily",
                BudgetPeriod::Monthly => "budget_monthly",
                BudgetPeriod::Total => "budget_total",
            };
            metrics::RATE_LIMITED
                .with_label_values(&[scope.as_str(), kind])
                .inc();
            let when = match period {
                BudgetPeriod::Total => "It does not renew.".to_string(),
                _ => format!(
                    "It renews at the start of the next UTC {}.",
                    if period == BudgetPeriod::Daily {
                        "day"
                    } else {
                        "month"
                    }
                ),
            };
            GatewayError::BudgetExceeded {
                message: format!(
                    "The {} token budget of this {} ({limit} tokens) has no room for this request. {when}",
                    period.as_str(),
                    scope.as_str(),
                ),
                retry_after,
            }
        }
        LimitError::Exceeded {
            scope,
            kind,
            limit,
            retry_after,
        } => {
            let kind_label = match kind {
                LimitKind::Requests => "requests",
                LimitKind::Tokens => "tokens",
                LimitKind::Concurrency => "concurrency",
            };
            metrics::RATE_LIMITED
                .with_label_values(&[scope.as_str(), kind_label])
                .inc();
            let what = match kind {
                LimitKind::Requests => "requests per minute (RPM)",
                LimitKind::Tokens => "tokens per minute (TPM)",
                LimitKind::Concurrency => "concurrent requests",
            };
            GatewayError::RateLimited {
                message: format!(
                    "Rate limit reached for this {} on {what}: limit {limit}. Please try again in {}s.",
                    scope.as_str(),
                    retry_after.as_secs()
                ),
                retry_after,
            }
        }
    }
}

/// The error frame for a stream that ended without its terminator, when that is the case.
fn unfinished_stream_frame(ctx: &RequestCtx) -> Option<&'static [u8]> {
    if !ctx.streaming_response {
        return None;
    }
    let scanner = ctx.scanner.as_ref()?;
    let outcome = scanner.finish(ctx.request_body_len);
    if outcome.completed || outcome.in_band_error {
        return None;
    }
    accounting::incomplete_stream_frame(scanner.format())
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Maps a Pingora error to the gateway error the client sees; `None` when the client is gone.
fn classify_proxy_error(e: &Error) -> Option<GatewayError> {
    if e.esource() == &ErrorSource::Downstream {
        return None;
    }
    Some(match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            GatewayError::UpstreamTimeout
        }
        ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::SocketError => GatewayError::UpstreamUnreachable,
        _ if e.esource() == &ErrorSource::Upstream => GatewayError::UpstreamProtocol,
        _ => GatewayError::Internal,
    })
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora holds the CTX by value in the future of every request, and rustc copies
    /// a future's whole state as it is built and awaited. 1 KiB of CTX made those copies
    /// 3.4 KiB longer per request than a passthrough's; a pointer makes them the same.
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Self::CTX {
        let now = std::time::SystemTime::now();
        Box::new(RequestCtx {
            request_id: String::new(),
            started: Instant::now(),
            started_at: now.into(),
            surface: Surface::Native,
            route: None,
            path_and_query: std::borrow::Cow::Borrowed(""),
            client_ip: None,
            principal: None,
            body: None,
            model: None,
            stream: None,
            target: None,
            attempt: 0,
            upstream_start: None,
            listing: None,
            scanner: None,
            stripper: None,
            strip_usage: false,
            request_body_len: 0,
            prompt_bound: 0,
            // Routes without a model body (listings, version) spend no tokens; model routes
            // set their own cap in `check_model`.
            output_cap: Some(0),
            cap_slot: None,
            event_id: crate::audit::new_event_id(now),
            usage_day: None,
            admission: None,
            streaming_response: false,
            prompt: None,
            limits_checked: false,
            outcome: None,
            upstream_slot: None,
            upstream_status: None,
            first_byte_at: None,
            upstream_sent_at: None,
            upstream_done_at: None,
            error: None,
            cors: Vec::new(),
        })
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<bool> {
        // `started` is from `new_ctx`, which Pingora calls once the request head is read.
        ctx.client_ip = self.find_client_ip(session);
        ctx.request_id = request_id::accept_or_mint(
            session
                .req_header()
                .headers
                .get(crate::upstream::X_REQUEST_ID)
                .map(|v| v.as_bytes()),
            &ctx.event_id,
        );
        let route = match self.admit(session, ctx).await {
            Ok(Arrival::Route(route)) => route,
            Ok(Arrival::Preflight) => {
                if let Err(e) = cors::check_preflight(&self.state.settings, session.req_header()) {
                    return self.refuse(session, ctx, e).await;
                }
                cors::write_preflight(session, &self.state.settings, &ctx.request_id).await?;
                return Ok(true);
            }
            Err(e) => return self.refuse(session, ctx, e).await,
        };
        // Liveness probes never wait for Redis; readiness reports it.
        if let Some(link) = &self.state.redis
            && !matches!(route.kind, RouteKind::Healthz | RouteKind::Root)
        {
            link.ensure_connected().await;
        }
        if route.is_gateway_endpoint() {
            let kind = route.kind;
            ctx.route = Some(route);
            // Boxed, as a rare path: its future would enlarge every request's.
            return Box::pin(self.serve_gateway_endpoint(session, ctx, &kind)).await;
        }
        ctx.route = Some(route.clone());
        if self.state.audit.backlogged() {
            // Serving unaudited is not an option; the writer is behind (Postgres slow or down
            // and the spool not keeping up).
            return self
                .refuse(session, ctx, GatewayError::Unavailable("audit backlog"))
                .await;
        }
        let principal = match self.authenticate(session, ctx).await {
            Ok(p) => p,
            Err(e) => return self.refuse(session, ctx, e).await,
        };
        ctx.principal = Some(principal.clone());
        if let Err(e) = self.check_model(session, ctx, &route, &principal).await {
            return self.refuse(session, ctx, e).await;
        }
        // Taken only once the body is in: a slow uploader holds no upstream slot.
        match self.take_upstream_slot() {
            Ok(slot) => ctx.upstream_slot = Some(slot),
            Err(e) => return self.refuse(session, ctx, e).await,
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        let start = *ctx
            .upstream_start
            .get_or_insert_with(|| self.state.upstreams.start_index());
        let target = self.state.upstreams.pick(start, ctx.attempt);
        let peer =
            self.state.upstreams.peer_at(target).ok_or_else(|| {
                Error::explain(ErrorType::InternalError, "no upstream configured")
            })?;
        ctx.target = Some(target);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the backend yet, so trying the next one is safe even for POST.
        ctx.attempt += 1;
        e.set_retry(ctx.attempt < self.state.upstreams.len());
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        // Once per request, not per connect attempt.
        if !ctx.limits_checked {
            ctx.limits_checked = true;
            if let Err(err) = self.admit_limits(ctx).await {
                let status = err.status();
                ctx.error = Some(err);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(status),
                    "refused by rate limits or budgets",
                ));
            }
        }
        ctx.upstream_sent_at = Some(Instant::now());
        let Some(target) = ctx.target else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no upstream chosen",
            ));
        };
        self.state.upstreams.prepare_proxied(
            upstream_request,
            target,
            &ctx.path_and_query,
            &ctx.request_id,
            ctx.body.as_ref().map(Bytes::len),
        )
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        if let Some(held) = &ctx.body {
            // A refcount clone, not a copy; Pingora's replay buffer only triggered this call.
            *body = Some(if end_of_stream {
                held.clone()
            } else {
                Bytes::new()
            });
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        ctx.first_byte_at.get_or_insert_with(Instant::now);
        if status == 200
            && let Some(route) = ctx.route.as_ref()
        {
            let content_type = upstream_response
                .headers
                .get(http::header::CONTENT_TYPE)
                .map_or(&b""[..], |v| v.as_bytes());
            ctx.scanner = accounting::scanner_for(route.kind, content_type);
            let event_stream = content_type.starts_with(b"text/event-stream");
            ctx.streaming_response =
                event_stream || content_type.starts_with(b"application/x-ndjson");
            if let (Some(capture), Some(scanner)) = (ctx.prompt.as_mut(), ctx.scanner.as_ref())
                && route.kind.generates_text()
            {
                capture.format = Some(scanner.format());
            }
            if ctx.strip_usage && event_stream {
                ctx.stripper = Some(UsageStripper::new(route.kind == RouteKind::V1Completions));
            }
            // The body may change length (the usage event cut out, a closing error frame
            // added): it goes out chunked.
            if ctx.streaming_response {
                upstream_response.remove_header(&http::header::CONTENT_LENGTH);
            }
        }
        let is_listing = ctx.route.as_ref().and_then(Route::listing).is_some();
        if is_listing && status == 200 && session.req_header().method != http::Method::HEAD {
            upstream_response.remove_header(&http::header::CONTENT_LENGTH);
            ctx.listing = Some(ListingBuffer::default());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        let request_id = http::HeaderValue::from_str(&ctx.request_id).map_err(|e| {
            pingora::Error::because(ErrorType::InternalError, "request id header value", e)
        })?;
        crate::head::edit_response(upstream_response, |parts| {
            let headers = &mut parts.headers;
            headers.reserve(8 + ctx.cors.len());
            headers.insert(crate::upstream::X_REQUEST_ID, request_id);
            if let Some(a) = ctx.admission.as_ref() {
                rate_limit_headers(headers, &a.headers)?;
            }
            // Only the gateway's CORS policy applies, never Ollama's own.
            let upstream_cors: Vec<http::HeaderName> = headers
                .keys()
                .filter(|k| k.as_str().starts_with("access-control-"))
                .cloned()
                .collect();
            for name in upstream_cors {
                headers.remove(&name);
            }
            for (k, v) in &ctx.cors {
                headers.insert(k.clone(), v.clone());
            }
            Ok(())
        })
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<Option<Duration>> {
        if end_of_stream {
            ctx.upstream_done_at = Some(Instant::now());
        }
        if let (Some(capture), Some(chunk)) = (ctx.prompt.as_mut(), body.as_ref()) {
            capture.push(chunk);
        }
        if let Some(scanner) = ctx.scanner.as_mut() {
            if let Some(chunk) = body.as_ref() {
                scanner.observe(chunk);
            }
            if end_of_stream {
                ctx.outcome = Some(scanner.finish(ctx.request_body_len));
            }
        }
        if end_of_stream {
            if let Some(frame) = unfinished_stream_frame(ctx) {
                let mut out = body.take().map(Vec::from).unwrap_or_default();
                out.extend_from_slice(frame);
                *body = Some(Bytes::from(out));
            }
            self.settle_early(ctx);
        }
        if let Some(stripper) = ctx.stripper.as_mut() {
            let mut out = body
                .take()
                .map(|chunk| stripper.push(chunk))
                .unwrap_or_default();
            if end_of_stream && let Some(tail) = stripper.finish() {
                out = [out, tail].concat().into();
            }
            *body = Some(out);
        }
        let Some(buffer) = ctx.listing.as_mut() else {
            return Ok(None);
        };
        if let Some(chunk) = body.take()
            && buffer.push(&chunk).is_err()
        {
            tracing::warn!(request_id = %ctx.request_id, "upstream listing too large; answering an empty list");
        }
        if end_of_stream {
            let (Some(route), Some(principal)) = (ctx.route.as_ref(), ctx.principal.as_ref())
            else {
                return Err(Error::explain(
                    ErrorType::InternalError,
                    "listing without route or principal",
                ));
            };
            let kind = route.listing().unwrap_or(routes::Listing::OllamaModels);
            let discovery = &self.state.discovery;
            let remote = |m: &ModelName| discovery.is_remote(m);
            let filtered = buffer.finish(kind, &principal.models, &remote).unwrap_or_else(|e| {
                tracing::warn!(request_id = %ctx.request_id, error = %e, "upstream listing unusable; answering an empty list");
                crate::listing::empty(kind)
            });
            *body = Some(filtered);
        }
        Ok(None)
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Self::CTX, _error: &Error) -> bool {
        // The gateway's own refusals (rate limits) are logged once, in `logging`.
        ctx.error.is_some()
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let err = match ctx.error.clone() {
            Some(own) => Some(own),
            None => classify_proxy_error(e),
        };
        let Some(err) = err else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let code = err.status();
        // Pingora does not keep a connection after a proxy failure: say so, so a keep-alive
        // client does not send its next request into a closing socket. Pingora writes the
        // `Connection` header from the session's keep-alive state, whatever the response
        // carries, so that state is what must change.
        session.set_keepalive(None);
        let headers = ctx.cors.clone();
        // A stream cut short by the upstream: close it in its own framing, so the client
        // sees an error rather than a truncated answer.
        if session.response_written().is_some()
            && let Some(frame) = unfinished_stream_frame(ctx)
            && let Err(write_err) = session
                .write_response_body(Some(Bytes::from_static(frame)), true)
                .await
        {
            tracing::debug!(request_id = %ctx.request_id, error = %write_err, "could not close the cut stream");
        }
        // Once a response has started, nothing more can be said.
        if session.response_written().is_none()
            && let Err(write_err) =
                respond::error(session, &err, ctx.surface, &ctx.request_id, headers).await
        {
            tracing::debug!(request_id = %ctx.request_id, error = %write_err, "could not send the error response");
        }
        ctx.error = Some(err);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let total = ctx.started.elapsed();
        let client_gone = e.is_some_and(|e| e.esource() == &ErrorSource::Downstream);
        let route = ctx.route.as_ref().map_or("-", Route::label);
        let principal = ctx.principal.clone();
        let principal = principal.as_deref();
        // A client that went away never brought the body to its end: count what was seen.
        if ctx.outcome.is_none()
            && let Some(scanner) = ctx.scanner.as_ref()
        {
            ctx.outcome = Some(scanner.finish(ctx.request_body_len));
        }
        if let Some(admission) = ctx.admission.take() {
            let actual = ctx.outcome.as_ref().map_or(0, |o| o.usage.total());
            self.state.limiter.settle(admission, actual);
        }
        let outcome = ctx.outcome.as_ref();
        let upstream = ctx.upstream_sent_at.map(|sent| {
            ctx.upstream_done_at
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(sent)
        });
        metrics::record(&metrics::Finished {
            surface: ctx.surface.as_str(),
            route,
            status,
            total,
            upstream,
            upstream_ttfb: ctx
                .upstream_sent_at
                .zip(ctx.first_byte_at)
                .map(|(s, f)| f.saturating_duration_since(s)),
            tenant: principal.map(|p| p.tenant_name.as_str()),
            tokens: outcome.map(|o| (o.usage.prompt_tokens, o.usage.completion_tokens)),
        });
        tracing::info!(
            request_id = %ctx.request_id,
            method = %session.req_header().method,
            route,
            status,
            upstream_status = ctx.upstream_status,
            error_code = ctx.error.as_ref().map(GatewayError::code),
            client_gone,
            tenant = principal.map(|p| p.tenant_name.as_str()),
            key_prefix = principal.map(|p| p.key_prefix.as_str()),
            model = ctx.model.as_deref(),
            client_ip = ctx.client_ip.map(|ip| ip.to_string()),
            ttfb_ms = ctx.first_byte_at.map(|t| (t - ctx.started).as_secs_f64() * 1e3),
            latency_ms = total.as_secs_f64() * 1e3,
            prompt_tokens = outcome.map(|o| o.usage.prompt_tokens),
            completion_tokens = outcome.map(|o| o.usage.completion_tokens),
            usage_reported = outcome.map(|o| o.reported),
            stream_completed = outcome.map(|o| o.completed),
            "request"
        );
        // Health probes (`/healthz`, `/readyz`, `/`) come every few seconds from load
        // balancers; they are counted in metrics, not audited.
        if !ctx.route.as_ref().is_some_and(Route::is_gateway_endpoint) {
            // Only what went upstream has a transcript worth keeping.
            let prompt = ctx.prompt.take().filter(|_| ctx.usage_day.is_some());
            let mut event = audit_event(session, ctx, status, total);
            if let Some(capture) = prompt {
                let ttl = principal
                    .and_then(|p| p.prompt_log_ttl_s)
                    .unwrap_or(DEFAULT_PROMPT_LOG_TTL_S);
                event.prompt = Some(Box::new(capture.record(ttl)));
            }
            self.state.audit.send(event).await;
        }
    }
}
