//! What a node holds for its pods, read from every place podnet keeps it:
//! IPAM records, host veths, the agent's endpoints, the agent's records on
//! disk and the datapath's map entries. A leak is anything here that no
//! live attachment accounts for, or an attachment missing from one of them.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use podnet::{
    api::{Client, EndpointStatus, Request},
    cni::plugin::{HOST_IFNAME_PREFIX, host_ifname},
    ipam::Owner,
};
use podnet_common::{EndpointInfo, VethEndpoint, names};

/// Where a node keeps things (a test [`crate::node::Node`] or a lab node).
pub struct NodePaths<'a> {
    pub netns: &'a str,
    pub socket: &'a Path,
    pub bpffs: &'a Path,
    pub state_dir: &'a Path,
}

/// An attachment the runtime still has: what the node should hold.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
}

impl From<&crate::node::Pod> for Attachment {
    fn from(pod: &crate::node::Pod) -> Self {
        Self {
            container_id: pod.container_id.clone(),
            ifname: pod.ifname.clone(),
            ip: pod.ip,
        }
    }
}

impl Attachment {
    fn owner(&self) -> Owner {
        Owner {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// Everything a node holds for pods, at one moment.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Addresses with a record in the node's IPAM store (any network).
    pub ipam: BTreeSet<Ipv4Addr>,
    /// Files in the IPAM store that are neither records nor its own
    /// (lock, cursor): a crashed write's leftovers.
    pub ipam_stray: BTreeSet<String>,
    /// Host-side pod veths (`pn...`) in the node's netns.
    pub veths: BTreeSet<String>,
    /// Shaper (ifb) devices (`pbw...`) in the node's netns.
    pub shapers: BTreeSet<String>,
    /// The agent's endpoints (`podnetctl endpoints`).
    pub endpoints: Vec<EndpointStatus>,
    /// Files in the agent's record directory.
    pub records: BTreeSet<String>,
    /// Keys of the local-endpoints map (pod IPs).
    pub map_endpoints: BTreeSet<Ipv4Addr>,
    /// Keys of the per-veth map (host veth ifindexes).
    pub map_veths: BTreeSet<u32>,
}

impl Inventory {
    /// Reads it all; the agent must be running (its endpoint list).
    pub fn read(node: &NodePaths<'_>) -> anyhow::Result<Self> {
        let (ipam, ipam_stray) = ipam_store(&node.state_dir.join("ipam/_node"))?;
        let endpoints: Vec<EndpointStatus> = Client::new(node.socket)
            .call(&Request::ListEndpoints)
            .context("listing the agent's endpoints")?;
        Ok(Self {
            ipam,
            ipam_stray,
            veths: host_veths(node.netns)?,
            shapers: links_named(node.netns, podnet::endpoint::SHAPER_IFNAME_PREFIX)?,
            endpoints,
            records: file_names(&node.state_dir.join("endpoints"))?,
            map_endpoints: map_keys::<EndpointInfo>(&node.bpffs.join(names::MAP_ENDPOINTS), false)?
                .into_iter()
                .map(|k| Ipv4Addr::from(k.to_ne_bytes()))
                .collect(),
            map_veths: map_keys::<VethEndpoint>(&node.bpffs.join(names::MAP_VETHS), true)?,
        })
    }

    /// How many of each (IPAM, veths, endpoints, records, endpoint map
    /// entries, veth map entries), for figures.
    #[must_use]
    pub fn counts(&self) -> [usize; 6] {
        [
            self.ipam.len(),
            self.veths.len(),
            self.endpoints.len(),
            self.records.len(),
            self.map_endpoints.len(),
            self.map_veths.len(),
        ]
    }

    /// Everything that differs from what exactly `live` would leave: one
    /// line per leaked or missing thing; empty when none.
    #[must_use]
    pub fn differences(&self, live: &[Attachment]) -> Vec<String> {
        let mut out = Vec::new();
        let ips: BTreeSet<Ipv4Addr> = live.iter().map(|a| a.ip).collect();
        let veths: BTreeSet<String> = live.iter().map(|a| host_ifname(&a.owner())).collect();
        let records: BTreeSet<String> = live
            .iter()
            .map(|a| format!("{}:{}.json", a.container_id, a.ifname))
            .collect();
        diff(&mut out, "IPAM record", &self.ipam, &ips);
        for stray in &self.ipam_stray {
            out.push(format!("leaked: stray file {stray} in the IPAM store"));
        }
        diff(&mut out, "host veth", &self.veths, &veths);
        diff(&mut out, "agent record", &self.records, &records);
        diff(&mut out, "endpoints map entry", &self.map_endpoints, &ips);
        let endpoints: BTreeSet<Attachment> = self
            .endpoints
            .iter()
            .map(|e| Attachment {
                container_id: e.endpoint.owner.container_id.clone(),
                ifname: e.endpoint.owner.ifname.clone(),
                ip: e.endpoint.ip,
            })
            .collect();
        diff(
            &mut out,
            "agent endpoint",
            &endpoints,
            &live.iter().cloned().collect(),
        );
        for e in &self.endpoints {
            if !(e.in_datapath && e.attached) {
                out.push(format!(
                    "endpoint {} ({}) is not whole: in datapath {}, filters attached {}",
                    e.endpoint.owner.container_id, e.endpoint.ip, e.in_datapath, e.attached
                ));
            }
        }
        // Every per-veth entry belongs to an endpoint's host veth.
        let ifindexes: BTreeSet<u32> = self
            .endpoints
            .iter()
            .map(|e| e.endpoint.host_ifindex)
            .collect();
        diff(&mut out, "veths map entry", &self.map_veths, &ifindexes);
        // A shaper for each endpoint with an egress limit, no other.
        let shapers: BTreeSet<String> = self
            .endpoints
            .iter()
            .filter(|e| e.endpoint.bandwidth.and_then(|b| b.egress()).is_some())
            .map(|e| podnet::endpoint::shaper_ifname(&e.endpoint.host_ifname))
            .collect();
        diff(&mut out, "shaper (ifb)", &self.shapers, &shapers);
        out
    }

    /// Panics, naming every difference, unless the node holds exactly
    /// what `live` needs.
    pub fn assert_exactly(&self, live: &[Attachment], when: &str) {
        let differences = self.differences(live);
        assert!(
            differences.is_empty(),
            "{when}: the node does not hold exactly the {} live attachment(s):\n  {}\n{self:#?}",
            live.len(),
            differences.join("\n  ")
        );
    }
}

fn diff<T: Ord + std::fmt::Debug>(
    out: &mut Vec<String>,
    what: &str,
    found: &BTreeSet<T>,
    expected: &BTreeSet<T>,
) {
    for leaked in found.difference(expected) {
        out.push(format!("leaked: {what} {leaked:?}"));
    }
    for missing in expected.difference(found) {
        out.push(format!("missing: {what} {missing:?}"));
    }
}

fn file_names(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e).with_context(|| format!("listing {}", dir.display())),
    }
}

/// The node store's records (files named by an address) and its stray
/// files (anything but records, the lock, the cursor and `served_by`).
fn ipam_store(dir: &Path) -> anyhow::Result<(BTreeSet<Ipv4Addr>, BTreeSet<String>)> {
    let mut records = BTreeSet::new();
    let mut stray = BTreeSet::new();
    for name in file_names(dir)? {
        if let Ok(ip) = name.parse::<Ipv4Addr>() {
            records.insert(ip);
        } else if !["lock", "last_reserved_ip.0", "served_by"].contains(&name.as_str()) {
            stray.insert(name);
        }
    }
    Ok((records, stray))
}

/// Host-side pod veths in `netns`.
pub fn host_veths(netns: &str) -> anyhow::Result<BTreeSet<String>> {
    links_named(netns, HOST_IFNAME_PREFIX)
}

/// Links in `netns` whose name starts with `prefix`.
pub fn links_named(netns: &str, prefix: &str) -> anyhow::Result<BTreeSet<String>> {
    let out = crate::netns::run(
        std::process::Command::new("ip").args(["-n", netns, "-o", "link", "show"]),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// The keys of the pinned hash map at `pin` (per-CPU values when
/// `per_cpu`), read straight from the kernel, not from the agent.
fn map_keys<V: aya::Pod>(pin: &PathBuf, per_cpu: bool) -> anyhow::Result<BTreeSet<u32>> {
    let data = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let keys: Result<BTreeSet<u32>, _> = if per_cpu {
        PerCpuHashMap::<_, u32, V>::try_from(Map::PerCpuHashMap(data))?
            .keys()
            .collect()
    } else {
        HashMap::<_, u32, V>::try_from(Map::HashMap(data))?
            .keys()
            .collect()
    };
    keys.with_context(|| format!("iterating {}", pin.display()))
}
