//! Protocols and ports of NetworkPolicy rules, and port ranges as prefixes
//! of the rules trie's port field.

use podnet_common::policy::{POLICY_KEY_BITS, POLICY_PREFIX_ANY_PORT};

/// `IPPROTO_TCP`.
pub const TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const UDP: u8 = 17;
/// `IPPROTO_SCTP`.
pub const SCTP: u8 = 132;

/// A rule port's protocol number (`TCP` when absent); `None` for one
/// Kubernetes does not have (validation refuses it: it allows nothing).
pub(crate) fn protocol_number(name: Option<&str>) -> Option<u8> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(TCP),
        "UDP" => Some(UDP),
        "SCTP" => Some(SCTP),
        _ => None,
    }
}

/// The Kubernetes name of a protocol number (the number itself otherwise).
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        TCP => "TCP".to_owned(),
        UDP => "UDP".to_owned(),
        SCTP => "SCTP".to_owned(),
        1 => "ICMP".to_owned(),
        other => other.to_string(),
    }
}

/// The fewest port prefixes covering `[first, last]` exactly: each is a
/// port (host byte order, its bits past the prefix zero) and the prefix
/// length of the whole key (`POLICY_PREFIX_ANY_PORT` + the port bits
/// kept). Empty when `first > last`.
pub fn port_range_prefixes(first: u16, last: u16) -> Vec<(u16, u32)> {
    let mut prefixes = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last);
    while start <= end {
        // The largest aligned block at `start` that ends by `end`.
        let mut bits = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1 << bits) - 1 > end {
            bits -= 1;
        }
        let Ok(port) = u16::try_from(start) else {
            break;
        };
        prefixes.push((port, POLICY_KEY_BITS - bits));
        start += 1 << bits;
    }
    prefixes
}

/// `port` with the bits past a key prefix of `prefix` bits cleared.
pub(crate) fn mask_port(port: u16, prefix: u32) -> u16 {
    let kept = prefix.saturating_sub(POLICY_PREFIX_ANY_PORT).min(16);
    if kept == 0 {
        0
    } else {
        port & (u16::MAX << (16 - kept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(prefixes: &[(u16, u32)], port: u16) -> usize {
        prefixes
            .iter()
            .filter(|(p, prefix)| mask_port(port, *prefix) == *p)
            .count()
    }

    #[test]
    fn ranges_are_covered_exactly_once() {
        let ranges = [
            (0, 0),
            (0, u16::MAX),
            (1, u16::MAX),
            (80, 80),
            (80, 81),
            (79, 81),
            (1000, 2000),
            (1024, 2047),
            (1, 65534),
            (32767, 32768),
            (65535, 65535),
        ];
        for (first, last) in ranges {
            let prefixes = port_range_prefixes(first, last);
            for &(port, prefix) in &prefixes {
                assert!((80..=96).contains(&prefix), "{first}-{last}: {prefix}");
                assert_eq!(mask_port(port, prefix), port, "{first}-{last}: normalized");
            }
            for port in 0..=u16::MAX {
                let expected = usize::from((first..=last).contains(&port));
                assert_eq!(
                    covered(&prefixes, port),
                    expected,
                    "{first}-{last}: port {port}"
                );
            }
        }
        assert_eq!(port_range_prefixes(0, u16::MAX), [(0, 80)]);
        assert_eq!(port_range_prefixes(80, 80), [(80, 96)]);
        assert_eq!(port_range_prefixes(80, 81), [(80, 95)]);
        assert_eq!(port_range_prefixes(79, 81), [(79, 96), (80, 95)]);
        assert_eq!(port_range_prefixes(1, u16::MAX).len(), 16);
        assert!(port_range_prefixes(2, 1).is_empty());
    }

    #[test]
    fn protocols() {
        assert_eq!(protocol_number(None), Some(TCP));
        assert_eq!(protocol_number(Some("UDP")), Some(UDP));
        assert_eq!(protocol_number(Some("SCTP")), Some(SCTP));
        assert_eq!(protocol_number(Some("tcp")), None);
        assert_eq!(protocol_name(SCTP), "SCTP");
        assert_eq!(protocol_name(47), "47");
    }
}
