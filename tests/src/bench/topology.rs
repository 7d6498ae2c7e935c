//! The dataplanes the bench compares, each built as a topology of
//! namespaces that a [`super::Pair`] measures across.

mod flannel;
mod podnet;
mod reference;
mod veth;

pub use flannel::FlannelCluster;
pub use podnet::{podnet_cluster, podnet_cluster_with, podnet_lab};
pub use reference::{ReferenceNode, podnet_add_del};
pub use veth::{VethPair, set_ipv4_big_tcp};
