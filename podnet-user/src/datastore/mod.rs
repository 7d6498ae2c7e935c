//! Where the cluster lives: every node's name, underlay address and pod
//! CIDR. Backends: a nodes file (one machine, labs) and etcd v3 (a real
//! distributed store with leases and watches).

pub mod etcd;
pub mod file;

use std::{net::Ipv4Addr, path::PathBuf, str::FromStr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub name: String,
    #[serde(rename = "nodeIP")]
    pub node_ip: Ipv4Addr,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
}

/// What a node asks for when it joins.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub name: String,
    pub node_ip: Ipv4Addr,
    /// A fixed pod CIDR, or `None` to get one out of the cluster CIDR.
    pub pod_cidr: Option<Ipv4Net>,
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
    #[error("etcd: {0}")]
    Etcd(String),
}

/// `--datastore` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreSpec {
    /// No cluster: a single node.
    None,
    File(PathBuf),
    Etcd(Vec<String>),
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
