//! The cluster the BPF program tests (`tests/tests/bpf_*.rs`) run against: one
//! set of pods, nodes and addresses, and the datapath loaded with them, so
//! every test file speaks of the same pod A, pod B and node 2.
//!
//! Node 1 is the node under test; its pods are in 10.244.0.0/24. Pod A sends
//! (its host veth is loopback, the only device a test run without a namespace
//! can name), pod B is a local destination (any ifindex: a test run does not
//! follow the redirect). Nodes 2 and 3 own 10.244.1.0/24 and 10.244.3.0/24.

use std::net::Ipv4Addr;

use podnet::datapath::Counters;
use podnet_common::{EndpointInfo, NodeConfig, node::MODE_VXLAN};

use crate::bpf_run::BpfHarness;

pub const POD_A_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
pub const POD_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
pub const HOST_A_MAC: [u8; 6] = [0x02, 0xaa, 0xff, 0, 0, 0x02];
pub const POD_B_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
pub const POD_B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x03];
pub const HOST_B_MAC: [u8; 6] = [0x02, 0xbb, 0xff, 0, 0, 0x03];
pub const POD_B_IFINDEX: u32 = 4242;
/// A third local pod (with pod B's MACs: only its address matters).
pub const POD_C_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 4);
pub const POD_C_IFINDEX: u32 = 4243;

/// The node under test.
pub const NODE1_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 11);
pub const NODE1_MAC: [u8; 6] = [0x02, 0x11, 0, 0, 0, 0x11];
pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 12);
pub const NODE2_MAC: [u8; 6] = [0x02, 0x12, 0, 0, 0, 0x12];
/// A pod on node 2.
pub const NODE2_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
/// In the cluster, but a test's underlay has no neighbour entry for it.
pub const NODE3_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 13);
/// A pod on node 3.
pub const NODE3_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 7);
/// Outside the cluster.
pub const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// The VXLAN port node 1 is configured with in VXLAN mode.
pub const VXLAN_PORT: u16 = 4789;

/// A local pod as the endpoint map holds it.
#[derive(Debug, Clone, Copy)]
pub struct Pod {
    pub ip: Ipv4Addr,
    pub host_ifindex: u32,
    pub mac: [u8; 6],
    pub host_mac: [u8; 6],
}

/// Pod A, the sender: its host veth is loopback.
#[must_use]
pub fn pod_a() -> Pod {
    Pod {
        ip: POD_A_IP,
        host_ifindex: loopback_ifindex(),
        mac: POD_A_MAC,
        host_mac: HOST_A_MAC,
    }
}

/// Pod B, a local destination.
pub const POD_B: Pod = Pod {
    ip: POD_B_IP,
    host_ifindex: POD_B_IFINDEX,
    mac: POD_B_MAC,
    host_mac: HOST_B_MAC,
};

/// Another local destination.
pub const POD_C: Pod = Pod {
    ip: POD_C_IP,
    host_ifindex: POD_C_IFINDEX,
    mac: POD_B_MAC,
    host_mac: HOST_B_MAC,
};

/// A remote node: its pod CIDR and its underlay address.
#[derive(Debug, Clone, Copy)]
pub struct RemoteNode {
    pub pod_cidr: &'static str,
    pub ip: Ipv4Addr,
}

pub const NODE2: RemoteNode = RemoteNode {
    pod_cidr: "10.244.1.0/24",
    ip: NODE2_IP,
};

pub const NODE3: RemoteNode = RemoteNode {
    pod_cidr: "10.244.3.0/24",
    ip: NODE3_IP,
};

/// The ifindex of loopback, which a test run can name as a real device.
#[must_use]
pub fn loopback_ifindex() -> u32 {
    nix::net::if_::if_nametoindex("lo").expect("loopback exists")
}

/// The datapath's counters, read now.
#[must_use]
pub fn counters(h: &BpfHarness) -> Counters {
    h.datapath.counters().expect("read counters")
}

/// Loads the datapath into a private bpffs with `pods` in its endpoint map.
#[must_use]
pub fn harness(tag: &str, pods: &[Pod]) -> BpfHarness {
    let mut h = BpfHarness::new(tag).expect("load the datapath into a private bpffs");
    for pod in pods {
        h.datapath
            .upsert_endpoint(
                pod.ip,
                EndpointInfo {
                    host_ifindex: pod.host_ifindex,
                    flags: 0,
                    pod_mac: pod.mac,
                    host_mac: pod.host_mac,
                },
            )
            .expect("add a local pod");
    }
    h
}

/// Node 1's datapath: `pods`, the `remotes`' pod CIDRs and addresses, and
/// `config`.
#[must_use]
pub fn node1(tag: &str, pods: &[Pod], remotes: &[RemoteNode], config: NodeConfig) -> BpfHarness {
    let mut h = harness(tag, pods);
    for remote in remotes {
        h.datapath
            .upsert_remote(remote.pod_cidr.parse().expect("CIDR"), remote.ip)
            .expect("remote CIDR");
        h.datapath
            .upsert_node_address(remote.ip)
            .expect("node address");
    }
    h.datapath.set_config(config).expect("config");
    h
}

/// Node 1's configuration in `mode` (VNI 1, the VXLAN port in VXLAN mode,
/// pod CIDR 10.244.0.0/24 in the cluster CIDR 10.244.0.0/16, no drop
/// events) with its underlay device
/// `underlay_ifindex` and no tunnel device.
#[must_use]
pub fn node1_config(mode: u32, underlay_ifindex: u32) -> NodeConfig {
    NodeConfig {
        node_ip: u32::from_ne_bytes(NODE1_IP.octets()),
        mode,
        tunnel_ifindex: 0,
        underlay_ifindex,
        vni: 1,
        vxlan_port: if mode == MODE_VXLAN {
            VXLAN_PORT.to_be()
        } else {
            0
        },
        reserved: 0,
        pod_cidr_network: u32::from_ne_bytes([10, 244, 0, 0]),
        pod_cidr_mask: u32::from_ne_bytes([255, 255, 255, 0]),
        drop_events_per_sec: 0,
        flags: 0,
        cluster_cidr_network: u32::from_ne_bytes([10, 244, 0, 0]),
        cluster_cidr_mask: u32::from_ne_bytes([255, 255, 0, 0]),
        stack_flows_per_endpoint: 0,
        reserved2: 0,
        service_cidr_network: u32::from_ne_bytes([10, 96, 0, 0]),
        service_cidr_mask: u32::from_ne_bytes([255, 240, 0, 0]),
    }
}

/// The datapath with pod A (the sender, on loopback) and pod B (a local
/// destination) and nothing else: no remote nodes, no node configuration.
#[must_use]
pub fn two_pods(tag: &str) -> BpfHarness {
    harness(tag, &[pod_a(), POD_B])
}
