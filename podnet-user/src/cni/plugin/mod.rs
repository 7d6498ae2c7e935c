//! The CNI verbs. Side effects go through two small interfaces — the pod's
//! interfaces ([`PodPlumbing`]) and the agent ([`AgentApi`]) — so the logic
//! (validation, IPAM, rollback, idempotent DEL, result shapes) is tested
//! without root.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use super::{
    config::{IpamConf, NetConf},
    env::{CniEnv, Command},
    error::{CniError, code},
    result::{CniResult, Interface, IpConfig, RouteEntry, format_mac},
    version::{self, Version},
};
pub use crate::endpoint::{HOST_IFNAME_PREFIX, host_ifname};
use crate::{
    api::{ClientError, Endpoint, NodeInfo},
    endpoint::shaper_ifname,
    failpoint::{self, FailPoint},
    ipam::{self, Holder, IpamError, Owner, PodAddresses, delegate},
    netlink::Route,
};

/// The built-in IPAM's root when neither the conf nor the agent says (see
/// [`crate::ipam::root_for`]).
pub use crate::ipam::DEFAULT_ROOT as DEFAULT_IPAM_DIR;

/// What ADD asks the plumbing to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIfSpec {
    pub netns: PathBuf,
    pub ifname: String,
    pub host_ifname: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// `gso_ipv4_max_size` and `gro_ipv4_max_size` of both veth ends
    /// (IPv4 BIG TCP); `None` leaves the kernel's defaults (64 KiB).
    pub ipv4_big_tcp_max_size: Option<u32>,
}

/// What the plumbing built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodIfCreated {
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

/// A pod interface as found (CHECK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIfState {
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(Ipv4Addr, u8)>,
    pub routes: Vec<Route>,
}

/// Creating and removing pod interfaces.
pub trait PodPlumbing {
    /// Creates the veth pair (pod end inside `spec.netns`), both ends down:
    /// nothing passes until [`PodPlumbing::activate`].
    fn create(&self, spec: &PodIfSpec) -> Result<PodIfCreated, CniError>;
    /// Brings the pair up with its addresses and routes (host route to the
    /// pod; in the pod its address, gateway neighbour and routes).
    fn activate(&self, spec: &PodIfSpec, created: &PodIfCreated) -> Result<(), CniError>;
    /// Deletes the host end (and so the pair); `Ok(false)` when absent.
    fn delete_host(&self, host_ifname: &str) -> Result<bool, CniError>;
    /// Ifindex of a host interface, if present.
    fn host_ifindex(&self, host_ifname: &str) -> Result<Option<u32>, CniError>;
    /// The pod interface `ifname` in `netns`, if present.
    fn pod_interface(&self, netns: &Path, ifname: &str) -> Result<Option<PodIfState>, CniError>;
    /// The tbf at the root of host interface `host_ifname`, if it has one.
    fn root_tbf(&self, host_ifname: &str) -> Result<Option<crate::shaping::Tbf>, CniError>;
}

/// The agent, as the plugin needs it.
pub trait AgentApi {
    fn node(&self) -> Result<NodeInfo, ClientError>;
    fn add_endpoint(&self, endpoint: &Endpoint) -> Result<(), ClientError>;
    fn remove_endpoint(&self, owner: &Owner) -> Result<(), ClientError>;
    fn get_endpoint(&self, owner: &Owner) -> Result<Option<Endpoint>, ClientError>;
    /// Removes the endpoints of `network` whose owner is not in `valid`.
    fn gc(&self, network: &str, valid: &[Owner]) -> Result<Vec<Owner>, ClientError>;
}

impl AgentApi for crate::api::Client {
    fn node(&self) -> Result<NodeInfo, ClientError> {
        self.call(&crate::api::Request::Node)
    }
    fn add_endpoint(&self, endpoint: &Endpoint) -> Result<(), ClientError> {
        self.call(&crate::api::Request::AddEndpoint {
            endpoint: endpoint.clone(),
        })
    }
    fn remove_endpoint(&self, owner: &Owner) -> Result<(), ClientError> {
        self.call::<Option<Endpoint>>(&crate::api::Request::RemoveEndpoint {
            owner: owner.clone(),
        })
        .map(|_| ())
    }
    fn get_endpoint(&self, owner: &Owner) -> Result<Option<Endpoint>, ClientError> {
        self.call(&crate::api::Request::GetEndpoint {
            owner: owner.clone(),
        })
    }
    fn gc(&self, network: &str, valid: &[Owner]) -> Result<Vec<Owner>, ClientError> {
        self.call(&crate::api::Request::Gc {
            valid: valid.to_vec(),
            network: Some(network.to_owned()),
        })
    }
}

/// What a command needs from outside.
pub struct Deps<'a> {
    pub plumbing: &'a dyn PodPlumbing,
    /// The agent behind a socket path (from the conf).
    pub agent: &'a dyn Fn(&Path) -> Box<dyn AgentApi>,
}

fn agent_error(what: &str, e: &ClientError) -> CniError {
    match e {
        ClientError::Unreachable { .. } => CniError::from_error(
            code::TRY_AGAIN_LATER,
            format!("{what}: the podnet agent is not running on this node"),
            e,
        ),
        _ => CniError::from_error(
            code::AGENT_FAILED,
            format!("{what}: the podnet agent failed"),
            e,
        ),
    }
}

fn ipam_error(e: &IpamError) -> CniError {
    match e {
        IpamError::Exhausted { .. } => CniError::new(code::ADDRESSES_EXHAUSTED, e.to_string()),
        IpamError::StoreConflict { .. } => CniError::new(code::INVALID_CONFIG, e.to_string()),
        _ => CniError::from_error(code::IO_FAILURE, "IPAM store failed", e),
    }
}

fn delegate_error(e: delegate::DelegateError) -> CniError {
    match e {
        delegate::DelegateError::Failed {
            code, msg, details, ..
        } => CniError::new(code, msg).with_details(details),
        other => CniError::from_error(code::INVALID_CONFIG, "delegated IPAM failed", &other),
    }
}

/// The built-in IPAM's addresses for this conf: under the conf's
/// `ipam.dataDir`, else the agent's root (see [`crate::ipam::root_for`]).
fn addresses(data_dir: Option<&PathBuf>, node: Option<&NodeInfo>) -> PodAddresses {
    PodAddresses::new(ipam::root_for(
        data_dir.map(PathBuf::as_path),
        node.map(|n| n.ipam_dir.as_path()),
    ))
}

/// Runs one invocation; `Ok(Some(json))` is printed on stdout.
pub fn run(env: &CniEnv, stdin: &[u8], deps: &Deps<'_>) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        let requested =
            super::config::sniff_version(stdin).unwrap_or_else(|| version::CURRENT.to_owned());
        return Ok(Some(
            json!({"cniVersion": requested, "supportedVersions": version::SUPPORTED}).to_string(),
        ));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command {
        Command::Add => add(env, &conf, deps).map(Some),
        Command::Del => del(env, &conf, deps).map(|()| None),
        Command::Check => check(env, &conf, deps).map(|()| None),
        Command::Status => status(&conf, deps).map(|()| None),
        Command::Gc => gc(env, &conf, deps).map(|()| None),
        Command::Version => unreachable!("handled above"),
    }
}

fn owner(env: &CniEnv) -> Owner {
    Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

/// The attachment as the built-in IPAM records it: with its network.
fn holder(conf: &NetConf, owner: &Owner) -> Holder {
    Holder::new(conf.name.clone(), owner.clone())
}

/// The address ADD got: from the built-in IPAM or a delegate.
struct Lease {
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
}

fn acquire(
    env: &CniEnv,
    conf: &NetConf,
    node: &NodeInfo,
    owner: &Owner,
) -> Result<Lease, CniError> {
    match &conf.ipam {
        IpamConf::BuiltIn { data_dir } => {
            // The node's address space has one store; a dataDir naming
            // another root is refused while the serving one holds addresses.
            let allocation = addresses(data_dir.as_ref(), Some(node))
                .allocate(&node.ipam_dir, node.pod_cidr, &holder(conf, owner))
                .map_err(|e| ipam_error(&e))?;
            Ok(Lease {
                ip: allocation.ip,
                gateway: allocation.gateway,
            })
        }
        IpamConf::Delegated { plugin } => {
            let out =
                delegate::exec(plugin, &env.cni_path, "ADD", &conf.raw).map_err(delegate_error)?;
            let value: Value = serde_json::from_slice(&out).map_err(|e| {
                CniError::new(
                    code::DECODE_FAILURE,
                    format!("IPAM plugin {plugin} printed no valid result"),
                )
                .with_details(e.to_string())
            })?;
            let result = CniResult::from_json(&value)?;
            let ip = result.ips.first().ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("IPAM plugin {plugin} returned no IPv4 address"),
                )
            })?;
            Ok(Lease {
                ip: ip.address.addr(),
                gateway: ip.gateway.unwrap_or(node.gateway),
            })
        }
    }
}

fn release(
    env: &CniEnv,
    conf: &NetConf,
    node: Option<&NodeInfo>,
    owner: &Owner,
) -> Result<(), CniError> {
    match &conf.ipam {
        IpamConf::BuiltIn { data_dir } => {
            addresses(data_dir.as_ref(), node)
                .release(&holder(conf, owner))
                .map_err(|e| ipam_error(&e))?;
            Ok(())
        }
        IpamConf::Delegated { plugin } => delegate::exec(plugin, &env.cni_path, "DEL", &conf.raw)
            .map(|_| ())
            .map_err(delegate_error),
    }
}

fn add(env: &CniEnv, conf: &NetConf, deps: &Deps<'_>) -> Result<String, CniError> {
    let netns = env.netns.clone().unwrap_or_default();
    if !netns.exists() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("network namespace {} does not exist", netns.display()),
        ));
    }
    let agent = (deps.agent)(&conf.agent_socket);
    let node = agent.node().map_err(|e| agent_error("ADD", &e))?;
    let owner = owner(env);
    let host_ifname = host_ifname(&owner);
    let mtu = podnet_common::node::effective_pod_mtu(conf.mtu, node.mtu);
    let lease = acquire(env, conf, &node, &owner)?;
    failpoint::hit(FailPoint::AddAfterIpam);

    // From here on, a failure undoes what was done: no leaked address, no
    // half-built interface.
    let rollback = |err: CniError| -> CniError {
        let _ = deps.plumbing.delete_host(&host_ifname);
        let _ = release(env, conf, Some(&node), &owner);
        err
    };
    let spec = PodIfSpec {
        netns: netns.clone(),
        ifname: env.ifname.clone(),
        host_ifname: host_ifname.clone(),
        ip: lease.ip,
        gateway: lease.gateway,
        mtu,
        ipv4_big_tcp_max_size: conf
            .ipv4_big_tcp
            .then_some(super::config::IPV4_BIG_TCP_MAX_SIZE),
    };
    let created = deps.plumbing.create(&spec).map_err(rollback)?;
    failpoint::hit(FailPoint::AddAfterVeth);
    let endpoint = Endpoint {
        owner: owner.clone(),
        network: conf.name.clone(),
        netns: netns.clone(),
        ip: lease.ip,
        host_ifname: host_ifname.clone(),
        host_ifindex: created.host_ifindex,
        pod_mac: created.pod_mac,
        host_mac: created.host_mac,
        bandwidth: conf.bandwidth,
        pod: env.pod.clone(),
    };
    // The agent attaches the filters and writes the datapath entry while
    // both ends are still down: the pod's link never carries a packet
    // unfiltered, even if this process dies in between.
    agent
        .add_endpoint(&endpoint)
        .map_err(|e| rollback(agent_error("ADD", &e)))?;
    failpoint::hit(FailPoint::AddAfterAgent);
    deps.plumbing.activate(&spec, &created).map_err(|err| {
        let _ = agent.remove_endpoint(&owner);
        rollback(err)
    })?;

    let mut result = match &conf.prev_result {
        Some(prev) => CniResult::from_json(prev)?,
        None => CniResult::default(),
    };
    let first = result.interfaces.len();
    result.interfaces.push(Interface {
        name: host_ifname,
        mac: format_mac(&created.host_mac),
        mtu: Some(mtu),
        sandbox: None,
    });
    result.interfaces.push(Interface {
        name: env.ifname.clone(),
        mac: format_mac(&created.pod_mac),
        mtu: Some(mtu),
        sandbox: Some(netns.display().to_string()),
    });
    result.ips.push(IpConfig {
        address: Ipv4Net::new(lease.ip, 32)
            .map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))?,
        gateway: Some(lease.gateway),
        interface: Some(first + 1),
    });
    result.routes.push(RouteEntry {
        dst: Ipv4Net::default(),
        gw: Some(lease.gateway),
    });
    Ok(result.to_json(&conf.cni_version, conf.version).to_string())
}

fn del(env: &CniEnv, conf: &NetConf, deps: &Deps<'_>) -> Result<(), CniError> {
    let owner = owner(env);
    let agent = (deps.agent)(&conf.agent_socket);
    // The agent only tells where the IPAM store is; DEL works without it.
    let node = agent
        .node()
        .ok()
        .or_else(|| crate::api::cached_node_info(&conf.agent_socket));
    // Address first: it is what a lost DEL would leak.
    release(env, conf, node.as_ref(), &owner)?;
    failpoint::hit(FailPoint::DelAfterRelease);
    deps.plumbing.delete_host(&host_ifname(&owner))?;
    failpoint::hit(FailPoint::DelAfterVeth);
    match agent.remove_endpoint(&owner) {
        // Down: it reconciles when it is back (the veth is gone by then).
        Ok(()) | Err(ClientError::Unreachable { .. }) => {}
        Err(e) => return Err(agent_error("DEL", &e)),
    }
    failpoint::hit(FailPoint::DelAfterAgent);
    Ok(())
}

fn check_failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

fn check(env: &CniEnv, conf: &NetConf, deps: &Deps<'_>) -> Result<(), CniError> {
    if conf.version < Version::V0_4_0 {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, the configuration says {}",
                conf.cni_version
            ),
        ));
    }
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let prev = CniResult::from_json(prev)?;
    let netns = env.netns.clone().unwrap_or_default();
    let owner = owner(env);
    let pod_index = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.is_some())
        .ok_or_else(|| {
            check_failed(format!(
                "prevResult has no interface {} in a sandbox",
                env.ifname
            ))
        })?;
    let state = deps
        .plumbing
        .pod_interface(&netns, &env.ifname)?
        .ok_or_else(|| {
            check_failed(format!(
                "interface {} is missing in {}",
                env.ifname,
                netns.display()
            ))
        })?;
    let expected_mac = &prev.interfaces[pod_index].mac;
    if !expected_mac.is_empty() && !expected_mac.eq_ignore_ascii_case(&format_mac(&state.mac)) {
        return Err(check_failed(format!(
            "interface {} has MAC {}, prevResult says {expected_mac}",
            env.ifname,
            format_mac(&state.mac)
        )));
    }
    for ip in prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none_or(|i| i == pod_index))
    {
        let want = (ip.address.addr(), ip.address.prefix_len());
        if !state.addresses.contains(&want) {
            return Err(check_failed(format!(
                "address {} is missing on {}",
                ip.address, env.ifname
            )));
        }
    }
    for route in &prev.routes {
        let present = state.routes.iter().any(|r| {
            r.dst == route.dst.addr()
                && r.prefix == route.dst.prefix_len()
                && (route.gw.is_none() || r.gateway == route.gw)
        });
        if !present {
            return Err(check_failed(format!(
                "route to {} via {:?} is missing in the pod",
                route.dst, route.gw
            )));
        }
    }
    let host = host_ifname(&owner);
    let host_index = deps
        .plumbing
        .host_ifindex(&host)?
        .ok_or_else(|| check_failed(format!("host interface {host} is missing")))?;
    let agent = (deps.agent)(&conf.agent_socket);
    let endpoint = agent
        .get_endpoint(&owner)
        .map_err(|e| agent_error("CHECK", &e))?
        .ok_or_else(|| {
            check_failed("the podnet agent has no endpoint for this attachment".to_owned())
        })?;
    if endpoint.host_ifindex != host_index
        || !prev.ips.iter().any(|ip| ip.address.addr() == endpoint.ip)
    {
        return Err(check_failed(format!(
            "the agent's endpoint ({} on ifindex {}) does not match the attachment",
            endpoint.ip, endpoint.host_ifindex
        )));
    }
    check_bandwidth(conf, &endpoint, deps)?;
    check_ipam(conf, agent.as_ref(), &owner, &prev)
}

/// CHECK of the bandwidth limits: the agent's endpoint has the limits of
/// the configuration, and each is a tbf in the kernel with the rate,
/// bucket and queue they make (the host veth's root for ingress, the
/// shaper's for egress).
fn check_bandwidth(conf: &NetConf, endpoint: &Endpoint, deps: &Deps<'_>) -> Result<(), CniError> {
    let wanted = conf.bandwidth.unwrap_or_default();
    let has = endpoint.bandwidth.unwrap_or_default();
    if wanted != has {
        return Err(check_failed(format!(
            "bandwidth limits: the configuration says {wanted}, the endpoint has {has}"
        )));
    }
    for (direction, device, tbf) in
        wanted.placements(&endpoint.host_ifname, &shaper_ifname(&endpoint.host_ifname))
    {
        let found = deps.plumbing.root_tbf(&device)?;
        if found != Some(tbf) {
            return Err(check_failed(format!(
                "{direction} limit: {device} should have {tbf:?} at its root, has {found:?}"
            )));
        }
    }
    Ok(())
}

/// CHECK of the built-in IPAM: this network's record of this attachment
/// holds one of prevResult's addresses (the store is the node's: another
/// network's record of the container is not it).
fn check_ipam(
    conf: &NetConf,
    agent: &dyn AgentApi,
    owner: &Owner,
    prev: &CniResult,
) -> Result<(), CniError> {
    let IpamConf::BuiltIn { data_dir } = &conf.ipam else {
        return Ok(());
    };
    let node = agent.node().map_err(|e| agent_error("CHECK", &e))?;
    let addresses = addresses(data_dir.as_ref(), Some(&node));
    let holder = holder(conf, owner);
    match addresses.find(&holder).map_err(|e| ipam_error(&e))? {
        None => Err(check_failed(format!(
            "the IPAM store under {} holds no address for {holder}",
            addresses.root().display()
        ))),
        Some(r) if !prev.ips.iter().any(|ip| ip.address.addr() == r.ip) => {
            Err(check_failed(format!(
                "IPAM holds {} for {holder}, which prevResult does not list",
                r.ip
            )))
        }
        Some(_) => Ok(()),
    }
}

fn status(conf: &NetConf, deps: &Deps<'_>) -> Result<(), CniError> {
    if conf.version < Version::V1_1_0 {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "STATUS needs cniVersion 1.1.0, the configuration says {}",
                conf.cni_version
            ),
        ));
    }
    let agent = (deps.agent)(&conf.agent_socket);
    match agent.node() {
        Ok(node) if node.pod_cidr.prefix_len() <= 30 => Ok(()),
        Ok(node) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("node pod CIDR {} is unusable", node.pod_cidr),
        )),
        Err(e) => Err(CniError::from_error(
            code::NOT_AVAILABLE,
            "the podnet agent is not available on this node",
            &e,
        )),
    }
}

fn gc(env: &CniEnv, conf: &NetConf, deps: &Deps<'_>) -> Result<(), CniError> {
    if conf.version < Version::V1_1_0 {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "GC needs cniVersion 1.1.0, the configuration says {}",
                conf.cni_version
            ),
        ));
    }
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let agent = (deps.agent)(&conf.agent_socket);
    let node = agent
        .node()
        .ok()
        .or_else(|| crate::api::cached_node_info(&conf.agent_socket));
    let mut stale: Vec<Owner> = Vec::new();
    match &conf.ipam {
        IpamConf::BuiltIn { data_dir } => {
            // Only this network's records: the store is the node's.
            let released = addresses(data_dir.as_ref(), node.as_ref())
                .release_stale(&conf.name, &valid)
                .map_err(|e| ipam_error(&e))?;
            stale.extend(released.into_iter().map(|r| r.holder.owner));
        }
        IpamConf::Delegated { plugin } => {
            delegate::exec(plugin, &env.cni_path, "GC", &conf.raw).map_err(delegate_error)?;
        }
    }
    match agent.gc(&conf.name, &valid) {
        Ok(removed) => stale.extend(removed),
        Err(ClientError::Unreachable { .. }) => {}
        Err(e) => return Err(agent_error("GC", &e)),
    }
    for owner in stale {
        deps.plumbing.delete_host(&host_ifname(&owner))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
