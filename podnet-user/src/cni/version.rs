//! CNI spec versions podnet speaks.

/// Every version podnet accepts and answers in, oldest first.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version podnet implements.
pub const CURRENT: &str = "1.1.0";

/// A parsed CNI version, comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u16, pub u16, pub u16);

impl Version {
    pub const V0_4_0: Version = Version(0, 4, 0);
    pub const V1_0_0: Version = Version(1, 0, 0);
    pub const V1_1_0: Version = Version(1, 1, 0);

    /// A supported version, or `None`.
    #[must_use]
    pub fn parse_supported(s: &str) -> Option<Self> {
        if !SUPPORTED.contains(&s) {
            return None;
        }
        let mut parts = s.split('.').map(|p| p.parse::<u16>().ok());
        Some(Self(parts.next()??, parts.next()??, parts.next()??))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_order() {
        for v in SUPPORTED {
            assert!(Version::parse_supported(v).is_some(), "{v}");
        }
        assert!(Version::parse_supported("0.2.0").is_none());
        assert!(Version::parse_supported("2.0.0").is_none());
        assert!(Version::parse_supported("1.0").is_none());
        assert!(Version::parse_supported("0.3.1").unwrap() < Version::V0_4_0);
        assert!(Version::parse_supported("1.1.0").unwrap() >= Version::V1_1_0);
    }
}
