//! The client address used for throttling, CIDR restrictions and the audit log: the rightmost
//! `X-Forwarded-For` hop that is not a trusted proxy, when the TCP peer itself is trusted;
//! otherwise the TCP peer. Hops left of an untrusted one are client-controlled and ignored.

use std::net::IpAddr;

use ipnet::IpNet;

/// `forwarded_for` yields the `X-Forwarded-For` header values in order; it is only walked
/// when the peer is a trusted proxy.
pub fn client_ip<'a>(
    peer: Option<IpAddr>,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let peer = peer.map(canonical)?;
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let mut last = peer;
    // Several X-Forwarded-For headers are one list in order.
    for hop in forwarded_for.rev().flat_map(|h| h.rsplit(',')) {
        let Some(ip) = parse_hop(hop) else {
            // A garbled hop cannot be trusted further: stop at the last good address.
            return Some(last);
        };
        if !is_trusted(&ip) {
            return Some(ip);
        }
        last = ip;
    }
    Some(last)
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    // Some proxies append the port: `1.2.3.4:5678` or `[::1]:5678`.
    hop.parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| canonical(s.ip()))
}

/// IPv4-mapped IPv6 addresses compare as IPv4, so one CIDR list covers both listener kinds.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_the_header_says() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_ip(Some(ip("203.0.113.9")), ["1.1.1.1"].into_iter(), &trusted),
            Some(ip("203.0.113.9"))
        );
    }

    #[test]
    fn rightmost_untrusted_hop_wins() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let got = client_ip(
            Some(ip("10.0.0.1")),
            ["6.6.6.6, 198.51.100.7, 10.0.0.2"].into_iter(),
            &trusted,
        );
        assert_eq!(got, Some(ip("198.51.100.7")));
        let split = client_ip(
            Some(ip("10.0.0.1")),
            ["6.6.6.6", "198.51.100.7:443"].into_iter(),
            &trusted,
        );
        assert_eq!(split, Some(ip("198.51.100.7")));
        let all_trusted = client_ip(Some(ip("10.0.0.1")), ["10.0.0.3"].into_iter(), &trusted);
        assert_eq!(all_trusted, Some(ip("10.0.0.3")));
        assert_eq!(
            client_ip(
                Some(ip("10.0.0.1")),
                ["junk, 10.0.0.4"].into_iter(),
                &trusted
            ),
            Some(ip("10.0.0.4"))
        );
    }

    #[test]
    fn mapped_v6_is_v4() {
        assert_eq!(
            client_ip(Some(ip("::ffff:192.0.2.1")), std::iter::empty(), &[]),
            Some(ip("192.0.2.1"))
        );
    }
}
