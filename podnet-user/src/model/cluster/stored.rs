//! The one byte form an object is stored in, and back. What the server
//! sets (revision, uid, timestamps, managed fields, generation, status) is
//! left out and a namespaced object's namespace is always written, so the
//! same object applied twice gives the same bytes: the datastore compares
//! bytes to make `apply` of an unchanged object write nothing.

use serde_json::Value;
use thiserror::Error;

use super::{decode::typed, kind::Kind, object::ClusterObject, view::Revision};

#[derive(Debug, Error)]
#[error("encoding {key} for storage: {source}")]
pub struct EncodeError {
    pub key: String,
    #[source]
    pub source: serde_json::Error,
}

/// A stored value that is not an object podnet keeps (written by something
/// else, or by a newer podnet).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoredError {
    #[error("stored object is not JSON: {0}")]
    Json(String),
    #[error("stored object has no kind podnet keeps (apiVersion {api_version:?}, kind {kind:?})")]
    UnknownKind { api_version: String, kind: String },
    #[error("stored {kind}: {message}")]
    Shape { kind: Kind, message: String },
}

impl ClusterObject {
    /// The object as the datastore keeps it: compact JSON, server-set
    /// fields left out, the namespace of a namespaced object written
    /// (`default` when the input had none) and a Namespace's dropped (the
    /// API server ignores it on cluster-scoped objects).
    pub fn to_stored_json(&self) -> Result<Vec<u8>, EncodeError> {
        let canonical = self.canonical();
        serde_json::to_vec(&canonical).map_err(|source| EncodeError {
            key: self.key().to_string(),
            source,
        })
    }

    /// The object without what the server sets, as `to_stored_json` writes it.
    #[must_use]
    pub fn canonical(&self) -> Self {
        let mut object = self.clone();
        let namespace = object.namespace().map(str::to_owned);
        let meta = object.metadata_mut();
        meta.namespace = namespace;
        meta.resource_version = None;
        meta.uid = None;
        meta.creation_timestamp = None;
        meta.deletion_timestamp = None;
        meta.deletion_grace_period_seconds = None;
        meta.managed_fields = None;
        meta.generation = None;
        meta.self_link = None;
        match &mut object {
            Self::Namespace(o) => o.status = None,
            Self::Pod(o) => o.status = None,
            Self::Service(o) => o.status = None,
            Self::NetworkPolicy(_) | Self::EndpointSlice(_) => {}
        }
        object
    }

    /// An object read back from the datastore, with `resourceVersion` set
    /// to the revision the datastore stored it at.
    pub fn from_stored_json(bytes: &[u8], revision: Revision) -> Result<Self, StoredError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| StoredError::Json(e.to_string()))?;
        let field = |name| {
            value
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (api_version, kind_name) = (field("apiVersion"), field("kind"));
        let kind = Kind::from_type(&api_version, &kind_name).ok_or(StoredError::UnknownKind {
            api_version,
            kind: kind_name,
        })?;
        let mut object = typed(kind, value).map_err(|e| StoredError::Shape {
            kind,
            message: e.to_string(),
        })?;
        object.metadata_mut().resource_version = Some(revision.to_string());
        Ok(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cluster::decode;

    const SERVED: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: x
  uid: 0b3f6c1e-0000-4000-8000-000000000001
  resourceVersion: "4711"
  generation: 3
  creationTimestamp: "2026-01-02T03:04:05Z"
  managedFields:
  - manager: kubectl
    operation: Apply
  labels: {app: web}
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
status:
  loadBalancer: {}
"#;

    const APPLIED: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: x\n  labels: {app: web}\n  name: web\nspec:\n  ports:\n  - targetPort: 8080\n    port: 80\n  selector: {app: web}\n";

    fn one(text: &str) -> ClusterObject {
        let mut objects = decode(text).expect("decodes");
        assert_eq!(objects.len(), 1);
        objects.remove(0)
    }

    #[test]
    fn server_fields_do_not_reach_the_stored_bytes() {
        let served = one(SERVED).to_stored_json().expect("encodes");
        let applied = one(APPLIED).to_stored_json().expect("encodes");
        assert_eq!(
            String::from_utf8_lossy(&served),
            String::from_utf8_lossy(&applied)
        );
        let text = String::from_utf8(served).expect("utf-8");
        for gone in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
            "status",
        ] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
    }

    #[test]
    fn namespace_is_defaulted_for_namespaced_kinds_only() {
        let pod = one("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n");
        let stored = String::from_utf8(pod.to_stored_json().expect("encodes")).expect("utf-8");
        assert!(stored.contains(r#""namespace":"default""#), "{stored}");
        let explicit = one("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: default}\n");
        assert_eq!(
            explicit.to_stored_json().expect("encodes"),
            stored.as_bytes()
        );
        let ns = one("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n");
        let stored = String::from_utf8(ns.to_stored_json().expect("encodes")).expect("utf-8");
        assert!(!stored.contains("namespace\":"), "{stored}");
    }

    #[test]
    fn stored_bytes_read_back_with_the_revision() {
        let object = one(SERVED);
        let bytes = object.to_stored_json().expect("encodes");
        let back = ClusterObject::from_stored_json(&bytes, 42).expect("reads back");
        assert_eq!(back.resource_version(), Some("42"));
        assert_eq!(back.key(), object.key());
        // Stored again, it is the same bytes: nothing to write.
        assert_eq!(back.to_stored_json().expect("encodes"), bytes);
    }

    #[test]
    fn foreign_stored_values_are_refused() {
        for (bytes, what) in [
            (&b"not json"[..], "json"),
            (br#"{"apiVersion":"v1","kind":"Secret"}"#, "kind"),
            (
                br#"{"apiVersion":"v1","kind":"Pod","metadata":[]}"#,
                "shape",
            ),
            (b"[]", "array"),
        ] {
            assert!(ClusterObject::from_stored_json(bytes, 1).is_err(), "{what}");
        }
    }
}
