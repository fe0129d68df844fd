//! HTTP/1.1 keep-alive client: one `hyper` connection per in-flight request, bodies read frame
//! by frame so the first body byte is timestamped, and only the tail of each body kept (the
//! final usage object lives there).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{SendRequest, handshake};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::scenario::{PreparedRequest, SimKnobs};

/// Where requests go: `http://host:port[/prefix]`.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`, used to connect and as the `Host` header.
    pub authority: String,
    /// Path prefix of the base URL without a trailing slash (often empty).
    pub prefix: String,
}

impl Target {
    pub fn parse(base_url: &str) -> anyhow::Result<Self> {
        let Some(rest) = base_url.strip_prefix("http://") else {
            if base_url.starts_with("https://") {
                bail!(
                    "https base URLs are not supported by nz-bench yet; point it at the plain-HTTP \
                     listener (the gateway itself, behind the TLS terminator)"
                );
            }
            bail!("base URL must start with http:// (got `{base_url}`)");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            bail!("base URL `{base_url}` has no host");
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Target {
            authority,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The status line arrived (any code) and the body was read to its end.
    Status(u16),
    /// Connect, write or read failed, or the body ended early.
    Transport,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub outcome: Outcome,
    /// When the first body byte arrived (None: no body byte).
    pub first_byte: Option<Instant>,
    pub done: Instant,
    pub completion_tokens: u64,
    pub body_bytes: u64,
}

/// One open connection, ready for the next request.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(target: &Target) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(&target.authority)
            .await
            .with_context(|| format!("connecting to {}", target.authority))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the connection closes or the sender is dropped; errors show up on the
            // request that was using it.
            let _ = conn.await;
        });
        Ok(Conn { sender })
    }

    pub fn is_usable(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// Everything a request needs besides the connection.
pub struct RequestSpec<'a> {
    pub target: &'a Target,
    pub key: &'a str,
    pub req: &'a PreparedRequest,
    pub sim: SimKnobs,
}

/// Bytes kept from the end of each body to find the final usage numbers.
const TAIL: usize = 8 * 1024;

/// Sends one request on `conn` and reads the whole response. Returns the connection when it
/// can be reused (not when the server said `Connection: close`).
pub async fn send(mut conn: Conn, spec: &RequestSpec<'_>) -> (Timing, Option<Conn>) {
    match send_inner(&mut conn, spec).await {
        Ok((t, closing)) => {
            let reusable = !closing && conn.is_usable();
            (t, reusable.then_some(conn))
        }
        Err(_) => (failed(), None),
    }
}

pub fn failed() -> Timing {
    Timing {
        outcome: Outcome::Transport,
        first_byte: None,
        done: Instant::now(),
        completion_tokens: 0,
        body_bytes: 0,
    }
}

async fn send_inner(conn: &mut Conn, spec: &RequestSpec<'_>) -> anyhow::Result<(Timing, bool)> {
    let resp = start(conn, spec).await?;
    let status = resp.status().as_u16();
    let closing = resp
        .headers()
        .get(hyper::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let mut body = resp.into_body();
    let mut first_byte = None;
    let mut tail: Vec<u8> = Vec::new();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            if data.is_empty() {
                continue;
            }
            if first_byte.is_none() {
                first_byte = Some(Instant::now());
            }
            body_bytes += data.len() as u64;
            keep_tail(&mut tail, &data);
        }
    }
    let timing = Timing {
        outcome: Outcome::Status(status),
        first_byte,
        done: Instant::now(),
        completion_tokens: completion_tokens(&tail),
        body_bytes,
    };
    Ok((timing, closing))
}

/// Sends the request and returns the response head with its body still unread.
pub async fn start(
    conn: &mut Conn,
    spec: &RequestSpec<'_>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    conn.sender.ready().await?;
    let mut b = hyper::Request::post(format!("{}{}", spec.target.prefix, spec.req.path))
        .header(hyper::header::HOST, spec.target.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::AUTHORIZATION, format!("Bearer {}", spec.key));
    if let Some(c) = spec.sim.chunks {
        b = b.header("x-sim-chunks", c);
    }
    if let Some(d) = spec.sim.chunk_delay_ms {
        b = b.header("x-sim-delay-ms", d);
    }
    let req = b.body(Full::new(spec.req.body.clone()))?;
    Ok(conn.sender.send_request(req).await?)
}

fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    if data.len() >= TAIL {
        tail.clear();
        tail.extend_from_slice(&data[data.len() - TAIL..]);
        return;
    }
    let overflow = (tail.len() + data.len()).saturating_sub(TAIL);
    if overflow > 0 {
        tail.drain(..overflow);
    }
    tail.extend_from_slice(data);
}

/// Completion tokens from the last usage numbers in a body tail: native `eval_count`, OpenAI
/// `completion_tokens`, Responses `output_tokens`. The last occurrence wins (final object).
pub fn completion_tokens(tail: &[u8]) -> u64 {
    const KEYS: [&[u8]; 3] = [
        b"\"eval_count\":",
        b"\"completion_tokens\":",
        b"\"output_tokens\":",
    ];
    let mut best: Option<(usize, u64)> = None;
    for key in KEYS {
        if let Some(pos) = rfind(tail, key) {
            let digits = tail[pos + key.len()..]
                .iter()
                .skip_while(|b| **b == b' ')
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |acc, d| {
                    acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
                });
            if best.is_none_or(|(p, _)| pos > p) {
                best = Some((pos, digits));
            }
        }
    }
    best.map_or(0, |(_, n)| n)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| &hay[i..i + needle.len()] == needle)
}

/// Waits for the first body byte of a streamed response, then keeps reading (and discarding)
/// until `stop` fires or the stream ends. Used to hold idle streams open.
pub async fn hold_stream(
    conn: &mut Conn,
    spec: &RequestSpec<'_>,
    ready: impl FnOnce(bool),
    mut stop: tokio::sync::watch::Receiver<bool>,
    first_byte_timeout: Duration,
) -> anyhow::Result<()> {
    let resp = match start(conn, spec).await {
        Ok(r) => r,
        Err(e) => {
            ready(false);
            return Err(e);
        }
    };
    let ok = resp.status().is_success();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(first_byte_timeout, body.frame()).await;
    let got = matches!(first, Ok(Some(Ok(_))));
    ready(ok && got);
    if !got {
        bail!("no first body byte");
    }
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            f = body.frame() => match f {
                Some(Ok(_)) => {}
                _ => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = Target::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.prefix.as_str()),
            ("127.0.0.1:8080", "")
        );
        let t = Target::parse("http://gw.internal/ollama").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.prefix.as_str()),
            ("gw.internal:80", "/ollama")
        );
        assert!(Target::parse("https://x").is_err());
        assert!(Target::parse("ftp://x").is_err());
    }

    #[test]
    fn counts_tokens_from_last_usage() {
        let native = b"{\"message\":{\"content\":\"tok1 \"},\"done\":false}\n{\"done\":true,\"prompt_eval_count\":3,\"eval_count\":8}\n";
        assert_eq!(completion_tokens(native), 8);
        let sse = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":12,\"total_tokens\":15}}\n\ndata: [DONE]\n\n";
        assert_eq!(completion_tokens(sse), 12);
        let responses = b"event: response.completed\ndata: {\"usage\":{\"input_tokens\":2,\"output_tokens\":5}}\n\n";
        assert_eq!(completion_tokens(responses), 5);
        assert_eq!(completion_tokens(b"{\"embeddings\":[[0.1]]}"), 0);
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Vec::new();
        keep_tail(&mut t, &vec![b'a'; TAIL - 1]);
        keep_tail(&mut t, b"xyz");
        assert_eq!(t.len(), TAIL);
        assert!(t.ends_with(b"xyz"));
        keep_tail(&mut t, &vec![b'b'; TAIL * 2]);
        assert_eq!(t, vec![b'b'; TAIL]);
    }
}
