//! The NetworkPolicy maps (see `podnet_common::policy`): the identities of
//! the cluster's pod IPs, the selected endpoints' rules and CIDR sets, and
//! the endpoints' policy bits. The agent's policy sync is their only
//! writer; the datapath only reads them (and keeps its own connection
//! table).

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::maps::{
    HashMap, MapData, PerCpuHashMap,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use podnet_common::{
    EndpointInfo, PolicyCidrKey, PolicyKey, PolicyRule, VethEndpoint, endpoint::ENDPOINT_F_POLICY,
    names,
};

use super::{Datapath, DatapathError, ip_key, map_err, removed};

impl Datapath {
    fn identities_map(&mut self) -> Result<HashMap<&mut MapData, u32, u32>, DatapathError> {
        let name = names::MAP_IDENTITIES;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        HashMap::try_from(map).map_err(map_err(name, "opening as hash map"))
    }

    fn policy_map(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, PolicyKey, PolicyRule>, DatapathError> {
        let name = names::MAP_POLICY;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        LpmTrie::try_from(map).map_err(map_err(name, "opening as LPM trie"))
    }

    fn policy_cidrs_map(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, PolicyCidrKey, u32>, DatapathError> {
        let name = names::MAP_POLICY_CIDRS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        LpmTrie::try_from(map).map_err(map_err(name, "opening as LPM trie"))
    }

    /// Every IP with an identity.
    pub fn identities(&mut self) -> Result<BTreeMap<Ipv4Addr, u32>, DatapathError> {
        self.identities_map()?
            .iter()
            .map(|entry| {
                entry
                    .map(|(ip, identity)| (Ipv4Addr::from(ip.to_ne_bytes()), identity))
                    .map_err(map_err(names::MAP_IDENTITIES, "iterating"))
            })
            .collect()
    }

    /// Gives `ip` identity `identity`.
    pub fn upsert_identity(&mut self, ip: Ipv4Addr, identity: u32) -> Result<(), DatapathError> {
        self.identities_map()?
            .insert(ip_key(ip), identity, 0)
            .map_err(map_err(names::MAP_IDENTITIES, format!("inserting {ip}")))
    }

    /// Forgets the identity of `ip` (no error when it has none).
    pub fn remove_identity(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        removed(self.identities_map()?.remove(&ip_key(ip)))
            .map_err(map_err(names::MAP_IDENTITIES, format!("removing {ip}")))
    }

    /// Every policy rule entry: (prefix length, key) -> rule.
    pub fn policy_rules(
        &mut self,
    ) -> Result<BTreeMap<(u32, PolicyKey), PolicyRule>, DatapathError> {
        self.policy_map()?
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, rule)| ((key.prefix_len(), key.data()), rule))
                    .map_err(map_err(names::MAP_POLICY, "iterating"))
            })
            .collect()
    }

    /// Adds or replaces a policy rule entry.
    pub fn upsert_policy_rule(
        &mut self,
        prefix_len: u32,
        key: PolicyKey,
        rule: PolicyRule,
    ) -> Result<(), DatapathError> {
        self.policy_map()?
            .insert(&LpmKey::new(prefix_len, key), rule, 0)
            .map_err(map_err(
                names::MAP_POLICY,
                format!("inserting {key:?}/{prefix_len}"),
            ))
    }

    /// Removes a policy rule entry (no error when absent).
    pub fn remove_policy_rule(
        &mut self,
        prefix_len: u32,
        key: PolicyKey,
    ) -> Result<(), DatapathError> {
        removed(self.policy_map()?.remove(&LpmKey::new(prefix_len, key))).map_err(map_err(
            names::MAP_POLICY,
            format!("removing {key:?}/{prefix_len}"),
        ))
    }

    /// Every CIDR-set entry: (prefix length, key) -> CIDR-set identity.
    pub fn policy_cidrs(&mut self) -> Result<BTreeMap<(u32, PolicyCidrKey), u32>, DatapathError> {
        self.policy_cidrs_map()?
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, set)| ((key.prefix_len(), key.data()), set))
                    .map_err(map_err(names::MAP_POLICY_CIDRS, "iterating"))
            })
            .collect()
    }

    /// Adds or replaces a CIDR-set entry.
    pub fn upsert_policy_cidr(
        &mut self,
        prefix_len: u32,
        key: PolicyCidrKey,
        set: u32,
    ) -> Result<(), DatapathError> {
        self.policy_cidrs_map()?
            .insert(&LpmKey::new(prefix_len, key), set, 0)
            .map_err(map_err(
                names::MAP_POLICY_CIDRS,
                format!("inserting {key:?}/{prefix_len}"),
            ))
    }

    /// Removes a CIDR-set entry (no error when absent).
    pub fn remove_policy_cidr(
        &mut self,
        prefix_len: u32,
        key: PolicyCidrKey,
    ) -> Result<(), DatapathError> {
        removed(
            self.policy_cidrs_map()?
                .remove(&LpmKey::new(prefix_len, key)),
        )
        .map_err(map_err(
            names::MAP_POLICY_CIDRS,
            format!("removing {key:?}/{prefix_len}"),
        ))
    }

    /// Sets the `ENDPOINT_F_POLICY_*` bits of local endpoint `ip` to
    /// `policy_flags`, in its endpoint entry and in its host veth's (which
    /// from_pod reads). Returns false when `ip` is no local endpoint. The
    /// veth entry is per CPU: rewriting it loses the packets its counters
    /// gain between the read and the write (a policy change is rare).
    pub fn set_policy_flags(
        &mut self,
        ip: Ipv4Addr,
        policy_flags: u32,
    ) -> Result<bool, DatapathError> {
        let Some(info) = self.endpoint(ip)? else {
            return Ok(false);
        };
        let policy_flags = policy_flags & ENDPOINT_F_POLICY;
        if info.flags & ENDPOINT_F_POLICY != policy_flags {
            let updated = EndpointInfo {
                flags: (info.flags & !ENDPOINT_F_POLICY) | policy_flags,
                ..info
            };
            self.upsert_endpoint_entry(ip, updated)?;
        }
        let name = names::MAP_VETHS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        let mut veths: PerCpuHashMap<_, u32, VethEndpoint> =
            PerCpuHashMap::try_from(map).map_err(map_err(name, "opening as per-CPU hash map"))?;
        let per_cpu = match veths.get(&info.host_ifindex, 0) {
            Ok(values) => values,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(true),
            Err(source) => {
                return Err(map_err(
                    name,
                    format!("looking up ifindex {}", info.host_ifindex),
                )(source));
            }
        };
        if per_cpu.iter().all(|v| v.policy_flags == policy_flags) {
            return Ok(true);
        }
        let updated: Vec<VethEndpoint> = per_cpu
            .iter()
            .map(|v| VethEndpoint { policy_flags, ..*v })
            .collect();
        let values = aya::maps::PerCpuValues::try_from(updated)
            .map_err(|source| DatapathError::PossibleCpus { source })?;
        veths.insert(info.host_ifindex, values, 0).map_err(map_err(
            name,
            format!("setting the policy bits of ifindex {}", info.host_ifindex),
        ))?;
        Ok(true)
    }
}
