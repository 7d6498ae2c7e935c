//! The eBPF datapath as the agent and the tests see it: the embedded object,
//! loading it with its maps pinned, reading and writing the maps.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use ipnet::Ipv4Net;

use crate::pinned_maps;
use podnet_common::{
    DropReason, EndpointInfo, EndpointStats, FlowKey, NodeConfig, RemoteNode, StackFlow, Verdict,
    VethEndpoint, names, node::REMOTE_NODE_ADDRESS,
};

/// The eBPF object built by `build.rs` from podnet-ebpf (with BTF), embedded
/// so every binary is self-contained.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podnet"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object (maps pinned in {})", pin_dir.display())]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("migrating pinned maps of another layout in {}", pin_dir.display())]
    Migration {
        pin_dir: PathBuf,
        #[source]
        source: Box<crate::pinned_maps::MigrationError>,
    },
    #[error("this build has no eBPF object (it was built with AYA_BUILD_SKIP=1)")]
    NotEmbedded,
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {action}")]
    Program {
        name: &'static str,
        action: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("program {name}: {action}")]
    Link {
        name: &'static str,
        action: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("pinning at {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("{ifname}: {action}")]
    TcFilter {
        ifname: String,
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the number of possible CPUs for per-CPU map values")]
    PossibleCpus {
        #[source]
        source: std::io::Error,
    },
    #[error("map {name}: {action}")]
    Map {
        name: &'static str,
        action: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// A map removal whose key was not there succeeded: aya 0.14 reports that
/// as the syscall's ENOENT, not as `MapError::KeyNotFound` (which only its
/// lookups return), so both mean "already gone".
fn removed(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn map_err(
    name: &'static str,
    action: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        action: action.into(),
        source: Box::new(source),
    }
}

fn prog_err(
    name: &'static str,
    action: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        name,
        action,
        source: Box::new(source),
    }
}

/// `pref` of podnet's filters on a pod veth's clsact ingress (from_pod) and
/// egress (to_pod); the first, so nothing another tool adds later runs
/// before the anti-spoofing, and to_pod sees every packet the stack sends.
pub const POD_TC_PRIORITY: u16 = 1;
/// Filter handle of podnet's filters at [`POD_TC_PRIORITY`].
pub const POD_TC_HANDLE: TcHandle = TcHandle::new(0, 1);

/// podnet's two programs on a pod's host veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodProgram {
    /// Ingress: every packet the pod sends.
    FromPod,
    /// Egress: every packet the host stack delivers to the pod.
    ToPod,
}

impl PodProgram {
    pub const BOTH: [Self; 2] = [Self::FromPod, Self::ToPod];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::FromPod => names::PROG_FROM_POD,
            Self::ToPod => names::PROG_TO_POD,
        }
    }

    #[must_use]
    pub const fn attach_type(self) -> TcAttachType {
        match self {
            Self::FromPod => TcAttachType::Ingress,
            Self::ToPod => TcAttachType::Egress,
        }
    }
}

/// podnet's programs on one of the node's own devices (TCX, pinned links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeProgram {
    pub name: &'static str,
    pub attach_type: TcAttachType,
}

impl NodeProgram {
    /// Ingress of the VXLAN device: delivers what other nodes sent.
    pub const FROM_OVERLAY: Self = Self {
        name: names::PROG_FROM_OVERLAY,
        attach_type: TcAttachType::Ingress,
    };
    /// Egress of the VXLAN device: tracks what the stack sends through it.
    pub const TO_OVERLAY: Self = Self {
        name: names::PROG_TO_OVERLAY,
        attach_type: TcAttachType::Egress,
    };
    /// Ingress of the underlay device (direct mode).
    pub const FROM_UNDERLAY: Self = Self {
        name: names::PROG_FROM_UNDERLAY,
        attach_type: TcAttachType::Ingress,
    };
    /// Egress of the underlay device (direct mode).
    pub const TO_UNDERLAY: Self = Self {
        name: names::PROG_TO_UNDERLAY,
        attach_type: TcAttachType::Egress,
    };
}

/// Leaves a netlink-attached filter in place: aya detaches a link when its
/// handle is dropped, but podnet's filter must outlive the agent (it goes
/// when the veth does). A netlink link holds no file descriptor or memory
/// beyond the handle itself, so forgetting it leaks nothing.
fn keep_tc_filter(link: SchedClassifierLink) {
    std::mem::forget(link);
}

/// A loaded program, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedProgram {
    pub name: &'static str,
    pub id: u32,
    pub tag: u64,
}

/// An entry of the remote trie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteEntry {
    pub cidr: Ipv4Net,
    pub node_ip: Ipv4Addr,
    /// The node's own address rather than its pod CIDR.
    pub node_address: bool,
}

/// A loaded map, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedMap {
    pub name: String,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
}

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

/// The loaded datapath: programs verified and loaded into the kernel, maps
/// created (or re-opened from their pins).
pub struct Datapath {
    ebpf: Ebpf,
    /// Old maps of another layout, until [`Datapath::finish_migration`].
    migration: Option<pinned_maps::Migration>,
    pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the embedded object. Maps are pinned in `pin_dir` by name, and
    /// maps already pinned there are re-used with their contents (that is how
    /// a restarted agent keeps the forwarding state). The directory must
    /// already be on a bpffs (see [`crate::bpffs`]). Always explicit: aya
    /// would otherwise pin straight into `/sys/fs/bpf`.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NotEmbedded);
        }
        let migration_error = |source| DatapathError::Migration {
            pin_dir: pin_dir.to_owned(),
            source: Box::new(source),
        };
        let layouts = pinned_maps::object_layouts(EBPF_OBJECT).map_err(migration_error)?;
        let retired =
            pinned_maps::retire_incompatible(pin_dir, &layouts).map_err(migration_error)?;
        if !retired.is_empty() {
            tracing::info!(maps = ?retired, "pinned maps of another layout (another podnet build): migrating them");
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;
        for name in names::ALL_PROGRAMS {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?
                .try_into()
                .map_err(prog_err(name, "is not a TC classifier"))?;
            program
                .load()
                .map_err(prog_err(name, "loading into the kernel (verifier)"))?;
        }
        let migration = pinned_maps::Migration::start(pin_dir, |name| ebpf.map(name).map(map_data))
            .map_err(migration_error)?;
        Ok(Self {
            ebpf,
            migration: Some(migration),
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Ends a migration of pinned maps (see [`crate::pinned_maps`]): to be
    /// called once every program of the old build has been replaced (pod
    /// veths and node devices re-pointed). No-op without one.
    pub fn finish_migration(&mut self) -> Result<(), DatapathError> {
        let Some(migration) = self.migration.take() else {
            return Ok(());
        };
        if !migration.names().is_empty() {
            tracing::info!(maps = ?migration.names(), "migration of pinned maps finished");
        }
        let ebpf = &self.ebpf;
        migration
            .finish(|name| ebpf.map(name).map(map_data))
            .map_err(|source| DatapathError::Migration {
                pin_dir: self.pin_dir.clone(),
                source: Box::new(source),
            })
    }

    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// A program by name, as a TC classifier (to attach or test-run it).
    pub fn classifier(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(prog_err(name, "is not a TC classifier"))
    }

    /// The loaded programs with their kernel ids.
    pub fn programs(&self) -> Result<Vec<LoadedProgram>, DatapathError> {
        names::ALL_PROGRAMS
            .iter()
            .map(|&name| {
                let program = self
                    .ebpf
                    .program(name)
                    .ok_or(DatapathError::MissingProgram { name })?;
                let info = program.info().map_err(prog_err(name, "reading its info"))?;
                Ok(LoadedProgram {
                    name,
                    id: info.id(),
                    tag: info.tag(),
                })
            })
            .collect()
    }

    /// The maps with their kernel ids.
    pub fn maps(&self) -> Result<Vec<LoadedMap>, DatapathError> {
        self.ebpf
            .maps()
            .map(|(name, map)| {
                let info = map_data(map).info().map_err(|source| DatapathError::Map {
                    name: "(listing)",
                    action: format!("reading the info of {name}"),
                    source: Box::new(source),
                })?;
                Ok(LoadedMap {
                    name: name.to_owned(),
                    id: info.id(),
                    key_size: info.key_size(),
                    value_size: info.value_size(),
                })
            })
            .collect()
    }

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
    pub fn upsert_shaped_endpoint(
        &mut self,
        ip: Ipv4Addr,
        info: EndpointInfo,
        egress_shaper_ifindex: u32,
    ) -> Result<(), DatapathError> {
        self.endpoints_map()?
            .insert(ip_key(ip), info, 0)
            .map_err(map_err(names::MAP_ENDPOINTS, format!("inserting {ip}")))?;
        let identity = VethEndpoint {
            pod_ip: ip_key(ip),
            pod_mac: info.pod_mac,
            host_mac: info.host_mac,
            stats: EndpointStats::default(),
            egress_shaper_ifindex,
            reserved: 0,
        };
        let name = names::MAP_VETHS;
        let mut veths = self.veths_map()?;
        let unchanged = veths.get(&info.host_ifindex, 0).is_ok_and(|per_cpu| {
            per_cpu.iter().all(|v| {
                VethEndpoint {
                    stats: EndpointStats::default(),
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

    /// Attaches podnet's programs to the pod veth `ifname` (in this thread's
    /// netns): from_pod on its TC ingress, to_pod on its TC egress; see
    /// [`Self::attach_pod_program`].
    pub fn attach_pod(&mut self, ifname: &str, replace: bool) -> Result<(), DatapathError> {
        for program in PodProgram::BOTH {
            self.attach_pod_program(program, ifname, replace)?;
        }
        Ok(())
    }

    /// Attaches `program` to the pod veth `ifname` as podnet's
    /// direct-action `cls_bpf` filter on a `clsact` qdisc, at
    /// [`POD_TC_PRIORITY`] / [`POD_TC_HANDLE`]. The filter lives as long as
    /// the veth; no pin, no process holds it.
    ///
    /// Why not TCX (which the node's own devices use): every TCX attach
    /// waits for an RCU grace period (`tcx_entry_sync()` is
    /// `synchronize_rcu()`) while holding the RTNL lock. Measured on this
    /// machine: 8 ms per TCX attach against 0.15-0.8 ms for clsact +
    /// `cls_bpf`; that was half of a CNI ADD, and every other netlink user
    /// on the node (parallel ADDs included) waited behind it.
    ///
    /// With `replace`, podnet's filter already on the veth (agent restart)
    /// gets the new program in place: `cls_bpf` swaps it under RCU, so no
    /// packet meets a veth without a program. Without one, it is created.
    pub fn attach_pod_program(
        &mut self,
        pod_program: PodProgram,
        ifname: &str,
        replace: bool,
    ) -> Result<(), DatapathError> {
        let (name, attach_type) = (pod_program.name(), pod_program.attach_type());
        let program = self.classifier(name)?;
        let tc_err = |action: &'static str| {
            move |source: aya::programs::ProgramError| DatapathError::TcFilter {
                ifname: ifname.to_owned(),
                action,
                source: Box::new(source),
            }
        };
        if replace
            && let Ok(existing) = SchedClassifierLink::attached(
                ifname,
                attach_type,
                POD_TC_PRIORITY,
                POD_TC_HANDLE,
                None,
            )
            // Fails (ENOENT) when the filter is not there: created below.
            && let Ok(id) = program.attach_to_link(existing)
        {
            keep_tc_filter(program.take_link(id).map_err(tc_err("taking the link"))?);
            return Ok(());
        }
        match aya::programs::tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            Err(aya::programs::TcError::NetlinkError(e))
                if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(DatapathError::TcFilter {
                    ifname: ifname.to_owned(),
                    action: "adding the clsact qdisc",
                    source: Box::new(source),
                });
            }
        }
        let id = program
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::Netlink(NlOptions {
                    priority: POD_TC_PRIORITY,
                    handle: POD_TC_HANDLE,
                    classid: None,
                }),
            )
            .map_err(tc_err(match pod_program {
                PodProgram::FromPod => "adding the from_pod cls_bpf filter (ingress)",
                PodProgram::ToPod => "adding the to_pod cls_bpf filter (egress)",
            }))?;
        keep_tc_filter(program.take_link(id).map_err(tc_err("taking the link"))?);
        Ok(())
    }

    /// Attaches `program` to `ifname` by TCX and pins the link at `pin`
    /// (see [`Self::attach_pod_program`] for why pods differ).
    pub fn attach_node_program(
        &mut self,
        node_program: NodeProgram,
        ifname: &str,
        pin: &Path,
    ) -> Result<(), DatapathError> {
        let name = node_program.name;
        let program = self.classifier(name)?;
        let link_id = program
            .attach(ifname, node_program.attach_type)
            .map_err(prog_err(name, "attaching by TCX"))?;
        let link = program
            .take_link(link_id)
            .map_err(prog_err(name, "taking the link"))?;
        let fd_link: FdLink = link.try_into().map_err(|source| DatapathError::Link {
            name,
            action: format!("{ifname}: the attachment is not a bpf_link (no TCX?)"),
            source: Box::new(source),
        })?;
        let _ = std::fs::remove_file(pin);
        fd_link.pin(pin).map_err(|source| DatapathError::Pin {
            path: pin.to_owned(),
            source: Box::new(source),
        })?;
        Ok(())
    }

    /// Points the pinned link at `pin` to this datapath's from_pod
    /// (`bpf_link_update`: atomic, no packet sees no program). Used after a
    /// restart, when the running link still holds the previous program.
    pub fn reattach_from_pod(&mut self, pin: &Path) -> Result<(), DatapathError> {
        self.reattach(names::PROG_FROM_POD, pin)
    }

    /// Points the pinned link at `pin` to program `name` of this datapath.
    pub fn reattach(&mut self, name: &'static str, pin: &Path) -> Result<(), DatapathError> {
        let pinned = PinnedLink::from_pin(pin).map_err(|source| DatapathError::Link {
            name,
            action: format!("opening the pinned link {}", pin.display()),
            source: Box::new(source),
        })?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
            DatapathError::Link {
                name,
                action: format!("{} is not a TC link", pin.display()),
                source: Box::new(source),
            }
        })?;
        let program = self.classifier(name)?;
        let link_id = program
            .attach_to_link(link)
            .map_err(prog_err(name, "replacing the program of a pinned link"))?;
        // The pin keeps the link; our fd copy can go.
        let _ = program.take_link(link_id);
        Ok(())
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

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        self.ebpf
            .map(name)
            .ok_or(DatapathError::MissingMap { name })
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
/// node or flow; the counter arrays and the config are always full).
pub const FILLED_MAPS: [&str; 4] = [
    names::MAP_ENDPOINTS,
    names::MAP_VETHS,
    names::MAP_REMOTE,
    names::MAP_STACK_FLOWS,
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
}

impl PinnedMapReader {
    /// Opens the maps pinned in `pin_dir` (by a loaded [`Datapath`]).
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let open = |name: &'static str| -> Result<aya::maps::Map, DatapathError> {
            let data =
                MapData::from_pin(pin_dir.join(name)).map_err(map_err(name, "opening its pin"))?;
            aya::maps::Map::from_map_data(data).map_err(map_err(name, "reading its type"))
        };
        Ok(Self {
            verdicts: open(names::MAP_VERDICTS)?,
            drops: open(names::MAP_DROPS)?,
            veths: open(names::MAP_VETHS)?,
            filled: FILLED_MAPS
                .iter()
                .map(|&name| Ok((name, open(name)?)))
                .collect::<Result<_, DatapathError>>()?,
        })
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
            .map(|&(name, ref map)| {
                let max_entries = map_data(map)
                    .info()
                    .map_err(map_err(name, "reading its info"))?
                    .max_entries();
                let entries = count_keys(name, map)?;
                Ok(MapFill {
                    name,
                    // A map changing while it is walked can make the walk
                    // start over; never report more than fits.
                    entries: entries.min(max_entries),
                    max_entries,
                })
            })
            .collect()
    }
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
        _ => return Err(DatapathError::MissingMap { name }),
    };
    counted.map_err(map_err(name, "iterating its keys"))
}

/// The kernel object behind a map of one of the kinds the datapath declares.
fn map_data(map: &aya::maps::Map) -> &MapData {
    use aya::maps::Map;
    match map {
        Map::HashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::LpmTrie(data)
        | Map::Array(data)
        | Map::LruHashMap(data)
        | Map::RingBuf(data)
        | Map::Unsupported(data) => data,
        other => unreachable!("podnet-ebpf declares no map of kind {other:?}"),
    }
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of the datapath's
/// timestamps (`bpf_ktime_get_coarse_ns`).
#[must_use]
pub fn monotonic_coarse_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns` (drop
/// events' timestamps).
#[must_use]
pub fn monotonic_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// Map key of a pod address: the address bytes as they are on the wire,
/// which is what the program reads from the packet.
#[must_use]
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

#[cfg(test)]
mod tests {
    use aya::{maps::MapError, sys::SyscallError};

    use super::removed;

    fn syscall(errno: i32) -> MapError {
        MapError::SyscallError(SyscallError {
            call: "bpf_map_delete_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn removing_an_absent_key_is_not_an_error() {
        assert!(removed(Err(syscall(libc::ENOENT))).is_ok());
        assert!(removed(Err(MapError::KeyNotFound)).is_ok());
        assert!(removed(Ok(())).is_ok());
        assert!(removed(Err(syscall(libc::EPERM))).is_err());
    }
}
