//! The agent's socket is a trust boundary: mode 0600 from the start, a
//! bounded request size and read timeout (one client cannot hold the agent),
//! and endpoint requests are validated before anything changes.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    time::{Duration, Instant},
};

use podnet::{
    agent::MAX_REQUEST_BYTES,
    api::{AgentStatus, Client, ClientError, Endpoint, EndpointStatus, Request, Response},
};
use podnet_tests::{node::Node, privileged};

/// The agent's read timeout for one request; its answer names it too.
const READ_TIMEOUT: Duration = podnet::agent::REQUEST_READ_TIMEOUT;
/// How late after [`READ_TIMEOUT`] the hang-up may come (scheduling).
const TIMEOUT_MARGIN: Duration = Duration::from_millis(1500);

/// A `status` request of exactly `len` bytes, newline included (JSON allows
/// the padding spaces).
fn status_request_of(len: usize) -> Vec<u8> {
    let mut request = serde_json::to_vec(&Request::Status).expect("JSON");
    assert!(request.len() < len);
    request.resize(len - 1, b' ');
    request.push(b'\n');
    request
}

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

    // At the size limit: a request of exactly MAX_REQUEST_BYTES (newline
    // included) is served; one byte more is refused with a reason, the
    // agent unharmed.
    let limit = usize::try_from(MAX_REQUEST_BYTES).expect("limit");
    let answer = raw(&node, &status_request_of(limit));
    match serde_json::from_str::<Response<AgentStatus>>(&answer) {
        Ok(Response::Ok(status)) => assert!(!status.programs.is_empty()),
        other => {
            panic!("a request of exactly {limit} bytes was not served: {other:?} ({answer:?})")
        }
    }
    let answer = raw(&node, &status_request_of(limit + 1));
    assert!(
        answer.contains(&format!("request larger than {MAX_REQUEST_BYTES} bytes")),
        "a request of {} bytes: {answer:?}",
        limit + 1
    );
    still_serves(&node);

    // A client that connects and sends nothing, and one that sends half a
    // request and then a byte a second, are hung up on at the read timeout
    // (a deadline for the whole request, not per read); others are served
    // meanwhile.
    let trickler = std::thread::spawn({
        let socket = node.socket();
        move || {
            let started = Instant::now();
            let mut slow = UnixStream::connect(socket).expect("connect");
            slow.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            slow.write_all(b"{\"add_endpoint\": ")
                .expect("half a request");
            let mut answer = String::new();
            let mut reader = BufReader::new(slow.try_clone().expect("clone"));
            let mut last_byte = Instant::now();
            // Until hung up on: the answer (or end of stream) arrives.
            while reader.read_line(&mut answer).is_err() && started.elapsed() < READ_TIMEOUT * 3 {
                if last_byte.elapsed() >= Duration::from_millis(900) {
                    // Fails once the agent has hung up; the answer is still
                    // there to read.
                    let _ = slow.write_all(b" ");
                    last_byte = Instant::now();
                }
            }
            (answer, started.elapsed())
        }
    });
    let started = Instant::now();
    let mut idle = UnixStream::connect(node.socket()).expect("connect");
    idle.set_read_timeout(Some(READ_TIMEOUT * 3))
        .expect("timeout");
    still_serves(&node);
    let mut answer = String::new();
    let _ = BufReader::new(&mut idle).read_line(&mut answer);
    let idle_for = started.elapsed();
    let (slow_answer, slow_for) = trickler.join().expect("the slow client");
    let want = format!("no complete request within {} s", READ_TIMEOUT.as_secs());
    eprintln!("hung up on: idle client after {idle_for:?}, slow client after {slow_for:?}");
    for (who, answer, took) in [
        ("idle", &answer, idle_for),
        ("slow", &slow_answer, slow_for),
    ] {
        assert!(answer.contains(&want), "{who} client: answer {answer:?}");
        assert!(
            took >= READ_TIMEOUT && took <= READ_TIMEOUT + TIMEOUT_MARGIN,
            "{who} client: hung up on after {took:?}, not at the {READ_TIMEOUT:?} read timeout"
        );
    }

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
