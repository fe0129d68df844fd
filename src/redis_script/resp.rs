//! The few RESP2 frames the script pool writes, and reading replies with `redis-protocol`.

use redis_protocol::resp2::decode::decode;

use super::Arg;
use redis_protocol::resp2::types::{OwnedFrame, Resp2Frame};

/// Appends one command (an array of bulk strings) to `buf`. Writing the frames straight into
/// the connection's reused buffer costs no allocation per argument; `itoa` rather than
/// `write!`, whose formatting machinery cost about 500 instructions per argument.
pub fn command<'a>(buf: &mut Vec<u8>, count: usize, parts: impl Iterator<Item = Arg<'a>>) {
    header(buf, b'*', count as u64);
    for part in parts {
        match part {
            Arg::Str(s) => bulk(buf, s.as_bytes()),
            Arg::Int(n) => bulk(buf, itoa::Buffer::new().format(n).as_bytes()),
        }
    }
}

fn bulk(buf: &mut Vec<u8>, bytes: &[u8]) {
    header(buf, b'$', bytes.len() as u64);
    buf.extend_from_slice(bytes);
    buf.extend_from_slice(b"\r\n");
}

fn header(buf: &mut Vec<u8>, kind: u8, n: u64) {
    buf.push(kind);
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// A reply the buffer does not hold in full yet is `Ok(None)`.
pub fn reply(buf: &[u8]) -> Result<Option<(OwnedFrame, usize)>, String> {
    decode(buf).map_err(|e| e.details().to_string())
}

/// A script's reply as the limiter's scripts give it: a list of integers.
pub fn integers(frame: OwnedFrame) -> Result<Vec<i64>, String> {
    match frame {
        OwnedFrame::Array(items) => items
            .into_iter()
            .map(|item| match item {
                OwnedFrame::Integer(i) => Ok(i),
                other => Err(format!("expected an integer, got {:?}", other.kind())),
            })
            .collect(),
        OwnedFrame::Integer(i) => Ok(vec![i]),
        other => Err(format!("expected a list, got {:?}", other.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut buf = Vec::new();
        let parts = [Arg::Str("EVALSHA"), Arg::Str(""), Arg::Int(-12)];
        command(&mut buf, 3, parts.into_iter());
        assert_eq!(buf, b"*3\r\n$7\r\nEVALSHA\r\n$0\r\n\r\n$3\r\n-12\r\n");
    }

    #[test]
    fn replies_wait_for_the_whole_frame() {
        let full = b"*2\r\n:0\r\n:-12\r\n";
        assert!(reply(&full[..9]).expect("partial").is_none());
        let (frame, used) = reply(full).expect("decode").expect("complete");
        assert_eq!(used, full.len());
        assert_eq!(integers(frame), Ok(vec![0, -12]));
    }

    #[test]
    fn other_replies_are_errors() {
        let (frame, _) = reply(b"*1\r\n$1\r\nx\r\n")
            .expect("decode")
            .expect("complete");
        assert!(integers(frame).is_err());
        assert!(reply(b"?bad\r\n").is_err());
    }
}
