//! No unfiltered window in ADD: the pod's link stays down until the agent
//! has attached podnet's filters and written the datapath entry. A plugin
//! killed while the agent works (the runtime's timeout, an OOM kill) leaves
//! a pod that cannot send a single packet, not one that sends unchecked.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use podnet::api::{Client, NodeInfo, Request, Response};
use podnet_tests::{bins, netns::NetNs, node::Node, privileged};

#[test]
fn the_pod_link_stays_down_until_the_agent_has_filtered_it() {
    if !privileged("the_pod_link_stays_down_until_the_agent_has_filtered_it") {
        return;
    }
    let node = Node::start("addorder", "10.244.23.0/24").expect("node");
    // A stand-in for the agent's socket: answers Node like the agent, and
    // holds AddEndpoint (the agent still busy attaching) until the test ends.
    let socket = node.state.path().join("held.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let agent_socket = node.socket();
    let (held_tx, held_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue;
            }
            if line.contains("add_endpoint") {
                held_tx.send(()).ok();
                held.push(stream);
                continue;
            }
            let info: NodeInfo = Client::new(&agent_socket)
                .call(&Request::Node)
                .expect("the real agent");
            let mut answer = serde_json::to_vec(&Response::Ok(info)).expect("encode");
            answer.push(b'\n');
            let _ = stream.write_all(&answer);
        }
    });

    let pod = NetNs::new("addorder").expect("pod netns");
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "podnet", "type": "podnet", "agentSocket": socket,
    });
    let mut plugin = node
        .netns
        .command(bins::binary("podnet"))
        .expect("command")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "addorder-1")
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the plugin");
    plugin
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("conf");
    held_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the plugin handed the endpoint over");

    // The agent has the endpoint but has not answered: the pod is there,
    // and down, without an address.
    let link = pod.ip(&["-o", "link", "show", "eth0"]).expect("ip link");
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    assert!(
        link.contains("state DOWN"),
        "pod link while the agent works: {link}"
    );
    let addrs = pod
        .ip(&["-4", "-o", "addr", "show", "eth0"])
        .expect("ip addr");
    assert!(addrs.stdout.is_empty(), "no address yet");

    // The plugin dies here: the pod stays cut off.
    plugin.kill().expect("kill the plugin");
    plugin.wait().expect("reap");
    std::thread::sleep(Duration::from_millis(300));
    let link = pod.ip(&["-o", "link", "show", "eth0"]).expect("ip link");
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("state DOWN"),
        "a killed ADD leaves the pod's link down"
    );
    let veths = node.host_veths().expect("host veths");
    assert_eq!(veths.len(), 1, "the host end is there for DEL to remove");
    let host = node
        .netns
        .ip(&["-o", "link", "show", &veths[0]])
        .expect("ip");
    assert!(
        String::from_utf8_lossy(&host.stdout).contains("state DOWN"),
        "and the host end is down"
    );
}
