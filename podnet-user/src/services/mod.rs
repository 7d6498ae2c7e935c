//! Services in user space: the cluster's Services and EndpointSlices
//! compiled into what the datapath translates ([`compile`] into a
//! [`ServicePlan`]), the frontends' stable ids ([`FrontendIds`]) and the
//! backend-ports bitmap. No I/O: the agent feeds the cluster model in and
//! writes the plan into the Service maps (`agent::services`).
//!
//! What a plan holds, and the choices beyond the Kubernetes text:
//! - One frontend per (ClusterIP, Service port, protocol) of every Service
//!   with an IPv4 ClusterIP: headless Services (`None`), Services without a
//!   ClusterIP (ExternalName) and IPv6 ClusterIPs have none.
//! - One frontend per NodePort (of a `NodePort` or `LoadBalancer` Service)
//!   under this node's own address, its backends chosen by
//!   `externalTrafficPolicy` (`Local`: this node's only). externalIPs and
//!   LoadBalancer addresses are not in the plan.
//! - Backends come from the Service's EndpointSlices (its namespace,
//!   labelled `kubernetes.io/service-name`), `addressType: IPv4` only, at
//!   the slice port whose name (and protocol) is the Service port's. An
//!   endpoint counts by its first address, as kube-proxy does (the others
//!   are the same endpoint's).
//! - kube-proxy's choice of endpoints: the ready ones (`ready` absent
//!   counts as ready, as the API says); when none is ready, the serving
//!   (absent: serving) terminating ones, so that connections still go
//!   somewhere while a Deployment rolls.
//! - `internalTrafficPolicy: Local`: only this node's endpoints (by
//!   `nodeName`), the fallback applied among those; none gives a frontend
//!   without backends (the datapath drops its new connections).
//! - A frontend without backends stays in the plan: the datapath rejects
//!   its connections, as kube-proxy does, instead of handing them to the
//!   stack.
//! - Backends are deduplicated and sorted (address, port): the same input
//!   gives the same slots.
//! - When two Services claim one frontend (the API server's allocator
//!   prevents it; a datastore written by hand does not), the first in
//!   namespace/name order has it and the others are named in
//!   [`ServicePlan::conflicts`].

mod compile;
mod ids;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use podnet_common::{
    Backend, ServiceEntry, ServiceKey,
    service::{SERVICE_PORT_WORDS, service_port_bit},
};
use serde::{Deserialize, Serialize};

pub use compile::{DEFAULT_AFFINITY_TIMEOUT_S, compile};
pub use ids::FrontendIds;

/// A frontend: what a client connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
}

impl Frontend {
    /// The datapath's key for it (network byte order).
    #[must_use]
    pub fn key(self) -> ServiceKey {
        ServiceKey {
            address: u32::from_ne_bytes(self.address.octets()),
            port: self.port.to_be(),
            protocol: self.protocol,
            ..ServiceKey::default()
        }
    }

    /// The frontend a datapath key names.
    #[must_use]
    pub fn from_key(key: &ServiceKey) -> Self {
        Self {
            address: Ipv4Addr::from(key.address.to_ne_bytes()),
            port: u16::from_be(key.port),
            protocol: key.protocol,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.address,
            self.port,
            crate::api::proto_name(self.protocol)
        )
    }
}

/// A backend: where a connection to a frontend goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendAddress {
    pub address: Ipv4Addr,
    /// The endpoint's port (the slice's resolved targetPort).
    pub port: u16,
}

impl BackendAddress {
    /// The datapath's value for it (network byte order).
    #[must_use]
    pub fn value(self) -> Backend {
        Backend {
            address: u32::from_ne_bytes(self.address.octets()),
            port: self.port.to_be(),
            ..Backend::default()
        }
    }

    /// The backend a datapath value names.
    #[must_use]
    pub fn from_value(value: &Backend) -> Self {
        Self {
            address: Ipv4Addr::from(value.address.to_ne_bytes()),
            port: u16::from_be(value.port),
        }
    }
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.address, self.port)
    }
}

/// A Service by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One frontend of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendPlan {
    pub service: ServiceName,
    /// The Service port's name (empty for a Service's only, unnamed port).
    pub port_name: String,
    /// The backend slots 1..=n, in this order.
    pub backends: Vec<BackendAddress>,
    /// `sessionAffinity: ClientIP`'s timeout; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// The frontend is a NodePort (this node's address).
    #[serde(default)]
    pub node_port: bool,
}

impl FrontendPlan {
    /// Its entry in the Services map, under frontend id `id`.
    #[must_use]
    pub fn entry(&self, id: u32) -> ServiceEntry {
        ServiceEntry {
            id,
            backends: u32::try_from(self.backends.len()).unwrap_or(u32::MAX),
            affinity_timeout_s: self.affinity_timeout_s,
            flags: 0,
        }
    }
}

/// What the Service maps should hold (ids aside: see [`FrontendIds`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    pub frontends: BTreeMap<Frontend, FrontendPlan>,
    /// Services left out of a frontend another Service has (`ns/name
    /// address:port/proto`).
    pub conflicts: Vec<String>,
}

impl ServicePlan {
    /// Every port some backend serves on (host order): the ports whose
    /// packets may be replies to translate back.
    #[must_use]
    pub fn backend_ports(&self) -> BTreeSet<u16> {
        self.frontends
            .values()
            .flat_map(|f| f.backends.iter().map(|b| b.port))
            .collect()
    }

    /// The ports of the Service ports' bitmap (host order): the backend
    /// ports and the NodePorts, whose packets are the only ones the
    /// datapath looks up.
    #[must_use]
    pub fn watched_ports(&self) -> BTreeSet<u16> {
        let mut ports = self.backend_ports();
        ports.extend(
            self.frontends
                .iter()
                .filter(|(_, plan)| plan.node_port)
                .map(|(frontend, _)| frontend.port),
        );
        ports
    }

    /// Backend slots over all frontends.
    #[must_use]
    pub fn backend_count(&self) -> usize {
        self.frontends.values().map(|f| f.backends.len()).sum()
    }
}

/// The backend-ports bitmap of `ports`: [`SERVICE_PORT_WORDS`] words, bit
/// [`service_port_bit`] of each port set.
#[must_use]
pub fn port_words(ports: &BTreeSet<u16>) -> Vec<u64> {
    let mut words = vec![0u64; SERVICE_PORT_WORDS as usize];
    for &port in ports {
        let (word, bit) = service_port_bit(port);
        if let Some(w) = words.get_mut(word as usize) {
            *w |= bit;
        }
    }
    words
}

/// Whether `port`'s bit is set in `words`.
#[must_use]
pub fn port_set(words: &[u64], port: u16) -> bool {
    let (word, bit) = service_port_bit(port);
    words.get(word as usize).is_some_and(|w| w & bit != 0)
}
