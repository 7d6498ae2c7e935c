//! The endpoint naming rules ([`crate::endpoint`]) as CNI errors: which
//! input is bad decides the code (the environment's or the config's).

use super::error::{CniError, code};
use crate::endpoint::{self, NameError};

fn cni_error(e: &NameError) -> CniError {
    let code = match e {
        NameError::NetworkName(_) => code::INVALID_CONFIG,
        NameError::ContainerId(_)
        | NameError::Ifname { .. }
        | NameError::PodNamespace { .. }
        | NameError::PodName { .. } => code::INVALID_ENV,
    };
    CniError::new(code, e.to_string())
}

/// `CNI_CONTAINERID`: see [`endpoint::container_id`].
pub fn container_id(id: &str) -> Result<(), CniError> {
    endpoint::container_id(id).map_err(|e| cni_error(&e))
}

/// Network name: see [`endpoint::network_name`].
pub fn network_name(name: &str) -> Result<(), CniError> {
    endpoint::network_name(name).map_err(|e| cni_error(&e))
}

/// `CNI_IFNAME`: see [`endpoint::ifname`].
pub fn ifname(name: &str) -> Result<(), CniError> {
    endpoint::ifname(name).map_err(|e| cni_error(&e))
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME`: see [`endpoint::pod_ref`].
pub fn pod_ref(namespace: &str, name: &str) -> Result<(), CniError> {
    endpoint::pod_ref(namespace, name).map_err(|e| cni_error(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert!(container_id("abc-1.2_3").is_ok());
        assert_eq!(container_id("a/b").unwrap_err().code, code::INVALID_ENV);
        assert_eq!(ifname("a:b").unwrap_err().code, code::INVALID_ENV);
        let err = network_name("a b").unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.starts_with("invalid network name"), "{}", err.msg);
    }
}
