//! Which names podnet accepts, checked before anything is touched: a bad
//! name changes nothing. The rules are libcni's (`pkg/utils`), so a name
//! the runtime accepted and podnet refuses (or the other way round) is a
//! bug here. The plugin maps a [`NameError`] to its CNI error code; the
//! agent refuses an endpoint request with it.

/// A name that breaks its rule; the message names the field as the CNI
/// runtime knows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "invalid CNI_CONTAINERID {0:?}: must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
    )]
    ContainerId(String),
    #[error(
        "invalid network name {0:?}: must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
    )]
    NetworkName(String),
    #[error("invalid CNI_IFNAME {name:?}: {problem}")]
    Ifname { name: String, problem: &'static str },
    /// `K8S_POD_NAMESPACE` (a Namespace's name: a DNS-1123 label).
    #[error("invalid K8S_POD_NAMESPACE {name:?}: {problem}")]
    PodNamespace { name: String, problem: String },
    /// `K8S_POD_NAME` (a Pod's name: a DNS-1123 subdomain).
    #[error("invalid K8S_POD_NAME {name:?}: {problem}")]
    PodName { name: String, problem: String },
}

fn id_like(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `CNI_CONTAINERID`: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`. The agent names an
/// endpoint's record file by it, so no `/` may pass.
pub fn container_id(id: &str) -> Result<(), NameError> {
    if id_like(id) {
        Ok(())
    } else {
        Err(NameError::ContainerId(id.to_owned()))
    }
}

/// Network name: same rule as container IDs (old IPAM stores are
/// directories named by it).
pub fn network_name(name: &str) -> Result<(), NameError> {
    if id_like(name) {
        Ok(())
    } else {
        Err(NameError::NetworkName(name.to_owned()))
    }
}

/// `CNI_IFNAME`: 1..=15 bytes (IFNAMSIZ - 1), not `.`/`..`, no `/`, `:` or whitespace.
pub fn ifname(name: &str) -> Result<(), NameError> {
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.len() > 15 {
        Some("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("is . or ..")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(NameError::Ifname {
            name: name.to_owned(),
            problem,
        }),
    }
}

/// A pod's namespace and name as kubelet passes them (`K8S_POD_NAMESPACE`,
/// `K8S_POD_NAME`): the API server's rules for a Namespace's and a Pod's
/// name, so that the endpoint record the agent publishes names an object
/// that can exist (and its key stays one key segment each).
pub fn pod_ref(namespace: &str, name: &str) -> Result<(), NameError> {
    use crate::model::cluster::validate::{dns1123_label, dns1123_subdomain};
    let problems = dns1123_label(namespace);
    if !problems.is_empty() {
        return Err(NameError::PodNamespace {
            name: namespace.to_owned(),
            problem: problems.join("; "),
        });
    }
    let problems = dns1123_subdomain(name);
    if !problems.is_empty() {
        return Err(NameError::PodName {
            name: name.to_owned(),
            problem: problems.join("; "),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(container_id("abc-1.2_3").is_ok());
        for bad in ["", "-x", "a/b", "a b", "a:b", "é"] {
            assert!(
                matches!(container_id(bad), Err(NameError::ContainerId(_))),
                "{bad:?}"
            );
        }
        assert!(ifname("eth0").is_ok());
        assert!(ifname("123456789012345").is_ok());
        for bad in [
            "",
            "1234567890123456",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
        ] {
            assert!(
                matches!(ifname(bad), Err(NameError::Ifname { .. })),
                "{bad:?}"
            );
        }
        assert!(network_name("podnet").is_ok());
        assert!(matches!(
            network_name("a b"),
            Err(NameError::NetworkName(_))
        ));
    }

    #[test]
    fn pod_refs_follow_the_api_servers_names() {
        assert!(pod_ref("default", "web-0").is_ok());
        assert!(pod_ref("kube-system", "coredns-5d78c9869d-abcde.x").is_ok());
        for bad_ns in ["", "Default", "a.b", "-x", "a_b", &"n".repeat(64)] {
            assert!(
                matches!(pod_ref(bad_ns, "p"), Err(NameError::PodNamespace { .. })),
                "{bad_ns:?}"
            );
        }
        for bad_name in ["", "Web", "a/b", "a b", "-x", "x.", &"n".repeat(254)] {
            let err = pod_ref("default", bad_name).expect_err(bad_name);
            assert!(matches!(err, NameError::PodName { .. }), "{bad_name:?}");
            assert!(err.to_string().starts_with("invalid K8S_POD_NAME"), "{err}");
        }
    }
}
