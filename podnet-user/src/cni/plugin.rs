//! The CNI verbs. Side effects go through two small interfaces — the pod's
//! interfaces ([`PodPlumbing`]) and the agent ([`AgentApi`]) — so the logic
//! (validation, IPAM, rollback, idempotent DEL, result shapes) is tested
//! without root.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{
    config::{IpamConf, NetConf},
    env::{CniEnv, Command},
    error::{CniError, code},
    result::{CniResult, Interface, IpConfig, RouteEntry, format_mac},
    version::{self, Version},
};
use crate::{
    api::{ClientError, Endpoint, NodeInfo},
    failpoint::{self, FailPoint},
    ipam::{self, Allocator, FileStore, Holder, IpamError, Owner, PodRange, delegate},
    netlink::Route,
};

/// The built-in IPAM's root when neither the conf nor the agent says (the
/// agent's default state dir + `/ipam`). The node's store is
/// `<root>/_node`, shared by every network (see [`crate::ipam::FileStore`]).
pub const DEFAULT_IPAM_DIR: &str = "/var/lib/podnet/ipam";

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

/// What every host veth name podnet makes starts with.
pub const HOST_IFNAME_PREFIX: &str = "pn";

/// Host-side veth name: stable for (container ID, ifname), 15 bytes.
#[must_use]
pub fn host_ifname(owner: &Owner) -> String {
    let digest = Sha256::new()
        .chain_update(owner.container_id.as_bytes())
        .chain_update([0u8])
        .chain_update(owner.ifname.as_bytes())
        .finalize();
    let mut name = String::from(HOST_IFNAME_PREFIX);
    for byte in digest.iter().take(7) {
        let _ = write!(name, "{byte:02x}");
    }
    name.truncate(15);
    name
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

/// The built-in IPAM's root: the conf's `ipam.dataDir`, else the agent's.
/// One store per root serves every network (no per-network directory).
fn ipam_root(data_dir: Option<&PathBuf>, node: Option<&NodeInfo>) -> PathBuf {
    data_dir
        .cloned()
        .or_else(|| node.map(|n| n.ipam_dir.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_IPAM_DIR))
}

fn store(root: &Path) -> Result<FileStore, CniError> {
    FileStore::open(root).map_err(|e| ipam_error(&e))
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
            let range = PodRange::new(node.pod_cidr).map_err(|e| ipam_error(&e))?;
            // The node's address space has one store; a dataDir naming
            // another root is refused while the serving one holds addresses.
            let home = store(&node.ipam_dir)?;
            let node_store = store(&ipam_root(data_dir.as_ref(), Some(node)))?
                .claim_node(&home, range)
                .map_err(|e| ipam_error(&e))?;
            let allocation = Allocator::new(range, node_store)
                .allocate(&holder(conf, owner))
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
            let root = ipam_root(data_dir.as_ref(), node);
            if !root.exists() {
                return Ok(());
            }
            ipam::release_holder(&store(&root)?, &holder(conf, owner))
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
    let mtu = conf.mtu.unwrap_or(node.mtu);
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
    for (direction, device, tbf) in wanted.placements(&endpoint.host_ifname) {
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
    let root = ipam_root(data_dir.as_ref(), Some(&node));
    let holder = holder(conf, owner);
    match ipam::reservation_of(&store(&root)?, &holder).map_err(|e| ipam_error(&e))? {
        None => Err(check_failed(format!(
            "the IPAM store under {} holds no address for {holder}",
            root.display()
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
            let root = ipam_root(data_dir.as_ref(), node.as_ref());
            if root.exists() {
                let released = ipam::release_stale(&store(&root)?, &conf.name, &valid)
                    .map_err(|e| ipam_error(&e))?;
                stale.extend(released.into_iter().map(|r| r.holder.owner));
            }
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
mod tests {
    //! The verbs over fake plumbing and a fake agent: what the built-in
    //! IPAM does for two networks on one node, without root.

    use std::{cell::RefCell, collections::BTreeMap, rc::Rc};

    use super::*;

    #[derive(Default)]
    struct Fakes {
        /// host ifname -> ifindex
        host: BTreeMap<String, u32>,
        /// (netns, ifname) -> pod interface
        pods: BTreeMap<(PathBuf, String), PodIfState>,
        /// owner -> endpoint
        endpoints: BTreeMap<Owner, Endpoint>,
        next_index: u32,
        /// The networks the agent was asked to GC.
        gc_calls: Vec<String>,
    }

    #[derive(Clone, Default)]
    struct Node(Rc<RefCell<Fakes>>, PathBuf);

    impl PodPlumbing for Node {
        fn create(&self, spec: &PodIfSpec) -> Result<PodIfCreated, CniError> {
            let mut f = self.0.borrow_mut();
            f.next_index += 1;
            let index = f.next_index;
            let mac = [2, 0, 0, 0, 0, u8::try_from(index).expect("few")];
            f.host.insert(spec.host_ifname.clone(), index);
            f.pods.insert(
                (spec.netns.clone(), spec.ifname.clone()),
                PodIfState {
                    mac,
                    mtu: spec.mtu,
                    addresses: vec![(spec.ip, 32)],
                    routes: vec![Route {
                        dst: Ipv4Addr::UNSPECIFIED,
                        prefix: 0,
                        gateway: Some(spec.gateway),
                        oif: 2,
                    }],
                },
            );
            Ok(PodIfCreated {
                host_ifindex: index,
                host_mac: [2, 0, 0, 0, 1, mac[5]],
                pod_mac: mac,
            })
        }
        fn activate(&self, _: &PodIfSpec, _: &PodIfCreated) -> Result<(), CniError> {
            Ok(())
        }
        fn delete_host(&self, host_ifname: &str) -> Result<bool, CniError> {
            Ok(self.0.borrow_mut().host.remove(host_ifname).is_some())
        }
        fn host_ifindex(&self, host_ifname: &str) -> Result<Option<u32>, CniError> {
            Ok(self.0.borrow().host.get(host_ifname).copied())
        }
        fn root_tbf(&self, _: &str) -> Result<Option<crate::shaping::Tbf>, CniError> {
            Ok(None)
        }
        fn pod_interface(
            &self,
            netns: &Path,
            ifname: &str,
        ) -> Result<Option<PodIfState>, CniError> {
            Ok(self
                .0
                .borrow()
                .pods
                .get(&(netns.to_owned(), ifname.to_owned()))
                .cloned())
        }
    }

    impl AgentApi for Node {
        fn node(&self) -> Result<NodeInfo, ClientError> {
            Ok(NodeInfo {
                node_name: "n1".into(),
                pod_cidr: "10.244.20.0/24".parse().expect("cidr"),
                cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
                gateway: Ipv4Addr::new(10, 244, 20, 1),
                mtu: 1450,
                ipam_dir: self.1.join("agent-ipam"),
            })
        }
        fn add_endpoint(&self, endpoint: &Endpoint) -> Result<(), ClientError> {
            let mut f = self.0.borrow_mut();
            f.endpoints.insert(endpoint.owner.clone(), endpoint.clone());
            Ok(())
        }
        fn remove_endpoint(&self, owner: &Owner) -> Result<(), ClientError> {
            self.0.borrow_mut().endpoints.remove(owner);
            Ok(())
        }
        fn get_endpoint(&self, owner: &Owner) -> Result<Option<Endpoint>, ClientError> {
            Ok(self.0.borrow().endpoints.get(owner).cloned())
        }
        fn gc(&self, network: &str, valid: &[Owner]) -> Result<Vec<Owner>, ClientError> {
            let mut f = self.0.borrow_mut();
            f.gc_calls.push(network.to_owned());
            let stale: Vec<Owner> = f
                .endpoints
                .values()
                .filter(|e| e.network == network && !valid.contains(&e.owner))
                .map(|e| e.owner.clone())
                .collect();
            for o in &stale {
                f.endpoints.remove(o);
            }
            Ok(stale)
        }
    }

    struct Harness {
        node: Node,
        dir: PathBuf,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Harness {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("podnet-plugin-test-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("netns")).expect("temp dir");
            Self {
                node: Node(Rc::default(), dir.clone()),
                dir,
            }
        }

        fn conf(network: &str, extra: &Value) -> Value {
            let mut conf = json!({"cniVersion": "1.1.0", "name": network, "type": "podnet"});
            if let (Some(obj), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
                obj.extend(extra.clone());
            }
            conf
        }

        fn run(
            &self,
            command: Command,
            container: &str,
            ifname: &str,
            conf: &Value,
        ) -> Result<Option<String>, CniError> {
            let env = CniEnv {
                command,
                container_id: container.into(),
                // The fakes never enter it; ADD only checks it exists.
                netns: Some(self.dir.join("netns")),
                ifname: ifname.into(),
                cni_path: String::new(),
            };
            let plumbing = self.node.clone();
            let agent_node = self.node.clone();
            let agent = move |_: &Path| -> Box<dyn AgentApi> { Box::new(agent_node.clone()) };
            let deps = Deps {
                plumbing: &plumbing,
                agent: &agent,
            };
            run(&env, conf.to_string().as_bytes(), &deps)
        }

        /// ADD; the result and the address.
        fn add(&self, network: &str, container: &str, ifname: &str) -> (Value, Ipv4Addr) {
            let out = self
                .run(
                    Command::Add,
                    container,
                    ifname,
                    &Harness::conf(network, &Value::Null),
                )
                .unwrap_or_else(|e| panic!("ADD {container} in {network}: {e}"))
                .expect("a result");
            let result: Value = serde_json::from_str(&out).expect("JSON");
            let ip = result["ips"][0]["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .expect("an address");
            (result, ip)
        }

        fn check(
            &self,
            network: &str,
            container: &str,
            ifname: &str,
            prev: &Value,
        ) -> Result<(), CniError> {
            let mut conf = Harness::conf(network, &Value::Null);
            conf["prevResult"] = prev.clone();
            self.run(Command::Check, container, ifname, &conf)
                .map(|_| ())
        }

        /// The node store's reservations of `network`.
        fn held(&self, network: &str) -> Vec<Ipv4Addr> {
            let store = FileStore::open(&self.dir.join("agent-ipam")).expect("store");
            let alloc = Allocator::new(
                PodRange::new("10.244.20.0/24".parse().expect("cidr")).expect("range"),
                store,
            );
            alloc
                .reservations()
                .expect("reservations")
                .into_iter()
                .filter(|r| r.holder.network == network)
                .map(|r| r.ip)
                .collect()
        }
    }

    #[test]
    fn two_networks_on_one_node_share_the_address_space() {
        let h = Harness::new("two-nets");
        let mut seen = std::collections::HashSet::new();
        for n in 0..20 {
            let network = if n % 2 == 0 { "net-a" } else { "net-b" };
            let (_, ip) = h.add(network, &format!("pod{n}"), "eth0");
            assert!(seen.insert(ip), "{ip} handed out twice");
        }
        // One container in both networks: two attachments, two addresses,
        // both endpoints stay with the agent.
        let (res_a, ip_a) = h.add("net-a", "multi", "eth0");
        let (res_b, ip_b) = h.add("net-b", "multi", "net1");
        assert_ne!(ip_a, ip_b);
        assert!(!seen.contains(&ip_a) && !seen.contains(&ip_b));
        assert_eq!(h.node.0.borrow().endpoints.len(), 22);

        // CHECK finds each network's own record.
        h.check("net-a", "multi", "eth0", &res_a)
            .expect("CHECK in net-a");
        h.check("net-b", "multi", "net1", &res_b)
            .expect("CHECK in net-b");
        // net-a holds nothing for multi/net1, whatever prevResult says.
        let err = h
            .check("net-a", "multi", "net1", &res_b)
            .expect_err("not net-a's attachment");
        assert_eq!(err.code, code::CHECK_FAILED);
        assert!(
            err.msg
                .contains("holds no address for multi/net1 in network net-a"),
            "{err}"
        );

        // DEL in net-a releases net-a's address only.
        let b_before = h.held("net-b");
        h.run(
            Command::Del,
            "multi",
            "eth0",
            &Harness::conf("net-a", &Value::Null),
        )
        .expect("DEL in net-a");
        assert!(!h.held("net-a").contains(&ip_a));
        assert_eq!(h.held("net-b"), b_before);
        // A DEL in net-b naming net-a's attachment (wrong conf) releases
        // nothing of net-b's.
        h.run(
            Command::Del,
            "multi",
            "eth0",
            &Harness::conf("net-b", &Value::Null),
        )
        .expect("DEL is idempotent");
        assert_eq!(h.held("net-b"), b_before);

        // GC of net-a: net-a's stale records go, net-b keeps all of its.
        let mut gc = Harness::conf("net-a", &Value::Null);
        gc["cni.dev/valid-attachments"] = json!([{"containerID": "pod0", "ifname": "eth0"}]);
        h.run(Command::Gc, "", "", &gc).expect("GC");
        assert_eq!(h.held("net-a").len(), 1, "only pod0 kept in net-a");
        assert_eq!(h.held("net-b"), b_before, "GC of net-a keeps net-b");
        assert_eq!(h.node.0.borrow().gc_calls, vec!["net-a".to_owned()]);
        h.check("net-b", "multi", "net1", &res_b)
            .expect("net-b's attachment is intact");
    }

    #[test]
    fn a_data_dir_beside_the_serving_store_is_refused_with_a_config_error() {
        let h = Harness::new("data-dir");
        h.add("net-a", "pod1", "eth0");
        let other = h.dir.join("other-ipam");
        let conf = Harness::conf(
            "net-c",
            &json!({"ipam": {"type": "podnet", "dataDir": other}}),
        );
        let err = h
            .run(Command::Add, "pod2", "eth0", &conf)
            .expect_err("a second store for the node's pod CIDR");
        assert_eq!(err.code, code::INVALID_CONFIG, "{err}");
        assert!(
            err.msg.contains("10.244.20.0/24") && err.msg.contains("ipam.dataDir"),
            "{err}"
        );
        assert_eq!(
            h.node.0.borrow().host.len(),
            1,
            "nothing was built for pod2"
        );
        // The same dataDir as the agent's root is the same store.
        let same = Harness::conf(
            "net-c",
            &json!({"ipam": {"type": "podnet", "dataDir": h.dir.join("agent-ipam")}}),
        );
        h.run(Command::Add, "pod2", "eth0", &same)
            .expect("same store");
        assert_eq!(h.held("net-c").len(), 1);
    }
}
