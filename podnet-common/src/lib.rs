//! Types shared by podnet's eBPF programs (kernel side) and its userspace.
//!
//! Everything here crosses the user/kernel boundary through BPF maps, so every
//! type is `#[repr(C)]`, spells out its padding, and has its size checked at
//! compile time: a layout drift between the two sides would otherwise show up
//! as silently wrong forwarding, not as an error.
#![no_std]

pub mod counters;
pub mod endpoint;
pub mod event;
pub mod flow;
pub mod names;
pub mod node;
pub mod policy;
pub mod service;
pub mod socket_lb;
pub mod tc;

pub use counters::{DropReason, Verdict};
pub use endpoint::{EndpointInfo, EndpointStats, VethEndpoint};
pub use event::{DropEvent, EventLimiter, Program};
pub use flow::{FlowKey, FlowOwner, StackFlow};
pub use node::{NodeConfig, RemoteNode};
pub use policy::{PolicyCidrKey, PolicyKey, PolicyRule, TrackedConnection};
pub use service::{Affinity, AffinityKey, Backend, BackendKey, ServiceEntry, ServiceKey};
pub use socket_lb::{SocketFrontend, SocketLbCounter, SocketReverseKey};
