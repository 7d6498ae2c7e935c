//! Every CNI verb in every supported version, through the real binary.

use podnet::{
    api::{Client, Request},
    ipam::Owner,
};
use podnet_tests::{node::Node, privileged};
use serde_json::{Value, json};

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn env<'a>(command: &'a str, cid: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
    ]
}

#[test]
fn every_verb_in_every_version() {
    if !privileged("every_verb_in_every_version") {
        return;
    }
    let node = Node::start("verbs", "10.244.7.0/24").expect("node");
    for version in VERSIONS {
        let old = version.starts_with("0.");
        let conf = node.conf(version, &Value::Null);
        let cid = format!("verbs-{}", version.replace('.', "-"));
        let pod_ns = podnet_tests::netns::NetNs::new("verbpod").expect("pod netns");
        let netns = pod_ns.path().display().to_string();

        // VERSION
        let out = node
            .cni(
                &[("CNI_COMMAND", "VERSION")],
                json!({"cniVersion": version}).to_string().as_bytes(),
            )
            .expect("VERSION");
        assert!(out.success, "{out:?}");
        assert_eq!(out.json()["cniVersion"], version);
        assert_eq!(out.json()["supportedVersions"], json!(VERSIONS));

        // ADD: result in the requested version's shape.
        let out = node
            .cni(&env("ADD", &cid, &netns), conf.to_string().as_bytes())
            .expect("ADD");
        assert!(out.success, "{version}: {out:?}");
        let result = out.json();
        assert_eq!(result["cniVersion"], version);
        let ip = &result["ips"][0];
        assert_eq!(
            ip.get("version").is_some(),
            old,
            "{version}: ips[].version only before 1.0.0: {result}"
        );
        assert!(ip["address"].as_str().unwrap_or_default().ends_with("/32"));
        assert_eq!(ip["gateway"], "10.244.7.1");
        assert_eq!(ip["interface"], 1);
        let pod_if = &result["interfaces"][1];
        assert_eq!(pod_if["name"], "eth0");
        assert_eq!(pod_if["sandbox"], netns.as_str());
        assert_eq!(
            pod_if.get("mtu").is_some(),
            version == "1.1.0",
            "{version}: mtu only in 1.1.0"
        );
        assert_eq!(
            result["interfaces"][0].get("sandbox"),
            None,
            "host side has no sandbox"
        );
        assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");

        // CHECK: from 0.4.0, against prevResult.
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = result.clone();
        let out = node
            .cni(
                &env("CHECK", &cid, &netns),
                check_conf.to_string().as_bytes(),
            )
            .expect("CHECK");
        if version < "0.4.0" {
            assert_eq!(
                out.error_code(),
                Some(1),
                "{version}: CHECK did not exist yet: {out:?}"
            );
        } else {
            assert!(
                out.success,
                "{version}: CHECK of a healthy attachment: {out:?}"
            );
        }

        // STATUS and GC exist from 1.1.0.
        let out = node
            .cni(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes())
            .expect("STATUS");
        if version == "1.1.0" {
            assert!(out.success, "STATUS with the agent up: {out:?}");
        } else {
            assert_eq!(
                out.error_code(),
                Some(1),
                "{version}: STATUS needs 1.1.0: {out:?}"
            );
        }

        // DEL
        let out = node
            .cni(&env("DEL", &cid, &netns), conf.to_string().as_bytes())
            .expect("DEL");
        assert!(out.success, "{version}: {out:?}");
        assert!(out.stdout.trim().is_empty(), "DEL prints nothing");
    }
    assert!(node.ipam_records().is_empty(), "every address released");
    assert!(
        node.host_veths().expect("links").is_empty(),
        "every veth gone"
    );
}

#[test]
fn check_names_what_is_missing() {
    if !privileged("check_names_what_is_missing") {
        return;
    }
    let node = Node::start("check", "10.244.8.0/24").expect("node");
    let pod = node.add_pod("check-1").expect("ADD");
    let netns = pod.netns.path().display().to_string();
    let mut conf = node.conf("1.1.0", &Value::Null);
    conf["prevResult"] = pod.result.clone();
    pod.netns
        .ip(&["addr", "del", &format!("{}/32", pod.ip), "dev", "eth0"])
        .expect("remove the address");
    let out = node
        .cni(
            &env("CHECK", "check-1", &netns),
            conf.to_string().as_bytes(),
        )
        .expect("CHECK");
    assert_eq!(out.error_code(), Some(101), "{out:?}");
    let msg = out.json()["msg"].as_str().unwrap_or_default().to_owned();
    assert!(
        msg.contains(&pod.ip.to_string()),
        "the message names the missing address: {msg}"
    );
}

#[test]
fn status_fails_with_code_50_when_the_agent_is_down() {
    if !privileged("status_fails_with_code_50_when_the_agent_is_down") {
        return;
    }
    let mut node = Node::start("status", "10.244.9.0/24").expect("node");
    node.stop_agent();
    let out = node
        .cni(
            &[("CNI_COMMAND", "STATUS")],
            node.conf("1.1.0", &Value::Null).to_string().as_bytes(),
        )
        .expect("STATUS");
    assert_eq!(out.error_code(), Some(50), "{out:?}");
    // ADD with the agent down: try again later, and nothing is left behind.
    let pod_ns = podnet_tests::netns::NetNs::new("statuspod").expect("netns");
    let netns = pod_ns.path().display().to_string();
    let out = node
        .cni(
            &env("ADD", "status-1", &netns),
            node.conf("1.1.0", &Value::Null).to_string().as_bytes(),
        )
        .expect("ADD");
    assert_eq!(out.error_code(), Some(11), "{out:?}");
    assert!(node.ipam_records().is_empty());
    assert!(node.host_veths().expect("links").is_empty());
}

#[test]
fn gc_releases_everything_not_in_valid_attachments() {
    if !privileged("gc_releases_everything_not_in_valid_attachments") {
        return;
    }
    let node = Node::start("gc", "10.244.10.0/24").expect("node");
    let keep = node.add_pod("gc-keep").expect("ADD keep");
    let stale = node.add_pod("gc-stale").expect("ADD stale");
    // A pod of another network on the node (its own addresses, host-local):
    // not this network's GC to remove.
    let data_dir = node.state.path().join("host-local");
    // host-local speaks CNI up to 1.0.0.
    let mut other_conf = node.conf(
        "1.0.0",
        &json!({"ipam": {"type": "host-local", "dataDir": data_dir,
                         "ranges": [[{"subnet": "10.244.10.0/24", "rangeStart": "10.244.10.200"}]]}}),
    );
    other_conf["name"] = json!("other");
    let other_net = node
        .add_pod_with("gc-other-net", &other_conf)
        .expect("ADD in the other network");
    // An older plugin's GC names no network: refused, nothing removed (it
    // was taken for every network's, the other network's pod included).
    let refused = Client::new(&node.socket()).call::<Vec<Owner>>(&Request::Gc {
        valid: Vec::new(),
        network: None,
    });
    assert!(refused.is_err(), "a GC without a network: {refused:?}");
    assert_eq!(
        node.host_veths().expect("links").len(),
        3,
        "nothing removed by it"
    );
    let mut conf = node.conf("1.1.0", &Value::Null);
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "gc-keep", "ifname": "eth0"}]);
    let out = node
        .cni(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes())
        .expect("GC");
    assert!(out.success, "{out:?}");
    assert_eq!(
        node.ipam_records(),
        vec![keep.ip.to_string()],
        "only the valid attachment keeps its address"
    );
    assert_eq!(
        node.host_veths().expect("links").len(),
        2,
        "the stale veth is gone, the other network's stays"
    );
    let endpoints = node.podnetctl(&["endpoints"]).expect("endpoints");
    let ips: Vec<_> = endpoints
        .as_array()
        .expect("list")
        .iter()
        .map(|e| e["endpoint"]["ip"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        ips.iter()
            .filter(|ip| **ip != other_net.ip.to_string())
            .collect::<Vec<_>>(),
        vec![&keep.ip.to_string()]
    );
    assert!(
        ips.contains(&other_net.ip.to_string()),
        "GC of one network leaves the other network's endpoints"
    );
    assert!(keep.ping(other_net.ip, 1), "and they keep working");
    assert!(!keep.ping(stale.ip, 1), "the stale pod is unreachable");
    let other = node.add_pod("gc-new").expect("ADD after GC");
    assert!(keep.ping(other.ip, 1), "the kept pod still works");
}

/// The agent's endpoints: address -> network.
fn endpoint_networks(node: &Node) -> std::collections::BTreeMap<String, String> {
    node.podnetctl(&["endpoints"])
        .expect("endpoints")
        .as_array()
        .expect("list")
        .iter()
        .map(|e| {
            (
                e["endpoint"]["ip"].as_str().unwrap_or_default().to_owned(),
                e["endpoint"]["network"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

/// Issue 10: two networks that both use podnet's built-in IPAM on one node
/// (two confs with different names) allocate from the node's one address
/// space, through the real plugin: distinct addresses, every pod stays an
/// endpoint of the agent (none evicted by a newer pod with its address),
/// one container in both networks gets two, and DEL/GC of one network
/// leave the other's addresses and endpoints alone.
#[test]
fn two_networks_on_one_node_get_distinct_addresses() {
    if !privileged("two_networks_on_one_node_get_distinct_addresses") {
        return;
    }
    let node = Node::start("twonet", "10.244.24.0/24").expect("node");
    let conf_a = node.conf("1.1.0", &Value::Null);
    let mut conf_b = node.conf("1.1.0", &Value::Null);
    conf_b["name"] = json!("second");
    let mut pods = Vec::new();
    for n in 0..8 {
        let (network, conf) = if n % 2 == 0 {
            ("podnet", &conf_a)
        } else {
            ("second", &conf_b)
        };
        let pod = node
            .add_pod_with(&format!("twonet-{n}"), conf)
            .unwrap_or_else(|e| panic!("ADD {n} in {network}: {e}"));
        pods.push((network, pod));
    }
    let mut ips: std::collections::HashSet<_> = pods.iter().map(|(_, p)| p.ip).collect();
    assert_eq!(ips.len(), pods.len(), "every pod has its own address");

    // One container in both networks: eth0 in podnet, net1 in second.
    let multi = node
        .add_pod_with("twonet-multi", &conf_a)
        .expect("ADD multi/eth0 in podnet");
    let multi_ns = multi.netns.path().display().to_string();
    let net1 = |command: &'static str, conf: &Value| {
        node.cni(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "twonet-multi"),
                ("CNI_NETNS", &multi_ns),
                ("CNI_IFNAME", "net1"),
            ],
            conf.to_string().as_bytes(),
        )
        .expect("run the plugin")
    };
    let out = net1("ADD", &conf_b);
    assert!(out.success, "ADD multi/net1 in second: {out:?}");
    let multi_net1: std::net::Ipv4Addr = out.json()["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("an address");
    assert!(ips.insert(multi.ip) && ips.insert(multi_net1), "distinct");

    // The agent has every one of them, each with its network.
    let listed = endpoint_networks(&node);
    assert_eq!(listed.len(), 10, "no endpoint evicted: {listed:?}");
    for (network, pod) in &pods {
        assert_eq!(
            listed.get(&pod.ip.to_string()).map(String::as_str),
            Some(*network)
        );
    }
    assert_eq!(listed[&multi.ip.to_string()], "podnet");
    assert_eq!(listed[&multi_net1.to_string()], "second");
    assert!(
        pods[0].1.ping(pods[1].1.ip, 2),
        "podnet pod reaches second's"
    );
    assert!(pods[3].1.ping(pods[6].1.ip, 2), "and back");

    // One store, records by network; podnetctl ipam shows both.
    assert_eq!(node.ipam_records_of("podnet").len(), 5);
    assert_eq!(node.ipam_records_of("second").len(), 5);
    let ipam = node.podnetctl(&["ipam"]).expect("podnetctl ipam");
    assert_eq!(ipam["networks"]["podnet"].as_array().map(Vec::len), Some(5));
    assert_eq!(ipam["networks"]["second"].as_array().map(Vec::len), Some(5));

    // CHECK of multi/net1 in second finds second's record.
    let mut check = conf_b.clone();
    check["prevResult"] = out.json();
    let checked = net1("CHECK", &check);
    assert!(checked.success, "CHECK multi/net1: {checked:?}");

    // DEL of multi/net1 in second: multi keeps its podnet address.
    let out = net1("DEL", &conf_b);
    assert!(out.success, "DEL multi/net1: {out:?}");
    assert!(
        node.ipam_records_of("podnet")
            .contains(&multi.ip.to_string())
    );
    assert!(
        !node
            .ipam_records_of("second")
            .contains(&multi_net1.to_string())
    );
    assert!(endpoint_networks(&node).contains_key(&multi.ip.to_string()));

    // GC of second with nothing valid: second's pods go, podnet's stay.
    let mut gc = conf_b.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let out = node
        .cni(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes())
        .expect("GC");
    assert!(out.success, "GC of second: {out:?}");
    assert!(node.ipam_records_of("second").is_empty());
    assert_eq!(node.ipam_records_of("podnet").len(), 5);
    let left = endpoint_networks(&node);
    assert_eq!(left.len(), 5, "{left:?}");
    assert!(left.values().all(|n| n == "podnet"), "{left:?}");
    assert!(pods[0].1.ping(pods[2].1.ip, 2), "podnet's pods still work");
}
