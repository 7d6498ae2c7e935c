//! An operator's file (`apply -f`) to objects: YAML or JSON, one or more
//! documents, each an object or a List of objects. Only the object's shape
//! is checked here (the kind is one podnet keeps, the fields have their
//! types); the API server's rules are `validate`'s.

use std::fmt;

use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use thiserror::Error;

use super::{
    kind::Kind,
    object::ClusterObject,
    types::{EndpointSlice, Namespace, NetworkPolicy, Pod, Service},
};

/// Where in the input an object was: the document (1-based, as an editor
/// counts `---` sections) and, inside a List, the item (0-based, as the
/// `items[i]` field path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub document: usize,
    pub item: Option<usize>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(item) = self.item {
            write!(f, ", items[{item}]")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Not YAML (or JSON) at all.
    #[error("document {document}: not valid {format}: {message}")]
    Syntax {
        document: usize,
        format: &'static str,
        message: String,
    },
    #[error("{at}: not an object (a map with apiVersion and kind)")]
    NotAnObject { at: Position },
    #[error("{at}: {field} not set")]
    MissingType { at: Position, field: &'static str },
    #[error(
        "{at}: no kind {kind:?} in version {api_version:?}: podnet keeps v1 Namespace, Pod and Service, networking.k8s.io/v1 NetworkPolicy and discovery.k8s.io/v1 EndpointSlice (or a List of them)"
    )]
    UnknownKind {
        at: Position,
        api_version: String,
        kind: String,
    },
    #[error("{at}: a List inside a List")]
    NestedList { at: Position },
    #[error("{at}: List without items")]
    ListWithoutItems { at: Position },
    /// A field the kind does not have (as the API server's strict decoding).
    #[error("{at}: {kind}: strict decoding error: unknown field {field:?}")]
    UnknownField {
        at: Position,
        kind: Kind,
        field: String,
    },
    /// The kind is known but a field has the wrong type (`port: "x"` where
    /// a number goes, a number beyond 32 bits).
    #[error("{at}: {kind}: {message}")]
    Shape {
        at: Position,
        kind: Kind,
        message: String,
    },
}

/// The objects of `text`, in order. YAML (several documents separated by
/// `---`) or JSON (one or more values); empty documents are skipped; a
/// `List` (or `<Kind>List`) contributes its items. Never panics; the first
/// error ends decoding, so that a file is applied whole or not at all.
pub fn decode(text: &str) -> Result<Vec<ClusterObject>, DecodeError> {
    let mut objects = Vec::new();
    for (index, document) in documents(text)?.into_iter().enumerate() {
        let document_number = index + 1;
        let at = Position {
            document: document_number,
            item: None,
        };
        match document {
            Value::Null => {}
            Value::Object(map) => decode_document(map, at, &mut objects)?,
            _ => return Err(DecodeError::NotAnObject { at }),
        }
    }
    Ok(objects)
}

/// The documents of `text` as plain values. JSON when it starts like JSON
/// (serde_json's errors name the line and column of JSON better than a YAML
/// parser's), else YAML, which also reads most JSON. Text that starts like
/// JSON but is not (a YAML flow mapping, `{kind: Pod}`) is read as YAML; if
/// that fails too, the JSON error is the one reported.
fn documents(text: &str) -> Result<Vec<Value>, DecodeError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let json = json_documents(text);
        return match json {
            Ok(values) => Ok(values),
            Err(json_error) => yaml_documents(text).map_err(|_| json_error),
        };
    }
    yaml_documents(text)
}

fn json_documents(text: &str) -> Result<Vec<Value>, DecodeError> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .enumerate()
        .map(|(index, value)| {
            value.map_err(|e| DecodeError::Syntax {
                document: index + 1,
                format: "JSON",
                message: e.to_string(),
            })
        })
        .collect()
}

fn yaml_documents(text: &str) -> Result<Vec<Value>, DecodeError> {
    serde_norway::Deserializer::from_str(text)
        .enumerate()
        .map(|(index, document)| {
            Value::deserialize(document).map_err(|e| DecodeError::Syntax {
                document: index + 1,
                format: "YAML",
                message: e.to_string(),
            })
        })
        .collect()
}

fn type_field<'a>(
    map: &'a Map<String, Value>,
    field: &'static str,
    at: Position,
) -> Result<&'a str, DecodeError> {
    match map.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(DecodeError::MissingType { at, field }),
    }
}

/// One document: an object, or a List whose items are objects.
fn decode_document(
    map: Map<String, Value>,
    at: Position,
    objects: &mut Vec<ClusterObject>,
) -> Result<(), DecodeError> {
    let api_version = type_field(&map, "apiVersion", at)?;
    let kind = type_field(&map, "kind", at)?;
    let Some(list_of) = list_kind(api_version, kind, at)? else {
        objects.push(decode_object(map, at)?);
        return Ok(());
    };
    let Some(Value::Array(items)) = map.get("items").cloned() else {
        // `items: []` or `items: null` is an empty list, as kubectl takes it.
        return match map.get("items") {
            None | Some(Value::Null) => Err(DecodeError::ListWithoutItems { at }),
            Some(_) => Err(DecodeError::NotAnObject { at }),
        };
    };
    for (index, item) in items.into_iter().enumerate() {
        let at = Position {
            item: Some(index),
            ..at
        };
        let Value::Object(mut item) = item else {
            return Err(DecodeError::NotAnObject { at });
        };
        // A typed list (`NamespaceList` as the API returns it) may leave
        // the items' type out: it is the list's.
        if let Some(of) = list_of {
            item.entry("apiVersion")
                .or_insert_with(|| of.api_version().into());
            item.entry("kind").or_insert_with(|| of.name().into());
        }
        let item_kind = type_field(&item, "kind", at)?;
        if item_kind == "List" || item_kind.ends_with("List") {
            return Err(DecodeError::NestedList { at });
        }
        objects.push(decode_object(item, at)?);
    }
    Ok(())
}

/// `None` for a plain object; `Some(None)` for a `v1 List`;
/// `Some(Some(kind))` for a `<Kind>List` of a kind podnet keeps.
#[allow(clippy::option_option)] // the two levels are two different answers
fn list_kind(
    api_version: &str,
    kind: &str,
    at: Position,
) -> Result<Option<Option<Kind>>, DecodeError> {
    if kind == "List" && api_version == "v1" {
        return Ok(Some(None));
    }
    let Some(of) = kind.strip_suffix("List") else {
        return Ok(None);
    };
    match Kind::from_type(api_version, of) {
        Some(of) => Ok(Some(Some(of))),
        None => Err(DecodeError::UnknownKind {
            at,
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
        }),
    }
}

fn decode_object(map: Map<String, Value>, at: Position) -> Result<ClusterObject, DecodeError> {
    let api_version = type_field(&map, "apiVersion", at)?;
    let kind_name = type_field(&map, "kind", at)?;
    let Some(kind) = Kind::from_type(api_version, kind_name) else {
        return Err(DecodeError::UnknownKind {
            at,
            api_version: api_version.to_owned(),
            kind: kind_name.to_owned(),
        });
    };
    let input = Value::Object(map);
    let object = typed(kind, input.clone()).map_err(|e| DecodeError::Shape {
        at,
        kind,
        message: e.to_string(),
    })?;
    // The API types skip fields they do not know; the API server (with
    // kubectl's default strict validation) refuses them, and so does
    // podnet: a misspelt `ingres:` must not become a policy without rules.
    let known = serde_json::to_value(&object).map_err(|e| DecodeError::Shape {
        at,
        kind,
        message: e.to_string(),
    })?;
    if let Some(field) = unknown_field(&input, &known, "") {
        return Err(DecodeError::UnknownField { at, kind, field });
    }
    Ok(object)
}

/// The path of the first field of `input` (not null) that the typed
/// object, serialized again as `known`, does not have.
fn unknown_field(input: &Value, known: &Value, path: &str) -> Option<String> {
    match (input, known) {
        (Value::Object(input), Value::Object(known)) => input.iter().find_map(|(key, value)| {
            let field = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match known.get(key) {
                _ if value.is_null() => None,
                None => Some(field),
                Some(known) => unknown_field(value, known, &field),
            }
        }),
        (Value::Array(input), Value::Array(known)) => input
            .iter()
            .zip(known)
            .enumerate()
            .find_map(|(i, (value, known))| unknown_field(value, known, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// `value` as the API type of `kind` (which checks `apiVersion` and `kind`
/// again and the type of every field).
pub(super) fn typed(kind: Kind, value: Value) -> Result<ClusterObject, serde_json::Error> {
    fn of<T: DeserializeOwned + Into<ClusterObject>>(
        value: Value,
    ) -> Result<ClusterObject, serde_json::Error> {
        serde_json::from_value::<T>(value).map(Into::into)
    }
    match kind {
        Kind::Namespace => of::<Namespace>(value),
        Kind::Pod => of::<Pod>(value),
        Kind::NetworkPolicy => of::<NetworkPolicy>(value),
        Kind::Service => of::<Service>(value),
        Kind::EndpointSlice => of::<EndpointSlice>(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: x\nspec:\n  containers:\n  - name: c\n    image: i\n    ports:\n    - name: http\n      containerPort: 80\n";

    fn names(objects: &[ClusterObject]) -> Vec<String> {
        objects.iter().map(|o| o.key().to_string()).collect()
    }

    #[test]
    fn yaml_documents_in_order_and_empty_ones_skipped() {
        let text = format!("---\n{NS}---\n---\n# only a comment\n---\n{POD}\n---\n");
        let objects = decode(&text).expect("decodes");
        assert_eq!(names(&objects), ["namespaces/x", "pods/x/a"]);
        let ClusterObject::Pod(pod) = &objects[1] else {
            panic!("{objects:?}")
        };
        let ports = pod.spec.as_ref().expect("spec").containers[0].ports.clone();
        assert_eq!(ports.expect("ports")[0].container_port, 80);
        assert!(decode("").expect("empty").is_empty());
        assert!(decode("---\n...\n").expect("empty").is_empty());
    }

    #[test]
    fn json_values_and_lists() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"y"}},
            {"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"p","namespace":"y"},"spec":{}}]}
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"s"}}"#;
        let objects = decode(text).expect("decodes");
        assert_eq!(
            names(&objects),
            ["namespaces/y", "networkpolicies/y/p", "services/default/s"]
        );
    }

    #[test]
    fn typed_lists_lend_their_items_the_type() {
        let text = "apiVersion: v1\nkind: NamespaceList\nitems:\n- metadata: {name: a}\n- metadata: {name: b}\n";
        assert_eq!(
            names(&decode(text).expect("decodes")),
            ["namespaces/a", "namespaces/b"]
        );
        // An item that names its own type keeps it, as kubectl takes any
        // list's items one by one.
        let mixed = "apiVersion: v1\nkind: NamespaceList\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a}}\n";
        assert_eq!(names(&decode(mixed).expect("decodes")), ["pods/default/a"]);
        let bad_item = "apiVersion: v1\nkind: ServiceList\nitems:\n- {metadata: {name: 3}}\n";
        assert!(matches!(
            decode(bad_item),
            Err(DecodeError::Shape {
                at: Position {
                    document: 1,
                    item: Some(0)
                },
                kind: Kind::Service,
                ..
            })
        ));
    }

    #[test]
    fn unknown_kinds_name_document_and_kind() {
        let text =
            format!("{NS}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n");
        let err = decode(&text).expect_err("unknown kind");
        assert_eq!(
            err,
            DecodeError::UnknownKind {
                at: Position {
                    document: 2,
                    item: None
                },
                api_version: "apps/v1".into(),
                kind: "Deployment".into()
            }
        );
        assert!(
            err.to_string()
                .starts_with("document 2: no kind \"Deployment\" in version \"apps/v1\""),
            "{err}"
        );
        let old = "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\n";
        assert!(matches!(decode(old), Err(DecodeError::UnknownKind { .. })));
        let in_list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Secret}\n";
        assert!(matches!(
            decode(in_list),
            Err(DecodeError::UnknownKind {
                at: Position {
                    document: 1,
                    item: Some(0)
                },
                ..
            })
        ));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for (text, what) in [
            ("apiVersion: v1\nkind: Namespace\nmetadata: [\n", "syntax"),
            ("{\"apiVersion\": ", "syntax"),
            ("- a\n- b\n", "not an object"),
            ("42\n", "not an object"),
            ("kind: Namespace\n", "missing apiVersion"),
            ("apiVersion: v1\n", "missing kind"),
            ("apiVersion: v1\nkind: List\n", "no items"),
            (
                "apiVersion: v1\nkind: List\nitems: [3]\n",
                "item not an object",
            ),
            (
                "apiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: List, items: []}]\n",
                "nested",
            ),
            (
                "apiVersion: v1\nkind: Service\nspec:\n  ports:\n  - port: http\n",
                "wrong type",
            ),
            (
                "apiVersion: v1\nkind: Service\nspec:\n  ports:\n  - port: 99999999999\n",
                "too big",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: 3\n",
                "metadata not a map",
            ),
        ] {
            assert!(decode(text).is_err(), "{what}: {text}");
        }
        let err = decode(&format!("{NS}---\nkind: [\n")).expect_err("syntax");
        assert!(
            matches!(
                err,
                DecodeError::Syntax {
                    document: 2,
                    format: "YAML",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let typo = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingres:\n  - from: [{podSelector: {}}]\n";
        let err = decode(typo).expect_err("typo");
        assert_eq!(
            err.to_string(),
            "document 1: NetworkPolicy: strict decoding error: unknown field \"spec.ingres\""
        );
        let deep = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - {port: 80}\n  - {port: 81, nodeport: 30001}\n";
        assert!(matches!(
            decode(deep),
            Err(DecodeError::UnknownField { field, .. }) if field == "spec.ports[1].nodeport"
        ));
        // A null is as good as absent, and known fields of every depth pass.
        let fine = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: null, creationTimestamp: '2026-01-02T03:04:05Z'}\nspec:\n  containers: [{name: c, image: i, ports: [{containerPort: 80}], resources: {limits: {cpu: 100m}}}]\nstatus: {phase: Running, podIP: 10.0.0.1}\n";
        decode(fine).expect("known fields");
    }

    #[test]
    fn yaml_flow_mappings_are_not_taken_for_broken_json() {
        let flow = "{apiVersion: v1, kind: Namespace, metadata: {name: x}}\n";
        assert_eq!(names(&decode(flow).expect("decodes")), ["namespaces/x"]);
        let broken = "{\"apiVersion\": \"v1\", \"kind\": \"Namespace\",,}";
        assert!(matches!(
            decode(broken),
            Err(DecodeError::Syntax {
                document: 1,
                format: "JSON",
                ..
            })
        ));
    }

    #[test]
    fn empty_list_is_no_objects() {
        assert!(
            decode("apiVersion: v1\nkind: List\nitems: []\n")
                .expect("decodes")
                .is_empty()
        );
    }
}
