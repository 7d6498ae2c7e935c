//! podnetd's metrics and health endpoints and its per-operation log lines,
//! on a node whose agent runs with `--metrics-addr` (scraped from inside the
//! node's netns, where the agent listens) and `--log-format json`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use podnet::api::{Client, ClientError, Endpoint, EndpointStatus, Request};
use podnet_common::{
    FlowKey, StackFlow, TrackedConnection,
    names::{
        MAP_CONNTRACK, MAP_STACK_FLOWS, MAX_ENDPOINTS, MAX_STACK_FLOWS, MAX_TRACKED_CONNECTIONS,
    },
};
use podnet_tests::{
    lab::{LabDatastore, LabGuard, LabNode, LabOptions, LabPod},
    node::{Node, Pod},
    privileged,
    scrape::{self, HttpAnswer},
    wait_up_to,
};

/// The DaemonSet's port. The node's netns is the test's own and fresh:
/// nothing else listens in it, so the port is free.
const METRICS_ADDR: &str = "127.0.0.1:9962";
/// Echo requests a -> b, and their payload size.
const PINGS: u64 = 20;
const PAYLOAD: u64 = 1000;

/// `GET path` from the agent of the node whose netns is `netns`.
fn get_in(netns: &str, path: &str) -> HttpAnswer {
    let addr: SocketAddr = METRICS_ADDR.parse().expect("address");
    scrape::get(netns, addr, path).unwrap_or_else(|e| panic!("GET {path} in {netns}: {e:#}"))
}

fn get(node: &Node, path: &str) -> HttpAnswer {
    get_in(node.netns.name(), path)
}

fn metrics(node: &Node) -> String {
    metrics_in(node.netns.name())
}

/// The agent's exposition, showing everything done before the call: the
/// agent serves a scrape up to `SCRAPE_FRESH` old again (it walks the maps
/// at most once per that long), so the call waits that long first.
fn metrics_in(netns: &str) -> String {
    std::thread::sleep(podnet::agent::http::SCRAPE_FRESH + Duration::from_millis(50));
    let answer = get_in(netns, "/metrics");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{answer:?}"
    );
    answer.body
}

/// [`PINGS`] echo requests with [`PAYLOAD`] bytes each from the pod in
/// `netns` to `to`, every one answered.
fn ping(netns: &str, to: Ipv4Addr) {
    let out = podnet_tests::lab::in_netns(netns, "ping")
        .expect("netns")
        .args([
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
            "-s",
            &PAYLOAD.to_string(),
            &to.to_string(),
        ])
        .output()
        .expect("ping");
    assert!(out.status.success(), "{netns} -> {to}: {out:?}");
}

/// A sample's count; panics when the series is absent.
fn count(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    scrape::count(text, name, labels)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
}

fn sent(text: &str, name: &str, pod: &Pod) -> u64 {
    let ip = pod.ip.to_string();
    count(
        text,
        name,
        &[
            ("container_id", pod.container_id.as_str()),
            ("pod_ip", ip.as_str()),
            ("ifname", "eth0"),
            ("network", "podnet"),
        ],
    )
}

fn ops(text: &str, op: &str, result: &str) -> u64 {
    count(
        text,
        "podnet_cni_operations_total",
        &[("verb", op), ("result", result)],
    )
}

/// What the agent says about itself after two ADDs on a fresh node.
fn check_agent_state(text: &str) {
    assert_eq!(
        count(
            text,
            "podnet_agent_info",
            &[("mode", "local"), ("datastore", "none")]
        ),
        1
    );
    assert_eq!(
        count(text, "podnet_datastore_connected", &[("backend", "none")]),
        1
    );
    assert_eq!(count(text, "podnet_agent_ready", &[]), 1);
    assert_eq!(count(text, "podnet_agent_pending", &[]), 0);
    assert_eq!(ops(text, "add", "ok"), 2, "the two ADDs");
    assert_eq!(ops(text, "add", "error"), 0);
    assert_eq!(ops(text, "del", "ok"), 0);
    assert_eq!(
        count(
            text,
            "podnet_cni_operation_duration_seconds_count",
            &[("verb", "add")]
        ),
        2
    );
    let sum = scrape::value(
        text,
        "podnet_cni_operation_duration_seconds_sum",
        &[("verb", "add")],
    )
    .expect("one series")
    .unwrap_or(0.0);
    assert!(sum > 0.0 && sum < 30.0, "ADD latency sum {sum}");
    // Map fill: one endpoint entry and one veth entry per pod.
    for map in ["podnet_endpts", "podnet_veths"] {
        assert_eq!(
            count(text, "podnet_map_entries", &[("map", map)]),
            2,
            "{map}"
        );
    }
    assert_eq!(
        count(text, "podnet_map_max_entries", &[("map", "podnet_endpts")]),
        u64::from(MAX_ENDPOINTS)
    );
    assert_eq!(
        count(
            text,
            "podnet_map_max_entries",
            &[("map", "podnet_stackflw")]
        ),
        u64::from(MAX_STACK_FLOWS)
    );
    assert_eq!(count(text, "podnet_endpoints", &[]), 2);
    // Every drop reason has its series (0 or more).
    count(
        text,
        "podnet_datapath_drops_total",
        &[("reason", "spoofed_source_ip")],
    );
}

/// The counters moved by at least the pings sent between `before` and `after`.
fn check_traffic(before: &str, after: &str, a: &Pod, b: &Pod) {
    // Each frame: Ethernet 14 + IPv4 20 + ICMP 8 + payload.
    let frame = 14 + 20 + 8 + PAYLOAD;
    for (pod, what) in [(a, "requests"), (b, "replies")] {
        let packets = sent(after, "podnet_endpoint_sent_packets_total", pod)
            - sent(before, "podnet_endpoint_sent_packets_total", pod);
        let bytes = sent(after, "podnet_endpoint_sent_bytes_total", pod)
            - sent(before, "podnet_endpoint_sent_bytes_total", pod);
        assert!(
            packets >= PINGS,
            "{} sent {PINGS} {what}; counted {packets}",
            pod.container_id
        );
        assert!(
            bytes >= PINGS * frame,
            "{} sent {PINGS} {what} of {frame} bytes; counted {bytes}",
            pod.container_id
        );
    }
    let redirect = [("verdict", "redirect_peer")];
    let redirected = count(after, "podnet_datapath_verdicts_total", &redirect)
        - count(before, "podnet_datapath_verdicts_total", &redirect);
    assert!(
        redirected >= 2 * PINGS,
        "{PINGS} requests and replies redirected: {redirected}"
    );
}

#[test]
fn metrics_count_real_traffic_cni_operations_and_map_fill() {
    if !privileged("metrics_count_real_traffic_cni_operations_and_map_fill") {
        return;
    }
    let node = Node::start_with_agent_args(
        "metrics",
        "10.244.31.0/24",
        &["--metrics-addr", METRICS_ADDR],
    )
    .expect("node");

    // Liveness and readiness: a single node without a datastore is ready
    // once its datapath is loaded and nothing is pending.
    assert_eq!(get(&node, "/healthz").status, 200);
    wait_up_to(Duration::from_secs(15), "/readyz answers 200", || {
        get(&node, "/readyz").status == 200
    });
    assert_eq!(get(&node, "/nothing").status, 404);

    let a = node.add_pod("metrics-a").expect("ADD a");
    let b = node.add_pod("metrics-b").expect("ADD b");
    let before = metrics(&node);
    check_agent_state(&before);

    ping(a.netns.name(), b.ip);
    let after = metrics(&node);
    check_traffic(&before, &after, &a, &b);
    // The metrics read the maps podnetctl reads.
    let redirect = [("verdict", "redirect_peer")];
    assert!(
        count(&after, "podnet_datapath_verdicts_total", &redirect)
            <= node
                .counter(podnet_common::Verdict::RedirectPeer)
                .expect("counters")
    );

    // A refused request counts as an error of its op.
    let endpoints: Vec<EndpointStatus> = Client::new(&node.socket())
        .call(&Request::ListEndpoints)
        .expect("list");
    let mut bad: Endpoint = endpoints[0].endpoint.clone();
    bad.ip = "10.244.99.9".parse().expect("ip");
    bad.owner.container_id = "metrics-bad".into();
    assert!(matches!(
        Client::new(&node.socket()).call::<()>(&Request::AddEndpoint { endpoint: bad }),
        Err(ClientError::Refused(_))
    ));
    // DEL of b: one del ok, one endpoint fewer in the map, b's series gone.
    let del = node.del_pod(&b).expect("DEL");
    assert!(del.success, "{del:?}");
    let last = metrics(&node);
    assert_eq!(ops(&last, "add", "error"), 1, "the refused ADD");
    assert_eq!(ops(&last, "add", "ok"), 2);
    assert_eq!(ops(&last, "del", "ok"), 1);
    assert_eq!(
        count(&last, "podnet_map_entries", &[("map", "podnet_endpts")]),
        1
    );
    assert_eq!(
        scrape::count(
            &last,
            "podnet_endpoint_sent_packets_total",
            &[("container_id", "metrics-b")]
        )
        .expect("at most one"),
        None,
        "a deleted pod's series is gone"
    );
    assert!(sent(&last, "podnet_endpoint_sent_packets_total", &a) >= PINGS);
}

#[test]
fn json_logs_have_one_line_per_cni_operation() {
    if !privileged("json_logs_have_one_line_per_cni_operation") {
        return;
    }
    let node = Node::start_with_agent_args("jsonlog", "10.244.32.0/24", &["--log-format", "json"])
        .expect("node");
    let pod = node.add_pod("jsonlog-a").expect("ADD");
    let mut check_conf = node.conf("1.1.0", &serde_json::Value::Null);
    check_conf["prevResult"] = pod.result.clone();
    let check = node
        .cni_verb(
            "CHECK",
            &pod.container_id,
            &pod.netns.path(),
            &[],
            &check_conf,
        )
        .expect("CHECK");
    assert!(check.success, "{check:?}");
    let del = node.del_pod(&pod).expect("DEL");
    assert!(del.success, "{del:?}");

    let log = node.agent_log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    assert!(!lines.is_empty(), "the agent logged");
    let ops: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "CNI operation")
        .collect();
    let verbs: Vec<&str> = ops.iter().filter_map(|l| l["verb"].as_str()).collect();
    assert_eq!(
        verbs,
        ["add", "check", "del"],
        "one line per operation:\n{log}"
    );
    for line in ops {
        assert_eq!(line["container_id"], "jsonlog-a", "{line}");
        assert_eq!(line["ifname"], "eth0", "{line}");
        assert_eq!(line["result"], "ok", "{line}");
        let ms = line["duration_ms"].as_f64().unwrap_or(-1.0);
        assert!((0.0..10_000.0).contains(&ms), "a duration in ms: {line}");
        // ADD writes maps and links: never under a microsecond.
        if line["verb"] == "add" {
            assert!(ms > 0.0, "{line}");
        }
        assert_eq!(line["level"], "INFO", "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
    }
}

/// node1's datastore metrics, and the overlay's verdicts on both nodes
/// while node1's pod pings node2's.
fn check_cluster_metrics(n1: &LabNode, n2: &LabNode, p1: &LabPod, p2: &LabPod) {
    let before1 = metrics_in(&n1.netns);
    let before2 = metrics_in(&n2.netns);
    assert_eq!(
        count(
            &before1,
            "podnet_agent_info",
            &[("mode", "vxlan"), ("datastore", "etcd")]
        ),
        1
    );
    assert_eq!(
        count(
            &before1,
            "podnet_datastore_connected",
            &[("backend", "etcd")]
        ),
        1
    );
    assert_eq!(
        count(&before1, "podnet_datastore_nodes", &[("state", "live")]),
        1,
        "node2"
    );
    let age = scrape::value(&before1, "podnet_datastore_last_sync_age_seconds", &[])
        .expect("one series")
        .expect("synced");
    assert!((0.0..120.0).contains(&age), "last sync {age} s ago");
    // node2's pod CIDR and node address.
    assert!(
        count(&before1, "podnet_map_entries", &[("map", "podnet_remote")]) >= 2,
        "{before1}"
    );

    ping(&p1.netns, p2.ip);
    let after1 = metrics_in(&n1.netns);
    let after2 = metrics_in(&n2.netns);
    let moved = |before: &str, after: &str, verdict: &str| {
        count(
            after,
            "podnet_datapath_verdicts_total",
            &[("verdict", verdict)],
        ) - count(
            before,
            "podnet_datapath_verdicts_total",
            &[("verdict", verdict)],
        )
    };
    // Requests leave node1 encapsulated and are delivered on node2; the
    // replies the other way.
    for (before, after, node) in [(&before1, &after1, n1), (&before2, &after2, n2)] {
        let encap = moved(before, after, "vxlan_encap_bpf");
        let deliver = moved(before, after, "vxlan_decap_bpf");
        assert!(encap >= PINGS, "{}: {encap} encapsulated", node.name);
        assert!(deliver >= PINGS, "{}: {deliver} delivered", node.name);
    }
}

/// On a two-node etcd cluster: the datastore metrics, the overlay's
/// verdicts on both ends, and /readyz following the datastore: an agent
/// that starts while etcd is down forwards (its last pod CIDR) and is live,
/// but not ready until it has synced.
#[test]
fn readiness_waits_for_the_datastore_and_cluster_metrics_follow_it() {
    if !privileged("readiness_waits_for_the_datastore_and_cluster_metrics_follow_it") {
        return;
    }
    let options = LabOptions {
        agent_args: vec!["--metrics-addr".into(), METRICS_ADDR.into()],
        ..LabOptions::default()
    };
    let mut lab =
        LabGuard::up_with("metrics", 2, 1, "vxlan", LabDatastore::Etcd, options).expect("lab up");
    let (n1, n2) = (lab.layout.nodes[0].clone(), lab.layout.nodes[1].clone());
    let (p1, p2) = (lab.layout.pods[0].clone(), lab.layout.pods[1].clone());
    assert_eq!(
        (p1.node.as_str(), p2.node.as_str()),
        (n1.name.as_str(), n2.name.as_str())
    );
    for node in [&n1, &n2] {
        wait_up_to(Duration::from_secs(20), "/readyz answers 200", || {
            get_in(&node.netns, "/readyz").status == 200
        });
    }
    check_cluster_metrics(&n1, &n2, &p1, &p2);

    // etcd down, node1's agent restarted: it serves its pods and is live,
    // but not ready.
    lab.layout.stop_etcd().expect("stop etcd");
    lab.layout.stop_agent(&n1.name).expect("stop node1's agent");
    lab.layout
        .start_agent(&n1.name)
        .expect("node1's agent starts without etcd");
    assert_eq!(get_in(&n1.netns, "/healthz").status, 200);
    let readyz = get_in(&n1.netns, "/readyz");
    assert_eq!(readyz.status, 503, "{readyz:?}");
    assert!(readyz.body.contains("datastore (etcd)"), "{readyz:?}");
    let down = metrics_in(&n1.netns);
    assert_eq!(count(&down, "podnet_agent_ready", &[]), 0);
    assert_eq!(
        count(&down, "podnet_datastore_connected", &[("backend", "etcd")]),
        0
    );
    assert_eq!(
        count(&down, "podnet_endpoints", &[]),
        1,
        "its pod is still served"
    );

    lab.layout.start_etcd().expect("start etcd");
    wait_up_to(
        Duration::from_secs(30),
        "node1 is ready once etcd is back",
        || get_in(&n1.netns, "/readyz").status == 200,
    );
    let back = metrics_in(&n1.netns);
    assert_eq!(
        count(&back, "podnet_datastore_connected", &[("backend", "etcd")]),
        1
    );
    assert_eq!(count(&back, "podnet_agent_ready", &[]), 1);
}

/// Map fill on a full-size map: the stack-flows LRU map filled to its
/// capacity is counted as the datapath lists it, and how long counting
/// takes (a scrape pays it) is printed.
#[test]
fn map_fill_counts_a_full_stack_flows_map() {
    if !privileged("map_fill_counts_a_full_stack_flows_map") {
        return;
    }
    let bpffs = podnet_tests::PrivateBpffs::new("fill").expect("bpffs");
    let mut datapath = podnet::datapath::Datapath::load(bpffs.path()).expect("load");
    let flow = podnet_common::StackFlow {
        last_seen_ns: podnet::datapath::monotonic_coarse_ns(),
        flags: 0,
        owner: 0,
    };
    for i in 0..MAX_STACK_FLOWS {
        let key = podnet_common::FlowKey {
            src: i,
            dst: 0x0a00_0001,
            src_port: 1234,
            dst_port: 80,
            proto: 6,
            pad: [0; 3],
        };
        datapath.insert_stack_flow(key, flow).expect("insert");
    }
    let listed = datapath.stack_flows().expect("list").len();
    let reader = podnet::datapath::PinnedMapReader::open(bpffs.path()).expect("open pins");
    let started = std::time::Instant::now();
    let fill = reader.fill().expect("fill");
    let took = started.elapsed();
    let flows = fill
        .iter()
        .find(|f| f.name == "podnet_stackflw")
        .expect("stack flows");
    eprintln!(
        "counting {} stack flows (of {}) took {took:?}",
        flows.entries, flows.max_entries
    );
    assert_eq!(flows.max_entries, MAX_STACK_FLOWS);
    assert_eq!(
        usize::try_from(flows.entries).expect("fits"),
        listed,
        "counted as listed"
    );
    // An LRU map may evict a little before it is full; most of it is there.
    assert!(flows.entries > MAX_STACK_FLOWS / 2, "{flows:?}");
    let endpoints = fill
        .iter()
        .find(|f| f.name == "podnet_endpts")
        .expect("endpoints");
    assert_eq!(endpoints.entries, 0);
}

/// The flow tables' lines of `podnetctl status --json` by map name:
/// (entries, capacity, nearly full).
fn status_tables(node: &Node) -> std::collections::BTreeMap<String, (u64, u64, bool)> {
    let status = node.podnetctl(&["status"]).expect("podnetctl status");
    let tables = status["tables"]
        .as_array()
        .unwrap_or_else(|| panic!("status has the tables: {status}"));
    tables
        .iter()
        .map(|t| {
            (
                t["map"].as_str().expect("map").to_owned(),
                (
                    t["entries"].as_u64().expect("entries"),
                    t["capacity"].as_u64().expect("capacity"),
                    t["nearly_full"].as_bool().expect("nearly_full"),
                ),
            )
        })
        .collect()
}

/// `podnetctl status` shows how full the connection table and the
/// stack-flows table are, from the agent and from the pins while it is
/// down, and flags the connection table once it is 90 % full (entries
/// written straight into the agent's pinned maps, as the datapath would
/// write them); how long the agent takes to count a full connection
/// table is printed.
#[test]
fn status_shows_how_full_the_flow_tables_are() {
    if !privileged("status_shows_how_full_the_flow_tables_are") {
        return;
    }
    let mut node = Node::start("tables", "10.244.21.0/24").expect("node");
    let before = status_tables(&node);
    assert_eq!(
        before.get(MAP_CONNTRACK),
        Some(&(0, u64::from(MAX_TRACKED_CONNECTIONS), false)),
        "{before:?}"
    );
    assert_eq!(
        before.get(MAP_STACK_FLOWS),
        Some(&(0, u64::from(MAX_STACK_FLOWS), false)),
        "{before:?}"
    );

    let open = |name: &str| {
        Map::from_map_data(MapData::from_pin(node.bpffs.path().join(name)).expect("pin"))
            .expect("map")
    };
    let key = |i: u32, proto: u8| FlowKey {
        src: i,
        dst: 0x0a00_0001,
        src_port: 40_000,
        dst_port: 80,
        proto,
        pad: [0; 3],
    };
    let now = podnet::datapath::monotonic_coarse_ns();
    let mut conntrack = open(MAP_CONNTRACK);
    let mut conns: BpfHashMap<_, FlowKey, TrackedConnection> =
        BpfHashMap::try_from(&mut conntrack).expect("connection table");
    let conn = TrackedConnection {
        last_seen_ns: now,
        ..TrackedConnection::default()
    };
    for i in 0..MAX_TRACKED_CONNECTIONS {
        conns
            .insert(key(i, 6), conn, 0)
            .expect("insert a connection");
    }
    let mut stack = open(MAP_STACK_FLOWS);
    let mut flows: BpfHashMap<_, FlowKey, StackFlow> =
        BpfHashMap::try_from(&mut stack).expect("stack-flows table");
    let flow = StackFlow {
        last_seen_ns: now,
        flags: 0,
        owner: 0,
    };
    for i in 0..1_000 {
        flows.insert(key(i, 17), flow, 0).expect("insert a flow");
    }

    let started = std::time::Instant::now();
    let after = status_tables(&node);
    eprintln!(
        "podnetctl status with a full connection table took {:?}: {after:?}",
        started.elapsed()
    );
    let (entries, capacity, nearly_full) = after[MAP_CONNTRACK];
    // An LRU map may evict a little before it is full.
    assert!(entries * 100 >= capacity * 90, "{after:?}");
    assert!(nearly_full, "{after:?}");
    assert_eq!(
        after[MAP_STACK_FLOWS],
        (1_000, u64::from(MAX_STACK_FLOWS), false)
    );

    // The line a person reads says so and where the evictions show.
    let out = node
        .netns
        .command(podnet_tests::bins::binary("podnetctl"))
        .expect("podnetctl")
        .arg("--socket")
        .arg(node.socket())
        .arg("status")
        .output()
        .expect("podnetctl status");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("connections"))
        .unwrap_or_else(|| panic!("a connections line: {text}"));
    assert!(line.contains("NEARLY FULL"), "{line}");
    assert!(line.contains("service_connection_unknown"), "{line}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("stack flows") && l.contains("1000 / 131072 entries")),
        "{text}"
    );

    // With the agent down podnetctl counts them from the pins.
    node.stop_agent();
    let down = node.podnetctl(&["status"]).expect("podnetctl status");
    assert_eq!(down["agent"], "down");
    let tables = down["tables"].as_array().expect("tables from the pins");
    assert!(
        tables
            .iter()
            .any(|t| t["map"] == MAP_CONNTRACK && t["nearly_full"] == true),
        "{down}"
    );
}
