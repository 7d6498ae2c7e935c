//! Names of the BPF programs and maps, as the object file and the pin
//! directory spell them. The kernel keeps at most 15 bytes of an object name
//! (`BPF_OBJ_NAME_LEN` = 16 with the NUL), so every name stays within that and
//! the pinned file has the same name as the kernel object.

/// TC ingress program on each pod's host-side veth.
pub const PROG_FROM_POD: &str = "from_pod";

/// Local endpoints: pod IPv4 (network byte order) -> [`crate::EndpointInfo`].
pub const MAP_ENDPOINTS: &str = "podnet_endpts";
/// Per-CPU packet counters by [`crate::Verdict`].
pub const MAP_VERDICTS: &str = "podnet_verdicts";
/// Per-CPU drop counters by [`crate::DropReason`].
pub const MAP_DROPS: &str = "podnet_drops";
/// Per-CPU per-endpoint counters: host veth ifindex -> [`crate::EndpointStats`].
pub const MAP_ENDPOINT_STATS: &str = "podnet_ep_stats";

/// Every map the datapath pins, for tools that list or clean the pin directory.
pub const ALL_MAPS: [&str; 4] = [MAP_ENDPOINTS, MAP_VERDICTS, MAP_DROPS, MAP_ENDPOINT_STATS];
/// Every program in the object.
pub const ALL_PROGRAMS: [&str; 1] = [PROG_FROM_POD];

/// Capacity of the local-endpoints map (pods per node).
pub const MAX_ENDPOINTS: u32 = 16_384;

const _: () = {
    let mut i = 0;
    while i < ALL_MAPS.len() {
        assert!(
            ALL_MAPS[i].len() <= 15,
            "BPF object names are at most 15 bytes"
        );
        i += 1;
    }
};
