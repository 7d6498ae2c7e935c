//! The agent's side of `podnetctl explain` (see [`crate::explain`]): the
//! live state the packet's path reads is copied under the registry's lock;
//! the scratch datapath is loaded and run after it is released, so CNI
//! operations never wait for a verifier.

use std::sync::Mutex;

use anyhow::Context as _;

use super::Agent;
use crate::explain::{self, ExplainRequest, Explanation, Names, Sender, World};

impl Agent {
    /// The sender, the live state its packet meets, and names for it.
    fn explain_world(
        &mut self,
        request: &ExplainRequest,
    ) -> anyhow::Result<(Sender, World, Names, std::path::PathBuf)> {
        let from = request.from.as_str();
        let endpoint = self
            .endpoints
            .values()
            .filter(|e| e.ip.to_string() == from || e.owner.container_id == from)
            // A container with several interfaces: eth0 first.
            .min_by_key(|e| (e.owner.ifname != "eth0", e.owner.ifname.clone()))
            .cloned()
            .with_context(|| format!("no local pod with IP or container ID {from:?}"))?;
        let sender = Sender {
            ip: endpoint.ip,
            container_id: endpoint.owner.container_id.clone(),
            ifname: endpoint.owner.ifname.clone(),
            host_ifname: endpoint.host_ifname.clone(),
            host_ifindex: endpoint.host_ifindex,
            pod_mac: endpoint.pod_mac,
            host_mac: endpoint.host_mac,
        };
        let keys = explain::flow_keys(&sender, request);
        let datapath = self.datapath_mut();
        let remotes = datapath
            .remotes()?
            .into_iter()
            .filter(|r| r.cidr.contains(&request.to))
            .map(|r| (r.cidr, r.node_ip, r.node_address))
            .collect();
        let flows = datapath
            .stack_flows()?
            .into_iter()
            .filter(|(key, _)| keys.contains(key))
            .collect();
        let world = World {
            config: datapath.config()?,
            sender_veth: datapath.veth(endpoint.host_ifindex)?,
            sender_entry: datapath.endpoint(endpoint.ip)?,
            to: request.to,
            destination: datapath.endpoint(request.to)?,
            remotes,
            flows,
        };
        let names = Names {
            destination_container: self
                .endpoints
                .values()
                .find(|e| e.ip == request.to)
                .map(|e| e.owner.container_id.clone()),
            nodes: self
                .remote_nodes()
                .into_iter()
                .map(|n| (n.node_ip, n.name))
                .collect(),
        };
        Ok((sender, world, names, self.config().state_dir.clone()))
    }
}

/// Explains `request` (see [`crate::explain`]).
pub fn explain(registry: &Mutex<Agent>, request: ExplainRequest) -> anyhow::Result<Explanation> {
    let (sender, world, names, state_dir) = registry
        .lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned by an earlier panic"))?
        .explain_world(&request)?;
    let frame = explain::build_frame(&sender, &request);
    let run = explain::run_scratch(&state_dir, &world, sender.host_ifindex, &frame)
        .context("running the packet through a scratch copy of the datapath")?;
    let destination = explain::destination(&run, &world, &request, &names);
    let out = (run.frame_out.len() >= 34).then_some(&run.frame_out);
    Ok(Explanation {
        verdict: run
            .verdict
            .map_or_else(|| "none".to_owned(), |v| v.name().to_owned()),
        drop_reason: run.drop_reason.clone(),
        action: explain::action_name(run.return_code),
        destination,
        ttl_in: frame[22],
        ttl_out: out.map(|f| f[22]),
        dst_mac_out: out
            .map(|f| crate::endpoint::format_mac(&[f[0], f[1], f[2], f[3], f[4], f[5]])),
        request,
        sender,
    })
}
