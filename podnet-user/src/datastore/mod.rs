//! Where the cluster lives: every node's name, underlay address and pod
//! CIDR. Backends: a nodes file (one machine, labs) and etcd v3 (a real
//! distributed store with leases and watches).

pub mod etcd;
pub mod file;
pub mod membership;
pub mod memory;
pub mod objects;
pub mod store;

pub use store::{Datastore, LeaseId, Observation};

use std::{net::Ipv4Addr, path::PathBuf, str::FromStr};

use ipnet::Ipv4Net;

pub use crate::model::NodeRecord;

/// What a node asks for when it joins.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub name: String,
    pub node_ip: Ipv4Addr,
    /// A fixed pod CIDR, or `None` to get one out of the cluster CIDR.
    pub pod_cidr: Option<Ipv4Net>,
    /// Without a fixed CIDR: the one to take if it is free (the node's
    /// CIDR last time, so that a node whose claim was released while it
    /// was away gets it back when nobody took it).
    pub preferred: Option<Ipv4Net>,
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of node pod CIDRs (24).
    pub node_prefix: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("datastore {what}: {action}")]
    Io {
        what: String,
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("datastore {what}: {msg}")]
    Invalid { what: String, msg: String },
    #[error("no free node pod CIDR left in {cluster} (/{prefix} each)")]
    Exhausted { cluster: Ipv4Net, prefix: u8 },
    #[error("pod CIDR {cidr} is already held by node {holder}")]
    Conflict { cidr: Ipv4Net, holder: String },
    #[error("pod CIDR {cidr} is no longer claimed by node {node} (released while it was away)")]
    ClaimLost { cidr: Ipv4Net, node: String },
    #[error("etcd {endpoint}: {action}")]
    Etcd {
        endpoint: String,
        action: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error(transparent)]
    Access(#[from] etcd::EtcdAccessError),
    #[error("etcd {endpoint}: {action}: {msg}")]
    EtcdProtocol {
        endpoint: String,
        action: String,
        msg: String,
    },
}

impl DatastoreError {
    /// Whether etcd refused the request for want of permission (a node's
    /// role may not write another node's keys).
    #[must_use]
    pub fn is_permission_denied(&self) -> bool {
        // gRPC's PERMISSION_DENIED, which etcd answers with
        // "etcdserver: permission denied" (tonic's `Code` is not ours to
        // name: tonic is etcd-client's dependency, not podnet's).
        const PERMISSION_DENIED: i32 = 7;
        matches!(self, Self::Etcd { source, .. }
            if matches!(source.as_ref(), etcd_client::Error::GRpcStatus(status)
                if status.code() as i32 == PERMISSION_DENIED))
    }
}

/// `--datastore` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreSpec {
    /// No cluster: a single node.
    None,
    File(PathBuf),
    Etcd(Vec<String>),
}

impl DatastoreSpec {
    /// The backend's name: `none`, `file` or `etcd`.
    #[must_use]
    pub const fn backend(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::File(_) => "file",
            Self::Etcd(_) => "etcd",
        }
    }
}

impl FromStr for DatastoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "none" {
            return Ok(Self::None);
        }
        if let Some(path) = s.strip_prefix("file:") {
            return Ok(Self::File(PathBuf::from(path)));
        }
        if let Some(urls) = s.strip_prefix("etcd:") {
            let urls: Vec<String> = urls
                .split(',')
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect();
            if urls.is_empty() {
                return Err("etcd: needs at least one URL".into());
            }
            return Ok(Self::Etcd(urls));
        }
        Err(format!(
            "unknown datastore {s:?}: use none, file:PATH or etcd:URL[,URL...]"
        ))
    }
}

/// The first `/prefix` of `cluster` that no one in `taken` uses.
pub fn first_free_cidr(
    cluster: Ipv4Net,
    prefix: u8,
    taken: &[Ipv4Net],
) -> Result<Ipv4Net, DatastoreError> {
    let exhausted = || DatastoreError::Exhausted { cluster, prefix };
    cluster
        .subnets(prefix)
        .map_err(|_| exhausted())?
        .find(|candidate| {
            !taken
                .iter()
                .any(|t| t.contains(candidate) || candidate.contains(t))
        })
        .ok_or_else(exhausted)
}

/// The CIDR to claim for a node that holds none: its preferred one (its
/// CIDR last time) if that is free and fits the cluster, else the first
/// free `/node_prefix` of the cluster CIDR; `taken` are the others' CIDRs.
pub fn candidate_cidr(request: &JoinRequest, taken: &[Ipv4Net]) -> Result<Ipv4Net, DatastoreError> {
    let free = |c: &Ipv4Net| {
        request.cluster_cidr.contains(c)
            && c.prefix_len() == request.node_prefix
            && !taken
                .iter()
                .any(|t| t.contains(&c.network()) || c.contains(&t.network()))
    };
    match request.preferred.filter(free) {
        Some(preferred) => Ok(preferred),
        None => first_free_cidr(request.cluster_cidr, request.node_prefix, taken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!("none".parse::<DatastoreSpec>(), Ok(DatastoreSpec::None));
        assert_eq!(
            "file:/x/n.json".parse::<DatastoreSpec>(),
            Ok(DatastoreSpec::File("/x/n.json".into()))
        );
        assert_eq!(
            "etcd:http://a:2379,http://b:2379".parse::<DatastoreSpec>(),
            Ok(DatastoreSpec::Etcd(vec![
                "http://a:2379".into(),
                "http://b:2379".into()
            ]))
        );
        assert!("etcd:".parse::<DatastoreSpec>().is_err());
        assert!("consul:x".parse::<DatastoreSpec>().is_err());
    }

    #[test]
    fn free_cidrs() {
        let cluster: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let taken: Vec<Ipv4Net> = vec![
            "10.244.0.0/24".parse().unwrap(),
            "10.244.2.0/24".parse().unwrap(),
        ];
        assert_eq!(
            first_free_cidr(cluster, 24, &taken).unwrap(),
            "10.244.1.0/24".parse::<Ipv4Net>().unwrap()
        );
        let small: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        assert!(first_free_cidr(small, 24, &[small]).is_err());
    }
}

/// Why `ip` cannot be a node's underlay address, if it cannot: it must be
/// an address another host can send a tunnel to. Not `0.0.0.0/8` ("this
/// network"), loopback, link-local `169.254.0.0/16` (never routed past one
/// link, and where cloud metadata services answer: a record pointing there
/// would send pods' traffic to the metadata service's link), multicast,
/// `240.0.0.0/4` (reserved) or broadcast.
#[must_use]
pub fn node_ip_problem(ip: Ipv4Addr) -> Option<&'static str> {
    let first = ip.octets()[0];
    if first == 0 {
        Some("is in 0.0.0.0/8 (this network), not a unicast address")
    } else if ip.is_loopback() {
        Some("is a loopback address")
    } else if ip.is_link_local() {
        Some("is link-local (169.254.0.0/16)")
    } else if ip.is_multicast() {
        Some("is a multicast address")
    } else if first >= 240 {
        Some("is reserved (240.0.0.0/4) or broadcast, not a unicast address")
    } else {
        None
    }
}

fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The records of `nodes` this node may route to, and the others with why
/// not. The datastore is shared by every node (and whoever can write to
/// etcd or the nodes file), so nothing in it is routed unchecked: a pod
/// CIDR must lie inside the cluster CIDR (a `0.0.0.0/0` record would route
/// everything to one node) and not overlap this node's own; a node IP must
/// be a unicast address another host can reach ([`node_ip_problem`]). Of
/// records that conflict with each other (one name or one node IP twice,
/// overlapping pod CIDRs) the first in the datastore's order (join order,
/// claim order: never name order) is routed and the later ones are
/// refused (etcd's CIDR claims already keep two nodes off one CIDR; this
/// catches what is written past them). `me` (name and node IP) is this
/// node, never a remote.
#[must_use]
pub fn routable_nodes(
    nodes: &[NodeRecord],
    me: (&str, Ipv4Addr),
    own_pod_cidr: Ipv4Net,
    cluster_cidr: Ipv4Net,
) -> (Vec<NodeRecord>, Vec<(NodeRecord, String)>) {
    let mut refused = Vec::new();
    // Each record on its own first: a broken record (0.0.0.0/0, say) must
    // not knock out the good ones it would overlap.
    let mut candidates: Vec<&NodeRecord> = Vec::new();
    for node in nodes.iter().filter(|n| n.name != me.0 && n.node_ip != me.1) {
        let (ip, cidr) = (node.node_ip, node.pod_cidr);
        let reason = if !cluster_cidr.contains(&cidr) {
            Some(format!(
                "pod CIDR {cidr} is not inside the cluster CIDR {cluster_cidr}"
            ))
        } else if overlap(cidr, own_pod_cidr) {
            Some(format!(
                "pod CIDR {cidr} overlaps this node's {own_pod_cidr}"
            ))
        } else if let Some(why) = node_ip_problem(ip) {
            Some(format!("node IP {ip} {why}"))
        } else if cluster_cidr.contains(&ip) {
            // The datapath keys pod CIDRs and node addresses in one trie: a
            // node address inside the pod network would stand for a pod.
            Some(format!(
                "node IP {ip} is inside the cluster CIDR {cluster_cidr}"
            ))
        } else {
            None
        };
        match reason {
            Some(why) => refused.push((node.clone(), why)),
            None => candidates.push(node),
        }
    }
    let mut accepted = Vec::new();
    for (i, node) in candidates.iter().enumerate() {
        // The earlier record holds: for the nodes file that is the order
        // nodes joined (the file is never sorted), for etcd the claim
        // order the membership plan put them in, so a record written later
        // cannot take over (or knock out) a running node's CIDR, name or
        // address, whatever its name.
        let conflict = candidates[..i].iter().find_map(|other| {
            if other.name == node.name {
                Some(format!("name {} is also {}'s", node.name, other.node_ip))
            } else if other.node_ip == node.node_ip {
                Some(format!("node IP {} is also {}'s", node.node_ip, other.name))
            } else if overlap(other.pod_cidr, node.pod_cidr) {
                Some(format!(
                    "pod CIDR {} overlaps {}'s {}",
                    node.pod_cidr, other.name, other.pod_cidr
                ))
            } else {
                None
            }
        });
        match conflict {
            Some(why) => refused.push(((*node).clone(), why)),
            None => accepted.push((*node).clone()),
        }
    }
    (accepted, refused)
}

#[cfg(test)]
mod routable_tests {
    use super::*;

    fn node(name: &str, ip: &str, cidr: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            node_ip: ip.parse().expect("ip"),
            pod_cidr: cidr.parse().expect("cidr"),
        }
    }

    fn routable(nodes: &[NodeRecord]) -> (Vec<String>, Vec<String>) {
        let (ok, bad) = routable_nodes(
            nodes,
            ("me", "192.168.100.11".parse().expect("ip")),
            "10.244.0.0/24".parse().expect("cidr"),
            "10.244.0.0/16".parse().expect("cidr"),
        );
        (
            ok.into_iter().map(|n| n.name).collect(),
            bad.into_iter()
                .map(|(n, why)| format!("{}: {why}", n.name))
                .collect(),
        )
    }

    #[test]
    fn node_ip_edges() {
        for ok in [
            "1.0.0.1",
            "169.253.255.255",
            "169.255.0.1",
            "223.255.255.254",
            "192.168.1.1",
        ] {
            assert_eq!(node_ip_problem(ok.parse().expect("ip")), None, "{ok}");
        }
        for bad in [
            "0.0.0.0",
            "0.255.255.255",
            "127.0.0.1",
            "169.254.0.1",
            "169.254.255.255",
            "224.0.0.1",
            "239.255.255.255",
            "240.0.0.0",
            "255.255.255.254",
            "255.255.255.255",
        ] {
            assert!(node_ip_problem(bad.parse().expect("ip")).is_some(), "{bad}");
        }
    }

    #[test]
    fn good_records_are_routed_and_this_node_is_not_a_remote() {
        let (ok, bad) = routable(&[
            node("me", "192.168.100.11", "10.244.0.0/24"),
            node("n2", "192.168.100.12", "10.244.1.0/24"),
            node("n3", "192.168.100.13", "10.244.2.0/24"),
        ]);
        assert_eq!(ok, ["n2", "n3"]);
        assert!(bad.is_empty(), "{bad:?}");
    }

    #[test]
    fn bad_records_are_refused_never_routed() {
        let good = node("good", "192.168.100.20", "10.244.9.0/24");
        // The good record came first (it holds); the bad ones after it.
        for (what, bad_records) in [
            (
                "everything",
                vec![node("all", "192.168.100.12", "0.0.0.0/0")],
            ),
            (
                "outside the cluster",
                vec![node("out", "192.168.100.12", "10.245.1.0/24")],
            ),
            (
                "this node's CIDR",
                vec![node("thief", "192.168.100.12", "10.244.0.0/25")],
            ),
            (
                "around this node's CIDR",
                vec![node("big", "192.168.100.12", "10.244.0.0/20")],
            ),
            (
                "unspecified node IP",
                vec![node("zero", "0.0.0.0", "10.244.1.0/24")],
            ),
            (
                "loopback node IP",
                vec![node("lo", "127.0.0.1", "10.244.1.0/24")],
            ),
            (
                "multicast node IP",
                vec![node("mc", "224.0.0.1", "10.244.1.0/24")],
            ),
            (
                "link-local node IP",
                vec![node("ll", "169.254.169.254", "10.244.1.0/24")],
            ),
            (
                "node IP in 0.0.0.0/8",
                vec![node("zero8", "0.1.2.3", "10.244.1.0/24")],
            ),
            (
                "reserved node IP (240/4)",
                vec![node("res", "240.0.0.1", "10.244.1.0/24")],
            ),
            (
                "broadcast node IP",
                vec![node("bc", "255.255.255.255", "10.244.1.0/24")],
            ),
            (
                "a node IP inside the pod network",
                vec![node("inside", "10.244.5.1", "10.244.1.0/24")],
            ),
            (
                "a CIDR overlapping the good node's",
                vec![node("b", "192.168.100.13", "10.244.9.128/25")],
            ),
            (
                "the good node's name",
                vec![node("good", "192.168.100.13", "10.244.2.0/24")],
            ),
            (
                "the good node's IP",
                vec![node("y", "192.168.100.20", "10.244.2.0/24")],
            ),
        ] {
            let mut records = vec![good.clone()];
            records.extend(bad_records.iter().cloned());
            let (ok, bad) = routable(&records);
            assert_eq!(ok, ["good"], "{what}: only the good record is routed");
            assert_eq!(bad.len(), bad_records.len(), "{what}: {bad:?}");
        }
    }
}
