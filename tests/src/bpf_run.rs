//! Harness for running the datapath's programs on crafted frames with
//! `BPF_PROG_TEST_RUN`: no interfaces, no namespaces, just the verifier-loaded
//! program, its maps and a buffer.

use std::io;

use aya::programs::{ProgramError, TestRun as _, TestRunOptions};
use podnet::datapath::Datapath;

use crate::PrivateBpffs;

/// The datapath loaded with its maps in a private bpffs.
pub struct BpfHarness {
    // Declared first: dropped (programs and maps closed) before the bpffs goes.
    pub datapath: Datapath,
    _bpffs: PrivateBpffs,
}

/// What a program did with one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// The TC return code (`TC_ACT_*`).
    pub verdict: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
}

impl BpfHarness {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let bpffs = PrivateBpffs::new(tag)?;
        let datapath = Datapath::load(bpffs.path())?;
        Ok(Self {
            datapath,
            _bpffs: bpffs,
        })
    }

    /// Runs program `name` once on `frame`. The kernel refuses frames shorter
    /// than an Ethernet header before the program runs (EINVAL); that error is
    /// returned as is.
    pub fn run(&mut self, name: &'static str, frame: &[u8]) -> Result<RunOutcome, io::Error> {
        let program = self.datapath.classifier(name).map_err(io::Error::other)?;
        // Room for programs that grow the frame (encapsulation).
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
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
