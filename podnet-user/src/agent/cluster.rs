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

use super::EndpointRegistry;
use crate::{datapath::NodeProgram, datastore::NodeRecord, netlink};

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

impl EndpointRegistry {
    /// Creates the overlay device or hooks the underlay, attaches the
    /// receive program, writes the node config, enables forwarding.
    pub fn setup_node_network(&mut self, net: &NodeNetwork) -> anyhow::Result<()> {
        let links_dir = self.config().links_dir();
        let mut config = NodeConfig {
            node_ip: crate::datapath::ip_key(net.node_ip),
            mode: node::MODE_LOCAL_ONLY,
            tunnel_ifindex: 0,
            underlay_ifindex: net.underlay_ifindex,
            vni: net.vni,
            vxlan_port: 0,
            reserved: 0,
            pod_cidr_network: crate::datapath::ip_key(self.config().pod_cidr.network()),
            pod_cidr_mask: crate::datapath::ip_key(self.config().pod_cidr.netmask()),
            drop_events_per_sec: 0,
            flags: 0,
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
                if net.vxlan_datapath == VxlanDatapath::Bpf {
                    // Decapsulation on the underlay's ingress. (A restart
                    // back to `kernel` leaves the link: from_underlay
                    // passes everything without the flag.)
                    let pin = links_dir.join(format!("underlay-{}", net.underlay_dev));
                    self.attach_infrastructure(
                        NodeProgram::FROM_UNDERLAY,
                        &net.underlay_dev,
                        &pin,
                    )?;
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
        self.datapath_mut().set_config(config)?;
        if net.masquerade || net.mode != Mode::Local {
            // Pods' traffic through the stack is forwarded; in direct mode
            // from_underlay's sender check also needs it (bpf_fib_lookup
            // answers FWD_DISABLED on a device that does not forward).
            write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        }
        if net.masquerade {
            let untracked = (net.mode == Mode::Vxlan).then_some(Untracked {
                node_ip: net.node_ip,
                port: net.vxlan_port,
                peers: &[],
            });
            nft(&nft_script(
                self.config().cluster_cidr,
                &[],
                untracked.as_ref(),
            ))?;
        }
        info!(mode = ?net.mode, vxlan_datapath = ?net.vxlan_datapath, node_ip = %net.node_ip, underlay = %net.underlay_dev, pod_mtu = net.pod_mtu(), "node network ready");
        Ok(())
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
    /// the cluster, this one included).
    pub fn apply_nodes(&mut self, net: &NodeNetwork, nodes: &[NodeRecord]) -> anyhow::Result<()> {
        let me = self.config().node_name.clone();
        let (routable, refused) = crate::datastore::routable_nodes(
            nodes,
            (&me, net.node_ip),
            self.config().pod_cidr,
            self.config().cluster_cidr,
        );
        for (node, why) in &refused {
            warn!(node = %node.name, node_ip = %node.node_ip, pod_cidr = %node.pod_cidr, reason = %why,
                  "ignoring a datastore record");
        }
        let wanted: BTreeMap<Ipv4Net, NodeRecord> =
            routable.into_iter().map(|n| (n.pod_cidr, n)).collect();
        let wanted_addresses: BTreeSet<Ipv4Addr> = wanted.values().map(|n| n.node_ip).collect();
        // Also entries left in the pinned map by a previous agent.
        let pinned = self.datapath_mut().remotes()?;
        let stale: BTreeSet<Ipv4Net> = self
            .cluster
            .remotes
            .keys()
            .copied()
            .chain(pinned.iter().filter(|e| !e.node_address).map(|e| e.cidr))
            .filter(|c| !wanted.contains_key(c))
            .collect();
        for cidr in stale {
            self.datapath_mut().remove_remote(cidr)?;
            let _ = netlink::with_netlink(None, move |h| async move {
                netlink::delete_route(&h, cidr).await
            });
            if let Some(gone) = self.cluster.remotes.remove(&cidr) {
                info!(node = %gone.name, %cidr, "node left; routes removed");
            }
        }
        let stale_addresses: BTreeSet<Ipv4Addr> = self
            .cluster
            .node_addresses
            .iter()
            .copied()
            .chain(pinned.iter().filter(|e| e.node_address).map(|e| e.node_ip))
            .filter(|ip| !wanted_addresses.contains(ip))
            .collect();
        for ip in stale_addresses {
            self.datapath_mut().remove_remote(Ipv4Net::from(ip))?;
            self.cluster.node_addresses.remove(&ip);
            if net.mode == Mode::Direct {
                let underlay = net.underlay_ifindex;
                if let Err(e) = netlink::with_netlink(None, move |h| async move {
                    netlink::delete_neighbour(&h, underlay, ip).await
                }) {
                    warn!(error = %format!("{e:#}"), node_ip = %ip, "removing a departed node's neighbour");
                }
            }
        }
        self.cluster
            .route_failures
            .retain(|cidr, _| wanted.contains_key(cidr));
        for (cidr, node) in &wanted {
            if self.cluster.remotes.get(cidr) == Some(node)
                && !self.cluster.route_failures.contains_key(cidr)
            {
                continue;
            }
            self.datapath_mut().upsert_remote(*cidr, node.node_ip)?;
            self.install_host_route(net, *cidr, node.node_ip);
            info!(node = %node.name, %cidr, node_ip = %node.node_ip, "node joined");
            self.cluster.remotes.insert(*cidr, node.clone());
        }
        for ip in wanted_addresses {
            if self.cluster.node_addresses.contains(&ip) {
                continue;
            }
            self.datapath_mut().upsert_node_address(ip)?;
            if net.mode == Mode::Direct {
                // from_underlay accepts a pod-network source only in a frame
                // from its node's MAC, read from this neighbour entry.
                let underlay = net.underlay_ifindex;
                if let Err(e) = netlink::with_netlink(None, move |h| async move {
                    netlink::keep_neighbour_resolved(&h, underlay, ip).await
                }) {
                    warn!(error = %format!("{e:#}"), node_ip = %ip,
                          "managed neighbour for a node (its pods' traffic is dropped until the kernel learns it)");
                }
            }
            self.cluster.node_addresses.insert(ip);
        }
        if net.masquerade {
            let exempt: Vec<Ipv4Addr> = match net.mode {
                Mode::Direct => nodes.iter().map(|n| n.node_ip).collect(),
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
            ))?;
        }
        Ok(())
    }

    /// Installs the host route to `cidr`; a failure is logged and kept for
    /// [`Self::retry_failed_routes`] (the datapath forwards pods' traffic
    /// without it; the node's own traffic to those pods needs it).
    fn install_host_route(&mut self, net: &NodeNetwork, cidr: Ipv4Net, node_ip: Ipv4Addr) {
        match self.host_route(net, cidr, node_ip) {
            Ok(()) => {
                if self.cluster.route_failures.remove(&cidr).is_some() {
                    info!(%cidr, %node_ip, "host route installed after all");
                }
            }
            Err(e) => {
                let error = format!("{e:#}");
                warn!(%error, %cidr, %node_ip, "host route to a remote pod CIDR failed; retrying");
                self.cluster.route_failures.insert(cidr, (node_ip, error));
            }
        }
    }

    /// Retries the host routes that failed. Returns whether none is left.
    pub fn retry_failed_routes(&mut self, net: &NodeNetwork) -> bool {
        let failed: Vec<(Ipv4Net, Ipv4Addr)> = self
            .cluster
            .route_failures
            .iter()
            .map(|(cidr, (node_ip, _))| (*cidr, *node_ip))
            .collect();
        for (cidr, node_ip) in failed {
            self.install_host_route(net, cidr, node_ip);
        }
        self.cluster.route_failures.is_empty()
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

    /// The node's own traffic to a remote pod CIDR: through the overlay
    /// (lightweight-tunnel route) or via the remote node (direct).
    fn host_route(
        &self,
        net: &NodeNetwork,
        cidr: Ipv4Net,
        node_ip: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let (mode, tunnel, vni, underlay, src) = (
            net.mode,
            self.cluster.tunnel_ifindex,
            net.vni,
            net.underlay_ifindex,
            net.node_ip,
        );
        netlink::with_netlink(None, move |h| async move {
            match mode {
                Mode::Vxlan => {
                    netlink::replace_tunnel_route(&h, cidr, tunnel, vni, node_ip, src).await
                }
                Mode::Direct => netlink::replace_gateway_route(&h, cidr, node_ip, underlay).await,
                Mode::Local => Ok(()),
            }
        })
        .with_context(|| format!("route to {cidr} via {node_ip}"))
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
