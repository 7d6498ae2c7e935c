//! The endpoint the plugin builds and hands to the agent, and the check
//! the agent makes before anything is touched. The socket is root's, but
//! whatever sends on it (a buggy or compromised plugin, a runtime passing a
//! pod's strings through) must not be able to route another node's or the
//! gateway's address into a pod, write a record outside the state directory
//! (the owner names the record file) or set a multicast MAC as a pod's
//! identity.

use std::{net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{NameError, Owner, PodRange, PodRangeError, format_mac, host_ifname, rules};
use crate::shaping::Bandwidth;

/// A pod interface handed to the agent by the CNI plugin (the socket's
/// wire form; the agent keeps its own versioned record on disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub owner: Owner,
    /// CNI network name.
    pub network: String,
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    /// Bandwidth limits (the CNI `bandwidth` capability); `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// The pod this is an interface of, as kubelet names it in `CNI_ARGS`;
    /// `None`: not said (a runtime without Kubernetes, an older plugin).
    /// Absent from the wire when `None`, so an older agent reads the
    /// requests of a newer plugin that has none to pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// A pod's namespace and name (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// Why an endpoint request is refused; every message starts with
/// `invalid endpoint`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEndpoint {
    #[error("invalid endpoint: {0}")]
    Name(#[from] NameError),
    #[error("invalid endpoint: {0}")]
    PodCidr(#[from] PodRangeError),
    #[error("invalid endpoint: {ip} is not a pod address of this node's pod CIDR {pod_cidr}")]
    NotAPodAddress { ip: Ipv4Addr, pod_cidr: Ipv4Net },
    #[error("invalid endpoint: {which} MAC {mac} is not a unicast address")]
    NotUnicast { which: &'static str, mac: String },
    #[error("invalid endpoint: host interface {found:?} is not this owner's ({expected})")]
    HostIfname { found: String, expected: String },
    #[error("invalid endpoint: bandwidth: {0}")]
    Bandwidth(String),
}

impl Endpoint {
    /// Checks the request against the rules and this node's pod CIDR.
    pub fn validate(&self, pod_cidr: Ipv4Net) -> Result<(), InvalidEndpoint> {
        rules::container_id(&self.owner.container_id)?;
        rules::ifname(&self.owner.ifname)?;
        rules::network_name(&self.network)?;
        if !PodRange::new(pod_cidr)?.contains(self.ip) {
            return Err(InvalidEndpoint::NotAPodAddress {
                ip: self.ip,
                pod_cidr,
            });
        }
        for (which, mac) in [("pod", self.pod_mac), ("host veth", self.host_mac)] {
            // Bit 0 of the first octet: group (multicast/broadcast) address.
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(InvalidEndpoint::NotUnicast {
                    which,
                    mac: format_mac(&mac),
                });
            }
        }
        let expected = host_ifname(&self.owner);
        if self.host_ifname != expected {
            return Err(InvalidEndpoint::HostIfname {
                found: self.host_ifname.clone(),
                expected,
            });
        }
        if let Some(bandwidth) = self.bandwidth {
            bandwidth.validate().map_err(InvalidEndpoint::Bandwidth)?;
        }
        if let Some(pod) = &self.pod {
            rules::pod_ref(&pod.namespace, &pod.name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        let owner = Owner {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        Endpoint {
            host_ifname: host_ifname(&owner),
            owner,
            network: "podnet".into(),
            netns: "/var/run/netns/c1".into(),
            ip: "10.244.0.5".parse().expect("ip"),
            host_ifindex: 7,
            pod_mac: [0x02, 0, 0, 0, 0, 5],
            host_mac: [0x02, 0, 0, 0, 0xff, 5],
            bandwidth: None,
            pod: Some(PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
            }),
        }
    }

    fn check(ep: &Endpoint) -> Result<(), InvalidEndpoint> {
        ep.validate("10.244.0.0/24".parse().expect("cidr"))
    }

    #[test]
    fn a_plugin_made_endpoint_is_valid() {
        check(&endpoint()).expect("valid");
    }

    #[test]
    fn bad_endpoint_requests_are_refused() {
        type Spoil = Box<dyn Fn(&mut Endpoint)>;
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "another node's address",
                Box::new(|e| e.ip = "10.244.1.5".parse().expect("ip")),
            ),
            (
                "the gateway",
                Box::new(|e| e.ip = "10.244.0.1".parse().expect("ip")),
            ),
            (
                "the network address",
                Box::new(|e| e.ip = "10.244.0.0".parse().expect("ip")),
            ),
            (
                "the broadcast address",
                Box::new(|e| e.ip = "10.244.0.255".parse().expect("ip")),
            ),
            (
                "a multicast pod MAC",
                Box::new(|e| e.pod_mac = [0x01, 0, 0x5e, 0, 0, 1]),
            ),
            ("a broadcast host MAC", Box::new(|e| e.host_mac = [0xff; 6])),
            ("a zero pod MAC", Box::new(|e| e.pod_mac = [0; 6])),
            (
                "a path in the container ID",
                Box::new(|e| e.owner.container_id = "../../etc/x".into()),
            ),
            (
                "a path in the ifname",
                Box::new(|e| e.owner.ifname = "a/b".into()),
            ),
            (
                "a colon in the ifname",
                Box::new(|e| e.owner.ifname = "a:b".into()),
            ),
            ("a bad network name", Box::new(|e| e.network = "-x".into())),
            (
                "someone else's host veth",
                Box::new(|e| e.host_ifname = "eth0".into()),
            ),
            (
                "an upper-case pod namespace",
                Box::new(|e| {
                    e.pod = Some(PodRef {
                        namespace: "Default".into(),
                        name: "p".into(),
                    });
                }),
            ),
            (
                "a path in the pod name",
                Box::new(|e| {
                    e.pod = Some(PodRef {
                        namespace: "default".into(),
                        name: "../p".into(),
                    });
                }),
            ),
            (
                "a rate without a burst",
                Box::new(|e| {
                    e.bandwidth = Some(Bandwidth {
                        ingress_rate: 1_000_000,
                        ..Bandwidth::default()
                    });
                }),
            ),
        ];
        for (what, spoil) in cases {
            let mut ep = endpoint();
            spoil(&mut ep);
            let err = check(&ep).expect_err(what);
            assert!(
                err.to_string().starts_with("invalid endpoint"),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn the_pod_ref_is_optional_on_the_wire() {
        let mut ep = endpoint();
        ep.pod = None;
        let json = serde_json::to_string(&ep).expect("encode");
        assert!(!json.contains("\"pod\""), "{json}");
        // What an older plugin sends (no pod ref) decodes, with none.
        let decoded: Endpoint = serde_json::from_str(&json).expect("old request");
        assert_eq!(decoded, ep);
        check(&decoded).expect("valid without a pod ref");
        let with = endpoint();
        let json = serde_json::to_string(&with).expect("encode");
        assert!(
            json.contains(r#""pod":{"namespace":"default","name":"web-0"}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<Endpoint>(&json).expect("decode"),
            with
        );
    }
}
