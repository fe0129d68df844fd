//! `X-Request-ID`: a valid incoming one (1–64 of `[A-Za-z0-9._-]`) is kept so a request can be
//! followed across proxies; anything else is replaced by a fresh id.

pub fn accept_or_mint(incoming: Option<&[u8]>) -> String {
    match incoming {
        Some(v) if is_valid(v) => String::from_utf8_lossy(v).into_owned(),
        _ => mint(),
    }
}

pub fn is_valid(v: &[u8]) -> bool {
    (1..=64).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn mint() -> String {
    format!("req_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_valid_and_replaces_invalid() {
        assert_eq!(accept_or_mint(Some(b"abc-1.2_3")), "abc-1.2_3");
        for bad in [
            &b""[..],
            b"a b",
            b"a\r\nx-injected: 1",
            &[b'a'; 65],
            b"\xff",
        ] {
            let id = accept_or_mint(Some(bad));
            assert!(id.starts_with("req_") && is_valid(id.as_bytes()));
        }
        assert_ne!(mint(), mint());
    }
}
