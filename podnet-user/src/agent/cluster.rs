//! The node in the cluster: its overlay/underlay plumbing, the other nodes'
//! pod CIDRs in the datapath and in the host's routing table, and pod egress
//! masquerading.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
    process::Command,
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use podnet_common::{NodeConfig, node};
use tracing::{info, warn};

use super::Agent;
use crate::{
    datapath::NodeProgram,
    datastore::NodeRecord,
    failpoint::{self, Fault},
    netlink::{self, HostNetwork, LinkInfo, NetlinkError},
};

pub mod reconcile;

pub use reconcile::{Local, NodeChanges, RemoteMap, plan_nodes, reconcile_nodes};

/// Name of the collect-metadata VXLAN device.
pub const VXLAN_DEVICE: &str = "podnet_vxlan";
/// VXLAN's 50 bytes, defined once next to the node config (the datapath
/// makes the same room).
pub use podnet_common::node::VXLAN_OVERHEAD;

/// How pods reach pods on other nodes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One node, no cluster.
    Local,
    /// VXLAN overlay, encapsulated in eBPF (default with a datastore).
    Vxlan,
    /// Routed on the underlay (`bpf_redirect_neigh`); needs L2 reachability.
    Direct,
}

/// The node's place on the underlay.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeNetwork {
    pub mode: Mode,
    pub node_ip: Ipv4Addr,
    pub underlay_dev: String,
    pub underlay_ifindex: u32,
    pub underlay_mtu: u32,
    pub vni: u32,
    pub vxlan_port: u16,
    /// SNAT pod traffic leaving the cluster to the node IP.
    pub masquerade: bool,
    /// Who encapsulates and decapsulates in vxlan mode.
    #[serde(default)]
    pub vxlan_datapath: VxlanDatapath,
}

/// Who does VXLAN in vxlan mode (`--vxlan-datapath`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum VxlanDatapath {
    /// The node's collect-metadata VXLAN device, fed by from_pod with a
    /// tunnel key (`bpf_skb_set_tunnel_key`); its UDP socket decapsulates.
    Kernel,
    /// from_pod writes the outer headers itself (`bpf_skb_adjust_room`) and
    /// sends the packet out of the underlay (`bpf_redirect_neigh`);
    /// from_underlay decapsulates what other nodes send to local pods. The
    /// VXLAN device stays for everything else (the node's own traffic).
    /// The default: measured faster than the device (BENCHMARKS.md).
    #[default]
    Bpf,
}

impl Mode {
    /// The datapath's `NodeConfig::mode` for this mode.
    #[must_use]
    pub const fn node_mode(self) -> u32 {
        match self {
            Self::Local => node::MODE_LOCAL_ONLY,
            Self::Vxlan => node::MODE_VXLAN,
            Self::Direct => node::MODE_DIRECT,
        }
    }
}

impl NodeNetwork {
    /// The largest pod MTU that does not fragment on the underlay
    /// ([`node::pod_mtu`]).
    #[must_use]
    pub fn pod_mtu(&self) -> u32 {
        node::pod_mtu(self.underlay_mtu, self.mode.node_mode())
    }
}

/// Finds the underlay: the device holding `node_ip`, or `node_ip` from
/// `dev` (its first address), or `dev` with the address given.
pub fn find_underlay(
    host: &mut impl HostNetwork,
    node_ip: Option<Ipv4Addr>,
    dev: Option<&str>,
) -> Result<(Ipv4Addr, LinkInfo), NetlinkError> {
    match (node_ip, dev) {
        (_, Some(dev)) => {
            let link = host.link_by_name(dev)?.ok_or_else(|| {
                NetlinkError::Unexpected(format!("underlay device {dev} not found"))
            })?;
            let ip = match node_ip {
                Some(ip) => ip,
                None => host.first_address(link.index)?.ok_or_else(|| {
                    NetlinkError::Unexpected(format!("{dev} has no IPv4 address"))
                })?,
            };
            Ok((ip, link))
        }
        (Some(ip), None) => {
            let link = host
                .link_with_address(ip)?
                .ok_or_else(|| NetlinkError::Unexpected(format!("no device holds {ip}")))?;
            Ok((ip, link))
        }
        (None, None) => Err(NetlinkError::Unexpected(
            "a cluster node needs --node-ip or --underlay-dev".into(),
        )),
    }
}

/// What the agent has programmed for the other nodes.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub remotes: BTreeMap<Ipv4Net, NodeRecord>,
    /// Other nodes' own addresses in the datapath (and, in direct mode,
    /// neighbours the kernel keeps resolved).
    pub node_addresses: BTreeSet<Ipv4Addr>,
    pub tunnel_ifindex: u32,
    /// Host routes to remote pod CIDRs that failed to install, with the
    /// error: retried (`retry_failed_routes`) and shown by status.
    pub route_failures: BTreeMap<Ipv4Net, (Ipv4Addr, String)>,
    /// The node's place on the underlay, once known.
    pub network: Option<NodeNetwork>,
    /// How the datastore is followed (set by `agent::follow`).
    pub datastore: crate::api::DatastoreStatus,
}

pub(super) fn write_sysctl(path: &str, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))
}

fn nft(script: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (nftables)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())
        .context("feeding nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    anyhow::ensure!(
        out.status.success(),
        "nft failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The node-to-node VXLAN flows the table exempts from conntrack: UDP to
/// `port` between this node (`node_ip`) and the other nodes (`peers`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Untracked<'a> {
    node_ip: Ipv4Addr,
    port: u16,
    peers: &'a [Ipv4Addr],
}

fn address_set(name: &str, addresses: &[Ipv4Addr]) -> String {
    if addresses.is_empty() {
        format!("set {name} {{ type ipv4_addr; }}\n")
    } else {
        let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        format!(
            "set {name} {{ type ipv4_addr; elements = {{ {} }} }}\n",
            list.join(", ")
        )
    }
}

/// podnet's nft table (`ip podnet`), replaced as a whole in one transaction
/// (so an agent restart leaves one copy, and deleting the table removes
/// everything podnet added).
///
/// Masquerade: pod traffic to anything that is neither a pod nor one of
/// `nodes` leaves with the node's address.
///
/// Direct mode exempts the other nodes: pod addresses are routable on the
/// underlay there, so a node answers a pod directly. In vxlan mode nothing
/// is exempt: a pod packet the stack routes to another node (a Service
/// whose backend is a host-network pod, say) would otherwise leave the
/// underlay with the pod's address, which clouds' source checks and
/// `rp_filter` drop and which is no source the underlay should see. (Pod
/// traffic to a node's address that the datapath forwards itself goes
/// through the tunnel, keeping the pod's address, see `apply_nodes`.)
///
/// NOTRACK (vxlan mode, `untracked`): the nat chain loads conntrack, which
/// then tracks every packet of the node, the VXLAN UDP between nodes
/// included: one entry per inner flow (the kernel's VXLAN source port is a
/// hash of the inner headers), created and looked up on both nodes, for a
/// flow nothing NATs or filters. `notrack` in the raw-priority prerouting
/// and output chains (before conntrack at -200) skips that work for UDP to
/// the VXLAN port between this node and the other nodes only. The inner
/// packets keep their own tracking: the tunnel scrubs the conntrack state
/// on encapsulation and decapsulation (`skb_scrub_packet`).
fn nft_script(cluster: Ipv4Net, nodes: &[Ipv4Addr], untracked: Option<&Untracked<'_>>) -> String {
    let mut script = format!(
        "table ip podnet\ndelete table ip podnet\n\
         table ip podnet {{\n\
           {}\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ip saddr {cluster} ip daddr != {cluster} ip daddr != @nodes masquerade\n\
           }}\n",
        address_set("nodes", nodes)
    );
    if let Some(Untracked {
        node_ip,
        port,
        peers,
    }) = untracked
    {
        script.push_str(&address_set("vxlan_peers", peers));
        let _ = write!(
            script,
            "chain prerouting_notrack {{\n\
             type filter hook prerouting priority raw; policy accept;\n\
             ip saddr @vxlan_peers ip daddr {node_ip} udp dport {port} counter notrack\n\
           }}\n\
           chain output_notrack {{\n\
             type filter hook output priority raw; policy accept;\n\
             ip saddr {node_ip} ip daddr @vxlan_peers udp dport {port} counter notrack\n\
           }}\n"
        );
    }
    script.push_str("}\n");
    script
}

impl Agent {
    /// Creates the overlay device or hooks the underlay, attaches the
    /// receive program, writes the node config, enables forwarding.
    pub fn setup_node_network(&mut self, net: &NodeNetwork) -> anyhow::Result<()> {
        anyhow::ensure!(
            !failpoint::faulty(Fault::NodeNetwork),
            "test fault {}: the node network's setup fails",
            Fault::NodeNetwork.name()
        );
        let links_dir = self.config().links_dir();
        let mut config = NodeConfig {
            mode: node::MODE_LOCAL_ONLY,
            tunnel_ifindex: 0,
            underlay_ifindex: net.underlay_ifindex,
            flags: 0,
            ..self.node_checks(net, NodeConfig::default())
        };
        match net.mode {
            Mode::Local => {}
            Mode::Vxlan => {
                let (port, mtu) = (net.vxlan_port, net.pod_mtu());
                // The pod CIDR's network address (never a pod's, nor the
                // gateway), as flannel gives flannel.1: see below.
                let own = self.config().pod_cidr.network();
                let ifindex = netlink::with_netlink(None, move |h| async move {
                    let index = netlink::ensure_vxlan(&h, VXLAN_DEVICE, port, mtu).await?;
                    netlink::add_address(&h, index, own, 32).await?;
                    Ok(index)
                })
                .context("creating the VXLAN device")?;
                self.attach_infrastructure(
                    NodeProgram::FROM_OVERLAY,
                    VXLAN_DEVICE,
                    &links_dir.join(VXLAN_DEVICE),
                )?;
                self.attach_infrastructure(
                    NodeProgram::TO_OVERLAY,
                    VXLAN_DEVICE,
                    &links_dir.join(format!("{VXLAN_DEVICE}-egress")),
                )?;
                // Other nodes' own traffic to this node's pods (and NodePort
                // flows they forward) arrives here with an underlay address
                // as source and is handed to the stack
                // (forward::deliver_local), whose route back to that address
                // is the underlay device. A strict reverse-path check drops
                // it; a loose one drops it too on a device without an IPv4
                // address (`__fib_validate_source`: no_addr -> last_resort),
                // hence the address above. The effective value is
                // max(all, device): podnet asks for 0 and lives with loose.
                write_sysctl(
                    &format!("/proc/sys/net/ipv4/conf/{VXLAN_DEVICE}/rp_filter"),
                    "0",
                )?;
                if std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter")
                    .is_ok_and(|v| v.trim() == "1")
                {
                    warn!(
                        "net.ipv4.conf.all.rp_filter is 1 (strict): traffic from other nodes \
                         (not their pods) to this node's pods is dropped by the kernel; \
                         set it to 2 (loose) or 0"
                    );
                }
                // The underlay's ingress: the check that no pod-network
                // source arrives unencapsulated, and with the BPF datapath
                // the decapsulation.
                let pin = links_dir.join(format!("underlay-{}", net.underlay_dev));
                self.attach_infrastructure(NodeProgram::FROM_UNDERLAY, &net.underlay_dev, &pin)?;
                if net.vxlan_datapath == VxlanDatapath::Bpf {
                    config.flags |= node::NODE_F_VXLAN_BPF;
                }
                config.mode = node::MODE_VXLAN;
                config.tunnel_ifindex = ifindex;
                config.vxlan_port = net.vxlan_port.to_be();
                self.cluster.tunnel_ifindex = ifindex;
            }
            Mode::Direct => {
                let pin = links_dir.join(format!("underlay-{}", net.underlay_dev));
                self.attach_infrastructure(NodeProgram::FROM_UNDERLAY, &net.underlay_dev, &pin)?;
                let pin = links_dir.join(format!("underlay-{}-egress", net.underlay_dev));
                self.attach_infrastructure(NodeProgram::TO_UNDERLAY, &net.underlay_dev, &pin)?;
                config.mode = node::MODE_DIRECT;
            }
        }
        if self.config().services == crate::api::services::ServicesMode::Bpf {
            // from_pod translates ClusterIP connections from the Service
            // maps; clear (kube-proxy), it hands them to the stack.
            config.flags |= node::NODE_F_SERVICES_BPF;
        }
        self.datapath_mut().set_config(config)?;
        // The node is its pods' gateway (their default route goes through
        // it) in every mode, local mode included, so it forwards IPv4 as
        // the reference bridge plugin does for its gateway (`isGateway`:
        // `ip.EnableIP4Forward`) and ptp always does. Only pod-to-pod on
        // the fast path (bpf_redirect_peer) gets by without it; everything
        // the programs hand to the stack for a pod is forwarded there: what
        // a DNAT sends on to a pod (a hostPort from portmap on the node's
        // own address, a kube-proxy Service, any `dnat to` rule), the
        // replies conntrack un-NATs back to the client pod, pods' traffic
        // to the world (masqueraded in the cluster modes) and what a
        // shaped pod sends. With ip_forward 0 the kernel drops all of that
        // at the input route (`ip_route_input_slow`: no forwarding on the
        // incoming device -> EHOSTUNREACH, counted only as the node's
        // `InAddrErrors`), and a connection times out. In direct mode
        // from_underlay's sender check needs it too (bpf_fib_lookup
        // answers FWD_DISABLED on a device that does not forward).
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        if net.masquerade {
            // With the nodes applied so far (none at the first start; on a
            // retry after the datastore was followed, all of them: the
            // table must not lose its VXLAN peers until the next resync).
            let mut known: Vec<Ipv4Addr> = self.cluster.node_addresses.iter().copied().collect();
            known.push(net.node_ip);
            self.write_nft_table(net, &known)?;
        }
        info!(mode = ?net.mode, vxlan_datapath = ?net.vxlan_datapath, node_ip = %net.node_ip, underlay = %net.underlay_dev, pod_mtu = net.pod_mtu(), services = %self.config().services, "node network ready");
        Ok(())
    }

    /// `config` with what the datapath's checks read set from the agent's
    /// configuration alone (no device needed): the node's address, VNI and
    /// VXLAN port (vxlan mode: what a pod may not send to), its pod CIDR,
    /// the cluster CIDR and each endpoint's share of the stack-flows table.
    /// The forwarding fields (mode, devices, flags)
    /// are left as they are.
    fn node_checks(&self, net: &NodeNetwork, config: NodeConfig) -> NodeConfig {
        let key = crate::datapath::ip_key;
        let (pod, cluster, services) = (
            self.config().pod_cidr,
            self.config().cluster_cidr,
            self.config().service_cidr,
        );
        NodeConfig {
            node_ip: key(net.node_ip),
            vni: net.vni,
            vxlan_port: if net.mode == Mode::Vxlan {
                net.vxlan_port.to_be()
            } else {
                0
            },
            pod_cidr_network: key(pod.network()),
            pod_cidr_mask: key(pod.netmask()),
            cluster_cidr_network: key(cluster.network()),
            cluster_cidr_mask: key(cluster.netmask()),
            service_cidr_network: key(services.network()),
            service_cidr_mask: key(services.netmask()),
            stack_flows_per_endpoint: self.config().stack_flows_per_endpoint,
            ..config
        }
    }

    /// Writes the checks' part of the node config ([`Self::node_checks`])
    /// over what the map holds, before any program is re-pointed: a config
    /// migrated from an older layout has zeros in the fields appended since
    /// (VXLAN port, pod and cluster CIDR), and the node network's setup,
    /// which writes the whole config, may fail and be retried for a while.
    /// Meanwhile the new programs forward as the old ones did (mode and
    /// devices unchanged) with every check in force.
    pub(super) fn write_node_checks(&mut self, net: &NodeNetwork) -> anyhow::Result<()> {
        let current = self
            .datapath_mut()
            .config()
            .context("reading the node config")?;
        let config = self.node_checks(net, current);
        self.datapath_mut()
            .set_config(config)
            .context("writing the node config's checks")
    }

    /// Re-points the pinned link of `program` on `ifname` (a restart:
    /// atomic, `bpf_link_update`) or attaches it anew.
    fn attach_infrastructure(
        &mut self,
        program: NodeProgram,
        ifname: &str,
        pin: &std::path::Path,
    ) -> anyhow::Result<()> {
        if pin.exists() && self.datapath_mut().reattach(program.name, pin).is_ok() {
            return Ok(());
        }
        self.datapath_mut()
            .attach_node_program(program, ifname, pin)
            .with_context(|| format!("attaching {} to {ifname}", program.name))
    }

    /// Makes the datapath and the host routes match `nodes` (all nodes of
    /// the cluster, this one included), see [`reconcile`]; then podnet's
    /// nft table (the exempt nodes and VXLAN peers change with them).
    pub fn apply_nodes(&mut self, net: &NodeNetwork, nodes: &[NodeRecord]) -> anyhow::Result<()> {
        let config = self.config().clone();
        let local = Local {
            name: &config.node_name,
            node_ip: net.node_ip,
            pod_cidr: config.pod_cidr,
            cluster_cidr: config.cluster_cidr,
        };
        // Taken out for the call (the datapath is borrowed beside it) and
        // put back whatever happened: what was done stays recorded.
        let mut state = std::mem::take(&mut self.cluster);
        let reconciled = reconcile_nodes(
            &mut state,
            local,
            net,
            nodes,
            self.datapath_mut(),
            &mut netlink::Kernel,
        );
        self.cluster = state;
        reconciled?;
        if net.masquerade {
            let nodes: Vec<Ipv4Addr> = nodes.iter().map(|n| n.node_ip).collect();
            self.write_nft_table(net, &nodes)?;
        }
        Ok(())
    }

    /// Writes podnet's nft table (see [`nft_script`]) for the cluster's
    /// `nodes` (their underlay addresses): in direct mode they are exempt
    /// from masquerade, in vxlan mode the other nodes are the VXLAN peers
    /// whose tunnel traffic is not tracked.
    fn write_nft_table(&self, net: &NodeNetwork, nodes: &[Ipv4Addr]) -> anyhow::Result<()> {
        let exempt: Vec<Ipv4Addr> = match net.mode {
            Mode::Direct => nodes.to_vec(),
            Mode::Vxlan | Mode::Local => Vec::new(),
        };
        let peers: Vec<Ipv4Addr> = self.cluster.node_addresses.iter().copied().collect();
        let untracked = (net.mode == Mode::Vxlan).then_some(Untracked {
            node_ip: net.node_ip,
            port: net.vxlan_port,
            peers: &peers,
        });
        nft(&nft_script(
            self.config().cluster_cidr,
            &exempt,
            untracked.as_ref(),
        ))
    }

    /// Retries the host routes that failed. Returns whether none is left.
    pub fn retry_failed_routes(&mut self, net: &NodeNetwork) -> bool {
        reconcile::retry_failed_routes(&mut self.cluster, net, &mut netlink::Kernel)
    }

    /// The host routes that failed, for status.
    #[must_use]
    pub fn failed_routes(&self) -> Vec<String> {
        self.cluster
            .route_failures
            .iter()
            .map(|(cidr, (node_ip, error))| format!("host route {cidr} via {node_ip}: {error}"))
            .collect()
    }

    /// The other nodes as programmed.
    #[must_use]
    pub fn remote_nodes(&self) -> Vec<NodeRecord> {
        self.cluster.remotes.values().cloned().collect()
    }

    /// The datastore as the agent follows it.
    #[must_use]
    pub fn datastore_status(&self) -> crate::api::DatastoreStatus {
        self.cluster.datastore.clone()
    }

    /// Records how the datastore is followed (for status requests).
    pub fn set_datastore_status(&mut self, status: crate::api::DatastoreStatus) {
        self.cluster.datastore = status;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::RecordingHost;

    fn host() -> RecordingHost {
        let link = |index, name: &str, mtu| LinkInfo {
            index,
            name: name.into(),
            mac: [2, 0, 0, 0, 0, 1],
            mtu,
        };
        RecordingHost {
            links: vec![
                (link(1, "lo", 65536), vec![Ipv4Addr::LOCALHOST]),
                (
                    link(2, "eth0", 9000),
                    vec![Ipv4Addr::new(192, 168, 100, 1), Ipv4Addr::new(10, 0, 0, 1)],
                ),
                (link(3, "eth1", 1500), vec![]),
            ],
            ..RecordingHost::default()
        }
    }

    #[test]
    fn the_underlay_is_found_by_address_or_by_device() {
        let ip = Ipv4Addr::new(192, 168, 100, 1);
        let (found, link) = find_underlay(&mut host(), Some(ip), None).expect("by address");
        assert_eq!((found, link.name.as_str()), (ip, "eth0"));
        let (found, link) = find_underlay(&mut host(), None, Some("eth0")).expect("by device");
        assert_eq!((found, link.index), (ip, 2), "its first address");
        let other = Ipv4Addr::new(10, 0, 0, 1);
        let (found, _) = find_underlay(&mut host(), Some(other), Some("eth0")).expect("both");
        assert_eq!(found, other);
        for (ip, dev) in [
            (None, Some("eth1")),
            (None, Some("eth9")),
            (Some(Ipv4Addr::new(192, 168, 1, 1)), None),
            (None, None),
        ] {
            assert!(
                find_underlay(&mut host(), ip, dev).is_err(),
                "{ip:?} {dev:?}"
            );
        }
    }

    #[test]
    fn the_pod_mtu_leaves_room_for_vxlan_only() {
        let mut net = NodeNetwork {
            mode: Mode::Vxlan,
            node_ip: Ipv4Addr::new(192, 168, 100, 1),
            underlay_dev: "eth0".into(),
            underlay_ifindex: 2,
            underlay_mtu: 9000,
            vni: 1,
            vxlan_port: node::VXLAN_PORT,
            masquerade: true,
            vxlan_datapath: VxlanDatapath::Bpf,
        };
        assert_eq!(net.pod_mtu(), 9000 - VXLAN_OVERHEAD);
        net.mode = Mode::Direct;
        assert_eq!(net.pod_mtu(), 9000);
        net.mode = Mode::Local;
        assert_eq!(net.pod_mtu(), 9000);
    }
}
