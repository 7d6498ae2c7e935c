//! The agent's side of `podnetctl explain` (see [`crate::explain`]): the
//! live state the packet's path reads is copied under the registry's lock
//! (point lookups: the two stack-flow keys of the packet, never a walk of
//! the table); the scratch datapath is loaded and run after it is
//! released, so CNI operations never wait for a verifier. Loading one
//! costs a verifier run and a bpffs mount: at most [`SCRATCH_LOADS`] run
//! at once, and a request that cannot start within [`SCRATCH_WAIT`] is
//! told the agent is busy.

use std::{sync::Mutex, time::Duration};

use anyhow::Context as _;

use podnet_common::node::NODE_F_SERVICES_BPF;

use super::Agent;
use crate::{
    explain::{
        self, ExplainRequest, Explanation, Names, Proto, Sender, ServiceTranslation, ServiceWorld,
        World,
    },
    services::Frontend,
};

/// What the agent's lock yields for one explanation: the sender, the live
/// state its packet meets, names for it, the Service translation it meets
/// (if any) and where a scratch bpffs may go.
type ExplainWorld = (
    Sender,
    World,
    Names,
    Option<ServiceTranslation>,
    std::path::PathBuf,
);

/// Scratch datapaths loaded at once, at most.
pub const SCRATCH_LOADS: usize = 1;
/// How long an explain request waits for its turn before it is refused.
pub const SCRATCH_WAIT: Duration = Duration::from_secs(10);

static SCRATCH: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SCRATCH_LOADS);

/// A turn to load a scratch datapath, waiting up to `wait` for one; held
/// until the explanation is done.
pub async fn scratch_turn(wait: Duration) -> anyhow::Result<tokio::sync::SemaphorePermit<'static>> {
    turn(&SCRATCH, wait).await
}

async fn turn(
    gate: &tokio::sync::Semaphore,
    wait: Duration,
) -> anyhow::Result<tokio::sync::SemaphorePermit<'_>> {
    match tokio::time::timeout(wait, gate.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) => anyhow::bail!("the agent is shutting down"),
        Err(_) => anyhow::bail!(
            "busy: {SCRATCH_LOADS} explain request(s) already loading a scratch datapath for {} s; try again",
            wait.as_secs()
        ),
    }
}

impl Agent {
    /// The sender, the live state its packet meets, and names for it.
    fn explain_world(&mut self, request: &ExplainRequest) -> anyhow::Result<ExplainWorld> {
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
        let (service, translation) = self.explain_service(request)?;
        // A frontend's packet goes where its backend is.
        let to = service
            .as_ref()
            .and_then(|s| s.backend)
            .map_or(request.to, |b| b.address);
        let datapath = self.datapath_mut();
        let remotes = datapath
            .remotes()?
            .into_iter()
            .filter(|r| r.cidr.contains(&to))
            .map(|r| (r.cidr, r.node_ip, r.node_address))
            .collect();
        // Looked up, not walked: the table holds up to MAX_STACK_FLOWS
        // entries and this runs under the agent's lock, which every CNI
        // operation takes.
        let mut flows = Vec::new();
        for key in keys {
            if let Some(flow) = datapath.stack_flow(&key)? {
                flows.push((key, flow));
            }
        }
        let world = World {
            config: datapath.config()?,
            sender_veth: datapath.veth(endpoint.host_ifindex)?,
            sender_entry: datapath.endpoint(endpoint.ip)?,
            to,
            destination: datapath.endpoint(to)?,
            remotes,
            flows,
            service,
        };
        let names = Names {
            destination_container: self
                .endpoints
                .values()
                .find(|e| e.ip == to)
                .map(|e| e.owner.container_id.clone()),
            nodes: self
                .remote_nodes()
                .into_iter()
                .map(|n| (n.node_ip, n.name))
                .collect(),
        };
        Ok((
            sender,
            world,
            names,
            translation,
            self.config().state_dir.clone(),
        ))
    }

    /// The Service frontend `request` is addressed to, when the datapath
    /// translates Services (`--services bpf`) and the node's map has one:
    /// what the scratch run needs of it and what the answer says.
    fn explain_service(
        &mut self,
        request: &ExplainRequest,
    ) -> anyhow::Result<(Option<ServiceWorld>, Option<ServiceTranslation>)> {
        let protocol = request.proto.number();
        let Some(port) = request.port.or(match request.proto {
            Proto::Tcp => Some(80),
            Proto::Udp => Some(53),
            Proto::Icmp => None,
        }) else {
            return Ok((None, None));
        };
        let frontend = Frontend {
            address: request.to,
            port,
            protocol,
        };
        let plan = self.cluster_objects().and_then(|objects| {
            objects
                .services()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .plan
                .clone()
        });
        let datapath = self.datapath_mut();
        if datapath.config()?.flags & NODE_F_SERVICES_BPF == 0 {
            return Ok((None, None));
        }
        let Some(entry) = datapath.service_frontend(frontend)? else {
            return Ok((None, None));
        };
        let mut backends = Vec::new();
        for slot in 1..=entry.backends {
            if let Some(backend) = datapath.service_backend(entry.id, slot)? {
                backends.push(backend);
            }
        }
        let translation = ServiceTranslation {
            service: plan
                .as_ref()
                .and_then(|p| p.frontends.get(&frontend))
                .map(|f| f.service.to_string()),
            frontend: frontend.to_string(),
            backend: backends.first().map(ToString::to_string),
            backends: backends.iter().map(ToString::to_string).collect(),
        };
        let world = ServiceWorld {
            frontend,
            entry,
            backend: backends.first().copied(),
        };
        Ok((Some(world), Some(translation)))
    }
}

/// Explains `request` (see [`crate::explain`]).
pub fn explain(registry: &Mutex<Agent>, request: ExplainRequest) -> anyhow::Result<Explanation> {
    let (sender, world, names, service, state_dir) = registry
        .lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned by an earlier panic"))?
        .explain_world(&request)?;
    let frame = explain::build_frame(&sender, &request);
    let run = explain::run_scratch(&state_dir, &world, sender.host_ifindex, &frame)
        .context("running the packet through a scratch copy of the datapath")?;
    let destination = explain::destination(&run, &world, &names);
    // Policy judges the backend, after the translation.
    let judged = match world.service.as_ref().and_then(|s| s.backend) {
        Some(backend) => ExplainRequest {
            to: backend.address,
            port: Some(backend.port),
            ..request.clone()
        },
        None => request.clone(),
    };
    let policy = policy_verdicts(registry, &judged, &sender);
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
        policy,
        service,
        request,
        sender,
    })
}

/// NetworkPolicy's verdict on the explained connection, from the cluster
/// objects (`None` without them).
fn policy_verdicts(
    registry: &Mutex<Agent>,
    request: &ExplainRequest,
    sender: &Sender,
) -> Option<crate::explain::PolicyVerdicts> {
    use crate::{
        explain::{PolicySide, PolicyVerdicts},
        policy::{Direction, Evaluation, LocalEndpoint, PolicyInput, evaluate},
    };
    let (objects, sender_pod) = {
        let agent = registry.lock().ok()?;
        let objects = agent.cluster_objects()?.view();
        let pod = agent
            .endpoints
            .values()
            .find(|e| e.ip == sender.ip)
            .and_then(|e| e.pod.clone());
        (objects, pod)
    };
    let view = objects.lock().ok()?;
    let hosts = super::policy::host_addresses();
    let input = PolicyInput {
        model: view.model(),
        pods: view.pod_records().collect(),
        local: &[],
        host_addresses: &hosts,
    };
    let (protocol, port) = (request.proto.number(), request.port.unwrap_or(0));
    let egress = match &sender_pod {
        Some(pod) => PolicySide {
            pod: Some(format!("{}/{}", pod.namespace, pod.name)),
            evaluation: evaluate(
                &input,
                &LocalEndpoint {
                    ip: sender.ip,
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                },
                Direction::Egress,
                request.to,
                protocol,
                port,
            ),
        },
        None => PolicySide {
            pod: None,
            evaluation: Evaluation::NotSelected,
        },
    };
    let ingress = view.pods_at(request.to, |_| true).next().map(|receiver| {
        let source = request.forged_source.unwrap_or(sender.ip);
        PolicySide {
            pod: Some(format!("{}/{}", receiver.namespace, receiver.name)),
            evaluation: evaluate(
                &input,
                &LocalEndpoint {
                    ip: receiver.ip,
                    namespace: receiver.namespace.clone(),
                    name: receiver.name.clone(),
                },
                Direction::Ingress,
                source,
                protocol,
                port,
            ),
        }
    });
    Some(PolicyVerdicts { egress, ingress })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_explain_waits_then_is_told_the_agent_is_busy() {
        let gate = tokio::sync::Semaphore::new(SCRATCH_LOADS);
        let first = turn(&gate, Duration::from_millis(10))
            .await
            .expect("the first turn");
        let busy = turn(&gate, Duration::from_millis(50))
            .await
            .expect_err("no second load at once");
        assert!(busy.to_string().starts_with("busy:"), "{busy}");
        drop(first);
        let _again = turn(&gate, Duration::from_millis(10))
            .await
            .expect("a turn once the first is done");
    }
}
