//! podnet userspace library: loading the datapath, talking to the kernel.
//! The binaries (`podnetd`, later `podnet` and `podnetctl`) are thin
//! front-ends over it.

pub mod agent;
pub mod api;
pub mod bpffs;
pub mod cni;
pub mod datapath;
pub mod datastore;
pub mod endpoint;
pub mod explain;
pub mod failpoint;
pub mod install;
pub mod ipam;
pub mod model;
pub mod netlink;
pub mod objects_ctl;
pub mod pinned_maps;
pub mod policy;
pub mod services;
pub mod shaping;
