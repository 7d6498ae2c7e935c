//! Which addresses of a node's pod CIDR pods may have. IPAM allocates from
//! them, the agent refuses an endpoint outside them, and the plugin and the
//! agent both tell pods the same gateway.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// A pod CIDR too small to hold a gateway and a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod CIDR {cidr} is too small (a node needs at least a /30)")]
pub struct PodRangeError {
    pub cidr: Ipv4Net,
}

/// The node's pod CIDR: the network address is never used, the first host
/// address is the pods' gateway, the broadcast address is never used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRange {
    cidr: Ipv4Net,
}

impl PodRange {
    pub fn new(cidr: Ipv4Net) -> Result<Self, PodRangeError> {
        if cidr.prefix_len() > 30 {
            return Err(PodRangeError { cidr });
        }
        Ok(Self { cidr: cidr.trunc() })
    }

    #[must_use]
    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The pods' default gateway: the first host address.
    #[must_use]
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }

    fn first(self) -> u32 {
        u32::from(self.cidr.network()) + 2
    }

    fn last(self) -> u32 {
        u32::from(self.cidr.broadcast()) - 1
    }

    /// How many addresses pods can get.
    #[must_use]
    pub fn capacity(&self) -> usize {
        (self.last() - self.first() + 1) as usize
    }

    #[must_use]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.first()..=self.last()).contains(&u32::from(ip))
    }

    /// Candidates in round-robin order: after `cursor`, wrapping around.
    pub fn candidates(self, cursor: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let (first, last) = (self.first(), self.last());
        let start = cursor
            .map(u32::from)
            .filter(|c| (first..=last).contains(c))
            .map_or(first, |c| if c == last { first } else { c + 1 });
        (start..=last).chain(first..start).map(Ipv4Addr::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(cidr: &str) -> PodRange {
        PodRange::new(cidr.parse().expect("cidr")).expect("range")
    }

    #[test]
    fn network_gateway_and_broadcast_are_not_pod_addresses() {
        let r = range("10.244.0.0/24");
        assert_eq!(r.gateway(), Ipv4Addr::new(10, 244, 0, 1));
        assert_eq!(r.capacity(), 253);
        for ip in [
            [10, 244, 0, 0],
            [10, 244, 0, 1],
            [10, 244, 0, 255],
            [10, 244, 1, 2],
        ] {
            assert!(!r.contains(Ipv4Addr::from(ip)), "{ip:?}");
        }
        assert!(r.contains(Ipv4Addr::new(10, 244, 0, 2)));
        assert!(r.contains(Ipv4Addr::new(10, 244, 0, 254)));
        assert!(PodRange::new("10.0.0.0/31".parse().expect("cidr")).is_err());
        assert_eq!(range("10.0.0.0/30").capacity(), 1);
    }

    #[test]
    fn candidates_wrap_after_the_cursor() {
        let r = range("10.0.0.0/29");
        let after = |c: Option<[u8; 4]>| -> Vec<u8> {
            r.candidates(c.map(Ipv4Addr::from))
                .map(|ip| ip.octets()[3])
                .collect()
        };
        assert_eq!(after(None), [2, 3, 4, 5, 6]);
        assert_eq!(after(Some([10, 0, 0, 4])), [5, 6, 2, 3, 4]);
        assert_eq!(after(Some([10, 0, 0, 6])), [2, 3, 4, 5, 6]);
        // A cursor outside the range (another CIDR's) starts at the first.
        assert_eq!(after(Some([10, 9, 9, 9])), [2, 3, 4, 5, 6]);
    }
}
