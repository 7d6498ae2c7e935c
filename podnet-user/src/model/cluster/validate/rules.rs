//! The API machinery's name, label, port and address rules, each returning
//! the API server's messages (empty when the value is fine). Written as
//! character scans rather than regular expressions; the regexes are quoted
//! in the messages as the API server quotes them.

use std::{fmt::Write as _, net::IpAddr};

use ipnet::IpNet;

const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;
const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_MAX: usize = 63;
const QUALIFIED_NAME_MSG: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const LABEL_VALUE_MAX: usize = 63;
const PORT_NAME_MAX: usize = 15;

/// The API machinery's `RegexError`: the message, examples, the regex.
fn regex_error(message: &str, format: &str, examples: &[&str]) -> String {
    let mut text = format!("{message} (e.g. ");
    for (i, example) in examples.iter().enumerate() {
        if i > 0 {
            text.push_str(" or ");
        }
        let _ = write!(text, "'{example}', ");
    }
    let _ = write!(text, "regex used for validation is '{format}')");
    text
}

fn max_len(max: usize) -> String {
    format!("must be no more than {max} characters")
}

fn is_label_chars(label: &str, first: fn(u8) -> bool) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && first(b[0])
        && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

fn lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// `IsDNS1123Label`: Namespace names, Service port names, container names.
pub fn dns1123_label(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if value.len() > DNS1123_LABEL_MAX {
        problems.push(max_len(DNS1123_LABEL_MAX));
    }
    if !is_label_chars(value, lower_alnum) {
        problems.push(regex_error(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            DNS1123_LABEL_FMT,
            &["my-name", "123-abc"],
        ));
    }
    problems
}

/// `IsDNS1123Subdomain`: Pod, NetworkPolicy and EndpointSlice names, label
/// key prefixes.
pub fn dns1123_subdomain(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if value.len() > DNS1123_SUBDOMAIN_MAX {
        problems.push(max_len(DNS1123_SUBDOMAIN_MAX));
    }
    if !value
        .split('.')
        .all(|label| is_label_chars(label, lower_alnum))
    {
        problems.push(regex_error(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            &format!("{DNS1123_LABEL_FMT}(\\.{DNS1123_LABEL_FMT})*"),
            &["example.com"],
        ));
    }
    problems
}

/// `IsDNS1035Label`: Service names (they become DNS names that must start
/// with a letter).
pub fn dns1035_label(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if value.len() > DNS1123_LABEL_MAX {
        problems.push(max_len(DNS1123_LABEL_MAX));
    }
    if !is_label_chars(value, |c| c.is_ascii_lowercase()) {
        problems.push(regex_error(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
            "[a-z]([-a-z0-9]*[a-z0-9])?",
            &["my-name", "abc-123"],
        ));
    }
    problems
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, also empty-safe.
fn is_qualified_part(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// `IsQualifiedName`: label keys, annotation keys: an optional DNS
/// subdomain prefix and `/`, then a name of at most 63 characters.
pub fn qualified_name(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                problems.push("prefix part must be non-empty".to_owned());
            } else {
                problems.extend(
                    dns1123_subdomain(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            name
        }
        _ => {
            problems.push(format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(QUALIFIED_NAME_MSG, QUALIFIED_NAME_FMT, &["MyName", "my.name", "123-abc"])
            ));
            return problems;
        }
    };
    if name.is_empty() {
        problems.push("name part must be non-empty".to_owned());
    } else if name.len() > QUALIFIED_NAME_MAX {
        problems.push(format!("name part {}", max_len(QUALIFIED_NAME_MAX)));
    }
    if !is_qualified_part(name) {
        problems.push(format!(
            "name part {}",
            regex_error(
                QUALIFIED_NAME_MSG,
                QUALIFIED_NAME_FMT,
                &["MyName", "my.name", "123-abc"]
            )
        ));
    }
    problems
}

/// `IsValidLabelValue`: empty, or at most 63 characters of the qualified
/// name's charset.
pub fn label_value(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if value.len() > LABEL_VALUE_MAX {
        problems.push(max_len(LABEL_VALUE_MAX));
    }
    if !value.is_empty() && !is_qualified_part(value) {
        problems.push(regex_error(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            &format!("({QUALIFIED_NAME_FMT})?"),
            &["MyValue", "my_value", "12345"],
        ));
    }
    problems
}

/// `IsValidPortNum`.
pub fn port_number(port: i32) -> Option<&'static str> {
    (!(1..=65535).contains(&port)).then_some("must be between 1 and 65535, inclusive")
}

/// `IsValidPortName`: an IANA service name (RFC 6335): at most 15
/// characters of `[-a-z0-9]`, at least one letter, no leading, trailing or
/// double hyphen. Named container ports and the names that refer to them.
pub fn port_name_problems(name: &str) -> Vec<&'static str> {
    let mut problems = Vec::new();
    if name.len() > PORT_NAME_MAX {
        problems.push("must be no more than 15 characters");
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        problems.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if !name.bytes().any(|c| c.is_ascii_lowercase()) {
        problems.push("must contain at least one letter (a-z)");
    }
    if name.contains("--") {
        problems.push("must not contain consecutive hyphens");
    }
    if name.starts_with('-') || name.ends_with('-') {
        problems.push("must not begin or end with a hyphen");
    }
    problems
}

/// Whether `name` is a valid IANA service name (`port_name_problems` empty).
pub fn is_valid_port_name(name: &str) -> bool {
    port_name_problems(name).is_empty()
}

pub const IP_MESSAGE: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";
pub const CIDR_MESSAGE: &str = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";

/// An IP address as the API server takes it on a create: dotted quad
/// without leading zeros or IPv6 without a zone.
pub fn ip(value: &str) -> Option<IpAddr> {
    value.parse().ok()
}

/// A CIDR (`address/prefix`), host bits allowed as the API server allows them.
pub fn cidr(value: &str) -> Option<IpNet> {
    // ipnet also takes a bare prefix length with a leading `+` or zeros; the
    // API server's parser does not.
    let (_, length) = value.split_once('/')?;
    if length.is_empty()
        || !length.bytes().all(|c| c.is_ascii_digit())
        || (length.len() > 1 && length.starts_with('0'))
    {
        return None;
    }
    value.parse().ok()
}

/// `IsFullyQualifiedDomainName`: at least two labels, a DNS subdomain once
/// a trailing dot is removed.
pub fn fqdn(value: &str) -> Vec<String> {
    let name = value.strip_suffix('.').unwrap_or(value);
    if name.is_empty() {
        return vec!["Required value".to_owned()];
    }
    let mut problems = dns1123_subdomain(name);
    if !name.contains('.') {
        problems.push("should be a domain with at least two segments separated by dots".to_owned());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_and_subdomains() {
        for good in ["a", "0", "my-name", "123-abc", &"a".repeat(63)] {
            assert!(dns1123_label(good).is_empty(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!dns1123_label(bad).is_empty(), "{bad}");
        }
        assert_eq!(
            dns1123_label(&"a".repeat(64)),
            ["must be no more than 63 characters"]
        );
        for good in ["a.b", "example.com", "0.a-b.c"] {
            assert!(dns1123_subdomain(good).is_empty(), "{good}");
        }
        for bad in ["", ".a", "a.", "a..b", "A.b", "a_b", "a.-b"] {
            assert!(!dns1123_subdomain(bad).is_empty(), "{bad}");
        }
        assert!(!dns1123_subdomain(&"a".repeat(254)).is_empty());
        assert!(dns1035_label("abc-123").is_empty());
        assert!(!dns1035_label("1abc").is_empty());
        assert!(dns1123_label("1abc").is_empty());
    }

    #[test]
    fn label_keys_and_values() {
        for good in [
            "app",
            "App_1.x",
            "example.com/app",
            "a/b",
            &format!("{}/x", "a".repeat(253)),
        ] {
            assert!(qualified_name(good).is_empty(), "{good}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a/b/c",
            "-a",
            "a-",
            "Example.com/a",
            &"a".repeat(64),
            "a b",
        ] {
            assert!(!qualified_name(bad).is_empty(), "{bad}");
        }
        assert_eq!(qualified_name("/a"), ["prefix part must be non-empty"]);
        for good in ["", "a", "MyValue", "my_value", "1.2-3", &"x".repeat(63)] {
            assert!(label_value(good).is_empty(), "{good}");
        }
        for bad in ["-", "a-", "_a", "a/b", "a b", &"x".repeat(64)] {
            assert!(!label_value(bad).is_empty(), "{bad}");
        }
        assert!(qualified_name("a").is_empty());
        assert_eq!(
            label_value("a-"),
            [
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
            ]
        );
    }

    #[test]
    fn ports_and_port_names() {
        assert_eq!(
            port_number(0),
            Some("must be between 1 and 65535, inclusive")
        );
        assert_eq!(
            port_number(65536),
            Some("must be between 1 and 65535, inclusive")
        );
        assert_eq!(
            port_number(-1),
            Some("must be between 1 and 65535, inclusive")
        );
        assert_eq!(port_number(1), None);
        assert_eq!(port_number(65535), None);
        for good in ["http", "h2c", "a-b", "web-8080", "abcdefghijklmno"] {
            assert!(is_valid_port_name(good), "{good}");
        }
        for (bad, problem) in [
            (
                "",
                "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
            ),
            ("abcdefghijklmnop", "must be no more than 15 characters"),
            (
                "HTTP",
                "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
            ),
            ("8080", "must contain at least one letter (a-z)"),
            ("a--b", "must not contain consecutive hyphens"),
            ("-ab", "must not begin or end with a hyphen"),
            ("ab-", "must not begin or end with a hyphen"),
        ] {
            assert!(
                port_name_problems(bad).contains(&problem),
                "{bad}: {:?}",
                port_name_problems(bad)
            );
        }
    }

    #[test]
    fn addresses_and_cidrs() {
        assert!(ip("10.0.0.1").is_some());
        assert!(ip("2001:db8::1").is_some());
        for bad in [
            "",
            "10.0.0",
            "010.0.0.1",
            "10.0.0.256",
            "fe80::1%eth0",
            "10.0.0.1/32",
        ] {
            assert!(ip(bad).is_none(), "{bad}");
        }
        assert!(cidr("10.0.0.0/8").is_some());
        assert!(cidr("10.0.0.1/8").is_some());
        assert!(cidr("2001:db8::/64").is_some());
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/08",
            "2001:db8::/129",
            "x/8",
        ] {
            assert!(cidr(bad).is_none(), "{bad}");
        }
        assert!(fqdn("example.com").is_empty());
        assert!(fqdn("example.com.").is_empty());
        assert!(!fqdn("example").is_empty());
        assert!(!fqdn("Example.com").is_empty());
    }
}
