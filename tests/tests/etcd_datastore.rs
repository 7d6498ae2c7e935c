//! The etcd datastore: CIDR claims under races, lease expiry of a vanished
//! node, and etcd itself going away while traffic runs.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use podnet::{
    api::{Client, Request},
    datastore::{JoinRequest, NodeRecord, etcd::EtcdDatastore},
};
use podnet_tests::{
    lab::{self, FABRIC_HOST, LabDatastore, LabGuard, LabNode},
    privileged, traffic, wait_up_to,
};

fn remote_nodes(node: &LabNode) -> Vec<String> {
    let nodes: Vec<NodeRecord> = Client::new(&node.agent_socket)
        .call(&Request::Nodes)
        .expect("nodes");
    nodes.into_iter().map(|n| n.name).collect()
}

fn ping(netns: &str, ip: std::net::Ipv4Addr) -> bool {
    lab::in_netns(netns, "ping")
        .expect("command")
        .args(["-c", "1", "-W", "1", &ip.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn racing_agents_never_share_a_cidr_and_a_returning_node_keeps_its_own() {
    if !privileged("racing_agents_never_share_a_cidr_and_a_returning_node_keeps_its_own") {
        return;
    }
    let lab = LabGuard::up("race", 1, 0, "vxlan", LabDatastore::Etcd).expect("lab up");
    let fabric = lab.layout.fabric_netns.clone();
    let claimed = lab::on_netns_thread(&fabric, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let endpoints = vec![format!("http://{FABRIC_HOST}:2379")];
            let joins = (0..16).map(|i| {
                let endpoints = endpoints.clone();
                async move {
                    let mut store = EtcdDatastore::connect(&endpoints, Duration::from_secs(30))
                        .await
                        .expect("connect");
                    let request = JoinRequest {
                        name: format!("racer{i}"),
                        node_ip: std::net::Ipv4Addr::new(
                            192,
                            168,
                            200,
                            u8::try_from(i + 1).expect("small"),
                        ),
                        pod_cidr: None,
                        preferred: None,
                        cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
                        node_prefix: 24,
                    };
                    (
                        request.name.clone(),
                        store.join(&request).await.expect("join").0,
                    )
                }
            });
            let first: Vec<_> = futures::future::join_all(joins).await;
            // racer3 comes back.
            let mut store = EtcdDatastore::connect(&endpoints, Duration::from_secs(30))
                .await
                .expect("connect");
            let again = store
                .join(&JoinRequest {
                    name: "racer3".into(),
                    node_ip: std::net::Ipv4Addr::new(192, 168, 200, 4),
                    pod_cidr: None,
                    preferred: None,
                    cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
                    node_prefix: 24,
                })
                .await
                .expect("rejoin")
                .0;
            (first, again)
        })
    })
    .expect("fabric thread");
    let (first, again) = claimed;
    let cidrs: HashSet<_> = first.iter().map(|(_, c)| *c).collect();
    // 16 racers + the lab's own node: all distinct.
    assert_eq!(cidrs.len(), 16, "no two racers share a CIDR: {first:?}");
    let node1_cidr: ipnet::Ipv4Net = lab.layout.nodes[0].pod_cidr.parse().expect("node1 cidr");
    assert!(!cidrs.contains(&node1_cidr), "nor with the running node");
    let racer3 = first.iter().find(|(n, _)| n == "racer3").expect("racer3").1;
    assert_eq!(again, racer3, "a returning node gets its CIDR back");
}

#[test]
fn a_vanished_node_is_removed_when_its_lease_expires_and_returns_with_its_cidr() {
    if !privileged("a_vanished_node_is_removed_when_its_lease_expires_and_returns_with_its_cidr") {
        return;
    }
    let mut lab = LabGuard::up("lease", 3, 1, "vxlan", LabDatastore::Etcd).expect("lab up");
    let n1 = lab.layout.nodes[0].clone();
    let a = lab.layout.pods[0].clone();
    let c = lab.layout.pods[2].clone();
    assert!(ping(&a.netns, c.ip), "node3's pod reachable");
    let c_cidr = lab.layout.nodes[2].pod_cidr.clone();

    lab.layout.kill_agent("node3").expect("kill node3's agent");
    let ttl = Duration::from_secs(lab.layout.etcd_lease_ttl);
    wait_up_to(ttl * 3, "node1 drops node3 after its lease expires", || {
        !remote_nodes(&n1).contains(&"node3".to_owned())
    });
    let routes = lab::in_netns(&n1.netns, "ip")
        .expect("cmd")
        .arg("route")
        .output()
        .expect("ip route");
    assert!(
        !String::from_utf8_lossy(&routes.stdout).contains(&c_cidr),
        "node3's route removed on node1"
    );
    assert!(!ping(&a.netns, c.ip), "node3's pod no longer routed");

    lab.layout.start_agent("node3").expect("node3 returns");
    assert_eq!(
        lab.layout.nodes[2].pod_cidr, c_cidr,
        "node3 gets its CIDR back"
    );
    wait_up_to(
        Duration::from_secs(10),
        "node1 routes to node3 again",
        || ping(&a.netns, c.ip),
    );
}

#[test]
fn traffic_flows_while_etcd_is_down_and_agents_catch_up() {
    if !privileged("traffic_flows_while_etcd_is_down_and_agents_catch_up") {
        return;
    }
    let mut lab = LabGuard::up("etcddown", 2, 1, "vxlan", LabDatastore::Etcd).expect("lab up");
    let (a, b) = (lab.layout.pods[0].clone(), lab.layout.pods[1].clone());
    let n1 = lab.layout.nodes[0].clone();
    let stream = traffic::Stream::start(&a.netns, &b.netns, b.ip).expect("stream");

    lab.layout.stop_etcd().expect("stop etcd");
    let down_since = Instant::now();
    while down_since.elapsed() < Duration::from_secs(30) {
        assert!(
            ping(&a.netns, b.ip),
            "cross-node traffic keeps flowing without etcd"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    lab.layout.start_etcd().expect("etcd back");
    let (sent, received) = stream.finish().expect("stream");
    assert!(sent > 0);
    assert_eq!(sent, received, "the stream lost nothing");

    // The agents reconnect: a node joining now is seen by node1.
    let node3 = lab.layout.join_node().expect("node3 joins");
    wait_up_to(
        Duration::from_secs(30),
        "node1 learns about node3 after etcd came back",
        || remote_nodes(&n1).contains(&node3),
    );
    let c = lab
        .layout
        .add_pod(&node3, "node3-pod1")
        .expect("pod on node3");
    wait_up_to(
        Duration::from_secs(10),
        "node1's pod reaches node3's pod",
        || ping(&a.netns, c.ip),
    );
}
