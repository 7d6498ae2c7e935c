//! Every CNI verb in every supported version, through the real binary.

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
