//! The API server's checks of the objects podnet keeps, with its field
//! paths and messages, so that a refused `apply` reads as `kubectl`'s
//! would: `Service "web" is invalid: spec.ports[0].port: Invalid value: 0:
//! must be between 1 and 65535, inclusive`. Every problem of an object is
//! reported, not only the first. The rules are the API server's for a
//! create, after its defaulting (an absent protocol is TCP, an absent
//! targetPort is the port, an absent namespace is `default`).

mod endpoint_slice;
mod meta;
mod network_policy;
mod pod;
mod rules;
mod service;

use std::fmt;

use thiserror::Error;

use super::{kind::Kind, object::ClusterObject};

pub use rules::{dns1123_label, dns1123_subdomain, is_valid_port_name, port_name_problems};

/// What is wrong with a field, as the API server's `field.ErrorType`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldErrorType {
    Invalid,
    Required,
    Duplicate,
    /// A value outside a closed set, with the set.
    Unsupported(&'static [&'static str]),
    Forbidden,
    /// More items than the maximum.
    TooMany(usize),
    /// More bytes than the maximum.
    TooLong(usize),
}

/// One problem, at one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field path as the API server writes it (`spec.ingress[0].ports[1].endPort`).
    pub field: String,
    pub error_type: FieldErrorType,
    /// The offending value as shown (strings quoted), where the type shows one.
    pub value: Option<String>,
    pub detail: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.field)?;
        let value = self.value.as_deref().unwrap_or("null");
        match &self.error_type {
            FieldErrorType::Invalid => write!(f, "Invalid value: {value}")?,
            FieldErrorType::Duplicate => write!(f, "Duplicate value: {value}")?,
            FieldErrorType::Unsupported(supported) => {
                write!(f, "Unsupported value: {value}: supported values: ")?;
                let quoted: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
                return f.write_str(&quoted.join(", "));
            }
            FieldErrorType::Required => f.write_str("Required value")?,
            FieldErrorType::Forbidden => f.write_str("Forbidden")?,
            FieldErrorType::TooMany(max) => {
                return write!(f, "Too many: {value}: must have at most {max} items");
            }
            FieldErrorType::TooLong(max) => {
                return write!(f, "Too long: may not be more than {max} bytes");
            }
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// An object the API server would refuse, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct ValidationError {
    pub kind: Kind,
    pub name: String,
    pub errors: Vec<FieldError>,
}

impl ValidationError {
    /// Whether one of the problems is at `field`.
    pub fn names_field(&self, field: &str) -> bool {
        self.errors.iter().any(|e| e.field == field)
    }
}

/// As the API server's `StatusError` for an invalid object: one problem
/// plainly, several in brackets.
impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} is invalid: ", self.kind, self.name)?;
        match self.errors.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                let each: Vec<String> = many.iter().map(ToString::to_string).collect();
                write!(f, "[{}]", each.join(", "))
            }
        }
    }
}

impl ClusterObject {
    /// The API server's checks for creating this object: `Ok` or every
    /// problem found.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut errors = Errors::default();
        meta::validate_meta(self, &mut errors);
        match self {
            Self::Namespace(_) => {}
            Self::Pod(pod) => pod::validate(pod, &mut errors),
            Self::NetworkPolicy(policy) => network_policy::validate(policy, &mut errors),
            Self::Service(service) => service::validate(service, &mut errors),
            Self::EndpointSlice(slice) => endpoint_slice::validate(slice, &mut errors),
        }
        if errors.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                kind: self.kind(),
                name: self.name().to_owned(),
                errors: errors.0,
            })
        }
    }
}

/// The protocols every port of every kind takes, in the API server's
/// (sorted) order for its messages.
pub(crate) const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

/// A field path under construction.
#[derive(Debug, Clone)]
pub(crate) struct Path(String);

impl Path {
    pub(crate) fn root(name: &str) -> Self {
        Self(name.to_owned())
    }

    pub(crate) fn child(&self, name: &str) -> Self {
        Self(format!("{}.{name}", self.0))
    }

    pub(crate) fn index(&self, index: usize) -> Self {
        Self(format!("{}[{index}]", self.0))
    }
}

/// A value as the API server shows it: strings quoted, numbers bare.
pub(crate) fn quoted(value: &str) -> String {
    format!("{value:?}")
}

/// The problems found so far.
#[derive(Debug, Default)]
pub(crate) struct Errors(pub(crate) Vec<FieldError>);

impl Errors {
    fn push(
        &mut self,
        path: &Path,
        error_type: FieldErrorType,
        value: Option<String>,
        detail: &str,
    ) {
        self.0.push(FieldError {
            field: path.0.clone(),
            error_type,
            value,
            detail: detail.to_owned(),
        });
    }

    pub(crate) fn invalid(&mut self, path: &Path, value: impl fmt::Display, detail: &str) {
        self.push(
            path,
            FieldErrorType::Invalid,
            Some(value.to_string()),
            detail,
        );
    }

    /// `invalid` for a string value (shown quoted).
    pub(crate) fn invalid_str(&mut self, path: &Path, value: &str, detail: &str) {
        self.invalid(path, quoted(value), detail);
    }

    /// Every message of a rule, each as an invalid value.
    pub(crate) fn invalid_each(&mut self, path: &Path, value: &str, messages: Vec<String>) {
        for message in messages {
            self.invalid_str(path, value, &message);
        }
    }

    pub(crate) fn required(&mut self, path: &Path, detail: &str) {
        self.push(path, FieldErrorType::Required, None, detail);
    }

    pub(crate) fn forbidden(&mut self, path: &Path, detail: &str) {
        self.push(path, FieldErrorType::Forbidden, None, detail);
    }

    pub(crate) fn duplicate(&mut self, path: &Path, value: impl fmt::Display) {
        self.push(path, FieldErrorType::Duplicate, Some(value.to_string()), "");
    }

    pub(crate) fn unsupported(
        &mut self,
        path: &Path,
        value: &str,
        supported: &'static [&'static str],
    ) {
        self.push(
            path,
            FieldErrorType::Unsupported(supported),
            Some(quoted(value)),
            "",
        );
    }

    pub(crate) fn too_many(&mut self, path: &Path, count: usize, max: usize) {
        self.push(
            path,
            FieldErrorType::TooMany(max),
            Some(count.to_string()),
            "",
        );
    }

    pub(crate) fn too_long(&mut self, path: &Path, max: usize) {
        self.push(path, FieldErrorType::TooLong(max), None, "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(error_type: FieldErrorType, value: Option<&str>, detail: &str) -> FieldError {
        FieldError {
            field: "spec.x".into(),
            error_type,
            value: value.map(str::to_owned),
            detail: detail.into(),
        }
    }

    #[test]
    fn field_errors_read_as_the_api_servers() {
        for (e, text) in [
            (
                error(
                    FieldErrorType::Invalid,
                    Some("0"),
                    "must be between 1 and 65535, inclusive",
                ),
                "spec.x: Invalid value: 0: must be between 1 and 65535, inclusive",
            ),
            (
                error(FieldErrorType::Required, None, ""),
                "spec.x: Required value",
            ),
            (
                error(FieldErrorType::Required, None, "must specify a peer"),
                "spec.x: Required value: must specify a peer",
            ),
            (
                error(FieldErrorType::Unsupported(PROTOCOLS), Some("\"ICMP\""), ""),
                "spec.x: Unsupported value: \"ICMP\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
            ),
            (
                error(FieldErrorType::Duplicate, Some("\"http\""), ""),
                "spec.x: Duplicate value: \"http\"",
            ),
            (
                error(FieldErrorType::Forbidden, None, "may not be used"),
                "spec.x: Forbidden: may not be used",
            ),
            (
                error(FieldErrorType::TooMany(100), Some("101"), ""),
                "spec.x: Too many: 101: must have at most 100 items",
            ),
            (
                error(FieldErrorType::TooLong(262_144), None, ""),
                "spec.x: Too long: may not be more than 262144 bytes",
            ),
        ] {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn several_problems_are_bracketed() {
        let one = error(FieldErrorType::Required, None, "");
        let mut err = ValidationError {
            kind: Kind::Service,
            name: "web".into(),
            errors: vec![one.clone()],
        };
        assert_eq!(
            err.to_string(),
            "Service \"web\" is invalid: spec.x: Required value"
        );
        err.errors.push(one);
        assert_eq!(
            err.to_string(),
            "Service \"web\" is invalid: [spec.x: Required value, spec.x: Required value]"
        );
    }
}
