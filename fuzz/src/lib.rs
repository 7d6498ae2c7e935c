//! Checks the fuzz targets share. The CNI rules are written here again from
//! the spec (libcni's `pkg/utils`), independently of `podnet::cni::validate`,
//! so that a target checks the parsers against the rules, not against
//! themselves.

use std::path::{Component, Path};

use podnet::ipam::Owner;
use serde_json::Value;

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`: container IDs and network names.
#[must_use]
pub fn is_cni_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// An interface name the kernel takes and that is safe in paths: 1..=15
/// bytes, not `.`/`..`, no `/`, `:` or whitespace.
#[must_use]
pub fn is_cni_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// The agent names an endpoint's record file `<container ID>:<ifname>.json`
/// in its state directory: for an owner it accepted, that must be one plain
/// file name (no `/`, not `.` or `..`), never a path elsewhere.
#[must_use]
pub fn record_stays_in_its_directory(owner: &Owner) -> bool {
    let name = format!("{}:{}.json", owner.container_id, owner.ifname);
    let mut components = Path::new(&name).components();
    matches!(components.next(), Some(Component::Normal(n)) if n == name.as_str())
        && components.next().is_none()
}

/// JSON equality where floats may differ in the last bits (serde_json's
/// default float parsing is not guaranteed to round-trip exactly).
#[must_use]
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                    _ => false,
                }
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(is_cni_name("a-1.b_2"));
        for bad in ["", "-a", ".a", "a b", "a/b", "é"] {
            assert!(!is_cni_name(bad), "{bad:?}");
        }
        assert!(is_cni_ifname("eth0"));
        for bad in ["", ".", "..", "a/b", "a:b", "a\u{a0}b", "0123456789abcdef"] {
            assert!(!is_cni_ifname(bad), "{bad:?}");
        }
        let owner = |c: &str, i: &str| Owner {
            container_id: c.into(),
            ifname: i.into(),
        };
        assert!(record_stays_in_its_directory(&owner("c1", "eth0")));
        assert!(!record_stays_in_its_directory(&owner("c1", "a/b")));
        assert!(!record_stays_in_its_directory(&owner("..", "/")));
    }
}
