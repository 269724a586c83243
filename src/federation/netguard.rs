//! Which addresses fedlink may connect to. Peers name the servers fedlink talks to (an
//! `origin` header, a PDU's sender, a signature), so without a guard a hostile peer could
//! make fedlink probe loopback or private networks. Unless `federation.allow_private_networks`
//! is set (loopback test setups, private networks with their own name resolution), fedlink
//! refuses to connect to loopback, private, link-local, CGNAT, multicast and unspecified
//! addresses, whether they come from DNS or from an IP literal.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether `ip` is in a range fedlink does not connect to by default.
pub fn is_blocked(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => blocked_v4(v4),
            None => {
                let s = v6.segments();
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (s[0] & 0xfe00) == 0xfc00 // unique local
                    || (s[0] & 0xffc0) == 0xfe80 // link-local
                    || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 of anything
                    || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation
            }
        },
    }
}

fn blocked_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_multicast()
        || v4.is_broadcast()
        || v4.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
}

/// A DNS resolver for reqwest that drops blocked addresses.
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.filter(|a| !is_blocked(a.ip())).collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves only to addresses fedlink does not connect to").into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Whether a URL host that is an IP literal is blocked (DNS names are checked on lookup).
pub fn literal_blocked(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.parse::<IpAddr>().map(is_blocked).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_internal_ranges_and_allows_public_ones() {
        for ip in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "224.0.0.1"] {
            assert!(is_blocked(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "172.32.0.1"] {
            assert!(!is_blocked(ip.parse().unwrap()), "{ip}");
        }
        assert!(literal_blocked("[::1]") && literal_blocked("127.0.0.1") && !literal_blocked("localhost"));
    }
}
