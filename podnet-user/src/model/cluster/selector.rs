//! Which labels a selector selects, as the Kubernetes label selector
//! semantics say: NetworkPolicy's pod and namespace selectors (a
//! `LabelSelector`) and a Service's `selector` (a plain map).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

/// Whether `selector` selects an object with `labels`: every `matchLabels`
/// pair present, every `matchExpressions` requirement met. The empty
/// selector (`{}`) selects everything. A requirement with an unknown
/// operator selects nothing (validation refuses such objects before they
/// are stored; this keeps a foreign one from selecting more than it says).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    pairs
        && selector
            .match_expressions
            .iter()
            .flatten()
            .all(|requirement| requirement_matches(requirement, labels))
}

fn requirement_matches(
    requirement: &LabelSelectorRequirement,
    labels: &BTreeMap<String, String>,
) -> bool {
    let value = labels.get(&requirement.key);
    let values = requirement.values.as_deref().unwrap_or_default();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        // An object without the key is not in the set, so it matches.
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

/// Whether a Service's `selector` selects a pod with `labels`. Unlike a
/// `LabelSelector`, an absent or empty Service selector selects no pod:
/// such a Service's endpoints are managed by hand (its EndpointSlices).
pub fn service_selects(
    selector: Option<&BTreeMap<String, String>>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.is_some_and(|selector| {
        !selector.is_empty()
            && selector
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    fn expressions(requirements: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(requirements),
            match_labels: None,
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
        assert!(selector_matches(
            &LabelSelector::default(),
            &labels(&[("a", "b")])
        ));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("app", "web"), ("tier", "")])),
            match_expressions: None,
        };
        assert!(selector_matches(
            &selector,
            &labels(&[("app", "web"), ("tier", ""), ("x", "y")])
        ));
        assert!(!selector_matches(&selector, &labels(&[("app", "web")])));
        assert!(!selector_matches(
            &selector,
            &labels(&[("app", "db"), ("tier", "")])
        ));
    }

    #[test]
    fn operators() {
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        let cases = [
            (requirement("app", "In", &["web", "api"]), true),
            (requirement("app", "In", &["db"]), false),
            (requirement("zone", "In", &["a"]), false),
            (requirement("app", "NotIn", &["db"]), true),
            (requirement("app", "NotIn", &["web"]), false),
            (requirement("zone", "NotIn", &["a"]), true),
            (requirement("tier", "Exists", &[]), true),
            (requirement("zone", "Exists", &[]), false),
            (requirement("zone", "DoesNotExist", &[]), true),
            (requirement("app", "DoesNotExist", &[]), false),
            (requirement("app", "Equals", &["web"]), false),
        ];
        for (requirement, selects) in cases {
            let what = format!("{requirement:?}");
            assert_eq!(
                selector_matches(&expressions(vec![requirement]), &pod),
                selects,
                "{what}"
            );
        }
        let both = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![requirement("tier", "In", &["back"])]),
        };
        assert!(
            !selector_matches(&both, &pod),
            "labels and expressions both hold"
        );
    }

    #[test]
    fn service_selectors_select_nothing_when_empty() {
        let pod = labels(&[("app", "web")]);
        assert!(service_selects(Some(&labels(&[("app", "web")])), &pod));
        assert!(!service_selects(Some(&labels(&[("app", "db")])), &pod));
        assert!(!service_selects(Some(&labels(&[])), &pod));
        assert!(!service_selects(None, &pod));
    }
}
