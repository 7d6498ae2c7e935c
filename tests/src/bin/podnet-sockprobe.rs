//! A client of the socket LB's tests, run as a process of a node's cgroup
//! inside a pod's netns (`podnet_tests::socket_lb::probe_in`): the socket
//! programs translate only the sockets of the cgroup's processes, so the
//! queries cannot run on a thread of the test. Prints one JSON
//! `ProbeAnswer` per query; exits 0 whatever the queries answered.

use std::{net::SocketAddrV4, time::Duration};

use clap::Parser;
use podnet_tests::socket_lb::{tcp_probe, udp_probe};

#[derive(Debug, Parser)]
#[command(name = "podnet-sockprobe")]
struct Args {
    /// tcp: connect, read the greeting, getpeername; udp: sendto a
    /// DNS-shaped datagram, recvfrom the answer (unconnected socket).
    #[arg(value_parser = ["tcp", "udp"])]
    proto: String,
    /// The address to query (a ClusterIP and port).
    addr: SocketAddrV4,
    /// Queries, each on a socket of its own.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// How long one query may take, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let timeout = Duration::from_millis(args.timeout_ms);
    for _ in 0..args.count {
        let answer = if args.proto == "tcp" {
            tcp_probe(args.addr, timeout)
        } else {
            udp_probe(args.addr, timeout)
        };
        println!("{}", serde_json::to_string(&answer)?);
    }
    Ok(())
}
