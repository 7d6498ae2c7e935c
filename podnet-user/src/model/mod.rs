//! What the cluster is made of, as plain data independent of where it comes
//! from (the nodes file, etcd, later the Kubernetes API) and of who uses it
//! (the agent, the socket API, podnetctl). Backends convert to these types;
//! nothing here does I/O.

pub mod cluster;
mod node;

pub use node::{NodeRecord, NodeState, NodeStatus};
