//! `podnetctl explain`: what the datapath would do with a packet a pod
//! sends, without sending it. The agent builds the frame the pod would put
//! on its veth, runs it through `from_pod` with `BPF_PROG_TEST_RUN` as if it
//! arrived on the pod's host veth, and reads the verdict, the drop reason
//! and the rewritten frame.
//!
//! No side effects on the live datapath: the run uses a scratch instance
//! of the same object (the agent's embedded build, so the same code the
//! pods' filters run), loaded with its own maps in a private bpffs, into
//! which the agent copies exactly what the packet's path reads from the
//! live maps: the node config, the sender's per-veth identity (and
//! shaper), the destination's endpoint entry, the remote trie entries
//! containing the destination, and the stack-flow entries of the packet's
//! tuple in both directions. The live maps are only read: no counter
//! moves (verdicts, drops, the pod's packets and bytes), no stack flow is
//! refreshed or removed (from_pod removes a flow's reply entry on a TCP
//! SYN).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use podnet_common::{
    EndpointInfo, FlowKey, NodeConfig, Verdict, VethEndpoint, endpoint::ENDPOINT_F_SHAPED_INGRESS,
};

use crate::datapath::{Datapath, DatapathError};

pub use crate::api::explain::{
    Destination, ExplainRequest, Explanation, PolicySide, PolicyVerdicts, Proto, Sender,
    ServiceTranslation,
};

/// Live state the packet's path reads, copied into the scratch instance.
#[derive(Debug, Clone)]
pub struct World {
    pub config: NodeConfig,
    /// The sender's per-veth entry (identity, shaper) and its endpoint
    /// entry.
    pub sender_veth: Option<VethEndpoint>,
    pub sender_entry: Option<EndpointInfo>,
    /// The destination address and its endpoint entry, if it is a local
    /// pod.
    pub to: Ipv4Addr,
    pub destination: Option<EndpointInfo>,
    /// Remote trie entries containing the destination:
    /// (cidr, node IP, is a node address).
    pub remotes: Vec<(ipnet::Ipv4Net, Ipv4Addr, bool)>,
    pub flows: Vec<(FlowKey, podnet_common::StackFlow)>,
    /// The Service frontend the packet is addressed to (`--services bpf`):
    /// the scratch instance gets it with one slot, the backend followed,
    /// and `to` is that backend's address.
    pub service: Option<ServiceWorld>,
}

/// A Service frontend as the explained packet meets it.
#[derive(Debug, Clone)]
pub struct ServiceWorld {
    pub frontend: crate::services::Frontend,
    pub entry: podnet_common::ServiceEntry,
    /// The backend followed (the frontend's first slot), if any.
    pub backend: Option<crate::services::BackendAddress>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("preparing a private bpffs at {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the scratch datapath")]
    Datapath(#[from] DatapathError),
    #[error("running from_pod on the packet (BPF_PROG_TEST_RUN)")]
    TestRun(#[source] aya::programs::ProgramError),
}

/// The source port of an explained TCP/UDP packet (an ephemeral port).
pub const SOURCE_PORT: u16 = 40_000;
const TTL: u8 = 64;
/// Offset of `ifindex` in `struct __sk_buff` (UAPI, stable).
const SKB_IFINDEX_OFFSET: usize = 40;

/// The frame `sender` would put on its veth for `request`: Ethernet to its
/// gateway's MAC (the host veth's, which the pod resolves), IPv4 with TTL
/// 64, and a TCP SYN, a UDP datagram or an ICMP echo request.
#[must_use]
pub fn build_frame(sender: &Sender, request: &ExplainRequest) -> Vec<u8> {
    let l4: Vec<u8> = match request.proto {
        Proto::Tcp => {
            let mut tcp = vec![0u8; 20];
            tcp[0..2].copy_from_slice(&SOURCE_PORT.to_be_bytes());
            tcp[2..4].copy_from_slice(&request.port.unwrap_or(80).to_be_bytes());
            tcp[12] = 5 << 4; // data offset: 5 words
            tcp[13] = 0x02; // SYN
            tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes()); // window
            tcp
        }
        Proto::Udp => {
            let mut udp = vec![0u8; 8];
            udp[0..2].copy_from_slice(&SOURCE_PORT.to_be_bytes());
            udp[2..4].copy_from_slice(&request.port.unwrap_or(53).to_be_bytes());
            udp[4..6].copy_from_slice(&8u16.to_be_bytes());
            udp
        }
        Proto::Icmp => {
            let mut icmp = vec![8u8, 0, 0, 0, 0x70, 0x6e, 0, 1]; // echo, id "pn", seq 1
            let sum = checksum(&icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            icmp
        }
    };
    let source = request.forged_source.unwrap_or(sender.ip);
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    let total = u16::try_from(20 + l4.len()).unwrap_or(u16::MAX);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = TTL;
    ip[9] = request.proto.number();
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&request.to.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::with_capacity(14 + ip.len() + l4.len());
    frame.extend_from_slice(&sender.host_mac);
    frame.extend_from_slice(&sender.pod_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

/// The Internet checksum (RFC 1071) of `bytes`.
#[must_use]
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The flow keys of the packet in both directions (as the datapath keys
/// them: addresses and ports as on the wire; ICMP echo keeps its
/// identifier in `src_port` both ways).
#[must_use]
pub fn flow_keys(sender: &Sender, request: &ExplainRequest) -> [FlowKey; 2] {
    let src = u32::from_ne_bytes(request.forged_source.unwrap_or(sender.ip).octets());
    let dst = u32::from_ne_bytes(request.to.octets());
    let proto = request.proto.number();
    let key = |src, dst, src_port, dst_port| FlowKey::new(src, dst, src_port, dst_port, proto);
    match request.proto {
        Proto::Icmp => {
            let id = u16::from_ne_bytes([0x70, 0x6e]);
            [key(src, dst, id, 0), key(dst, src, id, 0)]
        }
        Proto::Tcp | Proto::Udp => {
            let sport = SOURCE_PORT.to_be();
            let dport = request
                .port
                .unwrap_or(if request.proto == Proto::Tcp { 80 } else { 53 })
                .to_be();
            [key(src, dst, sport, dport), key(dst, src, dport, sport)]
        }
    }
}

/// A private bpffs mount for the scratch instance; unmounted and removed
/// on drop, its maps with it.
struct ScratchBpffs(PathBuf);

impl ScratchBpffs {
    fn new(state_dir: &Path) -> Result<Self, ExplainError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = state_dir.join(format!(
            "explain-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let bpffs_error = |source: Box<dyn std::error::Error + Send + Sync>| ExplainError::Bpffs {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&path).map_err(|e| bpffs_error(Box::new(e)))?;
        // Guard first: a failed mount still removes the directory.
        let guard = Self(path.clone());
        nix::mount::mount(
            Some("bpffs"),
            &path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| bpffs_error(Box::new(e)))?;
        Ok(guard)
    }
}

impl Drop for ScratchBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// What `from_pod` did with the frame in the scratch instance.
pub struct RunResult {
    pub return_code: i32,
    pub verdict: Option<Verdict>,
    pub drop_reason: Option<String>,
    pub frame_out: Vec<u8>,
}

/// Loads the scratch instance in a private bpffs under `state_dir`, copies
/// `world` into it and runs `frame` through from_pod as if it arrived on
/// the sender's host veth (`host_ifindex`, looked up in the caller's
/// netns: call it on the node's).
pub fn run_scratch(
    state_dir: &Path,
    world: &World,
    host_ifindex: u32,
    frame: &[u8],
) -> Result<RunResult, ExplainError> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let bpffs = ScratchBpffs::new(state_dir)?;
    let mut scratch = Datapath::load(&bpffs.0)?;
    scratch.set_config(world.config)?;
    // The destination first: when it is the sender itself, the sender's
    // own entries (with its shaper) must be the ones that stay.
    if let Some(destination) = world.destination {
        scratch.upsert_endpoint(world.to, destination)?;
    }
    if let Some(veth) = world.sender_veth {
        let info = world.sender_entry.unwrap_or(EndpointInfo {
            host_ifindex,
            flags: 0,
            pod_mac: veth.pod_mac,
            host_mac: veth.host_mac,
        });
        scratch.upsert_shaped_endpoint(
            Ipv4Addr::from(veth.pod_ip.to_ne_bytes()),
            info,
            veth.egress_shaper_ifindex,
        )?;
    }
    for (cidr, node_ip, node_address) in &world.remotes {
        if *node_address {
            scratch.upsert_node_address(*node_ip)?;
        } else {
            scratch.upsert_remote(*cidr, *node_ip)?;
        }
    }
    for (key, flow) in &world.flows {
        scratch.insert_stack_flow(*key, *flow)?;
    }
    // The frontend with the followed backend as its only slot: the run
    // is then the same whichever slot a real connection would draw.
    if let Some(service) = &world.service {
        let backends = u32::from(service.backend.is_some());
        if let Some(backend) = service.backend {
            scratch.upsert_service_backend(service.entry.id, 1, backend)?;
        }
        scratch.upsert_service_frontend(
            service.frontend,
            podnet_common::ServiceEntry {
                backends,
                ..service.entry
            },
        )?;
    }
    let mut context = [0u8; SKB_IFINDEX_OFFSET + 4];
    context[SKB_IFINDEX_OFFSET..].copy_from_slice(&host_ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let program = scratch.classifier(podnet_common::names::PROG_FROM_POD)?;
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&context),
            repeat: 1,
            ..TestRunOptions::default()
        })
        .map_err(ExplainError::TestRun)?;
    out.truncate(usize::try_from(result.data_size_out).unwrap_or(0));
    let counters = scratch.counters()?;
    let verdict = Verdict::ALL
        .into_iter()
        .find(|v| counters.verdicts.get(v.name()).copied().unwrap_or(0) > 0);
    let drop_reason = counters
        .drops
        .iter()
        .find(|(_, count)| **count > 0)
        .map(|(reason, _)| (*reason).to_owned());
    Ok(RunResult {
        return_code: result.return_value.cast_signed(),
        verdict,
        drop_reason,
        frame_out: out,
    })
}

/// The TC return code's name.
#[must_use]
pub fn action_name(code: i32) -> String {
    match code {
        -1 => "TC_ACT_UNSPEC".to_owned(),
        0 => "TC_ACT_OK".to_owned(),
        2 => "TC_ACT_SHOT".to_owned(),
        7 => "TC_ACT_REDIRECT".to_owned(),
        other => other.to_string(),
    }
}

/// Where a packet with `verdict` goes, given the world it met.
#[must_use]
pub fn destination(run: &RunResult, world: &World, names: &Names) -> Destination {
    let remote = world
        .remotes
        .iter()
        .filter(|(cidr, _, _)| cidr.contains(&world.to))
        .max_by_key(|(cidr, _, _)| cidr.prefix_len());
    match run.verdict {
        Some(Verdict::RedirectPeer) => match world.destination {
            Some(info) => Destination::LocalPod {
                ip: world.to,
                container_id: names.destination_container.clone(),
                host_veth: ifname(info.host_ifindex),
                shaped: info.flags & ENDPOINT_F_SHAPED_INGRESS != 0,
            },
            None => Destination::HostStack {
                why: "redirected without an endpoint entry (changed meanwhile?)".to_owned(),
            },
        },
        Some(Verdict::VxlanEncap) => {
            let (node_ip, node_name) = remote_node(remote, names);
            Destination::Tunnel {
                node_ip,
                node_name,
                vni: world.config.vni,
                device: ifname(world.config.tunnel_ifindex),
            }
        }
        Some(Verdict::VxlanEncapBpf) => {
            // Encapsulated by from_pod itself and sent out of the underlay.
            let (node_ip, node_name) = remote_node(remote, names);
            Destination::Tunnel {
                node_ip,
                node_name,
                vni: world.config.vni,
                device: ifname(world.config.underlay_ifindex),
            }
        }
        Some(Verdict::RedirectNeigh) => {
            let (node_ip, node_name) = remote_node(remote, names);
            Destination::Underlay {
                node_ip,
                node_name,
                next_hop: node_ip,
                device: ifname(world.config.underlay_ifindex),
            }
        }
        Some(Verdict::ToShaper) => Destination::Shaper {
            device: world
                .sender_veth
                .map_or_else(String::new, |v| ifname(v.egress_shaper_ifindex)),
        },
        Some(Verdict::StackFlow) => Destination::HostStack {
            why: "a flow the node's stack handles (a Service or NAT): its packets go through \
                  conntrack both ways"
                .to_owned(),
        },
        Some(Verdict::Drop) => Destination::Dropped {
            reason: run.drop_reason.clone().unwrap_or_default(),
        },
        Some(Verdict::PassToStack) => Destination::HostStack {
            why: if world.destination.is_some() || remote.is_some() {
                "TTL expires here: the stack answers with ICMP time exceeded".to_owned()
            } else {
                "not a pod of the cluster: the node routes it (and masquerades it when it \
                 leaves the cluster)"
                    .to_owned()
            },
        },
        other => Destination::HostStack {
            why: format!("verdict {other:?}"),
        },
    }
}

fn remote_node(
    remote: Option<&(ipnet::Ipv4Net, Ipv4Addr, bool)>,
    names: &Names,
) -> (Ipv4Addr, Option<String>) {
    let node_ip = remote.map_or(Ipv4Addr::UNSPECIFIED, |(_, ip, _)| *ip);
    (node_ip, names.node_name(node_ip))
}

/// The name of interface `ifindex` in the caller's netns.
fn ifname(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex).map_or_else(
        |_| format!("ifindex {ifindex}"),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Names for what the maps hold as numbers.
#[derive(Debug, Default, Clone)]
pub struct Names {
    pub destination_container: Option<String>,
    /// Node IP -> node name.
    pub nodes: Vec<(Ipv4Addr, String)>,
}

impl Names {
    fn node_name(&self, ip: Ipv4Addr) -> Option<String> {
        self.nodes
            .iter()
            .find(|(node_ip, _)| *node_ip == ip)
            .map(|(_, name)| name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender() -> Sender {
        Sender {
            ip: Ipv4Addr::new(10, 244, 0, 5),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            host_ifname: "pn0".into(),
            host_ifindex: 7,
            pod_mac: [2, 0, 0, 0, 0, 5],
            host_mac: [2, 0, 0, 0, 0xff, 5],
        }
    }

    #[test]
    fn destinations_parse_like_the_cli_says() {
        let ip = Ipv4Addr::new(10, 244, 1, 9);
        assert_eq!(
            ExplainRequest::parse_to("10.244.1.9"),
            Ok((ip, None, Proto::Icmp))
        );
        assert_eq!(
            ExplainRequest::parse_to("10.244.1.9:8080"),
            Ok((ip, Some(8080), Proto::Tcp))
        );
        assert_eq!(
            ExplainRequest::parse_to("10.244.1.9:53/udp"),
            Ok((ip, Some(53), Proto::Udp))
        );
        assert!(ExplainRequest::parse_to("10.244.1.9:1/icmp").is_err());
        assert!(ExplainRequest::parse_to("10.244.1.9/sctp").is_err());
        assert!(ExplainRequest::parse_to("pod-b").is_err());
        assert!(ExplainRequest::parse_to("10.244.1.9:99999").is_err());
    }

    #[test]
    fn frames_are_what_the_pod_would_send() {
        let request = ExplainRequest {
            from: "c1".into(),
            to: Ipv4Addr::new(10, 244, 1, 9),
            port: Some(8080),
            proto: Proto::Tcp,
            forged_source: None,
        };
        let frame = build_frame(&sender(), &request);
        assert_eq!(frame.len(), 14 + 20 + 20);
        assert_eq!(&frame[0..6], &sender().host_mac);
        assert_eq!(&frame[6..12], &sender().pod_mac);
        assert_eq!(checksum(&frame[14..34]), 0, "IPv4 header checksum");
        assert_eq!(&frame[26..30], &[10, 244, 0, 5]);
        assert_eq!(u16::from_be_bytes([frame[36], frame[37]]), 8080);
        assert_eq!(frame[47], 0x02, "SYN");
        let forged = ExplainRequest {
            forged_source: Some(Ipv4Addr::new(10, 244, 0, 99)),
            proto: Proto::Icmp,
            port: None,
            ..request
        };
        let frame = build_frame(&sender(), &forged);
        assert_eq!(&frame[26..30], &[10, 244, 0, 99]);
        assert_eq!(checksum(&frame[34..]), 0, "ICMP checksum");
    }
}
