//! Harness for running the datapath's programs on crafted frames with
//! `BPF_PROG_TEST_RUN`: no interfaces, no namespaces, just the verifier-loaded
//! program, its maps and a buffer.

use std::{io, net::Ipv4Addr};

use aya::programs::{ProgramError, TestRun as _, TestRunOptions};
use podnet::datapath::Datapath;

use crate::{PrivateBpffs, netns::NetNs};

/// Offset of `ifindex` in `struct __sk_buff` (UAPI, stable). A test run's
/// input context may be shorter than the struct (the rest reads as zero).
const SKB_IFINDEX_OFFSET: usize = 40;

/// A namespace with an ARP-capable "underlay" device (one end of a veth
/// pair, the other end beside it) that a test run can name as the device a
/// frame arrived on: `skb->pkt_type` is then computed against its MAC, and
/// `bpf_fib_lookup` sees the namespace's addresses, routes and neighbours.
pub struct TestUnderlay {
    pub ns: NetNs,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

impl TestUnderlay {
    /// The device gets `mac` and `address/prefix`, and a permanent neighbour
    /// entry for each of `neighbours`.
    pub fn new(
        tag: &str,
        mac: [u8; 6],
        address: (Ipv4Addr, u8),
        neighbours: &[(Ipv4Addr, [u8; 6])],
    ) -> anyhow::Result<Self> {
        const DEV: &str = "pnul0";
        let ns = NetNs::new(tag)?;
        let mac_text = mac_string(mac);
        ns.ip(&[
            "link", "add", DEV, "address", &mac_text, "type", "veth", "peer", "name", "pnul1",
        ])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/{}", address.0, address.1),
            "dev",
            DEV,
        ])?;
        ns.ip(&["link", "set", "pnul1", "up"])?;
        // bpf_fib_lookup answers only for a device that forwards, as a
        // node's does (BPF_FIB_LKUP_RET_FWD_DISABLED otherwise).
        crate::netns::run(ns.command("sysctl")?.args(["-qw", "net.ipv4.ip_forward=1"]))?;
        ns.ip(&["link", "set", DEV, "up"])?;
        for (ip, neighbour_mac) in neighbours {
            ns.ip(&[
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &mac_string(*neighbour_mac),
                "dev",
                DEV,
                "nud",
                "permanent",
            ])?;
        }
        let ifindex = ns
            .spawn(|| nix::net::if_::if_nametoindex(DEV))?
            .join()
            .map_err(|_| anyhow::anyhow!("ifindex lookup thread panicked"))??;
        Ok(Self { ns, ifindex, mac })
    }

    /// A test run's input context (`struct __sk_buff`, cut after
    /// `ifindex`) naming this device as the one the frame arrived on.
    #[must_use]
    pub fn skb_context(&self) -> [u8; SKB_IFINDEX_OFFSET + 4] {
        let mut context = [0u8; SKB_IFINDEX_OFFSET + 4];
        context[SKB_IFINDEX_OFFSET..].copy_from_slice(&self.ifindex.to_ne_bytes());
        context
    }

    /// Runs `f` on a thread inside the namespace: a test run looks the
    /// context's device up in the calling thread's namespace
    /// (bpf_prog_test_run_skb).
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        crate::netns::run_in_path(&self.ns.path(), f)
    }
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The datapath loaded with its maps in a private bpffs.
pub struct BpfHarness {
    // Declared first: dropped (programs and maps closed) before the bpffs goes.
    pub datapath: Datapath,
    bpffs: PrivateBpffs,
}

/// What a program did with one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// The TC return code (`podnet_common::tc::TC_ACT_*`).
    pub verdict: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
}

impl BpfHarness {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let bpffs = PrivateBpffs::new(tag)?;
        let datapath = Datapath::load(bpffs.path())?;
        Ok(Self { datapath, bpffs })
    }

    /// The private bpffs directory the maps are pinned in.
    #[must_use]
    pub fn pin_dir(&self) -> &std::path::Path {
        self.bpffs.path()
    }

    /// Runs program `name` once on `frame`. The kernel refuses frames shorter
    /// than an Ethernet header before the program runs (EINVAL); that error is
    /// returned as is.
    pub fn run(&mut self, name: &'static str, frame: &[u8]) -> Result<RunOutcome, io::Error> {
        self.run_with_context(name, frame, None)
    }

    /// Runs program `name` once on `frame` as if it arrived on `underlay`'s
    /// device, inside its namespace.
    pub fn run_arriving_on(
        &mut self,
        underlay: &TestUnderlay,
        name: &'static str,
        frame: &[u8],
    ) -> Result<RunOutcome, io::Error> {
        let context = underlay.skb_context();
        underlay.run_inside(|| self.run_with_context(name, frame, Some(&context)))?
    }

    fn run_with_context(
        &mut self,
        name: &'static str,
        frame: &[u8],
        context: Option<&[u8]>,
    ) -> Result<RunOutcome, io::Error> {
        let program = self.datapath.classifier(name).map_err(io::Error::other)?;
        // Room for programs that grow the frame (encapsulation).
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: context,
                repeat: 1,
                ..TestRunOptions::default()
            })
            .map_err(|e| match e {
                ProgramError::SyscallError(sys) => sys.io_error,
                other => io::Error::other(other),
            })?;
        out.truncate(result.data_size_out as usize);
        Ok(RunOutcome {
            verdict: result.return_value.cast_signed(),
            frame: out,
        })
    }
}
