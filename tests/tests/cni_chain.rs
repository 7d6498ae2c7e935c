//! podnet as the first plugin of a chain, driven the way libcni drives a
//! conflist (each plugin gets the network name and version injected and the
//! previous plugin's result as prevResult), with its own `bandwidth`
//! capability, followed by the reference tuning and portmap plugins; and
//! with delegated IPAM.

use podnet_tests::{netns::NetNs, node::Node, privileged};
use serde_json::json;

fn cni_env<'a>(command: &'a str, cid: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
    ]
}

#[test]
fn podnet_first_in_a_chain_with_its_bandwidth_tuning_and_portmap() {
    if !privileged("podnet_first_in_a_chain_with_its_bandwidth_tuning_and_portmap") {
        return;
    }
    let node = Node::start("chain", "10.244.15.0/24").expect("node");
    let peer = node.add_pod("chain-peer").expect("ADD peer");
    let pod_ns = NetNs::new("chainpod").expect("netns");
    let netns = pod_ns.path().display().to_string();
    let env_add = cni_env("ADD", "chain-1", &netns);
    let version = "1.0.0";
    let chain = [
        (
            "tuning",
            json!({"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.accept_redirects": "0"}}),
        ),
        (
            "portmap",
            json!({"type": "portmap", "capabilities": {"portMappings": true},
                   "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}}),
        ),
    ];

    // Both directions limited through podnet's own capability (what
    // README's conflist shows instead of the reference bandwidth plugin).
    let limits = json!({"capabilities": {"bandwidth": true},
        "runtimeConfig": {"bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000,
                                        "egressRate": 50_000_000, "egressBurst": 500_000}}});
    let out = node
        .cni(&env_add, node.conf(version, &limits).to_string().as_bytes())
        .expect("podnet ADD");
    assert!(out.success, "{out:?}");
    let mut result = out.json();
    for (plugin, conf) in &chain {
        let mut conf = conf.clone();
        conf["cniVersion"] = json!(version);
        conf["name"] = json!("podnet");
        conf["prevResult"] = result.clone();
        let (ok, next, log) = node
            .reference_plugin(plugin, &env_add, &conf)
            .expect("run the plugin");
        assert!(ok, "{plugin} ADD after podnet: {log}");
        result = next;
    }
    // The chain kept podnet's result and its effects.
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    let ip: std::net::Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("ip in the final result");
    let sysctl = pod_ns
        .exec("cat", &["/proc/sys/net/ipv4/conf/eth0/accept_redirects"])
        .expect("read sysctl");
    assert_eq!(
        String::from_utf8_lossy(&sysctl.stdout).trim(),
        "0",
        "tuning applied"
    );
    assert!(peer.ping(ip, 2), "the chained pod is reachable");

    // CHECK through the chain (libcni passes the final result to everyone).
    let env_check = cni_env("CHECK", "chain-1", &netns);
    let mut check = node.conf(version, &limits);
    check["prevResult"] = result.clone();
    let out = node
        .cni(&env_check, check.to_string().as_bytes())
        .expect("CHECK");
    assert!(out.success, "podnet CHECK on the chain's result: {out:?}");

    // DEL in reverse order.
    let env_del = cni_env("DEL", "chain-1", &netns);
    for (plugin, conf) in chain.iter().rev() {
        let mut conf = conf.clone();
        conf["cniVersion"] = json!(version);
        conf["name"] = json!("podnet");
        conf["prevResult"] = result.clone();
        let (ok, _, log) = node
            .reference_plugin(plugin, &env_del, &conf)
            .expect("run the plugin");
        assert!(ok, "{plugin} DEL: {log}");
    }
    let out = node
        .cni(&env_del, node.conf(version, &limits).to_string().as_bytes())
        .expect("podnet DEL");
    assert!(out.success, "{out:?}");
    assert_eq!(node.ipam_records(), vec![peer.ip.to_string()]);
    assert!(
        node.inventory().expect("inventory").shapers.is_empty(),
        "DEL removed the pod's shaper"
    );
}

#[test]
fn delegated_ipam_host_local() {
    if !privileged("delegated_ipam_host_local") {
        return;
    }
    let node = Node::start("hostlocal", "10.244.16.0/24").expect("node");
    let data_dir = node.state.path().join("host-local");
    let conf = node.conf(
        "1.0.0",
        &json!({"ipam": {"type": "host-local", "dataDir": data_dir,
                         "ranges": [[{"subnet": "10.244.16.0/24", "rangeStart": "10.244.16.100"}]]}}),
    );
    let a = node.add_pod_with("hl-a", &conf).expect("ADD a");
    let b = node.add_pod_with("hl-b", &conf).expect("ADD b");
    for pod in [&a, &b] {
        assert!(
            pod.ip.octets()[3] >= 100,
            "address from host-local's range: {}",
            pod.ip
        );
        assert!(
            data_dir.join("podnet").join(pod.ip.to_string()).exists(),
            "host-local recorded it"
        );
    }
    assert!(
        node.ipam_records().is_empty(),
        "the built-in IPAM was not used"
    );
    assert!(a.ping(b.ip, 2));
    for pod in [&a, &b] {
        let path = pod.netns.path().display().to_string();
        let out = node
            .cni(
                &cni_env("DEL", &pod.container_id, &path),
                conf.to_string().as_bytes(),
            )
            .expect("DEL");
        assert!(out.success, "{out:?}");
        assert!(
            !data_dir.join("podnet").join(pod.ip.to_string()).exists(),
            "host-local released it"
        );
    }
}
