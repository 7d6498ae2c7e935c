//! Reading the counters and map fill levels, from a loaded datapath or
//! straight from the pins (podnetctl, metrics, while the agent is down).

use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, lpm_trie::LpmTrie};
use podnet_common::{
    Backend, BackendKey, DropReason, EndpointInfo, EndpointStats, FlowKey, PolicyCidrKey,
    PolicyKey, PolicyRule, RemoteNode, ServiceEntry, ServiceKey, StackFlow, TrackedConnection,
    Verdict, VethEndpoint, names,
};

use super::{Datapath, DatapathError, map_data, map_err};

/// Totals over all CPUs of the verdict and drop counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub verdicts: BTreeMap<&'static str, u64>,
    pub drops: BTreeMap<&'static str, u64>,
}

impl Counters {
    #[must_use]
    pub fn verdict(&self, verdict: Verdict) -> u64 {
        self.verdicts.get(verdict.name()).copied().unwrap_or(0)
    }

    #[must_use]
    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.name()).copied().unwrap_or(0)
    }
}

/// The verdict and drop counters of the two per-CPU arrays, summed over CPUs.
fn counters_of(
    verdicts: &aya::maps::Map,
    drops: &aya::maps::Map,
) -> Result<Counters, DatapathError> {
    let mut counters = Counters::default();
    for verdict in Verdict::ALL {
        counters.verdicts.insert(
            verdict.name(),
            per_cpu_total(verdicts, names::MAP_VERDICTS, verdict as u32)?,
        );
    }
    for reason in DropReason::ALL {
        counters.drops.insert(
            reason.name(),
            per_cpu_total(drops, names::MAP_DROPS, reason as u32)?,
        );
    }
    Ok(counters)
}

fn per_cpu_total(
    map: &aya::maps::Map,
    name: &'static str,
    index: u32,
) -> Result<u64, DatapathError> {
    let array: PerCpuArray<_, u64> =
        PerCpuArray::try_from(map).map_err(map_err(name, "opening as per-CPU array"))?;
    let values = array
        .get(&index, 0)
        .map_err(map_err(name, format!("reading index {index}")))?;
    Ok(values.iter().sum())
}

/// One veth's per-CPU counters added up.
fn sum_stats<'a>(values: impl Iterator<Item = &'a VethEndpoint>) -> EndpointStats {
    values.fold(EndpointStats::default(), |acc, v| EndpointStats {
        packets: acc.packets + v.stats.packets,
        bytes: acc.bytes + v.stats.bytes,
    })
}

/// How full a pinned map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u32,
    pub max_entries: u32,
}

/// The maps whose fill level is reported (the ones with an entry per pod,
/// node, flow or Service; the counter arrays, the config and the
/// backend-ports bitmap are arrays, always full).
pub const FILLED_MAPS: [&str; 10] = [
    names::MAP_ENDPOINTS,
    names::MAP_VETHS,
    names::MAP_REMOTE,
    names::MAP_STACK_FLOWS,
    names::MAP_IDENTITIES,
    names::MAP_POLICY,
    names::MAP_POLICY_CIDRS,
    names::MAP_CONNTRACK,
    names::MAP_SERVICES,
    names::MAP_SERVICE_BACKENDS,
];

/// Read-only handles on the agent's pinned maps, opened from their pins
/// (not through the agent's [`Datapath`]): what the metrics read at scrape
/// time without holding the agent's lock. The kernel keeps every map
/// consistent per entry for concurrent readers and writers.
pub struct PinnedMapReader {
    verdicts: aya::maps::Map,
    drops: aya::maps::Map,
    veths: aya::maps::Map,
    filled: Vec<(&'static str, aya::maps::Map)>,
    /// The socket LB's counters (none pinned by an older build).
    socket_lb: Option<aya::maps::Map>,
}

/// Opens the map `name` pinned in `pin_dir`.
fn open_pin(pin_dir: &Path, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name, "opening its pin"))?;
    aya::maps::Map::from_map_data(data).map_err(map_err(name, "reading its type"))
}

/// How full the maps `names` (of [`FILLED_MAPS`]) pinned in `pin_dir`
/// are, opened for this once (what `podnetctl status` shows of the
/// bounded tables, without the agent's lock): see
/// [`PinnedMapReader::fill`] for the cost.
pub fn pinned_fill(pin_dir: &Path, names: &[&'static str]) -> Result<Vec<MapFill>, DatapathError> {
    names
        .iter()
        .map(|&name| fill_of(name, &open_pin(pin_dir, name)?))
        .collect()
}

impl PinnedMapReader {
    /// Opens the maps pinned in `pin_dir` (by a loaded [`Datapath`]).
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let open = |name| open_pin(pin_dir, name);
        Ok(Self {
            verdicts: open(names::MAP_VERDICTS)?,
            drops: open(names::MAP_DROPS)?,
            veths: open(names::MAP_VETHS)?,
            // A map without a pin is one the loaded object does not
            // declare (an older build's): nothing to report.
            filled: FILLED_MAPS
                .iter()
                .filter(|&&name| pin_dir.join(name).exists())
                .map(|&name| Ok((name, open(name)?)))
                .collect::<Result<_, DatapathError>>()?,
            socket_lb: pin_dir
                .join(names::MAP_SOCKET_LB_COUNTERS)
                .exists()
                .then(|| open(names::MAP_SOCKET_LB_COUNTERS))
                .transpose()?,
        })
    }

    /// The socket LB's counters by name, summed over CPUs (empty when the
    /// map is not pinned). They count whether or not the socket programs
    /// are attached anywhere: zeros then.
    pub fn socket_lb_counters(
        &self,
    ) -> Result<std::collections::BTreeMap<&'static str, u64>, DatapathError> {
        self.socket_lb.as_ref().map_or_else(
            || Ok(std::collections::BTreeMap::new()),
            super::socket_lb::socket_lb_counters_of,
        )
    }

    /// The verdict and drop counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        counters_of(&self.verdicts, &self.drops)
    }

    /// What every host veth's endpoint sent (by host veth ifindex), summed
    /// over CPUs.
    pub fn endpoint_stats(
        &self,
    ) -> Result<std::collections::HashMap<u32, EndpointStats>, DatapathError> {
        let name = names::MAP_VETHS;
        let veths: PerCpuHashMap<_, u32, VethEndpoint> = PerCpuHashMap::try_from(&self.veths)
            .map_err(map_err(name, "opening as per-CPU hash map"))?;
        veths
            .iter()
            .map(|entry| {
                let (ifindex, values) = entry.map_err(map_err(name, "iterating"))?;
                Ok((ifindex, sum_stats(values.iter())))
            })
            .collect()
    }

    /// Entries and capacity of each of [`FILLED_MAPS`]. Entries are
    /// counted by walking the keys (the kernel keeps no count a reader can
    /// ask for), which costs one syscall per entry.
    pub fn fill(&self) -> Result<Vec<MapFill>, DatapathError> {
        self.filled
            .iter()
            .map(|&(name, ref map)| fill_of(name, map))
            .collect()
    }
}

/// Entries (counted) and capacity of `map`, one of [`FILLED_MAPS`].
fn fill_of(name: &'static str, map: &aya::maps::Map) -> Result<MapFill, DatapathError> {
    let max_entries = map_data(map)
        .info()
        .map_err(map_err(name, "reading its info"))?
        .max_entries();
    let entries = count_keys(name, map)?;
    Ok(MapFill {
        name,
        // A map changing while it is walked can make the walk start over;
        // never report more than fits.
        entries: entries.min(max_entries),
        max_entries,
    })
}

/// The number of keys of one of [`FILLED_MAPS`].
fn count_keys(name: &'static str, map: &aya::maps::Map) -> Result<u32, DatapathError> {
    fn count<K, E>(keys: impl Iterator<Item = Result<K, E>>) -> Result<u32, E> {
        let mut n = 0u32;
        for key in keys {
            key?;
            n = n.saturating_add(1);
        }
        Ok(n)
    }
    let counted = match name {
        names::MAP_ENDPOINTS => count(
            HashMap::<_, u32, EndpointInfo>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        names::MAP_VETHS => count(
            PerCpuHashMap::<_, u32, VethEndpoint>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        names::MAP_REMOTE => count(
            LpmTrie::<_, u32, RemoteNode>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        names::MAP_STACK_FLOWS => count(
            HashMap::<_, FlowKey, StackFlow>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        names::MAP_IDENTITIES => count(
            HashMap::<_, u32, u32>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        names::MAP_POLICY => count(
            LpmTrie::<_, PolicyKey, PolicyRule>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        names::MAP_POLICY_CIDRS => count(
            LpmTrie::<_, PolicyCidrKey, u32>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        names::MAP_CONNTRACK => count(
            HashMap::<_, FlowKey, TrackedConnection>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        names::MAP_SERVICES => count(
            HashMap::<_, ServiceKey, ServiceEntry>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        names::MAP_SERVICE_BACKENDS => count(
            HashMap::<_, BackendKey, Backend>::try_from(map)
                .map_err(map_err(name, "opening"))?
                .keys(),
        ),
        _ => return Err(DatapathError::MissingMap { name }),
    };
    counted.map_err(map_err(name, "iterating its keys"))
}

impl Datapath {
    /// Sums the per-CPU verdict and drop counters.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        counters_of(self.map(names::MAP_VERDICTS)?, self.map(names::MAP_DROPS)?)
    }

    /// Packets/bytes the endpoint behind `host_ifindex` sent, over all CPUs.
    pub fn endpoint_stats(
        &self,
        host_ifindex: u32,
    ) -> Result<Option<EndpointStats>, DatapathError> {
        let name = names::MAP_VETHS;
        let veths: PerCpuHashMap<_, u32, VethEndpoint> =
            PerCpuHashMap::try_from(self.map(name)?)
                .map_err(map_err(name, "opening as per-CPU hash map"))?;
        match veths.get(&host_ifindex, 0) {
            Ok(values) => Ok(Some(sum_stats(values.iter()))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_err(name, format!("reading ifindex {host_ifindex}"))(
                source,
            )),
        }
    }
}
