//! The CNI environment (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH`, and whatever else a runtime leaves
//! in the environment): `CniEnv::from_vars`, which the plugin binary calls
//! with `std::env::var`.
//!
//! Input: `NAME=VALUE` lines (the corpus is readable); a line that is not
//! UTF-8 is a variable `std::env::var` cannot read (unset for the plugin).
//! A later line for the same name wins.
//!
//! Invariants: a refusal is INVALID_ENV; an accepted environment has the
//! command it was given, for ADD/DEL/CHECK a container ID and ifname that
//! follow the CNI rules (so the host veth name and the agent's record file
//! derived from them are safe), a netns for ADD/CHECK; only CNI_* variables
//! are read, and no other variable changes the outcome.
#![no_main]

use std::{cell::RefCell, collections::BTreeMap, path::PathBuf};

use libfuzzer_sys::fuzz_target;
use podnet::{
    cni::{
        CniError,
        env::{CniEnv, Command},
        error::code,
        plugin::host_ifname,
        validate,
    },
    ipam::Owner,
};
use podnet_fuzz::{is_cni_ifname, is_cni_name, record_stays_in_its_directory};

const CNI_VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

/// The environment: `None` for a variable that is set but not Unicode.
type Vars = BTreeMap<String, Option<String>>;

fn vars(data: &[u8]) -> Vars {
    let mut vars = Vars::new();
    for line in data.split(|&b| b == b'\n') {
        let (name, value) = match line.iter().position(|&b| b == b'=') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        let (Ok(name), value) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            continue;
        };
        vars.insert(name.to_owned(), value.ok().map(str::to_owned));
    }
    vars
}

fn parse(vars: &Vars) -> (Result<CniEnv, CniError>, Vec<String>) {
    let read = RefCell::new(Vec::new());
    let env = CniEnv::from_vars(|name| {
        read.borrow_mut().push(name.to_owned());
        vars.get(name).cloned().flatten()
    });
    (env, read.into_inner())
}

fuzz_target!(|data: &[u8]| {
    let vars = vars(data);
    let get = |name: &str| vars.get(name).cloned().flatten();
    let (env, read) = parse(&vars);
    for name in &read {
        assert!(CNI_VARS.contains(&name.as_str()), "read {name}");
    }
    // Only the CNI variables count.
    let cni_only: Vars = vars
        .iter()
        .filter(|(k, _)| CNI_VARS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (again, _) = parse(&cni_only);
    assert_eq!(format!("{env:?}"), format!("{again:?}"));

    let env = match env {
        Ok(env) => env,
        Err(e) => {
            assert_eq!(e.code, code::INVALID_ENV, "{e}");
            return;
        }
    };
    assert_eq!(get("CNI_COMMAND").as_deref(), Some(env.command.name()));
    assert_eq!(env.cni_path, get("CNI_PATH").unwrap_or_default());
    let netns = get("CNI_NETNS").filter(|v| !v.is_empty());
    assert_eq!(env.netns, netns.map(PathBuf::from));
    match env.command {
        Command::Add | Command::Del | Command::Check => {
            assert_eq!(get("CNI_CONTAINERID"), Some(env.container_id.clone()));
            assert_eq!(get("CNI_IFNAME"), Some(env.ifname.clone()));
            assert!(is_cni_name(&env.container_id), "{:?}", env.container_id);
            assert!(is_cni_ifname(&env.ifname), "{:?}", env.ifname);
            if env.command != Command::Del {
                assert!(env.netns.is_some());
            }
            let owner = Owner {
                container_id: env.container_id.clone(),
                ifname: env.ifname.clone(),
            };
            let host = host_ifname(&owner);
            assert!(validate::ifname(&host).is_ok(), "host veth {host:?}");
            assert!(record_stays_in_its_directory(&owner), "{owner:?}");
        }
        Command::Status | Command::Gc | Command::Version => {
            assert!(env.container_id.is_empty() && env.ifname.is_empty());
        }
    }
});
