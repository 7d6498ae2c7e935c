//! The datapath's state maps: local endpoints, per-veth entries, the node
//! config, the remote trie and the stack flows.

use std::net::Ipv4Addr;

use aya::maps::{
    Array, HashMap, MapData, PerCpuHashMap,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use ipnet::Ipv4Net;
use podnet_common::{
    EndpointInfo, EndpointStats, EventLimiter, FlowKey, FlowOwner, NodeConfig, RemoteNode,
    StackFlow, VethEndpoint, endpoint::ENDPOINT_F_POLICY, names, node::REMOTE_NODE_ADDRESS,
};

use super::{Datapath, DatapathError, ip_key, map_err, removed};

/// An entry of the remote trie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteEntry {
    pub cidr: Ipv4Net,
    pub node_ip: Ipv4Addr,
    /// The node's own address rather than its pod CIDR.
    pub node_address: bool,
}

impl Datapath {
    fn endpoints_map(&mut self) -> Result<HashMap<&mut MapData, u32, EndpointInfo>, DatapathError> {
        let name = names::MAP_ENDPOINTS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        HashMap::try_from(map).map_err(map_err(name, "opening as hash map"))
    }

    /// Adds or replaces a local endpoint, and the entry of its host veth
    /// (who may send there, zeroed counters) that `from_pod` checks and
    /// counts in. The counters of a veth whose identity is unchanged are
    /// kept (an agent restart re-adds every endpoint).
    pub fn upsert_endpoint(
        &mut self,
        ip: Ipv4Addr,
        info: EndpointInfo,
    ) -> Result<(), DatapathError> {
        self.upsert_shaped_endpoint(ip, info, 0)
    }

    /// [`Self::upsert_endpoint`] for a pod whose egress is shaped by the
    /// ifb device `egress_shaper_ifindex` (0: not shaped).
    ///
    /// The endpoint's `ENDPOINT_F_POLICY_*` bits are the policy sync's: an
    /// entry rewritten for the same pod (an agent restart re-adds every
    /// endpoint) keeps the ones it has, so a selected pod is never open
    /// between the rewrite and the next sync.
    pub fn upsert_shaped_endpoint(
        &mut self,
        ip: Ipv4Addr,
        info: EndpointInfo,
        egress_shaper_ifindex: u32,
    ) -> Result<(), DatapathError> {
        let policy_flags = match self.endpoint(ip)? {
            Some(existing) if existing.host_ifindex == info.host_ifindex => {
                existing.flags & ENDPOINT_F_POLICY
            }
            _ => 0,
        };
        let info = EndpointInfo {
            flags: (info.flags & !ENDPOINT_F_POLICY) | policy_flags,
            ..info
        };
        self.upsert_endpoint_entry(ip, info)?;
        let identity = VethEndpoint {
            pod_ip: ip_key(ip),
            pod_mac: info.pod_mac,
            host_mac: info.host_mac,
            stats: EndpointStats::default(),
            egress_shaper_ifindex,
            policy_flags,
            events: EventLimiter::default(),
        };
        let name = names::MAP_VETHS;
        let mut veths = self.veths_map()?;
        let unchanged = veths.get(&info.host_ifindex, 0).is_ok_and(|per_cpu| {
            per_cpu.iter().all(|v| {
                VethEndpoint {
                    stats: EndpointStats::default(),
                    events: EventLimiter::default(),
                    ..*v
                } == identity
            })
        });
        if !unchanged {
            let cpus = aya::util::nr_cpus()
                .map_err(|(_, source)| DatapathError::PossibleCpus { source })?;
            let values = aya::maps::PerCpuValues::try_from(vec![identity; cpus])
                .map_err(|source| DatapathError::PossibleCpus { source })?;
            veths.insert(info.host_ifindex, values, 0).map_err(map_err(
                name,
                format!("creating the entry of ifindex {}", info.host_ifindex),
            ))?;
        }
        Ok(())
    }

    /// Writes the endpoint entry of `ip` as it is.
    pub(super) fn upsert_endpoint_entry(
        &mut self,
        ip: Ipv4Addr,
        info: EndpointInfo,
    ) -> Result<(), DatapathError> {
        self.endpoints_map()?
            .insert(ip_key(ip), info, 0)
            .map_err(map_err(names::MAP_ENDPOINTS, format!("inserting {ip}")))
    }

    /// The local endpoint for `ip`, if any.
    pub fn endpoint(&mut self, ip: Ipv4Addr) -> Result<Option<EndpointInfo>, DatapathError> {
        match self.endpoints_map()?.get(&ip_key(ip), 0) {
            Ok(info) => Ok(Some(info)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_err(names::MAP_ENDPOINTS, format!("looking up {ip}"))(
                source,
            )),
        }
    }

    /// Removes the endpoint `ip` and the counters of its host veth. No error
    /// when they are already gone.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let Some(info) = self.endpoint(ip)? else {
            return Ok(());
        };
        removed(self.endpoints_map()?.remove(&ip_key(ip)))
            .map_err(map_err(names::MAP_ENDPOINTS, format!("removing {ip}")))?;
        // Its share of the stack-flows table: a pod that gets the address
        // next starts from zero (the recount would find the old entries
        // charged to it still).
        let name = names::MAP_FLOW_OWNERS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        let mut owners: HashMap<_, u32, FlowOwner> =
            HashMap::try_from(map).map_err(map_err(name, "opening as hash map"))?;
        removed(owners.remove(&ip_key(ip))).map_err(map_err(name, format!("removing {ip}")))?;
        self.remove_veth(info.host_ifindex)
    }

    fn veths_map(
        &mut self,
    ) -> Result<PerCpuHashMap<&mut MapData, u32, VethEndpoint>, DatapathError> {
        let name = names::MAP_VETHS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        PerCpuHashMap::try_from(map).map_err(map_err(name, "opening as per-CPU hash map"))
    }

    /// Removes the per-veth entry (identity and counters) of `host_ifindex`.
    /// No error when it is already gone.
    pub fn remove_veth(&mut self, host_ifindex: u32) -> Result<(), DatapathError> {
        removed(self.veths_map()?.remove(&host_ifindex)).map_err(map_err(
            names::MAP_VETHS,
            format!("removing ifindex {host_ifindex}"),
        ))
    }

    /// The host veth ifindexes with a per-veth entry.
    pub fn veth_ifindexes(&mut self) -> Result<Vec<u32>, DatapathError> {
        self.veths_map()?
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::MAP_VETHS, "iterating"))
    }

    /// Every local endpoint in the datapath.
    pub fn endpoints(&mut self) -> Result<Vec<(Ipv4Addr, EndpointInfo)>, DatapathError> {
        let map = self.endpoints_map()?;
        map.iter()
            .map(|entry| {
                entry
                    .map(|(key, info)| (Ipv4Addr::from(key.to_ne_bytes()), info))
                    .map_err(map_err(names::MAP_ENDPOINTS, "iterating"))
            })
            .collect()
    }

    /// This node's forwarding config (zeroes before the agent wrote it).
    pub fn config(&mut self) -> Result<NodeConfig, DatapathError> {
        let name = names::MAP_CONFIG;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        let array: Array<_, NodeConfig> =
            Array::try_from(map).map_err(map_err(name, "opening as array"))?;
        array
            .get(&0, 0)
            .map_err(map_err(name, "reading the node config"))
    }

    /// The per-veth entry of `host_ifindex` (identity, shaper, and the
    /// first CPU's counters), if any.
    pub fn veth(&mut self, host_ifindex: u32) -> Result<Option<VethEndpoint>, DatapathError> {
        match self.veths_map()?.get(&host_ifindex, 0) {
            Ok(per_cpu) => Ok(per_cpu.iter().next().copied()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_err(
                names::MAP_VETHS,
                format!("looking up ifindex {host_ifindex}"),
            )(source)),
        }
    }

    /// Writes this node's forwarding config.
    pub fn set_config(&mut self, config: NodeConfig) -> Result<(), DatapathError> {
        let name = names::MAP_CONFIG;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        let mut array: Array<_, NodeConfig> =
            Array::try_from(map).map_err(map_err(name, "opening as array"))?;
        array
            .set(0, config, 0)
            .map_err(map_err(name, "writing the node config"))
    }

    fn remote_map(&mut self) -> Result<LpmTrie<&mut MapData, u32, RemoteNode>, DatapathError> {
        let name = names::MAP_REMOTE;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        LpmTrie::try_from(map).map_err(map_err(name, "opening as LPM trie"))
    }

    /// Adds or replaces the route of a remote pod CIDR.
    pub fn upsert_remote(&mut self, cidr: Ipv4Net, node_ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.insert_remote(cidr, node_ip, 0)
    }

    /// Adds another node's own address (a /32 in the same trie, flagged):
    /// pods reach it through the tunnel like its pods, and it is a source
    /// that node may send from (from_overlay, from_underlay).
    pub fn upsert_node_address(&mut self, node_ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.insert_remote(Ipv4Net::from(node_ip), node_ip, REMOTE_NODE_ADDRESS)
    }

    fn insert_remote(
        &mut self,
        cidr: Ipv4Net,
        node_ip: Ipv4Addr,
        flags: u32,
    ) -> Result<(), DatapathError> {
        let key = LpmKey::new(u32::from(cidr.prefix_len()), ip_key(cidr.network()));
        let value = RemoteNode {
            node_ip: ip_key(node_ip),
            flags,
        };
        self.remote_map()?
            .insert(&key, value, 0)
            .map_err(map_err(names::MAP_REMOTE, format!("inserting {cidr}")))
    }

    /// Removes a remote pod CIDR or node address (no error when absent).
    pub fn remove_remote(&mut self, cidr: Ipv4Net) -> Result<(), DatapathError> {
        let key = LpmKey::new(u32::from(cidr.prefix_len()), ip_key(cidr.network()));
        removed(self.remote_map()?.remove(&key))
            .map_err(map_err(names::MAP_REMOTE, format!("removing {cidr}")))
    }

    /// Every remote pod CIDR and node address with its node.
    pub fn remotes(&mut self) -> Result<Vec<RemoteEntry>, DatapathError> {
        let map = self.remote_map()?;
        map.iter()
            .map(|entry| {
                let (key, value) = entry.map_err(map_err(names::MAP_REMOTE, "iterating"))?;
                let prefix = u8::try_from(key.prefix_len()).unwrap_or(32);
                let network = Ipv4Addr::from(key.data().to_ne_bytes());
                Ok(RemoteEntry {
                    cidr: Ipv4Net::new(network, prefix).unwrap_or_default(),
                    node_ip: Ipv4Addr::from(value.node_ip.to_ne_bytes()),
                    node_address: value.flags & REMOTE_NODE_ADDRESS != 0,
                })
            })
            .collect()
    }

    fn stack_flows_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, FlowKey, StackFlow>, DatapathError> {
        let name = names::MAP_STACK_FLOWS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        HashMap::try_from(map).map_err(map_err(name, "opening as LRU hash map"))
    }

    /// The flows the datapath hands to the host stack (reply directions of
    /// flows that crossed it), expired ones included.
    pub fn stack_flows(&mut self) -> Result<Vec<(FlowKey, StackFlow)>, DatapathError> {
        let map = self.stack_flows_map()?;
        map.iter()
            .map(|entry| entry.map_err(map_err(names::MAP_STACK_FLOWS, "iterating")))
            .collect()
    }

    /// The stack flow `key`, if the table holds it: one lookup, where
    /// [`Self::stack_flows`] walks a table of up to `MAX_STACK_FLOWS`.
    pub fn stack_flow(&mut self, key: &FlowKey) -> Result<Option<StackFlow>, DatapathError> {
        match self.stack_flows_map()?.get(key, 0) {
            Ok(flow) => Ok(Some(flow)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_err(names::MAP_STACK_FLOWS, "looking up a flow")(source)),
        }
    }

    /// Adds or replaces a stack flow (tests; the datapath records its own).
    pub fn insert_stack_flow(
        &mut self,
        key: FlowKey,
        flow: StackFlow,
    ) -> Result<(), DatapathError> {
        self.stack_flows_map()?
            .insert(key, flow, 0)
            .map_err(map_err(names::MAP_STACK_FLOWS, "inserting"))
    }
}
