//! Forged traffic for the isolation tests: frames written straight onto an
//! interface with an AF_PACKET socket (what a pod with CAP_NET_RAW, or a
//! host on the underlay, can send), the frame kinds of the spoofing corpus,
//! and a UDP listener that records what reached a target.

use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use crate::{
    frames::{self, ETH_P_ARP, ETH_P_IPV6, IPPROTO_UDP},
    netns::run_in,
};

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_ICMPV6: u8 = 58;

/// Writes each of `frames` onto `ifname` inside `netns` with an AF_PACKET
/// raw socket: the kernel sends them as they are, no header of its own.
pub fn send_raw(netns: &str, ifname: &str, frames: &[Vec<u8>]) -> anyhow::Result<()> {
    RawSocket::open(netns, ifname)?.send(frames)
}

/// An AF_PACKET raw socket on a device of a netns, opened once: sending
/// from it needs no thread in that netns, so frames of several pods can be
/// interleaved from one thread.
pub struct RawSocket {
    socket: OwnedFd,
    ifindex: u32,
}

impl RawSocket {
    /// A raw socket on `ifname` inside `netns`.
    pub fn open(netns: &str, ifname: &str) -> anyhow::Result<Self> {
        let ifname = ifname.to_owned();
        run_in(netns, move || -> anyhow::Result<Self> {
            let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())?;
            // SAFETY: plain socket(2); the result is checked before use.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            if fd < 0 {
                return Err(io::Error::last_os_error().into());
            }
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok(Self { socket, ifindex })
        })?
    }

    /// Writes each of `frames` as it is.
    pub fn send(&self, frames: &[Vec<u8>]) -> anyhow::Result<()> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET)?;
        addr.sll_ifindex = i32::try_from(self.ifindex)?;
        addr.sll_halen = 6;
        for frame in frames {
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: `frame` and `addr` are valid for the lengths passed and
            // outlive the call.
            let sent = unsafe {
                libc::sendto(
                    self.socket.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    u32::try_from(std::mem::size_of::<libc::sockaddr_ll>())?,
                )
            };
            if sent < 0 {
                return Err(io::Error::last_os_error().into());
            }
        }
        Ok(())
    }
}

/// A UDP port in a namespace that records every datagram's payload.
pub struct Listener {
    socket: UdpSocket,
}

impl Listener {
    pub fn bind(netns: &str, addr: SocketAddrV4) -> anyhow::Result<Self> {
        let socket = run_in(netns, move || UdpSocket::bind(addr))??;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(Self { socket })
    }

    /// The payloads that arrive within `window`.
    pub fn drain(&self, window: Duration) -> BTreeSet<Vec<u8>> {
        let mut seen = BTreeSet::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + window;
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.socket.recv_from(&mut buf) {
                seen.insert(buf[..n].to_vec());
            }
        }
        seen
    }
}

/// Sends `payload` from `netns` to `to` with an ordinary UDP socket.
pub fn send_udp(netns: &str, to: SocketAddrV4, payload: &[u8]) -> anyhow::Result<()> {
    let payload = payload.to_vec();
    run_in(netns, move || -> io::Result<()> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.send_to(&payload, to)?;
        Ok(())
    })??;
    Ok(())
}

/// `ip -j link show` in `netns`: every link's JSON object. (Not sysfs: a
/// thread that entered a namespace still sees the sysfs of its mount
/// namespace, the root netns's.)
fn links(netns: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = crate::netns::run(
        std::process::Command::new("ip").args(["-n", netns, "-j", "link", "show"]),
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("not a MAC: {text}"))
}

/// The MAC of `ifname` in `netns`.
pub fn mac_of(netns: &str, ifname: &str) -> anyhow::Result<[u8; 6]> {
    let link = links(netns)?
        .into_iter()
        .find(|l| l["ifname"] == ifname)
        .ok_or_else(|| anyhow::anyhow!("no {ifname} in {netns}"))?;
    parse_mac(link["address"].as_str().unwrap_or_default())
}

/// The MAC of the host side of `pod_netns`'s `eth0` (its gateway), which
/// lives in `node_netns`.
pub fn host_veth_mac(pod_netns: &str, node_netns: &str) -> anyhow::Result<[u8; 6]> {
    let eth0 = links(pod_netns)?
        .into_iter()
        .find(|l| l["ifname"] == "eth0")
        .ok_or_else(|| anyhow::anyhow!("no eth0 in {pod_netns}"))?;
    let peer = eth0["link_index"].clone();
    let host = links(node_netns)?
        .into_iter()
        .find(|l| l["ifindex"] == peer)
        .ok_or_else(|| anyhow::anyhow!("no peer of {pod_netns}'s eth0 in {node_netns}"))?;
    parse_mac(host["address"].as_str().unwrap_or_default())
}

/// An IPv4/UDP frame to `dst:port` carrying `payload`.
#[must_use]
pub fn udp_frame(
    macs: ([u8; 6], [u8; 6]),
    (src, dst): (Ipv4Addr, Ipv4Addr),
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    frames::ipv4_frame(
        macs,
        (src, dst),
        IPPROTO_UDP,
        0,
        &frames::udp_datagram(40_000, port, payload),
    )
}

/// `frame` with one 802.1Q tag per entry of `tags` (outermost first: an
/// 802.1ad S-tag, then C-tags), e.g. `[(0x88a8, 100), (0x8100, 0)]`.
#[must_use]
pub fn tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for (tpid, vid) in tags {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&vid.to_be_bytes());
    }
    out.extend_from_slice(&frame[12..]);
    out
}

/// A VLAN tag (802.1Q) with VLAN id `vid` (0: priority tag only).
#[must_use]
pub fn vlan(frame: &[u8], vid: u16) -> Vec<u8> {
    tagged(frame, &[(ETH_P_8021Q, vid)])
}

/// Double tagging: an 802.1ad S-tag around an 802.1Q C-tag with VID 0.
#[must_use]
pub fn qinq(frame: &[u8], outer_vid: u16) -> Vec<u8> {
    tagged(frame, &[(ETH_P_8021AD, outer_vid), (ETH_P_8021Q, 0)])
}

/// A VXLAN header (I flag, `vni`) followed by `inner`.
#[must_use]
pub fn vxlan_payload(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut out = vec![0x08, 0, 0, 0];
    out.extend_from_slice(&(vni << 8).to_be_bytes());
    out.extend_from_slice(inner);
    out
}

/// An Ethernet/IPv4 ARP packet (`op` 1 request, 2 reply).
#[must_use]
pub fn arp(
    (eth_dst, eth_src): ([u8; 6], [u8; 6]),
    op: u16,
    (sender_mac, sender_ip): ([u8; 6], Ipv4Addr),
    (target_mac, target_ip): ([u8; 6], Ipv4Addr),
) -> Vec<u8> {
    let mut frame = frames::ethernet(eth_dst, eth_src, ETH_P_ARP);
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4]);
    frame.extend_from_slice(&op.to_be_bytes());
    frame.extend_from_slice(&sender_mac);
    frame.extend_from_slice(&sender_ip.octets());
    frame.extend_from_slice(&target_mac);
    frame.extend_from_slice(&target_ip.octets());
    frame
}

/// The link-local address EUI-64 gives `mac`.
#[must_use]
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b[0] = 0xfe;
    b[1] = 0x80;
    b[8] = mac[0] ^ 0x02;
    b[9] = mac[1];
    b[10] = mac[2];
    b[11] = 0xff;
    b[12] = 0xfe;
    b[13] = mac[3];
    b[14] = mac[4];
    b[15] = mac[5];
    Ipv6Addr::from(b)
}

/// An ICMPv6 packet (hop limit 255, valid checksum) in an Ethernet frame.
#[must_use]
pub fn icmpv6(
    (eth_dst, eth_src): ([u8; 6], [u8; 6]),
    (src, dst): (Ipv6Addr, Ipv6Addr),
    message: &[u8],
) -> Vec<u8> {
    let mut icmp = message.to_vec();
    icmp[2] = 0;
    icmp[3] = 0;
    let len = u32::try_from(icmp.len()).expect("small message");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&len.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    pseudo.extend_from_slice(&icmp);
    let csum = frames::internet_checksum(&pseudo);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut frame = frames::ethernet(eth_dst, eth_src, ETH_P_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&u16::try_from(icmp.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// A router advertisement from `mac` to all nodes: default router for
/// 30 minutes, with an autoconfiguration prefix 2001:db8:bad::/64.
#[must_use]
pub fn router_advertisement(mac: [u8; 6]) -> Vec<u8> {
    let mut ra = vec![134, 0, 0, 0, 64, 0];
    ra.extend_from_slice(&1800u16.to_be_bytes());
    ra.extend_from_slice(&[0; 8]);
    // Prefix information: on-link and autonomous.
    ra.extend_from_slice(&[3, 4, 64, 0xc0]);
    ra.extend_from_slice(&86_400u32.to_be_bytes());
    ra.extend_from_slice(&14_400u32.to_be_bytes());
    ra.extend_from_slice(&[0; 4]);
    ra.extend_from_slice(
        &"2001:db8:bad::"
            .parse::<Ipv6Addr>()
            .expect("prefix")
            .octets(),
    );
    // Source link-layer address.
    ra.extend_from_slice(&[1, 1]);
    ra.extend_from_slice(&mac);
    icmpv6(
        ([0x33, 0x33, 0, 0, 0, 1], mac),
        (link_local(mac), "ff02::1".parse().expect("all nodes")),
        &ra,
    )
}

/// A neighbour solicitation from `mac` for `target`.
#[must_use]
pub fn neighbour_solicitation(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let solicited: Ipv6Addr = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&t);
    ns.extend_from_slice(&[1, 1]);
    ns.extend_from_slice(&mac);
    icmpv6(
        ([0x33, 0x33, 0xff, t[13], t[14], t[15]], mac),
        (link_local(mac), solicited),
        &ns,
    )
}
