//! CNI errors: the spec's codes and the JSON a runtime reads.

use serde::Serialize;

/// Error codes from the CNI spec (SPEC.md, "Error"); 100+ are podnet's.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// podnet: the node's pod CIDR has no free address.
    pub const ADDRESSES_EXHAUSTED: u32 = 100;
    /// podnet: CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 101;
    /// podnet: the agent refused or failed a request.
    pub const AGENT_FAILED: u32 = 102;
    /// podnet: creating or configuring interfaces failed.
    pub const PLUMBING_FAILED: u32 = 103;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    #[must_use]
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// A std error with its whole source chain as details.
    pub fn from_error(
        code: u32,
        msg: impl Into<String>,
        err: &(dyn std::error::Error + 'static),
    ) -> Self {
        let mut details = err.to_string();
        let mut source = err.source();
        while let Some(e) = source {
            details.push_str(": ");
            details.push_str(&e.to_string());
            source = e.source();
        }
        Self::new(code, msg).with_details(details)
    }

    /// The error JSON for stdout, in `cni_version`.
    #[must_use]
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        value["cniVersion"] = serde_json::Value::String(cni_version.to_owned());
        value.to_string()
    }
}
