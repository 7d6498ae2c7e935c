//! The spoofing corpus, on the lab in vxlan and in direct mode: forged
//! frames from a real pod (AF_PACKET, what a pod with CAP_NET_RAW can send),
//! VXLAN injected from the fabric and from another node, and frames forged
//! on the underlay (pod-network sources, to pods and to the node itself).
//! For each: the target pods and node receive nothing, the node's
//! neighbours and IPv6 routes and addresses do not change (the VXLAN device
//! has none), and the drop counter that names the check moves. Legitimate traffic between the same pods passes
//! before and after (the corpus would prove nothing on a dead path).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use podnet::api::{Client, CounterTotals, NodeInfo, Request};
use podnet_tests::{
    lab::{LabDatastore, LabGuard, LabLayout, LabNode, LabOptions, LabPod, in_netns},
    privileged,
    spoof::{self, Listener},
};

const PORT: u16 = 7001;
const VXLAN_PORT: u16 = 4789;
const VNI: u32 = 1;
/// A MAC no pod or node has.
const FORGED_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];
/// An unused address in node1's pod CIDR.
const FREE_OFFSET: u8 = 250;

fn pod<'a>(layout: &'a LabLayout, name: &str) -> &'a LabPod {
    layout.pod(name).unwrap_or_else(|| panic!("no pod {name}"))
}

fn node<'a>(layout: &'a LabLayout, name: &str) -> &'a LabNode {
    layout
        .node(name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn drops(node: &LabNode) -> BTreeMap<String, u64> {
    let c: CounterTotals = Client::new(&node.agent_socket)
        .call(&Request::Counters)
        .expect("counters");
    c.drops
}

/// `ip <args>` in `netns`, stdout as text.
fn ip_text(netns: &str, args: &[&str]) -> String {
    let out = in_netns(netns, "ip")
        .expect("netns")
        .args(args)
        .output()
        .expect("ip");
    assert!(out.status.success(), "ip {args:?} in {netns}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node's neighbour entries as (address, MAC).
fn neighbours(netns: &str) -> BTreeSet<(String, String)> {
    let json: serde_json::Value =
        serde_json::from_str(&ip_text(netns, &["-j", "neigh", "show"])).expect("ip -j neigh");
    json.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            Some((
                n["dst"].as_str()?.to_owned(),
                n["lladdr"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// One kind of forged traffic: what is sent, and which drop counter of
/// which node must count at least `frames` more.
struct Case {
    name: &'static str,
    frames: usize,
    counted_by: Option<(&'static str, &'static str)>,
}

/// The lab's cast: pod a (node1) attacks pod t (node1) and pod r (node2).
struct Corpus<'a> {
    mode: &'a str,
    layout: &'a LabLayout,
    attacker: &'a LabPod,
    victim: &'a LabPod,
    remote: &'a LabPod,
    node1: &'a LabNode,
    node2: &'a LabNode,
    /// On the victim, the remote pod and node1 itself.
    listeners: [Listener; 3],
    attacker_mac: [u8; 6],
    gateway_mac: [u8; 6],
    cases: Vec<Case>,
}

impl<'a> Corpus<'a> {
    fn new(mode: &'a str, layout: &'a LabLayout) -> Self {
        let (attacker, victim, remote) = (
            pod(layout, "node1-pod1"),
            pod(layout, "node1-pod2"),
            pod(layout, "node2-pod1"),
        );
        let node1 = node(layout, "node1");
        let listen = |netns: &str| {
            Listener::bind(netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT)).expect("listener")
        };
        Self {
            mode,
            layout,
            attacker,
            victim,
            remote,
            node1,
            node2: node(layout, "node2"),
            listeners: [
                listen(&victim.netns),
                listen(&remote.netns),
                listen(&node1.netns),
            ],
            attacker_mac: spoof::mac_of(&attacker.netns, "eth0").expect("a's MAC"),
            gateway_mac: spoof::host_veth_mac(&attacker.netns, &node1.netns)
                .expect("a's gateway MAC"),
            cases: Vec::new(),
        }
    }

    fn vxlan(&self) -> bool {
        self.mode == "vxlan"
    }

    /// The attacker's own traffic reaches both targets (`tag` tells
    /// rounds apart).
    fn legit_traffic_passes(&self, tag: &str) {
        for (target, listener) in [self.victim, self.remote].iter().zip(&self.listeners) {
            let payload = format!("legit-{}-{tag}", target.name);
            spoof::send_udp(
                &self.attacker.netns,
                SocketAddrV4::new(target.ip, PORT),
                payload.as_bytes(),
            )
            .expect("send");
            assert!(
                listener
                    .drain(Duration::from_millis(700))
                    .contains(payload.as_bytes()),
                "{}: a's own traffic reaches {} ({tag})",
                self.mode,
                target.name
            );
        }
    }

    /// An address of the attacker's pod CIDR with the last octet `last`.
    fn pod_net(&self, last: u8) -> Ipv4Addr {
        let net = self.attacker.ip.octets();
        Ipv4Addr::new(net[0], net[1], net[2], last)
    }

    /// A frame from the attacker's MAC to its gateway, UDP to `dst`.
    fn udp(&self, src: Ipv4Addr, dst: Ipv4Addr, tag: &str) -> Vec<u8> {
        spoof::udp_frame(
            (self.gateway_mac, self.attacker_mac),
            (src, dst),
            PORT,
            format!("forged-{tag}").as_bytes(),
        )
    }

    fn send_from_pod(
        &mut self,
        name: &'static str,
        frames: &[Vec<u8>],
        counted_by: Option<&'static str>,
    ) {
        spoof::send_raw(&self.attacker.netns, "eth0", frames).expect("send from pod a");
        self.cases.push(Case {
            name,
            frames: frames.len(),
            counted_by: counted_by.map(|reason| ("node1", reason)),
        });
    }

    /// Every forged frame kind a pod can send.
    fn forge_from_pod(&mut self) {
        let (a, t, r) = (self.attacker.ip, self.victim.ip, self.remote.ip);
        let (a_mac, gw_mac, gw_ip) = (self.attacker_mac, self.gateway_mac, self.pod_net(1));
        let ip_forged = [
            self.udp(self.pod_net(FREE_OFFSET), t, "ip-t"),
            self.udp(r, t, "ip-as-r"),
            self.udp(t, r, "ip-as-t"),
        ];
        self.send_from_pod("forged source IP", &ip_forged, Some("spoofed_source_ip"));
        let mac_forged: Vec<_> = [(t, "mac-t"), (r, "mac-r")]
            .into_iter()
            .map(|(dst, tag)| {
                spoof::udp_frame(
                    (gw_mac, FORGED_MAC),
                    (a, dst),
                    PORT,
                    format!("forged-{tag}").as_bytes(),
                )
            })
            .collect();
        self.send_from_pod("forged source MAC", &mac_forged, Some("spoofed_source_mac"));
        let tagged = [
            spoof::vlan(&self.udp(a, t, "vlan5"), 5),
            spoof::vlan(&self.udp(a, t, "vlan0"), 0),
            spoof::vlan(&self.udp(a, r, "vlan0-r"), 0),
            spoof::qinq(&self.udp(a, t, "qinq"), 100),
        ];
        self.send_from_pod(
            "VLAN and QinQ tagged",
            &tagged,
            Some("unsupported_ethertype"),
        );
        // The inner frames claim another pod as their source.
        let to_node = |node_ip, inner: Vec<u8>| {
            spoof::udp_frame(
                (gw_mac, a_mac),
                (a, node_ip),
                VXLAN_PORT,
                &spoof::vxlan_payload(VNI, &inner),
            )
        };
        let vxlan = [
            to_node(self.node1.node_ip, self.udp(r, t, "vxlan-inner-as-r")),
            to_node(self.node2.node_ip, self.udp(t, r, "vxlan-inner-as-t")),
        ];
        // Direct mode has no VXLAN device: nothing listens on the port.
        let counted = self.vxlan().then_some("vxlan_from_pod");
        self.send_from_pod(
            "VXLAN to its own node and to the other node",
            &vxlan,
            counted,
        );
        let arp = [
            // "t's address is at a's MAC", to the gateway.
            spoof::arp(([0xff; 6], a_mac), 2, (a_mac, t), (gw_mac, gw_ip)),
            // A request in a's name with another MAC.
            spoof::arp(([0xff; 6], a_mac), 1, (FORGED_MAC, a), ([0; 6], gw_ip)),
            // Frame and sender MAC both forged.
            spoof::arp(([0xff; 6], FORGED_MAC), 1, (FORGED_MAC, t), ([0; 6], gw_ip)),
        ];
        self.send_from_pod("ARP with a forged sender", &arp, Some("forged_arp"));
        let ipv6 = [
            spoof::router_advertisement(a_mac),
            spoof::neighbour_solicitation(a_mac, spoof::link_local(gw_mac)),
        ];
        self.send_from_pod(
            "IPv6 router advertisement and neighbour solicitation",
            &ipv6,
            Some("ipv6_from_pod"),
        );
    }

    /// vxlan mode: VXLAN to node1 from a host that is no node, and from
    /// node2 for sources that are not node2's.
    fn forge_tunnel(&mut self) {
        let (t, node1_ip) = (self.victim.ip, self.node1.node_ip);
        let send = |netns: &str, inner: Vec<u8>| {
            spoof::send_udp(
                netns,
                SocketAddrV4::new(node1_ip, VXLAN_PORT),
                &spoof::vxlan_payload(VNI, &inner),
            )
            .expect("send VXLAN");
        };
        send(
            &self.layout.fabric_netns,
            self.udp(self.remote.ip, t, "fabric-vxlan"),
        );
        self.cases.push(Case {
            name: "VXLAN from a host that is no node",
            frames: 1,
            counted_by: Some(("node1", "unknown_tunnel_source")),
        });
        for (src, tag) in [
            (self.attacker.ip, "node2-as-a"),
            (self.layout.fabric_host, "node2-as-fabric"),
        ] {
            send(&self.node2.netns, self.udp(src, t, tag));
        }
        self.cases.push(Case {
            name: "VXLAN from a node for sources that are not its own",
            frames: 2,
            counted_by: Some(("node1", "tunnel_source_mismatch")),
        });
        // IPv6 from a known node (or anyone taking its address): the
        // stack gets it, and the VXLAN device has IPv6 off, so nothing is
        // configured (checked with node1's IPv6 state, see the corpus).
        let node2_mac = spoof::mac_of(&self.node2.netns, "eth0").expect("node2 MAC");
        send(&self.node2.netns, spoof::router_advertisement(node2_mac));
        self.cases.push(Case {
            name: "router advertisement through the tunnel",
            frames: 1,
            counted_by: None,
        });
    }

    /// Frames the fabric host puts on the underlay in node2's and its pod's
    /// name, and from an address of the pod network that no node owns,
    /// unicast to node1: to a pod, and (pod sources) to node1 itself, where
    /// a Service or NodePort DNAT would take them on to a backend. In vxlan
    /// mode no pod source arrives unencapsulated; in direct mode only from
    /// the MAC of the node that owns it. Direct mode also: a broadcast to a
    /// pod.
    fn forge_underlay(&mut self) {
        let fabric = &self.layout.fabric_netns;
        let n1_mac = spoof::mac_of(&self.node1.netns, "eth0").expect("node1 MAC");
        let fabric_mac = spoof::mac_of(fabric, "br0").expect("fabric MAC");
        let frame = |dst_mac, (src, dst), tag: &str| {
            spoof::udp_frame(
                (dst_mac, fabric_mac),
                (src, dst),
                PORT,
                format!("forged-{tag}").as_bytes(),
            )
        };
        let (t, node1_ip, unowned) = (
            self.victim.ip,
            self.node1.node_ip,
            self.unowned_pod_address(),
        );
        let mut forged = vec![
            frame(n1_mac, (self.remote.ip, t), "underlay-as-r"),
            frame(n1_mac, (unowned, t), "underlay-unowned"),
            frame(n1_mac, (self.remote.ip, node1_ip), "underlay-as-r-to-node"),
            frame(n1_mac, (unowned, node1_ip), "underlay-unowned-to-node"),
        ];
        if !self.vxlan() {
            // vxlan mode: node2's own address is for the node's business.
            forged.push(frame(n1_mac, (self.node2.node_ip, t), "underlay-as-node2"));
        }
        spoof::send_raw(fabric, "br0", &forged).expect("send on the fabric");
        self.cases.push(Case {
            name: "underlay frames in another node's name and in no node's",
            frames: forged.len(),
            counted_by: Some(("node1", "underlay_source_mismatch")),
        });
        if self.vxlan() {
            return;
        }
        let broadcast = [frame(
            [0xff; 6],
            (self.layout.fabric_host, t),
            "underlay-broadcast",
        )];
        spoof::send_raw(fabric, "br0", &broadcast).expect("send on the fabric");
        self.cases.push(Case {
            name: "underlay broadcast to a pod",
            frames: 1,
            counted_by: Some(("node1", "underlay_not_unicast")),
        });
    }

    /// An address of the cluster CIDR in no node's pod CIDR (the lab's
    /// nodes take the first ones).
    fn unowned_pod_address(&self) -> Ipv4Addr {
        let info: NodeInfo = Client::new(&self.node1.agent_socket)
            .call(&Request::Node)
            .expect("node info");
        let last = info
            .cluster_cidr
            .subnets(24)
            .expect("/24s")
            .last()
            .expect("a last /24");
        Ipv4Addr::from(u32::from(last.network()) + 9)
    }

    fn assert_nothing_forged_arrived(&self) {
        let targets = [
            self.victim.name.as_str(),
            self.remote.name.as_str(),
            "node1",
        ];
        for (target, listener) in targets.iter().zip(&self.listeners) {
            let forged: Vec<String> = listener
                .drain(Duration::from_millis(1500))
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .filter(|p| p.contains("forged"))
                .collect();
            assert!(
                forged.is_empty(),
                "{}: {target} received {forged:?}",
                self.mode,
            );
        }
    }

    fn drops(&self) -> [BTreeMap<String, u64>; 2] {
        [drops(self.node1), drops(self.node2)]
    }

    /// Every case's check counted what it dropped.
    fn assert_counted(&self, before: &[BTreeMap<String, u64>; 2]) {
        let after = self.drops();
        let mut wanted: BTreeMap<(&str, &str), (u64, Vec<&str>)> = BTreeMap::new();
        for case in &self.cases {
            if let Some(key) = case.counted_by {
                let entry = wanted.entry(key).or_default();
                entry.0 += case.frames as u64;
                entry.1.push(case.name);
            }
        }
        for ((node_name, reason), (frames, names)) in &wanted {
            let index = usize::from(*node_name == "node2");
            let count = |m: &BTreeMap<String, u64>| m.get(*reason).copied().unwrap_or(0);
            let moved = count(&after[index]) - count(&before[index]);
            assert!(
                moved >= *frames,
                "{}: {node_name} {reason} moved by {moved}, expected {frames} ({names:?})",
                self.mode
            );
        }
    }
}

/// What forged ARP and IPv6 could change on node1.
fn node_state(netns: &str) -> (BTreeSet<(String, String)>, String, String) {
    (
        neighbours(netns),
        ip_text(netns, &["-6", "route", "show"]),
        ip_text(netns, &["-6", "addr", "show"]),
    )
}

fn spoofing_corpus(mode: &str) {
    spoofing_corpus_with(mode, &[]);
}

/// The corpus against agents started with `agent_args` as well.
fn spoofing_corpus_with(mode: &str, agent_args: &[&str]) {
    let lab = LabGuard::up_with(
        &format!(
            "{}{}",
            if agent_args.is_empty() { "iso" } else { "isb" },
            &mode[..1]
        ),
        2,
        2,
        mode,
        LabDatastore::File,
        LabOptions {
            agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
            ..LabOptions::default()
        },
    )
    .expect("lab up");
    let mut corpus = Corpus::new(mode, &lab.layout);
    corpus.legit_traffic_passes("before");
    let state_before = node_state(&corpus.node1.netns);
    let drops_before = corpus.drops();

    corpus.forge_from_pod();
    if corpus.vxlan() {
        corpus.forge_tunnel();
    }
    corpus.forge_underlay();

    corpus.assert_nothing_forged_arrived();
    corpus.assert_counted(&drops_before);
    // The node's neighbour table learned nothing from the forged ARP, and
    // IPv6 configured nothing.
    let (neighbours_after, routes6, addrs6) = node_state(&corpus.node1.netns);
    let learned: Vec<_> = neighbours_after
        .difference(&state_before.0)
        .filter(|(ip, mac)| {
            *mac == mac_text(FORGED_MAC)
                || (*ip == corpus.victim.ip.to_string() && *mac == mac_text(corpus.attacker_mac))
        })
        .collect();
    assert!(learned.is_empty(), "{mode}: node1 learned {learned:?}");
    assert_eq!(
        (&routes6, &addrs6),
        (&state_before.1, &state_before.2),
        "{mode}: node1's IPv6 routes and addresses unchanged"
    );
    if corpus.vxlan() {
        let vxlan6 = ip_text(
            &corpus.node1.netns,
            &["-6", "addr", "show", "dev", "podnet_vxlan"],
        );
        assert!(
            vxlan6.trim().is_empty(),
            "{mode}: the VXLAN device has IPv6 off: {vxlan6}"
        );
    }
    corpus.legit_traffic_passes("after");
    let total: usize = corpus.cases.iter().map(|c| c.frames).sum();
    eprintln!(
        "isolation corpus ({mode}): {} kinds, {total} forged frames, 0 delivered",
        corpus.cases.len()
    );
}

#[test]
fn forged_traffic_reaches_no_pod_vxlan() {
    if !privileged("forged_traffic_reaches_no_pod_vxlan") {
        return;
    }
    spoofing_corpus("vxlan");
}

#[test]
fn forged_traffic_reaches_no_pod_direct() {
    if !privileged("forged_traffic_reaches_no_pod_direct") {
        return;
    }
    spoofing_corpus("direct");
}

/// `--vxlan-datapath kernel`: the node's VXLAN device decapsulates
/// everything and from_overlay checks it (the default, above, decapsulates
/// on the underlay and drops a node speaking for sources not its own
/// there, with the same reason).
#[test]
fn forged_traffic_reaches_no_pod_vxlan_kernel() {
    if !privileged("forged_traffic_reaches_no_pod_vxlan_kernel") {
        return;
    }
    spoofing_corpus_with("vxlan", &["--vxlan-datapath", "kernel"]);
}
