//! A few lines of RESP over a socket: enough for tests to read and change what the gateway
//! keeps in Redis, without a client library.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Nil,
    Int(i64),
    Str(String),
    Error(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            Value::Str(s) => s.parse().ok(),
            _ => None,
        }
    }
}

/// Sends one command to the Redis at `url` (`redis://host:port`) and returns its reply.
pub fn cmd(url: &str, args: &[&str]) -> Value {
    let addr = url.trim_start_matches("redis://").trim_end_matches('/');
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("redis {addr}: {e}"));
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(out.as_bytes()).expect("redis write");
    read(&mut BufReader::new(stream))
}

fn read(r: &mut BufReader<TcpStream>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).expect("redis read");
    let (kind, rest) = line.trim_end().split_at(1);
    match kind {
        "+" => Value::Str(rest.to_string()),
        "-" => Value::Error(rest.to_string()),
        ":" => Value::Int(rest.parse().expect("integer reply")),
        "$" => {
            let n: i64 = rest.parse().expect("bulk length");
            if n < 0 {
                return Value::Nil;
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).expect("bulk body");
            buf.truncate(n as usize);
            Value::Str(String::from_utf8_lossy(&buf).into_owned())
        }
        "*" => {
            let n: i64 = rest.parse().expect("array length");
            if n < 0 {
                return Value::Nil;
            }
            Value::Array((0..n).map(|_| read(r)).collect())
        }
        other => panic!("unexpected RESP reply type {other:?}"),
    }
}
