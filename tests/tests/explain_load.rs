//! `podnetctl explain` while the agent serves others: explaining copies
//! the stack flows its packet meets by looking up their two keys, not by
//! walking the whole table under the agent's lock (which every CNI
//! operation takes), and loads at most one scratch datapath at a time.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use podnet::api::{Client, NodeInfo, Request};
use podnet_common::{
    FlowKey, StackFlow,
    names::{MAP_STACK_FLOWS, MAX_STACK_FLOWS},
};
use podnet_tests::{bins, node::Node, privileged};

/// Explaining clients at once, and explanations each asks for in turn.
const CLIENTS: usize = 4;
const EACH: usize = 2;

/// Fills the agent's stack-flows table (pinned in `pin_dir`) to capacity;
/// how long one walk over it takes from here.
fn fill_stack_flows(pin_dir: &Path) -> Duration {
    let data = MapData::from_pin(pin_dir.join(MAP_STACK_FLOWS)).expect("the pinned stack flows");
    let map = Map::from_map_data(data).expect("its type");
    let mut flows: HashMap<MapData, FlowKey, StackFlow> =
        HashMap::try_from(map).expect("an LRU hash map");
    let flow = StackFlow {
        last_seen_ns: podnet::datapath::monotonic_coarse_ns(),
        flags: 0,
        owner: 0,
    };
    for i in 0..MAX_STACK_FLOWS {
        // Sources outside the node's pods: no packet of the test meets them.
        let key = FlowKey::new(0x0a63_0000 + i, 0x0a00_0001, 1234, 80, 6);
        flows.insert(key, flow, 0).expect("insert");
    }
    let started = Instant::now();
    let walked = flows.iter().flatten().count();
    let took = started.elapsed();
    eprintln!("walking {walked} stack flows took {took:?}");
    took
}

/// Scratch datapaths being loaded now: their directories in `state_dir`.
fn scratch_loads(state_dir: &Path) -> usize {
    std::fs::read_dir(state_dir).map_or(0, |dir| {
        dir.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("explain-"))
            .count()
    })
}

/// What happened while [`CLIENTS`] clients asked for [`EACH`]
/// explanations each.
struct Round {
    explained: usize,
    busy: usize,
    asked: usize,
    /// The longest the agent took to answer a request that needs its
    /// lock for a moment (as every CNI operation does).
    slowest: Duration,
    /// Scratch datapaths loaded at once, at most.
    most_loads: usize,
}

fn explain_concurrently(node: &Node, from: Ipv4Addr, to: Ipv4Addr) -> Round {
    let done = Arc::new(AtomicBool::new(false));
    let socket: PathBuf = node.socket();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let socket = socket.clone();
            let (from, to) = (from.to_string(), format!("{to}:8080/tcp"));
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                for _ in 0..EACH {
                    let out = std::process::Command::new(bins::binary("podnetctl"))
                        .arg("--socket")
                        .arg(&socket)
                        .args(["--json", "explain", "--from", &from, "--to", &to])
                        .output()
                        .expect("podnetctl explain");
                    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                    outcomes.push((out.status.success(), stderr));
                }
                outcomes
            })
        })
        .collect();
    let loads = {
        let (done, state_dir) = (Arc::clone(&done), node.state_dir());
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(scratch_loads(&state_dir));
                std::thread::sleep(Duration::from_millis(1));
            }
            most
        })
    };
    let watcher = {
        let (done, socket) = (Arc::clone(&done), socket.clone());
        std::thread::spawn(move || {
            let (mut slowest, mut asked) = (Duration::ZERO, 0);
            while !done.load(Ordering::Relaxed) {
                let started = Instant::now();
                Client::new(&socket)
                    .call::<NodeInfo>(&Request::Node)
                    .expect("the agent answers");
                slowest = slowest.max(started.elapsed());
                asked += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (slowest, asked)
        })
    };
    let outcomes: Vec<(bool, String)> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("explaining client"))
        .collect();
    done.store(true, Ordering::Relaxed);
    let (slowest, asked) = watcher.join().expect("watcher");
    let most_loads = loads.join().expect("scratch load sampler");
    let explained = outcomes.iter().filter(|(ok, _)| *ok).count();
    let busy = outcomes
        .iter()
        .filter(|(ok, e)| !ok && e.contains("busy"))
        .count();
    assert!(explained > 0, "{outcomes:?}");
    assert_eq!(
        explained + busy,
        outcomes.len(),
        "explained or told busy: {outcomes:?}"
    );
    let round = Round {
        explained,
        busy,
        asked,
        slowest,
        most_loads,
    };
    eprintln!(
        "{} explained, {} told busy; slowest of {} node requests meanwhile: {:?}; scratch datapaths loaded at once: {}",
        round.explained, round.busy, round.asked, round.slowest, round.most_loads
    );
    round
}

#[test]
fn explain_walks_no_table_under_the_agents_lock_and_loads_one_scratch_datapath_at_a_time() {
    if !privileged(
        "explain_walks_no_table_under_the_agents_lock_and_loads_one_scratch_datapath_at_a_time",
    ) {
        return;
    }
    let node = Node::start("xload", "10.244.35.0/24").expect("node");
    let a = node.add_pod("xload-a").expect("ADD a");
    let b = node.add_pod("xload-b").expect("ADD b");

    // An empty table: nothing holds explanations apart but the agent.
    let round = explain_concurrently(&node, a.ip, b.ip);
    assert!(
        round.most_loads <= 1,
        "{} scratch datapaths were loaded at once",
        round.most_loads
    );

    // A full table: with the walk under the lock, some request waits for
    // most of a walk.
    let walk = fill_stack_flows(node.bpffs.path());
    assert!(
        walk >= Duration::from_millis(40),
        "a walk this short ({walk:?}) cannot be told from noise"
    );
    let round = explain_concurrently(&node, a.ip, b.ip);
    assert!(
        round.most_loads <= 1,
        "{} scratch datapaths were loaded at once",
        round.most_loads
    );
    assert!(
        round.slowest < walk / 2,
        "a request waited {:?} for the agent while explain ran (a walk of the stack flows takes {walk:?})",
        round.slowest
    );
}
