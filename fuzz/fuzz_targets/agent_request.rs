//! A request as the agent reads it from its unix socket (one JSON line):
//! `agent::decode_request`, then for `AddEndpoint` the check the agent makes
//! before touching anything, `Endpoint::validate`, against several
//! pod CIDRs (none of this needs root or a datapath).
//!
//! Invariants: a refusal is one of the agent's messages; a decoded request
//! encodes (as the client sends it) to one line that decodes to the same
//! request; an endpoint the agent accepts has an owner and network that
//! follow the CNI rules (its record file stays in the state directory), an
//! address that is a pod address of the CIDR (not its network, gateway or
//! broadcast address), unicast MACs and the host veth name the plugin
//! derives from its owner.
#![no_main]

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use libfuzzer_sys::fuzz_target;
use podnet::{
    agent::{MAX_REQUEST_BYTES, decode_request},
    api::{Endpoint, Request},
    endpoint::host_ifname,
};
use podnet_fuzz::{is_cni_ifname, is_cni_name, record_stays_in_its_directory};

fuzz_target!(|data: &[u8]| {
    // What the agent's read_line hands over: up to and including the first
    // newline, at most MAX_REQUEST_BYTES + 1 bytes; not UTF-8 is a read error.
    let end = data
        .iter()
        .position(|&b| b == b'\n')
        .map_or(data.len(), |i| i + 1)
        .min(usize::try_from(MAX_REQUEST_BYTES + 1).unwrap_or(usize::MAX));
    let Ok(line) = std::str::from_utf8(&data[..end]) else {
        return;
    };
    let request = match decode_request(line) {
        Ok(request) => request,
        Err(msg) => {
            assert!(
                msg.starts_with("malformed request: ") || msg.starts_with("request larger than "),
                "{msg}"
            );
            return;
        }
    };
    // The client's encoding: one line, and the same request again.
    let sent = serde_json::to_string(&request).expect("a request encodes");
    assert!(!sent.contains('\n'), "{sent}");
    let again = decode_request(&format!("{sent}\n"))
        .unwrap_or_else(|e| panic!("re-encoded request refused: {e}\n{sent}"));
    assert_eq!(again, request);

    if let Request::AddEndpoint { endpoint } = request {
        // Also with the right host veth name, so that the fuzzer gets past
        // that check without finding a SHA-256 preimage.
        let mut named = endpoint.clone();
        named.host_ifname = host_ifname(&named.owner);
        for ep in [endpoint, named] {
            for cidr in pod_cidrs(ep.ip) {
                check_endpoint(&ep, cidr);
            }
        }
    }
});

/// A node's usual CIDR, and CIDRs of several sizes around the endpoint's own
/// address (so the address check passes often enough to reach the others).
fn pod_cidrs(ip: Ipv4Addr) -> Vec<Ipv4Net> {
    let mut cidrs = vec![Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), 24).expect("valid prefix")];
    for prefix in [0, 8, 16, 24, 30, 31, 32] {
        cidrs.push(Ipv4Net::new(ip, prefix).expect("valid prefix").trunc());
    }
    cidrs
}

fn check_endpoint(ep: &Endpoint, pod_cidr: Ipv4Net) {
    let verdict = ep.validate(pod_cidr);
    if pod_cidr.prefix_len() > 30 {
        assert!(verdict.is_err(), "a /31 or /32 has no pod addresses");
        return;
    }
    if let Err(e) = verdict {
        assert!(e.to_string().starts_with("invalid endpoint: "), "{e}");
        return;
    }
    let owner = &ep.owner;
    assert!(is_cni_name(&owner.container_id), "{owner:?}");
    assert!(is_cni_ifname(&owner.ifname), "{owner:?}");
    assert!(is_cni_name(&ep.network), "{:?}", ep.network);
    assert!(record_stays_in_its_directory(owner), "{owner:?}");
    assert!(pod_cidr.contains(&ep.ip));
    let gateway = Ipv4Addr::from(u32::from(pod_cidr.network()) + 1);
    assert!(
        ![pod_cidr.network(), gateway, pod_cidr.broadcast()].contains(&ep.ip),
        "{} in {pod_cidr}",
        ep.ip
    );
    for mac in [ep.pod_mac, ep.host_mac] {
        assert!(mac[0] & 1 == 0 && mac != [0; 6], "{mac:02x?}");
    }
    assert_eq!(ep.host_ifname, host_ifname(owner));
    assert!(is_cni_ifname(&ep.host_ifname));
    // Limits the kernel would refuse (or the reference plugin would) never
    // reach the netlink calls.
    if let Some(bandwidth) = ep.bandwidth {
        assert!(bandwidth.validate().is_ok(), "{bandwidth:?}");
        for tbf in [bandwidth.ingress(), bandwidth.egress()]
            .into_iter()
            .flatten()
        {
            assert!(tbf.kernel_accepts(), "{tbf:?}");
        }
    }
}
