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
}
