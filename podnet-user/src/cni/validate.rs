//! Input validation, done before anything is touched: a bad input changes
//! nothing. Rules follow libcni's (`pkg/utils`).

use super::error::{CniError, code};

fn id_like(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `CNI_CONTAINERID`: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub fn container_id(id: &str) -> Result<(), CniError> {
    if id_like(id) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "invalid CNI_CONTAINERID {id:?}: must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
            ),
        ))
    }
}

/// Network name: same rule as container IDs.
pub fn network_name(name: &str) -> Result<(), CniError> {
    if id_like(name) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "invalid network name {name:?}: must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
            ),
        ))
    }
}

/// `CNI_IFNAME`: 1..=15 bytes (IFNAMSIZ - 1), not `.`/`..`, no `/`, `:` or whitespace.
pub fn ifname(name: &str) -> Result<(), CniError> {
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
        Some(p) => Err(CniError::new(
            code::INVALID_ENV,
            format!("invalid CNI_IFNAME {name:?}: {p}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(container_id("abc-1.2_3").is_ok());
        for bad in ["", "-x", "a/b", "a b", "a:b", "é"] {
            assert_eq!(
                container_id(bad).unwrap_err().code,
                code::INVALID_ENV,
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
            assert_eq!(ifname(bad).unwrap_err().code, code::INVALID_ENV, "{bad:?}");
        }
        assert_eq!(network_name("a b").unwrap_err().code, code::INVALID_CONFIG);
    }
}
