//! One cluster object of any kind podnet keeps.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Serialize, Serializer};

use super::{
    kind::{Kind, ObjectKey},
    types::{EndpointSlice, Namespace, NetworkPolicy, Pod, Service},
};

/// The namespace a namespaced object without one goes to, as with
/// `kubectl apply` and no `-n`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A cluster object, as the Kubernetes API type of its kind. The big types
/// are boxed so that the enum stays small in the maps holding thousands.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterObject {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    NetworkPolicy(Box<NetworkPolicy>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

impl ClusterObject {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Namespace(_) => Kind::Namespace,
            Self::Pod(_) => Kind::Pod,
            Self::NetworkPolicy(_) => Kind::NetworkPolicy,
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Namespace(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::NetworkPolicy(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Namespace(o) => &mut o.metadata,
            Self::Pod(o) => &mut o.metadata,
            Self::NetworkPolicy(o) => &mut o.metadata,
            Self::Service(o) => &mut o.metadata,
            Self::EndpointSlice(o) => &mut o.metadata,
        }
    }

    /// `metadata.name`, empty when absent (validation refuses that).
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    /// The namespace the object is in: `None` for a Namespace, else its
    /// `metadata.namespace` or `default` when absent.
    pub fn namespace(&self) -> Option<&str> {
        self.kind().namespaced().then(|| {
            self.metadata()
                .namespace
                .as_deref()
                .filter(|ns| !ns.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE)
        })
    }

    /// Where the object is stored (namespace defaulted as `namespace`).
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            kind: self.kind(),
            namespace: self.namespace().map(str::to_owned),
            name: self.name().to_owned(),
        }
    }

    /// `metadata.labels`, an empty map when absent.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.metadata().labels.as_ref().unwrap_or(&NONE)
    }

    /// The revision the datastore stored the object at, if it came from one.
    pub fn resource_version(&self) -> Option<&str> {
        self.metadata().resource_version.as_deref()
    }
}

/// As the Kubernetes API type (with its `apiVersion` and `kind`): for
/// `get -o yaml|json`.
impl Serialize for ClusterObject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Namespace(o) => o.serialize(serializer),
            Self::Pod(o) => o.serialize(serializer),
            Self::NetworkPolicy(o) => o.serialize(serializer),
            Self::Service(o) => o.serialize(serializer),
            Self::EndpointSlice(o) => o.serialize(serializer),
        }
    }
}

macro_rules! from_type {
    ($($variant:ident),*) => {$(
        impl From<$variant> for ClusterObject {
            fn from(object: $variant) -> Self {
                Self::$variant(Box::new(object))
            }
        }
    )*};
}
from_type!(Namespace, Pod, NetworkPolicy, Service, EndpointSlice);
