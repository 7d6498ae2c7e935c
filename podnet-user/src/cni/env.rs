//! The CNI environment variables (`CNI_COMMAND`, `CNI_CONTAINERID`, ...).

use std::path::PathBuf;

use super::{
    error::{CniError, code},
    validate,
};

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
        Ok(env)
    }
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
}
