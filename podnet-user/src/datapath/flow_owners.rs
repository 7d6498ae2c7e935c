//! Each endpoint's share of the stack-flows table (see
//! `podnet_common::FlowOwner`). The datapath adds to an endpoint's count
//! for every entry it inserts and stops at the limit; nothing in the kernel
//! tells it when an entry expires or the LRU evicts one. The
//! [`FlowSweeper`] walks the table every few seconds from the pins,
//! removes the entries that expired and writes each endpoint's live count,
//! so a pod that stopped flooding gets its share back.

use std::{collections::HashMap, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use podnet_common::{FlowKey, FlowOwner, StackFlow, names};

use super::{DatapathError, map_err, monotonic_coarse_ns, removed};

/// `BPF_EXIST` (uapi `bpf.h`): update an existing element only.
const BPF_EXIST: u64 = 2;

/// What one walk of the table found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FlowTally {
    /// Entries no longer followed, to remove.
    pub expired: Vec<FlowKey>,
    /// Live entries by owner (network-order pod IP; 0 for none).
    pub live: HashMap<u32, u32>,
}

/// Sorts `entries` into expired ones and live counts per owner at
/// monotonic time `now_ns` (the datapath's clock).
#[must_use]
pub fn tally(entries: &[(FlowKey, StackFlow)], now_ns: u64) -> FlowTally {
    let mut out = FlowTally::default();
    for (key, flow) in entries {
        if flow.expired(key.proto, now_ns) {
            out.expired.push(*key);
        } else {
            *out.live.entry(flow.owner).or_default() += 1;
        }
    }
    out
}

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub live: usize,
    pub expired_removed: usize,
    /// Flows refused since the previous sweep, all endpoints together.
    pub newly_refused: u64,
}

/// The stack-flows and flow-owners maps, opened from their pins (not
/// through the agent's datapath: a walk of 131,072 entries must not hold
/// the agent's lock).
pub struct FlowSweeper {
    stack_flows: Map,
    owners: Map,
    refused_seen: HashMap<u32, u32>,
}

impl FlowSweeper {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let open = |name: &'static str| -> Result<Map, DatapathError> {
            let data =
                MapData::from_pin(pin_dir.join(name)).map_err(map_err(name, "opening its pin"))?;
            Map::from_map_data(data).map_err(map_err(name, "reading its type"))
        };
        Ok(Self {
            stack_flows: open(names::MAP_STACK_FLOWS)?,
            owners: open(names::MAP_FLOW_OWNERS)?,
            refused_seen: HashMap::new(),
        })
    }

    /// Every endpoint's share: pod IP and its [`FlowOwner`] entry.
    pub fn shares(&self) -> Result<Vec<(Ipv4Addr, FlowOwner)>, DatapathError> {
        let name = names::MAP_FLOW_OWNERS;
        let owners: BpfHashMap<_, u32, FlowOwner> =
            BpfHashMap::try_from(&self.owners).map_err(map_err(name, "opening as hash map"))?;
        owners
            .iter()
            .map(|entry| {
                let (ip, owner) = entry.map_err(map_err(name, "iterating"))?;
                Ok((Ipv4Addr::from(ip.to_ne_bytes()), owner))
            })
            .collect()
    }

    /// Removes the expired entries and writes each endpoint's live count.
    /// The datapath inserts meanwhile: a count written here can miss the
    /// entries inserted during the walk (the next sweep counts them), so an
    /// endpoint may briefly hold more than its limit, never unboundedly.
    pub fn sweep(&mut self) -> Result<SweepReport, DatapathError> {
        let flows_name = names::MAP_STACK_FLOWS;
        let entries: Vec<(FlowKey, StackFlow)> = {
            let map: BpfHashMap<_, FlowKey, StackFlow> = BpfHashMap::try_from(&self.stack_flows)
                .map_err(map_err(flows_name, "opening as LRU hash map"))?;
            // An entry the LRU evicts mid-walk ends the key chain early at
            // worst (ENOENT): what is left is counted next time.
            map.iter().filter_map(Result::ok).collect()
        };
        let found = tally(&entries, monotonic_coarse_ns());
        {
            let mut map: BpfHashMap<_, FlowKey, StackFlow> =
                BpfHashMap::try_from(&mut self.stack_flows)
                    .map_err(map_err(flows_name, "opening as LRU hash map"))?;
            for key in &found.expired {
                removed(map.remove(key)).map_err(map_err(flows_name, "removing"))?;
            }
        }
        let owners_name = names::MAP_FLOW_OWNERS;
        let mut owners: BpfHashMap<_, u32, FlowOwner> = BpfHashMap::try_from(&mut self.owners)
            .map_err(map_err(owners_name, "opening as hash map"))?;
        let current: Vec<(u32, FlowOwner)> = owners.iter().filter_map(Result::ok).collect();
        let mut newly_refused = 0u64;
        for (ip, owner) in current {
            let seen = self.refused_seen.insert(ip, owner.refused).unwrap_or(0);
            newly_refused += u64::from(owner.refused.wrapping_sub(seen));
            let live = found.live.get(&ip).copied().unwrap_or(0);
            if live == owner.flows {
                continue;
            }
            // BPF_EXIST: an endpoint removed meanwhile stays removed.
            let updated = FlowOwner {
                flows: live,
                ..owner
            };
            removed(owners.insert(ip, updated, BPF_EXIST))
                .map_err(map_err(owners_name, "writing a count"))?;
        }
        Ok(SweepReport {
            live: entries.len() - found.expired.len(),
            expired_removed: found.expired.len(),
            newly_refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use podnet_common::flow::FLOW_TIMEOUT_OTHER_S;

    use super::*;

    const UDP: u8 = 17;
    const SECOND: u64 = 1_000_000_000;

    fn entry(port: u16, owner: u32, last_seen_ns: u64) -> (FlowKey, StackFlow) {
        (
            FlowKey::new(1, 2, port, 53, UDP),
            StackFlow {
                last_seen_ns,
                flags: 0,
                owner,
            },
        )
    }

    #[test]
    fn live_entries_are_counted_by_owner_and_expired_ones_set_aside() {
        let now = 1_000 * SECOND;
        let fresh = now - SECOND;
        let stale = now - (FLOW_TIMEOUT_OTHER_S + 1) * SECOND;
        let entries = [
            entry(1, 7, fresh),
            entry(2, 7, fresh),
            entry(3, 7, stale),
            entry(4, 9, fresh),
            entry(5, 0, fresh),
            entry(6, 9, stale),
        ];
        let found = tally(&entries, now);
        assert_eq!(found.expired, vec![entries[2].0, entries[5].0]);
        assert_eq!(found.live, HashMap::from([(7, 2), (9, 1), (0, 1)]));
    }
}
