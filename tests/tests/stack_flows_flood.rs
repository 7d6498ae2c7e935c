//! One pod's flood of new Service flows does not break another pod's
//! Service connection, on the lab (vxlan): pod A holds a TCP connection
//! through a ClusterIP (nftables DNAT on node1) to a server pod on node2
//! that pushes data unasked; pod B sends more UDP datagrams with random
//! ports to a UDP port of the same Service than the whole stack-flows table
//! holds (what a busy DNS client does). The server's next push still
//! reaches A, through node1's stack where the DNAT is undone: B held only
//! its share of the table and A's flow was never evicted. Without the
//! share the LRU turned over, the push took the fast path with the
//! backend's own address, and A's socket never saw it.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    time::Duration,
};

use podnet::api::{Client, FlowShare, Request};
use podnet_common::{flow::DEFAULT_STACK_FLOWS_PER_ENDPOINT, names::MAX_STACK_FLOWS};
use podnet_tests::{
    lab::{LabDatastore, LabGuard},
    netns::run_in,
    privileged,
    services::{self, ServiceSpec},
    spoof,
};

const SERVER_PORT: u16 = 9090;
const PUSH: &[u8] = b"pushed by the server";

fn push_and_read(server: &mut TcpStream, client: &mut TcpStream, what: &str) {
    server.write_all(PUSH).expect("server push");
    let mut got = vec![0u8; PUSH.len()];
    client
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("the push {what} did not reach pod A: {e}"));
    assert_eq!(got, PUSH);
}

#[test]
fn a_pods_flood_leaves_another_pods_service_connection_alone() {
    if !privileged("a_pods_flood_leaves_another_pods_service_connection_alone") {
        return;
    }
    let lab = LabGuard::up("sff", 2, 2, "vxlan", LabDatastore::File).expect("lab up");
    let layout = &lab.layout;
    let node1 = layout.node("node1").expect("node1").clone();
    let (a, b) = (
        layout.pod("node1-pod1").expect("pod").clone(),
        layout.pod("node1-pod2").expect("pod").clone(),
    );
    let server_pod = layout.pod("node2-pod1").expect("pod").clone();
    let svc = ServiceSpec {
        name: "flood".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
        tcp_port: 80,
        udp_port: 53,
        node_port: 30_090,
        udp_node_port: 30_091,
        target_tcp_port: SERVER_PORT,
        target_udp_port: 5353,
        backends: vec![server_pod.ip],
    };
    services::apply_nft(&node1.netns, &svc).expect("the Service on node1");

    let listener = run_in(&server_pod.netns, || {
        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVER_PORT))
    })
    .expect("netns")
    .expect("listen");
    let service_addr = SocketAddr::V4(SocketAddrV4::new(svc.cluster_ip, svc.tcp_port));
    let mut client = run_in(&a.netns, move || {
        TcpStream::connect_timeout(&service_addr, Duration::from_secs(5))
    })
    .expect("netns")
    .expect("pod A connects to the Service");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let (mut server, seen) = listener.accept().expect("accept");
    assert_eq!(seen.ip(), a.ip, "the server sees pod A");
    push_and_read(&mut server, &mut client, "before the flood");

    // Pod B: more new UDP flows through the Service than the table holds.
    let flood = usize::try_from(MAX_STACK_FLOWS).expect("fits") + 60_000;
    let b_mac = spoof::mac_of(&b.netns, "eth0").expect("MAC");
    let gateway = spoof::host_veth_mac(&b.netns, &node1.netns).expect("gateway MAC");
    let template = spoof::udp_frame((gateway, b_mac), (b.ip, svc.cluster_ip), svc.udp_port, b"q");
    let socket = spoof::RawSocket::open(&b.netns, "eth0").expect("raw socket");
    let batch = 10_000;
    for start in (0..flood).step_by(batch) {
        let frames: Vec<Vec<u8>> = (start..(start + batch).min(flood))
            .map(|i| {
                let mut frame = template.clone();
                // A new source port (and so a new flow) for every datagram:
                // 60,000 ports, then the next destination port's turn.
                let port = u16::try_from(1024 + i % 60_000).expect("port");
                frame[34..36].copy_from_slice(&port.to_be_bytes());
                frame
            })
            .collect();
        socket.send(&frames).expect("flood");
    }
    std::thread::sleep(Duration::from_millis(500));

    push_and_read(&mut server, &mut client, "after the flood");
    let shares: Vec<FlowShare> = Client::new(&node1.agent_socket)
        .call(&Request::FlowShares)
        .expect("flow shares");
    let share_of = |ip: Ipv4Addr| shares.iter().find(|s| s.ip == ip).copied();
    let flooder = share_of(b.ip).expect("pod B holds flows");
    eprintln!(
        "after {flood} datagrams: pod B {flooder:?}, pod A {:?}",
        share_of(a.ip)
    );
    assert!(
        flooder.flows <= DEFAULT_STACK_FLOWS_PER_ENDPOINT + 64,
        "pod B holds its share at most: {flooder:?}"
    );
    assert!(flooder.refused > 0, "pod B's flows beyond it were refused");
}
