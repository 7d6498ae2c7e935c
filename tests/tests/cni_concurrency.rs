//! Many runtimes' ADDs at once against a small pod CIDR.

use std::collections::HashSet;

use podnet_tests::{netns::NetNs, node::Node, privileged};
use serde_json::Value;

#[test]
fn sixty_four_concurrent_adds_against_a_slash_27() {
    if !privileged("sixty_four_concurrent_adds_against_a_slash_27") {
        return;
    }
    let node = Node::start("conc", "10.244.12.0/27").expect("node");
    let pods: Vec<NetNs> = (0..64)
        .map(|_| NetNs::new("conc").expect("netns"))
        .collect();
    let conf = node.conf("1.1.0", &Value::Null).to_string();
    let cni = |command: &str, i: usize, ns: &NetNs| {
        let cid = format!("conc-{i}");
        let path = ns.path().display().to_string();
        node.cni(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", &cid),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
            ],
            conf.as_bytes(),
        )
        .expect("run podnet")
    };
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, ns)| s.spawn(move || cni("ADD", i, ns)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let ok: Vec<_> = results.iter().filter(|r| r.success).collect();
    // A /27 has 32 addresses: network, gateway and broadcast are not for pods.
    assert_eq!(ok.len(), 29, "exactly the free addresses succeed");
    let ips: HashSet<String> = ok
        .iter()
        .map(|r| {
            r.json()["ips"][0]["address"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(ips.len(), 29, "all unique");
    for failed in results.iter().filter(|r| !r.success) {
        assert_eq!(
            failed.error_code(),
            Some(100),
            "a clean 'no free address': {failed:?}"
        );
    }
    assert_eq!(node.ipam_records().len(), 29);
    assert_eq!(
        node.host_veths().expect("links").len(),
        29,
        "no veth of a failed ADD is left"
    );

    std::thread::scope(|s| {
        for (i, ns) in pods.iter().enumerate() {
            s.spawn(move || assert!(cni("DEL", i, ns).success));
        }
    });
    assert!(node.ipam_records().is_empty());
    assert!(node.host_veths().expect("links").is_empty());
    let endpoints = node.podnetctl(&["endpoints"]).expect("endpoints");
    assert_eq!(endpoints.as_array().map(Vec::len), Some(0));
    let datapath = podnet::datapath::Datapath::load(node.bpffs.path())
        .expect("open the pins")
        .endpoints()
        .expect("read the map");
    assert!(datapath.is_empty(), "map entries left: {datapath:?}");
}
