//! A demo Kubernetes Service for the lab: the rules kube-proxy's iptables
//! mode writes for it (or the same Service as a plain nftables script),
//! backend servers that run inside pods, and client probes.
//!
//! The rules are the point: pods reaching a ClusterIP through DNAT only work
//! when the datapath lets both directions of the connection through the
//! node's conntrack, so the lab installs the Service exactly as a cluster
//! would and checks it like any other connectivity.

mod backends;
mod clients;
mod rules;
pub mod scale;
mod sessions;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use backends::{
    TcpSession, UdpSession, dns_query, parse_udp_reply, read_greeting, serve, tcp_query,
    tcp_session, udp_query, udp_session,
};
pub use clients::{
    QUERY_TIMEOUT, TRIES, backend_name, backend_names, clients_reach_the_service, query_all,
    wait_for_the_service,
};
pub use rules::{
    apply_kube_proxy_iptables, apply_nft, feed, kube_proxy_iptables, nft_dnat, nft_remove,
    remove_kube_proxy_iptables, remove_nft,
};
pub use sessions::ServiceSessions;

/// The namespace the demo Service lives in (part of kube-proxy's chain
/// hashes and comments).
pub const NAMESPACE: &str = "default";

/// A ClusterIP Service with one TCP port (also exposed as a NodePort) and
/// one UDP port (a NodePort too where podnet's datapath translates it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub tcp_port: u16,
    pub udp_port: u16,
    pub node_port: u16,
    /// The UDP port's NodePort (the cluster objects only: the
    /// kube-proxy-style rules expose the TCP port alone).
    #[serde(default)]
    pub udp_node_port: u16,
    pub target_tcp_port: u16,
    pub target_udp_port: u16,
    pub backends: Vec<Ipv4Addr>,
}

/// The demo Service as cluster objects (for podnet's own translation): the
/// Service `default/demo` (type NodePort: its TCP port is also
/// `node_port` on every node, its UDP port `udp_node_port`) with its two ports and one EndpointSlice of
/// the backends, ready, each on the node named at the same index of
/// `nodes`.
#[must_use]
pub fn demo_service_objects(svc: &ServiceSpec, nodes: &[String]) -> Vec<serde_json::Value> {
    let endpoints: Vec<serde_json::Value> = svc
        .backends
        .iter()
        .zip(nodes)
        .map(|(ip, node)| {
            serde_json::json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": node,
            })
        })
        .collect();
    vec![
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": svc.name, "namespace": NAMESPACE},
            "spec": {
                "type": "NodePort",
                "clusterIP": svc.cluster_ip.to_string(),
                "clusterIPs": [svc.cluster_ip.to_string()],
                "ports": [
                    {"name": "http", "protocol": "TCP", "port": svc.tcp_port,
                     "targetPort": svc.target_tcp_port, "nodePort": svc.node_port},
                    {"name": "dns", "protocol": "UDP", "port": svc.udp_port,
                     "targetPort": svc.target_udp_port, "nodePort": svc.udp_node_port},
                ],
            },
        }),
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-1", svc.name),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": svc.name},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [
                {"name": "http", "protocol": "TCP", "port": svc.target_tcp_port},
                {"name": "dns", "protocol": "UDP", "port": svc.target_udp_port},
            ],
        }),
    ]
}

/// The lab's Service: ClusterIP 10.96.0.10 (the first address kube-dns
/// gets in a kubeadm cluster), TCP 80 -> 8080, UDP 53 -> 5353 (DNS-shaped),
/// NodePort 30080 -> 8080.
#[must_use]
pub fn demo_service(backends: Vec<Ipv4Addr>) -> ServiceSpec {
    ServiceSpec {
        name: "demo".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
        tcp_port: 80,
        udp_port: 53,
        node_port: 30_080,
        udp_node_port: 30_053,
        target_tcp_port: 8080,
        target_udp_port: 5353,
        backends,
    }
}
