//! The agent's socket is a trust boundary: mode 0600 from the start, a
//! bounded request size and read timeout (one client cannot hold the agent),
//! and endpoint requests are validated before anything changes.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    time::{Duration, Instant},
};

use podnet::api::{AgentStatus, Client, ClientError, Endpoint, EndpointStatus, Request};
use podnet_tests::{node::Node, privileged};

/// Sends raw bytes and returns the agent's one-line answer ("" if it hung up
/// without one).
fn raw(node: &Node, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(node.socket()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    // The agent may hang up while a large request is still being written.
    let _ = stream.write_all(bytes);
    let mut answer = String::new();
    let _ = BufReader::new(&stream).read_line(&mut answer);
    answer
}

fn still_serves(node: &Node) {
    let status: AgentStatus = Client::new(&node.socket())
        .call(&Request::Status)
        .expect("the agent still answers");
    assert!(!status.programs.is_empty());
}

#[test]
fn the_socket_is_private_bounded_and_checks_what_it_is_told() {
    if !privileged("the_socket_is_private_bounded_and_checks_what_it_is_told") {
        return;
    }
    let node = Node::start("sock", "10.244.22.0/24").expect("node");
    let pod = node.add_pod("sock-a").expect("ADD");

    let mode = std::fs::metadata(node.socket())
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only root may talk to the agent");
    let leftovers: Vec<_> = std::fs::read_dir(node.socket().parent().expect("dir"))
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".new"))
        .collect();
    assert!(leftovers.is_empty(), "no staging directory left");

    // Over the size limit: refused with a reason, the agent unharmed.
    let huge = vec![b' '; 2 << 20];
    let answer = raw(&node, &huge);
    assert!(answer.contains("larger than"), "answer: {answer:?}");
    still_serves(&node);

    // A client that connects and sends nothing is hung up on; others are
    // served meanwhile.
    let started = Instant::now();
    let mut idle = UnixStream::connect(node.socket()).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    still_serves(&node);
    let mut answer = String::new();
    let _ = BufReader::new(&mut idle).read_line(&mut answer);
    assert!(answer.contains("no complete request"), "answer: {answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "hung up on after the read timeout"
    );

    // An endpoint request that is not valid changes nothing.
    let endpoints = || -> Vec<Endpoint> {
        Client::new(&node.socket())
            .call::<Vec<EndpointStatus>>(&Request::ListEndpoints)
            .expect("list")
            .into_iter()
            .map(|e| e.endpoint)
            .collect()
    };
    let before = endpoints();
    assert_eq!(before.len(), 1);
    let mut bad: Endpoint = before[0].clone();
    bad.ip = "10.244.99.9".parse().expect("ip");
    bad.owner.container_id = "sock-b".into();
    match Client::new(&node.socket()).call::<()>(&Request::AddEndpoint { endpoint: bad }) {
        Err(ClientError::Refused(msg)) => {
            assert!(msg.contains("invalid endpoint"), "{msg}");
        }
        other => panic!("a bad endpoint was not refused: {other:?}"),
    }
    assert_eq!(before, endpoints(), "no state changed");
    assert_eq!(before[0].ip, pod.ip);
}
