//! The Ollama side: peers, upstream header hygiene and the auth header the gateway injects,
//! plus a small prober (`/readyz`, `probe-ollama`) that uses Pingora's own HTTP connector so
//! it speaks to the upstream exactly as the proxy does.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use http::HeaderValue;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use secrecy::{ExposeSecret, SecretString};

use crate::settings::{Settings, UpstreamTarget};

/// Request headers never forwarded: the client's credentials, compression negotiation (the
/// body filters read plain bytes) and hop-by-hop headers (RFC 9110 §7.6.1).
const STRIPPED: [http::HeaderName; 13] = [
    http::header::AUTHORIZATION,
    http::header::COOKIE,
    http::header::ACCEPT_ENCODING,
    http::header::CONNECTION,
    http::HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
    http::HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::UPGRADE,
    http::header::EXPECT,
    // CORS is the gateway's business: Ollama would apply its own origin list (and answer 403)
    // to an origin the gateway allowed.
    http::header::ORIGIN,
];

pub const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

pub struct Upstreams {
    targets: Vec<UpstreamTarget>,
    /// Each target's address, per index: fixed for an IP literal, refreshed by model discovery
    /// for a host name ([`Self::resolve`]), so a request never waits for a name lookup.
    addresses: Arc<Vec<RwLock<Option<SocketAddr>>>>,
    /// Each target's `Host` value, built once.
    host_headers: Vec<HeaderValue>,
    next: AtomicUsize,
    connect_timeout: Duration,
    read_timeout: Duration,
    auth_header: http::HeaderName,
    /// The complete header value, built once; `None` when no upstream token is configured.
    auth_value: Option<HeaderValue>,
    /// For probes and discovery, made on first use: a new connector loads the system's root
    /// certificates (about 17 M instructions), and discovery probes every few seconds.
    probe_connector: std::sync::OnceLock<Connector>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("invalid setting OLLAMA_AUTH_TOKEN: not a valid header value")]
    BadToken,
    #[error("invalid setting OLLAMA_URL: its host is not a valid Host header")]
    BadHost,
}

impl Upstreams {
    pub fn new(settings: &Settings) -> Result<Self, UpstreamConfigError> {
        let auth_value = settings
            .upstream_auth_token
            .as_ref()
            .map(|t| auth_header_value(&settings.upstream_auth_scheme, t))
            .transpose()?;
        let targets = settings.upstreams.clone();
        let addresses = targets
            .iter()
            .map(|t| {
                let literal = t.host.parse::<IpAddr>().ok();
                RwLock::new(literal.map(|ip| SocketAddr::new(ip, t.port)))
            })
            .collect();
        let host_headers = targets
            .iter()
            .map(|t| HeaderValue::from_str(&t.host_header()))
            .collect::<Result<_, _>>()
            .map_err(|_| UpstreamConfigError::BadHost)?;
        Ok(Self {
            targets,
            addresses: Arc::new(addresses),
            host_headers,
            next: AtomicUsize::new(0),
            connect_timeout: settings.upstream_connect_timeout,
            read_timeout: settings.upstream_read_timeout,
            auth_header: settings.upstream_auth_header.clone(),
            auth_value,
            probe_connector: std::sync::OnceLock::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn has_token(&self) -> bool {
        self.auth_value.is_some()
    }

    /// Where a new request starts in the round robin.
    pub fn start_index(&self) -> usize {
        // One upstream needs no rotation, and the shared counter would be a cache line every
        // worker thread writes per request.
        if self.targets.len() == 1 {
            return 0;
        }
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The backend for a request that started at `start`, after `attempt` connect failures.
    pub fn pick(&self, start: usize, attempt: usize) -> usize {
        start.wrapping_add(attempt) % self.targets.len()
    }

    /// The same targets, resolved addresses shared with this one (for the background service
    /// that keeps them current), with a connector of its own.
    pub fn sharing_addresses(&self) -> Upstreams {
        Upstreams {
            targets: self.targets.clone(),
            addresses: self.addresses.clone(),
            host_headers: self.host_headers.clone(),
            next: AtomicUsize::new(0),
            connect_timeout: self.connect_timeout,
            read_timeout: self.read_timeout,
            auth_header: self.auth_header.clone(),
            auth_value: self.auth_value.clone(),
            probe_connector: std::sync::OnceLock::new(),
        }
    }

    /// Looks up every target named by a host name again; a failed lookup keeps the last address.
    pub async fn resolve(&self) {
        for (target, slot) in self.targets.iter().zip(self.addresses.iter()) {
            if target.host.parse::<IpAddr>().is_ok() {
                continue;
            }
            let found = tokio::net::lookup_host((target.host.as_str(), target.port)).await;
            if let Some(addr) = found.ok().and_then(|mut addrs| addrs.next()) {
                *slot.write().unwrap_or_else(PoisonError::into_inner) = Some(addr);
            }
        }
    }

    /// The peer for the proxy's request to target `index`: its resolved address, or, before
    /// the first lookup has finished, its name.
    pub fn peer_at(&self, index: usize) -> Option<HttpPeer> {
        let known = self
            .addresses
            .get(index)
            .and_then(|slot| *slot.read().unwrap_or_else(PoisonError::into_inner));
        match known {
            Some(addr) => Some(self.with_options(HttpPeer::new(addr, false, String::new()))),
            None => self.targets.get(index).map(|t| self.peer(t)),
        }
    }

    pub fn targets(&self) -> &[UpstreamTarget] {
        &self.targets
    }

    /// A peer for `target` by its name (looked up now: probes and discovery only).
    pub fn peer(&self, target: &UpstreamTarget) -> HttpPeer {
        self.with_options(HttpPeer::new(
            (target.host.as_str(), target.port),
            false,
            String::new(),
        ))
    }

    fn with_options(&self, mut peer: HttpPeer) -> HttpPeer {
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout);
        // Per read, response headers included: a first token can take minutes while a model loads.
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer
    }

    /// Rewrites the client's request into what target `index` receives.
    /// `body_len`: the length of the body the gateway sends in place of the client's (it goes
    /// with `Content-Length`, never chunked).
    pub fn prepare_proxied(
        &self,
        req: &mut RequestHeader,
        index: usize,
        path_and_query: &str,
        request_id: &str,
        body_len: Option<usize>,
    ) -> pingora::Result<()> {
        let host = self.host_headers.get(index).cloned().ok_or_else(|| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "no such upstream")
        })?;
        self.rewrite(req, host, path_and_query, request_id, body_len)
    }

    /// Rewrites a request into what `target` receives (probes and discovery).
    pub fn prepare_request(
        &self,
        req: &mut RequestHeader,
        target: &UpstreamTarget,
        path_and_query: &str,
        request_id: &str,
    ) -> pingora::Result<()> {
        let host = HeaderValue::from_str(&target.host_header()).map_err(|_| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "invalid upstream host")
        })?;
        self.rewrite(req, host, path_and_query, request_id, None)
    }

    fn rewrite(
        &self,
        req: &mut RequestHeader,
        host: HeaderValue,
        path_and_query: &str,
        request_id: &str,
        body_len: Option<usize>,
    ) -> pingora::Result<()> {
        // The canonical path only holds RFC 3986 path characters, so this cannot fail; if it
        // ever did, refusing beats forwarding the client's raw URI.
        let uri = path_and_query.parse::<http::Uri>().map_err(|_| {
            pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "canonical path is not a URI",
            )
        })?;
        let request_id = HeaderValue::from_str(request_id).map_err(|_| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "invalid request id")
        })?;
        crate::head::edit_request(req, |parts| {
            parts.uri = uri;
            let headers = &mut parts.headers;
            strip_client_headers(headers);
            headers.insert(http::header::HOST, host);
            if let Some(value) = &self.auth_value {
                headers.insert(self.auth_header.clone(), value.clone());
            }
            headers.insert(X_REQUEST_ID, request_id);
            if let Some(len) = body_len {
                headers.remove(http::header::TRANSFER_ENCODING);
                headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
            }
        });
        Ok(())
    }

    /// GET `path` with the configured auth, for readiness checks and `probe-ollama`.
    pub async fn probe(
        &self,
        target: &UpstreamTarget,
        path: &str,
        timeout: Duration,
    ) -> Result<ProbeResponse, ProbeError> {
        self.probe_as(target, path, timeout, "probe").await
    }

    /// [`Self::probe`] with its own `X-Request-ID`, so the upstream's logs tell who asked.
    pub async fn probe_as(
        &self,
        target: &UpstreamTarget,
        path: &str,
        timeout: Duration,
        request_id: &str,
    ) -> Result<ProbeResponse, ProbeError> {
        tokio::time::timeout(timeout, self.probe_inner(target, path, request_id))
            .await
            .map_err(|_| ProbeError::Timeout)?
    }

    async fn probe_inner(
        &self,
        target: &UpstreamTarget,
        path: &str,
        request_id: &str,
    ) -> Result<ProbeResponse, ProbeError> {
        let connector = self.probe_connector.get_or_init(|| Connector::new(None));
        let peer = self.peer(target);
        let (mut session, _reused) = connector
            .get_http_session(&peer)
            .await
            .map_err(|e| ProbeError::Transport(e.etype().as_str().to_string()))?;
        let mut req =
            RequestHeader::build("GET", path.as_bytes(), None).map_err(|_| ProbeError::Protocol)?;
        self.prepare_request(&mut req, target, path, request_id)
            .map_err(|_| ProbeError::Protocol)?;
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| ProbeError::Transport(e.etype().as_str().to_string()))?;
        session
            .finish_request_body()
            .await
            .map_err(|e| ProbeError::Transport(e.etype().as_str().to_string()))?;
        session
            .read_response_header()
            .await
            .map_err(|e| ProbeError::Transport(e.etype().as_str().to_string()))?;
        let status = session
            .response_header()
            .map(|h| h.status.as_u16())
            .ok_or(ProbeError::Protocol)?;
        let mut body = BytesMut::new();
        while let Some(chunk) = session
            .read_response_body()
            .await
            .map_err(|e| ProbeError::Transport(e.etype().as_str().to_string()))?
        {
            if body.len() + chunk.len() > 4 << 20 {
                return Err(ProbeError::Protocol);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(ProbeResponse {
            status,
            body: body.freeze(),
        })
    }
}

pub struct ProbeResponse {
    pub status: u16,
    pub body: bytes::Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("transport error: {0}")]
    Transport(String),
    #[error("timed out")]
    Timeout,
    #[error("unexpected response")]
    Protocol,
}

fn auth_header_value(
    scheme: &str,
    token: &SecretString,
) -> Result<HeaderValue, UpstreamConfigError> {
    let raw = if scheme.is_empty() {
        token.expose_secret().to_string()
    } else {
        format!("{scheme} {}", token.expose_secret())
    };
    let mut value = HeaderValue::from_str(&raw).map_err(|_| UpstreamConfigError::BadToken)?;
    // Keeps the value out of HPACK tables and debug dumps that honour the flag.
    value.set_sensitive(true);
    Ok(value)
}

/// Removes the client's credentials and hop-by-hop headers, including any header the client
/// named in `Connection` (RFC 9110 §7.6.1).
pub fn strip_client_headers(headers: &mut http::HeaderMap) {
    let connection = headers.get_all(http::header::CONNECTION);
    let listed_in_connection = |name: &http::HeaderName| {
        connection
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
    };
    // The request's own few names are walked once, instead of the list being looked up by
    // name.
    let doomed: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| {
            STRIPPED.contains(name)
                || (listed_in_connection(name)
                // Never let the client's `Connection` list drop what the gateway itself needs.
                && !matches!(
                    name.as_str(),
                    "host" | "content-length" | "transfer-encoding" | "x-request-id"
                ))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_credentials_and_hop_by_hop() {
        let mut req = RequestHeader::build("POST", b"/api/chat", None).unwrap();
        for (k, v) in [
            ("authorization", "Bearer nz_client"),
            ("cookie", "a=b"),
            (
                "connection",
                "keep-alive, X-Secret-Hop, host, content-length",
            ),
            ("x-secret-hop", "1"),
            ("x-secret-hop", "2"),
            ("host", "gw.example"),
            ("content-length", "2"),
            ("keep-alive", "timeout=5"),
            ("origin", "https://app.example"),
            ("accept-encoding", "gzip"),
            ("te", "trailers"),
            ("user-agent", "ua"),
            ("content-type", "application/json"),
        ] {
            req.append_header(k, v).unwrap();
        }
        crate::head::edit_request(&mut req, |parts| strip_client_headers(&mut parts.headers));
        for gone in [
            "authorization",
            "cookie",
            "connection",
            "x-secret-hop",
            "accept-encoding",
            "te",
            "keep-alive",
            "origin",
        ] {
            assert!(req.headers.get(gone).is_none(), "{gone}");
        }
        // Named in `Connection`, but the gateway's own business.
        assert!(req.headers.get("host").is_some());
        assert!(req.headers.get("content-length").is_some());
        assert!(req.headers.get("user-agent").is_some());
        assert!(req.headers.get("content-type").is_some());
    }

    fn upstreams(ollama_url: &str) -> Upstreams {
        let raw = [
            ("DATABASE_URL", "postgres://u@h/d"),
            ("OLLAMA_URL", ollama_url),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Upstreams::new(&Settings::from_map(&raw).unwrap()).unwrap()
    }

    fn address(u: &Upstreams, index: usize) -> Option<SocketAddr> {
        *u.addresses[index].read().unwrap()
    }

    #[tokio::test]
    async fn addresses_are_known_before_any_request() {
        // An IP literal needs no lookup at all.
        let u = upstreams("http://127.0.0.1:11434");
        assert_eq!(
            address(&u, 0),
            Some(SocketAddr::from(([127, 0, 0, 1], 11434)))
        );
        let peer = u.peer_at(0).unwrap();
        assert_eq!(peer._address.to_string(), "127.0.0.1:11434");
        // A name is looked up by `resolve` (model discovery's tick), in the background; the
        // copy that discovery holds shares the addresses with the proxy's.
        let u = upstreams("http://localhost:11435");
        assert_eq!(address(&u, 0), None);
        let background = u.sharing_addresses();
        background.resolve().await;
        let found = address(&u, 0).expect("localhost resolves");
        assert!(found.ip().is_loopback() && found.port() == 11435, "{found}");
        assert_eq!(
            u.peer_at(0).unwrap()._address.to_string(),
            found.to_string()
        );
        assert!(u.peer_at(1).is_none());
        let mut req = RequestHeader::build("GET", b"/api/tags", None).unwrap();
        u.prepare_proxied(&mut req, 0, "/api/tags", "rid", None)
            .unwrap();
        assert_eq!(req.headers.get("host").unwrap(), "localhost:11435");
        assert_eq!(req.headers["x-request-id"], "rid");
        // A body the gateway rewrote goes with its own length, never chunked.
        let mut req = RequestHeader::build("POST", b"/API/Chat?x=1", None).unwrap();
        req.append_header("Transfer-Encoding", "chunked").unwrap();
        req.append_header("Authorization", "Bearer nz_client")
            .unwrap();
        u.prepare_proxied(&mut req, 0, "/api/chat?x=1", "rid", Some(42))
            .unwrap();
        assert_eq!(req.raw_path(), b"/api/chat?x=1");
        assert_eq!(req.headers["content-length"], "42");
        assert!(req.headers.get("transfer-encoding").is_none());
        assert!(req.headers.get("authorization").is_none());
    }

    #[test]
    fn scheme_is_optional() {
        let t = SecretString::from("tok".to_string());
        assert_eq!(auth_header_value("Bearer", &t).unwrap(), "Bearer tok");
        assert_eq!(auth_header_value("", &t).unwrap(), "tok");
        assert!(auth_header_value("Bearer", &SecretString::from("a\nb".to_string())).is_err());
    }
}
