//! Bad input gets the right CNI error code and changes nothing.

use podnet_tests::{netns::NetNs, node::Node, privileged};
use serde_json::Value;

/// (what, environment, stdin, expected CNI error code)
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u64);

#[test]
#[allow(clippy::too_many_lines, reason = "the corpus is a table")]
fn bad_input_corpus() {
    if !privileged("bad_input_corpus") {
        return;
    }
    let node = Node::start("bad", "10.244.13.0/24").expect("node");
    let existing = node.add_pod("bad-existing").expect("ADD");
    let pod_ns = NetNs::new("badpod").expect("netns");
    let netns = pod_ns.path().display().to_string();
    let good_conf = node.conf("1.1.0", &Value::Null).to_string();
    let socket = node.socket().display().to_string();
    let conf_with = |extra: &str| {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"podnet","type":"podnet","agentSocket":"{socket}",{extra}}}"#
        )
    };

    let full_env = |cid: &'static str, ifname: &'static str| {
        vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", cid),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", ifname),
        ]
    };
    let cases: Vec<Case<'_>> = vec![
        (
            "malformed JSON",
            full_env("bad-1", "eth0"),
            "{\"cniVersion\": ".into(),
            6,
        ),
        ("not an object", full_env("bad-1", "eth0"), "[]".into(), 6),
        (
            "no CNI_COMMAND",
            full_env("bad-1", "eth0")[1..].to_vec(),
            good_conf.clone(),
            4,
        ),
        (
            "unknown CNI_COMMAND",
            {
                let mut e = full_env("bad-1", "eth0");
                e[0].1 = "FROB";
                e
            },
            good_conf.clone(),
            4,
        ),
        (
            "no CNI_CONTAINERID",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", netns.as_str()),
                ("CNI_IFNAME", "eth0"),
            ],
            good_conf.clone(),
            4,
        ),
        (
            "no CNI_NETNS",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "bad-1"),
                ("CNI_IFNAME", "eth0"),
            ],
            good_conf.clone(),
            4,
        ),
        (
            "no CNI_IFNAME",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "bad-1"),
                ("CNI_NETNS", netns.as_str()),
            ],
            good_conf.clone(),
            4,
        ),
        (
            "ifname too long",
            full_env("bad-1", "eth0123456789012"),
            good_conf.clone(),
            4,
        ),
        (
            "ifname with a slash",
            full_env("bad-1", "eth/0"),
            good_conf.clone(),
            4,
        ),
        (
            "ifname with a colon",
            full_env("bad-1", "eth:0"),
            good_conf.clone(),
            4,
        ),
        (
            "ifname with a space",
            full_env("bad-1", "eth 0"),
            good_conf.clone(),
            4,
        ),
        (
            "container ID with a slash",
            full_env("bad/1", "eth0"),
            good_conf.clone(),
            4,
        ),
        (
            "container ID starting with a dash",
            full_env("-bad", "eth0"),
            good_conf.clone(),
            4,
        ),
        (
            "unsupported version",
            full_env("bad-1", "eth0"),
            r#"{"cniVersion":"0.2.0","name":"podnet","type":"podnet"}"#.into(),
            1,
        ),
        (
            "cniVersion a number",
            full_env("bad-1", "eth0"),
            r#"{"cniVersion":1,"name":"podnet"}"#.into(),
            7,
        ),
        (
            "mtu a string",
            full_env("bad-1", "eth0"),
            conf_with(r#""mtu":"1500""#),
            7,
        ),
        (
            "mtu too small",
            full_env("bad-1", "eth0"),
            conf_with(r#""mtu":20"#),
            7,
        ),
        (
            "ipam without type",
            full_env("bad-1", "eth0"),
            conf_with(r#""ipam":{}"#),
            7,
        ),
        (
            "network name with a space",
            full_env("bad-1", "eth0"),
            r#"{"cniVersion":"1.1.0","name":"pod net"}"#.into(),
            7,
        ),
        (
            "netns that does not exist",
            {
                let mut e = full_env("bad-1", "eth0");
                e[2].1 = "/var/run/netns/does-not-exist";
                e
            },
            good_conf.clone(),
            3,
        ),
    ];

    // State, not traffic: the existing pod's counters move on their own
    // (its kernel sends IPv6 router solicitations and MLD reports after
    // link-up, at random delays), so they are left out.
    let snapshot = || {
        let mut endpoints = node.podnetctl(&["endpoints"]).expect("endpoints");
        for e in endpoints.as_array_mut().expect("endpoint list") {
            let e = e.as_object_mut().expect("endpoint");
            e.remove("tx_packets");
            e.remove("tx_bytes");
        }
        (
            node.ipam_records(),
            node.host_veths().expect("links"),
            endpoints,
        )
    };
    let before = snapshot();
    for (what, env, stdin, code) in &cases {
        let out = node.cni(env, stdin.as_bytes()).expect("run podnet");
        assert!(!out.success, "{what}: must fail");
        let error = out.json();
        assert_eq!(error["code"].as_u64(), Some(*code), "{what}: {error}");
        assert!(
            !error["msg"].as_str().unwrap_or_default().is_empty(),
            "{what}: a message for a person"
        );
        assert!(error["cniVersion"].is_string(), "{what}: {error}");
        assert_eq!(snapshot(), before, "{what}: nothing changed");
    }
    assert!(
        existing.ping(node.node_ip, 1),
        "the existing pod is untouched"
    );
}
