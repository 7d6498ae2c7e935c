//! The CNI environment variables (`CNI_COMMAND`, `CNI_CONTAINERID`, ...,
//! and from `CNI_ARGS` the pod's namespace and name).

use std::path::PathBuf;

use super::{
    error::{CniError, code},
    validate,
};
use crate::endpoint::PodRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }
}

/// The validated environment of one invocation.
#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub cni_path: String,
    /// The pod (`K8S_POD_NAMESPACE`, `K8S_POD_NAME` in `CNI_ARGS`); read
    /// for ADD only: DEL must succeed whatever a runtime passes.
    pub pod: Option<PodRef>,
}

impl CniEnv {
    /// Reads and validates the variables through `get` (the process
    /// environment in the binary, a map in tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let missing = |var: &str| CniError::new(code::INVALID_ENV, format!("{var} is not set"));
        let non_empty = |var: &str| get(var).filter(|v| !v.is_empty());
        let command = match non_empty("CNI_COMMAND")
            .ok_or_else(|| missing("CNI_COMMAND"))?
            .as_str()
        {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("unknown CNI_COMMAND {other:?}"),
                ));
            }
        };
        let per_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let mut env = Self {
            command,
            container_id: String::new(),
            netns: non_empty("CNI_NETNS").map(PathBuf::from),
            ifname: String::new(),
            cni_path: get("CNI_PATH").unwrap_or_default(),
            pod: None,
        };
        if per_attachment {
            env.container_id =
                non_empty("CNI_CONTAINERID").ok_or_else(|| missing("CNI_CONTAINERID"))?;
            validate::container_id(&env.container_id)?;
            env.ifname = non_empty("CNI_IFNAME").ok_or_else(|| missing("CNI_IFNAME"))?;
            validate::ifname(&env.ifname)?;
            if matches!(command, Command::Add | Command::Check) && env.netns.is_none() {
                return Err(missing("CNI_NETNS"));
            }
        }
        if command == Command::Add {
            env.pod = pod_ref(get("CNI_ARGS").as_deref().unwrap_or_default())?;
        }
        Ok(env)
    }
}

/// The pod named in `CNI_ARGS` (`;`-separated `KEY=VALUE` pairs, as kubelet
/// sets them: `IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;
/// K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..`). As libcni's `LoadArgs`:
/// a pair without `=` is an error. Other keys are ignored whether or not
/// `IgnoreUnknown` is set: podnet reads only the two it needs, and a
/// runtime adding keys must not break pods. An empty value counts as
/// absent. Only both together name a Kubernetes pod: podman (5.x) sets
/// `K8S_POD_NAME` to the container's name and no namespace, and a
/// container name need not be a valid pod name, so half a pair names no
/// pod (the container gets its network all the same, without a record).
pub fn pod_ref(cni_args: &str) -> Result<Option<PodRef>, CniError> {
    let (mut namespace, mut name) = (None, None);
    for pair in cni_args.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: invalid pair {pair:?} (not KEY=VALUE)"),
            ));
        };
        let value = Some(value.to_owned()).filter(|v| !v.is_empty());
        match key {
            "K8S_POD_NAMESPACE" => namespace = value,
            "K8S_POD_NAME" => name = value,
            _ => {}
        }
    }
    let (Some(namespace), Some(name)) = (namespace, name) else {
        return Ok(None);
    };
    validate::pod_ref(&namespace, &name)?;
    Ok(Some(PodRef { namespace, name }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        CniEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn required_per_command() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert!(env(&add).is_ok());
        for skip in 1..add.len() {
            let vars: Vec<_> = add
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, v)| *v)
                .collect();
            assert_eq!(
                env(&vars).unwrap_err().code,
                code::INVALID_ENV,
                "without {}",
                add[skip].0
            );
        }
        // DEL works without a netns (the pod may be gone).
        assert!(
            env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0")
            ])
            .is_ok()
        );
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "STATUS")]).is_ok());
        assert_eq!(
            env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENV);
    }

    const KUBELET: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;\
        K8S_POD_NAME=coredns-5d78c9869d-x7k2p;\
        K8S_POD_INFRA_CONTAINER_ID=0123456789abcdef;\
        K8S_POD_UID=8b7c4e2a-3f1d-4c5b-9a6e-2d1f0e9c8b7a";

    fn add_with_args(args: Option<&str>) -> Result<CniEnv, CniError> {
        let mut vars = vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        if let Some(args) = args {
            vars.push(("CNI_ARGS", args));
        }
        env(&vars)
    }

    #[test]
    fn the_pod_comes_from_kubelets_cni_args() {
        let pod = add_with_args(Some(KUBELET)).expect("kubelet's args").pod;
        assert_eq!(
            pod,
            Some(PodRef {
                namespace: "kube-system".into(),
                name: "coredns-5d78c9869d-x7k2p".into(),
            })
        );
        // Without IgnoreUnknown, in another order, with a trailing ';'.
        let pod = add_with_args(Some("K8S_POD_NAME=a;FOO=bar;K8S_POD_NAMESPACE=x;"))
            .expect("args")
            .pod;
        assert_eq!(
            pod,
            Some(PodRef {
                namespace: "x".into(),
                name: "a".into(),
            })
        );
    }

    #[test]
    fn no_pod_without_cni_args() {
        for args in [
            None,
            Some(""),
            Some("IgnoreUnknown=1"),
            Some("K8S_POD_NAMESPACE=;K8S_POD_NAME="),
        ] {
            assert_eq!(add_with_args(args).expect("no pod").pod, None, "{args:?}");
        }
    }

    #[test]
    fn malformed_cni_args_are_refused_on_add_only() {
        for (args, says) in [
            ("IgnoreUnknown=1;K8S_POD_NAMESPACE", "invalid pair"),
            (
                "K8S_POD_NAMESPACE=X;K8S_POD_NAME=a",
                "invalid K8S_POD_NAMESPACE",
            ),
            (
                "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a/../b",
                "invalid K8S_POD_NAME",
            ),
        ] {
            let err = add_with_args(Some(args)).expect_err(args);
            assert_eq!(err.code, code::INVALID_ENV, "{args}");
            assert!(err.msg.contains(says), "{args}: {}", err.msg);
        }
        // Half a pair names no pod, and the ADD goes on: what podman sets
        // (the container's name, which need not be a pod name, and no
        // namespace).
        for args in [
            "IgnoreUnknown=1;K8S_POD_NAME=My_Container",
            "K8S_POD_NAMESPACE=x",
        ] {
            assert_eq!(add_with_args(Some(args)).expect(args).pod, None, "{args}");
        }
        // DEL succeeds whatever CNI_ARGS holds (the pod may be half gone).
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "garbage"),
        ])
        .expect("DEL");
        assert_eq!(del.pod, None);
    }
}
