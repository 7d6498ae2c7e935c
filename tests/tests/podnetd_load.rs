//! The agent binary loads the datapath on this kernel, pins its maps where
//! told, and a restart re-uses the pinned maps with their contents.

use std::{net::Ipv4Addr, process::Command};

use podnet::datapath::Datapath;
use podnet_common::{EndpointInfo, names};
use podnet_tests::{PrivateBpffs, bins, privileged};

fn podnetd_once(bpffs: &PrivateBpffs) -> String {
    let out = Command::new(bins::binary("podnetd"))
        .args(["--once", "--bpffs-dir"])
        .arg(bpffs.path())
        .output()
        .expect("run podnetd");
    assert!(
        out.status.success(),
        "podnetd --once failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn podnetd_loads_programs_and_pins_maps() {
    if !privileged("podnetd_loads_programs_and_pins_maps") {
        return;
    }
    let bpffs = PrivateBpffs::new("podnetd").expect("private bpffs");
    let stdout = podnetd_once(&bpffs);
    for program in names::ALL_PROGRAMS {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("program") && l.contains(program)),
            "podnetd reports program {program}:\n{stdout}"
        );
    }
    for map in names::ALL_MAPS {
        assert!(bpffs.path().join(map).exists(), "map {map} pinned");
    }

    // What a previous agent wrote is still there for the next one.
    let ip = Ipv4Addr::new(10, 244, 0, 7);
    let info = EndpointInfo {
        host_ifindex: 77,
        flags: 0,
        pod_mac: [2, 0, 0, 0, 0, 7],
        host_mac: [2, 0, 0, 0, 0xff, 7],
    };
    Datapath::load(bpffs.path())
        .expect("load against the pins")
        .upsert_endpoint(ip, info)
        .expect("write an endpoint");
    podnetd_once(&bpffs);
    let mut again = Datapath::load(bpffs.path()).expect("reload against the pins");
    assert_eq!(
        again.endpoint(ip).expect("lookup"),
        Some(info),
        "pinned map kept its entry"
    );
}

/// An upgrade over the pins of a datapath that counted fewer verdicts: the
/// new verdicts get a slot, the old counts are carried over (the map is
/// migrated to its new layout), the rest of the pinned state is kept.
#[test]
fn counters_pinned_by_an_older_datapath_are_grown() {
    if !privileged("counters_pinned_by_an_older_datapath_are_grown") {
        return;
    }
    let bpffs = PrivateBpffs::new("oldcounters").expect("private bpffs");
    // The verdicts map as the datapath before stack flows pinned it.
    let pin = bpffs.path().join(names::MAP_VERDICTS);
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "8",
            "name",
        ])
        .arg(names::MAP_VERDICTS)
        .status()
        .expect("run bpftool (installed by cargo xtask setup)");
    assert!(status.success(), "bpftool map create");
    // The old datapath had counted 5 redirects on every CPU.
    let cpus = aya::util::nr_cpus().expect("possible CPUs");
    {
        let old = aya::maps::MapData::from_pin(&pin).expect("the old pin");
        let mut array: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(old))
                .expect("a per-CPU array");
        array
            .set(
                podnet_common::Verdict::RedirectPeer as u32,
                aya::maps::PerCpuValues::try_from(vec![5u64; cpus]).expect("values"),
                0,
            )
            .expect("count in the old map");
    }
    let mut datapath = Datapath::load(bpffs.path()).expect("load over the old pins");
    datapath.finish_migration().expect("finish the migration");
    let counters = datapath.counters().expect("every verdict has a counter");
    assert_eq!(
        counters.verdict(podnet_common::Verdict::RedirectPeer),
        5 * cpus as u64,
        "the old counts are carried over"
    );
    assert!(
        !bpffs
            .path()
            .join(format!(
                "{}{}",
                names::MAP_VERDICTS,
                podnet::pinned_maps::RETIRED_SUFFIX
            ))
            .exists(),
        "no retired pin is left behind"
    );
    assert_eq!(
        counters.verdict(podnet_common::Verdict::StackFlow),
        0,
        "the newest verdict is readable"
    );
    let info = aya::maps::MapInfo::from_pin(&pin).expect("the pinned verdicts map");
    assert_eq!(info.max_entries(), podnet_common::Verdict::COUNT);
}
