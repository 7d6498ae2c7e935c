//! MAC addresses as operators and CNI results write them.

/// `aa:bb:cc:dd:ee:ff`, lower case (the CNI result's format).
#[must_use]
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (any case).
#[must_use]
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mac = [0x02, 0xab, 0, 0x10, 0xff, 5];
        assert_eq!(format_mac(&mac), "02:ab:00:10:ff:05");
        assert_eq!(parse_mac("02:AB:00:10:ff:05"), Some(mac));
        for bad in [
            "",
            "02:ab:00:10:ff",
            "02:ab:00:10:ff:05:06",
            "zz:ab:00:10:ff:05",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
