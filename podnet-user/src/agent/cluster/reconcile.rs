//! Making the datapath's remote map and the host's routes match the nodes
//! to route: first the decision ([`plan_nodes`], a pure function of what is
//! programmed and what the datastore says), then its application
//! ([`apply_changes`]) through two small traits, the datapath's remote map
//! ([`RemoteMap`]) and the host network ([`HostNetwork`]), so that both are
//! tested with fakes and no root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::{ClusterState, Mode, NodeNetwork};
use crate::{
    datapath::{Datapath, DatapathError, RemoteEntry},
    datastore::NodeRecord,
    netlink::HostNetwork,
};

/// The datapath's map of remote pod CIDRs and node addresses.
pub trait RemoteMap {
    /// Every entry, also those a previous agent left.
    fn remotes(&mut self) -> Result<Vec<RemoteEntry>, DatapathError>;
    /// Routes `cidr` (a pod CIDR) to `node_ip`.
    fn upsert_remote(&mut self, cidr: Ipv4Net, node_ip: Ipv4Addr) -> Result<(), DatapathError>;
    /// Adds another node's own address.
    fn upsert_node_address(&mut self, node_ip: Ipv4Addr) -> Result<(), DatapathError>;
    /// Removes the entry of `cidr` (a pod CIDR or a node address's /32).
    fn remove_remote(&mut self, cidr: Ipv4Net) -> Result<(), DatapathError>;
}

impl RemoteMap for Datapath {
    fn remotes(&mut self) -> Result<Vec<RemoteEntry>, DatapathError> {
        Self::remotes(self)
    }

    fn upsert_remote(&mut self, cidr: Ipv4Net, node_ip: Ipv4Addr) -> Result<(), DatapathError> {
        Self::upsert_remote(self, cidr, node_ip)
    }

    fn upsert_node_address(&mut self, node_ip: Ipv4Addr) -> Result<(), DatapathError> {
        Self::upsert_node_address(self, node_ip)
    }

    fn remove_remote(&mut self, cidr: Ipv4Net) -> Result<(), DatapathError> {
        Self::remove_remote(self, cidr)
    }
}

/// This node, as the reconcile needs it.
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    pub name: &'a str,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    pub cluster_cidr: Ipv4Net,
}

/// What to change so that the datapath and host routes match the nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeChanges {
    /// Records refused, with why (logged, never routed).
    pub refused: Vec<(NodeRecord, String)>,
    /// Pod CIDRs to route, with their node.
    pub wanted: BTreeMap<Ipv4Net, NodeRecord>,
    /// Pod CIDRs no longer routed (a node left, or a previous agent's).
    pub remove: BTreeSet<Ipv4Net>,
    /// Node addresses no longer known.
    pub remove_addresses: BTreeSet<Ipv4Addr>,
    /// Nodes to program: new, changed, or whose host route failed.
    pub program: Vec<NodeRecord>,
    /// Node addresses to add.
    pub add_addresses: BTreeSet<Ipv4Addr>,
}

/// Decides what to change: `state` is what this agent programmed, `pinned`
/// what the datapath's map holds (a previous agent's entries too), `nodes`
/// every node of the cluster (this one included), checked by
/// [`crate::datastore::routable_nodes`] first.
#[must_use]
pub fn plan_nodes(
    state: &ClusterState,
    pinned: &[RemoteEntry],
    nodes: &[NodeRecord],
    local: Local<'_>,
) -> NodeChanges {
    let (routable, refused) = crate::datastore::routable_nodes(
        nodes,
        (local.name, local.node_ip),
        local.pod_cidr,
        local.cluster_cidr,
    );
    let wanted: BTreeMap<Ipv4Net, NodeRecord> =
        routable.into_iter().map(|n| (n.pod_cidr, n)).collect();
    let wanted_addresses: BTreeSet<Ipv4Addr> = wanted.values().map(|n| n.node_ip).collect();
    let remove = state
        .remotes
        .keys()
        .copied()
        .chain(pinned.iter().filter(|e| !e.node_address).map(|e| e.cidr))
        .filter(|c| !wanted.contains_key(c))
        .collect();
    let remove_addresses = state
        .node_addresses
        .iter()
        .copied()
        .chain(pinned.iter().filter(|e| e.node_address).map(|e| e.node_ip))
        .filter(|ip| !wanted_addresses.contains(ip))
        .collect();
    let program = wanted
        .iter()
        .filter(|(cidr, node)| {
            state.remotes.get(cidr) != Some(node) || state.route_failures.contains_key(cidr)
        })
        .map(|(_, node)| node.clone())
        .collect();
    let add_addresses = wanted_addresses
        .into_iter()
        .filter(|ip| !state.node_addresses.contains(ip))
        .collect();
    NodeChanges {
        refused,
        wanted,
        remove,
        remove_addresses,
        program,
        add_addresses,
    }
}

/// Carries `changes` out and records them in `state`. A datapath error
/// stops it (what was done is recorded; the next apply does the rest); a
/// host route that fails is kept in `state.route_failures` and retried
/// ([`retry_failed_routes`]): the datapath forwards pods' traffic without
/// it.
pub fn apply_changes(
    state: &mut ClusterState,
    changes: &NodeChanges,
    net: &NodeNetwork,
    map: &mut impl RemoteMap,
    host: &mut impl HostNetwork,
) -> Result<(), DatapathError> {
    for (node, why) in &changes.refused {
        warn!(node = %node.name, node_ip = %node.node_ip, pod_cidr = %node.pod_cidr, reason = %why,
              "ignoring a datastore record");
    }
    for cidr in &changes.remove {
        map.remove_remote(*cidr)?;
        let _ = host.delete_route(*cidr);
        if let Some(gone) = state.remotes.remove(cidr) {
            info!(node = %gone.name, %cidr, "node left; routes removed");
        }
    }
    for ip in &changes.remove_addresses {
        map.remove_remote(Ipv4Net::from(*ip))?;
        state.node_addresses.remove(ip);
        if net.mode == Mode::Direct
            && let Err(e) = host.delete_neighbour(net.underlay_ifindex, *ip)
        {
            warn!(error = %format!("{:#}", anyhow::Error::from(e)), node_ip = %ip, "removing a departed node's neighbour");
        }
    }
    state
        .route_failures
        .retain(|cidr, _| changes.wanted.contains_key(cidr));
    for node in &changes.program {
        map.upsert_remote(node.pod_cidr, node.node_ip)?;
        install_host_route(state, net, host, node.pod_cidr, node.node_ip);
        info!(node = %node.name, cidr = %node.pod_cidr, node_ip = %node.node_ip, "node joined");
        state.remotes.insert(node.pod_cidr, node.clone());
    }
    for ip in &changes.add_addresses {
        map.upsert_node_address(*ip)?;
        if net.mode == Mode::Direct {
            // from_underlay accepts a pod-network source only in a frame
            // from its node's MAC, read from this neighbour entry.
            if let Err(e) = host.keep_neighbour_resolved(net.underlay_ifindex, *ip) {
                warn!(error = %format!("{:#}", anyhow::Error::from(e)), node_ip = %ip,
                      "managed neighbour for a node (its pods' traffic is dropped until the kernel learns it)");
            }
        }
        state.node_addresses.insert(*ip);
    }
    Ok(())
}

/// Decides and applies: the datapath and host routes follow `nodes`.
pub fn reconcile_nodes(
    state: &mut ClusterState,
    local: Local<'_>,
    net: &NodeNetwork,
    nodes: &[NodeRecord],
    map: &mut impl RemoteMap,
    host: &mut impl HostNetwork,
) -> Result<(), DatapathError> {
    // Also entries left in the pinned map by a previous agent.
    let pinned = map.remotes()?;
    let changes = plan_nodes(state, &pinned, nodes, local);
    apply_changes(state, &changes, net, map, host)
}

/// Installs the host route to `cidr`; a failure is logged and kept for
/// [`retry_failed_routes`] (the datapath forwards pods' traffic without
/// it; the node's own traffic to those pods needs it).
fn install_host_route(
    state: &mut ClusterState,
    net: &NodeNetwork,
    host: &mut impl HostNetwork,
    cidr: Ipv4Net,
    node_ip: Ipv4Addr,
) {
    match host_route(state.tunnel_ifindex, net, host, cidr, node_ip) {
        Ok(()) => {
            if state.route_failures.remove(&cidr).is_some() {
                info!(%cidr, %node_ip, "host route installed after all");
            }
        }
        Err(e) => {
            let error = format!("{e:#}");
            warn!(%error, %cidr, %node_ip, "host route to a remote pod CIDR failed; retrying");
            state.route_failures.insert(cidr, (node_ip, error));
        }
    }
}

/// Retries the host routes that failed. Returns whether none is left.
pub fn retry_failed_routes(
    state: &mut ClusterState,
    net: &NodeNetwork,
    host: &mut impl HostNetwork,
) -> bool {
    let failed: Vec<(Ipv4Net, Ipv4Addr)> = state
        .route_failures
        .iter()
        .map(|(cidr, (node_ip, _))| (*cidr, *node_ip))
        .collect();
    for (cidr, node_ip) in failed {
        install_host_route(state, net, host, cidr, node_ip);
    }
    state.route_failures.is_empty()
}

/// The node's own traffic to a remote pod CIDR: through the overlay
/// (lightweight-tunnel route) or via the remote node (direct).
fn host_route(
    tunnel_ifindex: u32,
    net: &NodeNetwork,
    host: &mut impl HostNetwork,
    cidr: Ipv4Net,
    node_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    match net.mode {
        Mode::Vxlan => {
            host.replace_tunnel_route(cidr, tunnel_ifindex, net.vni, node_ip, net.node_ip)
        }
        Mode::Direct => host.replace_gateway_route(cidr, node_ip, net.underlay_ifindex),
        Mode::Local => Ok(()),
    }
    .with_context(|| format!("route to {cidr} via {node_ip}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{HostCall, RecordingHost};

    /// The remote map in memory: entry -> (node IP, node address?).
    #[derive(Debug, Default)]
    struct FakeMap {
        entries: BTreeMap<Ipv4Net, (Ipv4Addr, bool)>,
        writes: usize,
    }

    impl RemoteMap for FakeMap {
        fn remotes(&mut self) -> Result<Vec<RemoteEntry>, DatapathError> {
            Ok(self
                .entries
                .iter()
                .map(|(cidr, (node_ip, node_address))| RemoteEntry {
                    cidr: *cidr,
                    node_ip: *node_ip,
                    node_address: *node_address,
                })
                .collect())
        }

        fn upsert_remote(&mut self, cidr: Ipv4Net, node_ip: Ipv4Addr) -> Result<(), DatapathError> {
            self.writes += 1;
            self.entries.insert(cidr, (node_ip, false));
            Ok(())
        }

        fn upsert_node_address(&mut self, node_ip: Ipv4Addr) -> Result<(), DatapathError> {
            self.writes += 1;
            self.entries.insert(Ipv4Net::from(node_ip), (node_ip, true));
            Ok(())
        }

        fn remove_remote(&mut self, cidr: Ipv4Net) -> Result<(), DatapathError> {
            self.writes += 1;
            self.entries.remove(&cidr);
            Ok(())
        }
    }

    const UNDERLAY: u32 = 2;
    const TUNNEL: u32 = 7;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    fn cidr(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    fn record(name: &str, node_ip: &str, pod_cidr: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            node_ip: ip(node_ip),
            pod_cidr: cidr(pod_cidr),
        }
    }

    fn network(mode: Mode) -> NodeNetwork {
        NodeNetwork {
            mode,
            node_ip: ip("192.168.100.1"),
            underlay_dev: "eth0".into(),
            underlay_ifindex: UNDERLAY,
            underlay_mtu: 1500,
            vni: 1,
            vxlan_port: podnet_common::node::VXLAN_PORT,
            masquerade: true,
            vxlan_datapath: super::super::VxlanDatapath::Bpf,
        }
    }

    const LOCAL: Local<'static> = Local {
        name: "me",
        node_ip: Ipv4Addr::new(192, 168, 100, 1),
        pod_cidr: Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 24),
        cluster_cidr: Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 16),
    };

    /// An agent's view: its state, the datapath map and the host network.
    struct Node {
        net: NodeNetwork,
        state: ClusterState,
        map: FakeMap,
        host: RecordingHost,
    }

    impl Node {
        fn new(mode: Mode) -> Self {
            Self {
                net: network(mode),
                state: ClusterState {
                    tunnel_ifindex: TUNNEL,
                    ..ClusterState::default()
                },
                map: FakeMap::default(),
                host: RecordingHost::default(),
            }
        }

        fn apply(&mut self, nodes: &[NodeRecord]) {
            self.host.clear_calls();
            self.map.writes = 0;
            reconcile_nodes(
                &mut self.state,
                LOCAL,
                &self.net,
                nodes,
                &mut self.map,
                &mut self.host,
            )
            .expect("reconciled");
        }

        fn routed(&self) -> Vec<Ipv4Net> {
            self.host.routes.keys().copied().collect()
        }
    }

    fn me() -> NodeRecord {
        record("me", "192.168.100.1", "10.244.0.0/24")
    }

    fn n2() -> NodeRecord {
        record("n2", "192.168.100.2", "10.244.2.0/24")
    }

    fn n3() -> NodeRecord {
        record("n3", "192.168.100.3", "10.244.3.0/24")
    }

    #[test]
    fn vxlan_adds_what_is_missing_leaves_what_is_right_and_removes_what_a_gone_node_had() {
        let mut agent = Node::new(Mode::Vxlan);
        agent.apply(&[me(), n2(), n3()]);
        assert_eq!(
            agent.host.calls,
            [
                HostCall::TunnelRoute {
                    cidr: cidr("10.244.2.0/24"),
                    oif: TUNNEL,
                    vni: 1,
                    dst: ip("192.168.100.2"),
                    src: ip("192.168.100.1"),
                },
                HostCall::TunnelRoute {
                    cidr: cidr("10.244.3.0/24"),
                    oif: TUNNEL,
                    vni: 1,
                    dst: ip("192.168.100.3"),
                    src: ip("192.168.100.1"),
                },
            ],
            "a route per remote pod CIDR, none to this node, no neighbours in vxlan mode"
        );
        assert_eq!(
            agent.map.entries.keys().copied().collect::<Vec<_>>(),
            [
                cidr("10.244.2.0/24"),
                cidr("10.244.3.0/24"),
                cidr("192.168.100.2/32"),
                cidr("192.168.100.3/32"),
            ]
        );

        agent.apply(&[me(), n2(), n3()]);
        assert!(agent.host.calls.is_empty(), "{:?}", agent.host.calls);
        assert_eq!(agent.map.writes, 0, "nothing rewritten");

        agent.apply(&[me(), n2()]);
        assert_eq!(
            agent.host.calls,
            [HostCall::DeleteRoute(cidr("10.244.3.0/24"))]
        );
        assert_eq!(agent.routed(), [cidr("10.244.2.0/24")]);
        assert!(!agent.map.entries.contains_key(&cidr("10.244.3.0/24")));
        assert!(!agent.map.entries.contains_key(&cidr("192.168.100.3/32")));
        assert_eq!(agent.state.remotes.len(), 1);
    }

    #[test]
    fn direct_mode_routes_via_the_node_and_keeps_its_neighbour_resolved() {
        let mut agent = Node::new(Mode::Direct);
        agent.apply(&[n2()]);
        assert_eq!(
            agent.host.calls,
            [
                HostCall::GatewayRoute {
                    cidr: cidr("10.244.2.0/24"),
                    gateway: ip("192.168.100.2"),
                    oif: UNDERLAY,
                },
                HostCall::KeepNeighbour {
                    ifindex: UNDERLAY,
                    ip: ip("192.168.100.2"),
                },
            ]
        );
        agent.apply(&[]);
        assert_eq!(
            agent.host.calls,
            [
                HostCall::DeleteRoute(cidr("10.244.2.0/24")),
                HostCall::DeleteNeighbour {
                    ifindex: UNDERLAY,
                    ip: ip("192.168.100.2"),
                },
            ]
        );
        assert!(agent.host.routes.is_empty());
        assert!(agent.host.neighbours.is_empty());
    }

    #[test]
    fn a_node_that_moved_is_reprogrammed() {
        let mut agent = Node::new(Mode::Vxlan);
        agent.apply(&[n2()]);
        let moved = record("n2", "192.168.100.22", "10.244.2.0/24");
        agent.apply(std::slice::from_ref(&moved));
        assert_eq!(agent.host.calls.len(), 1, "{:?}", agent.host.calls);
        assert_eq!(
            agent.map.entries[&cidr("10.244.2.0/24")],
            (ip("192.168.100.22"), false)
        );
        assert!(
            !agent.map.entries.contains_key(&cidr("192.168.100.2/32")),
            "the old address goes"
        );
        assert_eq!(agent.state.remotes[&cidr("10.244.2.0/24")], moved);
    }

    #[test]
    fn what_a_previous_agent_left_in_the_map_is_removed() {
        let mut agent = Node::new(Mode::Vxlan);
        agent
            .map
            .entries
            .insert(cidr("10.244.9.0/24"), (ip("192.168.100.9"), false));
        agent
            .map
            .entries
            .insert(cidr("192.168.100.9/32"), (ip("192.168.100.9"), true));
        agent.apply(&[n2()]);
        assert!(!agent.map.entries.contains_key(&cidr("10.244.9.0/24")));
        assert!(!agent.map.entries.contains_key(&cidr("192.168.100.9/32")));
        assert!(
            agent
                .host
                .calls
                .contains(&HostCall::DeleteRoute(cidr("10.244.9.0/24")))
        );
    }

    #[test]
    fn a_failed_host_route_is_kept_retried_and_reported() {
        let mut agent = Node::new(Mode::Vxlan);
        agent.host.failing_routes.insert(cidr("10.244.2.0/24"));
        agent.apply(&[n2(), n3()]);
        assert_eq!(agent.routed(), [cidr("10.244.3.0/24")]);
        assert!(
            agent.map.entries.contains_key(&cidr("10.244.2.0/24")),
            "the datapath forwards anyway"
        );
        assert!(
            agent
                .state
                .route_failures
                .contains_key(&cidr("10.244.2.0/24"))
        );
        assert!(!retry_failed_routes(
            &mut agent.state,
            &agent.net,
            &mut agent.host
        ));
        agent.host.failing_routes.clear();
        // The next apply programs it again even though nothing changed.
        agent.apply(&[n2(), n3()]);
        assert_eq!(agent.host.calls.len(), 1, "{:?}", agent.host.calls);
        assert!(agent.state.route_failures.is_empty());
        assert_eq!(
            agent.routed(),
            [cidr("10.244.2.0/24"), cidr("10.244.3.0/24")]
        );
    }

    #[test]
    fn retrying_installs_a_failed_route_once_the_kernel_takes_it() {
        let mut agent = Node::new(Mode::Direct);
        agent.host.failing_routes.insert(cidr("10.244.2.0/24"));
        agent.apply(&[n2()]);
        agent.host.failing_routes.clear();
        assert!(retry_failed_routes(
            &mut agent.state,
            &agent.net,
            &mut agent.host
        ));
        assert_eq!(agent.routed(), [cidr("10.244.2.0/24")]);
    }

    #[test]
    fn bad_records_are_refused_and_never_remove_good_ones() {
        let mut agent = Node::new(Mode::Vxlan);
        agent.apply(&[me(), n2()]);
        let bad = [
            record("all", "192.168.100.5", "0.0.0.0/0"),
            record("thief", "192.168.100.6", "10.244.0.0/25"),
            record("over", "192.168.100.7", "10.244.2.128/25"),
            record("n2", "192.168.100.8", "10.244.8.0/24"),
            record("lo", "127.0.0.1", "10.244.9.0/24"),
        ];
        let mut records = vec![me(), n2()];
        records.extend(bad.iter().cloned());
        let changes = plan_nodes(
            &agent.state,
            &agent.map.remotes().expect("remotes"),
            &records,
            LOCAL,
        );
        assert_eq!(changes.refused.len(), bad.len(), "{:?}", changes.refused);
        assert!(changes.program.is_empty() && changes.remove.is_empty());
        agent.apply(&records);
        assert!(agent.host.calls.is_empty(), "{:?}", agent.host.calls);
        assert_eq!(agent.routed(), [cidr("10.244.2.0/24")]);
        assert_eq!(agent.map.writes, 0);
    }

    #[test]
    fn a_bad_record_first_in_the_list_does_not_knock_out_a_good_one() {
        let mut agent = Node::new(Mode::Vxlan);
        agent.apply(&[record("all", "192.168.100.5", "0.0.0.0/0"), n2()]);
        assert_eq!(agent.routed(), [cidr("10.244.2.0/24")]);
    }
}
