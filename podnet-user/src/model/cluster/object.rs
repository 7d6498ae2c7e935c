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

    /// `kubectl apply -n <namespace>`: a namespaced object without a
    /// namespace goes to `namespace`; one that names another is refused, as
    /// kubectl refuses it. A Namespace is left alone.
    pub fn set_namespace_from_flag(&mut self, namespace: &str) -> Result<(), NamespaceMismatch> {
        if !self.kind().namespaced() {
            return Ok(());
        }
        let meta = self.metadata_mut();
        match meta.namespace.as_deref().filter(|ns| !ns.is_empty()) {
            None => {
                meta.namespace = Some(namespace.to_owned());
                Ok(())
            }
            Some(own) if own == namespace => Ok(()),
            Some(own) => Err(NamespaceMismatch {
                object: own.to_owned(),
                flag: namespace.to_owned(),
            }),
        }
    }

    /// The revision the datastore stored the object at, if it came from one.
    pub fn resource_version(&self) -> Option<&str> {
        self.metadata().resource_version.as_deref()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the namespace from the provided object {object:?} does not match the namespace {flag:?}. You must pass '--namespace={object}' to perform this operation."
)]
pub struct NamespaceMismatch {
    pub object: String,
    pub flag: String,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cluster::decode;

    fn one(text: &str) -> ClusterObject {
        decode(text).expect("decodes").remove(0)
    }

    #[test]
    fn namespace_flag_fills_in_or_must_agree() {
        let mut pod = one("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n");
        assert_eq!(pod.namespace(), Some("default"));
        pod.set_namespace_from_flag("x")
            .expect("no namespace of its own");
        assert_eq!(pod.key().to_string(), "pods/x/a");
        pod.set_namespace_from_flag("x").expect("the same");
        let err = pod.set_namespace_from_flag("y").expect_err("another");
        assert_eq!(
            err.to_string(),
            "the namespace from the provided object \"x\" does not match the namespace \"y\". You must pass '--namespace=x' to perform this operation."
        );
        let mut ns = one("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n");
        ns.set_namespace_from_flag("y").expect("cluster-scoped");
        assert_eq!(ns.key().to_string(), "namespaces/a");
    }

    #[test]
    fn accessors_read_the_metadata() {
        let object = one(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x, labels: {a: b}, resourceVersion: '9'}\n",
        );
        assert_eq!(
            (object.kind(), object.name(), object.namespace()),
            (Kind::Service, "s", Some("x"))
        );
        assert_eq!(object.labels().get("a").map(String::as_str), Some("b"));
        assert_eq!(object.resource_version(), Some("9"));
        let bare = one("apiVersion: v1\nkind: Namespace\nmetadata: {}\n");
        assert_eq!(
            (bare.name(), bare.namespace(), bare.labels().len()),
            ("", None, 0)
        );
        let shown = serde_json::to_value(&object).expect("serializes");
        assert_eq!(shown["kind"], "Service");
        assert_eq!(shown["apiVersion"], "v1");
    }
}
