//! Names of the devices podnet makes for an endpoint. Both are derived from
//! the endpoint's owner alone, so the plugin (which creates the veth), the
//! agent (which finds veths and shapers after a restart and removes what no
//! endpoint has) and DEL without the agent all arrive at the same name.

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

use super::Owner;

/// What every host-side veth podnet makes starts with (and nothing else
/// podnet makes does: the agent's clean-up lists links by this prefix).
pub const HOST_IFNAME_PREFIX: &str = "pn";

/// What every shaper (ifb) device podnet makes starts with. Not `pn`:
/// those are pod veths.
pub const SHAPER_IFNAME_PREFIX: &str = "pbw";

/// Linux interface names are at most 15 bytes (`IFNAMSIZ` - 1).
const IFNAME_MAX: usize = 15;

/// Host-side veth name: stable for (container ID, ifname), 15 bytes: the
/// prefix and the first 13 hex digits of SHA-256(container ID, 0, ifname).
#[must_use]
pub fn host_ifname(owner: &Owner) -> String {
    let digest = Sha256::new()
        .chain_update(owner.container_id.as_bytes())
        .chain_update([0u8])
        .chain_update(owner.ifname.as_bytes())
        .finalize();
    let mut name = String::from(HOST_IFNAME_PREFIX);
    for byte in digest.iter().take(7) {
        let _ = write!(name, "{byte:02x}");
    }
    name.truncate(IFNAME_MAX);
    name
}

/// The ifb device that shapes the egress of the pod on `host_ifname`:
/// the host veth's hash under the shaper prefix, 15 bytes at most.
#[must_use]
pub fn shaper_ifname(host_ifname: &str) -> String {
    let hash = host_ifname
        .strip_prefix(HOST_IFNAME_PREFIX)
        .unwrap_or(host_ifname);
    let mut name = format!("{SHAPER_IFNAME_PREFIX}{hash}");
    name.truncate(IFNAME_MAX);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(container_id: &str, ifname: &str) -> Owner {
        Owner {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_ifname(&owner("c1", "eth0"));
        // The name a running node's veths already have: changing the
        // derivation would orphan every pod across an upgrade.
        assert_eq!(a, "pnec43057c07aaa");
        assert_eq!(a.len(), IFNAME_MAX);
        assert_ne!(a, host_ifname(&owner("c1", "eth1")));
        // The separator keeps ("c1e", "th0") apart from ("c1", "eth0").
        assert_ne!(a, host_ifname(&owner("c1e", "th0")));
    }

    #[test]
    fn shaper_names_follow_their_veth() {
        let host = host_ifname(&owner("c1", "eth0"));
        let shaper = shaper_ifname(&host);
        assert!(shaper.starts_with(SHAPER_IFNAME_PREFIX));
        assert!(!shaper.starts_with(HOST_IFNAME_PREFIX));
        assert_eq!(shaper.len(), IFNAME_MAX);
        assert_eq!(&shaper[3..], &host[2..14]);
    }
}
