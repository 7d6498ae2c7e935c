//! The cluster objects podnet keeps in its datastore in the Kubernetes
//! API's shape (Namespaces, Pods, NetworkPolicies, Services,
//! EndpointSlices), as the `k8s-openapi` types: what they are
//! (`ClusterObject`, `Kind`, `ObjectKey`), how an operator's file becomes
//! objects (`decode`), the API server's checks (`validate`), the one byte
//! form they are stored in (`stored`), the in-memory view an agent holds
//! of them (`view`), which labels a selector selects (`selector`) and the
//! columns `get` prints (`table`). No I/O: the datastore writes and watches, a
//! Kubernetes API watcher could feed the same `ClusterModel` later.

mod decode;
mod kind;
mod object;
mod selector;
mod stored;
mod table;
pub mod validate;
mod view;

#[cfg(test)]
mod corpus_tests;

pub use decode::{DecodeError, Position, decode};
pub use kind::{ALL_KINDS, KeyParseError, Kind, ObjectKey, UnknownKind};
pub use object::{ClusterObject, DEFAULT_NAMESPACE, NamespaceMismatch};
pub use selector::{selector_matches, service_selects};
pub use stored::{EncodeError, StoredError};
pub use table::{columns, format_labels, format_selector};
pub use validate::{FieldError, FieldErrorType, ValidationError};
pub use view::{
    Applied, ClusterModel, ModelEvent, PodEndpointRecord, Revision, SERVICE_NAME_LABEL,
};

/// The objects' types, so that users of the model need no direct
/// dependency on `k8s-openapi` (and get the same version).
pub mod types {
    pub use k8s_openapi::api::core::v1::{
        Container, ContainerPort, Namespace, Pod, PodSpec, Service, ServicePort, ServiceSpec,
    };
    pub use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
    pub use k8s_openapi::api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    };
    pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        LabelSelector, LabelSelectorRequirement, ObjectMeta,
    };
    pub use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
}
