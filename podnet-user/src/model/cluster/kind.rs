//! The kinds podnet keeps, their names as the Kubernetes API and `kubectl`
//! spell them, and the key an object is stored and looked up under.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A kind of cluster object podnet keeps; in JSON (counts in a status, for
/// instance) its `kind` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
    EndpointSlice,
}

/// Every kind, in the order `get` lists and counts them: namespaces first,
/// as the objects in them refer to them.
pub const ALL_KINDS: [Kind; 5] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::NetworkPolicy,
    Kind::Service,
    Kind::EndpointSlice,
];

impl Kind {
    /// `apiVersion` as objects carry it (`group/version`, or `v1` for core).
    pub const fn api_version(self) -> &'static str {
        match self {
            Self::Namespace | Self::Pod | Self::Service => "v1",
            Self::NetworkPolicy => "networking.k8s.io/v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// `kind` as objects carry it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Pod => "Pod",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
        }
    }

    /// The REST resource name (lower-case plural), also the first segment
    /// of the kind's storage keys.
    pub const fn plural(self) -> &'static str {
        match self {
            Self::Namespace => "namespaces",
            Self::Pod => "pods",
            Self::NetworkPolicy => "networkpolicies",
            Self::Service => "services",
            Self::EndpointSlice => "endpointslices",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub const fn namespaced(self) -> bool {
        !matches!(self, Self::Namespace)
    }

    /// The kind of an object's `apiVersion` and `kind`, if podnet keeps it.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        ALL_KINDS
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// `kubectl get`'s short names, beside the singular and plural.
    const fn short_names(self) -> &'static [&'static str] {
        match self {
            Self::Namespace => &["ns"],
            Self::Pod => &["po"],
            Self::NetworkPolicy => &["netpol"],
            Self::Service => &["svc"],
            Self::EndpointSlice => &[],
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "the server doesn't have a resource type \"{0}\" (podnet keeps namespaces, pods, networkpolicies, services and endpointslices)"
)]
pub struct UnknownKind(pub String);

/// The names `kubectl get` accepts for a kind, case-insensitively: the
/// singular (`networkpolicy`), the plural (`networkpolicies`), the short
/// name (`netpol`), also qualified with the group (`networkpolicies.networking.k8s.io`).
impl FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.to_ascii_lowercase();
        // `resource.group`, as kubectl takes it; the core group has no suffix.
        let (name, group) = match lower.split_once('.') {
            Some((name, group)) => (name, Some(group)),
            None => (lower.as_str(), None),
        };
        ALL_KINDS
            .into_iter()
            .find(|k| {
                let names_match = name == k.name().to_ascii_lowercase()
                    || name == k.plural()
                    || k.short_names().contains(&name);
                let group_matches = group.is_none_or(|g| {
                    k.api_version()
                        .rsplit_once('/')
                        .is_some_and(|(kind_group, _)| kind_group == g)
                });
                names_match && group_matches
            })
            .ok_or_else(|| UnknownKind(text.to_owned()))
    }
}

/// Where an object is: its kind, its namespace (namespaced kinds only) and
/// its name. Its text form (`Display`/`FromStr`) is the object's path under
/// a datastore's prefix: `<plural>/<namespace>/<name>` or `<plural>/<name>`.
/// Names and namespaces cannot contain `/` (DNS-1123), so the form is
/// unambiguous for every valid object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    /// A namespaced object's key.
    pub fn namespaced(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: Some(namespace.into()),
            name: name.into(),
        }
    }

    /// A cluster-scoped object's key (a Namespace).
    pub fn cluster(kind: Kind, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: None,
            name: name.into(),
        }
    }

    /// The prefix every key of `kind` starts with (`pods/`), for listing a
    /// kind; `namespace` narrows a namespaced kind to one namespace
    /// (`pods/x/`).
    pub fn prefix(kind: Kind, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if kind.namespaced() => format!("{}/{ns}/", kind.plural()),
            _ => format!("{}/", kind.plural()),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{ns}/{}", self.kind.plural(), self.name),
            None => write!(f, "{}/{}", self.kind.plural(), self.name),
        }
    }
}

/// In JSON as its text form.
impl Serialize for ObjectKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ObjectKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyParseError {
    #[error("object key {key:?}: unknown resource {resource:?}")]
    UnknownResource { key: String, resource: String },
    #[error("object key {key:?}: {kind} keys are {expected}")]
    Shape {
        key: String,
        kind: Kind,
        expected: &'static str,
    },
}

impl FromStr for ObjectKey {
    type Err = KeyParseError;

    /// Only the canonical plural is taken here: a key is written by
    /// `Display`, not by an operator.
    fn from_str(key: &str) -> Result<Self, Self::Err> {
        let mut parts = key.split('/');
        let resource = parts.next().unwrap_or_default();
        let kind = ALL_KINDS
            .into_iter()
            .find(|k| k.plural() == resource)
            .ok_or_else(|| KeyParseError::UnknownResource {
                key: key.to_owned(),
                resource: resource.to_owned(),
            })?;
        let rest: Vec<&str> = parts.collect();
        let shape = |expected| KeyParseError::Shape {
            key: key.to_owned(),
            kind,
            expected,
        };
        match (kind.namespaced(), rest.as_slice()) {
            (true, [ns, name]) if !ns.is_empty() && !name.is_empty() => {
                Ok(Self::namespaced(kind, *ns, *name))
            }
            (true, _) => Err(shape("<plural>/<namespace>/<name>")),
            (false, [name]) if !name.is_empty() => Ok(Self::cluster(kind, *name)),
            (false, _) => Err(shape("<plural>/<name>")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_names_parse() {
        for (text, kind) in [
            ("ns", Kind::Namespace),
            ("namespace", Kind::Namespace),
            ("Namespaces", Kind::Namespace),
            ("po", Kind::Pod),
            ("pod", Kind::Pod),
            ("pods", Kind::Pod),
            ("netpol", Kind::NetworkPolicy),
            ("networkpolicy", Kind::NetworkPolicy),
            ("networkpolicies", Kind::NetworkPolicy),
            ("networkpolicies.networking.k8s.io", Kind::NetworkPolicy),
            ("svc", Kind::Service),
            ("service", Kind::Service),
            ("services", Kind::Service),
            ("endpointslice", Kind::EndpointSlice),
            ("endpointslices", Kind::EndpointSlice),
            ("endpointslices.discovery.k8s.io", Kind::EndpointSlice),
            ("EndpointSlice", Kind::EndpointSlice),
        ] {
            assert_eq!(text.parse::<Kind>(), Ok(kind), "{text}");
        }
        for bad in ["", "deployments", "ep", "pods.networking.k8s.io", "netpols"] {
            assert!(bad.parse::<Kind>().is_err(), "{bad}");
        }
    }

    #[test]
    fn types_map_to_kinds() {
        for kind in ALL_KINDS {
            assert_eq!(Kind::from_type(kind.api_version(), kind.name()), Some(kind));
        }
        assert_eq!(Kind::from_type("v1", "NetworkPolicy"), None);
        assert_eq!(
            Kind::from_type("networking.k8s.io/v1beta1", "NetworkPolicy"),
            None
        );
        assert_eq!(Kind::from_type("v1", "ConfigMap"), None);
    }

    #[test]
    fn keys_round_trip_through_text() {
        let keys = [
            ObjectKey::namespaced(Kind::NetworkPolicy, "x", "deny-all"),
            ObjectKey::namespaced(Kind::Pod, "default", "a.b"),
            ObjectKey::cluster(Kind::Namespace, "kube-system"),
            ObjectKey::namespaced(Kind::EndpointSlice, "y", "web-abc12"),
        ];
        assert_eq!(keys[0].to_string(), "networkpolicies/x/deny-all");
        assert_eq!(keys[2].to_string(), "namespaces/kube-system");
        for key in keys {
            assert_eq!(key.to_string().parse::<ObjectKey>(), Ok(key.clone()));
            assert!(
                key.to_string()
                    .starts_with(&ObjectKey::prefix(key.kind, key.namespace.as_deref()))
            );
        }
    }

    #[test]
    fn kinds_and_keys_in_json() {
        let key = ObjectKey::namespaced(Kind::Service, "x", "web");
        let json = serde_json::to_string(&(Kind::NetworkPolicy, &key)).expect("encodes");
        assert_eq!(json, r#"["NetworkPolicy","services/x/web"]"#);
        let back: (Kind, ObjectKey) = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back, (Kind::NetworkPolicy, key));
        assert!(serde_json::from_str::<ObjectKey>(r#""services/x""#).is_err());
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            "",
            "pods",
            "pods/x",
            "pods/x/",
            "pods//a",
            "pods/x/a/b",
            "namespaces/x/y",
            "namespaces/",
            "netpol/x/a",
            "configmaps/x/a",
        ] {
            assert!(bad.parse::<ObjectKey>().is_err(), "{bad}");
        }
    }
}
