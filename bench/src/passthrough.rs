//! `nz-passthrough`: the baseline for the gateway's overhead. A Pingora 0.9 `ProxyHttp` that
//! forwards every request to one upstream and does nothing else: no auth, no body reading,
//! no accounting. It sets `Host` to the upstream and uses the gateway's peer timeouts, so the
//! difference to the gateway is the gateway's features, not its plumbing.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};

pub struct Passthrough {
    pub upstream: SocketAddr,
    /// `Host` sent upstream (`ip:port`).
    host: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Passthrough {
    pub fn new(upstream: SocketAddr) -> Self {
        // The gateway's defaults (UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_READ_TIMEOUT).
        Passthrough {
            upstream,
            host: upstream.to_string(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(600),
        }
    }
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        upstream_request.insert_header(http::header::HOST, self.host.as_str())?;
        Ok(())
    }
}
