//! The cluster's Services and EndpointSlices into a [`ServicePlan`] (the
//! rules are in the module doc of [`super`]).

use std::{collections::BTreeSet, net::Ipv4Addr};

use super::{BackendAddress, Frontend, FrontendPlan, ServiceName, ServicePlan};
use crate::model::cluster::{
    ClusterModel,
    types::{Endpoint, EndpointSlice, Service, ServicePort, ServiceSpec},
};

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent (the API
/// server's default: three hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// The plan for node `node` (its name, as EndpointSlices' `nodeName` give
/// it: for the traffic policies' `Local`) whose address is `node_ip` (its
/// NodePorts' frontends; none without one).
#[must_use]
pub fn compile(model: &ClusterModel, node: &str, node_ip: Option<Ipv4Addr>) -> ServicePlan {
    let mut plan = ServicePlan::default();
    let slices_by_service = model.endpoint_slices_by_service();
    for service in model.services(None) {
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        let Some(address) = cluster_ipv4(spec) else {
            continue;
        };
        let name = ServiceName {
            namespace: service
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| crate::model::cluster::DEFAULT_NAMESPACE.to_owned()),
            name: service.metadata.name.clone().unwrap_or_default(),
        };
        let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local_only = spec.external_traffic_policy.as_deref() == Some("Local");
        let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let slices: Vec<&EndpointSlice> = slices_by_service
            .get(&(name.namespace.as_str(), name.name.as_str()))
            .into_iter()
            .flatten()
            .copied()
            .filter(|s| s.address_type == "IPv4")
            .collect();
        for port in spec.ports.iter().flatten() {
            let (Some(protocol), Ok(number)) = (
                protocol_number(port.protocol.as_deref()),
                u16::try_from(port.port),
            ) else {
                continue;
            };
            if number == 0 {
                continue;
            }
            let frontend = Frontend {
                address,
                port: number,
                protocol,
            };
            let frontend_plan = |only_node: Option<&str>, node_port: bool| FrontendPlan {
                service: name.clone(),
                port_name: port.name.clone().unwrap_or_default(),
                backends: backends(&slices, port, protocol, only_node),
                affinity_timeout_s: affinity_timeout(service),
                node_port,
            };
            if !claim(&mut plan, frontend, &name, || {
                frontend_plan(local_only.then_some(node), false)
            }) {
                continue;
            }
            // The NodePort: a frontend of this node's address, whose
            // backends `externalTrafficPolicy` chooses (`Local`: this
            // node's only, so the client's address is kept; none leaves
            // the node refusing it, as kube-proxy's rules do).
            let (Some(node_ip), true) = (node_ip, node_ports) else {
                continue;
            };
            let Some(node_port) = port
                .node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p != 0)
            else {
                continue;
            };
            let frontend = Frontend {
                address: node_ip,
                port: node_port,
                protocol,
            };
            claim(&mut plan, frontend, &name, || {
                frontend_plan(external_local_only.then_some(node), true)
            });
        }
    }
    plan
}

/// Gives `frontend` to Service `name` (its plan made by `make`) unless
/// another Service holds it already, which is then a conflict; `false`
/// for a conflict.
fn claim(
    plan: &mut ServicePlan,
    frontend: Frontend,
    name: &ServiceName,
    make: impl FnOnce() -> FrontendPlan,
) -> bool {
    if let Some(holder) = plan.frontends.get(&frontend) {
        plan.conflicts
            .push(format!("{name} {frontend} (held by {})", holder.service));
        return false;
    }
    plan.frontends.insert(frontend, make());
    true
}

/// The Service's IPv4 ClusterIP: from `clusterIPs` (a dual-stack Service
/// may list its IPv6 one first), else `clusterIP`; `None` for a headless
/// Service or one without.
fn cluster_ipv4(spec: &ServiceSpec) -> Option<Ipv4Addr> {
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    spec.cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_unspecified())
}

/// A Service or slice port's protocol number (`TCP` when absent); `None`
/// for a protocol the datapath does not translate.
fn protocol_number(name: Option<&str>) -> Option<u8> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(crate::policy::TCP),
        "UDP" => Some(crate::policy::UDP),
        "SCTP" => Some(crate::policy::SCTP),
        _ => None,
    }
}

fn affinity_timeout(service: &Service) -> u32 {
    let Some(spec) = &service.spec else { return 0 };
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return 0;
    }
    spec.session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
}

fn ready(endpoint: &Endpoint) -> bool {
    endpoint
        .conditions
        .as_ref()
        .and_then(|c| c.ready)
        .unwrap_or(true)
}

fn serving_terminating(endpoint: &Endpoint) -> bool {
    let conditions = endpoint.conditions.as_ref();
    conditions.and_then(|c| c.serving).unwrap_or(true)
        && conditions.and_then(|c| c.terminating).unwrap_or(false)
}

/// The backends of one Service port: the slices' endpoints at the port of
/// the same name and protocol, chosen as kube-proxy chooses them.
fn backends(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    protocol: u8,
    only_node: Option<&str>,
) -> Vec<BackendAddress> {
    let port_name = port.name.as_deref().unwrap_or_default();
    let mut candidates: Vec<(&Endpoint, BackendAddress)> = Vec::new();
    for slice in slices {
        let Some(number) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or_default() == port_name
                    && protocol_number(p.protocol.as_deref()) == Some(protocol)
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            if only_node.is_some_and(|node| endpoint.node_name.as_deref() != Some(node)) {
                continue;
            }
            let Some(address) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            candidates.push((
                endpoint,
                BackendAddress {
                    address,
                    port: number,
                },
            ));
        }
    }
    let chosen: BTreeSet<BackendAddress> = if candidates.iter().any(|(e, _)| ready(e)) {
        candidates
            .iter()
            .filter(|(e, _)| ready(e))
            .map(|&(_, b)| b)
            .collect()
    } else {
        candidates
            .iter()
            .filter(|(e, _)| serving_terminating(e))
            .map(|&(_, b)| b)
            .collect()
    };
    chosen.into_iter().collect()
}
