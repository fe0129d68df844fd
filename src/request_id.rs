//! `X-Request-ID`: a valid incoming one (1–64 of `[A-Za-z0-9._-]`) is kept so a request can be
//! followed across proxies; anything else is replaced by a fresh id: `req_` and the request's
//! audit event id, so a minted request id costs no second random draw.

pub fn accept_or_mint(incoming: Option<&[u8]>, event_id: &uuid::Uuid) -> String {
    match incoming {
        Some(v) if is_valid(v) => String::from_utf8_lossy(v).into_owned(),
        _ => mint(event_id),
    }
}

pub fn is_valid(v: &[u8]) -> bool {
    (1..=64).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn mint(event_id: &uuid::Uuid) -> String {
    let mut digits = uuid::Uuid::encode_buffer();
    let mut id = String::with_capacity(4 + uuid::fmt::Simple::LENGTH);
    id.push_str("req_");
    id.push_str(event_id.simple().encode_lower(&mut digits));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_valid_and_replaces_invalid() {
        let event = uuid::Uuid::now_v7();
        assert_eq!(accept_or_mint(Some(b"abc-1.2_3"), &event), "abc-1.2_3");
        for bad in [
            &b""[..],
            b"a b",
            b"a\r\nx-injected: 1",
            &[b'a'; 65],
            b"\xff",
        ] {
            let id = accept_or_mint(Some(bad), &event);
            assert_eq!(id, format!("req_{}", event.simple()));
            assert!(is_valid(id.as_bytes()));
        }
        assert_eq!(
            accept_or_mint(None, &event),
            format!("req_{}", event.simple())
        );
        assert_ne!(mint(&uuid::Uuid::now_v7()), mint(&uuid::Uuid::now_v7()));
    }
}
