//! IPv4 CIDRs of `ipBlock`s.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// An `ipBlock` CIDR as an IPv4 network (host bits cleared); `None` for an
/// IPv6 or malformed one (podnet's pods and peers are IPv4: such a block
/// holds no address it can see).
pub(crate) fn parse(cidr: &str) -> Option<Ipv4Net> {
    cidr.parse::<Ipv4Net>().ok().map(|net| net.trunc())
}

/// Whether `address` is in `cidr` and in none of `except`.
pub(crate) fn block_contains(cidr: &str, except: &[String], address: Ipv4Addr) -> bool {
    parse(cidr).is_some_and(|net| net.contains(&address))
        && !except
            .iter()
            .filter_map(|e| parse(e))
            .any(|e| e.contains(&address))
}

/// An address's key bits as the tries hold them (network byte order).
pub(crate) fn key_address(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_excepts() {
        let except = ["10.0.1.0/24".to_owned()];
        assert!(block_contains(
            "10.0.0.0/16",
            &except,
            Ipv4Addr::new(10, 0, 2, 1)
        ));
        assert!(!block_contains(
            "10.0.0.0/16",
            &except,
            Ipv4Addr::new(10, 0, 1, 1)
        ));
        assert!(!block_contains(
            "10.0.0.0/16",
            &except,
            Ipv4Addr::new(10, 1, 0, 1)
        ));
        assert!(block_contains(
            "10.0.0.5/16",
            &[],
            Ipv4Addr::new(10, 0, 9, 9)
        ));
        assert!(!block_contains("fd00::/8", &[], Ipv4Addr::new(10, 0, 0, 1)));
        assert!(block_contains("0.0.0.0/0", &[], Ipv4Addr::new(1, 2, 3, 4)));
    }
}
