//! The lab: a cluster on one machine. Nodes are network namespaces joined by
//! an underlay (a veth each to a bridge in a fabric namespace, which also
//! plays "a host outside the cluster"); each node runs its own podnetd with
//! its own bpffs, state and socket; pods are namespaces attached by the real
//! `podnet` binary, as a runtime does. Optionally a demo Service (see
//! [`crate::services`]) is installed on every node, as kube-proxy would,
//! with backend servers in two pods. The layout is written to
//! `<run dir>/lab.json` for scripts and tests.
//!
//! `up` leaves everything running (the lab outlives the command); `down`
//! removes it all and is safe to run twice or after a crash. Tests wrap it
//! in [`LabGuard`], which calls `down` on drop.

mod checks;
mod etcd;
mod guard;
mod matrix;
mod model;
mod objects;
mod processes;
mod render;
mod up;

pub use checks::{Probe, check, check_plan, ping};
pub use guard::{LabGuard, LabOptions};
pub use matrix::{CheckPlan, FULL_MATRIX_MAX_PROBES};
pub use model::{
    DEFAULT_RUN_DIR, FABRIC_HOST, LabDatastore, LabEtcdMember, LabLayout, LabNode, LabPod,
    LabServer, LabSpec, ServiceKind,
};
pub use processes::LAB_NAMESPACE;
pub use render::render;
pub use up::{down, up, up_with_bins};

/// The lab's names for entering a node's or pod's namespace (tests call them
/// through `lab::`); the one way in is `crate::netns`.
pub use crate::netns::{command_in as in_netns, run_in as on_netns_thread};
