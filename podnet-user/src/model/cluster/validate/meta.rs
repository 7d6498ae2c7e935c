//! `metadata` (`ValidateObjectMeta`) and the label helpers every kind's
//! spec uses (`ValidateLabels`, `ValidateLabelSelector`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use super::{Errors, Path, rules};
use crate::model::cluster::{kind::Kind, object::ClusterObject};

/// The most bytes all annotations of an object may take (keys and values).
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// The kind's rule for its names: Namespaces are DNS labels (a namespace
/// is a DNS name's segment), Services DNS-1035 labels (they become DNS
/// names that must start with a letter), the rest DNS subdomains.
fn name_rule(kind: Kind) -> fn(&str) -> Vec<String> {
    match kind {
        Kind::Namespace => rules::dns1123_label,
        Kind::Service => rules::dns1035_label,
        Kind::Pod | Kind::NetworkPolicy | Kind::EndpointSlice => rules::dns1123_subdomain,
    }
}

pub(super) fn validate_meta(object: &ClusterObject, errors: &mut Errors) {
    let meta = object.metadata();
    let path = Path::root("metadata");
    match meta.name.as_deref() {
        // podnet stores an object under its name: no generateName.
        None | Some("") => errors.required(&path.child("name"), "name or generateName is required"),
        Some(name) => {
            errors.invalid_each(&path.child("name"), name, name_rule(object.kind())(name));
        }
    }
    if object.kind().namespaced()
        && let Some(namespace) = meta.namespace.as_deref().filter(|ns| !ns.is_empty())
    {
        errors.invalid_each(
            &path.child("namespace"),
            namespace,
            rules::dns1123_label(namespace),
        );
    }
    if let Some(labels) = &meta.labels {
        validate_labels(labels, &path.child("labels"), errors);
    }
    if let Some(annotations) = &meta.annotations {
        validate_annotations(annotations, &path.child("annotations"), errors);
    }
}

/// `ValidateLabels`: every key a qualified name, every value a label value;
/// the path is the map's, the value the offending key or value.
pub(super) fn validate_labels(labels: &BTreeMap<String, String>, path: &Path, errors: &mut Errors) {
    for (key, value) in labels {
        errors.invalid_each(path, key, rules::qualified_name(key));
        errors.invalid_each(path, value, rules::label_value(value));
    }
}

fn validate_annotations(annotations: &BTreeMap<String, String>, path: &Path, errors: &mut Errors) {
    let mut bytes = 0;
    for (key, value) in annotations {
        errors.invalid_each(path, key, rules::qualified_name(&key.to_ascii_lowercase()));
        bytes += key.len() + value.len();
    }
    if bytes > ANNOTATIONS_MAX_BYTES {
        errors.too_long(path, ANNOTATIONS_MAX_BYTES);
    }
}

/// `ValidateLabelSelector`: each match expression, then the match labels.
pub(super) fn validate_selector(selector: &LabelSelector, path: &Path, errors: &mut Errors) {
    for (i, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        validate_requirement(
            requirement,
            &path.child("matchExpressions").index(i),
            errors,
        );
    }
    if let Some(labels) = &selector.match_labels {
        validate_labels(labels, &path.child("matchLabels"), errors);
    }
}

fn validate_requirement(requirement: &LabelSelectorRequirement, path: &Path, errors: &mut Errors) {
    let values = requirement.values.as_deref().unwrap_or_default();
    match requirement.operator.as_str() {
        "In" | "NotIn" if values.is_empty() => errors.required(
            &path.child("values"),
            "must be specified when `operator` is 'In' or 'NotIn'",
        ),
        "Exists" | "DoesNotExist" if !values.is_empty() => errors.forbidden(
            &path.child("values"),
            "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
        ),
        "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
        other => errors.invalid_str(
            &path.child("operator"),
            other,
            "not a valid selector operator",
        ),
    }
    errors.invalid_each(
        &path.child("key"),
        &requirement.key,
        rules::qualified_name(&requirement.key),
    );
    for (i, value) in values.iter().enumerate() {
        errors.invalid_each(
            &path.child("values").index(i),
            value,
            rules::label_value(value),
        );
    }
}
