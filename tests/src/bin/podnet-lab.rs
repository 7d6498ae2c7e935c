//! podnet-lab: builds, checks and removes a multi-node lab on this machine
//! (`cargo xtask lab ...` runs it). See `podnet_tests::lab`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use podnet_tests::lab::{self, LabDatastore, LabLayout, LabSpec};

#[derive(Debug, Parser)]
#[command(
    name = "podnet-lab",
    about = "a podnet cluster of network namespaces on this machine"
)]
struct Cli {
    /// Where the lab keeps its state and lab.json.
    #[arg(long, global = true, default_value = lab::DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// Prefix of the lab's namespace names.
    #[arg(long, global = true, default_value = "pnlab")]
    prefix: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the lab: nodes, agents, pods.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "direct"])]
        mode: String,
        #[arg(long, default_value = "file", value_parser = ["file", "etcd"])]
        datastore: String,
    },
    /// Nodes, pods, IPs, agent health.
    Status,
    /// Full connectivity matrix; exit code 1 on any failure.
    Check,
    /// Remove everything the lab made (safe twice, safe after a crash).
    Down,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Up {
            nodes,
            pods_per_node,
            mode,
            datastore,
        } => {
            let spec = LabSpec {
                nodes,
                pods_per_node,
                mode,
                datastore: if datastore == "etcd" {
                    LabDatastore::Etcd
                } else {
                    LabDatastore::File
                },
                prefix: cli.prefix,
                run_dir: cli.run_dir.clone(),
                verbose: true,
            };
            let layout = lab::up(&spec)?;
            println!(
                "lab up: {} nodes, {} pods; layout in {}",
                layout.nodes.len(),
                layout.pods.len(),
                cli.run_dir.join("lab.json").display()
            );
            Ok(())
        }
        Cmd::Status => {
            let layout = LabLayout::load(&cli.run_dir)?;
            println!(
                "mode {}  datastore {:?}  fabric {}",
                layout.mode, layout.datastore, layout.fabric_netns
            );
            println!(
                "{:<8} {:<16} {:<16} {:<8} NETNS",
                "NODE", "NODE IP", "POD CIDR", "AGENT"
            );
            for n in &layout.nodes {
                let health = podnet::api::Client::new(&n.agent_socket)
                    .call::<podnet::api::AgentStatus>(&podnet::api::Request::Status)
                    .map_or_else(|_| "DOWN".to_owned(), |s| format!("up ({})", s.endpoints));
                println!(
                    "{:<8} {:<16} {:<16} {:<8} {}",
                    n.name, n.node_ip, n.pod_cidr, health, n.netns
                );
            }
            println!();
            println!("{:<14} {:<8} {:<16} NETNS", "POD", "NODE", "IP");
            for p in &layout.pods {
                println!("{:<14} {:<8} {:<16} {}", p.name, p.node, p.ip, p.netns);
            }
            Ok(())
        }
        Cmd::Check => {
            let layout = LabLayout::load(&cli.run_dir)?;
            anyhow::ensure!(!layout.pods.is_empty(), "the lab has no pods to check");
            let probes = lab::check(&layout)?;
            print!("{}", lab::render(&probes));
            if probes.iter().any(|p| !p.ok) {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Down => {
            lab::down(&cli.run_dir, &cli.prefix)?;
            println!("lab down");
            Ok(())
        }
    }
}
